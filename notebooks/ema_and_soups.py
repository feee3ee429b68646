# %% [markdown]
# # EMA and model soups
#
# Averaging weights is one in-place `merge` with `torch_modelstate`:
#
# - an **EMA** (exponential moving average) of a model trained in bfloat16, kept in a float32
#   shadow made by `ms.clone(dtype=torch.float32)`, because an EMA kept in bfloat16 stalls;
# - **soups** (averages of fine-tunes) and **task arithmetic** (adding the weight change of one
#   fine-tune to another model) with `merges.lerp`, `merges.sub` and `merges.add`;
# - **interpolation curves**: accuracy along the straight line between two fine-tunes;
# - the command line's `merge`, which averages checkpoint files tensor by tensor.
#
# Every merge runs as grouped in-place `torch._foreach_*` kernels, without a Python loop per
# tensor. All data is made below; everything runs on the CPU in seconds.

# %%
import copy
import os
import subprocess
import sys
import tempfile

import matplotlib.pyplot as plt
import torch
from torch import nn

import torch_modelstate as tms
from torch_modelstate import ModelState, merges

plt.rcParams.update({"figure.dpi": 80, "figure.figsize": (6.4, 3.6)})
torch.manual_seed(0)
torch.set_num_threads(1)  # models this small run fastest on one thread

# %% [markdown]
# ## Two tasks, one model
#
# Inputs are 16-dimensional; a fixed random teacher gives each input a label for task A and
# one for task B (4 classes each). The model has 8 outputs: the first 4 answer task A, the last
# 4 task B.

# %%
D_IN = 16
teacher = torch.randn(D_IN, 8)
readouts = {"A": torch.randn(8, 4), "B": torch.randn(8, 4)}
SLICES = {"A": slice(0, 4), "B": slice(4, 8)}


def make_data(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D_IN, generator=g)
    h = torch.tanh(x @ teacher)
    return x, {task: (h @ r).argmax(dim=1) for task, r in readouts.items()}


train_set, test_set = make_data(4096, 1), make_data(2048, 2)


def make_model():
    return nn.Sequential(
        nn.Linear(D_IN, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)
    )


def loss_on(model, x, y, tasks):
    out = model(x)
    return sum(nn.functional.cross_entropy(out[:, SLICES[t]], y[t]) for t in tasks)


def train(model, tasks, steps, *, lr=3e-3, seed=0, on_step=None):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    x, y = train_set
    for step in range(steps):
        idx = torch.randint(0, len(x), (128,), generator=g)
        dtype = next(model.parameters()).dtype
        loss = loss_on(model, x[idx].to(dtype), {t: v[idx] for t, v in y.items()}, tasks)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if on_step is not None:
            on_step(step)
    return model


@torch.no_grad()
def accuracy(model, task):
    x, y = test_set
    dtype = next(model.parameters()).dtype
    out = model(x.to(dtype))[:, SLICES[task]]
    return (out.argmax(dim=1) == y[task]).float().mean().item()


# %% [markdown]
# ## An fp32 EMA shadow of a bf16 model
#
# The model trains in bfloat16. An EMA with decay 0.999 moves each weight by 0.1% of its
# distance to the model per step; in bfloat16 (8 bits of mantissa) that change usually rounds
# away, and the EMA stays where it started. Three shadows follow the same training run:
#
# - `ms.clone()`: a bfloat16 copy, updated with `merges.ema(0.999)`;
# - `ms.clone(dtype=torch.float32)`: a float32 copy (integer buffers would keep their dtype);
# - the bfloat16 copy again, with `merges.ema(0.999, rounding="stochastic")`, which rounds up
#   or down at random in proportion, so the average is right in expectation.

# %%
bf16_model = make_model().to(torch.bfloat16)
ms = ModelState.new(bf16_model)
start = {k: v.float().clone() for k, v in ms.parameters().items()}
shadows = {
    "bf16 EMA": (ms.clone(), merges.ema(0.999)),
    "fp32 EMA (clone(dtype=torch.float32))": (ms.clone(dtype=torch.float32), merges.ema(0.999)),
    "bf16 EMA, stochastic rounding": (
        ms.clone(),
        merges.ema(0.999, rounding="stochastic", generator=torch.Generator().manual_seed(0)),
    ),
}
print({name: str(next(iter(s.parameters().values())).dtype) for name, (s, _) in shadows.items()})


