"""One-GPU check: memory, the bitwise lr = 0 invariant, 16-bit updates and speed, recorded.

    python gpu_check.py                   # one NVIDIA GPU, writes results/gpu/ (each of its
                                          # 9 sub-commands stops at --timeout seconds)
    python gpu_check.py --cpu --out DIR   # the same checks on tiny shapes, on the CPU (tested)

Needs python and PyPI only: every model is built from its config with random weights (no hub),
and the tokenizer is a word-level one trained here on the synthetic task's words. Four parts:

(a) bench_memory.py rows for the OPT-1.3B and OPT-13B shapes, ZO-SGD and FO-SGD, 16-bit, batch
    16 × 400 and 4 × 400: peak GiB beside Tab. 5, and step time (the paper's Tab. 4/A1 setting:
    OPT-13B ZO-SGD at 4 × 400 took 11.1 s/step and ~25–30 GB on an A100); Tab. 5 describes
    the sequential ZO path, and one more OPT-13B row measures train.py's paired default.
(b) a 30-step train.py run on a local random OPT-1.3B directory, 16-bit, `--lr 0 --save`: the
    saved weights must equal the input bit for bit (the functional perturbation writes nothing).
(c) the same run at a real learning rate, with and without stochastic rounding of the 16-bit
    update: the share of weight entries an update actually moved (train.py logs it).
(d) bench_speed.py on the OPT-1.3B and OPT-13B shapes, full fine-tuning, 16-bit, batch
    16 × 64: this project's ZO-SGD step against its floor 2·T_f + 2·T_u and against a
    MeZO-style step (docs/speed.md), wall time on the GPU.

Every sub-command's output is kept in OUT/log.txt; OUT/summary.json has the numbers and the
hardware (GPU name, SM count, torch and CUDA versions). A failed part is recorded, not fatal.
"""
import argparse
import glob
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, models as tk_models, pre_tokenizers, trainers
from transformers import OPTConfig, PreTrainedTokenizerFast

import checkpoint
import models

HERE = os.path.dirname(os.path.abspath(__file__))
WORDS = [f"w{i}" for i in range(300)]


