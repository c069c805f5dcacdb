"""Training-loss curves of the recorded learning run, ZO vs FO, from each run's log.jsonl.

    python results/learning-run/plot.py          # writes results/learning-run/loss.png

Left: loss per optimizer step; right: the same against cumulative step time, since a ZO step
(two forward passes) is cheaper than an FO one (a forward and a backward). Curves are running
means over --window steps (the raw per-batch loss is drawn faintly behind).
"""
import argparse
import json
import os

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)

HERE = os.path.dirname(os.path.abspath(__file__))


def read_log(run_dir):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return (np.array([r["step"] for r in rows]), np.array([r["loss"] for r in rows]),
            np.cumsum([r["time_s"] for r in rows]))


def running_mean(x, window):
    """Mean of x[max(0, i+1−window) : i+1] for every i (fewer values at the start)."""
    total = np.cumsum(np.insert(x, 0, 0.0))
    end = np.arange(1, len(x) + 1)
    start = np.maximum(end - window, 0)
    return (total[end] - total[start]) / (end - start)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="*", default=["zo-sgd-lora", "zo-sgd-ft", "fo-adam-ft"],
                    help="run directories under results/learning-run/")
    ap.add_argument("--window", type=int, default=50)
    ap.add_argument("--out", default=os.path.join(HERE, "loss.png"))
    args = ap.parse_args()
    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for name in args.runs:
        step, loss, seconds = read_log(os.path.join(HERE, name))
        smooth = running_mean(loss, args.window)
        line, = by_step.plot(step, smooth, label=name)
        by_step.plot(step, loss, color=line.get_color(), alpha=0.12, linewidth=0.5)
        by_time.plot(seconds / 60, smooth, color=line.get_color(), label=name)
    by_step.set(xlabel="optimizer step", ylabel="training loss (CE over the two verbalizers)",
                title=f"SST-2, running mean over {args.window} steps")
    by_time.set(xlabel="cumulative step time (min, one CPU thread)", title="the same vs time")
    for ax in (by_step, by_time):
        ax.grid(alpha=0.3)
    by_step.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