def distance_moved(state):
    return (
        sum((v.float() - start[k]).norm() ** 2 for k, v in state.parameters().items()).sqrt().item()
    )


moved = {name: [] for name in [*shadows, "model"]}


def ema_step(step):
    for name, (shadow, fun) in shadows.items():
        shadow.merge(ms, fun)  # in place: lhs = decay * lhs + (1 - decay) * rhs
        if step % 10 == 0:
            moved[name].append(distance_moved(shadow))
    if step % 10 == 0:
        moved["model"].append(distance_moved(ms))


train(bf16_model, ["A", "B"], 1000, lr=1e-3, on_step=ema_step)

fig, ax = plt.subplots()
steps = range(0, 1000, 10)
for name, values in moved.items():
    style = {"model": "--", "bf16 EMA, stochastic rounding": ":"}.get(name, "-")
    ax.plot(steps, values, label=name, ls=style, lw=2.5 if style == ":" else 1.5)
ax.set(
    xlabel="step",
    ylabel="distance from the starting weights",
    title="EMA with decay 0.999 of a bf16 model",
)
ax.legend(loc="upper left")
plt.show()

# %% [markdown]
# The bfloat16 EMA falls far behind: most of each step's small change rounds away. The float32
# shadow follows the model at the pace an EMA should, and the stochastically rounded bfloat16
# one (dotted) lies on top of it, in half the memory. To use the fp32 shadow, copy it
# into a model: `update` casts to each destination's dtype.

# %%
evaluated = make_model()  # float32
for name, (shadow, _) in shadows.items():
    ModelState.new(evaluated).update(shadow)
    print(f"{name:40} accuracy A {accuracy(evaluated, 'A'):.3f}  B {accuracy(evaluated, 'B'):.3f}")
name, m = "the bf16 model itself", bf16_model
print(f"{name:40} accuracy A {accuracy(m, 'A'):.3f}  B {accuracy(m, 'B'):.3f}")

# %% [markdown]
# ## Fine-tunes, soups and task arithmetic
#
# A base model is trained briefly on both tasks; from it, two fine-tunes on task A (different
# data order) and one on task B.

# %%
torch.manual_seed(3)
base = train(make_model(), ["A", "B"], 30)
ft_a = train(copy.deepcopy(base), ["A"], 600, seed=1)
ft_a2 = train(copy.deepcopy(base), ["A"], 600, seed=2)
ft_b = train(copy.deepcopy(base), ["B"], 600, seed=3)
for name, m in {
    "base": base,
    "fine-tuned on A": ft_a,
    "fine-tuned on A (2)": ft_a2,
    "fine-tuned on B": ft_b,
}.items():
    print(f"{name:20} accuracy A {accuracy(m, 'A'):.3f}  B {accuracy(m, 'B'):.3f}")

# %% [markdown]
# An interpolation `lerp(t)` between two models gives `lhs + t * (rhs - lhs)`. Between the two
# fine-tunes of task A the accuracy stays up all along the line (they sit in one basin); between
# the fine-tunes of A and of B it trades one task for the other. `merges.slerp` interpolates
# each tensor along the sphere instead.

# %%
ts = torch.linspace(0, 1, 11).tolist()


def along(lhs, rhs, make_merge):
    accs = {"A": [], "B": []}
    point = make_model()
    for t in ts:
        ModelState.new(point).update(ModelState.new(lhs)).merge(ModelState.new(rhs), make_merge(t))
        for task in accs:
            accs[task].append(accuracy(point, task))
    return accs


a_to_a2 = along(ft_a, ft_a2, merges.lerp)
a_to_b = along(ft_a, ft_b, merges.lerp)
a_to_b_slerp = along(ft_a, ft_b, merges.slerp)

fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
axes[0].plot(ts, a_to_a2["A"], "o-", label="task A")
axes[0].set(title="A -> A (2): two fine-tunes of one task", xlabel="t", ylabel="test accuracy")
axes[1].plot(ts, a_to_b["A"], "o-", label="task A, lerp")
axes[1].plot(ts, a_to_b["B"], "o-", label="task B, lerp")
axes[1].plot(ts, a_to_b_slerp["A"], "x--", color="tab:blue", label="task A, slerp")
axes[1].plot(ts, a_to_b_slerp["B"], "x--", color="tab:orange", label="task B, slerp")
axes[1].set(title="A -> B: fine-tunes of two tasks", xlabel="t")
for ax in axes:
    ax.legend(loc="lower center")
fig.tight_layout()
plt.show()

# %% [markdown]
# **Task arithmetic**: the task vector of a fine-tune is its weight change,
# `tau = finetuned - base` (`merges.sub`). Adding both task vectors to the base
# (`merges.add(alpha)`) makes one model for both tasks; `alpha` scales the vectors (at
# `alpha=0.5` it is the soup of the two fine-tunes). It beats the base on both tasks, though
# not either specialist on its own task.

# %%
base_ms = ModelState.new(base)
tau_a = ModelState.new(ft_a).clone().merge(base_ms, merges.sub())  # ft_a - base
tau_b = ModelState.new(ft_b).clone().merge(base_ms, merges.sub())

alphas = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5]
arith = {"A": [], "B": []}
multi = make_model()
for alpha in alphas:
    state = ModelState.new(multi).update(base_ms)
    state.merge(tau_a, merges.add(alpha)).merge(tau_b, merges.add(alpha))
    for task in arith:
        arith[task].append(accuracy(multi, task))

soup = ModelState.new(ft_a).clone().merge(ModelState.new(ft_b), merges.lerp(0.5))
soup_model = make_model()
ModelState.new(soup_model).update(soup)

fig, ax = plt.subplots()
ax.plot(alphas, arith["A"], "o-", label="task A")
ax.plot(alphas, arith["B"], "o-", label="task B")
ax.axhline(accuracy(ft_a, "A"), color="tab:blue", ls=":", label="fine-tuned on A, task A")
ax.axhline(accuracy(ft_b, "B"), color="tab:orange", ls=":", label="fine-tuned on B, task B")
ax.set(xlabel="alpha", ylabel="test accuracy", title="base + alpha * (tau_A + tau_B)")
ax.legend(loc="lower right")
plt.show()
acc_a, acc_b = accuracy(soup_model, "A"), accuracy(soup_model, "B")
print(f"soup of A and B (lerp 0.5): accuracy A {acc_a:.3f}  B {acc_b:.3f}")

# %% [markdown]
# ## The same soup from the command line
#
# `torch-modelstate merge` averages checkpoint files tensor by tensor, with bounded memory,
# after checking that their keys, shapes and dtypes agree (in a terminal:
# `torch-modelstate merge a.safetensors b.safetensors -o soup.safetensors`). Here it runs as
# a subprocess of this kernel's Python.

# %%
workdir = tempfile.mkdtemp()
paths = {name: os.path.join(workdir, f"{name}.safetensors") for name in ["ft_a", "ft_b", "soup"]}
tms.save(ft_a, paths["ft_a"])
tms.save(ft_b, paths["ft_b"])
cmd = [
    sys.executable,
    "-m",
    "torch_modelstate",
    "merge",
    paths["ft_a"],
    paths["ft_b"],
    "-o",
    paths["soup"],
]
done = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=workdir)
print("$ torch-modelstate merge ft_a.safetensors ft_b.safetensors -o soup.safetensors")
print((done.stderr + done.stdout).replace(workdir + os.sep, "").strip())  # the bar, then the result

from_cli = tms.load(paths["soup"])
diff = max((from_cli.to_dict()[k] - v).abs().max().item() for k, v in soup.to_dict().items())
print(f"largest difference from soup = lerp(0.5) in memory: {diff:.2e}")
assert diff < 1e-6

# %%
done = subprocess.run(
    [sys.executable, "-m", "torch_modelstate", "inspect", paths["soup"]],
    capture_output=True,
    text=True,
    check=True,
    cwd=workdir,
)
print(done.stdout.replace(workdir + os.sep, ""))
