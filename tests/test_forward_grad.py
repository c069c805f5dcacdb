"""Forward gradient: the JVP equals autograd's directional derivative; the step; the pitfalls.

    python -m pytest tests/test_forward_grad.py -q
"""
import copy

import pytest
import torch

import forward_grad
import optimizers
import rge
from tiny import FAMILIES, tiny_model, make_optimizer

# no pad ids (0, 1): back-prop treats nn.Embedding's padding_idx row as constant, a JVP does not
IDS = torch.randint(2, 64, (2, 9), generator=torch.Generator().manual_seed(0))


def lm_loss(model):
    return lambda: model(input_ids=IDS, labels=IDS).loss.float()


def autograd_slopes(model, seeds):
    """∇f(θ)ᵀu_j by back-prop on a copy, u_j rebuilt from the seeds."""
    oracle = copy.deepcopy(model).requires_grad_(True)
    params = list(oracle.parameters())
    grads = torch.autograd.grad(lm_loss(oracle)(), params)
    return [float(sum((g * rge.direction(p, s, i)).sum()
                      for i, (p, g) in enumerate(zip(params, grads)))) for s in seeds]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_directional_derivative_matches_autograd(family, attention):
    """One dual forward gives f(θ) and ∇fᵀu equal to back-prop's, in every family (fp32)."""
    model = tiny_model(family, vocab_size=64)
    model.set_attn_implementation(attention)            # SDPA runs on its math backend here
    params = list(model.parameters())                   # OPT's tied embedding counted once
    loss, slope, _ = forward_grad.directional_derivative(lm_loss(model), params, seed=5)
    assert loss == pytest.approx(float(lm_loss(model)().detach()), rel=1e-6)
    assert slope == pytest.approx(autograd_slopes(model, [5])[0], rel=1e-5, abs=1e-6)


def test_a_tied_tensor_gets_one_dual_per_forward(monkeypatch):
    """OPT's embedding is also its head. The first step learns it (drawn per reader); from then
    on u is drawn once per forward, and ∇fᵀu is the same as with one dual per reader."""
    model = tiny_model("opt", vocab_size=64)
    params = list(model.parameters())
    per_reader = forward_grad.estimate(lm_loss(model), params, seeds=[5])
    assert per_reader.tied == {0}
    calls, draw = [], rge.direction
    monkeypatch.setattr(rge, "direction", lambda p, s, i, *m: calls.append(i) or draw(p, s, i, *m))
    once = forward_grad.estimate(lm_loss(model), params, seeds=[5], tied={0})
    assert sorted(calls) == list(range(len(params)))                  # each tensor once
    assert once.projected_grads[0] == pytest.approx(per_reader.projected_grads[0], rel=1e-6)
    opt = make_optimizer("forward_grad", params, lr=0.0)
    opt.step(lm_loss(model))
    calls.clear()
    opt.step(lm_loss(model))
    assert sorted(calls) == sorted(list(range(len(params))) * 2)      # + 1 each: the update


def test_forward_grad_step_matches_formula():
    """θ' = θ − η (1/q) Σ_j (∇fᵀu_j) u_j with ∇f from autograd (q = 2), in q forward passes."""
    model = tiny_model("llama", vocab_size=64)
    oracle = copy.deepcopy(model)
    g = torch.Generator().manual_seed(3)                # the optimizer's seed stream
    seeds = [int(torch.randint(2**40, (1,), generator=g)) for _ in range(2)]
    slopes = autograd_slopes(oracle, seeds)
    opt = make_optimizer("forward_grad", list(model.parameters()), lr=1e-2, q=2, seed=3)
    opt.step(lm_loss(model))
    assert opt.forward_passes == 2
    for i, (p, p0) in enumerate(zip(model.parameters(), oracle.parameters())):
        step = sum(d / 2 * rge.direction(p0, s, i) for s, d in zip(seeds, slopes))
        torch.testing.assert_close(p.detach(), p0.detach() - 1e-2 * step, rtol=1e-5, atol=1e-6)


def test_non_finite_slope_stops_before_any_write():
    """A tangent that overflows (fp16) raises FloatingPointError and leaves θ bitwise intact."""
    layer = torch.nn.Linear(4, 1).half()
    before = layer.weight.detach().clone()
    x = torch.full((4,), 1e4, dtype=torch.float16)      # tangent uᵀx·1e4 > fp16's 65504
    opt = make_optimizer("forward_grad", list(layer.parameters()), lr=1.0)
    with pytest.raises(FloatingPointError, match="directional derivative"):
        opt.step(lambda: layer(x).sum() * 1e4)
    assert torch.equal(layer.weight, before)


def test_inference_mode_is_refused():
    """Under inference_mode the JVP would silently be 0: refused with one clear line."""
    layer = torch.nn.Linear(4, 1)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        forward_grad.estimate(lambda: layer(torch.ones(4)).sum(), list(layer.parameters()),
                              seeds=[0])
