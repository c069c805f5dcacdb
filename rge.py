"""Randomized gradient estimation (RGE): the gradient of a loss from forward passes alone.

Math (arXiv:2402.11592 §3, eq. (1)): for a loss f(θ), q random directions u_j ~ N(0, I) and a
smoothing radius μ, the two-sided estimate is

    ĝ = (1/q) Σ_j d_j · u_j,   d_j = [f(θ + μu_j) − f(θ − μu_j)] / (2μ),

an unbiased estimate of the gradient of the Gaussian-smoothed loss f_μ(θ) = E_u f(θ + μu), which
tends to ∇f(θ) as μ → 0 and q grows. The scalar d_j, the projected gradient, estimates the
directional derivative ∇f(θ)ᵀu_j.

The memory trick (MeZO, arXiv:2305.17333, Alg. 1): u is never stored. The slice of u_j that belongs
to trainable tensor i is drawn from its own generator seeded by (seed_j, i), so it can be redrawn at
any time, for any subset of tensors, in any order. The whole estimate is an `Estimate`: a loss, q
seeds and q coefficients. An optimizer consumes it one tensor at a time through `gradients`.

The weights are never written here. f(θ ± μu) is evaluated *functionally*: around the forward
call of each module that owns a trainable tensor, a hook swaps the tensor for its perturbed copy
θ_i ± μu_i and puts the original back when the module returns. So the only write to θ is the
optimizer's update: with lr = 0 the weights stay bitwise equal in any dtype, where the usual
in-place +μ, −2μ, +μ round trip rounds three times and drifts in fp16/bf16.

Draws per ZO-SGD step (each a Gaussian pass over every trainable tensor, the dominant cost after
the forwards). The in-place scheme draws u four times. Here:
- the paired forward (`perturbed_pair`, the default when the loss supports it): the loss doubles
  its batch, and each owning module runs its first half at θ + μu and its second at θ − μu, both
  copies made from one draw of u: f(θ + μu) and f(θ − μu) come from one walk over the layers
  (ZO2's "dual forward"), u is drawn once per query and once more by the update: 2 draws;
- the sequential path (`perturbed` twice): two forwards, 3 draws, half the activations;
- a tensor read by two modules (OPT's and RoBERTa's tied embedding, also the LM head: 31% of
  OPT-125M) can be perturbed once per forward, its copy kept for its second reader (`keep`),
  once an earlier forward has shown it is read twice (`Estimate.tied`). The optimizers do so
  on the paired path; the sequential one, chosen for memory, holds one module's copies at a time.
The update then folds d into its step size: θ − (η d)·u, one pass over u (`gradients`).

Sparse directions (§5, Tab. 8): u_i ⊙ m_i, m_i ~ Bernoulli(1 − s_i) drawn inside `direction`, so
the perturbation and the update share it; s_i = share of |θ_i| ≤ τ, τ the S-quantile of all |θ| of
the pretrained weights (overall sparsity S), so tensors of small weights get more zeros.

References: 1) MeZO, Malladi et al. 2023, arXiv:2305.17333. 2) Zhang et al. 2024, ZO-Bench,
arXiv:2402.11592, §3 and App. A. 3) Nesterov & Spokoiny 2017, Gaussian smoothing.
4) ZO2 (Wang et al. 2025), whose "dual forward" the paired forward follows.
Not here: the updates that consume ĝ (optimizers.py); the forward-mode estimate (forward_grad.py).
"""
import inspect
import math
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch.nn.modules.module import (register_module_forward_hook,
                                     register_module_forward_pre_hook)

SEED_BITS = 20        # tensor index bits in a draw's key: up to 2^20 trainable tensors
U, MASK, ROUNDING = 0, 1, 2   # the random streams a (seed, tensor) pair has: u, its mask, rounding
CHUNK = 1 << 18       # entries per draw of u on the CPU, each from its own generator (`gaussian`)
SERIAL = 1 << 15      # entries below which torch runs an elementwise op on one thread (its grain)
_GOLDEN = 0x9E3779B97F4A7C15  # 2^64/φ: chunk c's key is the tensor's key + c·_GOLDEN, then mixed


