"""Real clients: a transformers model, a Lightning module and a peft LoRA model, trained."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from models import tiny_gpt2
from torch import nn

import torch_modelstate as tms
from torch_modelstate import ModelState, optim


def lm_batch(step: int) -> torch.Tensor:
    return torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(step))


def lm_step(model: nn.Module, opt: torch.optim.Optimizer, step: int) -> None:
    ids = lm_batch(step)
    torch.manual_seed(step)  # dropout masks depend on the step only
    opt.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()


def snapshot(ms: ModelState) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in ms.parameters().items()}


def changed(ms: ModelState, before: dict[str, torch.Tensor]) -> set[str]:
    return {k for k, v in ms.parameters().items() if not torch.equal(v, before[k])}


def gradual_gpt2() -> tuple[nn.Module, ModelState, torch.optim.Optimizer]:
    """GPT-2 with only its last block trainable, AdamW without decay on biases and norms."""
    model = tiny_gpt2()
    ms = ModelState.new(model).freeze().unfreeze("transformer.h.1.**")
    rules = {optim.no_decay(model): {"weight_decay": 0.0}}
    opt = torch.optim.AdamW(ms.param_groups(rules, weight_decay=0.01), lr=1e-2)
    return model, ms, opt


def test_gpt2_gradual_unfreezing_trains_the_newly_unfrozen_block() -> None:
    """After unfreeze(optimizer=), block 0 moves; embeddings stay; a repeat adds nothing."""
    model, ms, opt = gradual_gpt2()
    assert [len(g["params"]) for g in opt.param_groups] == [8, 4]  # no-decay, decay
    for step in range(2):
        lm_step(model, opt, step)
    before = snapshot(ms)
    ms.unfreeze("transformer.h.0.**", optimizer=opt, lr=1e-3)
    ms.unfreeze("transformer.h.0.**", optimizer=opt, lr=1e-3)
    assert len(opt.param_groups) == 3
    new = opt.param_groups[2]
    assert new["lr"] == 1e-3 and new["weight_decay"] == 0.01  # the optimizer's defaults
    assert all(k.startswith("transformer.h.0.") for k in new["param_names"])
    for step in range(2, 4):
        lm_step(model, opt, step)
    moved = changed(ms, before)
    assert {k for k in ms.parameters() if k.startswith("transformer.h.0.")} <= moved
    assert "transformer.wte.weight" not in moved  # still frozen (and tied to lm_head)
    assert not any(k.startswith("transformer.h.0.") for k in opt.param_groups[0]["param_names"])


def test_gpt2_fine_tune_resumes_from_model_and_optimizer_files(tmp_path: Path) -> None:
    """Save mid-way after an unfreezing stage; a rebuilt run loads both files and matches."""
    model, ms, opt = gradual_gpt2()
    lm_step(model, opt, 0)
    ms.unfreeze("transformer.h.0.**", optimizer=opt, lr=1e-3)
    lm_step(model, opt, 1)
    tms.save(model, tmp_path / "model.safetensors")
    tms.save_optimizer(opt, model, tmp_path / "opt.safetensors")
    for step in range(2, 4):
        lm_step(model, opt, step)

    fresh, fresh_ms, fresh_opt = gradual_gpt2()
    fresh_ms.unfreeze("transformer.h.0.**", optimizer=fresh_opt, lr=1e-3)  # the same stage
    tms.load(tmp_path / "model.safetensors", into=fresh)
    tms.load_optimizer(fresh_opt, fresh, tmp_path / "opt.safetensors")
    for step in range(2, 4):
        lm_step(fresh, fresh_opt, step)
    for key, value in ms.parameters().items():
        assert torch.equal(value, fresh_ms.parameters()[key]), key


# ----------------------------------------------------------------------------- Lightning

pl = pytest.importorskip("pytorch_lightning")


class Regressor(pl.LightningModule):  # type: ignore[misc]
    """A small MLP whose first layer starts frozen."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 1))
        self.ms = ModelState.new(self.net).freeze("0.**")

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss: torch.Tensor = nn.functional.mse_loss(self.net(x), y)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        groups = self.ms.param_groups({optim.no_decay(self.net): {"weight_decay": 0.0}})
        return torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.01)


class UnfreezeAt(pl.Callback):  # type: ignore[misc]
    """Gradual unfreezing from a callback, through the live optimizer."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.before: dict[str, torch.Tensor] = {}

    def on_train_batch_start(self, trainer: Any, module: Regressor, batch: Any, i: int) -> None:
        if trainer.global_step == self.step and not self.before:
            self.before = snapshot(module.ms)
            module.ms.unfreeze("0.**", optimizer=trainer.optimizers[0], lr=1e-3)


@pytest.mark.filterwarnings(
    r"ignore:`isinstance\(treespec, LeafSpec\)` is deprecated:FutureWarning"
)
def test_lightning_module_unfreezes_a_layer_mid_training() -> None:
    """Trainer.fit with a callback that unfreezes layer 0: it joins the optimizer and moves."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=g)
    data = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    module = Regressor()
    callback = UnfreezeAt(step=2)
    trainer = pl.Trainer(
        max_steps=6,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
    )
    trainer.fit(module, loader)
    opt = trainer.optimizers[0]
    assert len(opt.param_groups) == 3
    assert opt.param_groups[2]["param_names"] == ["0.weight", "0.bias"]
    moved = changed(module.ms, callback.before)
    assert {"0.weight", "0.bias", "3.weight"} <= moved
    assert not module.ms.frozen_parameters()


# ----------------------------------------------------------------------------- peft


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_peft_lora_param_groups_hold_only_the_adapters() -> None:
    """peft freezes the base model; param_groups gives A and B their own learning rates."""
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True)
    model = peft.get_peft_model(tiny_gpt2(), config)
    ms = ModelState.new(model)
    groups = ms.param_groups({"**.lora_A.**": {"lr": 1e-3}, "**.lora_B.**": {"lr": 1e-2}})
    assert [g["lr"] for g in groups] == [1e-3, 1e-2]
    assert all(".lora_A." in k for k in groups[0]["param_names"])
    assert all(".lora_B." in k for k in groups[1]["param_names"])
    assert sum(len(g["params"]) for g in groups) == len(ms.trainable_parameters()) == 4
    opt = torch.optim.AdamW(groups)
    before = snapshot(ms)
    lm_step(model, opt, 0)
    moved = changed(ms, before)
    assert moved and all(".lora_" in k for k in moved)
