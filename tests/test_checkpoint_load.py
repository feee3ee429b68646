"""Loading into a model the user set up: frozen flags kept, keys renamed, helpful mismatches."""

from __future__ import annotations

import logging
import mmap
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

import torch_modelstate as tms
from torch_modelstate import CheckpointError, CheckpointMismatchError, ModelState


def net(seed: int = 0) -> nn.Sequential:
    """A backbone (Linear, BatchNorm) and a head."""
    torch.manual_seed(seed)
    model = nn.Sequential()
    model.add_module("backbone", nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)))
    model.add_module("head", nn.Linear(4, 2))
    with torch.no_grad():
        model.backbone[1].running_mean.uniform_()
    return model


def values(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def saved(tmp_path: Path, model: nn.Module | ModelState, name: str = "m.safetensors") -> Path:
    path = tmp_path / name
    tms.save(model, path)
    return path


def requires_grad(model: nn.Module) -> dict[str, bool]:
    return {k: p.requires_grad for k, p in model.named_parameters()}


# --------------------------------------------------------------------------- frozen=


def test_load_keeps_the_targets_frozen_parameters_by_default(tmp_path: Path) -> None:
    """Build, freeze, load (the timm/Lightning order): the frozen backbone stays frozen."""
    path = saved(tmp_path, net())
    target = net(seed=1)
    ModelState.new(target).freeze("backbone.**")
    before = requires_grad(target)
    ms = tms.load(path, into=target)
    assert requires_grad(target) == before
    assert list(ms.trainable_parameters()) == ["head.weight", "head.bias"]
    assert same(values(target), values(net()))


def test_load_keeps_the_targets_frozen_buffers_by_default(tmp_path: Path) -> None:
    """A frozen buffer of the target stays frozen; one frozen in the file does not freeze it."""
    source = net()
    ModelState.new(source).freeze("backbone.1.running_var")
    path = saved(tmp_path, source)
    target = net(seed=1)
    ModelState.new(target).freeze("backbone.1.running_mean")
    ms = tms.load(path, into=target)
    assert list(ms.frozen_state()) == ["backbone.1.running_mean"]


def test_frozen_file_applies_the_files_frozen_set(tmp_path: Path) -> None:
    """frozen="file" makes exactly the file's frozen set frozen, parameters and buffers."""
    source = net()
    ModelState.new(source).freeze(["head.**", "backbone.1.running_var"])
    path = saved(tmp_path, source)
    target = net(seed=1)
    ModelState.new(target).freeze("backbone.0.**")
    ms = tms.load(path, into=target, frozen="file")
    assert list(ms.frozen_parameters()) == ["head.weight", "head.bias"]
    assert list(ms.frozen_state()) == ["backbone.1.running_var"]


def test_frozen_file_needs_a_file_that_records_a_frozen_set(tmp_path: Path) -> None:
    """A file from another tool has no frozen set: frozen="file" is an error, nothing loaded."""
    path = tmp_path / "plain.safetensors"
    save_file(values(net()), path)
    target = net(seed=1)
    before = values(target)
    with pytest.raises(CheckpointError, match=r"(?s)plain\.safetensors.*frozen set.*keep"):
        tms.load(path, into=target, frozen="file")
    assert same(values(target), before)


@pytest.mark.parametrize("bad", ["yes", "FILE", None, True])
def test_frozen_must_be_keep_or_file(tmp_path: Path, bad: object) -> None:
    """Any other value is a ValueError naming both choices; the target is untouched."""
    path = saved(tmp_path, net())
    target = net(seed=1)
    before = values(target)
    with pytest.raises(ValueError, match=r"(?s)`frozen`.*'keep'.*'file'"):
        tms.load(path, into=target, frozen=bad)  # type: ignore[arg-type]
    assert same(values(target), before)


def test_standalone_load_has_the_files_frozen_set(tmp_path: Path) -> None:
    """Without `into`, the returned state is frozen as the file says, whatever `frozen` is."""
    source = net()
    ModelState.new(source).freeze("head.**")
    path = saved(tmp_path, source)
    for frozen in ("keep", "file"):
        loaded = tms.load(path, frozen=frozen)
        assert list(loaded.frozen_parameters()) == ["head.weight", "head.bias"]


# --------------------------------------------------------------------------- rename=


def wrapped(seed: int = 0) -> nn.Module:
    """The net under a `module.` prefix, as DDP's or DataParallel's state_dict() names it."""
    outer = nn.Module()
    outer.module = net(seed)
    return outer


def plain_file(tmp_path: Path, model: nn.Module, name: str = "plain.safetensors") -> Path:
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return path


def test_rename_with_a_callable_maps_the_files_keys(tmp_path: Path) -> None:
    """A `module.`-prefixed file loads into the plain model with a callable rename."""
    path = plain_file(tmp_path, wrapped())
    target = net(seed=1)
    tms.load(path, into=target, rename=lambda k: k.removeprefix("module."))
    assert same(values(target), values(net()))


def test_rename_with_a_mapping_renames_the_keys_it_names(tmp_path: Path) -> None:
    """A mapping renames its keys; the others keep their names."""
    model = net()
    sd = values(model)
    sd["classifier.weight"] = sd.pop("head.weight")
    path = tmp_path / "m.safetensors"
    save_file(sd, path)
    target = net(seed=1)
    tms.load(path, into=target, rename={"classifier.weight": "head.weight"})
    assert same(values(target), values(model))


def test_rename_to_none_skips_the_key(tmp_path: Path) -> None:
    """A callable returning None drops that key: not loaded, not 'unexpected' under strict."""
    sd = values(net())
    sd["aux.weight"] = torch.ones(3)
    path = tmp_path / "m.safetensors"
    save_file(sd, path)
    target = net(seed=1)
    ms = tms.load(path, into=target, rename=lambda k: None if k.startswith("aux.") else k)
    assert "aux.weight" not in ms.to_dict()
    assert same(values(target), values(net()))


def test_rename_of_two_file_keys_to_one_target_key_is_an_error(tmp_path: Path) -> None:
    """Two file keys renamed to one target key: a ValueError naming both, nothing written."""
    path = saved(tmp_path, net())
    target = net(seed=1)
    before = values(target)
    with pytest.raises(ValueError, match=r"(?s)head\.weight.*head\.bias|head\.bias.*head\.weight"):
        tms.load(path, into=target, rename={"head.bias": "head.weight"})
    assert same(values(target), before)


def test_rename_must_be_a_mapping_or_a_callable(tmp_path: Path) -> None:
    """Anything else is a TypeError; a callable returning a non-string too, naming the key."""
    path = saved(tmp_path, net())
    with pytest.raises(TypeError, match="rename"):
        tms.load(path, into=net(), rename=["head.weight"])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"(?s)rename.*head\.weight.*int"):
        tms.load(path, into=net(), rename=lambda k: 3 if k == "head.weight" else k)  # type: ignore[arg-type,return-value]


