"""grid.py: spec expansion and naming, one-line errors, selection on dev (never test), tables,
restarts, and a tiny grid end to end through train.py (failure, interruption, report, plots).

    python -m pytest tests/test_grid.py -q            # the end-to-end test is marked slow
"""
import json
import os
import statistics
import subprocess
import sys

import pytest

import grid
from tiny import DATA, needs_shared, save_tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def spec_of(**changes):
    """A small valid spec, with top-level keys replaced by `changes`."""
    spec = {"models": ["org/m-a"], "tasks": ["sst2", "rte"], "schemes": ["ft", "lora"],
            "seeds": [0, 1], "flags": {"steps": 100, "data_dir": "d"},
            "optimizers": {
                "zo_sgd": {"lr": [1e-6, 1e-7], "mu": [1e-3],
                           "lora": {"lr": [1e-4], "mu": [1e-2, 1e-3]}},
                "fo_adam": {"lr": [1e-5], "flags": {"steps": 625}}}}
    spec.update(changes)
    return spec


def write_spec(path, spec):
    with open(path, "w") as f:
        json.dump(spec, f)
    return str(path)


def test_expand_counts_names_and_flags():
    """models × tasks × rows × schemes × points × seeds, each in a directory named by them."""
    cells = grid.expand(spec_of())
    # per task: zo_sgd ft 2 lr × 1 mu, lora 1 lr × 2 mu; fo_adam 1 lr in each scheme; × 2 seeds
    assert len(cells) == 2 * (2 + 2 + 1 + 1) * 2
    paths = [c.path for c in cells]
    assert os.path.join("m-a", "sst2", "zo_sgd", "ft", "lr1e-06_mu0.001", "seed0") in paths
    assert os.path.join("m-a", "rte", "zo_sgd", "lora", "lr0.0001_mu0.01", "seed1") in paths
    assert os.path.join("m-a", "rte", "fo_adam", "lora", "lr1e-05", "seed1") in paths
    fo = next(c for c in cells if c.row == "fo_adam").args("runs")
    zo = next(c for c in cells if c.row == "zo_sgd").args("runs")
    assert fo[fo.index("--steps") + 1] == "625" and "--mu" not in fo      # the row's flag wins
    assert zo[zo.index("--steps") + 1] == "100" and zo[zo.index("--mu") + 1] == "0.001"
    assert zo[-2:] == ["--output_dir", os.path.join("runs", cells[0].path)]
    assert grid.expand(spec_of()) == cells                                  # stable


def test_variant_rows_and_switches():
    """A row label that is not an optimizer runs the one its "opt" names; true switches pass."""
    cells = grid.expand(spec_of(tasks=["sst2"], schemes=["ft"], seeds=[0], optimizers={
        "zo_sgd_block": {"opt": "zo_sgd", "lr": 1e-6, "flags": {"block": True}}}))
    (cell,) = cells
    args = cell.args("o")
    assert cell.row == "zo_sgd_block" and args[args.index("--opt") + 1] == "zo_sgd"
    assert "--block" in args and cell.path.startswith(os.path.join("m-a", "sst2", "zo_sgd_block"))


