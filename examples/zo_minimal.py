"""ZO-SGD in 60 lines: a classifier trained from forward passes alone, with MeZO's seed trick.

A zeroth-order step estimates the gradient from two losses (arXiv:2402.11592 §3, the (RGE) estimate
with q = 1) and takes an SGD step with it (eq. (2), h(ĝ) = ĝ):

    g = [f(θ + μz) − f(θ − μz)] / (2μ),   z ~ N(0, I);      θ ← θ − η g z.

g is one number, the slope of the loss along z, and g z is ∇f on average over z (eq. (1)).
MeZO (Malladi et al. 2023, arXiv:2305.17333, Alg. 1) never stores z: it keeps the seed z was
drawn from and regenerates z, tensor by tensor, whenever it needs it. One step, one seed, θ
written in place four times:

    θ += μz;  f+ = f(θ);   θ −= 2μz;  f− = f(θ);   θ += μz (back to θ);   θ −= η g z.

So training holds the weights plus one tensor of z at a time: no gradient, no optimizer state, no
activations kept for a backward pass. The price: g z points along one random direction, so its
cosine to ∇f is about 1/√d for d weights, and ZO-SGD takes many more steps than back-prop.
The project computes the same step without writing θ for the forwards (rge.py, optimizers.py).

    python examples/zo_minimal.py          # a few seconds on a laptop CPU
"""
import torch
import torch.nn.functional as F
from torch import nn

STEPS, BATCH, LR, MU = 3000, 64, 4e-3, 1e-3
torch.manual_seed(0)


def mlp(width):
    return nn.Sequential(nn.Linear(8, width), nn.Tanh(), nn.Linear(width, 3))


# The task: 8-d Gaussian points in 3 classes, labelled by a random "teacher" network (its logits
# standardised per class, so that the three classes are about equally frequent).
x_all = torch.randn(3000, 8)
with torch.no_grad():
    logits = mlp(16)(x_all)
    y_all = ((logits - logits.mean(0)) / logits.std(0)).argmax(1)
x_train, y_train, x_test, y_test = x_all[:2000], y_all[:2000], x_all[2000:], y_all[2000:]
model = mlp(32)                                              # the student: d = 387 weights
params = list(model.parameters())


def loss(x, y) -> float:
    return float(F.cross_entropy(model(x), y))


def perturb(seed, scale):
    """θ += scale · z, with z regenerated tensor by tensor from `seed` alone (never stored)."""
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.add_(torch.randn(p.shape, generator=gen), alpha=scale)


@torch.no_grad()
def zo_sgd_step(x, y):
    """One ZO-SGD step on the batch (x, y): both losses on the same batch, as a slope needs."""
    seed = int(torch.randint(2**62, (1,)))     # the whole perturbation, in one integer
    perturb(seed, +MU)
    f_plus = loss(x, y)                        # f(θ + μz)
    perturb(seed, -2 * MU)
    f_minus = loss(x, y)                       # f(θ − μz)
    perturb(seed, +MU)                         # θ restored (up to rounding)
    g = (f_plus - f_minus) / (2 * MU)          # projected gradient: the slope along z
    perturb(seed, -LR * g)                     # θ ← θ − η g z, the same z again


@torch.no_grad()
def report(step):
    accuracy = (model(x_test).argmax(1) == y_test).float().mean()
    print(f"step {step:5d}  train loss {loss(x_train, y_train):.4f}  test accuracy {accuracy:.3f}")


report(0)
for step in range(1, STEPS + 1):
    batch = torch.randint(len(x_train), (BATCH,))
    zo_sgd_step(x_train[batch], y_train[batch])
    if step % 500 == 0:
        report(step)