def test_rename_with_a_mapping_key_the_file_lacks_is_an_error_under_strict(tmp_path: Path) -> None:
    """A mapping naming a key the file does not hold is a typo under strict; allowed without."""
    path = saved(tmp_path, net())
    with pytest.raises(
        CheckpointMismatchError, match=r"(?s)hed\.weight.*did you mean.*head\.weight"
    ):
        tms.load(path, into=net(seed=1), rename={"hed.weight": "head.weight"})
    tms.load(path, into=net(seed=1), rename={"hed.weight": "head.weight"}, strict=False)


def test_rename_applies_to_the_files_ties_and_frozen_set(tmp_path: Path) -> None:
    """Ties and the frozen set recorded in the file follow the renamed keys."""
    inner = nn.ModuleDict({"emb": nn.Embedding(5, 4), "head": nn.Linear(4, 5, bias=False)})
    inner["head"].weight = inner["emb"].weight
    outer = nn.ModuleDict({"model": inner})
    ModelState.new(outer).freeze("model.emb.weight")
    path = saved(tmp_path, outer)
    target = nn.ModuleDict({"emb": nn.Embedding(5, 4), "head": nn.Linear(4, 5, bias=False)})
    ms = tms.load(path, into=target, rename=lambda k: k.removeprefix("model."), frozen="file")
    assert ms.ties() == {"head.weight": "emb.weight"}
    assert target["head"].weight is target["emb"].weight
    assert list(ms.frozen_parameters()) == ["emb.weight"]
    assert torch.equal(target["emb"].weight, inner["emb"].weight)


