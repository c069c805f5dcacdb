"""Optimizers: zeroth-order (BP-free) methods and their first-order (back-prop) baselines.

Math (arXiv:2402.11592 §3, eq. (2)): every method here is one update rule

    θ_{t+1} = θ_t − η_t · h(ĝ_t),

where ĝ_t estimates ∇f(θ_t) and h turns it into a step. The ZO methods get ĝ from an estimator
(rge.estimate: 2q forward passes, no back-prop) as an `Estimate` of a few scalars, and consume it
tensor by tensor (rge.gradients redraws u from the seeds), so nothing gradient-sized is stored
beyond one tensor at a time plus the method's own state. The FO baselines get ĝ = ∇f from back-prop.

Structure: `ZeroOrderOptimizer.step(closure)` draws seeds, calls `self.estimate`, then calls
`self.update(p, g, state, group)` for each tensor; a method is a subclass that overrides `update`
(the rule sits under its formula). Three also override `estimate`, where the change lives in the
scalars: Forward-Grad (a JVP instead of a finite difference), ZO-SGD-Sign's scalar mode (sign(d_j))
and ZO-SGD-Cons (three more forwards choose h ∈ {0, ĝ, −ĝ}). `closure()` returns the scalar loss of
the current batch; the ZO step calls it 2q times, the FO step once under autograd. Weight decay λ
acts on ≥2-D tensors only: added to ĝ (coupled) for ZO and FO-SGD, decoupled for FO-Adam (AdamW).
`OPTIMIZERS` maps `--opt` names to classes.

Not here: the §5 variants, which group the tensors and mask u (variants.py); how the FO baselines
sum a tied tensor's two gradients in place (tied_grads.py).

References: 1) Zhang et al. 2024, arXiv:2402.11592, §3, App. A. 2) MeZO, Malladi et al. 2023,
arXiv:2305.17333 (ZO-SGD). 3) Ghadimi & Lan 2013 (ZO-SGD). 4) Liu et al. 2019 (ZO-signSGD).
5) Chen et al. 2019, ZO-AdaMM. 6) Kim et al. 2021 (conservative update). 7) Baydin et al. 2022,
arXiv:2202.08587 (forward gradient). 8) Kingma & Ba 2014; Loshchilov & Hutter 2019 (AdamW).
Not here: the estimate itself (rge.py, forward_grad.py); the loss (tasks.py); the loop (train.py).
"""
import math

import torch

import forward_grad
import rge
import tied_grads


# ---- zeroth order -------------------------------------------------------------------------------

class ZeroOrderOptimizer(torch.optim.Optimizer):
    """Base of the BP-free optimizers: estimate ĝ from forward passes, then update tensor by tensor.

    Seeds come from the optimizer's own generator (never the global RNG), so a run is reproducible
    from `seed` alone and nothing else that draws random numbers changes u.

    Variants (§5), options of every subclass that overrides only `update`:
    - block-wise ZO (Tab. 6): one param group per block. `step` estimates and updates the groups in
      turn (Gauss–Seidel: block b is estimated where blocks before it have already moved), each with
      its own seeds, so no two blocks share a direction; 2q forwards per block.
    - sparse ZO (Tab. 8): a group with "sparsity" (a ratio s_i per tensor) uses masked directions
      u ⊙ m; its mask seed is redrawn every "mask_every" steps, and rge.direction draws m from it.
    """

    def __init__(self, params, lr, mu=1e-3, q=1, weight_decay=0.0, seed=0, **defaults):
        super().__init__(params, dict(lr=lr, mu=mu, q=q, weight_decay=weight_decay, **defaults))
        self.seed_stream = torch.Generator().manual_seed(seed)  # draws the seeds
        self.forward_passes = 0       # of the last step, for the log
        self.projected_grad = None    # mean (f+ − f−)/(2μ) of the last step, for the log

    def next_seed(self) -> int:
        return int(torch.randint(2**40, (1,), generator=self.seed_stream))

    def mask(self, group) -> rge.Mask | None:
        """The group's sparse mask for this step: a fresh seed every `mask_every` steps."""
        if not group.get("sparsity"):
            return None
        age = group.get("mask_age", 0)                  # steps of this group so far
        if age % group.get("mask_every", 1) == 0:
            group["mask_seed"] = self.next_seed()
        group["mask_age"] = age + 1
        return rge.Mask(group["mask_seed"], group["sparsity"])

    def estimate(self, closure, params, group) -> rge.Estimate:
        mask = self.mask(group)
        seeds = [self.next_seed() for _ in range(group["q"])]
        return rge.estimate(closure, params, seeds=seeds, mu=group["mu"], mask=mask)

    @torch.no_grad()
    def step(self, closure) -> float:
        losses, projected, self.forward_passes = [], [], 0
        for group in self.param_groups:                     # one group per block when block-wise
            est = self.estimate(closure, group["params"], group)
            for p, g in rge.gradients(est, group["params"]):
                if group["weight_decay"] and p.dim() >= 2:      # decay matrices, not norms/biases
                    g.add_(p, alpha=group["weight_decay"])
                self.update(p, g, self.state[p], group)
            losses.append(est.loss)
            projected.append(sum(est.projected_grads) / len(est.projected_grads))
            self.forward_passes += est.forward_passes
        self.projected_grad = sum(projected) / len(projected)
        return sum(losses) / len(losses)

    def update(self, p, g, state, group):
        raise NotImplementedError


