"""Optimizers: zeroth-order (BP-free) methods and their first-order (back-prop) baselines.

Math (arXiv:2402.11592 §3, eq. (2)): every method here is one update rule

    θ_{t+1} = θ_t − η_t · h(ĝ_t),

where ĝ_t estimates ∇f(θ_t) and h turns it into a step. The ZO methods get ĝ from an estimator
(rge.estimate: 2q forward passes, no back-prop) as an `Estimate` of a few scalars, and consume it
tensor by tensor (rge.gradients redraws u from the seeds), so nothing gradient-sized is stored
beyond one tensor at a time plus the method's own state. The FO baselines get ĝ = ∇f from back-prop.

Structure: `ZeroOrderOptimizer.step(closure)` draws seeds, calls `self.estimate`, then for each
tensor calls `self.update(p, g, scale, state, group)` with ĝ_p = scale·g, which returns the step
(t, a): θ ← θ + a·t, and `write`s it, the only write to the weights (checked finite; stochastic
rounding for 16-bit weights). A method is a subclass that overrides `update` (the rule sits under
its formula). Three also override `estimate`, where the change lives in the scalars: Forward-Grad
(a JVP instead of a finite difference), ZO-SGD-Sign's scalar mode (sign(d_j)) and ZO-SGD-Cons
(three more forwards choose h ∈ {0, ĝ, −ĝ}). `closure()` returns the scalar loss of the current
batch; the ZO step calls it 2q times, or q times as `closure(pair=True)` on a batch it doubles
(rge.estimate), the FO step once under autograd. Weight decay λ acts on ≥2-D tensors only: added
to ĝ (coupled) for ZO and FO-SGD, decoupled for FO-Adam (AdamW). `OPTIMIZERS` maps `--opt` names
to classes.

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

ROUNDINGS = ("stochastic", "nearest")   # how 16-bit weights take a ZO update
SAMPLE = 4096             # entries per tensor sampled for moved_fraction
# entries a 16-bit write rounds at a time: its fp32 buffers stay in the CPU's cache; on a GPU a
# chunk is a few kernels over 2^24 entries, and caps the fp32 buffers at 64 MB each
ROUND_CHUNK = {"cpu": 1 << 18}
ROUND_CHUNK_ELSEWHERE = 1 << 24


# ---- zeroth order -------------------------------------------------------------------------------

def add_random_bits_(bits: torch.Tensor, k: int, generator) -> torch.Tensor:
    """bits += r, r uniform on [0, 2^k) (k ≤ 16) and independent per entry; bits is int32.

    On the CPU four r come from one 64-bit draw, its 16-bit lanes: torch's CPU randint spends a
    32-bit draw and a division on each entry, and this is 3× faster. A lane read as int16 is
    uniform on [−2^15, 2^15): its low k bits are uniform on [0, 2^k), and for k = 16 it is
    shifted by 2^15. Elsewhere (CUDA: one Philox kernel) randint itself.
    """
    if bits.device.type != "cpu":
        return bits.add_(torch.randint(0, 1 << k, bits.shape, generator=generator,
                                       device=bits.device, dtype=torch.int32))
    n = bits.numel()
    lanes = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-2**63, None,
                                                                 generator=generator)
    r = lanes.view(torch.int16)[:n].view(bits.shape)         # all 64 bits: [−2^63, 2^63)
    if k < 16:
        return bits.add_(r.bitwise_and_((1 << k) - 1))
    return bits.add_(r).add_(1 << 15)


def round_stochastically_(p: torch.Tensor, x: torch.Tensor, generator) -> torch.Tensor:
    """p ← x (fp32) rounded to p's 16-bit dtype, up or down with probabilities that make the
    rounding exact in expectation: E[p] = x. Overwrites x.

    Both neighbours of x in bf16 (fp16) share its leading 16 (19) bits, so adding a uniform
    random integer below 2^k to x's bit pattern and clearing its last k bits (k = 16 for bf16, 13
    for fp16) rounds x up with probability (x − lower)/(upper − lower). In fp16's subnormal range
    (|x| < 6.1e-5) the grid is coarser than k bits and the last cast rounds to nearest instead.
    For bf16 the top 16 bits are then p's bits as they are (a shift, no cast).
    """
    k = 16 if p.dtype == torch.bfloat16 else 13
    bits = add_random_bits_(x.view(torch.int32), k, generator)
    if p.dtype == torch.bfloat16:   # bf16 is fp32's top 16 bits: shift them straight into p,
        torch.bitwise_right_shift(bits, 16, out=p.view(torch.int16))    # one pass, not two
        return p
    return p.copy_(bits.bitwise_and_(-(1 << k)).view(torch.float32))


def _chunks(p: torch.Tensor, t: torch.Tensor):
    """Matching flat chunks of p (views: written in place) and t, ROUND_CHUNK entries each; p and
    t whole when p is not contiguous."""
    if not p.is_contiguous():
        return [(p, t)]
    n = ROUND_CHUNK.get(p.device.type, ROUND_CHUNK_ELSEWHERE)
    return zip(p.view(-1).split(n), t.reshape(-1).split(n))


def _sample(p: torch.Tensor) -> torch.Tensor:
    """Up to SAMPLE entries of p, evenly strided: a view of p when p is contiguous, else a copy."""
    return p.detach().reshape(-1)[::max(1, p.numel() // SAMPLE)][:SAMPLE]


class ZeroOrderOptimizer(torch.optim.Optimizer):
    """Base of the BP-free optimizers: estimate ĝ from forward passes, then update tensor by tensor.

    Seeds come from the optimizer's own generator (never the global RNG), so a run is reproducible
    from `seed` alone and nothing else that draws random numbers changes u.

    The step: `estimate` gives ĝ = Σ_j (d_j/q) u_j as scalars; for each tensor, rge.gradients
    yields (g, scale) with ĝ_p = scale·g (q = 1: g = u, scale = d), and the method's `update`
    returns its step as (t, a): θ ← θ + a·t. So ZO-SGD writes θ − (η d)·u in one pass over u,
    with d folded into the step size. The write (`write`) is the only one to the weights:
    - a non-finite step size is refused before anything is written (FloatingPointError);
    - 16-bit weights with rounding="stochastic" (the default) get θ + a·t computed in fp32 and
      rounded up or down at random, unbiased (`round_stochastically_`, a generator seeded from
      the step's seed and the tensor index, apart from u's), ROUND_CHUNK entries at a time, so
      the fp32 buffers are a chunk's, never a tensor's. Rounding to nearest drops every
      change below half a unit in the last place: with weights ~0.02 and η·d·u ~ 1e-6 that is
      most of a bf16 step (see docs/speed.md). fp32 weights are written with a plain add;
    - `moved_fraction`: the share of a fixed sample of entries (up to 4096 per tensor, strided)
      that the last step changed, for the log.

    Hyper-parameters of every ZO method: lr, mu, q, weight_decay, seed, and
    - pair (True): evaluate f(θ + μu) and f(θ − μu) in one walk over a doubled batch when the
      closure supports it (`closure(pair=True)`, see rge.estimate): u is drawn once per query
      instead of twice, and a tied tensor once per forward (its two copies kept for its second
      reader); the activations double. The fast path. pair=False (or a plain closure): two
      forwards, 3 draws (a tied tensor 5), one module's copies at a time: the lean path, for
      long sequences on a model that barely fits (Tab. 5's ZO row holds for it);
    - rounding ("stochastic" | "nearest"): how 16-bit weights take the update;
    - allow_unreached (False): let a trainable tensor that no module forward reads pass.

    Variants (§5), options of every subclass that overrides only `update`:
    - block-wise ZO (Tab. 6): one param group per block. `step` estimates and updates the groups in
      turn (Gauss–Seidel: block b is estimated where blocks before it have already moved), each with
      its own seeds, so no two blocks share a direction; 2q forwards per block.
    - sparse ZO (Tab. 8): a group with "sparsity" (a ratio s_i per tensor) uses masked directions
      u ⊙ m; its mask seed is redrawn every "mask_every" steps, and rge.direction draws m from it.
    """

    def __init__(self, params, lr, mu=1e-3, q=1, weight_decay=0.0, seed=0, *, pair=True,
                 rounding="stochastic", allow_unreached=False, rule=None):
        if rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
        super().__init__(params, dict(lr=lr, mu=mu, q=q, weight_decay=weight_decay, pair=pair,
                                      rounding=rounding, allow_unreached=allow_unreached,
                                      **(rule or {})))
        self.seed_stream = torch.Generator().manual_seed(seed)  # draws the seeds
        self.forward_passes = 0       # of the last step, for the log
        self.projected_grad = None    # mean (f+ − f−)/(2μ) of the last step, for the log
        self.moved_fraction = None    # share of sampled entries the last step changed
        self.tied = set()             # ids of tensors read more than once per forward (learned)

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

    def known_tied(self, params) -> set[int]:
        """Indices of the tensors that an earlier forward showed are read more than once."""
        return {i for i, p in enumerate(params) if id(p) in self.tied}

    def learn_tied(self, params, est) -> rge.Estimate:
        """Remember est's tensors read twice: from the next forward on, each is drawn once."""
        self.tied |= {id(params[i]) for i in est.tied}
        return est

    def estimate(self, closure, params, group) -> rge.Estimate:
        mask = self.mask(group)
        seeds = [self.next_seed() for _ in range(group["q"])]
        pair = group["pair"] and rge.supports_pair(closure)
        # paired: a tensor read twice is perturbed once per forward, its copies kept for its
        # second reader; sequential stays at one module's copies at a time (Tab. 5's max_l |x_l|)
        tied = self.known_tied(params) if pair else set()
        return self.learn_tied(params, rge.estimate(
            closure, params, seeds=seeds, mu=group["mu"], mask=mask, pair=pair, tied=tied,
            allow_unreached=group["allow_unreached"]))

    @torch.no_grad()
    def step(self, closure) -> float:
        losses, projected, self.forward_passes = [], [], 0
        changed, sampled = {}, 0      # moved_fraction's sample: counts per device (device_map)
        for group in self.param_groups:                     # one group per block when block-wise
            est = self.estimate(closure, group["params"], group)
            for i, (p, g, scale) in enumerate(rge.gradients(est, group["params"])):
                if group["weight_decay"] and p.dim() >= 2:      # decay matrices, not norms/biases
                    wide = torch.promote_types(p.dtype, torch.float32)
                    g = g.to(wide).mul_(scale).add_(p, alpha=group["weight_decay"])
                    scale = 1.0                                   # ĝ + λθ, formed in fp32
                t, a = self.update(p, g, scale, self.state[p], group)
                c, n = self.write(p, t, a, group, seed=est.seeds[0], i=i)
                changed.setdefault(c.device, []).append(c)
                sampled += n
            losses.append(est.loss)
            projected.append(sum(est.projected_grads) / len(est.projected_grads))
            self.forward_passes += est.forward_passes
        self.projected_grad = sum(projected) / len(projected)
        moved = sum(int(torch.stack(c).sum()) for c in changed.values())    # a sync per device
        self.moved_fraction = moved / max(sampled, 1)
        return sum(losses) / len(losses)

    def write(self, p, t, a, group, *, seed, i) -> tuple[torch.Tensor, int]:
        """θ ← θ + a·t, the only write to the weights (see the class docstring). Returns how many
        of a strided sample of p's entries changed (a 0-d tensor: no host sync) and of how many."""
        if not math.isfinite(a):
            raise FloatingPointError(f"zo: the step size of tensor #{i} {tuple(p.shape)} is {a} "
                                     "(a diverged estimate); no weight was written")
        sample = _sample(p)
        before = sample.clone()
        if p.dtype in (torch.float16, torch.bfloat16) and group["rounding"] == "stochastic":
            gen = rge.generator(p.device, rge.ROUNDING, seed, i)
            for pc, tc in _chunks(p, t):        # θ + a·t in fp32 a chunk at a time, not whole
                round_stochastically_(pc, pc.float().add_(tc, alpha=a), gen)
        else:
            p.add_(t, alpha=a)
        after = sample if p.is_contiguous() else _sample(p)     # a view sees the in-place write
        return torch.ne(after, before).sum(), before.numel()

    def update(self, p, g, scale, state, group) -> tuple[torch.Tensor, float]:
        """The method's step for tensor p given ĝ_p = scale·g: (t, a) with θ ← θ + a·t."""
        raise NotImplementedError


class ZOSGD(ZeroOrderOptimizer):
    """ZO-SGD (MeZO): θ ← θ − η ĝ.  2q forwards per step, no state."""

    def update(self, p, g, scale, state, group):
        return g, -group["lr"] * scale                                 # eq. (2), h(ĝ) = ĝ


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

    def __init__(self, params, lr, sign="element", **options):
        if sign not in ("element", "scalar"):
            raise ValueError(f"sign must be 'element' or 'scalar', got {sign!r}")
        super().__init__(params, lr, **options, rule=dict(sign=sign))

    def estimate(self, closure, params, group):
        est = super().estimate(closure, params, group)
        if group["sign"] == "scalar":                   # ĝ = (1/q) Σ_j sign(d_j) u_j
            est.projected_grads = [math.copysign(1.0, d) if d else 0.0
                                   for d in est.projected_grads]
        return est

    def update(self, p, g, scale, state, group):
        if group["sign"] == "element":                  # sign(scale·g) = sign(scale)·sign(g)
            return g.sign_(), -group["lr"] * (math.copysign(1.0, scale) if scale else 0.0)
        return g, -group["lr"] * scale                                 # eq. (2), h = sign


class ZOSGDMomentum(ZeroOrderOptimizer):
    """ZO-SGD-MMT (App. A; torch SGD momentum without dampening): 2q forwards, m in fp32.

        m_t = β m_{t−1} + ĝ_t,   θ ← θ − η m_t          (β = momentum, m_0 = 0)
    """

    def __init__(self, params, lr, momentum=0.9, **options):
        super().__init__(params, lr, **options, rule=dict(momentum=momentum))

    def update(self, p, g, scale, state, group):
        if "momentum_buffer" not in state:      # fp32 even for half weights, where β m + ĝ rounds
            state["momentum_buffer"] = torch.zeros_like(p, dtype=torch.float32)
        m = state["momentum_buffer"].mul_(group["momentum"]).add_(g, alpha=scale)  # in fp32
        return m, -group["lr"]


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

    def __init__(self, params, lr, weight_decay=0.0, **options):
        if weight_decay:
            raise ValueError("zo_sgd_cons compares f at θ and θ ∓ ηĝ; weight decay is not defined")
        super().__init__(params, lr, **options)
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

    def update(self, p, g, scale, state, group):
        return g, -self.choice * group["lr"] * scale                     # θ ∓ ηĝ, or θ


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

    def __init__(self, params, lr, beta1=0.9, beta2=0.999, eps=1e-8, amsgrad=True, **options):
        super().__init__(params, lr, **options,
                         rule=dict(beta1=beta1, beta2=beta2, eps=eps, amsgrad=amsgrad))

    def update(self, p, g, scale, state, group):
        beta1, beta2 = group["beta1"], group["beta2"]
        if not state:                   # fp32 moments: (1 − β2) ĝ² underflows in fp16
            state["step"] = 0
            names = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if group["amsgrad"] else [])
            for name in names:
                state[name] = torch.zeros_like(p, dtype=torch.float32)
        state["step"] += 1
        t = state["step"]
        m = state["exp_avg"].mul_(beta1).add_(g, alpha=(1 - beta1) * scale)      # in fp32
        v = state["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=(1 - beta2) * scale * scale)
        if group["amsgrad"]:
            v = torch.maximum(state["max_exp_avg_sq"], v, out=state["max_exp_avg_sq"])
        denom = v.div(1 - beta2 ** t).sqrt_().add_(group["eps"])
        return torch.div(m, denom, out=denom), -group["lr"] / (1 - beta1 ** t)


class FwdGradSGD(ZOSGD):
    """Forward-Grad (App. A; Baydin et al. 2022): θ ← θ − η (∇fᵀu) u, q dual forwards, no state.

    ZO-SGD with the finite difference replaced by the exact directional derivative (a JVP).
    """

    def estimate(self, closure, params, group):
        seeds = [self.next_seed() for _ in range(group["q"])]
        return self.learn_tied(params, forward_grad.estimate(
            closure, params, seeds=seeds, tied=self.known_tied(params),
            allow_unreached=group["allow_unreached"]))


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