def test_rename_in_a_standalone_load(tmp_path: Path) -> None:
    """Without `into`, the returned state has the renamed keys."""
    path = plain_file(tmp_path, wrapped())
    loaded = tms.load(path, rename=lambda k: k.removeprefix("module."))
    assert sorted(loaded.to_dict()) == sorted(net().state_dict())


def test_check_takes_rename_and_reports_what_loads(tmp_path: Path) -> None:
    """check() accepts the same keywords as load and changes nothing."""
    path = plain_file(tmp_path, wrapped())
    target = net(seed=1)
    before = values(target)
    report = tms.io.check(path, target, rename=lambda k: k.removeprefix("module."))
    assert report.missing == () and report.unexpected == ()
    assert "head.weight" in report.loaded
    assert same(values(target), before)


# --------------------------------------------------------------------------- mismatch hints


def suggested_rename(message: str) -> object:
    """Evaluate the `rename=...` that a message suggests (it must be runnable text)."""
    found = re.search(r"rename=(lambda k: .+?)(?:\n|$)", message)
    assert found, message
    return eval(found.group(1))


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod."])
def test_a_prefixed_file_suggests_the_rename_that_fixes_it(tmp_path: Path, prefix: str) -> None:
    """DDP (`module.`) and torch.compile (`_orig_mod.`) files: the hint is a runnable rename=."""
    sd = {prefix + k: v for k, v in values(net()).items()}
    path = tmp_path / "m.safetensors"
    save_file(sd, path)
    target = net(seed=1)
    with pytest.raises(CheckpointMismatchError) as err:
        tms.load(path, into=target)
    message = str(err.value)
    assert f'rename=lambda k: k.removeprefix("{prefix}")' in message
    assert "strict=False" not in message  # it would load nothing
    tms.load(path, into=target, rename=suggested_rename(message))  # type: ignore[arg-type]
    assert same(values(target), values(net()))


def test_a_target_with_a_prefix_suggests_adding_it(tmp_path: Path) -> None:
    """A plain file into a wrapper whose keys start with `model.` (Lightning): add the prefix."""
    path = plain_file(tmp_path, net())
    target = nn.Module()
    target.model = net(seed=1)
    with pytest.raises(CheckpointMismatchError) as err:
        tms.load(path, into=target)
    message = str(err.value)
    assert 'rename=lambda k: "model." + k' in message
    tms.load(path, into=target, rename=suggested_rename(message))  # type: ignore[arg-type]
    assert same(values(target.model), values(net()))


def test_no_strict_false_hint_when_no_key_is_shared(tmp_path: Path) -> None:
    """Files that share no key with the target are not 'fixed' by strict=False."""
    path = tmp_path / "other.safetensors"
    save_file({"encoder.w": torch.ones(2), "decoder.w": torch.ones(2)}, path)
    with pytest.raises(CheckpointMismatchError) as err:
        tms.load(path, into=net())
    assert "strict=False" not in str(err.value)
    assert "no key in common" in str(err.value)


