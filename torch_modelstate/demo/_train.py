"""The demo's training loop, validation loss and sampling (plain PyTorch)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torch_modelstate._progress import ProgressBar
from torch_modelstate.demo._model import CONTEXT, TinyLM
from torch_modelstate.demo._text import Corpus

__all__ = ["BATCH", "sample", "train", "val_loss"]

BATCH = 16
_TEMPERATURE = 0.5
_SAMPLE_CHARS = 60


@torch.no_grad()
def val_loss(model: nn.Module, data: tuple[Tensor, Tensor]) -> float:
    """Cross-entropy on fixed validation windows, in eval mode (the mode is restored)."""
    was_training = model.training
    model.eval()
    inputs, targets = data
    loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
    model.train(was_training)
    return float(loss)


def train(
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
    bar = ProgressBar(f"  {label:<9}", steps, unit="steps", width=24)
    model.train()
    smooth = math.nan
    for step in range(1, steps + 1):
        scale = min(1.0, step / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * step / steps)))
        for group, lr in zip(optimizer.param_groups, base_lrs, strict=True):
            group["lr"] = lr * scale
        inputs, targets = corpus.batch(BATCH, CONTEXT, generator)
        loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
        optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(loss)  # typed, unlike Tensor.backward
        optimizer.step()
        if after_step is not None:
            after_step()
        value = float(loss.detach())
        smooth = value if math.isnan(smooth) else 0.9 * smooth + 0.1 * value
        bar.update(step, note=f"loss {smooth:5.3f}")
    bar.close()
    for group, lr in zip(optimizer.param_groups, base_lrs, strict=True):
        group["lr"] = lr


@torch.no_grad()
def sample(model: TinyLM, vocab: Sequence[str], prompt: str, seed: int) -> str:
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
