"""Optimizers: exact invariants (lr = 0, determinism, pass counts), reference steps, behaviour.

    python -m pytest tests/test_optimizers.py -q
"""
import copy

import pytest
import torch

import optimizers
import rge
from tiny import tiny_model

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def tiny_lm(family="opt", dtype=torch.float32, seed=0):
    """A tiny model (64-token vocabulary), a fixed batch, and its LM-loss closure."""
    model = tiny_model(family, dtype=dtype, vocab_size=64, seed=seed)
    ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(seed))
    return model, lambda: model(input_ids=ids, labels=ids).loss.float()


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_zero_lr_leaves_weights_bitwise_unchanged(dtype):
    """20 ZO-SGD steps with lr = 0 change no bit of any weight, in fp32, fp16 and bf16."""
    model, loss = tiny_lm(dtype=dtype)
    before = snapshot(model)
    opt = optimizers.build("zo_sgd", list(model.parameters()), lr=0.0, mu=1e-3)
    for _ in range(20):
        opt.step(loss)
    assert opt.projected_grad != 0.0                    # the estimate did see the perturbation
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_same_seed_same_step():
    """Two runs from the same seed are bitwise equal; another seed gives another step."""
    runs = []
    for seed in (5, 5, 6):
        model, loss = tiny_lm()
        opt = optimizers.build("zo_sgd", list(model.parameters()), lr=1e-3, seed=seed)
        for _ in range(3):
            opt.step(loss)
        runs.append(snapshot(model))
    assert all(torch.equal(runs[0][n], runs[1][n]) for n in runs[0])
    assert not all(torch.equal(runs[0][n], runs[2][n]) for n in runs[0])


@pytest.mark.parametrize("q", [1, 3])
def test_three_gaussian_passes_per_query(q, monkeypatch):
    """ZO-SGD draws u 3q times per tensor and step: 2q perturbed forwards, q for the update."""
    model, loss = tiny_lm("llama")                     # untied head: one owner per tensor
    params = list(model.parameters())
    calls = []
    draw = rge.direction
    monkeypatch.setattr(rge, "direction", lambda p, s, i, *m: calls.append(i) or draw(p, s, i, *m))
    opt = optimizers.build("zo_sgd", params, lr=1e-3, q=q)
    opt.step(loss)
    assert sorted(calls) == sorted(list(range(len(params))) * 3 * q)
    assert opt.forward_passes == 2 * q


def test_zo_sgd_step_matches_formula():
    """θ' = θ − η Σ_j c_j u_j, with u_j rebuilt here from the seeds, c_j from two losses."""
    model, loss = tiny_lm()
    params = list(model.parameters())
    oracle = copy.deepcopy(model)
    opt = optimizers.build("zo_sgd", params, lr=1e-2, mu=1e-3, q=2, seed=3)
    g = torch.Generator().manual_seed(3)                # the optimizer's seed stream
    seeds = [int(torch.randint(2**40, (1,), generator=g)) for _ in range(2)]
    ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(0))
    f = lambda m: float(m(input_ids=ids, labels=ids).loss.detach())
    coeffs = []
    for s in seeds:                                    # f(θ ± μu) on explicit weight copies
        values = []
        for sign in (1, -1):
            m = copy.deepcopy(oracle)
            with torch.no_grad():
                for i, p in enumerate(m.parameters()):
                    p.add_(rge.direction(p, s, i), alpha=sign * 1e-3)
            values.append(f(m))
        coeffs.append((values[0] - values[1]) / (2 * 1e-3 * 2))
    opt.step(loss)
    with torch.no_grad():
        for i, (p, p0) in enumerate(zip(params, oracle.parameters())):
            step = sum(c * rge.direction(p0, s, i) for s, c in zip(seeds, coeffs))
            torch.testing.assert_close(p, p0 - 1e-2 * step, rtol=1e-5, atol=1e-6)


def test_zo_sgd_lowers_the_loss():
    """ZO-SGD on a tiny model cuts its training loss clearly within 300 steps."""
    model, loss = tiny_lm()
    with torch.no_grad():
        start = float(loss())
    opt = optimizers.build("zo_sgd", list(model.parameters()), lr=2e-3, mu=1e-3, seed=0)
    for _ in range(300):
        opt.step(loss)
    with torch.no_grad():
        assert float(loss()) < start - 0.1, (start, float(loss()))


def test_fo_sgd_step_matches_autograd():
    """FO-SGD: θ' = θ − η ∇f(θ) with ∇f from autograd on a copy."""
    model, loss = tiny_lm()
    oracle = copy.deepcopy(model)
    ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(0))
    grads = torch.autograd.grad(oracle(input_ids=ids, labels=ids).loss,
                                list(oracle.parameters()))
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = optimizers.build("fo_sgd", params, lr=0.1)
    opt.step(loss)
    for p, p0, g in zip(params, oracle.parameters(), grads):
        torch.testing.assert_close(p.detach(), p0.detach() - 0.1 * g, rtol=1e-5, atol=1e-6)