class ZOSGD(ZeroOrderOptimizer):
    """ZO-SGD (MeZO): θ ← θ − η ĝ.  2q forwards per step, no state."""

    def update(self, p, g, state, group):
        p.add_(g, alpha=-group["lr"])                                  # eq. (2), h(ĝ) = ĝ


class ZOSGDSign(ZeroOrderOptimizer):
    """ZO-SGD-Sign (Liu et al. 2019): 2q forwards, no state.

    sign="element" (§3: "element-wise sign"; for q > 1 the sign of the q-averaged ĝ):
        θ ← θ − η sign(ĝ)
    sign="scalar" (App. A and the released code: the sign of each projected gradient, times u):
        θ ← θ − η (1/q) Σ_j sign(d_j) u_j
    The first is signSGD on the estimate (every coordinate moves by exactly η); the second keeps
    u and only quantises the scalars, i.e. ZO-SGD with |d_j| set to 1 (the log's projected_grad
    is then the mean sign). Coupled weight decay enters before the sign: sign(ĝ + λθ).
    """

    def __init__(self, params, lr, mu=1e-3, q=1, weight_decay=0.0, seed=0, sign="element"):
        if sign not in ("element", "scalar"):
            raise ValueError(f"sign must be 'element' or 'scalar', got {sign!r}")
        super().__init__(params, lr, mu, q, weight_decay, seed, sign=sign)

    def estimate(self, closure, params, group):
        est = super().estimate(closure, params, group)
        if group["sign"] == "scalar":                   # ĝ = (1/q) Σ_j sign(d_j) u_j
            est.projected_grads = [math.copysign(1.0, d) if d else 0.0
                                   for d in est.projected_grads]
        return est

    def update(self, p, g, state, group):
        step = g.sign_() if group["sign"] == "element" else g
        p.add_(step, alpha=-group["lr"])                               # eq. (2), h = sign


class ZOSGDMomentum(ZeroOrderOptimizer):
    """ZO-SGD-MMT (App. A; torch SGD momentum without dampening): 2q forwards, m in fp32.

        m_t = β m_{t−1} + ĝ_t,   θ ← θ − η m_t          (β = momentum, m_0 = 0)
    """

    def __init__(self, params, lr, mu=1e-3, q=1, weight_decay=0.0, seed=0, momentum=0.9):
        super().__init__(params, lr, mu, q, weight_decay, seed, momentum=momentum)

    def update(self, p, g, state, group):
        if "momentum_buffer" not in state:      # fp32 even for half weights, where β m + ĝ rounds
            state["momentum_buffer"] = torch.zeros_like(p, dtype=torch.float32)
        m = state["momentum_buffer"].mul_(group["momentum"]).add_(g)
        p.add_(m, alpha=-group["lr"])                    # computed in fp32, rounded once to p


