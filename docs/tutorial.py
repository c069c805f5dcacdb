# %% [markdown]
# # Zeroth-order fine-tuning, hands on
#
# A zeroth-order (ZO) optimizer trains a network from loss values alone: no back-propagation, so
# no activations kept for a backward pass and no gradient stored. This tutorial measures the three
# things that decide whether that trade is worth it, with the project's own modules:
#
# 1. **How good is one estimate?** The randomized gradient estimate (RGE, arXiv:2402.11592 §3)
#    against the true gradient from autograd, as the number of queries q and the radius μ vary.
# 2. **How fast does it train?** ZO-SGD and ZO-Adam against back-prop SGD on a small task.
# 3. **What does it save?** The memory of a ZO and an FO step, measured tensor by tensor and
#    compared with the paper's memory model (Tab. 5).
#
# Run it as a script, `python docs/tutorial.py` (a minute or two on a laptop CPU; `--fast`
# shrinks every loop, to about ten seconds, and `--figures DIR` writes the figures elsewhere than
# `docs/figures/`), or open it as a notebook: see `docs/tutorial.md`.
# Start with `examples/zo_minimal.py`, the whole ZO-SGD step in plain PyTorch.

# %%
import argparse
import math
import os
import sys
import weakref
from pathlib import Path

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import OPTConfig, OPTForCausalLM

# The project's modules live in the repository root; find it from this file, or from the working
# directory where a notebook has no __file__.
HERE = Path(globals().get("__file__", Path.cwd() / "tutorial.py")).resolve().parent
ROOT = next(p for p in [HERE, *HERE.parents] if (p / "rge.py").exists())
sys.path.insert(0, str(ROOT))
import memory      # noqa: E402  (the Tab. 5 memory model)
import optimizers  # noqa: E402  (the update rules)
import rge         # noqa: E402  (the randomized gradient estimate)

parser = argparse.ArgumentParser(description="The ZO tutorial, run top to bottom.",
                                 allow_abbrev=False)
parser.add_argument("--fast", action="store_true", default=os.environ.get("TUTORIAL_FAST") == "1",
                    help="shrink every loop (a smoke test; also TUTORIAL_FAST=1)")
parser.add_argument("--figures", default=os.environ.get("TUTORIAL_FIGURES", ROOT / "docs/figures"),
                    help="where the PNG figures go (also TUTORIAL_FIGURES=DIR)")
args, _ = parser.parse_known_args()       # a notebook kernel passes arguments of its own
FAST, FIGURES = args.fast, Path(args.figures)
FIGURES.mkdir(parents=True, exist_ok=True)
torch.set_num_threads(1)   # the models are tiny: one thread beats several that wait on each other
torch.manual_seed(0)
print(f"{'fast' if FAST else 'full'} run; figures go to {FIGURES}")


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def cosine(a, b) -> float:
    """cos(a, b), and 0 for a zero vector, which points nowhere (an RGE whose f± all tie)."""
    norms = a.norm() * b.norm()
    return float(a @ b / norms) if norms > 0 else 0.0


# %% [markdown]
# ## 1. One random direction knows little about the gradient
#
# RGE replaces the gradient ∇f(θ) by slopes along random directions u ~ N(0, I):
#
#     ĝ = (1/q) Σ_j [f(θ + μu_j) − f(θ − μu_j)] / (2μ) · u_j   →   (1/q) Σ_j (u_jᵀ∇f) u_j  as μ → 0.
#
# Each term is unbiased, E[(uᵀ∇f) u] = E[uuᵀ] ∇f = ∇f (the paper's eq. (1)), but with q = 1 it
# points along u, and in d dimensions a random u is almost orthogonal to any fixed vector:
# its cosine to ∇f is uᵀ∇f / (|u| |∇f|) ≈ N(0, 1)/√d, so |cos| ≈ √(2/(πd)). For the 1.3 billion
# weights of OPT-1.3B that is 2·10⁻⁵. Averaging q directions helps slowly: from E ĝᵀ∇f = |∇f|² and
# E |ĝ|² = (d + q + 1)/q · |∇f|², the cosine is about √(q / (d + q + 1)).
#
# First the geometry alone, with a random vector in place of the gradient:

