# %% [markdown]
# # A tied language model
#
# Weight tying shares one tensor between two places of a model: a language model's output
# head and its input embedding, or a decoder and the transpose of its encoder. This notebook
# shows both kinds of tie that `torch_modelstate` knows:
#
# - an **identity tie**: the destination *is* the source's `nn.Parameter`, one tensor under two
#   keys (what Hugging Face models do with `tie_word_embeddings`);
# - a **transform tie**: the destination is computed from the source on every access (here its
#   transpose), holds no storage of its own, and its key stays in `state_dict()`.
#
# It finds the tie in a GPT-2 built from a config (no download), saves the model once, loads
# it back with `from_pretrained`, follows the gradient to the source, and unties.

# %%
import copy
import os
import tempfile
import warnings

os.environ["HF_HUB_OFFLINE"] = "1"  # everything here is built locally: never reach a hub
# transformers' progress bars want ipywidgets in a notebook; we show none, so say nothing
warnings.filterwarnings("ignore", message="IProgress not found")

import matplotlib.pyplot as plt
import safetensors.torch
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.utils import logging as hf_logging

import torch_modelstate as tms
from torch_modelstate import ModelState

hf_logging.disable_progress_bar()
hf_logging.set_verbosity_error()  # keep the notebook's output to what it shows
plt.rcParams.update({"figure.dpi": 80, "figure.figsize": (6.4, 3.6)})
torch.manual_seed(0)
torch.set_num_threads(1)  # models this small run fastest on one thread

# %% [markdown]
# ## What `ties()` finds in a Hugging Face model
#
# A small GPT-2, built from a config. Its `lm_head.weight` is tied to the token embedding
# `transformer.wte.weight` by `transformers` itself; `ties()` finds it (the later key in module
# order is the destination).

# %%
config = GPT2Config(
    vocab_size=2048, n_positions=64, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0
)
model = GPT2LMHeadModel(config)
ms = ModelState.new(model)
print("ties:", ms.ties())
print("one Parameter:", model.lm_head.weight is model.transformer.wte.weight)
print(ms)

# %% [markdown]
# Accessors list each tied tensor once, under its source key, so an optimizer built from
# `ms.trainable_parameters()` sees it once; `to_dict()` lists every key, like `state_dict()`.

# %%
print("lm_head.weight in parameters():", "lm_head.weight" in ms.parameters())
print("lm_head.weight in to_dict():   ", "lm_head.weight" in ms.to_dict())
opt = torch.optim.AdamW(ms.trainable_parameters().values(), lr=1e-3)
print("tensors the optimizer holds:", sum(len(g["params"]) for g in opt.param_groups))

# %% [markdown]
# ## Saving once, loading with `from_pretrained`
#
# `safetensors.torch.save_file` refuses a state dict whose tensors share memory. `tms.save`
# stores tied data once, under the source key, and records the tie in the file's metadata; the
# file stays a plain safetensors file, which `transformers` loads like its own.

# %%
workdir = tempfile.mkdtemp()
try:
    safetensors.torch.save_file(model.state_dict(), os.path.join(workdir, "plain.safetensors"))
except RuntimeError as e:
    print("save_file:", str(e).strip().splitlines()[0])

config.save_pretrained(workdir)  # config.json
tms.save(model, os.path.join(workdir, "model.safetensors"))  # the weights, tied data once
print(sorted(os.listdir(workdir)))

loaded = GPT2LMHeadModel.from_pretrained(workdir)
ids = torch.randint(0, config.vocab_size, (2, 32))
model.eval()
loaded.eval()
with torch.no_grad():
    same = torch.equal(model(ids).logits, loaded(ids).logits)
print(
    "from_pretrained: same logits:",
    same,
    "| tied:",
    loaded.lm_head.weight is loaded.transformer.wte.weight,
)

again = tms.load(workdir + "/model.safetensors")  # or a standalone state: values and ties
print("tms.load ties:", again.ties())

# %% [markdown]
# ## A transform tie: a decoder that is its encoder's transpose
#
# A tied autoencoder: `decoder.weight` is `encoder.weight.T`. The tie is made by name
# (`"transpose"` is registered, so checkpoints can record it); the destination keeps its key.

# %%
autoencoder = nn.Sequential()
autoencoder.add_module("encoder", nn.Linear(64, 8, bias=False))
autoencoder.add_module("act", nn.Tanh())
autoencoder.add_module("decoder", nn.Linear(8, 64, bias=False))
ae = ModelState.new(autoencoder)
ae.tie("decoder.weight", "encoder.weight", transform="transpose")
print("ties:", ae.ties(), "transforms:", ae.transforms())
print("parameters():", list(ae.parameters()), "| state_dict():", list(autoencoder.state_dict()))
print(
    "decoder.weight equals encoder.weight.T:",
    torch.equal(autoencoder.decoder.weight, autoencoder.encoder.weight.T),
)

