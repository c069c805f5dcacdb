"""Randomized gradient estimation (RGE): the gradient of a loss from forward passes alone.

Math (arXiv:2402.11592 §3, eq. (1)): for a loss f(θ), q random directions u_j ~ N(0, I) and a
smoothing radius μ, the two-sided estimate is

    ĝ = (1/q) Σ_j d_j · u_j,   d_j = [f(θ + μu_j) − f(θ − μu_j)] / (2μ),

an unbiased estimate of the gradient of the Gaussian-smoothed loss f_μ(θ) = E_u f(θ + μu), which
tends to ∇f(θ) as μ → 0 and q grows. The scalar d_j, the projected gradient, estimates the
directional derivative ∇f(θ)ᵀu_j.

The memory trick (MeZO, arXiv:2305.17333, Alg. 1): u is never stored. The slice of u_j that belongs
to trainable tensor i is drawn from its own generator seeded by (seed_j, i), so it can be redrawn at
any time, for any subset of tensors, in any order. The whole estimate is an `Estimate`: a loss, q
seeds and q coefficients. An optimizer consumes it one tensor at a time through `gradients`.

The weights are never written here. f(θ ± μu) is evaluated *functionally*: around the forward
call of each module that owns a trainable tensor, a hook swaps the tensor for its perturbed copy
θ_i ± μu_i and puts the original back when the module returns. So the only write to θ is the
optimizer's update: with lr = 0 the weights stay bitwise equal in any dtype, where the usual
in-place +μ, −2μ, +μ round trip rounds three times and drifts in fp16/bf16. Per step of ZO-SGD, u
is drawn three times (two perturbed forwards, one update), where the in-place scheme needs four.

Sparse directions (§5, Tab. 8): u_i ⊙ m_i, m_i ~ Bernoulli(1 − s_i) drawn inside `direction`, so
the perturbation and the update share it; s_i = share of |θ_i| ≤ τ, τ the S-quantile of all |θ| of
the pretrained weights (overall sparsity S), so tensors of small weights get more zeros.

References: 1) MeZO, Malladi et al. 2023, arXiv:2305.17333. 2) Zhang et al. 2024, ZO-Bench,
arXiv:2402.11592, §3 and App. A. 3) Nesterov & Spokoiny 2017, Gaussian smoothing.
Not here: the updates that consume ĝ (optimizers.py); the forward-mode estimate (forward_grad.py).
"""
import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.nn.modules.module import (register_module_forward_hook,
                                     register_module_forward_pre_hook)

SEED_BITS = 20        # tensor index bits in a generator seed: up to 2^20 trainable tensors
MASK_SEEDS = 1 << 60  # mask generators start here, above every direction generator (< 2^60)


@dataclass
class Mask:
    """Sparse directions: each entry of u_i is zeroed with probability ratios[i]."""
    seed: int                  # < 2^40; one per parameter group and mask window
    ratios: list[float]        # s_i, one per tensor


@dataclass
class Estimate:
    """ĝ = (1/q) Σ_j projected_grads[j] · u(seeds[j]): the whole gradient estimate in a few
    scalars, q = len(seeds)."""
    loss: float                # mean of f(θ+μu_j) and f(θ−μu_j) over the queries ≈ f(θ)
    seeds: list[int]           # one seed per direction u_j
    projected_grads: list[float]  # d_j = [f(θ+μu_j) − f(θ−μu_j)] / (2μ) ≈ ∇fᵀu_j
    forward_passes: int        # forwards spent on this estimate
    mask: Mask | None = None   # the directions' sparse mask, if any


# ---- directions ---------------------------------------------------------------------------------

def direction(p: torch.Tensor, seed: int, i: int, mask: Mask | None = None) -> torch.Tensor:
    """u for tensor i: N(0, I) shaped like p, from a generator seeded by (seed, i) alone.

    The only source of u in the project. A fresh generator per tensor (never the global RNG) makes u
    independent of the order tensors are visited in, and of anything else that draws random numbers.
    With a mask, each entry is zeroed where a uniform draw from (mask.seed, i) falls below s_i:
    exactly Bernoulli(s_i). (The released code thresholds a normal draw and zeroes a share Φ(s_i).)
    """
    gen = torch.Generator(device=p.device).manual_seed((seed << SEED_BITS) + i)
    u = torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype)
    if mask is not None and mask.ratios[i] > 0:
        gen.manual_seed(MASK_SEEDS + (mask.seed << SEED_BITS) + i)
        u.masked_fill_(torch.rand(p.shape, generator=gen, device=p.device) < mask.ratios[i], 0)
    return u


@torch.no_grad()
def sparsity_ratios(params: list[torch.Tensor], sparsity: float, iters: int = 40) -> list[float]:
    """s_i = share of |θ_i| ≤ τ, where τ is the `sparsity`-quantile of |θ| over all the tensors.

    τ by bisection on [0, max |θ|], counting |θ_i| ≤ τ one tensor at a time on its own device, so
    no copy of the weights is gathered (the released code concatenates them all on the CPU); each
    of the `iters` halvings reads the weights once.
    """
    def count(tau):
        return sum(int(torch.count_nonzero(p.abs() <= tau)) for p in params)

    target = sparsity * sum(p.numel() for p in params)
    lo, hi = 0.0, max(float(p.abs().max()) for p in params)
    for _ in range(iters):                     # count(hi) ≥ target throughout
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if count(mid) < target else (lo, mid)
    return [int(torch.count_nonzero(p.abs() <= hi)) / p.numel() for p in params]


