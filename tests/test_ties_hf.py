"""Weight tying on a real client: Hugging Face GPT-2 with tied embeddings, from a tiny config."""

from __future__ import annotations

import copy

import pytest
import torch
from models import tiny_gpt2

from torch_modelstate import ModelState, merges

transformers = pytest.importorskip("transformers")

WTE = "transformer.wte.weight"
HEAD = "lm_head.weight"


gpt2 = tiny_gpt2


def tokens(seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 100, (2, 16), generator=generator)


def lm_loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    loss: torch.Tensor = model(input_ids=ids, labels=ids).loss
    return loss


def test_gpt2_discovers_tied_embeddings() -> None:
    """`ties()` reports GPT-2's output projection as tied to the token embedding."""
    model = gpt2()
    ms = ModelState.new(model)
    assert ms.ties() == {HEAD: WTE}
    assert HEAD not in ms.parameters()
    assert ms.parameters()[WTE] is model.lm_head.weight
    assert list(ms.to_dict()) == list(model.state_dict())


def test_gpt2_trainable_parameters_list_the_embedding_once() -> None:
    """The optimizer's parameter list holds each tensor once, as `model.parameters()` does."""
    model = gpt2()
    params = list(ModelState.new(model).trainable_parameters().values())
    assert len({id(p) for p in params}) == len(params) == len(list(model.parameters()))


def test_gpt2_freeze_all_but_last_block() -> None:
    """Freezing everything but the last block freezes the tied head and leaves grads to h.1."""
    model = gpt2()
    ms = ModelState.new(model).freeze().unfreeze("transformer.h.1.**")
    trainable = ms.trainable_parameters()
    assert trainable
    assert all(key.startswith("transformer.h.1.") for key in trainable)
    assert model.lm_head.weight.requires_grad is False
    lm_loss(model, tokens(0)).backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    assert with_grad == set(trainable)


def test_gpt2_training_keeps_the_tie() -> None:
    """A few AdamW steps change the weights and leave the tie intact."""
    model = gpt2()
    ms = ModelState.new(model)
    embedding = model.transformer.wte.weight
    before = {k: v.detach().clone() for k, v in ms.parameters().items()}
    optimizer = torch.optim.AdamW(ms.trainable_parameters().values(), lr=1e-2)
    for step in range(3):
        optimizer.zero_grad()
        lm_loss(model, tokens(step)).backward()
        optimizer.step()
    assert model.lm_head.weight is model.transformer.wte.weight is embedding
    assert not torch.equal(embedding, before[WTE])
    assert not torch.equal(
        model.transformer.h[1].mlp.c_fc.weight, before["transformer.h.1.mlp.c_fc.weight"]
    )
    assert ms.ties() == {HEAD: WTE}


def test_gpt2_training_last_block_only_keeps_frozen_embedding() -> None:
    """Training with everything but the last block frozen leaves the tied embedding as it was."""
    model = gpt2()
    ms = ModelState.new(model).freeze().unfreeze("transformer.h.1.**")
    before = model.transformer.wte.weight.detach().clone()
    optimizer = torch.optim.AdamW(ms.trainable_parameters().values(), lr=1e-2)
    for step in range(2):
        optimizer.zero_grad()
        lm_loss(model, tokens(step)).backward()
        optimizer.step()
    assert torch.equal(model.transformer.wte.weight, before)
    assert model.lm_head.weight is model.transformer.wte.weight


def test_gpt2_merge_two_copies_with_lerp() -> None:
    """merges.lerp(0.5) of two GPT-2s is their average, the tied tensor merged once."""
    left, right = gpt2(0), gpt2(1)
    expected = {k: (v.detach() + right.state_dict()[k]) / 2 for k, v in left.state_dict().items()}
    ModelState.new(left).merge(right, merges.lerp(0.5))
    for key, value in left.state_dict().items():
        torch.testing.assert_close(value, expected[key], msg=key)
    assert left.lm_head.weight is left.transformer.wte.weight


def test_gpt2_update_from_state_dict() -> None:
    """`update(other.state_dict())` loads another GPT-2, tied keys included."""
    model, other = gpt2(0), gpt2(1)
    ms = ModelState.new(model)
    embedding = model.transformer.wte.weight
    ms.update(other.state_dict())
    for key, value in other.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    assert model.lm_head.weight is model.transformer.wte.weight is embedding


def test_gpt2_tie_survives_deepcopy_and_dtype() -> None:
    """A deep copy of GPT-2 converted to float64 keeps its own tie."""
    model = gpt2()
    clone = copy.deepcopy(model).to(torch.float64)
    assert clone.lm_head.weight is clone.transformer.wte.weight
    assert clone.lm_head.weight is not model.lm_head.weight
    assert ModelState.new(clone).ties() == {HEAD: WTE}


def test_gpt2_untie_gives_head_its_own_copy() -> None:
    """Untying GPT-2's head gives it its own weights; the model still computes a loss."""
    model = gpt2()
    ms = ModelState.new(model).untie(HEAD)
    assert model.lm_head.weight is not model.transformer.wte.weight
    assert torch.equal(model.lm_head.weight, model.transformer.wte.weight)
    assert ms.ties() == {}
    assert torch.isfinite(lm_loss(model, tokens(0)))
