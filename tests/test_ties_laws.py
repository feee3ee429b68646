"""Laws that random sequences of tie, untie, freeze, update and training steps keep."""

from __future__ import annotations

from typing import Any

import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from torch_modelstate import ModelState

# --------------------------------------------------------------------------- the model family


class Family(nn.Module):
    """Square weights (identity or transpose ties), a transposable pair, vectors, a BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.sq0 = nn.Linear(4, 4)
        self.sq1 = nn.Linear(4, 4)
        self.sq2 = nn.Linear(4, 4, bias=False)
        self.up = nn.Linear(4, 6)
        self.down = nn.Linear(6, 4)
        self.norm = nn.BatchNorm1d(4)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.down(self.up(self.sq2(self.sq1(self.sq0(x))))))


SHAPES = {key: (tuple(v.shape), v.dtype) for key, v in Family().state_dict().items()}
KEYS = list(SHAPES)
SQUARE = ["sq0.weight", "sq1.weight", "sq2.weight"]
VECTORS = ["sq0.bias", "sq1.bias", "down.bias", "norm.weight", "norm.bias"]
PAIR = ["up.weight", "down.weight"]
UNKNOWN = "sq3.weight"
REFUSALS = (KeyError, ValueError, TypeError)

# --------------------------------------------------------------------------- operations


def pair_from(group: list[str]) -> st.SearchStrategy[tuple[str, str]]:
    return st.tuples(st.sampled_from(group), st.sampled_from(group))


ties = st.one_of(
    st.tuples(st.just("tie"), *[st.sampled_from(SQUARE)] * 2, st.sampled_from([None, "transpose"])),
    st.tuples(st.just("tie"), *[st.sampled_from(VECTORS)] * 2, st.none()),
    st.tuples(st.just("tie"), *[st.sampled_from(PAIR)] * 2, st.just("transpose")),
    st.tuples(
        st.just("tie"),
        st.sampled_from([*KEYS, UNKNOWN]),
        st.sampled_from([*KEYS, UNKNOWN]),
        st.sampled_from([None, "transpose"]),
    ),
)
unties = st.tuples(st.just("untie"), st.sampled_from([*SQUARE, *VECTORS, *PAIR, UNKNOWN]))
freezes = st.tuples(
    st.sampled_from(["freeze", "unfreeze"]), st.lists(st.sampled_from(KEYS), unique=True)
)
updates = st.tuples(
    st.just("update"),
    st.dictionaries(st.sampled_from(KEYS), st.integers(0, 2), min_size=1, max_size=4),
)
reloads = st.tuples(st.just("reload"))
steps = st.tuples(st.just("step"), st.integers(0, 2**16))

MODULE_OPS = st.lists(st.one_of(ties, unties, freezes, updates, reloads, steps), max_size=10)
DICT_OPS = st.lists(st.one_of(ties, unties, freezes, updates, reloads), max_size=10)


def value_for(key: str, seed: int) -> Tensor:
    """A deterministic value for `key`: equal seeds give equal values."""
    shape, dtype = SHAPES[key]
    generator = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=generator, dtype=dtype)
    return torch.randint(0, 10, shape, generator=generator, dtype=dtype)


# --------------------------------------------------------------------------- observing


def snapshot(ms: ModelState) -> dict[str, Any]:
    values = ms.to_dict()
    return {
        "values": {k: v.detach().clone() for k, v in values.items()},
        "objects": [id(v) for v in {**ms.parameters(), **ms.state()}.values()],
        "ties": ms.ties(),
        "transforms": ms.transforms(),
        "frozen": (list(ms.frozen_parameters()), list(ms.frozen_state())),
    }


def assert_unchanged(before: dict[str, Any], ms: ModelState) -> None:
    after = snapshot(ms)
    assert before["ties"] == after["ties"]
    assert before["transforms"] == after["transforms"]
    assert before["frozen"] == after["frozen"]
    assert before["objects"] == after["objects"]
    assert before["values"].keys() == after["values"].keys()
    for key, value in before["values"].items():
        assert torch.equal(value, after["values"][key]), key


def root_of(ms: ModelState, key: str) -> str:
    """The key whose tensor `key` is: its source for an identity destination, else itself."""
    if key in ms.ties() and key not in ms.transforms():
        return ms.ties()[key]
    return key


def assert_laws(ms: ModelState, keys: list[str]) -> None:
    """The laws every reachable state keeps; `keys` are the state_dict keys to expect."""
    params, state = ms.parameters(), ms.state()
    tied = ms.ties()
    # Each tensor at most once in the accessors, and never under a destination key.
    leaves = [*params.values(), *state.values()]
    assert len({id(t) for t in leaves}) == len(leaves)
    assert not set(tied) & (set(params) | set(state))
    # Partition laws, keys and objects.
    for whole, trainable, frozen in (
        (params, ms.trainable_parameters(), ms.frozen_parameters()),
        (state, ms.trainable_state(), ms.frozen_state()),
    ):
        assert not set(trainable) & set(frozen)
        assert set(trainable) | set(frozen) == set(whole)
        assert all(whole[k] is v for k, v in {**trainable, **frozen}.items())
    # to_dict has every key, in order, each a leaf or a destination.
    values = ms.to_dict()
    assert list(values) == keys
    assert set(values) == set(params) | set(state) | set(tied)
    # Every destination holds its (transformed) source's value; sources are leaves.
    transforms = ms.transforms()
    for dest, source in tied.items():
        assert source in params or source in state
        if dest in transforms:
            assert transforms[dest] == "transpose"
            assert torch.equal(values[dest], values[source].t())
        else:
            assert values[dest] is values[source]


# --------------------------------------------------------------------------- applying


def apply(ms: ModelState, model: Family | None, op: tuple[Any, ...]) -> None:
    """Apply one operation, checking what it promises; a refused one changes nothing."""
    kind = op[0]
    event(f"{kind} with {len(ms.ties())} ties")
    before = snapshot(ms)
    if kind == "tie":
        _, dest, source, transform = op
        try:
            ms.tie(dest, source, transform)
        except REFUSALS as error:
            event(f"tie refused: {type(error).__name__}")
            assert_unchanged(before, ms)
            return
        # A source that is an identity destination resolves to its root source.
        root = before["ties"].get(source, source)
        assert ms.ties()[dest] == root
        assert ms.transforms().get(dest) == transform
    elif kind == "untie":
        try:
            ms.untie(op[1])
        except REFUSALS:
            assert op[1] not in before["ties"]
            assert_unchanged(before, ms)
            return
        assert op[1] not in ms.ties()
        assert torch.equal(ms.to_dict()[op[1]], before["values"][op[1]])
    elif kind in ("freeze", "unfreeze"):
        getattr(ms, kind)(op[1])
        frozen = {*ms.frozen_parameters(), *ms.frozen_state()}
        leaves = {*ms.parameters(), *ms.state()}
        chosen = set(op[1]) & leaves
        assert chosen <= frozen if kind == "freeze" else not chosen & frozen
    elif kind == "update":
        given_values = {key: value_for(key, seed) for key, seed in op[1].items()}
        expect_refusal = any(key in before["transforms"] for key in given_values)
        by_root: dict[str, int] = {}
        for key, seed in op[1].items():
            expect_refusal |= by_root.setdefault(root_of(ms, key), seed) != seed
        try:
            ms.update(given_values)
        except ValueError:
            event("update refused")
            assert expect_refusal
            assert_unchanged(before, ms)
            return
        assert not expect_refusal
        values = ms.to_dict()
        for key, value in given_values.items():
            assert torch.equal(values[key], value), key
    elif kind == "reload":
        # Every key but transform destinations, tied keys with equal values: accepted.
        transforms = ms.transforms()
        ms.update({k: v.detach().clone() for k, v in ms.to_dict().items() if k not in transforms})
        assert_unchanged(before, ms)
    elif kind == "step":
        assert model is not None
        torch.manual_seed(op[1])
        trainable = list(ms.trainable_parameters().values())
        if not trainable:
            return
        optimizer = torch.optim.SGD(trainable, lr=0.01)
        model(torch.randn(8, 4)).pow(2).mean().backward()
        optimizer.step()
        for param in model.parameters():
            param.grad = None


# --------------------------------------------------------------------------- the laws

# Op sequences need more examples than single-call laws; a larger profile (`thorough`) wins.
EXAMPLES = max(40, settings.default.max_examples)


@settings(max_examples=EXAMPLES, deadline=None)
@given(MODULE_OPS)
def test_module_state_keeps_the_laws(ops: list[tuple[Any, ...]]) -> None:
    """Random tie/untie/freeze/update/train sequences on a module keep the tie laws."""
    torch.manual_seed(0)
    model = Family()
    ms = ModelState.new(model)
    keys = list(model.state_dict())
    for op in ops:
        apply(ms, model, op)
        # to_dict() keys are state_dict() keys, in its order, and the same set as at the start.
        assert_laws(ms, list(model.state_dict()))
        assert set(model.state_dict()) == set(keys)


@settings(max_examples=EXAMPLES, deadline=None)
@given(DICT_OPS)
def test_standalone_state_keeps_the_laws(ops: list[tuple[Any, ...]]) -> None:
    """Random tie/untie/freeze/update sequences on a dict-backed state keep the tie laws."""
    torch.manual_seed(0)
    ms = ModelState.new({key: value.clone() for key, value in Family().state_dict().items()})
    for op in ops:
        apply(ms, None, op)
        assert_laws(ms, KEYS)
