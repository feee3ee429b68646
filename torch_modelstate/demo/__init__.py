"""The ``demo`` command: the whole library on one small job, checked end to end.

``torch-modelstate demo`` trains a tiny character-level transformer whose output head is
tied to its input embedding, fine-tunes only its last block on text of another style while
keeping an exponential moving average (EMA) of the weights, saves a checkpoint, loads it
into a freshly built model and checks that nothing was lost. It uses only the public API
(``import torch_modelstate as tms``), the way a user would:

- ``tms.ModelState.new(model).tie("head.weight", "embed.weight")``: one ``Parameter``
  under two names, so the optimizer, the EMA and the checkpoint each see it once;
- ``ms.freeze().unfreeze("blocks.2.**")``: a glob mask; the frozen blocks' BatchNorm
  statistics stay put through training-mode forward passes;
- ``AdamW(ms.trainable_parameters().values())``, and
  ``ema.merge(ms, tms.merges.ema(0.99))`` into a standalone ``ms.clone()`` after each step;
- ``tms.save(ms, path)``, then ``tms.load(path, into=fresh_model)``.

The text comes from two tiny grammars (`make_texts`), so the demo needs no downloads, and
one seed gives one run. Progress bars go to stderr, the report to stdout; its
``PASS``/``FAIL`` lines decide the exit status.

>>> import torch_modelstate as tms
>>> model = TinyLM(vocab_size=12, dim=16, n_blocks=2, n_heads=2, context=8)
>>> ms = tms.ModelState.new(model).tie("head.weight", "embed.weight")
>>> ms.ties(), model.head.weight is model.embed.weight
({'head.weight': 'embed.weight'}, True)
>>> ms.freeze().unfreeze("blocks.1.**")  # everything but the last block is frozen
ModelState<...>
>>> sorted(key.split(".")[-1] for key in ms.trainable_state())  # its BatchNorm's statistics
['num_batches_tracked', 'running_mean', 'running_var']
"""

from __future__ import annotations

import tempfile
import textwrap
import time

import torch

import torch_modelstate as tms
from torch_modelstate.demo._checkpoint import CHECKPOINT, checkpoint
from torch_modelstate.demo._model import BLOCKS, CONTEXT, WIDTH, TinyLM, build
from torch_modelstate.demo._phases import Job, finetune, pretrain
from torch_modelstate.demo._report import Check, Report, print_checks, say
from torch_modelstate.demo._text import Corpus, make_texts

__all__ = ["CHECKPOINT", "DEFAULT_STEPS", "Check", "Report", "TinyLM", "main", "make_texts", "run"]

DEFAULT_STEPS = 300  # optimizer steps in each of the two phases


def run(steps: int, seed: int, out_dir: str) -> Report:
    """Run the demo, printing as it goes; returns what it measured and checked.

    `steps` optimizer steps pretrain the model and as many fine-tune it; the checkpoint is
    written to `out_dir` (which must exist) as `CHECKPOINT`.
    """
    stories_text, dialogue_text = make_texts(seed)
    vocab = sorted(set(stories_text + dialogue_text))
    stories, dialogue = Corpus(stories_text, vocab), Corpus(dialogue_text, vocab)
    torch.manual_seed(seed)
    model = build(len(vocab))
    say("torch-modelstate demo: a tiny language model, tied, frozen, averaged, saved, reloaded")
    say()
    say(
        f"Text: {tms.format_bytes(len(stories_text.encode()))} of short stories "
        f"(some followed by a question and its answer)"
    )
    say(
        f"  and {tms.format_bytes(len(dialogue_text.encode()))} of questions and answers, "
        f"from two tiny grammars (seed {seed}); {len(vocab)} characters"
    )
    say(
        f"Model: a character-level transformer, {BLOCKS} blocks of width {WIDTH}, "
        f"context {CONTEXT}, with LayerNorm"
    )
    say("  and BatchNorm; its head and its embedding are separate nn.Modules, tied here:")
    ms = tms.ModelState.new(model).tie("head.weight", "embed.weight")
    say('  >>> ms = tms.ModelState.new(model).tie("head.weight", "embed.weight")')
    say(f"  >>> ms.ties()\n  {ms.ties()}")
    say(textwrap.indent(repr(ms), "  "))
    job = Job(
        steps=steps,
        seed=seed,
        vocab=vocab,
        stories=stories,
        dialogue=dialogue,
        stories_val=stories.val_windows(64, CONTEXT),
        dialogue_val=dialogue.val_windows(64, CONTEXT),
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
    pretrain(job)
    finetune(job)
    checkpoint(job, out_dir)
    return job.report


def main(*, steps: int = DEFAULT_STEPS, seed: int = 0, out: str | None = None) -> int:
    """Run the demo and print its checks; 0 when every check passed, 1 when one failed.

    `out` is an existing directory to keep the checkpoint in (default: a temporary one,
    removed afterwards). The caller's torch random state is left as it was.
    """
    if steps < 1:
        msg = f"`steps` must be a positive integer, got {steps}"
        raise ValueError(msg)
    started = time.perf_counter()
    with torch.random.fork_rng(devices=[]):  # leave the caller's random state as it was
        if out is not None:
            report = run(steps, seed, out)
        else:
            with tempfile.TemporaryDirectory(prefix="torch-modelstate-demo-") as tmp:
                report = run(steps, seed, tmp)
    print_checks(report, time.perf_counter() - started)
    return 0 if report.passed else 1