def test_strict_false_hint_when_some_keys_would_load(tmp_path: Path) -> None:
    """A file covering part of the target: the hint says how many keys strict=False loads."""
    sd = {k: v for k, v in values(net()).items() if k.startswith("backbone.")}
    path = tmp_path / "backbone.safetensors"
    save_file(sd, path)
    with pytest.raises(CheckpointMismatchError, match=rf"strict=False.*{len(sd)} keys"):
        tms.load(path, into=net(seed=1))


def meta_gpt2() -> nn.Module:
    """A GPT-2 built on the meta device and materialised: to_empty breaks its tie."""
    from models import tiny_gpt2

    with torch.device("meta"):
        model = tiny_gpt2(seed=1)
    model.to_empty(device="cpu")
    assert ModelState.new(model).ties() == {}
    return model


def test_a_tie_broken_by_to_empty_is_named_with_the_fix(tmp_path: Path) -> None:
    """save_pretrained stores the head once; the hint re-ties instead of suggesting strict=False."""
    from models import tiny_gpt2

    transformers = pytest.importorskip("transformers")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    tiny_gpt2().save_pretrained(tmp_path)  # type: ignore[operator]
    target = meta_gpt2()
    for strict in (True, False):  # strict=False would leave lm_head as uninitialised memory
        with pytest.raises(CheckpointMismatchError) as err:
            tms.load(tmp_path, into=target, strict=strict)
        message = str(err.value)
        assert "lm_head.weight" in message
        assert 'tie("lm_head.weight", "transformer.wte.weight")' in message
        assert "strict=False" not in message
    ms = ModelState.new(target).tie("lm_head.weight", "transformer.wte.weight")
    tms.load(tmp_path, into=ms)
    source = tiny_gpt2()
    assert torch.equal(target.lm_head.weight, source.transformer.wte.weight)  # type: ignore[union-attr]


def test_a_tie_broken_by_assign_true_is_named_with_the_fix(tmp_path: Path) -> None:
    """load_state_dict(assign=True) splits the tie the same way; the same hint names it."""
    from models import tiny_gpt2

    transformers = pytest.importorskip("transformers")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    source = tiny_gpt2()
    source.save_pretrained(tmp_path)  # type: ignore[operator]
    target = tiny_gpt2(seed=1)
    target.load_state_dict({k: v.clone() for k, v in source.state_dict().items()}, assign=True)
    assert ModelState.new(target).ties() == {}
    with pytest.raises(CheckpointMismatchError, match=r'tie\("lm_head\.weight"'):
        tms.load(tmp_path, into=target)


# --------------------------------------------------------------------------- unwritable targets