@pytest.mark.parametrize("change,needle", [
    (dict(colour=1), "unknown key 'colour'"),
    (dict(tasks=["sst3"]), "unknown task 'sst3'"),
    (dict(schemes=["adapter"]), "unknown scheme 'adapter'"),
    (dict(seeds=[0.5]), "seeds must be a non-empty list of integers"),
    (dict(optimizers={"zo_sgdd": {"lr": [1e-6]}}), "unknown optimizer 'zo_sgdd'"),
    (dict(optimizers={"zo_sgd": {"lr": [1e-6], "nu": [1]}}), "unknown key 'nu'"),
    (dict(optimizers={"zo_sgd": {"lr": [-1e-6]}}), "lr must be positive"),
    (dict(optimizers={"zo_sgd": {"mu": [1e-3]}}), "no lr grid"),
    (dict(flags={"stepz": 3}), "'stepz' is not a train.py flag"),
    (dict(flags={"steps": "3"}), "flag 'steps' must be int"),
    (dict(flags={"dtype": "fp8"}), "choose from: auto, fp32"),
    (dict(flags={"lr": 1e-3}), "'lr' is set by the grid"),
    (dict(models=["a/m", "b/m"]), "share the directory"),
])
def test_bad_spec_is_one_line_and_exit_2(tmp_path, capsys, change, needle):
    path = write_spec(tmp_path / "spec.json", spec_of(**change))
    with pytest.raises(SystemExit) as e:
        grid.main(["run", path, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and needle in err and err.count("\n") == 1
    assert not os.path.exists(tmp_path / "out")                            # nothing written


def test_json_syntax_error_names_the_line(tmp_path, capsys):
    path = tmp_path / "spec.json"
    path.write_text('{"models": ["m"],\n "tasks": ["sst2"]\n "optimizers": {}}\n')
    with pytest.raises(SystemExit):
        grid.main(["run", str(path), "--out", str(tmp_path / "out")])
    assert f"{path}:3:" in capsys.readouterr().err


def fake_run(out, cell, dev, test, steps=100):
    """What train.py leaves behind, written by hand: config.json and result.json."""
    run_dir = os.path.join(out, cell.path)
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump(dict(lr=cell.lr, steps=steps, seed=cell.seed), f)
    with open(os.path.join(run_dir, "result.json"), "w") as f:
        json.dump(dict(dev_accuracy=dev, test_accuracy=test, peak_memory_gb=1.5,
                       step_time_s=0.25), f)


def test_selection_is_on_dev_never_on_test(tmp_path):
    """The best-test point is not the best-dev point; the table reports the best-dev one.
    A point missing a seed is no candidate, and its cell is marked †."""
    spec = spec_of(tasks=["sst2"], schemes=["ft"], optimizers={
        "zo_sgd": {"lr": [1e-3, 1e-2]}, "zo_adam": {"lr": [1e-3, 1e-2]}})
    out = str(tmp_path / "out")
    write_spec(os.path.join(tmp_path, "spec.json"), spec)
    cells = grid.expand(spec)
    os.makedirs(out)
    write_spec(os.path.join(out, "grid.json"), spec)
    # (row, lr): per seed (dev, test). zo_sgd lr 1e-3 has the best test, lr 1e-2 the best dev.
    numbers = {("zo_sgd", 1e-3): [(0.60, 0.95), (0.70, 0.90)],
               ("zo_sgd", 1e-2): [(0.80, 0.50), (0.70, 0.60)],
               ("zo_adam", 1e-3): [(0.60, 0.70), (0.60, 0.80)],
               ("zo_adam", 1e-2): [(0.99, 0.10), None]}                  # seed 1 unfinished
    for cell in cells:
        value = numbers[(cell.row, cell.lr)][cell.seed]
        if value:
            fake_run(out, cell, *value)
    assert grid.main(["report", "--out", out]) == 0
    with open(os.path.join(out, "cells.csv")) as f:
        rows = {r.split(",")[2]: r.split(",") for r in f.read().splitlines()[1:]}
    assert rows["zo_sgd"][4] == "lr0.01" and rows["zo_adam"][4] == "lr0.001"
    assert float(rows["zo_sgd"][8]) == pytest.approx(0.55)
    assert float(rows["zo_sgd"][9]) == pytest.approx(statistics.stdev([0.5, 0.6]))
    text = open(os.path.join(out, "report.md")).read()
    assert "| ZO-SGD | 55.0 ± 7.1 |" in text and "| ZO-Adam | 75.0 ± 7.1 † |" in text
    assert "| ZO-SGD | lr0.01 (dev 75.0 ± 7.1) |" in text
    assert "| ZO-SGD | 1.50 GB, 250 ms |" in text
    with open(os.path.join(out, "points.csv")) as f:
        assert len(f.read().splitlines()) == 1 + 4
    for name in ("m-a_sst2.png", "m-a_sst2_zo_sgd_ft.png", "m-a_sst2_zo_adam_ft.png"):
        assert os.path.getsize(os.path.join(out, "plots", name)) > 0


def test_layout_columns_name_what_varies():
    """Two models × two schemes: columns 'model · scheme', the task goes in the title."""
    keys = [(m, "sst2", r, s) for m in ("x/opt-1.3b", "roberta-large") for r in ("zo_sgd",)
            for s in ("ft", "lora")]
    rows, columns, labels, title = grid.layout(keys)
    assert rows == ["zo_sgd"] and title == "SST2"
    assert labels == ["opt-1.3b · FT", "opt-1.3b · LoRA", "roberta-large · FT",
                      "roberta-large · LoRA"]
    assert grid.pct(0.9083, 0.0041) == "90.8 ± 0.4" and grid.pct(0.5, None) == "50.0"


def test_run_states_and_restart_flags(tmp_path):
    """done / resume / dirty / new, and the restart flags, which train.py parses."""
    done, resume, dirty = (str(tmp_path / n) for n in ("done", "resume", "dirty"))
    os.makedirs(os.path.join(resume, "checkpoint-20"))
    os.makedirs(dirty)
    open(os.path.join(dirty, "log.jsonl"), "w").close()
    cell = grid.expand(spec_of())[0]
    fake_run(done, cell, 0.5, 0.5)
    assert [grid.state(os.path.join(done, cell.path)), grid.state(resume), grid.state(dirty),
            grid.state(str(tmp_path / "none"))] == ["done", "resume", "dirty", "new"]
    assert grid.restart_args("resume", resume) == ["--resume", resume]
    assert grid.restart_args("dirty", dirty) == ["--overwrite"]
    for kind, run_dir in (("resume", resume), ("dirty", dirty)):     # flags train.py parses
        assert grid.train.parse_args(grid.restart_args(kind, run_dir))[1] <= set(grid.FIELDS)


def test_finished_run_with_other_settings_is_reported_not_reused(tmp_path):
    cell = grid.expand(spec_of())[0]                       # the spec says --steps 100
    fake_run(str(tmp_path), cell, 0.5, 0.5, steps=50)
    assert grid.stale(cell, os.path.join(tmp_path, cell.path)) == \
        "finished with --steps 50, the spec says 100"
    assert grid.finished(cell, str(tmp_path)) is None          # and the tables leave it out


def test_slots_per_gpu_and_cpu():
    assert grid.slots("0,1", 2) == ["0", "0", "1", "1"]
    assert grid.slots("", 3) == [None, None, None]


def test_curves_prefer_logged_dev_accuracy(tmp_path):
    """dev_accuracy lines of log.jsonl when present, else train.py's printed dev lines."""
    run_dir = str(tmp_path / "seed0")
    os.makedirs(run_dir)
    lines = [dict(step=1, loss=0.7), dict(step=2, loss=0.6), dict(step=2, dev_accuracy=0.75)]
    with open(os.path.join(run_dir, "log.jsonl"), "w") as f:
        f.write("".join(json.dumps(x) + "\n" for x in lines))
    with open(run_dir + ".out", "w") as f:
        f.write("step 2 | dev accuracy 0.5000\nstep 4 | dev accuracy 0.6250\n")
    steps, losses, dev = grid.curves(run_dir)
    assert list(steps) == [1, 2] and list(losses) == [0.7, 0.6] and dev == [(2, 0.75)]
    with open(os.path.join(run_dir, "log.jsonl"), "w") as f:
        f.write("".join(json.dumps(x) + "\n" for x in lines[:2]))
    assert grid.curves(run_dir)[2] == [(2, 0.5), (4, 0.625)]


def grid_cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "grid.py"), *args],
                          capture_output=True, text=True, cwd=ROOT)


