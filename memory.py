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
/proc/self/clear_refs). For RSS to follow the tensors, the modelling code runs once on the meta
device before the baseline (its imports are ~100 MB), and glibc is told to mmap every block above
64 KiB, so that freed activations leave the resident set instead of staying in malloc's heap.

    python memory.py --model opt-125m --opt zo_sgd,fo_sgd --batch_size 4 --seq_len 128
    python memory.py --model opt-125m --opt zo_sgd,fo_sgd --batch_size 2 --sweep seq_len 64,256
    python memory.py --model opt-13b --device meta --opt fo_sgd --seq_len 400   # theory alone

References: Zhang et al. 2024, arXiv:2402.11592, §4.3, Tab. 4, 5, 7, A1, A2, Fig. 3, App. C.
Not here: the optimizers (optimizers.py), the adapters (peft.py), the training loop (train.py).
"""
import argparse
import csv
import ctypes
import gc
import json
import os
import platform
import resource
import statistics
import sys
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch.nn.modules.module import register_module_forward_pre_hook

GIB = 2**30
CLEAR_REFS, STATUS = "/proc/self/clear_refs", "/proc/self/status"
try:
    LIBC = ctypes.CDLL("libc.so.6")
except OSError:                           # not glibc: RSS includes malloc's cache of freed blocks
    LIBC = None


# ---- readings -----------------------------------------------------------------------------------

def _is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def _status_kib(field):
    with open(STATUS) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def reset(device="cpu"):
    """Start a phase: the next `peak_bytes` reports the peak from now on."""
    if _is_cuda(device):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    elif os.path.exists(CLEAR_REFS):
        with open(CLEAR_REFS, "w") as f:
            f.write("5")


def peak_bytes(device="cpu") -> int:
    """Peak since the last `reset`: allocated tensor bytes on CUDA, resident bytes on CPU."""
    if _is_cuda(device):
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    if os.path.exists(STATUS):
        return _status_kib("VmHWM") * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_bytes(device="cpu") -> int:
    """What is held now: allocated tensor bytes on CUDA, resident bytes on CPU."""
    if _is_cuda(device):
        return torch.cuda.memory_allocated(device)
    return _status_kib("VmRSS") * 1024 if os.path.exists(STATUS) else peak_bytes(device)


def measure(fn, device="cpu"):
    """Run fn() as one phase; return (its result, peak bytes, seconds)."""
    reset(device)
    start = time.perf_counter()
    result = fn()
    if _is_cuda(device):
        torch.cuda.synchronize(device)
    return result, peak_bytes(device), time.perf_counter() - start


def settle(device="cpu") -> int:
    """`current_bytes` after garbage collection and glibc's return of its free memory."""
    gc.collect()
    if LIBC is not None and not _is_cuda(device):
        LIBC.malloc_trim(0)
    return current_bytes(device)


def track_tensors():
    """Make CPU RSS follow the live tensors: glibc raises its mmap threshold up to 32 MiB after
    large frees, and freed blocks under the threshold stay in its heap, counted as resident."""
    if LIBC is not None:
        LIBC.mallopt(-3, 1 << 16)                 # M_MMAP_THRESHOLD, fixed: no dynamic growth
        LIBC.mallopt(-1, 1 << 16)                 # M_TRIM_THRESHOLD


# ---- the model zoo: the paper's configurations, random weights ---------------------------------

_LLAMA = dict(vocab_size=32000, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
              intermediate_size=11008, max_position_embeddings=4096, rms_norm_eps=1e-5)
