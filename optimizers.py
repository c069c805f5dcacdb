"""Optimizers: zeroth-order (BP-free) methods and their first-order (back-prop) baselines.

Math (arXiv:2402.11592 §3, eq. (2)): every method here is one update rule

    θ_{t+1} = θ_t − η_t · h(ĝ_t),

where ĝ_t estimates ∇f(θ_t) and h turns it into a step. The ZO methods get ĝ from an estimator
(rge.estimate: 2q forward passes, no back-prop) as an `Estimate` of a few scalars, and consume it
tensor by tensor (rge.gradients redraws u from the seeds), so nothing gradient-sized is stored beyond
one tensor at a time plus the method's own state. The FO baselines get ĝ = ∇f from back-prop.

Structure: `ZeroOrderOptimizer.step(closure)` draws seeds, calls the estimator, then calls
`self.update(p, g, state, group)` for each tensor; a method is a subclass that overrides `update`
(the rule sits under its formula). `closure()` returns the scalar loss of the current batch; the ZO
step calls it 2q times, the FO step once under autograd. `OPTIMIZERS` maps `--opt` names to classes.

References: 1) Zhang et al. 2024, arXiv:2402.11592, §3, App. A. 2) MeZO, Malladi et al. 2023,
arXiv:2305.17333 (ZO-SGD). 3) Ghadimi & Lan 2013 (ZO-SGD convergence).
Not here: the estimate itself (rge.py, forward_grad.py); the loss (tasks.py); the loop (train.py).
"""
import inspect

import torch
from torch.nn.modules.module import register_module_forward_pre_hook

import rge


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
        self.seeds = torch.Generator().manual_seed(seed)
        self.forward_passes = 0       # of the last step, for the log
        self.projected_grad = None    # mean (f+ − f−)/(2μ) of the last step, for the log

    def next_seed(self) -> int:
        return int(torch.randint(2**40, (1,), generator=self.seeds))

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
        losses, coeffs, self.forward_passes = [], [], 0
        for group in self.param_groups:                     # one group per block when block-wise
            est = self.estimate(closure, group["params"], group)
            for p, g in rge.gradients(est, group["params"]):
                if group["weight_decay"] and p.dim() >= 2:      # decay matrices, not norms/biases
                    g.add_(p, alpha=group["weight_decay"])
                self.update(p, g, self.state[p], group)
            losses.append(est.loss)
            coeffs.append(sum(est.coeffs))      # c_j = d_j / q, so Σ c_j = mean d_j
            self.forward_passes += est.forward_passes
        self.projected_grad = sum(coeffs) / len(coeffs)
        return sum(losses) / len(losses)

    def update(self, p, g, state, group):
        raise NotImplementedError


class ZOSGD(ZeroOrderOptimizer):
    """ZO-SGD (MeZO): θ ← θ − η ĝ.  2q forwards per step, no state."""

    def update(self, p, g, state, group):
        p.add_(g, alpha=-group["lr"])                                  # eq. (2), h(ĝ) = ĝ


# ---- first order (back-prop) baselines ----------------------------------------------------------

def decay_groups(params, weight_decay):
    """Parameter groups with weight decay on ≥2-D tensors only (matrices, not norms or biases)."""
    params = list(params)
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


class BackProp:
    """Mixin turning a torch optimizer into `step(closure) -> float` with a backward inside."""
    forward_passes, projected_grad = 1, None

    def step(self, closure) -> float:
        self.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = closure()
            loss.backward()
        super().step()
        return float(loss.detach())


class FOSGD(BackProp, torch.optim.SGD):
    """FO-SGD: θ ← θ − η ∇f(θ), the gradient from back-prop."""

    def __init__(self, params, lr, weight_decay=0.0):
        super().__init__(decay_groups(params, weight_decay), lr=lr)


# ---- §5 variants: blocks and the hybrid ZO-FO split --------------------------------------------

FO_PARTNER = {"zo_sgd": "fo_sgd", "zo_adam": "fo_adam"}    # --zo_layers: the back-prop half


def layers(model) -> torch.nn.ModuleList:
    """The transformer layers: the first non-empty nn.ModuleList of the model (OPT decoder.layers,
    LLaMA/Mistral model.layers, RoBERTa encoder.layer)."""
    return next(m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m))


@torch.no_grad()
def blocks(model, params) -> list[tuple[int, list]]:
    """`params` by block (§5): (−1, embeddings), (j, layer j) for each layer j, (n, norm/head).

    A tensor outside the layers joins the embeddings if its module runs before layer 0 in a
    one-token forward, else the head. Registration order cannot tell (OPT registers its final norm
    before its layers), and the hybrid split must get the embeddings right, or back-prop would run
    down to them. A tied head stays with the embeddings. Blocks without a trainable tensor are
    dropped: OPT-1.3B has 26 (both embeddings in one, 24 layers, final norm; the released code
    counts 27, with the two embeddings apart); with LoRA a block is its layer's adapters.
    """
    stack = layers(model)
    block = {id(p): j for j, layer in enumerate(stack) for p in layer.parameters()}
    ran = []
    hook = register_module_forward_pre_hook(lambda module, args: ran.append(module))
    try:
        device = model.get_input_embeddings().weight.device
        model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device))
    finally:
        hook.remove()
    for module in ran[:ran.index(stack[0])]:
        for p in module.parameters(recurse=False):
            block.setdefault(id(p), -1)
    parts = {}
    for p in params:
        parts.setdefault(block.get(id(p), len(stack)), []).append(p)
    return sorted(parts.items())


