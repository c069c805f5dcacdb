"""Run the benchmark: a grid of train.py runs, selection on dev, the paper's tables and plots.

    python grid.py run grids/opt-1.3b_sst2.json --out runs/opt-1.3b_sst2   # runs, then reports
    python grid.py report --out runs/opt-1.3b_sst2                          # tables and plots only

A *table cell* of the paper (Tab. 2: one model, one task, one optimizer, one fine-tuning scheme)
is not one run. The paper (§4.1) grid-searches the learning rate η and the ZO radius μ for each
method, and each *grid point* (η, μ) is trained once per seed. A *run* is one train.py process,
in its own directory named by its settings:

    <out>/<model>/<task>/<optimizer>/<scheme>/lr<η>_mu<μ>/seed<s>/    config.json, log.jsonl,
                                                                       result.json (train.py)
    <out>/<model>/<task>/<optimizer>/<scheme>/lr<η>_mu<μ>/seed<s>.out  its stdout (.err: stderr)

Selection, per table cell (never on test; the released code chose checkpoints by test loss):

    (η*, μ*) = argmax over grid points of  mean_s dev_accuracy(η, μ, s)

(ties go to the earlier point of the spec's grid); the cell then reports the test accuracy at
(η*, μ*) as mean ± sample std over the seeds, with η*, μ* in a footnote table. Only grid points
with every seed finished are candidates; a cell with points still missing is marked †. Inside a
run, train.py has already chosen the step by dev accuracy (--select best), so dev picks both the
step and the grid point, and test is read once.

A spec (JSON) is the product models × tasks × schemes × seeds × optimizers, each optimizer with
its own grid; keys of an optimizer entry override its grid for one scheme:

    {"models": ["facebook/opt-1.3b"], "tasks": ["sst2"], "schemes": ["ft", "lora"], "seeds": [0],
     "flags": {"steps": 20000, "eval_every": 500},                    # every run
     "optimizers": {
       "zo_sgd": {"lr": [1e-6, 1e-7], "mu": [1e-3], "lora": {"lr": [1e-4, 1e-5], "mu": [1e-2]}},
       "fo_adam": {"lr": [1e-4, 1e-5], "flags": {"steps": 625}},     # this optimizer's runs
       "zo_sgd_sign_scalar": {"opt": "zo_sgd_sign", "lr": [1e-6], "flags": {"sign": "scalar"}}}}

A row label that is not an optimizer names a variant (its "opt" says which optimizer it runs).
Every flag is checked against train.py's Config before anything runs (one line, exit 2).

Running: one run at a time, or one per visible GPU (--gpus 0,1; default: every GPU torch sees),
each child with CUDA_VISIBLE_DEVICES set to its GPU. A directory with a valid result.json is done
and skipped; one with a checkpoint-<step>/ is resumed (train.py --resume, on the run's own number
of CPU threads); any other non-empty one is rerun (--overwrite). A failed run never stops the
others; each failure is listed at the end with the last line of its stderr, and the exit status
is 1.

Outputs of `report` in <out>: report.md (test accuracy, chosen point, memory and step time, in the
paper's layout: rows optimizers, columns schemes / tasks / models), cells.csv (one row per table
cell), points.csv (every grid point: how sensitive a method is to η and μ), plots/ (per cell: the
loss and dev-accuracy curves of every grid point; per model × task: the optimizers side by side at
their chosen points).
"""
import argparse
import concurrent.futures
import csv
import dataclasses
import itertools
import json
import os
import queue
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from matplotlib.figure import Figure        # no pyplot: no global figure state, no GUI backend
from tqdm import tqdm

import checkpoint
import train

