"""The demo's two training phases: pretraining the tied model, then fine-tuning its last block.

Each phase prints the calls it makes, as a user would write them, and records its checks.
"""

from __future__ import annotations

import copy
import textwrap
from dataclasses import dataclass

import torch
from torch import Tensor

import torch_modelstate as tms
from torch_modelstate.demo._model import CONTEXT, TinyLM
from torch_modelstate.demo._report import Report, all_equal, clones, count, say
from torch_modelstate.demo._text import Corpus
from torch_modelstate.demo._train import BATCH, sample, train, val_loss

__all__ = ["EMA_DECAY", "Job", "finetune", "pretrain"]

EMA_DECAY = 0.99


@dataclass
class Job:
    """What the phases of one run share."""

    steps: int
    seed: int
    vocab: list[str]
    stories: Corpus
    dialogue: Corpus
    stories_val: tuple[Tensor, Tensor]
    dialogue_val: tuple[Tensor, Tensor]
    generator: torch.Generator
    model: TinyLM
    ms: tms.ModelState
    report: Report


def pretrain(job: Job) -> None:
    """Phase 1: train the whole (tied) model on stories."""
    model, ms, losses, samples = job.model, job.ms, job.report.losses, job.report.samples
    say()
    say(f"1. Pretraining on stories: {job.steps} steps of {BATCH} x {CONTEXT} characters")
    say("  >>> optimizer = torch.optim.AdamW(ms.trainable_parameters().values(), lr=3e-3)")
    losses["stories_before"] = val_loss(model, job.stories_val)
    samples["before"] = sample(model, job.vocab, "Anna ", job.seed)
    optimizer = torch.optim.AdamW(ms.trainable_parameters().values(), lr=3e-3)
    train(model, optimizer, job.stories, job.steps, job.generator, "pretrain")
    losses["stories_after"] = val_loss(model, job.stories_val)
    samples["pretrained"] = sample(model, job.vocab, "Anna ", job.seed)
    say(f"  validation loss: {losses['stories_before']:.3f} -> {losses['stories_after']:.3f}")
    say(f"  sample before: {samples['before']!r}")
    say(f"  sample after:  {samples['pretrained']!r}")
    job.report.check(
        "pretraining lowered the validation loss",
        losses["stories_after"] < losses["stories_before"],
        f"{losses['stories_before']:.3f} -> {losses['stories_after']:.3f}",
    )
    job.report.check(
        "tie held through the optimizer steps",
        model.head.weight is model.embed.weight and ms.ties() == {"head.weight": "embed.weight"},
    )


def finetune(job: Job) -> None:
    """Phase 2: freeze all but the last block, train it on dialogue, keep an EMA."""
    model, ms, losses, samples = job.model, job.ms, job.report.losses, job.report.samples
    last = len(model.blocks) - 1
    say()
    say(
        f"2. Fine-tuning the last block only, on questions and answers: {job.steps} steps, "
        "with an EMA"
    )
    ms.freeze().unfreeze(f"blocks.{last}.**")
    say(f'  >>> ms.freeze().unfreeze("blocks.{last}.**")')
    say(textwrap.indent(repr(ms), "  "))
    say(
        f"  trainable: parameters {count(ms.trainable_parameters())}, "
        f"state {count(ms.trainable_state())}"
    )
    say(
        f"  frozen:    parameters {count(ms.frozen_parameters())}, state {count(ms.frozen_state())}"
    )
    say(f"  (the frozen state is the BatchNorm statistics of blocks 0-{last - 1}: they stay put")
    say("  in training mode, while those BatchNorms still normalise with batch statistics)")
    say("  >>> ema = ms.clone()   # standalone: new tensors, same ties and frozen set")
    say(f"  >>> ema.merge(ms, tms.merges.ema({EMA_DECAY}))   # after each optimizer step")
    frozen_params = clones(ms.frozen_parameters())
    frozen_state = clones(ms.frozen_state())
    trainable_state = clones(ms.trainable_state())
    losses["dialogue_before"] = val_loss(model, job.dialogue_val)
    samples["finetune_before"] = sample(model, job.vocab, "Q: ", job.seed)
    ema = ms.clone()
    ema_start = clones(ema.trainable_parameters())
    decay = tms.merges.ema(EMA_DECAY)
    optimizer = torch.optim.AdamW(ms.trainable_parameters().values(), lr=2e-3)
    train(
        model,
        optimizer,
        job.dialogue,
        job.steps,
        job.generator,
        "fine-tune",
        after_step=lambda: ema.merge(ms, decay),
    )
    ema_model = copy.deepcopy(model)
    tms.ModelState.new(ema_model).update(ema)
    losses["dialogue_after"] = val_loss(model, job.dialogue_val)
    losses["dialogue_ema"] = val_loss(ema_model, job.dialogue_val)
    losses["stories_after_finetune"] = val_loss(model, job.stories_val)
    samples["finetuned"] = sample(model, job.vocab, "Q: ", job.seed)
    say(
        f"  validation loss: {losses['dialogue_before']:.3f} -> {losses['dialogue_after']:.3f}, "
        f"EMA {losses['dialogue_ema']:.3f}"
        f" (on stories: {losses['stories_after']:.3f} -> {losses['stories_after_finetune']:.3f})"
    )
    say(f"  sample before: {samples['finetune_before']!r}")
    say(f"  sample after:  {samples['finetuned']!r}")

    check = job.report.check
    check(
        "fine-tuning lowered the validation loss",
        losses["dialogue_after"] < losses["dialogue_before"],
        f"{losses['dialogue_before']:.3f} -> {losses['dialogue_after']:.3f}",
    )
    check(
        "frozen parameters unchanged by fine-tuning",
        all_equal(ms.frozen_parameters(), frozen_params),
        f"{len(frozen_params)} tensors",
    )
    check(
        "frozen BatchNorm statistics kept, the last block's updated",
        all_equal(ms.frozen_state(), frozen_state)
        and all(not torch.equal(t, trainable_state[k]) for k, t in ms.trainable_state().items()),
        f"{len(frozen_state)} frozen, {len(trainable_state)} trainable tensors",
    )
    model_ptrs = {t.data_ptr() for t in ms.to_dict().values()}
    ema_now = ema.trainable_parameters()
    check(
        "EMA: a separate copy that moved toward the model",
        not model_ptrs & {t.data_ptr() for t in ema.to_dict().values()}
        and ema.to_dict().keys() == ms.to_dict().keys()
        and all(not torch.equal(ema_now[k], ema_start[k]) for k in ema_start)
        and all(not torch.equal(ema_now[k], t) for k, t in ms.trainable_parameters().items()),
        f"validation loss {losses['dialogue_ema']:.3f}",
    )
