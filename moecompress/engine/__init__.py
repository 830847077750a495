"""The layer engine: a checkpoint read one decoder layer at a time (`reader`), cached hidden
states pushed through each layer in turn (`layers`), output shards written as layers finish
(`moecompress.io.safetensors_stream`)."""
