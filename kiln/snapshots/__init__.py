"""Snapshots: bake an initialised instance into one safetensors file plus a pickled object
graph, keep them in a content-addressed, signed store, and restore them at hardware speed on CPU
and CUDA."""