# %% [markdown]
# The tie holds through what usually breaks one: a deep copy follows its own source, and
# `.to(dtype)` keeps computing the destination from the converted source.

# %%
twin = copy.deepcopy(autoencoder)
with torch.no_grad():
    twin.encoder.weight.mul_(2)
print("deepcopy follows its own source:", torch.equal(twin.decoder.weight, twin.encoder.weight.T))
double = copy.deepcopy(autoencoder).to(torch.float64)
print(
    "after .to(float64):",
    double.decoder.weight.dtype,
    torch.equal(double.decoder.weight, double.encoder.weight.T),
)

# %% [markdown]
# ## The gradient reaches the source
#
# With a tie, the source's gradient is the sum of what both uses contribute. We check it
# against untied copies of the same models, whose two gradients we add by hand: for the GPT-2,
# `grad(wte) + grad(lm_head)`; for the autoencoder, `grad(encoder) + grad(decoder).T`.

# %%
x = torch.randn(256, 64)


def lm_loss(m):
    return m(ids, labels=ids).loss


def ae_loss(m):
    return nn.functional.mse_loss(m(x), x)


untied_lm = copy.deepcopy(model)
ModelState.new(untied_lm).untie("lm_head.weight")  # its own copy of the current value
model.train()
untied_lm.train()
torch.manual_seed(0)
lm_loss(model).backward()
torch.manual_seed(0)
lm_loss(untied_lm).backward()
tied_grad = model.transformer.wte.weight.grad
by_hand = untied_lm.transformer.wte.weight.grad + untied_lm.lm_head.weight.grad

untied_ae = copy.deepcopy(autoencoder)
ModelState.new(untied_ae).untie("decoder.weight")
ae_loss(autoencoder).backward()
ae_loss(untied_ae).backward()
ae_grad = autoencoder.encoder.weight.grad
ae_by_hand = untied_ae.encoder.weight.grad + untied_ae.decoder.weight.grad.T
print(
    "decoder.weight is no Parameter of its own:",
    "decoder.weight" not in dict(autoencoder.named_parameters()),
)

fig, axes = plt.subplots(1, 2, figsize=(8, 3.6))
for ax, got, want, title in [
    (axes[0], tied_grad, by_hand, "GPT-2 identity tie: wte"),
    (axes[1], ae_grad, ae_by_hand, "transform tie: encoder"),
]:
    ax.scatter(want.flatten(), got.flatten(), s=2, alpha=0.4)
    lim = want.abs().max().item()
    ax.plot([-lim, lim], [-lim, lim], color="grey", lw=0.8)
    ax.set(xlabel="sum of the untied gradients", ylabel="gradient of the source", title=title)
    ax.locator_params(nbins=5)
fig.suptitle("The gradient reaching the source is the sum of both uses")
fig.tight_layout()
plt.show()
print(
    "max difference:",
    (tied_grad - by_hand).abs().max().item(),
    (ae_grad - ae_by_hand).abs().max().item(),
)
assert torch.allclose(tied_grad, by_hand, atol=1e-6) and torch.allclose(
    ae_grad, ae_by_hand, atol=1e-6
)

# %% [markdown]
# ## `untie`, and the memory a tie saves
#
# `untie` gives the destination its own copy of the current value: from then on the two train
# apart, and both are stored.

# %%
ms.untie("lm_head.weight")
print(
    "ties after untie:",
    ms.ties(),
    "| one Parameter:",
    model.lm_head.weight is model.transformer.wte.weight,
)
tms.save(model, os.path.join(workdir, "untied.safetensors"))


def megabytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors) / 1e6


sizes = {
    "in memory": (megabytes(untied_lm.parameters()), megabytes(loaded.parameters())),
    "on disk": (
        os.path.getsize(os.path.join(workdir, "untied.safetensors")) / 1e6,
        os.path.getsize(os.path.join(workdir, "model.safetensors")) / 1e6,
    ),
}
fig, ax = plt.subplots(figsize=(6.4, 3.2))
width = 0.38
for i, (untied, tied) in enumerate(sizes.values()):
    b = ax.bar(
        [i - width / 2, i + width / 2], [untied, tied], width, color=["tab:grey", "tab:blue"]
    )
    ax.bar_label(b, fmt="%.2f MB")
ax.set_xticks(range(len(sizes)), list(sizes))
ax.legend(b, ["untied", "tied"], loc="lower right")
ax.set(ylabel="MB", title="GPT-2 (vocab 2048, width 64): what the tie saves")
ax.set_ylim(0, max(max(v) for v in sizes.values()) * 1.2)
plt.show()
embedding = config.vocab_size * config.n_embd * 4 / 1e6
print(f"the tie saves one {config.vocab_size} x {config.n_embd} float32 matrix: {embedding:.2f} MB")

# %% [markdown]
# On a real model the saving is the same matrix: for GPT-2 small (vocabulary 50257, width 768)
# that is 38.6 million parameters, about 154 MB in float32, of its 124 million.
