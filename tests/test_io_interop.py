"""Checkpoints across tools: safetensors.torch and transformers read ours, we read theirs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from models import tiny_gpt2
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import Tensor, nn

import torch_modelstate as tms
from torch_modelstate import ModelState


def tied(seed: int = 0, tie: bool = True) -> nn.ModuleDict:
    """An embedding and an output head sharing one Parameter, plus BatchNorm state."""
    torch.manual_seed(seed)
    model = nn.ModuleDict(
        {"emb": nn.Embedding(6, 4), "head": nn.Linear(4, 6), "bn": nn.BatchNorm1d(4)}
    )
    with torch.no_grad():
        model["bn"].running_var.uniform_()
    if tie:
        model["head"].weight = model["emb"].weight
    return model


def transposed(seed: int = 0) -> nn.ModuleDict:
    """An encoder and decoder whose weights are tied through a transpose."""
    torch.manual_seed(seed)
    model = nn.ModuleDict({"enc": nn.Linear(4, 2), "dec": nn.Linear(2, 4)})
    ModelState.new(model).tie("dec.weight", "enc.weight", "transpose")
    return model


def same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


# --------------------------------------------------------------------------- safetensors.torch


def test_load_file_reads_our_checkpoint(tmp_path: Path) -> None:
    """safetensors.torch.load_file returns the stored tensors, tie sources included."""
    model = tied()
    tms.save(model, tmp_path / "m.safetensors")
    tensors = load_file(tmp_path / "m.safetensors")
    expected = {k: v for k, v in model.state_dict().items() if k != "head.weight"}
    assert set(tensors) == set(expected)
    assert all(torch.equal(tensors[k], v) for k, v in expected.items())


def test_load_model_reads_our_checkpoint_into_a_tied_model(tmp_path: Path) -> None:
    """safetensors.torch.load_model loads our file strictly; the tie's key needs no data."""
    tms.save(tied(), tmp_path / "m.safetensors")
    target = tied(seed=1)
    missing, unexpected = load_model(target, tmp_path / "m.safetensors")
    assert not missing and not unexpected
    assert same_state(target, tied())


def test_our_loader_reads_save_model_and_its_aliases(tmp_path: Path) -> None:
    """save_model drops the alias and records it; we load it as a tie, standalone or in place."""
    save_model(tied(), str(tmp_path / "m.safetensors"))
    with safe_open(tmp_path / "m.safetensors", framework="pt") as f:
        assert f.metadata()["head.weight"] == "emb.weight"
    loaded = tms.load(tmp_path / "m.safetensors")
    assert loaded.ties() == {"head.weight": "emb.weight"}
    target = tied(seed=1)
    tms.load(tmp_path / "m.safetensors", into=target)
    assert target["head"].weight is target["emb"].weight and same_state(target, tied())


def test_save_model_alias_ties_an_untied_target(tmp_path: Path) -> None:
    """The recorded alias is a tie like ours: an untied target gets it."""
    save_model(tied(), str(tmp_path / "m.safetensors"))
    target = tied(seed=1, tie=False)
    tms.load(tmp_path / "m.safetensors", into=target)
    assert target["head"].weight is target["emb"].weight


def test_state_dict_file_loads_into_a_transform_tied_model(tmp_path: Path) -> None:
    """A file holding the computed destination too: the target computes it, the key is skipped."""
    source = transposed()
    save_file(
        {k: v.contiguous() for k, v in source.state_dict().items()}, tmp_path / "sd.safetensors"
    )
    target = transposed(seed=1)
    report = tms.io.check(tmp_path / "sd.safetensors", target)
    assert report.computed == ("dec.weight",) and not report.missing
    tms.load(tmp_path / "sd.safetensors", into=target)
    assert same_state(target, source)


def test_plain_state_dict_file_loads_standalone_as_parameters(tmp_path: Path) -> None:
    """A file without our metadata loads, keys sorted, with every tensor a trainable parameter."""
    save_file(
        {"a.w": torch.ones(2), "b": torch.zeros(1, dtype=torch.int64)}, tmp_path / "p.safetensors"
    )
    loaded = tms.load(tmp_path / "p.safetensors")
    assert list(loaded.trainable_parameters()) == ["a.w", "b"] and loaded.state() == {}


