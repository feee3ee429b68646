"""Freezing: the freeze/unfreeze algebra, partition laws, and frozen state through forwards."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from torch_modelstate import ModelState


def frozen(ms: ModelState) -> set[str]:
    return set(ms.frozen_parameters()) | set(ms.frozen_state())


def leaves(ms: ModelState) -> set[str]:
    return set(ms.parameters()) | set(ms.state())


# --------------------------------------------------------------------------- algebra


def test_freeze_none_freezes_everything(mlp):
    """`freeze()` freezes every parameter and every piece of state."""
    ms = ModelState.new(mlp).freeze()
    assert ms.trainable_parameters() == {}
    assert ms.trainable_state() == {}
    assert frozen(ms) == set(mlp.state_dict())


def test_unfreeze_none_unfreezes_everything(mlp):
    """`unfreeze()` after `freeze()` leaves nothing frozen."""
    ms = ModelState.new(mlp).freeze().unfreeze()
    assert frozen(ms) == set()
    assert all(p.requires_grad for p in mlp.parameters())


def test_freeze_and_unfreeze_return_the_same_state(mlp):
    """Both return the ModelState itself, so calls chain."""
    ms = ModelState.new(mlp)
    assert ms.freeze("0.*") is ms
    assert ms.unfreeze("0.*") is ms


def test_freeze_accumulates(mlp):
    """A second `freeze` adds to what is frozen (unlike Axon, which replaces)."""
    ms = ModelState.new(mlp).freeze("0.**").freeze("3.weight")
    assert frozen(ms) == {"0.weight", "0.bias", "3.weight"}


def test_unfreeze_removes_only_what_it_selects(mlp):
    """`unfreeze(m)` after `freeze()` leaves everything but `m` frozen."""
    ms = ModelState.new(mlp).freeze().unfreeze("1.**")
    assert frozen(ms) == {"0.weight", "0.bias", "3.weight", "3.bias"}


def test_freeze_a_then_unfreeze_b_is_a_minus_b(mlp):
    """`freeze(a).unfreeze(b)` leaves `a - b` frozen."""
    ms = ModelState.new(mlp).freeze(["0.**", "1.**"]).unfreeze("**.bias")
    assert frozen(ms) == {
        "0.weight",
        "1.weight",
        "1.running_mean",
        "1.running_var",
        "1.num_batches_tracked",
    }


def test_freeze_is_idempotent(mlp):
    """Freezing the same leaves twice is the same as once."""
    ms = ModelState.new(mlp).freeze("1.**")
    once = frozen(ms)
    assert frozen(ms.freeze("1.**")) == once


def test_unfreezing_what_is_not_frozen_changes_nothing(mlp):
    """`unfreeze` of trainable leaves is a no-op."""
    ms = ModelState.new(mlp).freeze("0.**").unfreeze("3.**")
    assert frozen(ms) == {"0.weight", "0.bias"}


def test_freeze_sets_requires_grad(mlp):
    """A frozen parameter has `requires_grad=False`; unfreezing sets it back."""
    ms = ModelState.new(mlp).freeze("0.weight")
    assert not mlp[0].weight.requires_grad
    assert mlp[0].bias.requires_grad
    ms.unfreeze("0.weight")
    assert mlp[0].weight.requires_grad


def test_requires_grad_set_by_other_code_is_the_truth(mlp):
    """A parameter frozen outside the library shows in `frozen_parameters()`."""
    ms = ModelState.new(mlp)
    assert ms.frozen_parameters() == {}
    mlp[3].bias.requires_grad_(False)
    assert list(ms.frozen_parameters()) == ["3.bias"]
    mlp[3].bias.requires_grad_(True)
    assert ms.frozen_parameters() == {}


def test_two_views_of_one_module_agree(mlp):
    """Frozen parameters and frozen state live on the module, so every view agrees."""
    ModelState.new(mlp).freeze(["0.weight", "1.running_mean"])
    other = ModelState.new(mlp)
    assert frozen(other) == {"0.weight", "1.running_mean"}


def test_dict_state_keeps_its_own_frozen_set():
    """A state built from a dict tracks freezing itself and leaves `requires_grad` alone."""
    w = torch.ones(2, requires_grad=True)
    b = torch.zeros(2)
    ms = ModelState.new({"w": w, "b": b}).freeze("w")
    assert list(ms.frozen_parameters()) == ["w"]
    assert w.requires_grad
    assert not b.requires_grad
    ms.unfreeze().freeze("b")
    assert list(ms.frozen_parameters()) == ["b"]
    assert w.requires_grad
    assert not b.requires_grad


def test_dict_state_ignores_requires_grad():
    """From a dict every tensor is a trainable parameter, whatever its `requires_grad`."""
    ms = ModelState.new({"a": torch.ones(1), "b": torch.ones(1, requires_grad=True)})
    assert list(ms.trainable_parameters()) == ["a", "b"]
    assert ms.state() == {}


# --------------------------------------------------------------------------- partitions


def test_parameters_partition_into_trainable_and_frozen(nested):
    """trainable | frozen = parameters, and the two are disjoint."""
    ms = ModelState.new(nested).freeze(["encoder.0.**", "**.bias"])
    trainable, frozen_ = set(ms.trainable_parameters()), set(ms.frozen_parameters())
    assert trainable | frozen_ == set(ms.parameters())
    assert not trainable & frozen_
    assert trainable and frozen_


def test_state_partitions_into_trainable_and_frozen(nested):
    """trainable | frozen = state, and the two are disjoint."""
    ms = ModelState.new(nested).freeze(["encoder.0.**", "stat.count"])
    trainable, frozen_ = set(ms.trainable_state()), set(ms.frozen_state())
    assert trainable | frozen_ == set(ms.state())
    assert not trainable & frozen_
    assert trainable and frozen_


def test_parameters_and_state_partition_to_dict(nested):
    """Parameters and state are disjoint and together are every key of `to_dict()`."""
    ms = ModelState.new(nested)
    params, state = ms.parameters(), ms.state()
    assert not set(params) & set(state)
    assert set(params) | set(state) == set(ms.to_dict())


def test_to_dict_keys_are_the_state_dict_keys(nested):
    """`to_dict()` has exactly the keys of `state_dict()`, in the same order."""
    assert list(ModelState.new(nested).to_dict()) == list(nested.state_dict())


def test_state_is_the_persistent_buffers(nested):
    """`state()` lists persistent buffers only; a non-persistent buffer is left out."""
    ms = ModelState.new(nested)
    assert "stat.scratch" not in ms.to_dict()
    assert list(ms.state()) == [k for k, _ in nested.named_buffers() if k != "stat.scratch"]


def test_accessors_are_in_module_order(nested):
    """Every accessor lists its keys in `state_dict()` order."""
    ms = ModelState.new(nested).freeze(["encoder.1.**", "heads.cls.weight", "stat.mean"])
    order = list(nested.state_dict())
    for accessor in (
        ms.parameters,
        ms.state,
        ms.trainable_parameters,
        ms.frozen_parameters,
        ms.trainable_state,
        ms.frozen_state,
    ):
        keys = list(accessor())
        assert keys == sorted(keys, key=order.index), accessor.__name__


def test_accessors_return_the_live_tensors(nested):
    """The values are the module's own tensors, not copies."""
    ms = ModelState.new(nested)
    live = nested.state_dict(keep_vars=True)
    assert all(t is live[k] for k, t in ms.to_dict().items())
    assert all(t is live[k] for k, t in ms.trainable_parameters().items())


