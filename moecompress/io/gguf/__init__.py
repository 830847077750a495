"""GGUF, the file format llama.cpp runs: names, metadata, tokenizer and a streaming writer.

Written on the `gguf` package (llama.cpp's own Python library): its `GGUFWriter`, tensor-name
map, constants and Python quantisers. The modules, one job each:

* `arches`: per `model_type`, the llama.cpp architecture, its hyperparameter keys, what it
  cannot represent (refused) and the tensor layout transforms it needs;
* `names`: a checkpoint's in-memory tensor name -> GGUF tensor name (`gguf`'s map);
* `tokenizer`: tokenizer.json (byte-level BPE) -> GGUF vocabulary keys;
* `types`: the output types (`--type`) and the type each tensor is stored in;
* `writer`: a GGUF file written tensor by tensor to a temporary sibling, renamed when complete.

The export stage that reads a checkpoint layer by layer into these is `moecompress.export`.
"""