CONFIGS = {  # name: (transformers config class, fields from the released config.json)
    "roberta-large": ("RobertaConfig", dict(vocab_size=50265, hidden_size=1024, pad_token_id=1,
                      num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                      max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5)),
    **{f"opt-{size}": ("OPTConfig", dict(vocab_size=50272, max_position_embeddings=2048,
                       hidden_size=h, num_hidden_layers=n, num_attention_heads=heads,
                       ffn_dim=4 * h, word_embed_proj_dim=h) | extra)
       for size, h, n, heads, extra in [
           ("125m", 768, 12, 12, {}),
           ("350m", 1024, 24, 16, dict(word_embed_proj_dim=512, do_layer_norm_before=False)),
           ("1.3b", 2048, 24, 32, {}), ("2.7b", 2560, 32, 32, {}), ("6.7b", 4096, 32, 32, {}),
           ("13b", 5120, 40, 40, {})]},
    "llama-2-7b": ("LlamaConfig", _LLAMA), "vicuna-7b": ("LlamaConfig", _LLAMA),
    "mistral-7b": ("MistralConfig", _LLAMA | dict(num_key_value_heads=8, sliding_window=4096,
                   intermediate_size=14336, max_position_embeddings=32768)),
}
MLM_TYPES = ("roberta", "xlm-roberta")    # model types scored as masked LMs, here and in train.py


def model_config(name):
    """The config of a paper model, or of a local directory; ValueError for anything else."""
    import transformers
    if name in CONFIGS:
        cls, fields = CONFIGS[name]
        return getattr(transformers, cls)(**fields)
    if os.path.isdir(name):
        return transformers.AutoConfig.from_pretrained(name)
    raise ValueError(f"unknown --model '{name}'; choose from: {', '.join(CONFIGS)}, "
                     "or a local config directory")


def build_model(config, dtype=torch.float32, device="cpu", eager=False):
    """A randomly initialised model of `config` in eval mode, created on `device` directly."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM
    auto = AutoModelForMaskedLM if config.model_type in MLM_TYPES else AutoModelForCausalLM
    kw = {"attn_implementation": "eager"} if eager else {}   # forward-mode AD needs it (train.py)
    with torch.device(device):
        return auto.from_config(config, dtype=dtype, **kw).eval()


LOSSES = ("task", "lm")


def synthetic_loss(model, ids, loss="task", amp_dtype=None):
    """The loss closure on random tokens `ids` [B, T], fp32; the forward under autocast when
    `amp_dtype` is given (FP16 mixed precision).

    "task": the work of train.py's loss (tasks.loss) for a one-token answer at the last position:
    the transformer runs on all B×T tokens, the LM head on B positions, log-softmax in fp32.
    "lm": next-token (masked LM: same-token) cross-entropy on every token, whose B×T×V logits
    (and their log-softmax) a 50k vocabulary makes the largest activation of a small model.
    Neither keeps a KV cache, as in training, except on the meta device, where it costs nothing
    and transformers' mask code needs one not to read token values.
    """
    mlm, cache = model.config.model_type in MLM_TYPES, ids.device.type == "meta"
    labels = ids if mlm else torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)

    def every_token():
        logits = model(input_ids=ids, use_cache=cache).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())

    def last_token():
        h = model.base_model(input_ids=ids, use_cache=cache).last_hidden_state
        h = h[:, [-1]]                          # a copy (as tasks.py's gather), not a view of h
        logp = model.lm_head(h)[:, 0].float().log_softmax(-1)           # [B, V]
        return -logp.gather(1, ids[:, :1]).mean()

    def closure():
        with torch.autocast(ids.device.type, amp_dtype) if amp_dtype else nullcontext():
            return every_token() if loss == "lm" else last_token()
    return closure


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
    import optimizers
    stack = optimizers.layers(model)
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
    extra = t["x"] * (foreach and opt == "fo_adam")
    return dict(weights=t["W"], state=k * t["x"] + kept, dynamic=dynamic + extra - kept,
                peak=t["W"] + k * t["x"] + dynamic + extra,
                formula=["|W|", (f"{k}|x|" if k else "0") + " + |g| kept" * bool(kept),
                         text + " + |x| foreach" * bool(extra) + " − |g| kept" * bool(kept),
                         "sum"])


# ---- the benchmark ------------------------------------------------------------------------------

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SWEEPS = ("seq_len", "batch_size", "zo_layers")
TERMS = ("weights", "state", "dynamic", "peak")


def hardware(device) -> str:
    """The machine a measurement ran on, for the record."""
    name = torch.cuda.get_device_name(device) if _is_cuda(device) else platform.processor()
    if os.path.exists("/proc/cpuinfo") and not _is_cuda(device):
        name = next((l.split(":")[1].strip() for l in open("/proc/cpuinfo")
                     if l.startswith("model name")), name)
    return f"{name}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def trainable(model, method):
    """All weights (ft), or the adapter's tensors from peft.py (imported only then)."""
    if method == "ft":
        return list(model.requires_grad_(True).parameters())
    import peft                           # ours: the hub's `peft` package has the same name
    if method not in peft.METHODS:
        raise ValueError(f"unknown --peft '{method}'; choose from: {', '.join(peft.METHODS)}")
    return peft.apply(model, method)