class ZOSGDCons(ZOSGD):
    """ZO-SGD-Cons (App. A, after Kim et al. 2021): keep the best of three points, 2q+3 forwards.

        θ ← argmin f(y) over y ∈ {θ, θ − ηĝ, θ + ηĝ}       (§3: h ∈ {0, ĝ, −ĝ})

    The documented exception to "override only update": `estimate` spends three more forwards,
    f(θ) and the two candidates, evaluated functionally (`rge.perturbed` along the q directions of
    ĝ, scaled by ∓ηd_j/q), so no weight is written before the choice; `update` then writes the
    winner, equal to the evaluated point up to rounding (nothing if θ wins; ties keep θ). Logged:
    loss f(θ), and the projected gradient of ĝ whatever wins. Weight decay is refused: the three
    points are compared on f alone, and the paper defines no decayed variant.
    """

    def __init__(self, params, lr, mu=1e-3, q=1, weight_decay=0.0, seed=0):
        if weight_decay:
            raise ValueError("zo_sgd_cons compares f at θ and θ ∓ ηĝ; weight decay is not defined")
        super().__init__(params, lr, mu, q, weight_decay, seed)
        self.choice = 0                 # h of the last estimate: 0 keeps θ, ±1 steps to θ ∓ ηĝ

    def estimate(self, closure, params, group):
        f = {0: float(closure())}                                        # 1) f(θ)
        est = super().estimate(closure, params, group)                   # 2) ĝ from 2q forwards
        q = len(est.seeds)
        for h in (1, -1):                                                # 3) f(θ − hηĝ)
            scales = [-h * group["lr"] * d / q for d in est.projected_grads]
            with rge.perturbed(params, est.seeds, scales, est.mask):
                f[h] = float(closure())
        self.choice = min(f, key=f.get)                 # the first minimum: ties keep θ
        est.loss, est.forward_passes = f[0], est.forward_passes + 3
        return est

    def update(self, p, g, state, group):
        if self.choice:
            p.add_(g, alpha=-self.choice * group["lr"])                  # θ ∓ ηĝ