class Hybrid:
    """Hybrid ZO-FO (§5, Tab. 7): ZO on the embeddings and first K layers, back-prop on the rest.

    The ZO tensors have requires_grad False, so autograd records nothing before the first FO
    tensor: back-prop stops at layer K+1 and only layers K+1…n keep activations, so the memory
    falls as K grows. One step (Gauss–Seidel over the two parts, like block-wise ZO):
    1) the FO step: one forward at θ_t, whose loss is the step's loss, backward, update of the deep
       tensors; 2) the ZO step of the shallow tensors, 2q forwards at the updated deep tensors.
    FO first, so the logged loss is the unperturbed f(θ_t), as in a pure FO run.
    """

    def __init__(self, zo, fo):
        self.zo, self.fo = zo, fo
        self.param_groups = zo.param_groups + fo.param_groups   # the loop sets their lr

    def step(self, closure) -> float:
        loss = self.fo.step(closure)
        self.zo.step(closure)
        self.forward_passes = self.fo.forward_passes + self.zo.forward_passes
        self.projected_grad = self.zo.projected_grad
        return loss


# ---- registry -----------------------------------------------------------------------------------

OPTIMIZERS = {
    "zo_sgd": ZOSGD,
    "fo_sgd": FOSGD,
}


def build(name: str, params, **hparams) -> torch.optim.Optimizer:
    """The optimizer `name` over `params`, given the hyper-parameters its constructor takes."""
    cls = OPTIMIZERS[name]
    accepted = inspect.signature(cls.__init__).parameters
    return cls(params, **{k: v for k, v in hparams.items() if k in accepted})


def check_variant(name: str, model=None, *, block=False, zo_layers=None, sparsity=0.0):
    """Raise ValueError, in one line, for a §5 variant that optimizer `name` cannot run."""
    cls, zo = OPTIMIZERS[name], ZeroOrderOptimizer
    if (block or zo_layers is not None or sparsity) and not issubclass(cls, zo):
        raise ValueError(f"--block, --zo_layers and --sparsity are options of the ZO optimizers, "
                         f"not of {name}")
    if block and inspect.unwrap(cls.step) is not inspect.unwrap(zo.step):    # torch wraps step
        raise ValueError(f"{name} steps the whole model at once; it has no --block mode")
    if zo_layers is not None and FO_PARTNER.get(name) not in OPTIMIZERS:
        pairs = ", ".join(f"{z} + {f}" for z, f in FO_PARTNER.items() if f in OPTIMIZERS)
        raise ValueError(f"--zo_layers pairs {pairs}; {name} has no first-order partner")
    if sparsity and cls.estimate is not zo.estimate:
        raise ValueError(f"--sparsity masks RGE directions; {name} draws none")
    if not 0 <= sparsity < 1:
        raise ValueError(f"--sparsity must be in [0, 1), got {sparsity}")
    if model is not None and zo_layers is not None and not 0 <= zo_layers <= len(layers(model)):
        raise ValueError(f"--zo_layers must be in 0..{len(layers(model))}, got {zo_layers}")


def build_variant(name: str, model, params, *, block=False, zo_layers=None, sparsity=0.0,
                  mask_every=1, **hparams):
    """`build` with the §5 variants, which combine: block-wise (a param group per block), hybrid
    (`zo_layers` = K: `name` on the embeddings and first K layers, its FO_PARTNER on the rest)
    and sparse (ratios of the ZO tensors by rge.sparsity_ratios, masks redrawn every `mask_every`
    steps). A model is needed for blocks and the hybrid split only."""
    check_variant(name, model, block=block, zo_layers=zo_layers, sparsity=sparsity)
    params = list(params)
    if not (block or zo_layers is not None or sparsity):
        return build(name, params, **hparams)
    parts = blocks(model, params) if block or zo_layers is not None else [(-1, params)]
    cut = float("inf")                          # blocks with a key below the cut are tuned by ZO
    if zo_layers is not None:                   # Tab. 7's ends: K = 0 leaves even the embeddings
        n = len(layers(model))                  # to FO, K = n gives ZO the head too
        cut = -1 if zo_layers == 0 else zo_layers if zo_layers < n else n + 1
    fo = [p for key, ps in parts if key >= cut for p in ps]
    zo = [ps for key, ps in parts if key < cut]
    if not block:
        zo = [[p for ps in zo for p in ps]]
    groups = [{"params": ps} for ps in zo if ps]
    if sparsity:
        ratios = iter(rge.sparsity_ratios([p for ps in zo for p in ps], sparsity))
        for g in groups:
            g.update(sparsity=[next(ratios) for _ in g["params"]], mask_every=mask_every)
    if zo_layers is not None:                   # autograd then records nothing below layer K
        fo_ids = {id(p) for p in fo}
        for p in params:
            p.requires_grad_(id(p) in fo_ids)
    zo_opt = build(name, groups, **hparams) if groups else None
    fo_opt = build(FO_PARTNER[name], fo, **hparams) if fo else None
    return Hybrid(zo_opt, fo_opt) if zo_opt and fo_opt else zo_opt or fo_opt
