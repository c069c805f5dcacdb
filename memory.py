"""Peak memory and step time of fine-tuning: measured, and predicted by the paper's memory model.

Memory model (arXiv:2402.11592 §4.3, Tab. 5, App. C): the peak of a step is constant memory that
lives through training plus a dynamic allocation that lives only within the step (Alg. A1),

    peak = |W| (weights) + |s_opt| (optimizer state) + dynamic (gradients, activations, copies)

          optimizer      Opt. State   Dynamic Mem.
          FO-SGD         0            Σ_l max{|a_l|, |x_l|}
          FO-Adam        2|x| (+|x|)  Σ_l max{|a_l|, |x_l|}       (+|x|: torch's foreach update)
          Forward-Grad   0            |x| + max_l |a_l|
          ZO-SGD         0            max_l |x_l|                 (and ZO-SGD-Sign, -Cons)
          ZO-SGD-MMT     |x|          max_l |x_l|
          ZO-Adam        2|x|         max_l |x_l|
          FO, FP16       as above     max{½|a| + ½|x|, Σ_l max{½|a_l|, |x_l|}}
          ZO, F16        the rows above with every |·| in 16-bit bytes, i.e. halved

|x| is the bytes of the trainable tensors (ε in Tab. A2; all weights in full fine-tuning), |x_l|
those of layer l, |a_l| what autograd saves in layer l's forward for its backward, |a| = Σ_l |a_l|.
Back-prop holds a_l until layer l's gradient (|x_l| bytes) exists, hence Σ_l max; ZO holds one
layer's perturbed copy at a time, hence max_l. Forward-Grad's |x| is its stored tangents; ours
are redrawn per module, so it measures well under its row. FP16 = mixed precision: fp32 weights,
16-bit forward (half the activations plus a 16-bit weight copy); F16 = 16-bit weights, for ZO.
Layers: the embeddings (all that runs before the first transformer layer), each layer, the head
(the rest, loss included). Hybrid ZO-FO (§5, Tab. 7), embeddings and first K layers by ZO, the
rest by FO: Dynamic = max{Σ_{l>K} max{|a_l|, |x_l|}, max_{l≤K} |x_l|} (K = 0: all FO; K = n:
all ZO).

Measured on random token ids of the given shape, in fp32, with no KV cache and an optimizer at
lr 0. The loss does train.py's work (`--loss task`: the transformer over every token, the LM head
on the last one, scored as a one-token answer) or is next-token cross-entropy on every token
(`--loss lm`): its B×T×V logits are the largest activation of a small model, and one that Tab. 5
counts for no ZO method. Weights = held after building the model; state = held after a warm-up
step minus held before the optimizer existed (the first forwards' one-time caches are no state);
dynamic = peak during a step minus held before it. |x_l| is counted, |a_l| measured, so theory
and measurement compare term by term; gradients that torch keeps on .grad between steps (|g|)
are moved from Tab. 5's dynamic column to the state they are measured in. Readings: CUDA's
allocator statistics; on CPU the resident set VmRSS and its high-water mark VmHWM (reset through
/proc/self/clear_refs; a reset and a read cost ~0.03 ms); `peaks` reads every device the
model uses (CUDA: allocated and reserved), as train.py records them. For RSS to follow the
tensors, the modelling code runs once on the meta device before the baseline (its imports are
~100 MB), and glibc is told to mmap every block above 64 KiB, so that freed activations leave
the resident set instead of staying in malloc's heap.

The measurement itself (synthetic batches, the paper's model shapes, sweeps, tables and plots)
is bench_memory.py: `python bench_memory.py --model opt-125m --opt zo_sgd,fo_sgd`.

References: Zhang et al. 2024, arXiv:2402.11592, §4.3, Tab. 4, 5, 7, A1, A2, Fig. 3, App. C.
Not here: the benchmark CLI (bench_memory.py), the optimizers (optimizers.py), the loop (train.py).
"""
import ctypes
import gc
import os
import resource
import time

import torch
from torch.nn.modules.module import register_module_forward_pre_hook

import models

GIB = 2**30
CLEAR_REFS, STATUS = "/proc/self/clear_refs", "/proc/self/status"
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4     # glibc's mallopt parameters
try:
    LIBC = ctypes.CDLL("libc.so.6")
except OSError:                           # not glibc: RSS includes malloc's cache of freed blocks
    LIBC = None


# ---- readings -----------------------------------------------------------------------------------

