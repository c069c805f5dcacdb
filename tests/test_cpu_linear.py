"""cpu_linear.py: fp32 CPU linears outside autograd run on oneDNN; everything else as before.

Oracles: oneDNN's operator called directly (the route took it), a float64 product (only fp32
rounding differs), torch's own kernel outside the route (autograd and tangents untouched), the
sequential estimate (the paired one still equals it), and a train.py run on torch's kernel.
"""
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import forward_ad

import cpu_linear
import rge
import train
from test_speed_paths import assert_same_estimate, tiny
from test_train import opt_dir, read_log, small_run  # noqa: F401  (opt_dir: a fixture)
from tiny import needs_shared

needs_onednn = pytest.mark.skipif(not cpu_linear.available(),
                                  reason="this torch has no oneDNN fp32 linear")


@pytest.fixture
def any_size(monkeypatch):
    """Route products and models of every size (the tiny ones here are below the thresholds)."""
    monkeypatch.setattr(cpu_linear, "MIN_MACS", 0)
    monkeypatch.setattr(cpu_linear, "MIN_WEIGHT", 0)


def operands(rows=(4, 5), d_in=16, d_out=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*rows, d_in, generator=g), torch.randn(d_out, d_in, generator=g),
            torch.randn(d_out, generator=g))


def onednn(x, w, b=None):
    """oneDNN's product, called directly."""
    flat = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), w, b, "none", [], "")
    return flat.view(*x.shape[:-1], w.shape[0])


@needs_onednn
@pytest.mark.parametrize("bias", ["positional", "keyword", "none"])
def test_route_runs_onednn_and_rounds_like_fp32(bias, any_size):
    x, w, b = operands()
    args, kwargs = {"positional": ((b,), {}), "keyword": ((), {"bias": b}),
                    "none": ((), {})}[bias]
    with torch.no_grad(), cpu_linear.route():
        y = F.linear(x, w, *args, **kwargs)
        module = torch.nn.Linear(16, 8, bias=bias != "none")
        module.weight.copy_(w)
        if module.bias is not None:
            module.bias.copy_(b)
        from_module = module(x)
        last = F.linear(x[:, -1], w, *args, **kwargs)      # strided rows: an LM head's input
    used = b if bias != "none" else None
    assert torch.equal(y, onednn(x, w, used)) and torch.equal(from_module, y)
    assert torch.equal(last, onednn(x[:, -1].contiguous(), w, used))
    exact = F.linear(x.double(), w.double(), None if used is None else used.double())
    assert torch.allclose(y.double(), exact, rtol=1e-6, atol=1e-5)


@needs_onednn
@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_the_paired_linear_runs_onednn_per_half(bias, strided, any_size):
    """rge._linear_pair's addmm/mm(out=) under the route: each half is oneDNN's F.linear of it."""
    x, w0, b0 = operands(seed=1)
    _, w1, b1 = operands(seed=2)
    x = x[:, -1] if strided else x
    b0, b1 = (b0, b1) if bias else (None, None)
    with torch.no_grad(), cpu_linear.route():
        joined = rge._linear_pair(x, 8, [(w0, b0), (w1, b1)])
    assert torch.equal(joined, torch.cat([onednn(x[:2].contiguous(), w0, b0),
                                          onednn(x[2:].contiguous(), w1, b1)]))


def test_autograd_tangents_other_dtypes_and_outside_run_torch_kernel(any_size):
    """Recorded for back-prop, carrying a forward-mode tangent, bf16, or outside the block: the
    product is torch's own (bitwise), and its gradient and tangent are there."""
    x, w, b = operands()
    reference = F.linear(x, w, b)
    weight = w.clone().requires_grad_()
    with cpu_linear.route():
        y = F.linear(x, weight, b)
        with torch.no_grad():
            half = F.linear(x.bfloat16(), w.bfloat16())
    assert torch.equal(y, reference) and torch.equal(half, F.linear(x.bfloat16(), w.bfloat16()))
    y.sum().backward()
    assert torch.allclose(weight.grad, x.reshape(-1, 16).sum(0).expand(8, 16))
    t = torch.randn_like(w)
    with torch.no_grad(), forward_ad.dual_level(), cpu_linear.route():
        value, tangent = forward_ad.unpack_dual(F.linear(x, forward_ad.make_dual(w, t), b))
    assert torch.equal(value, reference) and torch.allclose(tangent, F.linear(x, t), atol=1e-6)


