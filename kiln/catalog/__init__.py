"""Kiln's model catalog: models a user deploys in one command (`kiln catalog deploy chat`) and
calls with OpenAI's client.

Each entry (`kiln.catalog.entries`) names an engine class (`text`, `embeddings`, `image`: a
`@kiln.enter(snap=True)` that loads the weights, so every cold start restores them from the
snapshot, and `@kiln.method(task=...)` methods). Deploying an entry deploys an ordinary app
(`kiln.catalog.apps`) whose one file subclasses the engine with the chosen model: `kiln ps`,
`kiln scale`, `kiln logs` and `kiln stop` work on it as on any other.

Importing the catalog loads no model library: the engines import torch, transformers or
diffusers inside their hooks, on the replica.
"""
