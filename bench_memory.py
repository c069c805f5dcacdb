"""Memory and step-time benchmark: measured peaks beside the paper's memory model (Tab. 5).

    python bench_memory.py --model opt-125m --opt zo_sgd,fo_sgd --batch_size 4 --seq_len 128
    python bench_memory.py --model opt-125m --opt zo_sgd,fo_sgd --batch_size 2 \
        --sweep seq_len 64,256
    python bench_memory.py --model opt-13b --device meta --opt fo_sgd --seq_len 400  # theory alone

A model of one of the paper's shapes (models.CONFIGS; hub ids such as facebook/opt-125m name the
same shapes) is built with random weights, and each optimizer takes a few steps at lr 0 on random
token ids of the given batch × length. The loss does train.py's work (`--loss task`: the
transformer over every token, the LM head on the last one, scored as a one-token answer) or is
next-token cross-entropy on every token (`--loss lm`), whose B×T×V logits are the largest
activation of a small model. Per configuration it prints memory.py's term-by-term prediction
beside the measurement (weights, state, dynamic, peak), and the inference forward's peak and time;
`--sweep` varies seq_len, batch_size or zo_layers (Fig. 3, Tab. 7) and writes CSV, JSON and a PNG.

References: Zhang et al. 2024, arXiv:2402.11592, §4.3, Tab. 4, 5, 7, A1, A2, Fig. 3, App. C.
Not here: the readings and the memory model (memory.py).
"""
import argparse
import csv
import json
import os
import statistics
import sys
from contextlib import nullcontext

import matplotlib
import torch
import torch.nn.functional as F

import checkpoint
import memory
import models
import optimizers
import peft
import variants
from memory import GIB, TAB5

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)


LOSSES = ("task", "lm")
RESULTS = "results"               # the recorded results, committed


def synthetic_loss(model, ids, loss="task", amp_dtype=None, pair=False):
    """The loss closure on random tokens `ids` [B, T], fp32; the forward under autocast when
    `amp_dtype` is given (FP16 mixed precision). pair=True (task loss): the closure also takes
    `pair`, so a ZO step runs train.py's default paired forward (rge.estimate: the batch doubled,
    [f(first half), f(second half)]); without it a ZO step takes the sequential path, the one
    Tab. 5's ZO row describes.

    "task": the work of train.py's loss (tasks.loss) for a one-token answer at the last position:
    the transformer runs on all B×T tokens, the LM head on B positions, log-softmax in fp32.
    "lm": next-token (masked LM: same-token) cross-entropy on every token, whose B×T×V logits
    (and their log-softmax) a 50k vocabulary makes the largest activation of a small model.
    Neither keeps a KV cache, as in training, except on the meta device, where it costs nothing
    and transformers' mask code needs one not to read token values.
    """
    mlm, cache = models.is_masked_lm(model.config), ids.device.type == "meta"
    labels = ids if mlm else torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)

    def every_token():
        logits = model(input_ids=ids, use_cache=cache).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())

    def last_token(x):
        h = model.base_model(input_ids=x, use_cache=cache).last_hidden_state
        h = h[:, [-1]]                          # a copy (as tasks.py's gather), not a view of h
        logp = model.lm_head(h)[:, 0].float().log_softmax(-1)           # [B, V]
        return -logp.gather(1, x[:, :1]).squeeze(1)                      # [B]

    def closure():
        with torch.autocast(ids.device.type, amp_dtype) if amp_dtype else nullcontext():
            return every_token() if loss == "lm" else last_token(ids).mean()

    def paired(pair=False):
        if not pair:
            return closure()
        nll, n = last_token(torch.cat([ids, ids])), len(ids)
        return torch.stack([nll[:n].mean(), nll[n:].mean()])
    return paired if pair else closure


# ---- the benchmark ------------------------------------------------------------------------------

SWEEPS = ("seq_len", "batch_size", "zo_layers")
TERMS = ("weights", "state", "dynamic", "peak")


def hardware(device) -> str:
    """The machine a measurement ran on, for the record (checkpoint.fingerprint's names)."""
    record = checkpoint.fingerprint(device)
    return f"{record['device_name']}, {torch.get_num_threads()} threads, torch {record['torch']}"


def trainable(model, method):
    """All weights (ft), or the adapter's tensors from peft.py."""
    if method == "ft":
        return list(model.requires_grad_(True).parameters())
    if method not in peft.METHODS:
        raise ValueError(f"unknown --peft '{method}'; choose from: {', '.join(peft.METHODS)}")
    return peft.apply(model, method)