# --------------------------------------------------------------------------- transformers


gpt2 = tiny_gpt2


def quiet_transformers() -> None:
    transformers = pytest.importorskip("transformers")
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def test_save_pretrained_loads_into_a_tied_gpt2(tmp_path: Path) -> None:
    """transformers stores the tied head once with no alias; the target's tie covers it."""
    quiet_transformers()
    source = gpt2()
    source.save_pretrained(tmp_path)  # type: ignore[operator]
    target = gpt2(seed=1)
    wte = target.transformer.wte.weight  # type: ignore[union-attr]
    ms = tms.load(tmp_path, into=target)
    assert ms.ties() == {"lm_head.weight": "transformer.wte.weight"}
    assert target.lm_head.weight is wte  # type: ignore[union-attr]
    assert same_state(target, source)


def test_sharded_save_pretrained_loads_into_gpt2(tmp_path: Path) -> None:
    """transformers' sharded layout (index and shards) streams into a tied model."""
    quiet_transformers()
    source = gpt2()
    source.save_pretrained(tmp_path, max_shard_size="40KB")  # type: ignore[operator]
    assert (tmp_path / "model.safetensors.index.json").is_file()
    target = gpt2(seed=1)
    tms.load(tmp_path, into=target)
    assert same_state(target, source)


def test_from_pretrained_reads_our_checkpoint(tmp_path: Path) -> None:
    """Our file plus a config is a model directory transformers loads, tie included."""
    quiet_transformers()
    transformers = pytest.importorskip("transformers")
    source = gpt2()
    source.config.save_pretrained(tmp_path)  # type: ignore[union-attr, operator]
    tms.save(source, tmp_path / "model.safetensors")
    loaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    assert same_state(loaded, source)


def test_from_pretrained_reads_our_sharded_checkpoint(tmp_path: Path) -> None:
    """Our sharded layout is the one transformers reads."""
    quiet_transformers()
    transformers = pytest.importorskip("transformers")
    source = gpt2()
    source.config.save_pretrained(tmp_path)  # type: ignore[union-attr, operator]
    tms.save(source, tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    loaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path)
    assert same_state(loaded, source)


def test_gpt2_round_trip_keeps_frozen_flags(tmp_path: Path) -> None:
    """A partly frozen GPT-2 comes back with the same frozen parameters."""
    source = gpt2()
    ModelState.new(source).freeze("transformer.h.0.**")
    tms.save(source, tmp_path / "m.safetensors")
    target = gpt2(seed=1)
    ms = tms.load(tmp_path / "m.safetensors", into=target, frozen="file")
    assert list(ms.frozen_parameters()) == list(ModelState.new(source).frozen_parameters())


# --------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
def test_load_streams_into_a_cuda_model(tmp_path: Path) -> None:
    """Tensors arrive on the GPU in the model's dtype; identity, ties and values kept."""
    source = tied()
    tms.save(source, tmp_path / "m.safetensors")
    target = tied(seed=1).cuda().half()
    weight = target["emb"].weight
    tms.load(tmp_path / "m.safetensors", into=target)
    assert target["emb"].weight is weight and weight.device.type == "cuda"
    assert target["head"].weight is weight
    expected: dict[str, Tensor] = source.state_dict()
    for key, value in target.state_dict().items():
        assert torch.equal(value.cpu(), expected[key].to(value.dtype)), key


@pytest.mark.cuda
def test_save_from_a_cuda_model(tmp_path: Path) -> None:
    """A model on the GPU saves without gathering it on the host first, and loads back."""
    source = transposed().cuda()
    tms.save(source, tmp_path / "m.safetensors")
    loaded = tms.load(tmp_path / "m.safetensors").to_dict()
    for key, value in source.state_dict().items():
        assert torch.equal(loaded[key], value.cpu()), key


def test_metadata_that_only_looks_like_an_alias_is_ignored(tmp_path: Path) -> None:
    """A free-form metadata value naming a tensor is no key the target must have."""
    model = nn.Linear(2, 2)
    save_file(dict(model.state_dict()), tmp_path / "m.safetensors", metadata={"base": "weight"})
    target = nn.Linear(2, 2)
    tms.load(tmp_path / "m.safetensors", into=target)
    assert same_state(target, model)