def is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def _status_kib(field):
    with open(STATUS) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def reset(device="cpu"):
    """Start a phase: the next `peak_bytes` reports the peak from now on."""
    if is_cuda(device):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    elif os.path.exists(CLEAR_REFS):
        with open(CLEAR_REFS, "w") as f:
            f.write("5")


def peak_bytes(device="cpu") -> int:
    """Peak since the last `reset`: allocated tensor bytes on CUDA, resident bytes on CPU."""
    if is_cuda(device):
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    if os.path.exists(STATUS):
        return _status_kib("VmHWM") * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_bytes(device="cpu") -> int:
    """What is held now: allocated tensor bytes on CUDA, resident bytes on CPU."""
    if is_cuda(device):
        return torch.cuda.memory_allocated(device)
    return _status_kib("VmRSS") * 1024 if os.path.exists(STATUS) else peak_bytes(device)


def devices(model) -> list[str]:
    """The devices that hold the model's weights, e.g. ["cuda:0"] or ["cpu"]."""
    return sorted({str(t.device) for t in [*model.parameters(), *model.buffers()]})


def reset_peaks(devices: list[str]):
    """`reset` for every device in the list: the next `peaks` reports the peaks from now on."""
    for device in devices:
        reset(device)


def peaks(devices: list[str]) -> dict[str, dict[str, int]]:
    """Peak bytes since `reset_peaks`, per device: allocated (tensors) and reserved (the caching
    allocator's hold) on CUDA, the resident set's high-water mark on CPU."""
    out = {}
    for device in devices:
        if is_cuda(device):
            out[device] = dict(allocated=peak_bytes(device),
                               reserved=torch.cuda.max_memory_reserved(device))
        else:
            out[device] = dict(resident=peak_bytes(device))
    return out


def measure(fn, device="cpu"):
    """Run fn() as one phase; return (its result, peak bytes, seconds)."""
    reset(device)
    start = time.perf_counter()
    result = fn()
    if is_cuda(device):
        torch.cuda.synchronize(device)
    return result, peak_bytes(device), time.perf_counter() - start


def settle(device="cpu") -> int:
    """`current_bytes` after garbage collection and glibc's return of its free memory."""
    gc.collect()
    if LIBC is not None and not is_cuda(device):
        LIBC.malloc_trim(0)
    return current_bytes(device)


def track_tensors():
    """For measuring: make CPU RSS follow the live tensors. By default glibc raises its mmap
    threshold up to 32 MiB after large frees, and freed blocks under it stay in its heap,
    counted as resident; here every block above 64 KiB is mmapped and unmapped when freed."""
    if LIBC is not None:
        LIBC.mallopt(M_MMAP_MAX, 1 << 16)          # glibc's default (cache_freed_memory sets 0)
        LIBC.mallopt(M_MMAP_THRESHOLD, 1 << 16)    # fixed: no dynamic growth
        LIBC.mallopt(M_TRIM_THRESHOLD, 1 << 16)
        LIBC.malloc_trim(0)                        # and give back what is cached already


def cache_freed_memory():
    """For speed on CPU: keep freed blocks for the next tensor of their size, as CUDA's caching
    allocator does. By default glibc mmaps every block above its threshold (at most 32 MiB), so
    a ZO step's embedding-sized draws and copies come as fresh pages, each faulted in and zeroed
    by the kernel, then unmapped: 0.1–0.4 s of a 3 s OPT-125M step (docs/speed.md). Here no
    block is mmapped and the heap is never trimmed; the resident set then also counts the freed
    blocks kept for reuse (CUDA's `reserved`), and does not shrink when tensors are freed."""
    if LIBC is not None:
        LIBC.mallopt(M_MMAP_MAX, 0)                # every block from the heap
        LIBC.mallopt(M_TRIM_THRESHOLD, -1)         # never give the heap's top back


# ---- the terms of Tab. 5: |W| and |x_l| counted, |a_l| measured ---------------------------------