@dataclass
class Mask:
    """Sparse directions: each entry of u_i is zeroed with probability ratios[i]."""
    seed: int                  # < 2^40; one per parameter group and mask window
    ratios: list[float]        # s_i, one per tensor


@dataclass
class Estimate:
    """ĝ = (1/q) Σ_j projected_grads[j] · u(seeds[j]): the whole gradient estimate in a few
    scalars, q = len(seeds)."""
    loss: float                # mean of f(θ+μu_j) and f(θ−μu_j) over the queries ≈ f(θ)
    seeds: list[int]           # one seed per direction u_j
    projected_grads: list[float]  # d_j = [f(θ+μu_j) − f(θ−μu_j)] / (2μ) ≈ ∇fᵀu_j
    forward_passes: int        # forwards spent on this estimate
    mask: Mask | None = None   # the directions' sparse mask, if any
    tied: set[int] = field(default_factory=set)  # tensors read more than once in a forward


# ---- directions ---------------------------------------------------------------------------------

_THREAD = threading.local()   # .generators: device → this thread's generator, reseeded before
                              # every draw (creating one costs 18 µs)
_POOL = {}                        # threads → the CPU draw's thread pool
_MASK64 = (1 << 64) - 1


def _mix(key: int) -> int:
    """splitmix64's finaliser: a bijection of 64-bit words in which every output bit depends on
    every input bit. torch's CPU generator (mt19937) keeps only the low 32 bits of its seed, so
    the raw key (stream << 60 | seed << 20 | i) would give seeds 2^12 apart the same u, and u,
    its mask and its rounding one stream; mixed, distinct keys collide only by chance (2^-32)."""
    key = (key ^ (key >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
    key = (key ^ (key >> 27)) * 0x94D049BB133111EB & _MASK64
    return key ^ (key >> 31)


def generator(device, stream: int, seed: int, i: int, chunk: int = 0) -> torch.Generator:
    """This thread's generator for the device, seeded for draw `stream` (U, MASK or ROUNDING) of
    tensor i under `seed` (< 2^40), and for its chunk (`gaussian`; chunk 0 is the whole draw
    where there is one): the numbers depend on these alone, never on an earlier draw."""
    device = torch.device(device)
    if not hasattr(_THREAD, "generators"):
        _THREAD.generators = {}
    generators = _THREAD.generators
    if device not in generators:
        generators[device] = torch.Generator(device=device)
    key = (stream << 60 | seed << SEED_BITS | i) + chunk * _GOLDEN
    return generators[device].manual_seed(_mix(key & _MASK64))


def _pool() -> ThreadPoolExecutor:
    """A thread per torch thread, for the CPU draws (torch releases the GIL inside an op)."""
    n = torch.get_num_threads()
    if n not in _POOL:
        _POOL[n] = ThreadPoolExecutor(n, thread_name_prefix="rge-draw")
    return _POOL[n]


def gaussian(shape, device, dtype, stream: int, seed: int, i: int) -> torch.Tensor:
    """N(0, I) of `shape` in `dtype`, for draw `stream` of tensor i under `seed`.

    CUDA: one draw in `dtype`. CPU: torch's normal_ runs on one core (and is vectorised for fp32
    alone: a bf16 draw takes 1.45× as long, fp16 1.2×), so u is drawn CHUNK entries at a time,
    chunk c from its own generator (key (stream, seed, i, c)), the chunks spread over a thread
    per torch thread; a 16-bit chunk is drawn in fp32 and rounded into u (fp32 and fp64 are
    drawn in their dtype). u depends on CHUNK, never on the number of threads; a tensor of one
    chunk is torch.randn of its generator.
    """
    if torch.device(device).type != "cpu":
        return torch.randn(shape, generator=generator(device, stream, seed, i), device=device,
                           dtype=dtype)
    native = dtype not in (torch.float16, torch.bfloat16)     # fp32, fp64: drawn as they are
    if math.prod(shape) <= CHUNK:       # one chunk, drawn here: no per-chunk set-up
        u = torch.randn(shape, generator=generator("cpu", stream, seed, i),
                        dtype=dtype if native else torch.float32)
        return u if native else u.to(dtype)
    u = torch.empty(shape, dtype=dtype)
    parts = u.view(-1).split(CHUNK)

    def draw(c):
        g = generator("cpu", stream, seed, i, c)
        if native:
            parts[c].normal_(generator=g)
        else:   # rounded in pieces that torch copies on one thread: on a worker thread a
                # parallel op would start an OpenMP team of its own, more threads than cores
            fp32 = torch.randn(parts[c].shape, generator=g)
            for piece, value in zip(parts[c].split(SERIAL), fp32.split(SERIAL)):
                piece.copy_(value)

    list(_pool().map(draw, range(len(parts))))            # list(): re-raises a worker's error
    return u


def direction(p: torch.Tensor, seed: int, i: int, mask: Mask | None = None) -> torch.Tensor:
    """u for tensor i: N(0, I) shaped like p, from a generator seeded by (seed, i) alone.

    The only source of u in the project. A generator freshly seeded per tensor (never the global
    RNG) makes u independent of the order tensors are visited in, and of anything else that draws
    random numbers.
    With a mask, each entry is zeroed where a uniform draw from (mask.seed, i) falls below s_i:
    exactly Bernoulli(s_i). (The released code thresholds a normal draw and zeroes a share Φ(s_i).)
    """
    u = gaussian(p.shape, p.device, p.dtype, U, seed, i)
    if mask is not None and mask.ratios[i] > 0:
        gen = generator(p.device, MASK, mask.seed, i)
        u.masked_fill_(torch.rand(p.shape, generator=gen, device=p.device) < mask.ratios[i], 0)
    return u


@torch.no_grad()
def sparsity_ratios(params: list[torch.Tensor], sparsity: float, iters: int = 40) -> list[float]:
    """s_i = share of |θ_i| ≤ τ, where τ is the `sparsity`-quantile of |θ| over all the tensors.

    τ by bisection on [0, max |θ|], counting |θ_i| ≤ τ one tensor at a time on its own device, so
    no copy of the weights is gathered (the released code concatenates them all on the CPU); each
    of the `iters` halvings reads the weights once.
    """
    def count(tau):
        return sum(int(torch.count_nonzero(p.abs() <= tau)) for p in params)

    target = sparsity * sum(p.numel() for p in params)
    lo, hi = 0.0, max(float(p.abs().max()) for p in params)
    for _ in range(iters):                     # count(hi) ≥ target throughout
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if count(mid) < target else (lo, mid)
    return [int(torch.count_nonzero(p.abs() <= hi)) / p.numel() for p in params]


# ---- functional perturbation --------------------------------------------------------------------

class PairError(ValueError):
    """A module that the paired forward cannot cut in two halves; use the sequential path."""


def _batch_size(module, args) -> int:
    """n, the rows of the doubled batch, from a module call's first argument: a tensor whose
    first dimension is the batch, or an int batch size (peft's Prefix and Prompt)."""
    first = args[0] if args else None
    n = first.shape[0] if isinstance(first, torch.Tensor) and first.dim() else first
    if isinstance(n, bool) or not isinstance(n, int):
        raise PairError(f"rge: the paired forward cuts a module's batch at its first positional "
                        f"argument; {type(module).__name__} got {type(first).__name__} there "
                        "(use the sequential path, pair=False)")
    if n % 2:
        raise PairError(f"rge: the paired forward needs an even batch (two halves), "
                        f"{type(module).__name__} got {n} rows")
    return n


def _halves(values, n):
    """Two copies of `values` (a tuple or dict of call arguments) with every tensor whose first
    dimension is n cut into rows :n/2 and n/2:."""
    def cut(v, h):
        if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n:
            return v[:n // 2] if h == 0 else v[n // 2:]
        return v
    if isinstance(values, dict):
        return tuple({k: cut(v, h) for k, v in values.items()} for h in (0, 1))
    return tuple(tuple(cut(v, h) for v in values) for h in (0, 1))


def _join(first, second, n):
    """The module output of the doubled batch: the two halves' outputs stacked along rows."""
    if isinstance(first, torch.Tensor):
        if first.shape[0] == n:                 # a keyword argument carried the whole batch
            first = first[:n // 2]
        return torch.cat([first, second])
    if isinstance(first, (tuple, list)):
        return type(first)(_join(a, b, n) for a, b in zip(first, second))
    raise PairError(f"rge: the paired forward joins tensor outputs, not {type(first).__name__}")


def _linear_pair(x, out_features, weights):
    """An nn.Linear on a doubled batch x, rows :n/2 with weights[0] and rows n/2: with
    weights[1] (each a (weight, bias) pair), written into one output: no torch.cat of the halves.
    Each half runs the kernel F.linear runs (addmm with a bias, else mm, on the rows flattened),
    so the halves are those of two F.linear calls."""
    out = x.new_empty((*x.shape[:-1], out_features))
    halves = zip(x.reshape(2, -1, x.shape[-1]), out.view(2, -1, out_features))   # views
    for (w, b), (xs, ys) in zip(weights, halves):
        torch.mm(xs, w.t(), out=ys) if b is None else torch.addmm(b, xs, w.t(), out=ys)
    return out


def _joins_in_place(module, args) -> bool:
    """Can the paired forward run this outermost owner by `_linear_pair`? A plain nn.Linear
    (a subclass may change forward) on rows that F.linear flattens with a view, outside autograd
    and autocast (out= takes neither)."""
    x = args[0] if args else None
    return (type(module) is torch.nn.Linear and isinstance(x, torch.Tensor) and x.dim() >= 2
            and (x.dim() == 2 or x.is_contiguous()) and not torch.is_grad_enabled()
            and not torch.is_autocast_enabled(x.device.type))


@contextmanager
def swapped(params: list[torch.Tensor], replace, *, keep=(), halves=False):
    """Within the block, every module sees `replace(θ_i, i)` instead of its trainable tensor θ_i.

    A global forward pre-hook looks at each module about to run; for each of its own parameters
    that is trainable tensor i, it puts the replacement in `module._parameters` and keeps the
    original; the matching forward hook puts the original back. A replacement lives while the
    outermost module that reads it runs (plus the module's activations), so the cost is one
    module's tensors, not the model's. Tensors in `keep` (indices read more than once per forward:
    a tied embedding that is also the LM head) are replaced once and kept until the block ends,
    so both readers see one copy; `replace` is then called once per tensor and block. Without
    `keep`, `replace` runs at every read (tied_grads.py relies on that for its aliases).

    halves=True is the paired forward: `replace` returns two tensors, and a batch of n rows is
    two forwards in one walk. The outermost module owning a trainable tensor runs on rows :n/2
    with the first replacements and again (its `forward`, through the forward hook) on rows n/2:
    with the second; the modules it calls see the replacement of the half that is running, and
    its output is the two outputs stacked (a plain nn.Linear runs both halves at once into one
    output, `_linear_pair`, and its own forward on no rows: the stacking would copy most of a
    fully fine-tuned model's activations once more). Its batch is the first positional argument
    (a tensor, or an int batch size); tensor arguments and keyword arguments of n rows are cut
    with it. The owner's rows must be independent (true of linear, embedding, norm and adapter
    modules); a module with hooks of its own (which its second half would bypass) is refused
    (PairError).

    Yields a Counter: how many module calls read each tensor index (a paired call counts once).
    """
    index = {id(p): i for i, p in enumerate(params)}
    values, reads, frames = {}, Counter(), []
    # frames: (module, its slots, n, the second half's args, the output when both halves ran)
    half = [None]                  # paired: 0 or 1 while the outermost owner runs that half

    def value(p):
        i = index[id(p)]
        v = values.get(i)
        if v is None:
            v = replace(p, i)
            if halves or i in keep:     # a paired owner's second half needs it again
                values[i] = v
        return v if half[0] is None else v[half[0]]

    def release():
        for i in [i for i in values if i not in keep]:
            del values[i]

    def swap_in(module, args):
        slots = [(n, p) for n, p in module._parameters.items() if id(p) in index]
        if not slots:
            return None
        n = rest = None
        if halves and half[0] is None:                  # the outermost owner: cut its batch
            if module._forward_hooks or module._forward_pre_hooks:
                raise PairError(f"rge: {type(module).__name__} has forward hooks of its own, "
                                "which the paired forward's second half would bypass")
            n = _batch_size(module, args)
            if _joins_in_place(module, args):   # both halves now; its forward runs on no rows
                reads.update(index[id(p)] for _, p in slots)
                pairs = [value(p) if id(p) in index else (p, p)         # (θ + μu, θ − μu)
                        for p in (module.weight, module.bias)]
                output = _linear_pair(args[0], module.out_features, list(zip(*pairs)))
                frames.append((module, [], n, None, output))
                return (args[0][:0], *args[1:])
            args, rest = _halves(args, n)
            if not isinstance(args[0], torch.Tensor):          # an int batch size: halved
                args, rest = (n // 2, *args[1:]), (n // 2, *rest[1:])
            half[0] = 0
        if half[0] != 1:
            reads.update(index[id(p)] for _, p in slots)
        frames.append((module, slots, n, rest, None))
        for name, p in slots:
            module._parameters[name] = value(p)
        return args if rest is not None else None

    def swap_out(module, args, kwargs, output):
        if not frames or frames[-1][0] is not module:
            return None
        _, slots, n, rest, both = frames[-1]
        paired = rest is not None or both is not None   # output: the doubled batch's
        if both is not None:                            # both halves ran in swap_in
            output = both
        elif rest is not None:                          # now the second half
            half[0] = 1
            for name, p in slots:
                module._parameters[name] = value(p)
            _, second = _halves(kwargs, n)
            output = _join(output, module.forward(*rest, **second), n)
            half[0] = None
        frames.pop()
        for name, p in slots:
            module._parameters[name] = p
        if not frames:
            release()
        return output if paired else None

    handles = [register_module_forward_pre_hook(swap_in),
               register_module_forward_hook(swap_out, with_kwargs=True)]
    try:
        yield reads
    finally:
        for h in handles:
            h.remove()
        for module, slots, *_ in reversed(frames):     # a forward that raised
            for name, p in slots:
                module._parameters[name] = p
        values.clear()


def perturbed(params: list[torch.Tensor], seed: int | list[int], scale: float | list[float],
              mask: Mask | None = None, keep=()):
    """Within the block, every module sees θ_i + Σ_j scale_j·u_i(seed_j) instead of θ_i: one
    direction (the estimate's θ ± μu) or several (ZO-SGD-Cons's candidates θ ∓ ηĝ), each masked
    by `mask` when the directions are sparse. `keep`: as in `swapped`.
    """
    seeds, scales = (seed, scale) if isinstance(seed, list) else ([seed], [scale])

    def replace(p, i):
        u = direction(p, seeds[0], i, mask)
        out = torch.add(p, u, alpha=scales[0], out=u)                 # one rounding for one u
        for s, a in zip(seeds[1:], scales[1:]):
            out.add_(direction(p, s, i, mask), alpha=a)
        return out

    return swapped(params, replace, keep=keep)


def perturbed_pair(params: list[torch.Tensor], seed: int, mu: float, mask: Mask | None = None,
                   keep=()):
    """Within the block, a batch of 2n rows is two forwards in one walk: rows :n see θ + μu and
    rows n: see θ − μu, with u drawn once per tensor (`swapped` with halves). The two copies are
    rounded once each, from the same u, exactly as `perturbed` rounds them: the weights the two
    halves see are bitwise those of two sequential forwards. Cost: one tensor-sized buffer more
    than `perturbed` while the owning module runs (θ + μu beside θ − μu, which reuses u's buffer).
    """
    def replace(p, i):
        u = direction(p, seed, i, mask)
        plus = torch.add(p, u, alpha=mu)
        return plus, torch.add(p, u, alpha=-mu, out=u)

    return swapped(params, replace, keep=keep, halves=True)


# ---- the estimate -------------------------------------------------------------------------------

class Unreached(ValueError):
    """A trainable tensor that no module forward read: the estimate cannot see it move."""


def read_twice(reads) -> set[int]:
    """The tensor indices that more than one module call read in a forward (`swapped`'s
    Counter): a tied embedding that is also the LM head (Estimate.tied)."""
    return {i for i, n in reads.items() if n > 1}


def check_reached(params, reads, allow_unreached=False):
    """A trainable tensor that no module forward read would get c·u from an estimate that never
    saw it move: an error (Unreached), unless `allow_unreached`."""
    missed = [i for i in range(len(params)) if not reads[i]]
    if missed and not allow_unreached:
        shapes = ", ".join(f"#{i} {tuple(params[i].shape)}" for i in missed[:3])
        raise Unreached(f"{len(missed)} trainable tensor(s) never entered a module forward during "
                         f"the loss ({shapes}): a torch.compile'd model or accelerate CPU/disk "
                         "offload bypasses module forwards, or the tensor is unused or read "
                         "outside its module; pass allow_unreached=True to train it anyway")


def supports_pair(loss_fn) -> bool:
    """Does `loss_fn` take pair=True (return [f+, f−] of a batch it doubles itself)?"""
    try:
        return "pair" in inspect.signature(loss_fn).parameters
    except (TypeError, ValueError):                     # a builtin without a signature
        return False


@torch.no_grad()
def estimate(loss_fn, params: list[torch.Tensor], *, seeds: list[int], mu: float,
             mask: Mask | None = None, pair: bool = False, tied=(),
             allow_unreached: bool = False) -> Estimate:
    """Two-sided RGE (§3, eq. (1)) with q = len(seeds) queries, 2q forward passes.

    Sequential (pair=False): `loss_fn()` returns the scalar loss of the current model, called
    inside `perturbed` at θ + μu_j, then at θ − μu_j: u_j is drawn twice per tensor.
    Paired (pair=True): `loss_fn(pair=True)` doubles its batch and returns the tensor
    [f(first half), f(second half)], called once inside `perturbed_pair`: u_j is drawn once, and
    the two forwards of the batch are one walk over a doubled batch (its activations double).
    θ is never written. With a mask, every u_j is masked by it. `tied`: indices of tensors read
    more than once per forward (Estimate.tied of an earlier estimate), perturbed once per forward.
    """
    q = len(seeds)
    losses, projected = [], []
    for j, seed in enumerate(seeds):
        if pair:
            with perturbed_pair(params, seed, mu, mask, tied) as reads:
                f_plus, f_minus = loss_fn(pair=True).tolist()       # f(θ ± μu_j), one host sync
        else:
            with perturbed(params, seed, +mu, mask, tied) as reads:
                f_plus = float(loss_fn())                             # f(θ + μu_j)
        if j == 0:
            check_reached(params, reads, allow_unreached)
        if not pair:
            with perturbed(params, seed, -mu, mask, tied):
                f_minus = float(loss_fn())                            # f(θ − μu_j)
        d = (f_plus - f_minus) / (2 * mu)                             # eq. (1): d_j
        if not math.isfinite(f_plus + f_minus + d):       # stop before a NaN reaches the weights
            raise FloatingPointError(f"rge: the loss at θ ± μu is {f_plus}, {f_minus}")
        losses.append((f_plus + f_minus) / 2)
        projected.append(d)
    return Estimate(sum(losses) / q, list(seeds), projected, forward_passes=2 * q, mask=mask,
                    tied=read_twice(reads))


def gradients(est: Estimate, params: list[torch.Tensor]):
    """Yield (p, g, scale) one tensor at a time, ĝ_p = scale · g, redrawing u_j from the seeds.

    q = 1: g = u and scale = d (the update folds d into its step size: no pass over u to scale
    it, and no d·u formed in the weight dtype, where fp16 overflows once |d| ≳ 1e4).
    q > 1: g = (1/q) Σ_j d_j u_j, summed in fp32 (at least), and scale 1.
    Only one tensor-sized buffer is alive at a time.
    """
    q = len(est.seeds)
    for i, p in enumerate(params):
        if q == 1:
            yield p, direction(p, est.seeds[0], i, est.mask), est.projected_grads[0]
            continue
        d = est.projected_grads
        wide = torch.promote_types(p.dtype, torch.float32)      # fp32, or fp64 for fp64 weights
        g = direction(p, est.seeds[0], i, est.mask).to(wide).mul_(d[0] / q)
        for seed, d_j in zip(est.seeds[1:], d[1:]):
            g.add_(direction(p, seed, i, est.mask), alpha=d_j / q)
        yield p, g, 1.0
