"""Safetensors checkpoints; the public surface is `torch_modelstate.io`.

One module per concern, lowest first (each imports only those above it):

- ``_codec``: the safetensors format: dtype tables, a header checked in full and encoded;
- ``_budget``: the one byte-budget packer (staging batches, shards);
- ``_files``: a path resolved to files, opened, headers checked, bytes read into tensors;
- ``_layout``: where a save's files go (shard size, split into shards, output path);
- ``_writer``: writing files atomically (temporary names, fsync, rename, the index);
- ``_entry``: the ``torch_modelstate`` metadata entry (state keys, frozen set, ties);
- ``_save``: `save`;
- ``_plan``: load planning, every check against the target before a write;
- ``_apply``: applying a plan (ties, streamed values, frozen set);
- ``_standalone``: loading without a target;
- ``_load``: `load` and `check`;
- ``_average``: `average`, the engine of the CLI's ``merge``.
"""
