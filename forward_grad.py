"""Forward gradient: the gradient estimate from exact directional derivatives (forward-mode AD).

Math (arXiv:2402.11592 §3, eq. (1) and App. A "Forward Gradient"; Baydin et al. 2022): for a
direction u ~ N(0, I) the directional derivative f'(θ, u) = ∇f(θ)ᵀu gives an unbiased estimate

    E_u[(∇f(θ)ᵀu) u] = E_u[u uᵀ] ∇f(θ) = ∇f(θ),   and with q queries
    ĝ = (1/q) Σ_j d_j u_j,   d_j = ∇f(θ)ᵀu_j (the projected gradient, exact here).

RGE's finite difference [f(θ+μu) − f(θ−μu)]/(2μ) tends to the same ∇fᵀu as μ → 0; here it is
exact, from a Jacobian-vector product instead of two forwards: one forward pass carrying dual
numbers θ + εu (ε² = 0) yields f(θ) and its tangent ∇fᵀu together, with no backward pass and no
stored activations. The result is an `rge.Estimate`, so every optimizer consumes it unchanged.

Mechanism: `torch.autograd.forward_ad`. Around the forward of each module that owns a trainable
tensor θ_i, `rge.swapped` puts the dual tensor make_dual(θ_i, u_i) in its place, u_i redrawn from
(seed, i) by `rge.direction` exactly as RGE's perturbation and the update draw it. So no tangent is
stored beyond the running module's (App. C.1 assumes all of u stays in memory), and a tied tensor
gets the same tangent in both of its modules. Pitfalls (notes/field-survey.md §3): the fused
scaled-dot-product-attention kernels have no forward-AD formula, so SDPA is held to its math
backend here (eager attention is unaffected); under `torch.inference_mode` tangents silently
vanish, so the loss runs under `no_grad` only.

Cost per query: one forward with tangents (≈ 1.5–3× a plain forward), against RGE's two forwards.

References: 1) Baydin et al. 2022, "Gradients without backpropagation", arXiv:2202.08587.
2) Zhang et al. 2024, arXiv:2402.11592, §3, App. A, App. C.1. 3) Ren et al. 2022, arXiv:2210.03310.
Not here: the finite-difference estimate (rge.py); the update that consumes ĝ (optimizers.py).
"""
import math

import torch
from torch.autograd import forward_ad
from torch.nn.attention import SDPBackend, sdpa_kernel

import rge


@torch.no_grad()
def directional_derivative(loss_fn, params: list[torch.Tensor], seed: int, *, tied=(),
                           allow_unreached=False) -> tuple[float, float, set[int]]:
    """f(θ), ∇f(θ)ᵀu(seed) and the indices read more than once, from one forward pass with dual
    tensors θ_i + ε u_i. A tensor in `tied` (read by two modules: a tied embedding and LM head)
    gets one dual tensor for the whole forward, so its u is drawn once (rge.swapped's keep).

    `loss_fn()` returns the scalar loss of the current model. A non-finite ∇fᵀu stops here, before
    any weight is written (in fp16 some tangent formulas overflow: torch's layer_norm JVP does at
    input std ≈ 0.02; the paper runs Forward-Grad in fp32, App. C.2).
    """
    if torch.is_inference_mode_enabled():
        raise RuntimeError("forward_grad: tangents vanish under torch.inference_mode; use no_grad")

    def dual(p, i):
        return forward_ad.make_dual(p, rge.direction(p, seed, i))

    with forward_ad.dual_level(), sdpa_kernel(SDPBackend.MATH):
        with rge.swapped(params, dual, keep=tied) as reads:
            value, tangent = forward_ad.unpack_dual(loss_fn())
        loss = float(value)
        slope = 0.0 if tangent is None else float(tangent)    # None: no tensor reached the loss
    rge.check_reached(params, reads, allow_unreached)
    if not math.isfinite(slope):
        raise FloatingPointError(f"forward_grad: the directional derivative ∇fᵀu is {slope} "
                                 "(forward-mode AD overflowed; use fp32 or bf16 weights)")
    return loss, slope, rge.read_twice(reads)


def estimate(loss_fn, params: list[torch.Tensor], *, seeds: list[int], tied=(),
             allow_unreached=False) -> rge.Estimate:
    """Forward gradient ĝ = (1/q) Σ_j (∇fᵀu_j) u_j (App. A), q = len(seeds): q dual forwards.
    `tied`: indices read more than once per forward (Estimate.tied of an earlier estimate)."""
    q = len(seeds)
    losses, projected = [], []
    for seed in seeds:
        loss, slope, twice = directional_derivative(loss_fn, params, seed, tied=tied,
                                                    allow_unreached=allow_unreached)
        losses.append(loss)
        projected.append(slope)                                    # eq. (1): d_j = ∇fᵀu_j
    return rge.Estimate(sum(losses) / q, list(seeds), projected, forward_passes=q,
                        tied=twice)