def test_optimizer_over_trainable_parameters_steps_only_those(mlp):
    """`AdamW(ms.trainable_parameters().values())` leaves frozen parameters alone."""
    ms = ModelState.new(mlp).freeze("0.**")
    before = mlp[0].weight.detach().clone()
    opt = torch.optim.AdamW(ms.trainable_parameters().values(), lr=0.1)
    mlp(torch.randn(5, 3)).sum().backward()
    opt.step()
    assert torch.equal(mlp[0].weight, before)
    assert mlp[0].weight.grad is None


# --------------------------------------------------------------------------- frozen BatchNorm


def test_frozen_batchnorm_keeps_running_statistics():
    """Training-mode forwards leave a frozen BN's running stats and counter unchanged."""
    bn = nn.BatchNorm1d(4)
    ModelState.new(bn).freeze()
    bn.train()
    for _ in range(3):
        bn(torch.randn(8, 4))
    assert torch.equal(bn.running_mean, torch.zeros(4))
    assert torch.equal(bn.running_var, torch.ones(4))
    assert bn.num_batches_tracked.item() == 0


def test_frozen_batchnorm_keeps_buffer_objects():
    """The running-stat tensors are the same objects at the same addresses after a forward."""
    bn = nn.BatchNorm1d(4)
    mean, ptr = bn.running_mean, bn.running_mean.data_ptr()
    ModelState.new(bn).freeze()
    bn(torch.randn(8, 4))
    assert bn.running_mean is mean
    assert bn.running_mean.data_ptr() == ptr


