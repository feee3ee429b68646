"""The ``demo`` command: the whole library on one small job, checked end to end.

``torch-modelstate demo`` trains a tiny character-level transformer whose output head is
tied to its input embedding, fine-tunes only its last block on text of another style while
keeping an exponential moving average (EMA) of the weights, saves a checkpoint, loads it
into a freshly built model and checks that nothing was lost. Each step uses the public
API the way a user would:

- ``ModelState.new(model).tie("head.weight", "embed.weight")``: one ``Parameter`` under
  two names, so the optimizer, the EMA and the checkpoint each see it once;
- ``ms.freeze().unfreeze("blocks.2.**")``: a glob mask; the frozen blocks' BatchNorm
  statistics stay put through training-mode forward passes;
- ``AdamW(ms.trainable_parameters().values())``, and ``ema.merge(ms, merges.ema(0.99))``
  into a standalone ``ms.clone()`` after each step;
- ``save(ms, path)``, then ``load(path, into=fresh_model)``.

The text comes from two tiny grammars (short stories, then questions and answers about
the same people and things), so the demo needs no downloads, and one seed gives one run.
A progress bar goes to stderr, the report to stdout; its ``PASS``/``FAIL`` lines decide
the exit status.

>>> model = TinyLM(vocab_size=12, dim=16, n_blocks=2, n_heads=2, context=8)
>>> ms = ModelState.new(model).tie("head.weight", "embed.weight")
>>> ms.ties(), model.head.weight is model.embed.weight
({'head.weight': 'embed.weight'}, True)
>>> ms.freeze().unfreeze("blocks.1.**")  # everything but the last block is frozen
ModelState<...>
>>> sorted(key.split(".")[-1] for key in ms.trainable_state())  # its BatchNorm's statistics
['num_batches_tracked', 'running_mean', 'running_var']
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import random
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torch_modelstate import merges
from torch_modelstate._state import ModelState, format_bytes

__all__ = ["DEFAULT_STEPS", "HELP", "TinyLM", "add_arguments", "main", "make_texts", "run"]

HELP = (
    "train a tiny language model with tied embeddings, freeze all but its last block, "
    "fine-tune it with an EMA, save, reload and check it (no downloads, about 20 s)"
)
DEFAULT_STEPS = 300  # optimizer steps in each of the two phases

_BATCH = 16
_CONTEXT = 64
_WIDTH = 64
_BLOCKS = 3
_EMA_DECAY = 0.99
_TEMPERATURE = 0.5
_SAMPLE_CHARS = 60
_CHECKPOINT = "demo.safetensors"
_PROG = "torch-modelstate demo"


# --------------------------------------------------------------------------- text

_NAMES = ("Anna", "Tom", "the king", "the miller", "old Mary", "the baker", "a child")
_ADJECTIVES = ("red", "small", "old", "quiet", "bright", "lazy", "brave", "green", "wet")
_NOUNS = ("fox", "bird", "cat", "horse", "lamp", "apple", "boat", "key", "coat", "bell")
_PLACES = ("the river", "the forest", "the old mill", "the market", "the hill", "the garden")
_VERBS = (("saw", "see"), ("found", "find"), ("lost", "lose"), ("carried", "carry"))
_FEELINGS = ("happy", "tired", "afraid", "hungry", "glad", "sleepy")
# Pretraining text gets a question and its answer after this share of its paragraphs, so
# every character and the format are known before the frozen layers stop learning.
_QA_IN_STORIES = 0.25


def _thing(rng: random.Random) -> str:
    words = (
        f"{rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)}"
        if rng.random() < 0.6
        else rng.choice(_NOUNS)
    )
    return ("an " if words[0] in "aeiou" else "a ") + words


def _story_sentence(rng: random.Random, who: str) -> str:
    match rng.randrange(5):
        case 0:
            verb = rng.choice(_VERBS)[0]
            sentence = f"{who} {verb} {_thing(rng)} near {rng.choice(_PLACES)}."
        case 1:
            sentence = f"{who} walked to {rng.choice(_PLACES)}."
        case 2:
            sentence = f"{who} was {rng.choice(_FEELINGS)}."
        case 3:
            sentence = f"Then {who} went home with {_thing(rng)}."
        case _:
            sentence = f"{who} {rng.choice(_VERBS)[0]} {_thing(rng)}."
    return sentence[0].upper() + sentence[1:]


def _question_and_answer(rng: random.Random) -> str:
    who = rng.choice(_NAMES)
    answer = who[0].upper() + who[1:]
    match rng.randrange(3):
        case 0:
            past, base = rng.choice(_VERBS)
            return f"Q: What did {who} {base}?\nA: {answer} {past} {_thing(rng)}.\n"
        case 1:
            noun, place = rng.choice(_NOUNS), rng.choice(_PLACES)
            return f"Q: Where is the {noun}?\nA: The {noun} is near {place}.\n"
        case _:
            return f"Q: How was {who}?\nA: {answer} was {rng.choice(_FEELINGS)}.\n"


def make_texts(
    seed: int, stories_chars: int = 48_000, dialogue_chars: int = 24_000
) -> tuple[str, str]:
    """Two styles of text from tiny grammars: stories, and questions with answers.

    >>> stories, dialogue = make_texts(0, 300, 100)
    >>> stories[:30], dialogue.startswith("Q: ")
    ('Then a child went home with a ', True)
    """
    rng = random.Random(seed)
    stories: list[str] = []
    size = 0
    while size < stories_chars:
        who = rng.choice(_NAMES)
        sentences = (_story_sentence(rng, who) for _ in range(rng.randint(2, 4)))
        paragraph = " ".join(sentences) + "\n"
        if rng.random() < _QA_IN_STORIES:
            paragraph += _question_and_answer(rng)
        stories.append(paragraph)
        size += len(paragraph)
    dialogue: list[str] = []
    size = 0
    while size < dialogue_chars:
        dialogue.append(_question_and_answer(rng))
        size += len(dialogue[-1])
    return "".join(stories), "".join(dialogue)


class Corpus:
    """A text as character ids, split 90/10 into training and validation parts."""

    def __init__(self, text: str, vocab: Sequence[str]) -> None:
        lookup = {ch: i for i, ch in enumerate(vocab)}
        ids = torch.tensor([lookup[ch] for ch in text], dtype=torch.long)
        cut = len(ids) * 9 // 10
        self.train = ids[:cut]
        self.val = ids[cut:]

    def batch(self, size: int, context: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Random windows of the training part: inputs and next-character targets."""
        starts = torch.randint(len(self.train) - context, (size,), generator=generator)
        windows = self.train.unfold(0, context + 1, 1)[starts]
        return windows[:, :-1], windows[:, 1:]

    def val_windows(self, count: int, context: int) -> tuple[Tensor, Tensor]:
        """Evenly spaced windows of the validation part, the same on every call."""
        starts = torch.linspace(0, len(self.val) - context - 1, count).long()
        windows = self.val.unfold(0, context + 1, 1)[starts]
        return windows[:, :-1], windows[:, 1:]


