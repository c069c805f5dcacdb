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


def test_every_bit_of_the_seed_and_stream_reaches_the_cpu_generator():
    """torch's CPU generator (mt19937) keeps only the low 32 bits of its seed. Seeds 2^12 apart
    (and 2^32 apart) must still give uncorrelated u, and u, its mask and its stochastic rounding
    must be three streams: the first raw draws of each differ. n = 4096: the bound is 5/√n."""
    p = torch.empty(4096)
    corr = lambda x, y: float(torch.corrcoef(torch.stack([x, y]))[0, 1])   # noqa: E731
    for seed in (3, 2**30 + 7):
        u = rge.direction(p, seed, 5)
        for other in (seed + 2**12, seed + 2**32, seed ^ (1 << 39)):
            assert abs(corr(u, rge.direction(p, other, 5))) < 5 / 4096 ** 0.5, other
    first = {s: torch.randint(2**31, (8,), generator=rge.generator("cpu", s, 11, 2)).tolist()
             for s in (rge.U, rge.MASK, rge.ROUNDING)}
    assert len({tuple(v) for v in first.values()}) == 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_u_on_the_cpu_is_chunks_each_from_its_own_generator(dtype, monkeypatch):
    """gaussian(): chunk c of u is torch.randn (fp32) of CHUNK entries from the generator keyed
    (U, seed, i, c), rounded to the dtype (here CHUNK = 64 and 7·28 = 3·64 + 4 entries: the last
    chunk is short), whatever the number of threads that draw them; the chunks are distinct."""
    monkeypatch.setattr(rge, "CHUNK", 64)
    expected = torch.cat([torch.randn(n, generator=rge.generator("cpu", rge.U, 5, 3, c))
                          for c, n in enumerate((64, 64, 64, 4))]).to(dtype)
    for threads in (1, 3):
        monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
        u = rge.direction(torch.empty(7, 28, dtype=dtype), 5, 3)
        assert u.dtype == dtype and u.shape == (7, 28)
        assert torch.equal(u.flatten(), expected)
    assert not torch.equal(u.flatten()[:64], u.flatten()[64:128])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_a_tensor_of_one_chunk_draws_as_its_generator_alone(dtype):
    """Up to CHUNK entries, u is torch.randn of the tensor's generator (chunk 0's key is the
    tensor's own), on the calling thread, in the tensor's dtype (fp64 keeps its precision)."""
    u = rge.direction(torch.empty(100, 30, dtype=dtype), 3, 4)
    g = rge.generator("cpu", rge.U, 3, 4)
    assert torch.equal(u, torch.randn(100, 30, generator=g, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_u_is_standard_normal_across_chunks(dtype):
    """A u of 2·CHUNK + 3 entries: mean 0 and variance 1 within 5 standard errors (1/√n and
    √(2/n)), and its chunks uncorrelated (< 5/√CHUNK)."""
    u = rge.direction(torch.empty(2 * rge.CHUNK + 3, dtype=dtype), 9, 0).float()
    n = u.numel()
    assert abs(float(u.mean())) < 5 / n ** 0.5
    assert abs(float(u.var()) - 1) < 5 * (2 / n) ** 0.5
    first, second = u[:rge.CHUNK], u[rge.CHUNK:2 * rge.CHUNK]
    assert abs(float(torch.corrcoef(torch.stack([first, second]))[0, 1])) < 5 / rge.CHUNK ** 0.5


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_functional_perturbation_equals_explicit_weights(family):
    """f seen inside `perturbed` equals f of a copy whose weights were really set to θ + μu."""
    model = tiny_model(family, vocab_size=64)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    params = [p for p in model.parameters()]            # tied OPT embedding counted once
    with torch.no_grad(), rge.perturbed(params, seed=7, scale=0.05) as reads:
        inside = lm_loss(model, ids)()
    oracle = copy.deepcopy(model)
    with torch.no_grad():
        for i, p in enumerate(oracle.parameters()):
            p.add_(rge.direction(p, 7, i), alpha=0.05)
    assert set(reads) == set(range(len(params)))
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
    g_hat = torch.cat([(s * g).flatten() for _, g, s in rge.gradients(est, params)])
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


# ---- u as the optimizer uses it: statistics, not rge.direction's own logic -----------------------

class TwoLayers(torch.nn.Module):
    """Two same-shaped 64×64 weights (fp64), so two tensors of one step can be compared."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(64, 64, bias=False), torch.nn.Linear(64, 64, bias=False)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x))).pow(2).mean()


def applied_directions(steps=2, lr=1e-3):
    """The u of each ZO-SGD step (q = 1), read back from the weights: Δθ = −η d u, so
    u = Δθ / (−η d) with d the step's projected gradient (fp64 keeps the division exact)."""
    import optimizers
    torch.manual_seed(0)
    net, x = TwoLayers().double(), torch.randn(8, 64, dtype=torch.float64)
    opt = optimizers.ZOSGD(list(net.parameters()), lr=lr, mu=1e-4, seed=1)
    us = []
    for _ in range(steps):
        before = [p.detach().clone() for p in net.parameters()]
        opt.step(lambda: net(x))
        d = opt.projected_grad
        us.append([((p.detach() - b) / (-lr * d)).flatten() for p, b in zip(net.parameters(),
                                                                             before)])
    return us


def test_u_is_standard_normal_and_independent_across_tensors_and_steps():
    """Each u_i of a step: mean 0, variance 1; u_a and u_b of one step, and u_a of two steps,
    uncorrelated. n = 4096 entries per tensor: the standard errors are 1/√n = 0.016 (mean,
    correlation) and √(2/n) = 0.022 (variance); the bounds are 5 of them. A u that ignored the
    tensor index (the same u for both same-shaped weights) has correlation 1."""
    (a1, b1), (a2, _) = applied_directions()
    n = a1.numel()
    for u in (a1, b1, a2):
        assert abs(float(u.mean())) < 5 / n ** 0.5
        assert abs(float(u.var()) - 1) < 5 * (2 / n) ** 0.5
    corr = lambda x, y: float(torch.corrcoef(torch.stack([x, y]))[0, 1])   # noqa: E731
    assert abs(corr(a1, b1)) < 5 / n ** 0.5, "two tensors of one step share a direction"
    assert abs(corr(a1, a2)) < 5 / n ** 0.5, "two steps share a direction"


def test_a_tensor_no_module_reads_is_an_error_unless_allowed():
    """A trainable tensor outside every module forward would get c·u for nothing: refused."""
    net = torch.nn.Linear(3, 1)
    stray = torch.nn.Parameter(torch.ones(2))
    loss = lambda: net(torch.ones(1, 3)).sum() + stray.sum()          # read outside a module
    with pytest.raises(ValueError, match=r"1 trainable tensor\(s\) never entered .*torch.compile"):
        rge.estimate(loss, [*net.parameters(), stray], seeds=[1], mu=1e-3)
    est = rge.estimate(loss, [*net.parameters(), stray], seeds=[1], mu=1e-3,
                       allow_unreached=True)
    assert est.forward_passes == 2