def hardware(device) -> dict:
    """What the numbers were measured on; u itself depends on the GPU's SM count (README)."""
    info = checkpoint.fingerprint(device) | dict(python=platform.python_version(), device=device)
    if device == "cuda":
        info["memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return info


def run(cmd, log, timeout) -> tuple[int, float]:
    """Run `cmd` (a list), append its output to `log`; return (exit status, seconds)."""
    start = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=HERE,
                                timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = 124
            f.write(f"timed out after {timeout} s\n")
    return rc, time.perf_counter() - start


def tiny_config(work) -> str:
    """--cpu: a 2-layer, 32-wide OPT config saved to a folder that bench_memory.py can read."""
    path = os.path.join(work, "tiny-config")
    OPTConfig(vocab_size=512, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
              num_attention_heads=4, max_position_embeddings=512,
              word_embed_proj_dim=32).save_pretrained(path)
    return path


def synthetic_task(work, model_name, dtype, device) -> str:
    """A random-weight OPT of `model_name`'s shape with a word-level tokenizer, saved to work/opt,
    and an SST-2-format data set of random words in work/data; returns the model directory."""
    rng, path = random.Random(0), os.path.join(work, "opt")
    os.makedirs(os.path.join(work, "data", "sst2"), exist_ok=True)
    for split, n in (("train.tsv", 400), ("dev.tsv", 100)):
        rows = "".join(f"{' '.join(rng.choices(WORDS, k=12))}\t{rng.randint(0, 1)}\n"
                       for _ in range(n))
        with open(os.path.join(work, "data", "sst2", split), "w") as f:
            f.write("sentence\tlabel\n" + rows)
    tok = Tokenizer(tk_models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([" ".join(WORDS) + " It was terrible great"], trainers.WordLevelTrainer(
        special_tokens=["<s>", "<pad>", "</s>", "<unk>"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="</s>", eos_token="</s>",
                            pad_token="<pad>", unk_token="<unk>").save_pretrained(path)
    models.from_config(models.config(model_name), models.DTYPES[dtype],
                       device).save_pretrained(path)
    return path


def safetensors_dir(path) -> dict:
    return {k: v for f in sorted(glob.glob(os.path.join(path, "*.safetensors")))
            for k, v in load_file(f).items()}


def train_run(args, model, work, name, extra) -> dict:
    """A 30-step ZO-SGD run of train.py on the synthetic task; its result and log."""
    out = os.path.join(work, name)
    cmd = [sys.executable, "train.py", "--model", model, "--device", args.device, "--dtype",
           args.dtype, "--task", "sst2", "--data_dir", os.path.join(work, "data"), "--opt",
           "zo_sgd", "--steps", "30", "--batch_size", "16", "--num_train", "256", "--num_dev",
           "32", "--num_eval", "64", "--eval_every", "10", "--output_dir", out, *extra]
    rc, seconds = run(cmd, args.log, args.timeout)
    if rc:
        return dict(status=f"failed ({rc})", seconds=seconds)
    with open(os.path.join(out, "result.json")) as f:
        result = json.load(f)
    with open(os.path.join(out, "log.jsonl")) as f:
        log = [json.loads(line) for line in f]
    return dict(status="ok", seconds=seconds, result=result, log=log, out=out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--cpu", action="store_true",
                    help="tiny shapes on the CPU (a test of the script)")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "gpu"), help="results folder")
    ap.add_argument("--dtype", default="bf16", choices=("fp16", "bf16"), help="16-bit weights")
    ap.add_argument("--timeout", type=int, default=170, help="seconds per sub-command")
    ap.add_argument("--lr", type=float, default=1e-6, help="learning rate of part (c)")
    args = ap.parse_args(argv)
    args.device = "cpu" if args.cpu else "cuda"
    if not args.cpu and not torch.cuda.is_available():
        sys.exit("error: no CUDA device here; use --cpu for the tiny CPU mode")
    os.makedirs(args.out, exist_ok=True)
    args.log = os.path.join(args.out, "log.txt")
    open(args.log, "w").close()
    work = tempfile.mkdtemp(prefix="gpu_check_")
    small, big = ("opt-1.3b", "opt-13b") if not args.cpu else (tiny_config(work),) * 2
    seq = 32 if args.cpu else 400
    summary = dict(hardware=hardware(args.device), parts={})

    # (a) memory and step time beside Tab. 5
    memory_rows = []
    for model, opts, batch, pair in ((small, "zo_sgd,fo_sgd", 16, []), (big, "zo_sgd", 16, []),
                                     (big, "zo_sgd,fo_sgd", 4, []), (big, "zo_sgd", 4, ["--pair"])):
        if args.cpu:
            batch = 2
        stem = os.path.join(args.out, "memory")
        rc, seconds = run([sys.executable, "bench_memory.py", "--model", model, "--opt", opts,
                           "--device", args.device, "--dtype", args.dtype, "--seq_len", str(seq),
                           "--batch_size", str(batch), "--steps", "2", "--out", stem, *pair],
                          args.log, args.timeout)
        rows = []
        for path in glob.glob(os.path.join(stem, "*.json")):
            with open(path) as f:
                rows += json.load(f)["rows"]
            os.remove(path)
        keep = ("opt", "pair", "measured_peak", "predicted_peak", "step_s", "forward_s", "gap")
        memory_rows.append(dict(model=os.path.basename(model), opts=opts, batch=batch,
                                seq_len=seq, status=rc, seconds=round(seconds, 1),
                                rows=[{k: r.get(k) for k in keep} for r in rows]))
    summary["parts"]["memory"] = memory_rows

    # (d) speed: this project's ZO-SGD step beside its floor and a MeZO-style step
    speed_rows = []
    for model in (small, big):
        stem = os.path.join(args.out, "speed")
        shape = ["--batch_size", "2", "--seq_len", "8", "--reps", "1"] if args.cpu else \
                ["--batch_size", "16", "--seq_len", "64", "--reps", "3"]
        rc, seconds = run([sys.executable, "bench_speed.py", "--model", model, "--variants",
                           "full", "--device", args.device, "--dtype", args.dtype, *shape,
                           "--out", stem], args.log, args.timeout)
        for path in glob.glob(os.path.join(stem, "*.json")):
            with open(path) as f:
                r = json.load(f)
            os.remove(path)
            keep = ("median", "floor", "speedup_vs_mezo", "pair_over_floor", "seq_over_floor")
            speed_rows.append(dict(model=os.path.basename(model), status=rc,
                                   seconds=round(seconds, 1), dtype=r["dtype"],
                                   **{k: r["wall"][k] for k in keep}))
        if rc:
            speed_rows.append(dict(model=os.path.basename(model), status=rc))
        if args.cpu:
            break                                  # one tiny shape is enough to test the part
    summary["parts"]["speed"] = speed_rows

    # (b) lr = 0 for 30 steps: the saved weights equal the input bit for bit
    try:
        model = synthetic_task(work, small, args.dtype, args.device)
        zero = train_run(args, model, work, "lr0", ["--lr", "0", "--save"])
        if zero["status"] == "ok":
            before, after = safetensors_dir(model), safetensors_dir(
                os.path.join(zero["out"], "model"))
            same = before.keys() == after.keys() and all(
                torch.equal(before[k], after[k]) for k in before)
            zero.update(bitwise_unchanged=same, tensors=len(before),
                        step_time_s=zero["result"]["step_time_s"],
                        peak_memory_gb=zero["result"]["peak_memory_gb"])
        # (c) a real learning rate, with and without stochastic rounding of the update
        moved = {}
        for rounding in ("stochastic", "nearest"):
            r = train_run(args, model, work, rounding, ["--lr", str(args.lr),
                                                        "--rounding", rounding])
            shares = [line["moved_fraction"] for line in r.get("log", [])
                      if line.get("moved_fraction") is not None]
            moved[rounding] = dict(status=r["status"], seconds=r["seconds"],
                                mean_moved_fraction=sum(shares) / len(shares) if shares else None)
    finally:
        shutil.rmtree(work)
    for part in (zero, *moved.values()):
        for key in ("log", "result", "out"):
            part.pop(key, None)
    summary["parts"]["lr0"], summary["parts"]["moved"] = zero, moved
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    ok = zero.get("bitwise_unchanged") is True
    print(json.dumps(summary, indent=1))
    print(f"lr 0 for 30 steps: weights bitwise unchanged = {zero.get('bitwise_unchanged')}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
