# %% [markdown]
# # Fine-tuning with freezing
#
# A small classifier is pretrained on one synthetic task, then fine-tuned on a second one in
# three ways: everything trainable, a frozen backbone (BatchNorm included), and gradual
# unfreezing, where the optimizer gains each newly thawed block as a param group of its own.
#
# What `torch_modelstate` does here:
#
# - `ms.freeze("backbone.**")` freezes by path, parameters and BatchNorm statistics alike;
# - a frozen BatchNorm keeps its running statistics through training-mode forward passes,
#   whatever `.train()` its parent calls;
# - `ms.param_groups(...)` builds optimizer groups by mask (no weight decay on norms and biases);
# - `ms.unfreeze(mask, optimizer=opt, ...)` thaws a block and adds exactly its parameters to
#   the optimizer, once.
#
# Everything runs on the CPU in a few seconds, on data made below.

# %%
from collections import OrderedDict

import matplotlib.pyplot as plt
import torch
from torch import nn

import torch_modelstate as tms
from torch_modelstate import ModelState

plt.rcParams.update({"figure.dpi": 80, "figure.figsize": (6.4, 3.6)})
torch.manual_seed(0)
torch.set_num_threads(1)  # models this small run fastest on one thread

# %% [markdown]
# ## Two related tasks
#
# Inputs are 16-dimensional. A fixed random "teacher" maps them to 32 hidden features; task A
# labels an input by one linear readout of those features (4 classes), task B by another one
# (3 classes), and task B's inputs are shifted and scaled, so a BatchNorm that keeps learning
# would drift away from the statistics it learned on task A.

# %%
D_IN, D_HIDDEN = 16, 32
teacher = torch.randn(D_IN, D_HIDDEN)
readout = {"A": torch.randn(D_HIDDEN, 4), "B": torch.randn(D_HIDDEN, 3)}
shift = {"A": (0.0, 1.0), "B": (1.5, 2.0)}  # (mean, scale) of the inputs


def make_data(task: str, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mean, scale = shift[task]
    x = torch.randn(n, D_IN, generator=g) * scale + mean
    features = torch.tanh(((x - mean) / scale) @ teacher)
    return x, (features @ readout[task]).argmax(dim=1)


train_a, test_a = make_data("A", 4096, 1), make_data("A", 1024, 2)
train_b, test_b = make_data("B", 512, 3), make_data("B", 1024, 4)  # little data for task B
print("task A classes:", train_a[1].bincount().tolist(), "task B:", train_b[1].bincount().tolist())

# %% [markdown]
# ## The model and its pretraining
#
# A backbone of two `Linear -> BatchNorm1d -> ReLU` blocks and a linear head. Keys are
# `state_dict()` keys, such as `backbone.block1.norm.running_mean`.


# %%
def block(d_in: int, d_out: int) -> nn.Sequential:
    layers = [
        ("linear", nn.Linear(d_in, d_out)),
        ("norm", nn.BatchNorm1d(d_out)),
        ("act", nn.ReLU()),
    ]
    return nn.Sequential(OrderedDict(layers))


def make_model(n_classes: int) -> nn.Sequential:
    backbone = nn.Sequential(OrderedDict([("block0", block(D_IN, 64)), ("block1", block(64, 64))]))
    return nn.Sequential(OrderedDict([("backbone", backbone), ("head", nn.Linear(64, n_classes))]))


def accuracy(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> float:
    model.eval()
    with torch.no_grad():
        acc = (model(data[0]).argmax(dim=1) == data[1]).float().mean().item()
    model.train()
    return acc


def train(model, opt, data, steps, *, batch=128, seed=0, on_step=None):
    """Plain training loop; returns the loss per step."""
    g = torch.Generator().manual_seed(seed)
    x, y = data
    losses = []
    for step in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=g)
        model.train()  # a parent's .train() every step, as Lightning and most loops do
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step)
    return losses


pretrained = make_model(4)
pre_losses = train(pretrained, torch.optim.AdamW(pretrained.parameters(), lr=3e-3), train_a, 400)
print(f"task A accuracy after pretraining: {accuracy(pretrained, test_a):.3f}")
print(ModelState.new(pretrained))

# %% [markdown]
# For task B the head is replaced (3 classes instead of 4); the backbone keeps what it learned.


# %%
def start_task_b() -> nn.Sequential:
    torch.manual_seed(1)
    model = make_model(3)
    model.backbone.load_state_dict(pretrained.backbone.state_dict())
    return model


NO_DECAY = tms.optim.no_decay(start_task_b())  # biases and norm weights, found by module type
RULES = {NO_DECAY: {"weight_decay": 0.0}}
groups = ModelState.new(start_task_b()).param_groups(RULES)
for group in groups:
    print(group.get("weight_decay", "default"), group["param_names"])
globs = ("**.bias", "backbone.*.norm.weight")  # a tuple of masks: any of them
same = ModelState.new(start_task_b()).param_groups({globs: {"weight_decay": 0.0}})
print(
    "the same groups from globs:",
    [g["param_names"] for g in same] == [g["param_names"] for g in groups],
)

# %% [markdown]
# `param_groups` takes rules of masks in order: the first rule that selects a parameter
# decides its group, and the rest fall into a last group with the optimizer's defaults
# (`weight_decay=0.05` below). Only trainable parameters are grouped. `tms.optim.no_decay`
# is the usual "no weight decay on biases and norms" mask; globs over keys say the same.
#
# ## Three ways to fine-tune