ROOT = os.path.dirname(os.path.abspath(__file__))
TRAIN = os.path.join(ROOT, "train.py")
FIELDS = {f.name: f for f in dataclasses.fields(train.Config)}
SCHEMES = FIELDS["peft"].metadata["choices"]
OPTIMIZERS = FIELDS["opt"].metadata["choices"]
SET_BY_GRID = ("model", "task", "opt", "peft", "lr", "mu", "seed", "output_dir")
SPEC_KEYS = ("description", "models", "tasks", "schemes", "seeds", "flags", "optimizers")
GRID_KEYS = ("lr", "mu", "flags")
NAMES = {"fo_sgd": "FO-SGD", "fo_adam": "FO-Adam", "forward_grad": "Forward-Grad",
         "zo_sgd": "ZO-SGD", "zo_sgd_mmt": "ZO-SGD-MMT", "zo_sgd_cons": "ZO-SGD-Cons",
         "zo_sgd_sign": "ZO-SGD-Sign", "zo_adam": "ZO-Adam"}
SCHEME_NAMES = {"ft": "FT", "lora": "LoRA", "prefix": "Prefix", "prompt": "Prompt"}
DEV_LINE = re.compile(r"step (\d+) \| dev accuracy ([0-9.]+)")   # what train.py prints


class SpecError(Exception):
    """Bad grid spec or command line: reported as one line, exit status 2."""


# ---- the spec: what a run is -------------------------------------------------------------------

@dataclass(frozen=True)
class Cell:
    """One train.py run: a table cell (model, task, row, scheme), a grid point, a seed."""
    model: str
    task: str
    row: str                   # the table row: an optimizer or a named variant of one
    opt: str
    scheme: str
    lr: float
    mu: float                  # None: train.py's default, left out of the name
    seed: int
    flags: tuple               # (name, value) pairs for train.py, shared and per optimizer

    @property
    def key(self):
        return self.model, self.task, self.row, self.scheme

    @property
    def point(self):
        return f"lr{self.lr:g}" + ("" if self.mu is None else f"_mu{self.mu:g}")

    @property
    def path(self):
        return os.path.join(short(self.model), self.task, self.row, self.scheme, self.point,
                            f"seed{self.seed}")

    def args(self, out):
        """train.py's command line for this run, writing to <out>/<path>."""
        args = ["--model", self.model, "--task", self.task, "--opt", self.opt,
                "--peft", self.scheme, "--lr", repr(self.lr), "--seed", str(self.seed)]
        args += [] if self.mu is None else ["--mu", repr(self.mu)]
        for name, value in self.flags:
            args += [f"--{name}"] if value is True else [f"--{name}", str(value)]
        return args + ["--output_dir", os.path.join(out, self.path)]


def short(model):
    """A model's directory name: the last part of its hub id or path."""
    return os.path.basename(model.rstrip("/\\")) or model


def as_list(value, what, kind):
    """A list of `kind` from a list or a single value; anything else is a SpecError."""
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, kind) and not isinstance(v, bool) for v in values):
        raise SpecError(f"{what} must be a non-empty list of {kind_name(kind)}, got {value!r}")
    return values


def kind_name(kind):
    return {str: "strings", int: "integers", (int, float): "numbers"}[kind]


def unknown(keys, valid, where):
    extra = [k for k in keys if k not in valid]
    if extra:
        raise SpecError(f"{where}: unknown key '{extra[0]}'; valid keys: {', '.join(valid)}")


def check_flags(flags, where):
    """train.py flags {name: value}, each checked against Config's type and choices."""
    if not isinstance(flags, dict):
        raise SpecError(f"{where}: flags must be an object of train.py flags, got {flags!r}")
    checked = {}
    for name, value in flags.items():
        if name in SET_BY_GRID:
            raise SpecError(f"{where}: flag '{name}' is set by the grid, not by flags")
        if name not in FIELDS:
            raise SpecError(f"{where}: '{name}' is not a train.py flag (see python train.py -h)")
        kind = FIELDS[name].type
        ok = (isinstance(value, bool) if kind is bool else
              isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float
              else isinstance(value, kind) and not isinstance(value, bool))
        if not ok:
            raise SpecError(f"{where}: flag '{name}' must be {kind.__name__}, got {value!r}")
        choices = FIELDS[name].metadata.get("choices")
        if choices and value not in choices:
            raise SpecError(f"{where}: flag '{name}' = {value!r}; choose from: "
                            f"{', '.join(choices)}")
        if value is not False:                 # a false switch is train.py's default
            checked[name] = value
    return checked


