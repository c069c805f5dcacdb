"""fp32 matmuls on the CPU: route nn.Linear through oneDNN, which runs AVX-512 where MKL may not.

A ZO step is forwards (arXiv:2402.11592 §3: f(θ+μu) and f(θ−μu), no backward), and a forward is
matmuls: 92% of an OPT-125M forward on a CPU is `addmm`. torch's fp32 `F.linear` on an x86 CPU
calls MKL's sgemm, and MKL chooses its code by the processor's vendor: on an AMD processor it runs
its AVX2 code, half the width AVX-512 allows. oneDNN, also inside torch, chooses by instruction
set. On a 2-core AMD EPYC (Zen 5) VM the same fp32 products took (best of 5;
`python cpu_linear.py` measures them on this machine):

    x (rows × in) · Wᵀ (in → out)     MKL        oneDNN
    1024 × 768  → 3072               28.4 ms    12.9 ms   (2.2×)
    1024 × 3072 → 768                26.5 ms    12.9 ms   (2.1×)
    1024 × 768  → 50272 (LM head)   568 ms     302 ms     (1.9×)

torch reaches oneDNN for an fp32 linear only through an internal operator, the one its compiler
(inductor) emits: `torch.ops.mkldnn._linear_pointwise`, which has no autograd formula. So the
route is taken only where nothing is differentiated: no autograd recording and no forward-mode
tangent, which is every forward of a ZO step and every evaluation. There, `F.linear(x, W, b)`
and the paired forward's `addmm(b, x, Wᵀ, out=y)` / `mm(x, Wᵀ, out=y)` (rge._linear_pair) of fp32
CPU tensors run through oneDNN; all else (back-prop, 16-bit weights, which torch already sends to
oneDNN, CUDA) runs as before. So do products under MIN_MACS multiply-adds: a oneDNN call costs
~12 µs before it computes, an MKL call ~2 µs (16 × 16 → 16: 13 against 2 µs; they break even
near 128 × 128 → 128). A kernel is deterministic for a given shape, so the paired and the
sequential forward still see bitwise equal products. oneDNN sums in another order than MKL: the
products differ in the last bits (a few fp32 ulps, the rounding of any other kernel).

`route()` is a `TorchFunctionMode`: it sees every torch call in its block, a few µs each, so it
is entered around forwards alone (`routed(loss)`), not around the update's per-tensor draws and
writes, and only for a model whose median linear has MIN_WEIGHT entries (`pays`): on a
40-layer OPT of width 16, whose forwards are mostly per-tensor work (the perturbed copies are
made inside them), a step took 87 ms routed against 53 ms. train.py routes the loss closure and
the evaluation on the CPU (`--cpu_linear`, default onednn); where torch lacks the operator they
run as before.
"""
import functools
import time
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch.autograd import forward_ad
from torch.overrides import TorchFunctionMode

CHOICES = ("onednn", "torch")
MIN_MACS = 1 << 21    # rows × in × out below which torch's kernel is the faster one
MIN_WEIGHT = 1 << 16  # a model whose median linear is smaller is not routed (`pays`)


def available() -> bool:
    """Whether this torch has oneDNN and its fp32 linear operator."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _plain(*tensors) -> bool:
    """fp32 CPU tensors whose product nothing differentiates: autograd records nothing (under
    no_grad a tensor's requires_grad does not matter) and none carries a forward-mode tangent."""
    return not torch.is_grad_enabled() and all(
        t.dtype == torch.float32 and t.device.type == "cpu"
        and forward_ad.unpack_dual(t).tangent is None for t in tensors)


def _large(x, weight) -> bool:
    """At least MIN_MACS multiply-adds: where oneDNN's fixed cost is paid back."""
    return x.numel() * weight.shape[0] >= MIN_MACS


def _linear(x, weight, bias):
    """oneDNN's x Wᵀ + b on the rows of x flattened (copied if strided: an LM head reads one
    position of every sequence)."""
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    y = torch.ops.mkldnn._linear_pointwise(rows, weight, bias, "none", [], "")
    return y.view(*x.shape[:-1], weight.shape[0])


class _OneDNNLinear(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:                           # F.linear(x, W, b=None)
            x, weight, *rest = args
            bias = kwargs.get("bias", rest[0] if rest else None)
            tensors = (x, weight) if bias is None else (x, weight, bias)
            if _plain(*tensors) and weight.is_contiguous() and _large(x, weight):
                return _linear(x, weight, bias)
        elif func in (torch.addmm, torch.mm) and set(kwargs) == {"out"}:
            *bias, x, wt = args                      # addmm(b, x, Wᵀ, out=y), mm(x, Wᵀ, out=y)
            out = kwargs["out"]
            if (_plain(x, wt, out, *bias) and wt.t().is_contiguous() and _large(x, wt.t())
                    and all(b.dim() == 1 for b in bias)):
                return out.copy_(_linear(x, wt.t(), *bias or [None]))
        return func(*args, **kwargs)


def _check(kernel: str):
    if kernel not in CHOICES:
        raise ValueError(f"cpu_linear: unknown kernel {kernel!r}; choose one of {CHOICES}")


@contextmanager
def route(kernel: str = "onednn"):
    """Within the block, fp32 CPU linears outside autograd run on `kernel` (CHOICES): oneDNN,
    or torch's default (MKL on x86). oneDNN where torch lacks it: the default."""
    _check(kernel)
    with _OneDNNLinear() if kernel == "onednn" and available() else nullcontext():
        yield


def pays(model: torch.nn.Module) -> bool:
    """Whether routing `model`'s forwards pays for the mode, whose cost is per torch call: its
    median linear has ≥ MIN_WEIGHT entries (256 × 256; 32 rows through it reach MIN_MACS). A
    small model's one large linear, the LM head of a real vocabulary, does not count."""
    sizes = sorted(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    return bool(sizes) and sizes[len(sizes) // 2] >= MIN_WEIGHT


def kernel_for(model: torch.nn.Module, device, kernel: str) -> str:
    """The kernel `model`'s forwards on `device` run on: `kernel` on the CPU where routing pays
    (`pays`), torch's everywhere else."""
    _check(kernel)
    return kernel if torch.device(device).type == "cpu" and pays(model) else "torch"


def routed(fn, kernel: str = "onednn"):
    """fn with each call inside `route(kernel)`; its signature is kept (rge reads a loss
    closure's `pair` parameter)."""
    _check(kernel)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        with route(kernel):
            return fn(*args, **kwargs)
    return call


# ---- the kernels side by side ----------------------------------------------------------------

def best_seconds(fn, reps=5) -> float:
    """The fastest of `reps` runs of fn()."""
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    """OPT-125M's linears at 16 × 64 tokens (and its LM head), each kernel timed in turn."""
    if not available():
        raise SystemExit("cpu_linear: this torch has no oneDNN fp32 linear; nothing to compare")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for rows, d_in, d_out in ((1024, 768, 768), (1024, 768, 3072), (1024, 3072, 768),
                              (1024, 768, 50272)):
        x, w = torch.randn(rows, d_in), torch.randn(d_out, d_in)
        with torch.no_grad():
            default = best_seconds(lambda: F.linear(x, w))
            with route("onednn"):
                onednn = best_seconds(lambda: F.linear(x, w))
        print(f"{rows} x {d_in} -> {d_out}: torch {1e3 * default:.1f} ms, oneDNN "
              f"{1e3 * onednn:.1f} ms ({default / onednn:.2f}x)")


if __name__ == "__main__":
    main()
