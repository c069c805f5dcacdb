"""Data-parallel ZO scaling on CPU: train.py on 1 and on 2 ranks under torchrun, tokens per second.

    python bench_dp.py --out results/dp            (needs ../shared/tokenizers; ~10 min on 2 cores)

What to expect (distributed.py): each rank runs the forwards of its share of the batch, so their
time falls as 1/N; but every rank draws the whole direction u (two passes over the trainable
tensors per ZO-SGD step: one for the paired forward's θ ± μu, one for the update) and updates
every weight, and that time does not fall at all. Full fine-tuning of a model whose batch is small
beside its size scales less than LoRA, whose u is tiny. The all-reduce itself, 4 float64 per
query, is negligible.

A random OPT (4 layers, width 512, the real OPT tokenizer) is saved once; in each of --repeats
rounds, for each scheme (full fine-tuning, LoRA), `python -m torch.distributed.run
--nproc_per_node N train.py` trains --steps ZO-SGD steps on SST-2 from ../shared/data with N = 1,
then 2, one thread per rank (OMP_NUM_THREADS=1); the speed-up compares the two runs of one round,
side by side in time. Tokens per step = the non-padding tokens of the global batch (the same
batches on 1 and 2 ranks); time = log.jsonl's step times after --warmup steps. Written to
--out: dp_scaling.json and dp_scaling.txt, with the CPU, the core count and the load average,
because on a shared machine the other processes' load changes the ratio.
"""
import argparse
import itertools
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile

import torch
from transformers import OPTConfig

import checkpoint
import models
import train

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from tiny import DATA, real_tokenizer  # noqa: E402  (the tests' tokenizer recipe, not copied)

WIDTH, LAYERS = 512, 4
SCHEMES = {"ft": [], "lora": ["--peft", "lora", "--lr", "1e-3"]}


def save_model(path):
    config = OPTConfig(vocab_size=50272, hidden_size=WIDTH, num_hidden_layers=LAYERS,
                       ffn_dim=4 * WIDTH, num_attention_heads=8, word_embed_proj_dim=WIDTH,
                       max_position_embeddings=512, dropout=0.0, attention_dropout=0.0)
    torch.manual_seed(0)
    models.from_config(config).save_pretrained(path)
    real_tokenizer("opt").save_pretrained(path)


def train_args(model, out, steps, batch_size, scheme):
    return ["--model", model, "--task", "sst2", "--data_dir", os.path.join(DATA, "sst2"),
            "--num_train", "256", "--num_dev", "16", "--num_eval", "16", "--steps", str(steps),
            "--batch_size", str(batch_size), "--eval_every", str(steps), "--lr", "1e-5",
            "--device", "cpu", "--select", "last", "--output_dir", out, *SCHEMES[scheme]]


def tokens_per_step(args, steps) -> list[int]:
    """Non-padding tokens of the global batch of every step, from train.py's own batches."""
    cfg = train.check(train.parse_args(args)[0])
    run = train.setup(cfg)
    return [int(run.batches.at(k)["attention_mask"].sum()) for k in range(steps)]


def launch(ranks, args):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
           "--master_addr", "127.0.0.1", "--master_port", str(port),
           os.path.join(ROOT, "train.py"), *args]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    with open(os.path.join(args[args.index("--output_dir") + 1], "log.jsonl")) as f:
        return [json.loads(line)["time_s"] for line in f]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="results/dp", help="folder for dp_scaling.json/.txt")
    ap.add_argument("--steps", type=int, default=12, help="ZO-SGD steps per run")
    ap.add_argument("--warmup", type=int, default=2, help="first steps left out of the timing")
    ap.add_argument("--batch_size", type=int, default=16, help="global batch (examples)")
    ap.add_argument("--repeats", type=int, default=2, help="rounds of 1 then 2 ranks per scheme")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    rows, load = [], [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as tmp:
        model = os.path.join(tmp, "opt")
        save_model(model)
        tokens = {scheme: tokens_per_step(train_args(model, os.path.join(tmp, f"probe-{scheme}"),
                                                     a.steps, a.batch_size, scheme),
                                          a.steps)[a.warmup:] for scheme in SCHEMES}
        for repeat, scheme, ranks in itertools.product(range(a.repeats), SCHEMES, (1, 2)):
            out = os.path.join(tmp, f"{scheme}-{ranks}-{repeat}")
            times = launch(ranks, train_args(model, out, a.steps, a.batch_size,
                                             scheme))[a.warmup:]
            rows.append(dict(repeat=repeat, scheme=scheme, ranks=ranks, steps_timed=len(times),
                             median_step_s=statistics.median(times),
                             tokens_per_s=sum(tokens[scheme]) / sum(times)))
        load.append(os.getloadavg()[0])
    for row in rows:                     # against 1 rank of the same round, run just before
        one = next(r for r in rows if (r["repeat"], r["scheme"], r["ranks"]) ==
                   (row["repeat"], row["scheme"], 1))
        row["speedup"] = row["tokens_per_s"] / one["tokens_per_s"]
    hardware = dict(cpu=checkpoint.fingerprint("cpu")["device_name"], cores=os.cpu_count(),
                    threads_per_rank=1, load_average_1min=load, torch=torch.__version__,
                    note="cores shared with other users' processes while measuring: the load "
                         "average (before, after) says how busy; the ratio is indicative only")
    model_info = dict(family="opt", width=WIDTH, layers=LAYERS, vocab=50272, task="sst2",
                      batch_size=a.batch_size, opt="zo_sgd", forward="paired")
    with open(os.path.join(a.out, "dp_scaling.json"), "w") as f:
        json.dump(dict(hardware=hardware, model=model_info, rows=rows), f, indent=2)
    lines = [f"{'round':>5}  {'scheme':8}{'ranks':>6}{'median step s':>15}{'tokens/s':>11}"
             f"{'speedup':>9}"]
    lines += [f"{r['repeat']:>5}  {r['scheme']:8}{r['ranks']:>6}{r['median_step_s']:>15.3f}"
              f"{r['tokens_per_s']:>11.0f}{r['speedup']:>9.2f}" for r in rows]
    lines += ["", f"{hardware['cpu']}, {hardware['cores']} cores, 1 thread per rank, torch "
              f"{hardware['torch']}; load average {load[0]:.1f} before, {load[1]:.1f} after",
              hardware["note"]]
    with open(os.path.join(a.out, "dp_scaling.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