def positive(values, what):
    if any(v <= 0 for v in values):
        raise SpecError(f"{what} must be positive, got {values}")
    return [float(v) for v in values]


def optimizer_grid(row, entry, scheme):
    """(opt, lrs, mus, flags) of one row for one scheme: the entry, then its scheme's keys."""
    where = f"optimizers.{row}"
    if not isinstance(entry, dict):
        raise SpecError(f"{where} must be an object with lr, mu, flags, opt or a scheme")
    unknown(entry, ("opt",) + GRID_KEYS + SCHEMES, where)
    opt = entry.get("opt", row)
    if opt not in OPTIMIZERS:
        raise SpecError(f"{where}: unknown optimizer '{opt}' (a variant names it with \"opt\"); "
                        f"choose from: {', '.join(OPTIMIZERS)}")
    if not re.fullmatch(r"[A-Za-z0-9_.+-]+", row):
        raise SpecError(f"{where}: a row label is a directory name: letters, digits, _ . + -")
    override = entry.get(scheme, {})
    if not isinstance(override, dict):
        raise SpecError(f"{where}.{scheme} must be an object with lr, mu, flags")
    unknown(override, GRID_KEYS, f"{where}.{scheme}")
    grid = {**{k: entry[k] for k in GRID_KEYS if k in entry}, **override}
    if "lr" not in grid:
        raise SpecError(f"{where}: no lr grid for scheme {scheme}")
    lrs = positive(as_list(grid["lr"], f"{where}: lr", (int, float)), f"{where}: lr")
    mus = ([None] if "mu" not in grid else
           positive(as_list(grid["mu"], f"{where}: mu", (int, float)), f"{where}: mu"))
    flags = {**check_flags(entry.get("flags", {}), f"{where}.flags"),
             **check_flags(override.get("flags", {}), f"{where}.{scheme}.flags")}
    return opt, lrs, mus, flags


def expand(spec):
    """Every run of a spec, in table order: models, tasks, rows, schemes, grid points, seeds."""
    if not isinstance(spec, dict):
        raise SpecError("a grid spec is a JSON object")
    unknown(spec, SPEC_KEYS, "spec")
    for key in ("models", "tasks", "optimizers"):
        if key not in spec:
            raise SpecError(f"spec: '{key}' is missing")
    models = as_list(spec["models"], "models", str)
    tasks = as_list(spec["tasks"], "tasks", str)
    schemes = as_list(spec.get("schemes", ["ft"]), "schemes", str)
    for what, values, choices in (("task", tasks, FIELDS["task"].metadata["choices"]),
                                  ("scheme", schemes, SCHEMES)):
        for v in values:
            if v not in choices:
                raise SpecError(f"unknown {what} '{v}'; choose from: {', '.join(choices)}")
    seeds = as_list(spec.get("seeds", [0]), "seeds", int)
    shared = check_flags(spec.get("flags", {}), "flags")
    rows = spec["optimizers"]
    if not isinstance(rows, dict) or not rows:
        raise SpecError("optimizers must be a non-empty object: row label -> grid")
    cells = []
    for model, task, row, scheme in itertools.product(models, tasks, rows, schemes):
        opt, lrs, mus, flags = optimizer_grid(row, rows[row], scheme)
        merged = tuple({**shared, **flags}.items())
        cells += [Cell(model, task, row, opt, scheme, lr, mu, seed, merged)
                  for lr, mu, seed in itertools.product(lrs, mus, seeds)]
    paths = [c.path for c in cells]
    if len(set(paths)) < len(paths):
        twice = next(p for p in paths if paths.count(p) > 1)
        raise SpecError(f"two runs would share the directory {twice} (models with the same "
                        "last name, or a repeated value in a grid)")
    return cells