def profile(args, opt, batch_size, seq_len, zo_layers=None) -> dict:
    """One configuration: its terms, Tab. 5's prediction and, off the meta device, measurements
    (sizes in GiB): the dynamic term is the median of `args.steps` steps after a warm-up step,
    the step time their mean (and so for the inference forward)."""
    cls = optimizers.OPTIMIZERS.get(opt)          # None: a Tab. 5 row only (meta device)
    backprop = zo_layers is not None or (issubclass(cls, optimizers.BackProp) if cls else
                                         TAB5[opt][1] == TAB5["fo_sgd"][1])
    half = models.DTYPES[args.dtype] if args.dtype != "fp32" else None
    config, device = models.config(args.model), args.device
    dtype = half if half and not backprop else torch.float32           # F16: ZO weights only
    models.from_config(config, dtype, "meta")    # imports the modelling code before the baseline
    base = memory.settle(device)
    model = models.from_config(config, dtype, device, eager=opt == "forward_grad")
    params = trainable(model, args.peft)
    weights = memory.settle(device) - base
    ids = torch.randint(4, config.vocab_size, (batch_size, seq_len),
                        generator=torch.Generator().manual_seed(0)).to(device)
    t = memory.layer_terms(model, synthetic_loss(model, ids, args.loss), params)
    loss = synthetic_loss(model, ids, args.loss, half if backprop else None, pair=args.pair)
    row = dict(model=args.model, opt=opt, peft=args.peft, dtype=args.dtype, loss=args.loss,
               pair=args.pair,
               batch_size=batch_size, seq_len=seq_len, zo_layers=zo_layers,
               hardware=hardware(device), _terms=t)
    measured, kept, foreach = {}, 0, False
    if device != "meta":
        with torch.no_grad():
            loss()                                                      # warm-up
            runs = [memory.measure(loss, device) for _ in range(args.steps)]
        peak, row["forward_s"] = max(r[1] for r in runs), statistics.mean(r[2] for r in runs)
        before = memory.settle(device)   # after the first forwards' one-time caches: not state
        row.update(inference=(peak - before + weights) / GIB,
                   residue=(before - base - weights) / GIB)
        optimizer = variants.build(opt, model, params, dict(lr=0.0), dict(lr=0.0),
                                   zo_layers=zo_layers)
        optimizer.step(loss)                                            # warm-up: the state
        dynamic, seconds = [], []
        for _ in range(args.steps):
            held = memory.settle(device)
            _, peak, s = memory.measure(lambda: optimizer.step(loss), device)
            dynamic.append(peak - held)
            seconds.append(s)
        dynamic = statistics.median(dynamic)
        measured = dict(weights=weights, state=held - before, dynamic=dynamic,
                        peak=weights + held - before + dynamic)
        kept = sum(p.grad.nbytes for p in params if p.grad is not None)
        fe = getattr(optimizer, "defaults", {}).get("foreach", False)
        foreach = bool(fe) or fe is None and memory.is_cuda(device)          # torch's default
        row.update(step_s=statistics.mean(seconds), forward_passes=optimizer.forward_passes)
    predicted = memory.predict(opt, t, amp=bool(half and backprop), foreach=foreach, kept=kept,
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
    """Rows as a table on screen, CSV and JSON (GiB, seconds), and a PNG for a sweep."""
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
    if len({r[sweep] for r in table}) < 2:
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
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", default="opt-125m",
                    help=f"one of {', '.join(models.CONFIGS)} (or their hub ids), or a local "
                    "config directory")
    ap.add_argument("--opt", default="zo_sgd", help="comma-separated, of: "
                    f"{', '.join(optimizers.OPTIMIZERS)} (meta device: {', '.join(TAB5)})")
    ap.add_argument("--peft", default="ft", help="ft (all weights), or a method of peft.py")
    ap.add_argument("--dtype", default="fp32", choices=tuple(models.DTYPES),
                    help="16-bit: the weights of ZO (F16), autocast for FO (FP16)")
    ap.add_argument("--loss", default="task", choices=LOSSES, help="task: as train.py's loss, the "
                    "last token scored; lm: next-token loss on every token (full logits)")
    ap.add_argument("--pair", action="store_true", help="ZO: the paired forward, train.py's "
                    "default (task loss; the batch doubled); without it the sequential path")
    ap.add_argument("--batch_size", type=int, default=4, help="sequences per batch")
    ap.add_argument("--seq_len", type=int, default=128, help="tokens per sequence")
    ap.add_argument("--steps", type=int, default=3, help="measured steps, after one warm-up")
    ap.add_argument("--sweep", nargs=2, metavar=("NAME", "VALUES"),
                    help=f"NAME: {', '.join(SWEEPS)}; VALUES comma-separated, e.g. 64,128")
    ap.add_argument("--out", help="directory for CSV/JSON/PNG; without it a sweep writes to "
                    "results/ but never replaces a file there")
    ap.add_argument("--threads", type=int, help="CPU threads (None: torch's)")
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
    if args.pair and (args.loss != "task" or args.device == "meta"):
        fail("--pair measures train.py's paired forward: it needs --loss task and a real device")
    name, values = args.sweep or ("seq_len", str(args.seq_len))
    if name not in SWEEPS:
        fail(f"unknown --sweep '{name}'; choose from: {', '.join(SWEEPS)}")
    if not all(v.isdigit() for v in values.split(",")):
        fail(f"--sweep {name}: the values must be comma-separated integers, not '{values}'")
    if args.sweep or args.out:
        tags = [name if args.sweep else f"b{args.batch_size}_s{args.seq_len}"] + \
            [args.dtype] * (args.dtype != "fp32") + [args.peft] * (args.peft != "ft") + \
            [args.loss] * (args.loss != "task") + ["pair"] * args.pair + \
            ["meta"] * (args.device == "meta")
        stem = "_".join([os.path.basename(models.HUB_IDS.get(args.model, args.model).rstrip("/")),
                         *tags])
        taken = [f for f in (f"{stem}.{e}" for e in ("csv", "json", "png"))
                 if os.path.exists(os.path.join(RESULTS, f))]
        if args.out is None and taken:
            fail(f"{RESULTS}/{taken[0]} exists (a recorded result); give --out {RESULTS} to "
                 "replace it, or another --out")
    if args.threads:
        torch.set_num_threads(args.threads)
    memory.track_tensors()
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
        write(rows, args.out or RESULTS, stem, name, " ".join(["python bench_memory.py", *argv]))
    return rows


if __name__ == "__main__":
    main()