# ---- functional perturbation --------------------------------------------------------------------

@contextmanager
def swapped(params: list[torch.Tensor], replace):
    """Within the block, every module sees `replace(θ_i, i)` instead of its trainable tensor θ_i.

    A global forward pre-hook looks at each module about to run; for each of its own parameters
    that is trainable tensor i, it puts the replacement in `module._parameters` and keeps the
    original; the matching forward hook puts the original back. At most one module's replacements
    are alive at a time (plus the module's activations), so the cost is one tensor, not one model.
    A tensor shared by two modules (tied embeddings) gets the same replacement in both, as long as
    `replace` depends on (θ_i, i) only (optimizers' tied-gradient aliases differ on purpose).
    Yields the set of tensor indices that were reached, so callers can tell unused tensors apart.
    """
    index = {id(p): i for i, p in enumerate(params)}
    saved = {}    # module -> list of (name, original Parameter), while that module runs
    reached = set()

    def swap_in(module, args):
        slots = [(n, p) for n, p in module._parameters.items() if id(p) in index]
        if not slots:
            return
        saved.setdefault(module, []).append(slots)
        for name, p in slots:
            module._parameters[name] = replace(p, index[id(p)])
            reached.add(index[id(p)])

    def swap_out(module, args, output):
        if saved.get(module):
            for name, p in saved[module].pop():
                module._parameters[name] = p

    handles = [register_module_forward_pre_hook(swap_in), register_module_forward_hook(swap_out)]
    try:
        yield reached
    finally:
        for h in handles:
            h.remove()
        for module, stack in saved.items():  # a forward that raised never reached its hook
            for slots in reversed(stack):
                for name, p in slots:
                    module._parameters[name] = p


def perturbed(params: list[torch.Tensor], seed: int | list[int], scale: float | list[float],
              mask: Mask | None = None):
    """Within the block, every module sees θ_i + Σ_j scale_j·u_i(seed_j) instead of θ_i: one
    direction (the estimate's θ ± μu) or several (ZO-SGD-Cons's candidates θ ∓ ηĝ), each masked
    by `mask` when the directions are sparse.
    """
    seeds, scales = (seed, scale) if isinstance(seed, list) else ([seed], [scale])

    def replace(p, i):
        u = direction(p, seeds[0], i, mask)
        out = torch.add(p, u, alpha=scales[0], out=u)                 # one rounding for one u
        for s, a in zip(seeds[1:], scales[1:]):
            out.add_(direction(p, s, i, mask), alpha=a)
        return out

    return swapped(params, replace)


# ---- the estimate -------------------------------------------------------------------------------

def warn_unreached(params, reached):
    missed = [i for i in range(len(params)) if i not in reached]
    if missed:
        shapes = ", ".join(f"#{i} {tuple(params[i].shape)}" for i in missed[:5])
        warnings.warn(f"{len(missed)} trainable tensor(s) never entered a module forward during "
                      f"the loss ({shapes}); they are either unused by the loss or read outside "
                      "their module, where a functional perturbation cannot reach them")


@torch.no_grad()
def estimate(loss_fn, params: list[torch.Tensor], *, seeds: list[int], mu: float,
             mask: Mask | None = None) -> Estimate:
    """Two-sided RGE (§3, eq. (1)) with q = len(seeds) queries, 2q forward passes.

    `loss_fn()` returns the scalar loss of the current model; it is called inside `perturbed`, so
    it sees θ ± μu_j without θ ever being written. With a mask, every u_j is masked by it.
    """
    q = len(seeds)
    losses, projected = [], []
    for seed in seeds:
        with perturbed(params, seed, +mu, mask) as reached:
            f_plus = float(loss_fn())                                 # f(θ + μu_j)
        with perturbed(params, seed, -mu, mask):
            f_minus = float(loss_fn())                                # f(θ − μu_j)
        if not math.isfinite(f_plus + f_minus):       # stop before a NaN reaches the weights
            raise FloatingPointError(f"rge: the loss at θ ± μu is {f_plus}, {f_minus}")
        losses.append((f_plus + f_minus) / 2)
        projected.append((f_plus - f_minus) / (2 * mu))               # eq. (1): d_j
    warn_unreached(params, reached)
    return Estimate(sum(losses) / q, list(seeds), projected, forward_passes=2 * q, mask=mask)


def gradients(est: Estimate, params: list[torch.Tensor]):
    """Yield (p, ĝ_p) one tensor at a time, redrawing u_j from the seeds:
    ĝ_p = (1/q) Σ_j d_j u_j[p]. Only one tensor-sized buffer is alive at a time.
    """
    q = len(est.seeds)
    for i, p in enumerate(params):
        g = direction(p, est.seeds[0], i, est.mask).mul_(est.projected_grads[0] / q)
        for seed, d in zip(est.seeds[1:], est.projected_grads[1:]):
            g.add_(direction(p, seed, i, est.mask), alpha=d / q)
        yield p, g