@needs_onednn
@pytest.mark.parametrize("scheme", ["ft", "lora"])
def test_paired_estimate_still_equals_sequential_under_the_route(scheme, any_size):
    """The kernel is the same for both halves and for the sequential forwards: the same d, and
    the same as on torch's kernel up to fp32 rounding of f. routed() keeps the loss's `pair`."""
    model, params, loss = tiny("opt", scheme)
    routed = cpu_linear.routed(loss)
    assert rge.supports_pair(routed)
    seq = rge.estimate(routed, params, seeds=[5, 6], mu=1e-2)
    pair = rge.estimate(routed, params, seeds=[5, 6], mu=1e-2, pair=True)
    assert_same_estimate(seq, pair, 1e-2)
    assert_same_estimate(rge.estimate(loss, params, seeds=[5, 6], mu=1e-2), pair, 1e-2)


@needs_onednn
def test_small_products_and_calls_outside_routed_run_torch_kernel(monkeypatch):
    """Under MIN_MACS multiply-adds torch's kernel runs (bitwise), at MIN_MACS oneDNN's; a
    routed function routes only its own calls."""
    x, w, b = operands()                                   # 4·5 rows × 16 → 8: 2560
    monkeypatch.setattr(cpu_linear, "MIN_MACS", x.numel() * 8 + 1)
    with torch.no_grad():
        below = cpu_linear.routed(F.linear)(x, w, b)
        monkeypatch.setattr(cpu_linear, "MIN_MACS", x.numel() * 8)
        at = cpu_linear.routed(F.linear)(x, w, b)
        after = F.linear(x, w, b)
    assert torch.equal(below, F.linear(x, w, b)) and torch.equal(after, below)
    assert torch.equal(at, onednn(x, w, b))


def test_a_model_pays_for_the_route_when_its_median_linear_is_large():
    """pays(): the median linear has MIN_WEIGHT entries."""
    def linears(*widths):
        return torch.nn.Sequential(*[torch.nn.Linear(w, w) for w in widths], torch.nn.ReLU())
    assert cpu_linear.pays(linears(256, 256, 16)) and not cpu_linear.pays(linears(256, 16, 16))


@needs_shared
def test_train_does_not_route_a_model_of_small_linears(opt_dir, tmp_path, monkeypatch):
    """The tiny OPT (small linears, a real-vocabulary head) is not routed, whatever
    --cpu_linear says."""
    monkeypatch.setattr(cpu_linear, "MIN_MACS", 0)
    monkeypatch.setattr(cpu_linear, "route", lambda kernel: pytest.fail(f"routed to {kernel}")
                        if kernel == "onednn" else nullcontext())
    train.cli(small_run(opt_dir, tmp_path / "out", "--steps", "2", "--cpu_linear", "onednn"))


def test_an_unknown_kernel_is_refused_in_one_line():
    for make in (lambda: cpu_linear.route("mkl").__enter__(),
                 lambda: cpu_linear.routed(F.linear, "mkl")):
        with pytest.raises(ValueError, match=r"unknown kernel 'mkl'; choose one of"):
            make()


@needs_shared
@needs_onednn
def test_train_on_either_kernel_logs_the_same_losses(opt_dir, tmp_path, any_size, monkeypatch):
    """train.py's --cpu_linear: 6 ZO-SGD steps on oneDNN (its forwards' products, and only
    theirs) and on torch's kernel, the same losses and projected gradients up to fp32 rounding."""
    logs, calls = {}, []
    product = cpu_linear._linear
    monkeypatch.setattr(cpu_linear, "_linear", lambda *a: calls.append(1) or product(*a))
    for kernel in cpu_linear.CHOICES:
        out = tmp_path / kernel
        train.cli(small_run(opt_dir, out, "--steps", "6", "--lr", "1e-3", "--cpu_linear",
                            kernel))
        logs[kernel] = read_log(out)
        assert bool(calls) == (kernel == "onednn")
        calls.clear()
    for a, b in zip(*logs.values(), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["projected_grad"] == pytest.approx(b["projected_grad"], rel=1e-3, abs=1e-3)
