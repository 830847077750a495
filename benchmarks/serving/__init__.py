"""The `serving` suite: moecompress's stock-layout outputs served by vLLM on the CPU.

* `setup`: vLLM's own virtual environment (one command, exact pins, idempotent).
* `outputs`: the outputs the suite serves, written with moecompress's library.
* `worker`: the child process, run by the vLLM venv's python, that serves them.
* `suite`: the `serving` suite (vLLM against transformers) and its RESULTS.md renderer.
"""
