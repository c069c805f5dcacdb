"""The randomized gradient estimate: reference checks against autograd and an explicit perturbation.

    python -m pytest tests/test_rge.py -q
"""
import copy

import pytest
import torch

import rge
from tiny import tiny_model


def lm_loss(model, ids):
    return lambda: model(input_ids=ids, labels=ids).loss.float()


def test_direction_depends_on_seed_and_index_only():
    """u(seed, i) is the same whatever was drawn before, and differs across seeds and tensors."""
    p = torch.empty(5, 7)
    a = rge.direction(p, 3, 1)
    torch.randn(100)                                   # the global RNG moves; u must not
    assert torch.equal(a, rge.direction(p, 3, 1))
    assert not torch.equal(a, rge.direction(p, 3, 2))
    assert not torch.equal(a, rge.direction(p, 4, 1))


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_functional_perturbation_equals_explicit_weights(family):
    """f seen inside `perturbed` equals f of a copy whose weights were really set to θ + μu."""
    model = tiny_model(family, vocab_size=64)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    params = [p for p in model.parameters()]            # tied OPT embedding counted once
    with torch.no_grad(), rge.perturbed(params, seed=7, scale=0.05) as reached:
        inside = lm_loss(model, ids)()
    oracle = copy.deepcopy(model)
    with torch.no_grad():
        for i, p in enumerate(oracle.parameters()):
            p.add_(rge.direction(p, 7, i), alpha=0.05)
    assert reached == set(range(len(params)))
    torch.testing.assert_close(inside, lm_loss(oracle, ids)(), rtol=1e-6, atol=1e-6)
    assert not torch.isclose(inside, lm_loss(model, ids)())  # and θ itself is back in place


def test_weights_restored_when_the_forward_raises():
    """A loss that fails mid-forward leaves every module holding its original Parameter."""
    model = tiny_model("opt", vocab_size=64)
    before = {n: p for n, p in model.named_parameters()}
    with pytest.raises(IndexError), torch.no_grad():
        with rge.perturbed(list(model.parameters()), seed=1, scale=1.0):
            model(input_ids=torch.tensor([[1, 2, 99]]))    # token 99 is out of the vocabulary
    assert all(p is before[n] for n, p in model.named_parameters())


def test_rge_agrees_with_autograd():
    """With many queries, ĝ points along autograd's gradient (cosine far above chance ≈ 0.1)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    net = net.double()
    x, y = torch.randn(32, 6, dtype=torch.float64), torch.randn(32, 1, dtype=torch.float64)
    loss = lambda: ((net(x) - y) ** 2).mean()
    params = list(net.parameters())
    grads = torch.autograd.grad(loss(), params)
    est = rge.estimate(loss, params, seeds=list(range(4000)), mu=1e-4)
    g_hat = torch.cat([g.flatten() for _, g in rge.gradients(est, params)])
    g_true = torch.cat([g.flatten() for g in grads])
    cosine = torch.nn.functional.cosine_similarity(g_hat, g_true, dim=0)
    assert cosine > 0.9, f"cosine {cosine:.3f}"
    assert est.forward_passes == 8000
    assert est.loss == pytest.approx(loss().item(), rel=1e-5)     # mean of f± ≈ f(θ) + O(μ²)


def test_projected_gradient_is_the_directional_derivative():
    """For one direction, c = (f(θ+μu) − f(θ−μu))/2μ matches autograd's ∇f·u to O(μ²)."""
    torch.manual_seed(1)
    w = torch.nn.Linear(5, 3).double()
    x = torch.randn(4, 5, dtype=torch.float64)
    loss = lambda: torch.sin(w(x)).sum()
    params = list(w.parameters())
    grads = torch.autograd.grad(loss(), params)
    est = rge.estimate(loss, params, seeds=[11], mu=1e-5)
    dot = sum((g * rge.direction(p, 11, i)).sum() for i, (p, g) in enumerate(zip(params, grads)))
    assert est.projected_grads[0] == pytest.approx(float(dot), rel=1e-6)