# %%
STEPS = 300
STAGES = [0, 100, 200]  # gradual unfreezing: head, then block1, then block0
stats_key = "backbone.block0.norm.running_mean"
runs: dict[str, dict] = {}


def run(name, model, ms, opt, on_step=None):
    start = ms.to_dict()[stats_key].clone()
    drift, trainable = [], []

    stats = ms.to_dict()[stats_key]  # the live buffer: it changes in place when it changes

    def record(step):
        drift.append((stats - start).norm().item())
        trainable.append(sum(t.numel() for t in ms.trainable_parameters().values()))
        if on_step is not None:
            on_step(step)

    losses = train(model, opt, train_b, STEPS, seed=5, on_step=record)
    runs[name] = {
        "loss": losses,
        "drift": drift,
        "trainable": trainable,
        "acc": accuracy(model, test_b),
    }


# 1. full fine-tuning: everything trains, the BatchNorm statistics follow task B's inputs
full = start_task_b()
ms_full = ModelState.new(full)
run(
    "full",
    full,
    ms_full,
    torch.optim.AdamW(ms_full.param_groups(RULES), lr=3e-3, weight_decay=0.05),
)

# 2. frozen backbone: one call freezes its parameters and its BatchNorm statistics
frozen = start_task_b()
ms_frozen = ModelState.new(frozen).freeze("backbone.**")
opt = torch.optim.AdamW(ms_frozen.param_groups(RULES), lr=3e-3, weight_decay=0.05)
run("frozen backbone", frozen, ms_frozen, opt)

# 3. gradual unfreezing: the head first, then block1, then block0, each with a smaller lr
gradual = start_task_b()
ms_gradual = ModelState.new(gradual).freeze("backbone.**")
opt = torch.optim.AdamW(ms_gradual.param_groups(RULES), lr=3e-3, weight_decay=0.05)


def thaw(step):
    if step + 1 in STAGES[1:]:
        name = "block1" if step + 1 == STAGES[1] else "block0"
        lr = 1e-3 if name == "block1" else 3e-4
        stage = f"backbone.{name}.**"  # two groups per stage: weights, then biases and norms
        ms_gradual.unfreeze(
            tms.all_of(stage, tms.not_(NO_DECAY)), optimizer=opt, lr=lr, weight_decay=0.05
        )
        ms_gradual.unfreeze(tms.all_of(stage, NO_DECAY), optimizer=opt, lr=lr, weight_decay=0.0)


run("gradual", gradual, ms_gradual, opt, on_step=thaw)
for group in opt.param_groups:
    print(f"lr={group['lr']:<6} weight_decay={group['weight_decay']:<4}", group.get("param_names"))

# %% [markdown]
# The optimizer of the gradual run ends with one group per (stage, decay) pair. Calling
# `unfreeze(..., optimizer=opt)` again for a block it already holds adds nothing:

# %%
before = [len(g["params"]) for g in opt.param_groups]
ms_gradual.unfreeze("backbone.block1.**", optimizer=opt, lr=1e-3)
assert [len(g["params"]) for g in opt.param_groups] == before
print("param groups unchanged:", before)

# %% [markdown]
# ## Results

# %%
fig, ax = plt.subplots()
smooth = 10
for name, r in runs.items():
    loss = torch.tensor(r["loss"])
    ax.plot(loss.unfold(0, smooth, 1).mean(dim=1), label=f"{name} (test accuracy {r['acc']:.2f})")
for s in STAGES[1:]:
    ax.axvline(s, color="grey", lw=0.8, ls=":")
ax.set(xlabel="step", ylabel=f"training loss on task B (mean of {smooth})", yscale="log")
ax.set_title("Fine-tuning: full vs frozen backbone vs gradual unfreezing")
ax.legend()
plt.show()

# %%
fig, ax = plt.subplots(figsize=(6.4, 3.0))
counts = [runs["gradual"]["trainable"][s] for s in STAGES]
labels = ["head", "+ block1", "+ block0"]
bars = ax.bar(labels, counts, color=["tab:green", "tab:olive", "tab:orange"])
ax.bar_label(bars)
ax.axhline(runs["full"]["trainable"][0], color="tab:blue", ls="--", label="full fine-tuning")
ax.set(ylabel="trainable parameters", title="Gradual unfreezing: trainable parameters per stage")
ax.legend(loc="upper left")
plt.show()

# %%
fig, ax = plt.subplots()
for name, r in runs.items():
    ax.plot(r["drift"], label=name)
for s in STAGES[1:]:
    ax.axvline(s, color="grey", lw=0.8, ls=":")
ax.set(
    xlabel="step", ylabel="|running_mean - pretrained|", title=f"BatchNorm statistics: {stats_key}"
)
ax.legend()
plt.show()

# %% [markdown]
# The frozen backbone's BatchNorm never moves, although every step calls `model.train()`: the
# frozen statistics are kept by the module itself, not by its training flag. In the gradual
# run they stay put until `block0` is thawed at step 200. During those frozen steps the
# BatchNorm still normalised each batch with that batch's statistics, exactly as an unfrozen
# one does; only its running statistics were kept.

# %%
for name, r in runs.items():
    print(f"{name:16} test accuracy on task B {r['acc']:.3f}, BatchNorm drift {r['drift'][-1]:.3f}")
assert runs["frozen backbone"]["drift"][-1] == 0.0
assert max(runs["gradual"]["drift"][: STAGES[2] - 1]) == 0.0
assert runs["full"]["drift"][-1] > 0.1
