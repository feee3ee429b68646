"""Checkpoints: a ModelState (or a module) as safetensors files, and back.

>>> import os, tempfile, torch
>>> from torch import nn
>>> import torch_modelstate as tms
>>> path = os.path.join(tempfile.mkdtemp(), "model.safetensors")
>>> tms.save(nn.Linear(2, 2), path)
>>> model = nn.Linear(2, 2)
>>> sorted(tms.io.check(path, model).loaded)
['bias', 'weight']
>>> _ = tms.load(path, into=model)

`save` writes a plain safetensors file that any safetensors reader loads, with
``{"format": "pt"}`` in its metadata. Tied data is stored once, under the source's key;
which keys are state, the frozen set and the ties go into one versioned JSON entry of the
metadata, under the key ``"torch_modelstate"``::

    {"version": 1,
     "keys": [every key in state_dict order, tie destinations included],
     "state": [keys of persistent buffers],
     "frozen": [keys of frozen parameters and buffers],
     "ties": {"lm_head.weight": {"source": "embed.weight", "transform": null},
              "dec.weight": {"source": "enc.weight", "transform": "transpose"}}}

A transform is saved by its registered name (`register_transform`) and looked up by name
when loading; nothing from a file is ever evaluated or unpickled, and an unknown name is
an error. Loading reads the ties of files written by ``safetensors.torch.save_model`` too
(it drops aliased keys and records ``{removed: kept}`` in the metadata), and files without
a tie for a key the target ties (``transformers``' ``save_pretrained``) fill that key from
its source.

**Where files go.** Without `max_shard_size`, `path` is the file to write (or an existing
directory to write ``model.safetensors`` into). With it, `path` is a directory (created if
needed) that receives ``model-00001-of-0000N.safetensors`` and
``model.safetensors.index.json`` (``metadata.total_size`` and ``weight_map``, as
``transformers`` writes it), or a single ``model.safetensors`` when everything fits in one
shard. Writing ``model.safetensors`` or shards into a directory replaces the checkpoint
files (index, ``model.safetensors``, ``model-*-of-*.safetensors``) of an earlier save
there. Every file is written under a temporary name, synced, and renamed into place when
complete, the index last, and the previous layout's files are removed after that; every
file carries the save's id, so a load refuses files of two saves (`CheckpointCorruptError`)
where the fixed names cannot be replaced at once. Saves to one path are serialised by an
advisory lock; only regular files are read. See ``torch_modelstate.checkpoint._writer``
for exactly what holds under kills, failures and concurrent writers. Tensors
are written one at a time; only those that are not contiguous CPU tensors are copied,
in batches of at most 64 MB (or one larger tensor).

**Loading into a model** (`load(path, into=model)`) checks the headers of all shards, the
keys, shapes, dtypes and ties against the target *before* writing anything, then streams
tensor by tensor: a contiguous CPU tensor of the file's dtype is read straight into the
parameter's memory by a few threads (no second copy of the model, no mmap pages counted
twice); anything else goes through staging tensors, at most 64 MB at a time (or one
larger tensor), copied to the parameter's device and dtype by one grouped kernel call.
Parameter objects stay the same (optimizers keep working); ties in the file are made in
the target. The target's frozen flags stay as they are (``frozen="keep"``, the default:
loading weights never changes what trains), or become the file's set with
``frozen="file"``. ``rename`` maps the file's keys to the target's first (a mapping
``{file_key: target_key}`` or a callable returning the target key, or None to skip the
key). Only a failing disk (an I/O error in the middle
of the reads) can leave the target partly loaded: everything a file can get wrong is
checked first.

**Dtypes.** As `ModelState.update`, a value is cast to the destination's dtype when both
are of one kind (floating to floating: a bfloat16 file into a float32 model; integer to
integer; complex to complex). Across kinds (floating into an integer buffer, integer into
a float parameter) it is a `CheckpointMismatchError`: such a file was written for another
model.

**strict.** With ``strict=True`` (the default) the file must cover every key of the target
and hold no key the target lacks. With ``strict=False`` the keys both have are loaded,
the target's other keys keep their values, the file's other keys are ignored, and both
lists are logged as a warning on the ``torch_modelstate`` logger; `check` returns them
without loading. Shapes and dtypes must match either way.

**Errors.** A damaged file (empty, truncated, a header that lies about its length, a
corrupted header or ``torch_modelstate`` entry) raises `CheckpointCorruptError`; a sound
file that does not fit the target (keys, shapes, dtypes, ties) `CheckpointMismatchError`.
Both are `CheckpointError`, a `ValueError`, and name the file and the problem; on either
the target is untouched. A missing file is `FileNotFoundError`.
"""

from __future__ import annotations

from torch_modelstate.checkpoint._average import average
from torch_modelstate.checkpoint._load import check, load
from torch_modelstate.checkpoint._plan import LoadReport
from torch_modelstate.checkpoint._save import save

__all__ = ["LoadReport", "average", "check", "load", "save"]
