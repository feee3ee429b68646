"""Safetensors checkpoints; the public surface is `torch_modelstate.io`.

One module per concern, lowest first (each imports only modules listed above it).

Files and format (shared by saving and loading):

- ``_steps``: the one seam every file-system step of a save or a load goes through;
- ``_codec``: the safetensors format: dtype tables, a header checked in full and encoded;
- ``_budget``: the one byte-budget packer (staging batches, shards);
- ``_stamp``: the save id every file of one save carries (mixtures are refused);
- ``_locate``: fixed names, a path resolved to files, only regular files opened;
- ``_files``: an open checkpoint: headers checked, files of one save, bytes read into tensors;
- ``_mapping``: files mapped copy-on-write (standalone loads);
- ``_layout``: where a save's files go (shard size, split into shards, output path);
- ``_writer``: writing files atomically, in an order that survives kills, under a lock.

Saving and loading:

- ``_entry``: the ``torch_modelstate`` metadata entry (state keys, frozen set, ties);
- ``_collective``: collective saves and loads of sharded (FSDP2) models;
- ``_save``: `save`;
- ``_rename``, ``_hints``, ``_writable``: key mapping, mismatch hints, writability checks;
- ``_plan``: load planning, every check against the target before a write;
- ``_apply``: applying a plan (ties, streamed values, frozen set);
- ``_standalone``: loading without a target;
- ``_load``: `load` and `check`;
- ``_average``: `average`, the engine of the CLI's ``merge``.
"""