def profile(args, opt, batch_size, seq_len, zo_layers=None) -> dict:
    """One configuration: its terms, Tab. 5's prediction and, off the meta device, measurements
    (sizes in GiB): the dynamic term is the median of `args.steps` steps after a warm-up step,
    the step time their mean (and so for the inference forward)."""
    import optimizers
    cls = optimizers.OPTIMIZERS.get(opt)          # None: a Tab. 5 row only (meta device)
    backprop = zo_layers is not None or (issubclass(cls, optimizers.BackProp) if cls else
                                         TAB5[opt][1] == _FO[0])
    half = DTYPES[args.dtype] if args.dtype != "fp32" else None
    config, device = model_config(args.model), args.device
    dtype = half if half and not backprop else torch.float32           # F16: ZO weights only
    build_model(config, dtype, "meta")             # imports the modelling code before the baseline
    base = settle(device)
    model = build_model(config, dtype, device, eager=opt == "forward_grad")
    params = trainable(model, args.peft)
    weights = settle(device) - base
    ids = torch.randint(4, config.vocab_size, (batch_size, seq_len),
                        generator=torch.Generator().manual_seed(0)).to(device)
    t = layer_terms(model, synthetic_loss(model, ids, args.loss), params)
    loss = synthetic_loss(model, ids, args.loss, half if backprop else None)
    row = dict(model=args.model, opt=opt, peft=args.peft, dtype=args.dtype, loss=args.loss,
               batch_size=batch_size, seq_len=seq_len, zo_layers=zo_layers,
               hardware=hardware(device), _terms=t)
    measured, kept, foreach = {}, 0, False
    if device != "meta":
        with torch.no_grad():
            loss()                                                      # warm-up
            runs = [measure(loss, device) for _ in range(args.steps)]
        peak, row["forward_s"] = max(r[1] for r in runs), statistics.mean(r[2] for r in runs)
        before = settle(device)          # after the first forwards' one-time caches: not state
        row.update(inference=(peak - before + weights) / GIB,
                   residue=(before - base - weights) / GIB)
        optimizer = optimizers.build_variant(opt, model, params, zo_layers=zo_layers, lr=0.0)
        optimizer.step(loss)                                            # warm-up: the state
        dynamic, seconds = [], []
        for _ in range(args.steps):
            held = settle(device)
            _, peak, s = measure(lambda: optimizer.step(loss), device)
            dynamic.append(peak - held)
            seconds.append(s)
        dynamic = statistics.median(dynamic)
        measured = dict(weights=weights, state=held - before, dynamic=dynamic,
                        peak=weights + held - before + dynamic)
        kept = sum(p.grad.nbytes for p in params if p.grad is not None)
        fe = getattr(optimizer, "defaults", {}).get("foreach", False)
        foreach = bool(fe) or fe is None and _is_cuda(device)          # torch's default
        row.update(step_s=statistics.mean(seconds), forward_passes=optimizer.forward_passes)
    predicted = predict(opt, t, amp=bool(half and backprop), foreach=foreach, kept=kept,
                        zo_layers=zo_layers) if opt in TAB5 else {}
    for k in TERMS:
        row[f"predicted_{k}"] = predicted[k] / GIB if predicted else None
        row[f"measured_{k}"] = measured[k] / GIB if measured else None
    row["gap"] = measured["peak"] / predicted["peak"] - 1 if predicted and measured else None
    row["_formula"] = predicted.get("formula", ["no Tab. 5 row", "", "", ""])
    return row


