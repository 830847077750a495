"""`python -m moecompress` runs the CLI."""

from moecompress.cli.app import main

main()