def test_frozen_batchnorm_normalises_with_batch_statistics():
    """In training, a frozen BN's output equals an unfrozen BN's output on the same batch."""
    torch.manual_seed(0)
    frozen_bn = nn.BatchNorm1d(4)
    nn.init.normal_(frozen_bn.weight)
    reference = copy.deepcopy(frozen_bn)
    ModelState.new(frozen_bn).freeze()
    x = torch.randn(16, 4) * 3 + 2
    out = frozen_bn(x)
    assert torch.equal(out, reference(x))
    assert not torch.allclose(out, reference.eval()(x))


def test_frozen_batchnorm_gradients_match_an_unfrozen_one():
    """Gradients through a frozen BN in training are those of an unfrozen BN."""
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(3)
    reference = copy.deepcopy(bn)
    ModelState.new(bn).freeze("running_*")
    x1 = torch.randn(6, 3, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    (bn(x1) ** 3).sum().backward()
    (reference(x2) ** 3).sum().backward()
    assert torch.allclose(x1.grad, x2.grad)
    assert torch.allclose(bn.weight.grad, reference.weight.grad)


def test_parent_train_does_not_undo_freezing(mlp):
    """`model.eval()` then `model.train()` on the parent keeps the BN's statistics frozen."""
    ModelState.new(mlp).freeze("1.**")
    mlp.eval()
    mlp.train()
    mlp(torch.randn(8, 3))
    assert torch.equal(mlp[1].running_mean, torch.zeros(4))
    assert mlp[1].num_batches_tracked.item() == 0
    assert mlp[1].training


def test_unfreeze_resumes_batchnorm_updates():
    """After `unfreeze`, training-mode forwards update the running statistics again."""
    bn = nn.BatchNorm1d(4)
    ms = ModelState.new(bn).freeze()
    bn(torch.randn(8, 4))
    ms.unfreeze()
    bn(torch.randn(8, 4))
    assert bn.num_batches_tracked.item() == 1
    assert not torch.equal(bn.running_mean, torch.zeros(4))


def test_freezing_one_statistic_leaves_the_others_updating():
    """Freezing `running_mean` alone keeps it; `running_var` and the counter still update."""
    bn = nn.BatchNorm1d(4)
    ModelState.new(bn).freeze("running_mean")
    bn(torch.randn(8, 4))
    assert torch.equal(bn.running_mean, torch.zeros(4))
    assert not torch.equal(bn.running_var, torch.ones(4))
    assert bn.num_batches_tracked.item() == 1


def test_frozen_state_leaves_parameters_trainable():
    """Freezing a BN's state does not freeze its affine parameters."""
    bn = nn.BatchNorm1d(4)
    ms = ModelState.new(bn).freeze(lambda p: p[-1] not in ("weight", "bias"))
    assert list(ms.trainable_parameters()) == ["weight", "bias"]
    assert bn.weight.requires_grad


def test_frozen_batchnorm_in_a_deepcopy_stays_frozen(mlp):
    """`copy.deepcopy` of a model keeps its frozen state frozen."""
    ModelState.new(mlp).freeze("1.**")
    twin = copy.deepcopy(mlp)
    twin(torch.randn(8, 3))
    assert twin[1].num_batches_tracked.item() == 0
    assert torch.equal(twin[1].running_mean, torch.zeros(4))
    assert set(ModelState.new(twin).frozen_state()) == {
        "1.running_mean",
        "1.running_var",
        "1.num_batches_tracked",
    }


def test_deepcopy_does_not_share_the_frozen_set(mlp):
    """Unfreezing the copy leaves the original frozen."""
    ModelState.new(mlp).freeze("1.**")
    twin = copy.deepcopy(mlp)
    ModelState.new(twin).unfreeze()
    mlp(torch.randn(8, 3))
    twin(torch.randn(8, 3))
    assert mlp[1].num_batches_tracked.item() == 0
    assert twin[1].num_batches_tracked.item() == 1


# --------------------------------------------------------------------------- custom buffers


def test_frozen_custom_buffers_keep_their_values(stat):
    """Buffers a custom forward updates in place keep their values when frozen."""
    ModelState.new(stat).freeze(["count", "mean"])
    for _ in range(2):
        stat(torch.randn(4, 3))
    assert stat.count.item() == 0
    assert torch.equal(stat.mean, torch.zeros(3))


def test_unfrozen_custom_buffers_update(stat):
    """The same forward updates the buffers when they are not frozen (the control)."""
    ms = ModelState.new(stat).freeze().unfreeze()
    stat(torch.randn(4, 3))
    assert stat.count.item() == 1
    assert list(ms.trainable_state()) == ["count", "mean"]


def test_frozen_custom_buffer_reassigned_in_forward():
    """A buffer that forward *replaces* (``self.b = self.b + 1``) keeps its value and object."""

    class Reassign(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("total", torch.zeros(2))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.total = self.total + x.sum()
            return x

    module = Reassign()
    original = module.total
    ModelState.new(module).freeze()
    module(torch.ones(3))
    assert module.total is original
    assert torch.equal(module.total, torch.zeros(2))


def test_frozen_buffer_is_seen_updated_inside_one_forward():
    """Within a forward, the module sees its own in-place updates; they are dropped after."""

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("n", torch.zeros(()))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.n += 1
            self.n += 1
            return x * self.n

    module = Twice()
    ModelState.new(module).freeze()
    assert torch.equal(module(torch.ones(1)), torch.tensor([2.0]))
    assert module.n.item() == 0


def test_frozen_buffer_of_a_child_called_twice(stat):
    """A frozen child called twice in one parent forward still keeps its buffers."""

    class Parent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stat = stat

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.stat(self.stat(x))

    parent = Parent()
    ModelState.new(parent).freeze("stat.count")
    parent(torch.randn(2, 3))
    assert stat.count.item() == 0
    assert not torch.equal(stat.mean, torch.zeros(3))


def test_frozen_buffer_survives_an_exception_in_forward():
    """If forward raises after an in-place update, the frozen buffer keeps value and object."""

    class Boom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("n", torch.zeros(()))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.n += 1
            raise RuntimeError("boom")

    module = Boom()
    original = module.n
    ModelState.new(module).freeze()
    for _ in range(2):
        with pytest.raises(RuntimeError, match="boom"):
            module(torch.ones(1))
    assert module.n is original
    assert module.n.item() == 0
    assert ModelState.new(module).to_dict()["n"] is original


def test_non_persistent_buffers_are_not_state(stat):
    """A non-persistent buffer is no leaf: `freeze()` leaves it updating."""
    ModelState.new(stat).freeze()
    x = torch.randn(4, 3)
    stat(x)
    assert torch.allclose(stat.scratch, x.mean(0))


@pytest.mark.xfail(
    reason=(
        "LIMITATION (documented in the README): a frozen buffer is protected while its "
        "owning module's forward runs; a parent that writes a child's buffer is not covered"
    ),
    strict=True,
)
def test_frozen_buffer_updated_by_a_parent_forward():
    """A frozen buffer that a parent's forward updates in place keeps its value."""

    class Parent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stats = nn.Module()
            self.stats.register_buffer("count", torch.zeros(()))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.stats.count += 1
            return x

    parent = Parent()
    ModelState.new(parent).freeze("stats.count")
    parent(torch.ones(1))
    assert parent.stats.count.item() == 0


def test_frozen_state_survives_a_dtype_change():
    """Freezing is kept by name, so `.double()` (which replaces buffers) keeps it."""
    bn = nn.BatchNorm1d(3)
    ModelState.new(bn).freeze()
    bn.double()
    bn(torch.randn(4, 3, dtype=torch.float64))
    assert bn.num_batches_tracked.item() == 0
    assert torch.equal(bn.running_mean, torch.zeros(3, dtype=torch.float64))


def test_frozen_spectral_norm_vectors_keep_their_values():
    """`nn.utils.spectral_norm` updates `weight_u` in a pre-hook; frozen, it stays put."""
    torch.manual_seed(0)
    module = nn.utils.spectral_norm(nn.Linear(3, 3))
    ms = ModelState.new(module).freeze()
    assert list(ms.frozen_state()) == ["weight_u", "weight_v"]
    before = module.weight_u.clone()
    module(torch.randn(2, 3))
    assert torch.equal(module.weight_u, before)