# ---- output -------------------------------------------------------------------------------------

def _size(b):
    return f"{b / GIB:.3f} GiB" if b >= GIB / 10 else f"{b / 2**20:.2f} MiB"


def _cell(v, width, spec=".3f"):
    return f"{'—' if v is None else format(v, spec):>{width}}"


def report(row):
    """One configuration, term by term: the formula, its value, the measurement, the gap."""
    t, top = row["_terms"], lambda v: row["_terms"]["names"][v.index(max(v))]
    hybrid = f" + back-prop, zo_layers {row['zo_layers']}" if row["zo_layers"] is not None else ""
    print(f"\n{row['model']} | {row['opt']}{hybrid} | {row['peft']} | {row['dtype']} | loss "
          f"{row['loss']} | batch {row['batch_size']}×{row['seq_len']} | {row['hardware']}\n"
          f"|x| {_size(t['x'])} | max_l |x_l| {_size(max(t['x_l']))} ({top(t['x_l'])}) | |a| "
          f"{_size(t['a'])} | max_l |a_l| {_size(max(t['a_l']))} ({top(t['a_l'])}) | |W| "
          f"{_size(t['W'])}\n"
          f"{'GiB':8} {'Tab. 5':54} {'predicted':>9} {'measured':>9} {'gap':>8}")
    for k, text in zip(TERMS, row["_formula"]):
        p, m = row[f"predicted_{k}"], row[f"measured_{k}"]
        gap = "" if p is None or m is None else f"{row['gap']:+8.1%}" if k == "peak" else \
            f"{m - p:+8.3f}"
        print(f"{k:8} {text:54} {_cell(p, 9)} {_cell(m, 9)} {gap}")
    if "inference" in row:
        print(f"inference forward: peak {row['inference']:.3f} GiB, {row['forward_s']:.2f} s | "
              f"step: {row['step_s']:.2f} s, {row['forward_passes']} forwards | step/forward: "
              f"memory {row['measured_peak'] / row['inference']:.2f}×, time "
              f"{row['step_s'] / row['forward_s']:.1f}× | not counted: {row['residue']:.3f} GiB "
              "of first-forward caches")


def write(rows, out, stem, sweep, command):
    """Rows as a table on screen, CSV and JSON (GiB, seconds), and a PNG if matplotlib is here."""
    table = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    print(f"\n{sweep:>10} {'opt':14} {'predicted':>9} {'measured':>9} {'gap':>7} "
          f"{'inference':>9} {'step s':>7}")
    for r in table:
        print(f"{r[sweep]!s:>10} {r['opt']:14} {_cell(r['predicted_peak'], 9)} "
              f"{_cell(r['measured_peak'], 9)} {_cell(r['gap'], 7, '+.1%')} "
              f"{_cell(r.get('inference'), 9)} {_cell(r.get('step_s'), 7, '.2f')}")
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, stem)
    with open(path + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(table[0]))
        w.writeheader()
        w.writerows(table)
    with open(path + ".json", "w") as f:
        json.dump(dict(command=command, rows=table), f, indent=1)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        plt = None
    if plt is None or len({r[sweep] for r in table}) < 2:
        return print(f"wrote {path}.csv and .json")
    fig, ax = plt.subplots(figsize=(6, 4))
    lines = [(f"{opt}, {label}", key, style) for opt in dict.fromkeys(r["opt"] for r in table)
             for key, style, label in (("measured_peak", "o-", "measured"),
                                       ("predicted_peak", "x--", "Tab. 5"))]
    for label, key, style in lines + [(f"{table[0]['opt']}, inference forward", "inference", "k:")]:
        mine = [r for r in table if r["opt"] == label.split(",")[0] and r.get(key) is not None]
        if mine:
            ax.plot([r[sweep] for r in mine], [r[key] for r in mine], style, label=label)
    r = table[0]
    ax.set(xlabel=sweep, ylabel="peak memory (GiB)", title=f"{r['model']}, batch {r['batch_size']}"
           f", {r['dtype']}, loss {r['loss']}: {r['hardware']}")
    ax.title.set_fontsize(8)
    ax.legend()
    fig.savefig(path + ".png", dpi=120, bbox_inches="tight")
    print(f"wrote {path}.csv, .json and .png")