# %%
dims = [10, 100, 1_000, 10_000, 100_000] + ([] if FAST else [1_000_000])
random_cos = []
for dim in dims:
    v = torch.randn(dim)                              # stands for ∇f
    u = torch.randn(200 if FAST else 1000, dim)       # directions, one per row
    random_cos.append(float((u @ v / (u.norm(dim=1) * v.norm())).abs().mean()))
    print(f"d = {dim:>9,}   mean |cos(u, g)| = {random_cos[-1]:.4f}   "
          f"√(2/(πd)) = {math.sqrt(2 / (math.pi * dim)):.4f}")

# %% [markdown]
# ## 2. RGE on a network, against autograd
#
# A small classifier: points in 16 dimensions, four classes given by a random "teacher" network,
# and a student MLP of d ≈ 1,300 weights. The true gradient comes from autograd; the estimate
# from `rge.estimate`, which evaluates f(θ ± μu_j) *functionally* (θ is never written) and
# returns an `Estimate`: the loss, the seeds, and one number per direction, the projected
# gradient d_j = [f(θ + μu_j) − f(θ − μu_j)]/(2μ). `rge.gradients` redraws each u_j from its seed
# and yields ĝ = (1/q) Σ_j d_j u_j one tensor at a time, as (p, g, scale) with ĝ_p = scale·g,
# the way the optimizers consume it.

# %%
def mlp(inputs, width, outputs, dtype=torch.float32):
    return nn.Sequential(nn.Linear(inputs, width), nn.Tanh(),
                         nn.Linear(width, outputs)).to(dtype)


def teacher_task(n, dim=16, classes=4):
    """n points x ~ N(0, I) labelled by a random network (logits standardised per class, so
    the classes are about equally frequent)."""
    x = torch.randn(n, dim)
    with torch.no_grad():
        logits = mlp(dim, 32, classes)(x)
    return x, ((logits - logits.mean(0)) / logits.std(0)).argmax(1)


torch.manual_seed(0)              # the same data and student in a fast and a full run
x_train, y_train = teacher_task(2000)
student = mlp(16, 64, 4)
params = list(student.parameters())
d = sum(p.numel() for p in params)


def loss_of(model, x=x_train, y=y_train):
    return lambda: F.cross_entropy(model(x.to(model[0].weight.dtype)), y)


def true_gradient(model):
    ps = list(model.parameters())
    return flat(torch.autograd.grad(loss_of(model)(), ps))


def rge_cosine(model, grad, q, mu, seed):
    """cos(ĝ, ∇f) of one RGE with q directions, their seeds drawn from `seed`."""
    ps = list(model.parameters())
    seeds = torch.randint(2**40, (q,), generator=torch.Generator().manual_seed(seed)).tolist()
    est = rge.estimate(loss_of(model), ps, seeds=seeds, mu=mu)
    return cosine(flat(s * g for _, g, s in rge.gradients(est, ps)), grad)


grad = true_gradient(student)
with torch.no_grad():
    print(f"d = {d} weights, loss {float(loss_of(student)()):.3f}, |∇f| = {grad.norm():.3f}")

# %% [markdown]
# **Cosine against q.** Each point is the mean over a few seeds; the line is √(q/(d + q + 1)).
# The cost of an estimate is 2q forward passes, so going from q = 1 to q = 64 buys about 8× in
# cosine for 64× the compute; the paper (Fig. 2) finds the same diminishing returns in accuracy.