def layer_terms(model, loss_fn, params) -> dict:
    """|W|, |a|, |x| (of `params`, the trainable tensors), and per layer (the embeddings, each
    transformer layer, the head) |x_l| and |a_l|, in bytes.

    One forward under autograd: a saved-tensor hook adds the bytes of each storage autograd keeps
    for the backward to the layer running at the time, once per storage (a view, or a tensor saved
    by two ops, is one buffer) and never a weight's (those are |W|). A weight belongs to the layer
    of the first module that runs with it (a tied head to the embeddings), a trainable tensor that
    no module owns (e.g. a prompt) to the embeddings. On the meta device it costs no memory.
    """
    stack = models.layers(model)
    names = ["embeddings", *(f"layer {i}" for i in range(len(stack))), "head"]
    phase, owner, seen, a_l = [0], {}, set(), [0] * len(names)
    weights = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers()]}

    def claim(module, args):
        for p in module._parameters.values():
            owner.setdefault(id(p), phase[0])

    def pack(t):
        storage = t.untyped_storage()
        if storage._cdata not in weights and storage._cdata not in seen:
            seen.add(storage._cdata)
            a_l[phase[0]] += storage.nbytes()
        return t.detach()            # t itself: a cycle t → grad_fn → t that gc cannot see

    hooks = [register_module_forward_pre_hook(claim)]
    for i, layer in enumerate(stack):              # the running layer; after the last, the head
        hooks.append(layer.register_forward_pre_hook(lambda m, a, i=i: phase.__setitem__(0, i + 1)))
        hooks.append(layer.register_forward_hook(lambda m, a, o, i=i: phase.__setitem__(0, i + 2)))
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss_fn()
    finally:
        for h in hooks:
            h.remove()
    x_l = [0] * len(names)
    for p in params:
        x_l[owner.get(id(p), 0)] += p.nbytes
    return dict(names=names, x_l=x_l, a_l=a_l, x=sum(x_l), a=sum(a_l),
                W=sum(t.nbytes for t in [*model.parameters(), *model.buffers()]))


# ---- the memory model: Tab. 5 rows, App. C ------------------------------------------------------

def _backprop(t, layers, half):
    """Σ_l max{|a_l|, |x_l|} over `layers`; FP16 (half = ½): max{½|a| + ½|x|, Σ_l max{½|a_l|,
    |x_l|}}, the 16-bit activations and weight copy, or 16-bit activations and fp32 gradients."""
    total = sum(max(half * t["a_l"][l], t["x_l"][l]) for l in layers)
    return total if half == 1 else max(total, half * sum(t["a_l"][l] + t["x_l"][l] for l in layers))


_FO = ("Σ_l max{|a_l|, |x_l|}", lambda t, half: _backprop(t, range(len(t["x_l"])), half))
_ZO = ("max_l |x_l|", lambda t, half: max(t["x_l"]))
_FG = ("|x| + max_l |a_l|", lambda t, half: t["x"] + max(t["a_l"]))
TAB5 = {  # --opt: (Opt. State in |x|, Dynamic Mem. as text, as a function of the terms)
    "fo_sgd": (0, *_FO), "fo_adam": (2, *_FO), "forward_grad": (0, *_FG),
    "zo_sgd": (0, *_ZO), "zo_sgd_sign": (0, *_ZO), "zo_sgd_cons": (0, *_ZO),
    "zo_sgd_mmt": (1, *_ZO), "zo_adam": (2, *_ZO),
}


def predict(opt: str, t: dict, *, amp=False, foreach=False, kept=0, zo_layers=None) -> dict:
    """Tab. 5's row for `opt` on the terms `t`: weights, state, dynamic, peak (bytes), formula.

    amp: the FP16 row. foreach: FO-Adam's third |x|, a temporary of torch's foreach update, put
    where it lives (dynamic). kept: gradient bytes that stay on .grad between steps (torch's do),
    moved from dynamic to state, where they are measured. The peak is Tab. 5's either way.
    zo_layers = K: the hybrid ZO-FO row of Tab. 7, `opt` being its ZO part.
    """
    k, text, dynamic_of = TAB5[opt]
    n = len(t["x_l"])                              # layers 0 (embeddings), 1…n-2, n-1 (head)
    if zo_layers is not None:
        zo = range(0 if zo_layers == 0 else n if zo_layers >= n - 2 else zo_layers + 1)
        dynamic = max(_backprop(t, range(len(zo), n), 0.5 if amp else 1),
                      max((t["x_l"][l] for l in zo), default=0))
        text = f"max{{Σ_l>{zo_layers} max{{|a_l|, |x_l|}}, max_l≤{zo_layers} |x_l|}}"
    else:
        dynamic = dynamic_of(t, 0.5 if amp else 1)
        text = "max{½|a| + ½|x|, Σ_l max{½|a_l|, |x_l|}}" if amp and text == _FO[0] else text
    extra = t["x"] if foreach and opt == "fo_adam" else 0
    state_text = f"{k}|x|" if k else "0"
    if extra:
        text += " + |x| foreach"
    if kept:
        state_text += " + |g| kept"
        text += " − |g| kept"
    return dict(weights=t["W"], state=k * t["x"] + kept, dynamic=dynamic + extra - kept,
                peak=t["W"] + k * t["x"] + dynamic + extra,
                formula=["|W|", state_text, text, "sum"])