def load_spec(path):
    """The spec at `path`, parsed (file:line on a JSON error) and expanded."""
    try:
        with open(path) as f:
            spec = json.load(f)
    except OSError as e:
        raise SpecError(f"{path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise SpecError(f"{path}:{e.lineno}: {e.msg}") from None
    try:
        return spec, expand(spec)
    except SpecError as e:
        raise SpecError(f"{path}: {e}") from None


# ---- running -----------------------------------------------------------------------------------

def read_json(path):
    """A JSON file's content, or None when it is missing or half-written."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def read_result(run_dir):
    """result.json when it is there and has the accuracies, else None."""
    result = read_json(os.path.join(run_dir, "result.json"))
    ok = isinstance(result, dict) and all(
        isinstance(result.get(k), (int, float)) for k in ("dev_accuracy", "test_accuracy"))
    return result if ok else None


def state(run_dir):
    """done (valid result.json), resume (a checkpoint-<step>/ of train.py), dirty (anything else
    there) or new."""
    if read_result(run_dir) is not None:
        return "done"
    if os.path.isdir(run_dir) and checkpoint.latest(run_dir):
        return "resume"
    return "dirty" if os.path.isdir(run_dir) and os.listdir(run_dir) else "new"


def stale(cell, run_dir):
    """For a finished run: the first flag its config.json holds with another value, or None."""
    config = read_json(os.path.join(run_dir, "config.json")) or {}
    wanted = dict(model=cell.model, task=cell.task, opt=cell.opt, peft=cell.scheme, lr=cell.lr,
                  seed=cell.seed, **({} if cell.mu is None else {"mu": cell.mu}),
                  **dict(cell.flags))
    for name, value in wanted.items():
        if name in config and config[name] != value:
            return f"finished with --{name} {config[name]}, the spec says {value}"
    return None


def restart_args(kind, run_dir):
    """Extra train.py flags for a run found interrupted (resume) or with leftovers (dirty)."""
    return ["--resume", run_dir] if kind == "resume" else ["--overwrite"]


def last_line(path):
    """The last non-empty line of a file (a progress bar's carriage returns split lines too)."""
    try:
        with open(path, errors="replace") as f:
            lines = [s.strip() for s in re.split(r"[\r\n]", f.read()) if s.strip()]
    except OSError:
        return "no output"
    return lines[-1] if lines else "no output"


def run_one(cell, out, gpu, kind, threads):
    """One train.py process; returns (ok, seconds, reason). Output goes to seed<s>.out/.err."""
    run_dir = os.path.join(out, cell.path)
    args = cell.args(out) + (restart_args(kind, run_dir) if kind in ("resume", "dirty") else [])
    env = dict(os.environ)
    env.setdefault("TQDM_MININTERVAL", "30")          # a progress line every 30 s in .err
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    if kind == "resume":        # train.py resumes a CPU run only on its own number of threads
        hardware = (read_json(os.path.join(run_dir, "config.json")) or {}).get("hardware", {})
        threads = hardware.get("threads", threads)
    env.setdefault("OMP_NUM_THREADS", str(threads))   # CPU workers share the cores
    os.makedirs(os.path.dirname(run_dir), exist_ok=True)
    mode = "a" if kind == "resume" else "w"
    start = time.perf_counter()
    with open(run_dir + ".out", mode) as stdout, open(run_dir + ".err", mode) as stderr:
        code = subprocess.run([sys.executable, TRAIN, *args], stdout=stdout, stderr=stderr,
                              env=env).returncode
    seconds = time.perf_counter() - start
    if code == 0 and read_result(run_dir) is not None:
        return True, seconds, ""
    return False, seconds, f"exit {code}: {last_line(run_dir + '.err')}"


def slots(gpus, jobs):
    """Worker slots: each GPU `jobs` times (CUDA_VISIBLE_DEVICES), or `jobs` CPU workers."""
    if gpus == "auto":
        gpus = ",".join(str(i) for i in range(torch.cuda.device_count()))
    ids = [g.strip() for g in gpus.split(",") if g.strip()] if gpus else []
    if jobs < 1:
        raise SpecError(f"--jobs must be at least 1, got {jobs}")
    return [g for g in ids for _ in range(jobs)] if ids else [None] * jobs


def run_grid(cells, out, workers):
    """Run every unfinished cell, `len(workers)` at a time; returns [(cell, reason)] failures."""
    todo, failures = [], []
    for cell in cells:
        run_dir = os.path.join(out, cell.path)
        kind = state(run_dir)
        if kind != "done":
            todo.append((cell, kind))
        elif stale(cell, run_dir):
            failures.append((cell, stale(cell, run_dir)))
    print(f"{len(cells)} runs: {len(cells) - len(todo)} finished before, {len(todo)} to run "
          f"on {len(workers)} worker(s) ({', '.join(w or 'cpu' for w in workers)})")
    free = queue.Queue()
    for w in workers:
        free.put(w)
    threads = max(1, (os.cpu_count() or 1) // len(workers))

    def work(cell, kind):
        gpu = free.get()
        try:
            return run_one(cell, out, gpu, kind, threads)
        finally:
            free.put(gpu)

    bar = tqdm(total=len(todo), desc="grid", unit="run", dynamic_ncols=True)
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(workers)) as pool:
        futures = {pool.submit(work, cell, kind): (cell, kind) for cell, kind in todo}
        try:
            for future in concurrent.futures.as_completed(futures):
                cell, kind = futures[future]
                ok, seconds, reason = future.result()
                note = "" if kind == "new" else f" ({kind})"
                if ok:
                    r = read_result(os.path.join(out, cell.path))
                    tqdm.write(f"ok    {cell.path}{note}  dev {r['dev_accuracy']:.4f}  "
                               f"test {r['test_accuracy']:.4f}  {seconds:.0f} s")
                else:
                    failures.append((cell, reason))
                    tqdm.write(f"FAIL  {cell.path}{note}  {reason}")
                bar.update()
        except KeyboardInterrupt:          # the running children got the signal too
            for future in futures:
                future.cancel()
            tqdm.write("interrupted: the same command continues where this one stopped")
            raise
    bar.close()
    return failures


# ---- selection and tables ----------------------------------------------------------------------

def mean_std(values):
    """Mean and sample standard deviation (None for one value)."""
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None


@dataclass
class Selected:
    """A table cell after selection: the chosen point and its seeds' results."""
    point: str
    results: list
    points_done: int
    points_total: int

    def stat(self, key):
        return mean_std([r[key] for r in self.results])


def finished(cell, out):
    """A run's result, or None when it is missing or was run with other settings."""
    run_dir = os.path.join(out, cell.path)
    return None if stale(cell, run_dir) else read_result(run_dir)


def collect(cells, out):
    """{table cell key: {point: [result per seed, None where missing]}}, in spec order."""
    table = {}
    for cell in cells:
        points = table.setdefault(cell.key, {})
        points.setdefault(cell.point, []).append(finished(cell, out))
    return table


def select(points):
    """The point with the best mean dev accuracy among points with every seed done."""
    complete = {p: rs for p, rs in points.items() if all(r is not None for r in rs)}
    if not complete:
        return None
    best = max(complete, key=lambda p: statistics.mean(r["dev_accuracy"] for r in complete[p]))
    return Selected(best, complete[best], len(complete), len(points))


def pct(mean, std):
    """Accuracy in percent, as the paper prints it: 90.8 or 90.8 ± 0.4."""
    return f"{100 * mean:.1f}" + ("" if std is None else f" ± {100 * std:.1f}")


def layout(keys):
    """Rows (in spec order) and columns: (model, task, scheme) triples, labelled by what varies;
    what does not vary goes in the title."""
    rows = list(dict.fromkeys(k[2] for k in keys))
    columns = list(dict.fromkeys((k[0], k[1], k[3]) for k in keys))
    varies = [len({c[i] for c in columns}) > 1 for i in range(3)]
    varies[2] = varies[2] or not any(varies)

    def shown(column):
        model, task, scheme = column
        return short(model), task.upper(), SCHEME_NAMES.get(scheme, scheme)
    labels = [" · ".join(p for p, v in zip(shown(c), varies) if v) for c in columns]
    title = ", ".join(p for p, v in zip(shown(columns[0]), varies) if not v)
    return rows, columns, labels, title


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def report_tables(table):
    """report.md's tables, the rows of cells.csv and points.csv, from collect()'s table."""
    chosen = {key: select(points) for key, points in table.items()}
    rows, columns, labels, title = layout(list(table))

    def entries(fmt):
        out = []
        for row in rows:
            line = [NAMES.get(row, row)]
            for model, task, scheme in columns:
                s = chosen.get((model, task, row, scheme), "absent")
                line.append("" if s == "absent" else "–" if s is None else fmt(s))
            out.append(line)
        return out

    def accuracy(s):
        mark = "" if s.points_done == s.points_total else " †"
        return pct(*s.stat("test_accuracy")) + mark

    def point(s):
        return f"{s.point.replace('_', ', ')} (dev {pct(*s.stat('dev_accuracy'))})"

    def cost(s):
        return (f"{s.stat('peak_memory_gb')[0]:.2f} GB, "
                f"{1e3 * s.stat('step_time_s')[0]:.0f} ms")
    seeds = max(len(next(iter(p.values()))) for p in table.values())
    text = [f"## Test accuracy (%){' — ' + title if title else ''}",
            f"Mean ± sample std over {seeds} seed(s) at the grid point with the best mean dev "
            "accuracy; † = chosen among the grid points finished so far; – = none finished.",
            "", markdown_table(["", *labels], entries(accuracy)), "",
            "## Chosen grid point (by mean dev accuracy, %)", "",
            markdown_table(["", *labels], entries(point)), "",
            "## Peak memory and step time (mean over seeds, chosen point)", "",
            markdown_table(["", *labels], entries(cost)), ""]
    cell_rows, point_rows = [], []
    for (model, task, row, scheme), points in table.items():
        s = chosen[(model, task, row, scheme)]
        base = dict(model=model, task=task, optimizer=row, scheme=scheme)
        for p, results in points.items():
            done = [r for r in results if r is not None]
            stats = {k: mean_std([r[k] for r in done]) if done else (None, None)
                     for k in ("dev_accuracy", "test_accuracy")}
            point_rows.append(dict(base, point=p, seeds_done=len(done), seeds=len(results),
                                   dev_mean=stats["dev_accuracy"][0],
                                   test_mean=stats["test_accuracy"][0],
                                   selected=s is not None and p == s.point))
        if s is not None:
            cell_rows.append(dict(
                base, point=s.point, seeds=len(s.results),
                dev_mean=s.stat("dev_accuracy")[0], dev_std=s.stat("dev_accuracy")[1],
                test_mean=s.stat("test_accuracy")[0], test_std=s.stat("test_accuracy")[1],
                peak_memory_gb=s.stat("peak_memory_gb")[0], step_time_s=s.stat("step_time_s")[0],
                points_done=s.points_done, points_total=s.points_total))
    return "\n".join(text), cell_rows, point_rows, chosen


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        if rows:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


# ---- curves and plots --------------------------------------------------------------------------

def curves(run_dir):
    """(steps, losses) from log.jsonl and (steps, dev accuracies): log.jsonl lines that carry
    dev_accuracy where train.py writes them, else the "step N | dev accuracy x" lines it prints."""
    steps, losses, dev = [], [], []
    try:
        with open(os.path.join(run_dir, "log.jsonl")) as f:
            for line in f:
                entry = json.loads(line)
                if "dev_accuracy" in entry:
                    dev.append((entry["step"], entry["dev_accuracy"]))
                if "loss" in entry:
                    steps.append(entry["step"])
                    losses.append(entry["loss"])
    except (OSError, ValueError):
        pass
    if not dev and os.path.exists(run_dir + ".out"):
        with open(run_dir + ".out", errors="replace") as f:
            dev = [(int(s), float(a)) for s, a in DEV_LINE.findall(f.read())]
    dev = sorted(dict(dev).items())                # a resumed run may print a step twice
    return np.array(steps), np.array(losses, dtype=float), dev


def smooth(values, points=20):
    """Moving average over ~1/points of the run, so that ~points independent wiggles remain."""
    width = max(1, len(values) // points)
    if width == 1:
        return values
    return np.convolve(values, np.ones(width) / width, mode="valid")


def seed_mean(cell_dirs):
    """Loss (smoothed) and dev curves averaged over seeds, cut to the shortest run."""
    runs = [curves(d) for d in cell_dirs]
    runs = [r for r in runs if len(r[0])]
    if not runs:
        return None
    n = min(len(r[0]) for r in runs)
    loss = smooth(np.mean([r[1][:n] for r in runs], axis=0))
    steps = runs[0][0][:n][len(runs[0][0][:n]) - len(loss):]
    dev_steps = sorted(set.intersection(*[{s for s, _ in r[2]} for r in runs]))
    dev = [np.mean([dict(r[2])[s] for r in runs]) for s in dev_steps]
    return steps, loss, dev_steps, dev


def plot_cell(path, key, grid_dirs, selected):
    """One table cell: loss and dev accuracy of every grid point, the chosen one bold."""
    fig = Figure(figsize=(11, 4))
    left, right = fig.subplots(1, 2)
    for point, dirs in grid_dirs.items():
        c = seed_mean(dirs)
        if c is None:
            continue
        style = dict(lw=2.2, zorder=3) if point == selected else dict(lw=0.9, alpha=0.7)
        line, = left.plot(c[0], c[1], label=point + (" (chosen)" if point == selected else ""),
                          **style)
        right.plot(c[2], c[3], marker="o", ms=3, color=line.get_color(), **style)
    model, task, row, scheme = key
    fig.suptitle(f"{NAMES.get(row, row)} · {SCHEME_NAMES.get(scheme, scheme)} · "
                 f"{short(model)} · {task.upper()} (mean over seeds)")
    left.set(xlabel="step", ylabel="training loss (moving average)")
    right.set(xlabel="step", ylabel="dev accuracy")
    if left.lines:
        left.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_row(path, model, task, columns, chosen_dirs):
    """One model × task: each scheme a column, each optimizer a line at its chosen point."""
    schemes = [s for m, t, s in columns if (m, t) == (model, task)]
    fig = Figure(figsize=(max(7.0, 4.2 * len(schemes)), 6.5))
    axes = fig.subplots(2, len(schemes), squeeze=False)
    for j, scheme in enumerate(schemes):
        top, bottom = axes[0, j], axes[1, j]
        for (m, t, row, s), (point, dirs) in chosen_dirs.items():
            c = seed_mean(dirs) if (m, t, s) == (model, task, scheme) else None
            if c is None:
                continue
            line, = top.plot(c[0], c[1], lw=1.2, label=f"{NAMES.get(row, row)} ({point})")
            bottom.plot(c[2], c[3], marker="o", ms=3, lw=1.2, color=line.get_color())
        lengths = [line.get_xdata()[-1] for line in top.lines]
        if lengths and max(lengths) >= 10 * min(lengths):    # FO's 625 steps beside ZO's 20000
            top.set_xscale("log")
            bottom.set_xscale("log")
        top.set_title(SCHEME_NAMES.get(scheme, scheme))
        top.set(xlabel="step", ylabel="training loss (moving average)")
        bottom.set(xlabel="step", ylabel="dev accuracy")
        if top.lines:
            top.legend(fontsize=6)
    fig.suptitle(f"{short(model)} · {task.upper()}: optimizers at their dev-selected grid points")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def report(cells, out, spec_path=None):
    """Write report.md, cells.csv, points.csv and plots/ for the runs of `cells` in `out`."""
    table = collect(cells, out)
    text, cell_rows, point_rows, chosen = report_tables(table)
    done = sum(finished(c, out) is not None for c in cells)
    head = [f"# Benchmark report: {out}", "",
            f"{done} of {len(cells)} runs finished"
            + (f" (spec: {spec_path})" if spec_path else "") + ". Selection on dev only; test "
            "accuracy is read at the chosen point. Curves: plots/.", ""]
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(head) + text)
    write_csv(os.path.join(out, "cells.csv"), cell_rows)
    write_csv(os.path.join(out, "points.csv"), point_rows)
    plots = os.path.join(out, "plots")
    os.makedirs(plots, exist_ok=True)
    dirs = {}
    for cell in cells:
        dirs.setdefault(cell.key, {}).setdefault(cell.point, []).append(
            os.path.join(out, cell.path))
    chosen_dirs = {key: (s.point, dirs[key][s.point]) for key, s in chosen.items() if s}
    for key, s in chosen.items():
        if s is not None:
            name = "_".join([short(key[0]), key[1], key[2], key[3]]) + ".png"
            plot_cell(os.path.join(plots, name), key, dirs[key], s.point)
    _, columns, _, _ = layout(list(table))
    for model, task in dict.fromkeys((m, t) for m, t, _ in columns):
        plot_row(os.path.join(plots, f"{short(model)}_{task}.png"), model, task, columns,
                 chosen_dirs)
    return text


# ---- command line ------------------------------------------------------------------------------

def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the unfinished runs of a spec, then report")
    run.add_argument("spec", help="grid spec (JSON), e.g. grids/opt-1.3b_sst2.json")
    run.add_argument("--out", required=True, help="directory of the runs and the report")
    run.add_argument("--gpus", default="auto",
                     help="comma-separated GPU ids, one run per GPU at a time; '' for CPU "
                          "(default: every GPU torch sees)")
    run.add_argument("--jobs", type=int, default=1, help="runs at once per GPU, or on CPU")
    run.add_argument("--dry_run", action="store_true",
                     help="list the runs and their state, run nothing")
    rep = sub.add_parser("report", help="tables and plots of the runs in --out")
    rep.add_argument("--out", required=True, help="a directory `grid.py run` wrote")
    rep.add_argument("--spec", help="spec to report (default: the copy in --out)")
    return ap.parse_args(argv)


def main(argv=None):
    """Entry point: bad input is one line on stderr and exit status 2."""
    args = parse(argv)
    try:
        spec_path = args.spec or os.path.join(args.out, "grid.json")
        if args.command == "report" and not os.path.exists(spec_path):
            raise SpecError(f"--out {args.out}: no grid.json (was it written by grid.py run?)")
        spec, cells = load_spec(spec_path)
        if args.command == "report":
            print(report(cells, args.out, spec_path))
            return 0
        workers = slots(args.gpus, args.jobs)
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if args.dry_run:
        for cell in cells:
            print(f"{state(os.path.join(args.out, cell.path)):6s} {cell.path}")
        return 0
    os.makedirs(args.out, exist_ok=True)
    train.write_json(os.path.join(args.out, "grid.json"), spec)
    failures = run_grid(cells, args.out, workers)
    print(report(cells, args.out, args.spec))
    if failures:
        print(f"\n{len(failures)} run(s) failed:", file=sys.stderr)
        for cell, reason in failures:
            print(f"  {cell.path}: {reason}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
