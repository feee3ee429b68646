"""Small real-client models shared by tests (built from configs: no downloads)."""

from __future__ import annotations

import pytest
import torch
from torch import nn


def tiny_gpt2(seed: int = 0) -> nn.Module:
    """A two-block GPT-2 whose output projection is tied to its token embedding."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=100,
        n_positions=32,
        bos_token_id=0,  # the default 50256 lies outside this vocabulary
        eos_token_id=0,
    )
    torch.manual_seed(seed)
    model: nn.Module = transformers.GPT2LMHeadModel(config)
    return model