@needs_shared
@pytest.mark.slow
def test_tiny_grid_end_to_end(tmp_path):
    """2 optimizers × 2 lrs × 2 seeds through train.py, plus a row whose runs fail (Forward-Grad
    refuses fp16): the others finish, the failures are listed, exit 1. Then one run is lost
    (result.json gone) and the fixed spec reruns that run alone."""
    model = save_tiny("opt", str(tmp_path / "tiny-opt"))
    spec = {"models": [model], "tasks": ["sst2"], "schemes": ["ft"], "seeds": [0, 1],
            "flags": {"data_dir": DATA, "device": "cpu", "steps": 2, "eval_every": 1,
                      "batch_size": 2, "num_train": 8, "num_dev": 4, "num_eval": 4},
            "optimizers": {"zo_sgd": {"lr": [1e-3, 1e-2], "mu": [1e-2]},
                           "fo_sgd": {"lr": [1e-2, 1e-1]},
                           "forward_grad": {"lr": [1e-3], "flags": {"dtype": "fp16"}}}}
    out = str(tmp_path / "runs")
    first = grid_cli("run", write_spec(tmp_path / "spec.json", spec), "--out", out, "--jobs", "2")
    assert first.returncode == 1, first.stderr
    failed = [line for line in first.stderr.splitlines() if "forward_grad/ft/lr0.001/seed" in line]
    assert len(failed) == 2 and all("forward_grad needs --dtype fp32" in x for x in failed)
    cells = grid.expand(spec)
    finished = [c for c in cells if c.row != "forward_grad"]
    assert all(grid.state(os.path.join(out, c.path)) == "done" for c in finished)
    text = open(os.path.join(out, "report.md")).read()
    assert "| ZO-SGD |" in text and "| FO-SGD |" in text and "| Forward-Grad | – |" in text
    plots = sorted(os.listdir(os.path.join(out, "plots")))
    assert plots == ["tiny-opt_sst2.png", "tiny-opt_sst2_fo_sgd_ft.png",
                     "tiny-opt_sst2_zo_sgd_ft.png"]
    steps, losses, dev = grid.curves(os.path.join(out, finished[0].path))
    assert list(steps) == [1, 2] and len(losses) == 2 and [s for s, _ in dev] == [1, 2]

    lost = os.path.join(out, finished[3].path)
    os.remove(os.path.join(lost, "result.json"))    # killed after its checkpoint, before its result
    kept = {c.path: os.stat(os.path.join(out, c.path, "result.json")).st_mtime_ns
            for c in finished if c != finished[3]}
    del spec["optimizers"]["forward_grad"]
    second = grid_cli("run", write_spec(tmp_path / "spec.json", spec), "--out", out)
    assert second.returncode == 0, second.stderr
    assert "7 finished before, 1 to run" in second.stdout
    assert f"ok    {finished[3].path} (resume)" in second.stdout    # from its last checkpoint
    assert grid.state(lost) == "done"
    assert kept == {p: os.stat(os.path.join(out, p, "result.json")).st_mtime_ns for p in kept}
