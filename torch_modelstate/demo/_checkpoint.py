"""The demo's last phase: save, load into a freshly built model, and compare the two."""

from __future__ import annotations

import os
import time

import torch
from safetensors import safe_open
from torch import Tensor

import torch_modelstate as tms
from torch_modelstate.demo._model import TinyLM, build
from torch_modelstate.demo._phases import Job
from torch_modelstate.demo._report import Report, all_equal, clones, say

__all__ = ["CHECKPOINT", "checkpoint"]

CHECKPOINT = "demo.safetensors"


def checkpoint(job: Job, out_dir: str) -> None:
    """Phase 3: save, load into a freshly built model, and compare the two."""
    ms, report = job.ms, job.report
    say()
    say(
        "3. Checkpoint: save, then load into a freshly built model (untied, unfrozen, other values)"
    )
    path = os.path.join(out_dir, CHECKPOINT)
    torch.manual_seed(job.seed + 1)
    fresh = build(len(job.vocab))
    try:
        started = time.perf_counter()
        tms.save(ms, path)
        save_ms = (time.perf_counter() - started) * 1000
        started = time.perf_counter()
        tms.load(path, into=fresh, frozen="file")  # the file's frozen set, too
        load_ms = (time.perf_counter() - started) * 1000
    except (ValueError, TypeError, KeyError, OSError) as error:
        detail = " ".join(str(error).split())
        report.check("checkpoint: save and load", False, f"{type(error).__name__}: {detail}")
        return
    report.checkpoint_bytes = os.path.getsize(path)
    stored = {**ms.parameters(), **ms.state()}  # each tied tensor once
    tensor_bytes = sum(t.numel() * t.element_size() for t in stored.values())
    say(f"  >>> path = {path!r}")
    say("  >>> tms.save(ms, path)")
    say('  >>> tms.load(path, into=fresh, frozen="file").ties()')
    say(f"  {tms.ModelState.new(fresh).ties()}")
    say(
        f"  {tms.format_bytes(report.checkpoint_bytes)} on disk: "
        f"{tms.format_bytes(tensor_bytes)} of tensors, the tied weight once, and a header"
    )
    say(
        f"  with the keys, the ties and the frozen set; saved in {save_ms:.0f} ms, "
        f"loaded in {load_ms:.0f} ms"
    )
    _check_file(report, path, ms)
    _check_reload(report, job.model, fresh, ms, job.dialogue_val[0][:4])


def _check_file(report: Report, path: str, ms: tms.ModelState) -> None:
    """A plain safetensors file that other tools read, with the tied weight stored once."""
    with safe_open(path, framework="pt") as f:
        keys = set(f.keys())
        metadata = f.metadata() or {}
    report.check(
        "checkpoint: plain safetensors, the tied weight stored once",
        metadata.get("format") == "pt"
        and "head.weight" not in keys
        and keys == set(ms.parameters()) | set(ms.state()),
        f"{len(keys)} tensors, no head.weight",
    )


def _check_reload(
    report: Report, model: TinyLM, fresh: TinyLM, ms: tms.ModelState, probe: Tensor
) -> None:
    """The reloaded model equals the trained one in values, ties, flags and outputs."""
    fresh_ms = tms.ModelState.new(fresh)
    want, got = ms.to_dict(), fresh_ms.to_dict()
    report.check(
        "reload: every value equal",
        want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want),
        f"{len(want)} keys",
    )
    report.check(
        "reload: tie restored, one Parameter",
        fresh_ms.ties() == {"head.weight": "embed.weight"}
        and fresh.head.weight is fresh.embed.weight,
        f"ties() == {fresh_ms.ties()}",
    )
    flags = {key: p.requires_grad for key, p in model.named_parameters()}
    report.check(
        "reload: frozen flags restored",
        fresh_ms.frozen_parameters().keys() == ms.frozen_parameters().keys()
        and fresh_ms.frozen_state().keys() == ms.frozen_state().keys()
        and {key: p.requires_grad for key, p in fresh.named_parameters()} == flags,
        f"{len(fresh_ms.frozen_parameters())} parameters, {len(fresh_ms.frozen_state())} state",
    )
    model.eval()
    fresh.eval()
    with torch.no_grad():
        same = torch.equal(model(probe), fresh(probe))
        report.check("reload: identical logits", same, f"on {tuple(probe.shape)} inputs")
        kept = clones(fresh_ms.frozen_state())
        fresh.train()
        fresh(probe)
    report.check(
        "reload: frozen statistics stay put in training mode",
        all_equal(fresh_ms.frozen_state(), kept),
        f"{len(kept)} tensors",
    )