def mixed_dtypes() -> nn.Sequential:
    """A float32 layer (read in place) and a bfloat16 one (needs a cast from a float32 file)."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].to(torch.bfloat16)
    return model


def test_an_inference_mode_target_that_needs_a_cast_is_refused_first(tmp_path: Path) -> None:
    """Built under inference_mode, a cast cannot write it: a ValueError naming key and file."""
    path = saved(tmp_path, nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)))
    with torch.inference_mode():
        target = mixed_dtypes()
    before = values(target)
    with pytest.raises(
        CheckpointMismatchError, match=r"(?s)m\.safetensors.*`1\.weight`.*inference"
    ):
        tms.load(path, into=target)
    assert same(values(target), before)


def test_an_inference_mode_target_loads_inside_inference_mode(tmp_path: Path) -> None:
    """The fix the message gives works: load under torch.inference_mode()."""
    source = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    path = saved(tmp_path, source)
    with torch.inference_mode():
        target = mixed_dtypes()
        tms.load(path, into=target)
    assert torch.equal(target[0].weight, source[0].weight.detach())
    assert torch.equal(target[1].weight, source[1].weight.detach().to(torch.bfloat16))


class Mapped(nn.Module):
    """A buffer backed by a read-only memory map of a file, after an ordinary parameter."""

    def __init__(self, file: Path) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        with open(file, "rb") as handle:  # the map keeps its own descriptor
            self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "non-writable buffer"
            table = torch.frombuffer(self._map, dtype=torch.float32, count=16)
        self.register_buffer("table", table)


def read_only_target(tmp_path: Path) -> Mapped:
    raw = tmp_path / "table.bin"
    raw.write_bytes(torch.arange(16.0).numpy().tobytes())
    return Mapped(raw)


def test_a_read_only_mapped_buffer_is_refused_before_any_write(tmp_path: Path) -> None:
    """A buffer on a read-only mmap: a ValueError naming key and file, nothing written."""
    source = read_only_target(tmp_path)
    with torch.no_grad():
        source.lin.weight.fill_(5.0)
    path = tmp_path / "m.safetensors"
    save_file({"lin.weight": source.lin.weight.detach().clone(),
               "lin.bias": source.lin.bias.detach().clone(),
               "table": torch.zeros(16)}, path)  # fmt: skip
    target = read_only_target(tmp_path)
    before = values(target)
    with pytest.raises(CheckpointMismatchError, match=r"(?s)m\.safetensors.*`table`.*read-only"):
        tms.load(path, into=target)
    assert same(values(target), before)


def test_a_read_only_mapped_buffer_that_needs_a_cast_is_refused(tmp_path: Path) -> None:
    """The staged (cast) path is refused too, instead of crashing the process."""
    script = textwrap.dedent(
        f"""
        import sys, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from pathlib import Path
        from safetensors.torch import save_file
        import torch_modelstate as tms
        from test_checkpoint_load import read_only_target
        tmp = Path({str(tmp_path)!r})
        save_file({{"lin.weight": torch.ones(4, 4), "lin.bias": torch.ones(4),
                    "table": torch.zeros(16, dtype=torch.float64)}}, tmp / "m.safetensors")
        target = read_only_target(tmp)
        try:
            tms.load(tmp / "m.safetensors", into=target)
        except tms.CheckpointMismatchError as err:
            assert "read-only" in str(err) and "`table`" in str(err), err
            assert not torch.equal(target.lin.weight, torch.ones(4, 4))
            print("refused")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0 and "refused" in out.stdout, out.stderr[-2000:]


def test_a_load_file_tensor_as_a_buffer_loads(tmp_path: Path) -> None:
    """safetensors' load_file maps copy-on-write: such a buffer is writable and loads."""
    from safetensors.torch import load_file

    raw = tmp_path / "buf.safetensors"
    save_file({"table": torch.arange(16.0)}, raw)
    model = nn.Module()
    model.register_buffer("table", load_file(raw)["table"])
    path = tmp_path / "m.safetensors"
    save_file({"table": torch.zeros(16)}, path)
    tms.load(path, into=model)
    assert torch.equal(model.table, torch.zeros(16))


# --------------------------------------------------------------------------- one shard alone


def test_one_shard_alone_is_refused_with_the_way_to_load_it(tmp_path: Path) -> None:
    """A shard of a sharded save is part of a model: load its directory or index instead."""
    tms.save(net(), tmp_path / "ck", max_shard_size="100B")
    shard = sorted((tmp_path / "ck").glob("model-*.safetensors"))[0]
    for into in (None, net(seed=1)):
        with pytest.raises(CheckpointError, match=r"(?s)shard 1 of \d+.*index") as err:
            tms.load(shard, into=into)
        assert "malformed" not in str(err.value)


# --------------------------------------------------------------------------- logging kept


def test_strict_false_still_logs_what_it_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The strict=False warning on the torch_modelstate logger still names the missing keys."""
    sd = {k: v for k, v in values(net()).items() if k != "head.bias"}
    path = tmp_path / "m.safetensors"
    save_file(sd, path)
    with caplog.at_level(logging.WARNING, logger="torch_modelstate"):
        tms.load(path, into=net(seed=1), strict=False)
    assert "head.bias" in caplog.text
