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

import rge


# ---- zeroth order -------------------------------------------------------------------------------

class ZeroOrderOptimizer(torch.optim.Optimizer):
    """Base of the BP-free optimizers: estimate ĝ from forward passes, then update tensor by tensor.

    Seeds come from the optimizer's own generator (never the global RNG), so a run is reproducible
    from `seed` alone and nothing else that draws random numbers changes u.
    """

    def __init__(self, params, lr, mu=1e-3, q=1, weight_decay=0.0, seed=0, **defaults):
        super().__init__(params, dict(lr=lr, mu=mu, q=q, weight_decay=weight_decay, **defaults))
        self.seeds = torch.Generator().manual_seed(seed)
        self.forward_passes = 0       # of the last step, for the log
        self.projected_grad = None    # mean (f+ − f−)/(2μ) of the last step, for the log

    def next_seed(self) -> int:
        return int(torch.randint(2**40, (1,), generator=self.seeds))

    def estimate(self, closure, params, group) -> rge.Estimate:
        seeds = [self.next_seed() for _ in range(group["q"])]
        return rge.estimate(closure, params, seeds=seeds, mu=group["mu"])

    @torch.no_grad()
    def step(self, closure) -> float:
        losses, self.forward_passes = [], 0
        for group in self.param_groups:
            est = self.estimate(closure, group["params"], group)
            for p, g in rge.gradients(est, group["params"]):
                if group["weight_decay"] and p.dim() >= 2:      # decay matrices, not norms/biases
                    g.add_(p, alpha=group["weight_decay"])
                self.update(p, g, self.state[p], group)
            losses.append(est.loss)
            self.forward_passes += est.forward_passes
            self.projected_grad = sum(est.coeffs)   # c_j = d_j / q, so Σ c_j = mean d_j
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