# %%
QS = [1, 4, 16, 64] if FAST else [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
REPEATS = 3 if FAST else 8
cos_q = {q: [rge_cosine(student, grad, q, 1e-3, seed) for seed in range(REPEATS)] for q in QS}
for q, cs in cos_q.items():
    print(f"q = {q:4d}   cos(ĝ, ∇f) = {sum(cs) / len(cs):.3f}   "
          f"√(q/(d+q+1)) = {math.sqrt(q / (d + q + 1)):.3f}")

# %% [markdown]
# **Cosine against μ.** The finite difference [f(θ + μu) − f(θ − μu)]/(2μ) is the slope uᵀ∇f
# up to O(μ²) (the third derivative along u), so a large μ biases it: ĝ becomes the gradient of a
# Gaussian-smoothed loss f_μ(θ) = E f(θ + μu), not of f. A tiny μ loses the slope to rounding: two
# fp32 losses that agree to ~7 digits leave few digits in their difference, and below μ ≈ 1e-7
# most pairs are the same fp32 number, so ĝ is 0 (its cosine counted as 0). The same directions
# (same seeds) are used for every μ, so only μ changes. In float64 (a copy of the student, whose
# directions are drawn in float64 from the same seeds) the small-μ end recovers and the large-μ
# end does not, which tells rounding and smoothing apart.

# %%
MUS = [10.0 ** k for k in range(-9, 2, 2)] if FAST else [10.0 ** (k / 2) for k in range(-18, 3)]
Q_MU = 16
student64 = mlp(16, 64, 4, torch.float64)
student64.load_state_dict(student.state_dict())
grad64 = true_gradient(student64)
cos_mu = {}
for name, model, g in (("fp32", student, grad), ("fp64", student64, grad64)):
    cos_mu[name] = [sum(rge_cosine(model, g, Q_MU, mu, seed) for seed in range(REPEATS)) / REPEATS
                    for mu in MUS]
    print(name, "  ".join(f"μ={mu:.0e}: {c:.3f}" for mu, c in zip(MUS, cos_mu[name])))

# %%
fig, (ax_d, ax_q, ax_mu) = plt.subplots(1, 3, figsize=(14, 4))
ax_d.loglog(dims, random_cos, "o", label="measured")
ax_d.loglog(dims, [math.sqrt(2 / (math.pi * dim)) for dim in dims], "k--", label="√(2/(πd))")
ax_d.set(xlabel="dimension d", ylabel="mean |cos(u, g)|", title="a random direction, q = 1")
ax_q.errorbar(QS, [sum(c) / len(c) for c in cos_q.values()],
              yerr=[torch.tensor(c).std().item() for c in cos_q.values()], fmt="o", capsize=3,
              label="RGE, μ = 1e-3")
ax_q.plot(QS, [math.sqrt(q / (d + q + 1)) for q in QS], "k--", label="√(q/(d+q+1))")
ax_q.set(xscale="log", yscale="log", xlabel="queries q (2q forward passes)",
         ylabel="cos(ĝ, ∇f)", title=f"MLP, d = {d}")
for name, cs in cos_mu.items():
    ax_mu.semilogx(MUS, cs, "o-", label=name)
ax_mu.axhline(math.sqrt(Q_MU / (d + Q_MU + 1)), color="k", ls="--", label="√(q/(d+q+1))")
ax_mu.set(xlabel="radius μ", ylabel="cos(ĝ, ∇f)", title=f"MLP, q = {Q_MU}, same directions")
for ax in (ax_d, ax_q, ax_mu):
    ax.legend()
fig.tight_layout()
fig.savefig(FIGURES / "rge_cosine.png", dpi=120)

# %% [markdown]
# ## 3. Training: ZO against back-prop
#
# The same student, trained from the same initial weights by four optimizers from
# `optimizers.OPTIMIZERS`, each `step(closure)` returning the batch loss. `closure()` computes
# the loss of the current mini-batch; a ZO step calls it 2q times under `torch.no_grad()`, the
# FO step once under autograd, then back-propagates.
#
# The learning rates (each the best of three, a factor 2–3 apart) differ by orders of magnitude,
# and that is the point. ĝ is ∇f plus noise: |ĝ|² ≈ (d + q + 1)/q · |∇f|². For a loss curved
# equally in every direction, the noise limits the stable η to about q/d of back-prop's, and the
# progress per step with it. Here the best η is 1/200 of FO-SGD's for q = 1 and 1/20 for q = 16,
# far better than q/d = 1/1348: the loss curves in few directions, and the step's noise along the
# flat ones costs almost nothing. MeZO's analysis (Malladi et al. 2023, §4) makes this precise:
# the slowdown scales with the local effective rank of the Hessian, not with d, which is why ZO
# fine-tunes an LLM in thousands of steps, not billions. ZO-Adam normalises each coordinate's
# step, so its η is on a scale of its own.

# %%
STEPS = 300 if FAST else 3000
LOGGED = {0, *torch.logspace(0, math.log10(STEPS), 40).round().int().tolist()}  # log-spaced
RUNS = {  # label: (--opt name, hyper-parameters, forward passes per step, a backward counted 2)
    "FO-SGD": ("fo_sgd", dict(lr=1.0), 3),
    "ZO-SGD, q = 1": ("zo_sgd", dict(lr=5e-3, mu=1e-3, q=1), 2),
    "ZO-SGD, q = 16": ("zo_sgd", dict(lr=5e-2, mu=1e-3, q=16), 32),
    "ZO-Adam, q = 1": ("zo_adam", dict(lr=3e-3, mu=1e-3, q=1), 2),
}
x_batches = torch.randint(len(x_train), (STEPS, 64), generator=torch.Generator().manual_seed(1))
curves = {}                                          # label: {step: train loss}
for label, (name, hparams, _) in RUNS.items():
    model = mlp(16, 64, 4)
    model.load_state_dict(student.state_dict())      # the same start for every run
    opt = optimizers.OPTIMIZERS[name](list(model.parameters()), **hparams)
    curve = curves[label] = {}
    for step in range(STEPS + 1):
        if step in LOGGED:
            with torch.no_grad():
                curve[step] = float(loss_of(model)())
        if step < STEPS:
            batch = x_batches[step]
            opt.step(loss_of(model, x_train[batch], y_train[batch]))
    print(f"{label:16s} train loss {curve[0]:.3f} → {curve[STEPS]:.3f} after {STEPS} steps")

# %%
fig, (ax_step, ax_fwd) = plt.subplots(1, 2, figsize=(11, 4))
for label, curve in curves.items():
    steps = sorted(curve)
    ax_step.plot(steps, [curve[s] for s in steps], label=label)
    ax_fwd.plot([s * RUNS[label][2] for s in steps[1:]], [curve[s] for s in steps[1:]],
                label=label)
ax_step.set(xlabel="step", ylabel="train loss", title="per step")
ax_fwd.set(xscale="log", xlabel="forward passes (a backward counted as two)", ylabel="train loss",
           title="per unit of compute")
for ax in (ax_step, ax_fwd):
    ax.legend()
fig.tight_layout()
fig.savefig(FIGURES / "zo_vs_fo.png", dpi=120)

# %% [markdown]
# Per step, sixteen queries help a lot. Per forward pass they help nothing: averaging q directions
# in one step does about what q steps of one direction do. And back-prop stays ahead even when
# its backward is counted: on a model this small, ZO buys memory, not speed.

# %% [markdown]
# ## 4. Memory: what a ZO step does not keep
#
# The paper's memory model (Tab. 5, App. C) splits the peak of a training step into
#
#     peak = |W| (the weights) + |s_opt| (optimizer state) + dynamic (alive within the step only)
#
# | optimizer | state | dynamic |
# |---|---|---|
# | FO-SGD | 0 | Σ_l max{\|a_l\|, \|x_l\|} |
# | FO-Adam | 2\|x\| | Σ_l max{\|a_l\|, \|x_l\|} |
# | ZO-SGD | 0 | max_l \|x_l\| |
# | ZO-Adam | 2\|x\| | max_l \|x_l\| |
#
# with |x| the bytes of the trainable weights (|x_l| those of layer l) and |a_l| the activations
# layer l's forward saves for the backward. Back-prop holds layer l's activations until its
# gradient, of |x_l| bytes, has been computed, hence the sum over layers; a ZO step holds only the
# perturbed copy of the layer that is running (`rge.perturbed` swaps it in around that layer's
# forward), hence the max. The activations, which grow with batch and sequence length, are the
# term ZO removes; the optimizer state is the same either way.
#
# To measure rather than believe, we count the bytes of every tensor alive: a
# `TorchDispatchMode` sees every tensor an operation returns, and a finalizer on its storage
# sees it freed. (`memory.py` measures the same on a real device: CUDA's allocator statistics
# or the process's resident set.)

# %%
class LiveBytes(TorchDispatchMode):
    """Within the block, `now` and `peak` are the bytes of the tensor storages alive: those given
    as `held` at the start, and every one an operation creates until it is freed."""

    def __init__(self, held=()):
        super().__init__()
        self.sizes, self.now = {}, 0
        for t in held:
            self.track(t)
        self.peak = self.now

    def track(self, t):
        # Views share a storage, so each buffer counts once; torch keeps one Python object per
        # storage while the storage lives, so the finalizer runs when the buffer is freed.
        storage = t.untyped_storage()
        if id(storage) not in self.sizes:
            self.sizes[id(storage)] = storage.nbytes()
            self.now += storage.nbytes()
            weakref.finalize(storage, self.free, id(storage))

    def free(self, key):
        self.now -= self.sizes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.track(t)
        self.peak = max(self.peak, self.now)
        return out


# %% [markdown]
# The model is a tiny OPT with random weights (the transformers class of the paper's OPT-1.3B,
# shrunk): a 4096-token vocabulary, 4 layers of width 64. As in a real OPT, the embedding is the
# largest "layer" and max_l |x_l| is its size. The loss is a classification at the last token,
# as the project's tasks compute it. `memory.layer_terms` counts |x_l| and measures |a_l| (what
# autograd saves in each layer) in one forward, and `memory.predict` evaluates Tab. 5's row.
# We measure the second step of each optimizer, so that its state already exists (both Adams
# create theirs in the first), at learning rate 0, so the weights do not move.

# %%
OPT_TINY = OPTConfig(vocab_size=4096, hidden_size=64, num_hidden_layers=4, ffn_dim=256,
                     num_attention_heads=4, max_position_embeddings=1024, word_embed_proj_dim=64,
                     dropout=0.0, attention_dropout=0.0)
torch.manual_seed(0)
llm = OPTForCausalLM(OPT_TINY).eval()
llm_params = list(llm.parameters())                  # the tied embedding and head are one tensor
BATCH = 4


def last_token_loss(seq_len):
    ids = torch.randint(OPT_TINY.vocab_size, (BATCH, seq_len))
    labels = torch.randint(OPT_TINY.vocab_size, (BATCH,))

    def closure():
        hidden = llm.model(input_ids=ids, use_cache=False).last_hidden_state[:, -1]
        return F.cross_entropy(llm.lm_head(hidden), labels)
    return closure


def measured_peak(name, closure, **hparams):
    """Peak bytes alive in the second step of optimizer `name` (lr 0), weights included."""
    with LiveBytes([*llm.parameters(), *llm.buffers()]) as live:
        opt = optimizers.OPTIMIZERS[name](llm_params, lr=0.0, **hparams)
        opt.step(closure)                            # creates the optimizer state
        live.peak = live.now
        opt.step(closure)
    for p in llm_params:
        p.grad = None
    return live.peak


def inference_peak(closure):
    with LiveBytes([*llm.parameters(), *llm.buffers()]) as live, torch.no_grad():
        closure()
    return live.peak


MB = 2**20
SEQ_LEN = 64
closure = last_token_loss(SEQ_LEN)
terms = memory.layer_terms(llm, closure, llm_params)
print(f"|W| = {terms['W'] / MB:.2f} MiB, |x| = {terms['x'] / MB:.2f} MiB, "
      f"|a| = {terms['a'] / MB:.2f} MiB at batch {BATCH} × {SEQ_LEN} tokens")
for layer, x_l, a_l in zip(terms["names"], terms["x_l"], terms["a_l"]):
    print(f"  {layer:10s}  |x_l| = {x_l / MB:5.2f} MiB   |a_l| = {a_l / MB:5.2f} MiB")

# ZO-Adam without AMSGrad, to keep Tab. 5's two states (m, v); the default adds a third, V̂.
TABLE = {"FO-SGD": ("fo_sgd", {}), "FO-Adam": ("fo_adam", {}),
         "ZO-SGD": ("zo_sgd", {}), "ZO-Adam": ("zo_adam", dict(amsgrad=False))}
bars = {}
for label, (name, hparams) in TABLE.items():
    tab5 = memory.predict(name, terms)["peak"]
    bars[label] = (measured_peak(name, closure, **hparams), tab5)
    print(f"{label:8s} peak: measured {bars[label][0] / MB:6.2f} MiB, Tab. 5 {tab5 / MB:6.2f} MiB")
print(f"inference forward: {inference_peak(closure) / MB:.2f} MiB")

# %% [markdown]
# ZO-SGD holds the weights plus the embedding's perturbed copy, as Tab. 5 says. The two gaps are
# worth a look. FO measures a little above its row: the head shares its weight with the
# embedding, so an embedding-sized gradient appears at the very start of the backward, while
# every layer's activations are still held (the row assumes that layer l's gradient replaces its
# activations, one layer at a time). ZO-Adam measures above its row: updating the embedding holds
# ĝ and the denominator √v̂ + ε, two embedding-sized temporaries, where the row counts one. The
# state columns agree: the optimizer state is the same with and without back-prop, so ZO-Adam
# keeps most of FO-Adam's memory; the savings of ZO-SGD are the activations and the gradient.
#
# **Against the sequence length** (the paper's Fig. 3): the activations grow with the number of
# tokens, so FO-SGD's peak does; ZO-SGD's stays at the weights plus one perturbed layer, until a
# single layer's own forward activations, which an inference forward needs too, outgrow that
# layer's copy. A ZO step costs what inference costs, not what training by back-prop costs. In
# this tiny model that happens from ~128 tokens. In OPT-1.3B (fp32) the embedding's copy is
# 0.4 GB, and a layer's largest activation at 4 × 1024 tokens, its 8192-wide FFN's, is 0.13 GB:
# ZO stays flat (Fig. 3).

# %%
SEQ_LENS = [32, 128, 512] if FAST else [16, 32, 64, 128, 256, 512, 1024]
sweep = {key: [] for key in ("ZO-SGD", "FO-SGD", "ZO-SGD, Tab. 5", "FO-SGD, Tab. 5", "inference")}
for seq_len in SEQ_LENS:
    closure = last_token_loss(seq_len)
    terms = memory.layer_terms(llm, closure, llm_params)
    for label, name in (("ZO-SGD", "zo_sgd"), ("FO-SGD", "fo_sgd")):
        sweep[label].append(measured_peak(name, closure) / MB)
        sweep[label + ", Tab. 5"].append(memory.predict(name, terms)["peak"] / MB)
    sweep["inference"].append(inference_peak(closure) / MB)
    print(f"{seq_len:5d} tokens: ZO-SGD {sweep['ZO-SGD'][-1]:6.2f} MiB   "
          f"FO-SGD {sweep['FO-SGD'][-1]:6.2f} MiB   inference {sweep['inference'][-1]:6.2f} MiB")

# %%
fig, (ax_bar, ax_len) = plt.subplots(1, 2, figsize=(11, 4))
labels = list(bars)
ax_bar.bar([i - 0.2 for i in range(len(labels))], [m / MB for m, _ in bars.values()], 0.4,
           label="measured")
ax_bar.bar([i + 0.2 for i in range(len(labels))], [t / MB for _, t in bars.values()], 0.4,
           label="Tab. 5")
ax_bar.set_xticks(range(len(labels)), labels)
ax_bar.set(ylabel="peak MiB", title=f"one step, batch {BATCH} × {SEQ_LEN} tokens")
for label, style in (("ZO-SGD", "o-"), ("FO-SGD", "s-"), ("inference", "^:")):
    ax_len.plot(SEQ_LENS, sweep[label], style, label=label)
for label, color in (("ZO-SGD", "C0"), ("FO-SGD", "C1")):
    ax_len.plot(SEQ_LENS, sweep[label + ", Tab. 5"], "--", color=color, label=label + ", Tab. 5")
ax_len.set(xscale="log", xlabel="tokens per example", ylabel="peak MiB",
           title=f"one step, batch {BATCH}")
for ax in (ax_bar, ax_len):
    ax.legend()
fig.tight_layout()
fig.savefig(FIGURES / "memory.png", dpi=120)

# %% [markdown]
# ## Where to go next
#
# - Read `rge.py` (the estimate), then `optimizers.py` (each rule under its formula), then
#   `memory.py`; `train.py` puts them together on real tasks.
# - Exercises: (1) add ZO-SGD-Sign and ZO-SGD-MMT to section 3; which tolerates a larger η?
#   (2) In section 2, what does half precision (`torch.bfloat16`) do to the μ curve, and why does
#   the project evaluate f(θ ± μu) without writing θ? (3) Double the student's width: how do the
#   cosine at q = 1 and ZO-SGD's best η change? (4) In section 4, make the vocabulary 16× larger:
#   which term of Tab. 5 moves, for ZO and for FO?