# --------------------------------------------------------------------------- model


class Block(nn.Module):
    """A pre-norm transformer block: causal self-attention, then an MLP after a BatchNorm.

    The BatchNorm gives the model state (running statistics), so freezing shows what it
    does to state as well as to parameters.
    """

    def __init__(self, dim: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.norm_attn = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm_mlp = nn.BatchNorm1d(dim, momentum=0.05)
        self.fc = nn.Linear(dim, 4 * dim)
        self.out = nn.Linear(4 * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        batch, length, dim = x.shape
        q, k, v = self.qkv(self.norm_attn(x)).split(dim, dim=-1)
        heads = (batch, length, self.n_heads, dim // self.n_heads)
        q, k, v = (t.view(heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(batch, length, dim))
        h = self.norm_mlp(x.transpose(1, 2)).transpose(1, 2)  # BatchNorm1d wants (N, C, L)
        out: Tensor = x + self.out(F.gelu(self.fc(h)))
        return out


class TinyLM(nn.Module):
    """A character-level GPT. Its head and its embedding are separate modules, as in most
    model code, until `ModelState.tie` makes them one."""

    def __init__(
        self, vocab_size: int, dim: int, n_blocks: int, n_heads: int, context: int
    ) -> None:
        super().__init__()
        self.context = context
        self.embed = nn.Embedding(vocab_size, dim)
        self.pos = nn.Parameter(torch.randn(context, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, n_heads) for _ in range(n_blocks))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        nn.init.normal_(self.embed.weight, std=0.02)  # small: it becomes the head's too

    def forward(self, ids: Tensor) -> Tensor:
        x = self.embed(ids) + self.pos[: ids.shape[1]]
        for block in self.blocks:
            x = block(x)
        logits: Tensor = self.head(self.norm(x))
        return logits


def _build(vocab_size: int) -> TinyLM:
    return TinyLM(vocab_size, dim=_WIDTH, n_blocks=_BLOCKS, n_heads=4, context=_CONTEXT)


# --------------------------------------------------------------------------- training


class Progress:
    """A one-line progress bar, redrawn in place at most ten times a second.

    On a stream that is not a terminal (a log file, CI), only the finished line is
    written, so logs get one line per phase instead of hundreds.
    """

    def __init__(self, label: str, total: int, stream: IO[str] | None = None) -> None:
        self.label = label
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.live = self.stream.isatty()
        self.start = time.perf_counter()
        self.drawn = -math.inf

    def update(self, done: int, loss: float) -> None:
        now = time.perf_counter()
        if done >= self.total:
            self.stream.write(("\r" if self.live else "") + self._line(done, loss, now) + "\n")
            self.stream.flush()
        elif self.live and now - self.drawn >= 0.1:
            self.drawn = now
            self.stream.write("\r" + self._line(done, loss, now))
            self.stream.flush()

    def _line(self, done: int, loss: float, now: float) -> str:
        width = 24
        filled = min(width, width * done // max(self.total, 1))
        bar = ("=" * filled + ">").ljust(width)[:width]
        seconds = now - self.start
        rate = done / max(seconds, 1e-9)
        return (
            f"  {self.label:<9} [{bar}] {done:>4}/{self.total}"
            f"  loss {loss:5.3f}  {rate:5.1f} it/s  {seconds:4.1f} s"
        )


@torch.no_grad()
def _val_loss(model: nn.Module, data: tuple[Tensor, Tensor]) -> float:
    was_training = model.training
    model.eval()
    inputs, targets = data
    loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
    model.train(was_training)
    return float(loss)


def _train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    corpus: Corpus,
    steps: int,
    generator: torch.Generator,
    label: str,
    after_step: Callable[[], object] | None = None,
) -> None:
    """AdamW steps on random windows, with a short warm-up and a cosine decay to 10%."""
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    warmup = max(1, min(20, steps // 10))
    bar = Progress(label, steps)
    model.train()
    smooth = math.nan
    for step in range(1, steps + 1):
        scale = min(1.0, step / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * step / steps)))
        for group, lr in zip(optimizer.param_groups, base_lrs, strict=True):
            group["lr"] = lr * scale
        inputs, targets = corpus.batch(_BATCH, _CONTEXT, generator)
        loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
        optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(loss)  # typed, unlike Tensor.backward
        optimizer.step()
        if after_step is not None:
            after_step()
        value = float(loss.detach())
        smooth = value if math.isnan(smooth) else 0.9 * smooth + 0.1 * value
        bar.update(step, smooth)
    for group, lr in zip(optimizer.param_groups, base_lrs, strict=True):
        group["lr"] = lr


@torch.no_grad()
def _sample(model: TinyLM, vocab: Sequence[str], prompt: str, seed: int) -> str:
    """`prompt` and the characters the model samples after it (newlines shown as ``|``)."""
    was_training = model.training
    model.eval()
    lookup = {ch: i for i, ch in enumerate(vocab)}
    ids = [lookup[ch] for ch in prompt]
    generator = torch.Generator().manual_seed(seed)
    for _ in range(_SAMPLE_CHARS):
        logits = model(torch.tensor([ids[-model.context :]]))[0, -1]
        probs = torch.softmax(logits / _TEMPERATURE, dim=-1)
        ids.append(int(torch.multinomial(probs, 1, generator=generator)))
    model.train(was_training)
    return "".join(vocab[i] for i in ids).replace("\n", " | ")


# --------------------------------------------------------------------------- the run


class Check(NamedTuple):
    what: str
    passed: bool
    detail: str


@dataclass
class Report:
    """What a run measured, for the printed report and for tests."""

    losses: dict[str, float] = field(default_factory=dict)
    samples: dict[str, str] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    checkpoint_bytes: int = 0

    def check(self, what: str, passed: bool, detail: str = "") -> bool:
        self.checks.append(Check(what, bool(passed), detail))
        return bool(passed)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(check.passed for check in self.checks)


def _say(text: str = "") -> None:
    print(text, flush=True)


def _count(tensors: Mapping[str, Tensor]) -> str:
    return f"{sum(t.numel() for t in tensors.values()):,} in {len(tensors)} tensors"


def _clones(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {key: t.detach().clone() for key, t in tensors.items()}


def _all_equal(tensors: Mapping[str, Tensor], before: Mapping[str, Tensor]) -> bool:
    return tensors.keys() == before.keys() and all(
        torch.equal(t, before[key]) for key, t in tensors.items()
    )


@dataclass
class _Job:
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
    ms: ModelState
    report: Report


def run(steps: int, seed: int, out_dir: str) -> Report:
    """Run the demo, printing as it goes; returns what it measured and checked.

    `steps` optimizer steps pretrain the model and as many fine-tune it; the checkpoint is
    written to `out_dir`.
    """
    stories_text, dialogue_text = make_texts(seed)
    vocab = sorted(set(stories_text + dialogue_text))
    stories, dialogue = Corpus(stories_text, vocab), Corpus(dialogue_text, vocab)
    torch.manual_seed(seed)
    model = _build(len(vocab))
    _say("torch-modelstate demo: a tiny language model, tied, frozen, averaged, saved, reloaded")
    _say()
    _say(
        f"Text: {len(stories_text) / 1000:.0f} KB of short stories (some followed by a question "
        f"and its answer)"
    )
    _say(
        f"  and {len(dialogue_text) / 1000:.0f} KB of questions and answers, from two tiny "
        f"grammars (seed {seed}); {len(vocab)} characters"
    )
    _say(
        f"Model: a character-level transformer, {_BLOCKS} blocks of width {_WIDTH}, "
        f"context {_CONTEXT}, with LayerNorm"
    )
    _say("  and BatchNorm; its head and its embedding are separate nn.Modules, tied here:")
    ms = ModelState.new(model).tie("head.weight", "embed.weight")
    _say('  >>> ms = ModelState.new(model).tie("head.weight", "embed.weight")')
    _say(f"  >>> ms.ties()\n  {ms.ties()}")
    _say(textwrap.indent(repr(ms), "  "))
    job = _Job(
        steps=steps,
        seed=seed,
        vocab=vocab,
        stories=stories,
        dialogue=dialogue,
        stories_val=stories.val_windows(64, _CONTEXT),
        dialogue_val=dialogue.val_windows(64, _CONTEXT),
        generator=torch.Generator().manual_seed(seed),
        model=model,
        ms=ms,
        report=Report(),
    )
    job.report.check(
        "tie: head.weight is embed.weight, one Parameter",
        model.head.weight is model.embed.weight
        and ms.ties() == {"head.weight": "embed.weight"}
        and "head.weight" not in ms.trainable_parameters(),
        "the optimizer sees it once",
    )
    _pretrain(job)
    _finetune(job)
    _checkpoint(job, out_dir)
    return job.report


def _pretrain(job: _Job) -> None:
    """Phase 1: train the whole (tied) model on stories."""
    model, ms, losses, samples = job.model, job.ms, job.report.losses, job.report.samples
    _say()
    _say(f"1. Pretraining on stories: {job.steps} steps of {_BATCH} x {_CONTEXT} characters")
    _say("  >>> optimizer = torch.optim.AdamW(ms.trainable_parameters().values(), lr=3e-3)")
    losses["stories_before"] = _val_loss(model, job.stories_val)
    samples["before"] = _sample(model, job.vocab, "Anna ", job.seed)
    optimizer = torch.optim.AdamW(ms.trainable_parameters().values(), lr=3e-3)
    _train(model, optimizer, job.stories, job.steps, job.generator, "pretrain")
    losses["stories_after"] = _val_loss(model, job.stories_val)
    samples["pretrained"] = _sample(model, job.vocab, "Anna ", job.seed)
    _say(f"  validation loss: {losses['stories_before']:.3f} -> {losses['stories_after']:.3f}")
    _say(f"  sample before: {samples['before']!r}")
    _say(f"  sample after:  {samples['pretrained']!r}")
    job.report.check(
        "pretraining lowered the validation loss",
        losses["stories_after"] < losses["stories_before"],
        f"{losses['stories_before']:.3f} -> {losses['stories_after']:.3f}",
    )
    job.report.check(
        "tie held through the optimizer steps",
        model.head.weight is model.embed.weight and ms.ties() == {"head.weight": "embed.weight"},
    )


def _finetune(job: _Job) -> None:
    """Phase 2: freeze all but the last block, train it on dialogue, keep an EMA."""
    model, ms, losses, samples = job.model, job.ms, job.report.losses, job.report.samples
    last = len(model.blocks) - 1
    _say()
    _say(
        f"2. Fine-tuning the last block only, on questions and answers: {job.steps} steps, "
        "with an EMA"
    )
    ms.freeze().unfreeze(f"blocks.{last}.**")
    _say(f'  >>> ms.freeze().unfreeze("blocks.{last}.**")')
    _say(textwrap.indent(repr(ms), "  "))
    _say(
        f"  trainable: parameters {_count(ms.trainable_parameters())}, "
        f"state {_count(ms.trainable_state())}"
    )
    _say(
        f"  frozen:    parameters {_count(ms.frozen_parameters())}, "
        f"state {_count(ms.frozen_state())}"
    )
    _say(f"  (the frozen state is the BatchNorm statistics of blocks 0-{last - 1}: they stay put")
    _say("  in training mode, while those BatchNorms still normalise with batch statistics)")
    _say("  >>> ema = ms.clone()   # standalone: new tensors, same ties and frozen set")
    _say(f"  >>> ema.merge(ms, merges.ema({_EMA_DECAY}))   # after each optimizer step")
    frozen_params = _clones(ms.frozen_parameters())
    frozen_state = _clones(ms.frozen_state())
    trainable_state = _clones(ms.trainable_state())
    losses["dialogue_before"] = _val_loss(model, job.dialogue_val)
    samples["finetune_before"] = _sample(model, job.vocab, "Q: ", job.seed)
    ema = ms.clone()
    ema_start = _clones(ema.trainable_parameters())
    decay = merges.ema(_EMA_DECAY)
    optimizer = torch.optim.AdamW(ms.trainable_parameters().values(), lr=2e-3)
    _train(
        model,
        optimizer,
        job.dialogue,
        job.steps,
        job.generator,
        "fine-tune",
        after_step=lambda: ema.merge(ms, decay),
    )
    ema_model = copy.deepcopy(model)
    ModelState.new(ema_model).update(ema)
    losses["dialogue_after"] = _val_loss(model, job.dialogue_val)
    losses["dialogue_ema"] = _val_loss(ema_model, job.dialogue_val)
    losses["stories_after_finetune"] = _val_loss(model, job.stories_val)
    samples["finetuned"] = _sample(model, job.vocab, "Q: ", job.seed)
    _say(
        f"  validation loss: {losses['dialogue_before']:.3f} -> {losses['dialogue_after']:.3f}, "
        f"EMA {losses['dialogue_ema']:.3f}"
        f" (on stories: {losses['stories_after']:.3f} -> {losses['stories_after_finetune']:.3f})"
    )
    _say(f"  sample before: {samples['finetune_before']!r}")
    _say(f"  sample after:  {samples['finetuned']!r}")

    check = job.report.check
    check(
        "fine-tuning lowered the validation loss",
        losses["dialogue_after"] < losses["dialogue_before"],
        f"{losses['dialogue_before']:.3f} -> {losses['dialogue_after']:.3f}",
    )
    check(
        "frozen parameters unchanged by fine-tuning",
        _all_equal(ms.frozen_parameters(), frozen_params),
        f"{len(frozen_params)} tensors",
    )
    check(
        "frozen BatchNorm statistics kept, the last block's updated",
        _all_equal(ms.frozen_state(), frozen_state)
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


def _checkpoint(job: _Job, out_dir: str) -> None:
    """Phase 3: save, load into a freshly built model, and compare the two."""
    from torch_modelstate.io import load, save

    ms, report = job.ms, job.report
    _say()
    _say(
        "3. Checkpoint: save, then load into a freshly built model (untied, unfrozen, other values)"
    )
    path = os.path.join(out_dir, _CHECKPOINT)
    torch.manual_seed(job.seed + 1)
    fresh = _build(len(job.vocab))
    try:
        started = time.perf_counter()
        save(ms, path)
        save_ms = (time.perf_counter() - started) * 1000
        started = time.perf_counter()
        load(path, into=fresh)
        load_ms = (time.perf_counter() - started) * 1000
    except (ValueError, TypeError, KeyError, OSError) as error:
        detail = " ".join(str(error).split())
        report.check("checkpoint: save and load", False, f"{type(error).__name__}: {detail}")
        return
    report.checkpoint_bytes = os.path.getsize(path)
    stored = {**ms.parameters(), **ms.state()}  # each tied tensor once
    tensor_bytes = sum(t.numel() * t.element_size() for t in stored.values())
    _say(f"  >>> path = {path!r}")
    _say("  >>> save(ms, path)")
    _say("  >>> load(path, into=fresh).ties()")
    _say(f"  {ModelState.new(fresh).ties()}")
    _say(
        f"  {format_bytes(report.checkpoint_bytes)} on disk: {format_bytes(tensor_bytes)} of "
        f"tensors, the tied weight once, and a header"
    )
    _say(
        f"  with the keys, the ties and the frozen set; saved in {save_ms:.0f} ms, "
        f"loaded in {load_ms:.0f} ms"
    )
    _check_file(report, path, ms)
    _check_reload(report, job.model, fresh, ms, job.dialogue_val[0][:4])


def _check_file(report: Report, path: str, ms: ModelState) -> None:
    """A plain safetensors file that other tools read, with the tied weight stored once."""
    from safetensors import safe_open

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
    report: Report, model: TinyLM, fresh: TinyLM, ms: ModelState, probe: Tensor
) -> None:
    """The reloaded model equals the trained one in values, ties, flags and outputs."""
    fresh_ms = ModelState.new(fresh)
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
        kept = _clones(fresh_ms.frozen_state())
        fresh.train()
        fresh(probe)
    report.check(
        "reload: frozen statistics stay put in training mode",
        _all_equal(fresh_ms.frozen_state(), kept),
        f"{len(kept)} tensors",
    )


def _print_checks(report: Report, seconds: float) -> None:
    _say()
    _say("Checks")
    for check in report.checks:
        detail = f" ({check.detail})" if check.detail else ""
        _say(f"  {'PASS' if check.passed else 'FAIL'}  {check.what}{detail}")
    failed = [check.what for check in report.checks if not check.passed]
    if failed:
        _say(f"{len(failed)} of {len(report.checks)} checks FAILED in {seconds:.1f} s:")
        for what in failed:
            _say(f"  {what}")
    else:
        _say(f"All {len(report.checks)} checks passed in {seconds:.1f} s")


# --------------------------------------------------------------------------- command line


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        msg = f"expected a positive integer, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Define the ``demo`` options on `parser`: ``--steps``, ``--out`` and ``--seed``."""
    parser.add_argument(
        "--steps",
        type=_positive_int,
        default=None,
        metavar="N",
        help=f"optimizer steps for pretraining and again for fine-tuning (default {DEFAULT_STEPS})",
    )
    parser.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help=f"keep the checkpoint as DIR/{_CHECKPOINT} (default: a temporary directory)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, metavar="N", help="random seed, one run per seed (default 0)"
    )


def main(args: argparse.Namespace) -> int:
    """Run the demo with parsed `args`; 0 when every check passed, 1 when one failed.

    A bad ``--steps`` or an unusable ``--out`` is one line on stderr and exit status 2.
    """
    steps: int | None = getattr(args, "steps", None)
    out: str | None = getattr(args, "out", None)
    seed: int = getattr(args, "seed", 0)
    if steps is None:
        steps = DEFAULT_STEPS
    if steps < 1:
        print(f"{_PROG}: error: --steps must be a positive integer, got {steps}", file=sys.stderr)
        return 2
    if out is not None:
        try:
            os.makedirs(out, exist_ok=True)
        except OSError as error:
            reason = error.strerror or str(error)
            print(f"{_PROG}: error: cannot write to --out {out!r}: {reason}", file=sys.stderr)
            return 2
    started = time.perf_counter()
    with torch.random.fork_rng(devices=[]):  # leave the caller's random state as it was
        if out is not None:
            report = run(steps, seed, out)
        else:
            with tempfile.TemporaryDirectory(prefix="torch-modelstate-demo-") as tmp:
                report = run(steps, seed, tmp)
    _print_checks(report, time.perf_counter() - started)
    return 0 if report.passed else 1
