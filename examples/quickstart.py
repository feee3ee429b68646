"""The README's thirty-second tour as a script: ``python examples/quickstart.py``."""

import copy
import os
import tempfile

import torch
from torch import nn

import torch_modelstate as tms
from torch_modelstate import ModelState, merges


def build() -> nn.ModuleDict:
    blocks = [nn.Sequential(nn.Linear(32, 32), nn.BatchNorm1d(32)) for _ in range(4)]
    embed, head = nn.Embedding(100, 32), nn.Linear(32, 100, bias=False)
    return nn.ModuleDict({"embed": embed, "blocks": nn.ModuleList(blocks), "head": head})


model = build()
ms = ModelState.new(model)  # a live view: no copies

ms.tie("head.weight", "embed.weight")  # one nn.Parameter under both names
ms.freeze()  # freeze everything (BatchNorm statistics too)
ms.unfreeze("blocks.**")  # then thaw the blocks: a glob over keys


def mask(path: list[str]) -> bool:  # or a function over paths as lists, Axon style
    match path:
        case ["blocks", n, *_] if int(n) < 2:
            return True
        case _:
            return False


ms.freeze(mask)  # refreeze the first two blocks
opt = torch.optim.AdamW(ms.trainable_parameters().values())  # each tied tensor once
ema = ms.clone()  # a standalone copy of values, frozen set and ties

ids = torch.randint(0, 100, (16,))  # one training step
h = model["embed"](ids)
for block in model["blocks"]:
    h = block(h)
nn.functional.cross_entropy(model["head"](h), ids).backward()
opt.step()
ema.merge(ms, merges.ema(0.999))  # one grouped _foreach_lerp_, no Python per tensor

other = copy.deepcopy(model)  # say, a second fine-tuning run (the tie comes along)
nn.init.normal_(other.get_parameter("blocks.3.0.weight"))
soup = ms.clone().merge(other, merges.lerp(0.5))  # average the two: a model soup
ms.update(soup)  # copy it back in place: identity and requires_grad kept
ms.update(other.state_dict())  # or load any state_dict (or some of its keys)
print(ms)

with tempfile.TemporaryDirectory() as tmp:  # plain safetensors, with ties and frozen set
    tms.save(ms, os.path.join(tmp, "model.safetensors"))
    fresh = build()
    tms.load(os.path.join(tmp, "model.safetensors"), into=fresh, frozen="file")
assert fresh["head"].weight is fresh["embed"].weight
assert list(ModelState.new(fresh).trainable_parameters()) == list(ms.trainable_parameters())