# ---- entry point --------------------------------------------------------------------------------

def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv=None) -> list[dict]:
    """Parse, check, profile every --opt at every sweep value, report, write; returns the rows."""
    import optimizers
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="opt-125m",
                    help=f"one of {', '.join(CONFIGS)}, or a local config directory")
    ap.add_argument("--opt", default="zo_sgd", help="comma-separated, of: "
                    f"{', '.join(optimizers.OPTIMIZERS)} (meta device: {', '.join(TAB5)})")
    ap.add_argument("--peft", default="ft", help="ft (all weights), or a method of peft.py")
    ap.add_argument("--dtype", default="fp32", choices=tuple(DTYPES),
                    help="16-bit: the weights of ZO (F16), autocast for FO (FP16)")
    ap.add_argument("--loss", default="task", choices=LOSSES, help="task: as train.py's loss, the "
                    "last token scored; lm: next-token loss on every token (full logits)")
    ap.add_argument("--batch_size", type=int, default=4, help="sequences per batch")
    ap.add_argument("--seq_len", type=int, default=128, help="tokens per sequence")
    ap.add_argument("--steps", type=int, default=3, help="measured steps, after one warm-up")
    ap.add_argument("--sweep", nargs=2, metavar=("NAME", "VALUES"),
                    help=f"NAME: {', '.join(SWEEPS)}; VALUES comma-separated, e.g. 64,128")
    ap.add_argument("--out", help="directory for CSV/JSON/PNG (a sweep's default: results)")
    ap.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="cpu, cuda[:i], or meta: the prediction alone, for any model size")
    argv = sys.argv[1:] if argv is None else argv
    args = ap.parse_args(argv)
    for k in ("steps", "batch_size", "seq_len"):
        if getattr(args, k) < 1:
            fail(f"--{k} must be at least 1, got {getattr(args, k)}")
    known = TAB5 if args.device == "meta" else optimizers.OPTIMIZERS
    for opt in args.opt.split(","):
        if opt not in known:
            fail(f"unknown --opt '{opt}'; choose from: {', '.join(known)}")
    name, values = args.sweep or ("seq_len", str(args.seq_len))
    if name not in SWEEPS:
        fail(f"unknown --sweep '{name}'; choose from: {', '.join(SWEEPS)}")
    if not all(v.isdigit() for v in values.split(",")):
        fail(f"--sweep {name}: the values must be comma-separated integers, not '{values}'")
    if args.threads:
        torch.set_num_threads(args.threads)
    track_tensors()
    rows = []
    try:
        for value in map(int, values.split(",")):
            for opt in args.opt.split(","):
                shape = dict(batch_size=args.batch_size, seq_len=args.seq_len) | {name: value}
                rows.append(profile(args, opt, **shape))
                report(rows[-1])
    except ValueError as e:
        fail(e)
    if args.sweep or args.out:
        tags = [name if args.sweep else f"b{args.batch_size}_s{args.seq_len}"] + \
            [args.dtype] * (args.dtype != "fp32") + [args.peft] * (args.peft != "ft") + \
            [args.loss] * (args.loss != "task") + \
            ["meta"] * (args.device == "meta")
        write(rows, args.out or "results", "_".join([os.path.basename(args.model.rstrip("/")),
              *tags]), name, " ".join(["python memory.py", *argv]))
    return rows


if __name__ == "__main__":
    main()