class ZOAdam(ZeroOrderOptimizer):
    """ZO-Adam (App. A; ZO-AdaMM, Chen et al. 2019): 2q forwards, m, v (and V̂) in fp32.

        m_t = β1 m_{t−1} + (1 − β1) ĝ_t
        v_t = β2 v_{t−1} + (1 − β2) ĝ_t²
        V̂_t = max(V̂_{t−1}, v_t)                         (amsgrad=True; plain Adam: V̂_t = v_t)
        θ ← θ − η m̂_t / (√(V̂_t / (1 − β2^t)) + ε),   m̂_t = m_t / (1 − β1^t)

    App. A writes the max as max(v_t, v_{t−1}); we read it as ZO-AdaMM's running max (AMSGrad). The
    bias corrections are Kingma & Ba's (as torch.optim.Adam, amsgrad included, and the released
    code); App. A and ZO-AdaMM omit them, which only changes the first ~1/(1 − β2) steps. Weight
    decay is coupled (λθ added to ĝ, as for every ZO method here and torch.optim.Adam).
    """

    def __init__(self, params, lr, mu=1e-3, q=1, weight_decay=0.0, seed=0, beta1=0.9,
                 beta2=0.999, eps=1e-8, amsgrad=True):
        super().__init__(params, lr, mu, q, weight_decay, seed, beta1=beta1, beta2=beta2, eps=eps,
                         amsgrad=amsgrad)

    def update(self, p, g, state, group):
        beta1, beta2 = group["beta1"], group["beta2"]
        if not state:                   # fp32 moments: (1 − β2) ĝ² underflows in fp16
            state["step"] = 0
            names = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if group["amsgrad"] else [])
            for name in names:
                state[name] = torch.zeros_like(p, dtype=torch.float32)
        state["step"] += 1
        t = state["step"]
        m = state["exp_avg"].mul_(beta1).add_(g, alpha=1 - beta1)
        v = state["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
        if group["amsgrad"]:
            v = torch.maximum(state["max_exp_avg_sq"], v, out=state["max_exp_avg_sq"])
        denom = v.div(1 - beta2 ** t).sqrt_().add_(group["eps"])
        p.addcdiv_(m, denom, value=-group["lr"] / (1 - beta1 ** t))


class FwdGradSGD(ZOSGD):
    """Forward-Grad (App. A; Baydin et al. 2022): θ ← θ − η (∇fᵀu) u, q dual forwards, no state.

    ZO-SGD with the finite difference replaced by the exact directional derivative (a JVP).
    """

    def estimate(self, closure, params, group):
        seeds = [self.next_seed() for _ in range(group["q"])]
        return forward_grad.estimate(closure, params, seeds=seeds)


# ---- first order (back-prop) baselines ----------------------------------------------------------

def decay_groups(params, weight_decay):
    """Parameter groups with weight decay on ≥2-D tensors only (matrices, not norms or biases)."""
    params = list(params)
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


class BackProp:
    """Mixin turning a torch optimizer into `step(closure) -> float` with a backward inside.

    amp=True is mixed precision: the forward runs under autocast, in fp16 on CUDA with a GradScaler
    (the loss is scaled so that small fp16 gradients do not flush to zero, the update is skipped on
    inf/NaN), in bf16 on CPU (no scaler needed: bf16 has fp32's range). The weights, gradients and
    states keep their dtype, so use it with fp32 weights. A tensor used twice (tied weights) has
    its gradients summed in place (tied_grads.py).
    """
    forward_passes, projected_grad = 1, None

    def __init__(self, params, amp=False, **defaults):
        super().__init__(params, **defaults)
        self.device = next(p for g in self.param_groups for p in g["params"]).device.type
        self.amp_dtype = torch.float16 if self.device == "cuda" else torch.bfloat16
        self.amp = amp
        self.scaler = torch.amp.GradScaler(self.device, enabled=amp and self.device == "cuda")

    def step(self, closure=None) -> float:
        if closure is None:                       # the bare torch update, as GradScaler calls it
            return super().step()
        self.zero_grad(set_to_none=True)
        params = [p for g in self.param_groups for p in g["params"]]
        with torch.enable_grad():
            with tied_grads.in_place(params), torch.autocast(self.device, dtype=self.amp_dtype,
                                                              enabled=self.amp):
                loss = closure()
            self.scaler.scale(loss).backward()
        self.scaler.step(self)                    # unscale, then self.step() unless inf/NaN
        self.scaler.update()
        return float(loss.detach())


class FOSGD(BackProp, torch.optim.SGD):
    """FO-SGD: θ ← θ − η ∇f(θ), the gradient from back-prop."""

    def __init__(self, params, lr, weight_decay=0.0, amp=False):
        super().__init__(decay_groups(params, weight_decay), amp=amp, lr=lr)


class FOAdam(BackProp, torch.optim.AdamW):
    """FO-Adam: torch AdamW, i.e. Adam with decoupled weight decay θ ← θ − ηλθ (≥2-D tensors)."""

    def __init__(self, params, lr, weight_decay=0.0, beta1=0.9, beta2=0.999, eps=1e-8, amp=False):
        super().__init__(decay_groups(params, weight_decay), amp=amp, lr=lr, betas=(beta1, beta2),
                         eps=eps)


# ---- registry -----------------------------------------------------------------------------------

OPTIMIZERS = {
    "zo_sgd": ZOSGD,
    "zo_sgd_sign": ZOSGDSign,
    "zo_sgd_mmt": ZOSGDMomentum,
    "zo_sgd_cons": ZOSGDCons,
    "zo_adam": ZOAdam,
    "forward_grad": FwdGradSGD,
    "fo_sgd": FOSGD,
    "fo_adam": FOAdam,
}
