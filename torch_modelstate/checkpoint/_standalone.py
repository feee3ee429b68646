"""Loading without a target: a standalone ModelState with the file's values, frozen set, ties.

The values are mapped from the files copy-on-write (`_mapping`, as
``safetensors.torch.load_file`` does): nothing is read until a page is used, and writing a
tensor never changes the file.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from torch_modelstate._errors import CheckpointCorruptError, CheckpointError
from torch_modelstate._paths import to_path
from torch_modelstate._state import ModelState
from torch_modelstate.checkpoint._codec import TensorInfo
from torch_modelstate.checkpoint._entry import Saved, transform
from torch_modelstate.checkpoint._files import Checkpoint
from torch_modelstate.checkpoint._mapping import map_checkpoint


def load_standalone(
    ckpt: Checkpoint, saved: Saved, stored: Mapping[str, TensorInfo] | None = None
) -> ModelState:
    """A standalone ModelState of `ckpt` (`stored`: its tensors under their loaded keys)."""
    file = ckpt.path
    tensors = ckpt.tensors if stored is None else stored
    for key in saved.order:
        try:
            to_path(key)
        except (TypeError, ValueError):
            msg = f"{file}: the tensor name {key!r} is not a dotted key such as 'fc.weight'."
            raise CheckpointError(msg) from None
    placeholders: dict[str, Tensor] = {}
    for dest, (source, name) in saved.ties.items():
        fn = transform(file, dest, name)
        info = tensors[source]
        like = torch.empty(info.shape, dtype=info.torch_dtype, device="meta")
        try:
            probe = like if fn is None else fn(like)
        except Exception as err:
            msg = f"{file}: the transform {name!r} of the tie `{dest}` fails on `{source}` ({err})."
            raise CheckpointCorruptError(msg) from None
        # Storage-free stand-in of the right shape; `tie` replaces it.
        placeholders[dest] = torch.empty((), dtype=probe.dtype).expand(probe.shape)
    values = map_checkpoint(ckpt, tensors).tensors
    entries = {key: values[key] if key in values else placeholders[key] for key in saved.order}
    state = saved.state | {
        dest for dest, (source, _) in saved.ties.items() if source in saved.state
    }
    try:
        return ModelState._from_parts(
            entries, state_keys=state, frozen=saved.frozen or (), ties=saved.ties
        )
    except (KeyError, ValueError, TypeError) as err:
        msg = f"{file}: the checkpoint's ties are inconsistent: {err}"
        raise CheckpointCorruptError(msg) from None
