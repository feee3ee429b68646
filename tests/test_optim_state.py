"""Optimizer state in safetensors: resuming is bit-for-bit, loading is by key and checked."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from torch import nn

import torch_modelstate as tms
from torch_modelstate import CheckpointCorruptError, CheckpointMismatchError, ModelState

Factory = Callable[[list[dict[str, Any]]], torch.optim.Optimizer]

FACTORIES: dict[str, Factory] = {
    "adamw": lambda g: torch.optim.AdamW(g, lr=1e-2, weight_decay=0.1),
    "adamw_amsgrad": lambda g: torch.optim.AdamW(g, lr=1e-2, amsgrad=True),
    "sgd_momentum": lambda g: torch.optim.SGD(g, lr=1e-2, momentum=0.9, nesterov=True),
    "sgd_plain": lambda g: torch.optim.SGD(g, lr=1e-2),
    "rmsprop": lambda g: torch.optim.RMSprop(g, lr=1e-3, momentum=0.5, centered=True),
    "adagrad": lambda g: torch.optim.Adagrad(g, lr=1e-2),
    "adam_tensor_lr": lambda g: torch.optim.Adam(g, lr=torch.tensor(1e-2), foreach=False),
}


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 2))


def batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + i)
    return torch.randn(4, 3, generator=g), torch.randn(4, 2, generator=g)


def train(m: nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
    for i in steps:
        x, y = batch(i)
        opt.zero_grad()
        nn.functional.mse_loss(m(x), y).backward()
        opt.step()


def groups(m: nn.Module, *, reverse: bool = False) -> list[dict[str, Any]]:
    out = ModelState.new(m).param_groups({"**.bias": {"weight_decay": 0.0}})
    if reverse:  # the same groups, parameters in another order
        out = [dict(g, params=g["params"][::-1], param_names=g["param_names"][::-1]) for g in out]
    return out


def snapshot(opt: torch.optim.Optimizer) -> str:
    sd = opt.state_dict()
    return repr(sd)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_resuming_from_model_and_optimizer_files_equals_uninterrupted_training(
    name: str, tmp_path: Path
) -> None:
    """Train 3 steps, save, go on 3; a rebuilt model loaded from the files gives the same bits."""
    make = FACTORIES[name]
    a = model()
    opt_a = make(groups(a))
    train(a, opt_a, range(3))
    tms.save(a, tmp_path / "model.safetensors")
    tms.save_optimizer(opt_a, a, tmp_path / "opt.safetensors")
    train(a, opt_a, range(3, 6))

    torch.manual_seed(1)  # other initial values: everything must come from the files
    b = nn.Sequential(nn.Linear(3, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 2))
    opt_b = make(groups(b, reverse=True))
    tms.load(tmp_path / "model.safetensors", into=b)
    tms.load_optimizer(opt_b, b, tmp_path / "opt.safetensors")
    train(b, opt_b, range(3, 6))
    for (key, ta), tb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(ta, tb), key
    sa, sb = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
    names_a = [k for g in opt_a.param_groups for k in g["param_names"]]
    names_b = [k for g in opt_b.param_groups for k in g["param_names"]]
    for i, key in enumerate(names_a):
        j = names_b.index(key)
        assert sa.get(i, {}).keys() == sb.get(j, {}).keys()
        for state_name, value in sa.get(i, {}).items():
            other = sb[j][state_name]
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, other) and value.dtype == other.dtype, (key, state_name)
            else:
                assert value == other, (key, state_name)


def test_the_file_is_plain_safetensors_keyed_by_parameter_and_state_name(tmp_path: Path) -> None:
    """Other tools read it: `<key>.<state>` tensors, options and non-tensor state in JSON."""
    m = model()
    opt = torch.optim.SGD(groups(m), lr=0.1)
    train(m, opt, range(1))
    opt.state[m[0].weight]["momentum_buffer"] = None  # what SGD without momentum kept in torch 2.4
    adamw = torch.optim.AdamW(groups(m), lr=0.1, betas=(0.8, 0.9))
    train(m, adamw, range(1))
    tms.save_optimizer(adamw, m, tmp_path / "adamw.safetensors")
    with safe_open(tmp_path / "adamw.safetensors", framework="pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
    assert {"0.weight.exp_avg", "0.weight.exp_avg_sq", "0.weight.step"} <= keys
    entry = json.loads(meta["torch_modelstate.optimizer"])
    assert meta["format"] == "pt"
    assert entry["optimizer"] == "AdamW"
    assert entry["groups"][0]["options"]["betas"] == {"value": [0.8, 0.9]}
    tms.save_optimizer(opt, m, tmp_path / "sgd.safetensors")
    with safe_open(tmp_path / "sgd.safetensors", framework="pt") as f:
        assert list(f.keys()) == []
        entry = json.loads(f.metadata()["torch_modelstate.optimizer"])
    assert entry["state"]["0.weight"] == {"momentum_buffer": {"value": None}}
    fresh = torch.optim.SGD(groups(m), lr=0.5)
    tms.load_optimizer(fresh, m, tmp_path / "sgd.safetensors")
    assert fresh.state[m[0].weight] == {"momentum_buffer": None}
    assert fresh.param_groups[0]["lr"] == 0.1


def test_a_python_number_step_and_tuple_options_round_trip(tmp_path: Path) -> None:
    """Non-tensor state (a float step) comes back as a number, betas as a tuple."""
    m = model()
    opt = torch.optim.Adam(m.parameters(), lr=0.1, betas=(0.5, 0.6))
    train(m, opt, range(1))
    for state in opt.state.values():
        state["step"] = float(state["step"])
    tms.save_optimizer(opt, m, tmp_path / "o.safetensors")
    fresh = torch.optim.Adam(m.parameters(), lr=0.1)
    tms.load_optimizer(fresh, m, tmp_path / "o.safetensors")
    assert fresh.param_groups[0]["betas"] == (0.5, 0.6)
    assert fresh.state[m[0].weight]["step"] == 1.0
    train(m, fresh, range(1, 2))


def test_a_tied_tensor_has_its_state_stored_once(tmp_path: Path) -> None:
    """Tied embeddings: one tensor, one key (the source's), one state."""
    m = nn.ModuleDict({"embed": nn.Embedding(5, 4), "head": nn.Linear(4, 5)})
    m["head"].weight = m["embed"].weight
    opt = torch.optim.AdamW(ModelState.new(m).param_groups(), lr=0.1)
    m["head"](m["embed"](torch.arange(3))).sum().backward()
    opt.step()
    tms.save_optimizer(opt, m, tmp_path / "o.safetensors")
    with safe_open(tmp_path / "o.safetensors", framework="pt") as f:
        stored = sorted(f.keys())
    assert stored == [
        f"{k}.{s}" for k in ("embed.weight", "head.bias") for s in ("exp_avg", "exp_avg_sq", "step")
    ]


# ----------------------------------------------------------------------------- refused


def saved(tmp_path: Path) -> tuple[nn.Module, Path]:
    m = model()
    opt = torch.optim.AdamW(groups(m), lr=0.1)
    train(m, opt, range(2))
    path = tmp_path / "opt.safetensors"
    tms.save_optimizer(opt, m, path)
    return m, path


def refuses(opt: torch.optim.Optimizer, m: nn.Module, path: Path, error: type, match: str) -> None:
    before = snapshot(opt)
    with pytest.raises(error, match=match):
        tms.load_optimizer(opt, m, path)
    assert snapshot(opt) == before


def test_another_optimizer_class_is_a_mismatch(tmp_path: Path) -> None:
    """AdamW state does not load into SGD; the SGD is untouched."""
    m, path = saved(tmp_path)
    opt = torch.optim.SGD(groups(m), lr=0.1, momentum=0.9)
    train(m, opt, range(1))
    refuses(opt, m, path, CheckpointMismatchError, "state of a AdamW, the optimizer is a SGD")


def test_other_groups_are_a_mismatch(tmp_path: Path) -> None:
    """The group count and each group's keys must agree (order within a group is free)."""
    m, path = saved(tmp_path)
    one_group = torch.optim.AdamW(m.parameters(), lr=0.1)
    refuses(one_group, m, path, CheckpointMismatchError, "file has 2 param groups, the optim")
    other = ModelState.new(m).param_groups({"3.**": {"lr": 0.0}})
    refuses(torch.optim.AdamW(other, lr=0.1), m, path, CheckpointMismatchError, "param group 0")


def test_a_parameter_of_another_shape_is_a_mismatch(tmp_path: Path) -> None:
    """A rebuilt model of another width is refused before anything changes."""
    _, path = saved(tmp_path)
    wide = nn.Sequential(nn.Linear(3, 9), nn.LayerNorm(9), nn.ReLU(), nn.Linear(9, 2))
    opt = torch.optim.AdamW(groups(wide), lr=0.1)
    refuses(
        opt,
        wide,
        path,
        CheckpointMismatchError,
        r"`0.bias` was float32 \(8,\) when saved, the model has float32 \(9,\)",
    )


def test_a_model_checkpoint_is_not_an_optimizer_checkpoint(tmp_path: Path) -> None:
    """`tms.save`'s file has no optimizer entry: said so, with the right function to use."""
    m = model()
    tms.save(m, tmp_path / "model.safetensors")
    opt = torch.optim.AdamW(groups(m), lr=0.1)
    refuses(opt, m, tmp_path / "model.safetensors", CheckpointMismatchError, "tms.load")


def test_damaged_files_are_corrupt_and_missing_files_not_found(tmp_path: Path) -> None:
    """Truncated bytes or a broken metadata entry: CheckpointCorruptError; no file: FileNotFound."""
    m, path = saved(tmp_path)
    opt = torch.optim.AdamW(groups(m), lr=0.1)
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 7])
    refuses(opt, m, tmp_path / "cut.safetensors", CheckpointCorruptError, "cut.safetensors")
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    header["__metadata__"]["torch_modelstate.optimizer"] = '{"version": 1, "groups": 3}'
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    bad = len(raw).to_bytes(8, "little") + raw + data[8 + header_len :]
    (tmp_path / "bad.safetensors").write_bytes(bad)
    refuses(opt, m, tmp_path / "bad.safetensors", CheckpointCorruptError, "malformed")
    with pytest.raises(FileNotFoundError):
        tms.load_optimizer(opt, m, tmp_path / "nothing.safetensors")


def test_an_optimizer_over_tensors_outside_the_model_is_refused(tmp_path: Path) -> None:
    """Saving needs every optimized tensor to have a key in the model."""
    m = model()
    stray = nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([*m.parameters(), stray], lr=0.1)
    with pytest.raises(ValueError, match="not a parameter of the model"):
        tms.save_optimizer(opt, m, tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()
    with pytest.raises(TypeError, match=r"torch\.optim\.Optimizer"):
        tms.save_optimizer(m, m, tmp_path / "o.safetensors")  # type: ignore[arg-type]


def test_a_failed_save_leaves_the_previous_file(tmp_path: Path) -> None:
    """State that cannot be stored (a list) is refused; the old file stays as it was."""
    m, path = saved(tmp_path)
    before = path.read_bytes()
    opt = torch.optim.AdamW(groups(m), lr=0.1)
    train(m, opt, range(1))
    opt.state[m[0].weight]["history"] = [torch.ones(1)]
    with pytest.raises(TypeError, match=r"state `history` of `0\.weight` is a list"):
        tms.save_optimizer(opt, m, path)
    assert path.read_bytes() == before
