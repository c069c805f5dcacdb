"""Checkpoints and resume: a run killed with SIGKILL and resumed in a fresh process ends in the
very bits of a run never stopped (log lines, weights, result.json; time and memory readings
aside); SIGINT checkpoints and exits 130; a resume that would change the numbers is refused;
a diverging run stops and saves nothing non-finite.

The kill is a real signal, sent by the training process to itself when it asks for a given
batch (tasks.Batches.at), so it lands at the same point on every machine, after a checkpoint
and with log lines past it that the resume must drop.
    python -m pytest tests/test_checkpoint.py -q
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import checkpoint
import train
from test_train import opt_dir, small_run  # noqa: F401  (opt_dir: a fixture)
from tiny import needs_shared

pytestmark = needs_shared
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, EVERY, KILL_AT = 8, 2, 5       # checkpoints at 2, 4, 6, 8; killed asking for batch 5
READINGS = {"time_s", "step_time_s", "peak_memory_gb", "peak_memory"}   # not reproducible
KILLED = """
import os, signal, sys
import tasks, train
at = tasks.Batches.at
def stop_at(self, k):
    if k == {batch}:
        os.kill(os.getpid(), signal.{signal})
    return at(self, k)
tasks.Batches.at = stop_at
train.cli(sys.argv[1:])
"""
RUNS = {   # issue 13's four: full ZO-SGD, ZO-Adam with LoRA, sparse masks redrawn every 3, FO-Adam
    "zo_sgd": ["--opt", "zo_sgd", "--lr", "1e-3"],
    "zo_adam_lora": ["--opt", "zo_adam", "--peft", "lora", "--lr", "1e-2"],
    "sparse": ["--opt", "zo_sgd", "--sparsity", "0.5", "--mask_every", "3", "--lr", "1e-3"],
    "fo_adam": ["--opt", "fo_adam", "--lr", "1e-3"],
}


def args(model, out, *extra):
    """small_run's, shorter, checkpointed every EVERY steps, saving the selected weights."""
    return small_run(model, out, "--num_train", "24", "--num_dev", "8", "--num_eval", "8",
                     "--eval_every", "3", "--steps", str(STEPS), "--checkpoint_every",
                     str(EVERY), "--save", *extra)


def run(*argv, code=None):
    """train.py (or `code` with argv) in a fresh Python process."""
    cmd = [sys.executable, "-c", code, *argv] if code else [sys.executable, "train.py", *argv]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                          env=os.environ | {"PYTHONPATH": ROOT})


def interrupted(signal, batch, *argv):
    return run(*argv, code=KILLED.format(signal=signal, batch=batch))


def outputs(out) -> dict:
    """What a run leaves: log lines, result and config without readings, trained and saved
    weights."""
    def bare(d):
        return {k: v for k, v in d.items() if k not in READINGS}
    with open(out / "log.jsonl") as f:
        log = [bare(json.loads(line)) for line in f]
    with open(out / "result.json") as f:
        result = bare(json.load(f))
    saved = out / "model" / "model.safetensors"
    saved = saved if saved.exists() else out / "adapter" / "zo_adapter.safetensors"
    return dict(log=log, result=result, saved=load_file(saved),
                trained=load_file(out / f"checkpoint-{STEPS}" / checkpoint.WEIGHTS))


def assert_same(a, b):
    assert a["log"] == b["log"]
    assert a["result"] == b["result"]
    for key in ("trained", "saved"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)


@pytest.fixture(scope="module")
def straight(opt_dir, tmp_path_factory):
    """Each run of RUNS without interruption (in this process), lazily."""
    done = {}

    def get(name):
        if name not in done:
            out = tmp_path_factory.mktemp(name) / "out"
            train.cli(args(opt_dir, out, *RUNS[name]))
            done[name] = outputs(out)
        return done[name]
    return get


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_sigkill_then_resume_is_bitwise_a_straight_run(opt_dir, straight, tmp_path, name):
    """SIGKILL after step 5 (checkpoint 4), --resume in a fresh process: identical outputs."""
    out = tmp_path / "out"
    proc = interrupted("SIGKILL", KILL_AT, *args(opt_dir, out, *RUNS[name]))
    assert proc.returncode == -9, proc.stderr[-2000:]
    with open(out / "log.jsonl") as f:
        assert len(f.readlines()) == KILL_AT            # one line past the checkpoint at 4
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4"]
    proc = run("--resume", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_same(outputs(out), straight(name))


@pytest.mark.slow
def test_sigint_is_one_line_exit_130_and_a_usable_checkpoint(opt_dir, straight, tmp_path):
    """Ctrl-C while step 3 runs: that step finishes, is checkpointed, one line, exit 130; the
    checkpoint resumes to the straight run's bits."""
    out = tmp_path / "out"
    proc = interrupted("SIGINT", 2, *args(opt_dir, out, *RUNS["zo_sgd"]))
    assert proc.returncode == 130
    last = proc.stderr.replace("\r", "\n").strip().splitlines()[-1]
    assert last.startswith("interrupted by SIGINT after step 3; checkpoint in"), proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("interrupted") == 1
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3"]
    train.cli(["--resume", str(out)])
    assert_same(outputs(out), straight("zo_sgd"))


def expect_error(capsys, argv, code, *needles):
    capsys.readouterr()                           # what earlier runs printed
    with pytest.raises(SystemExit) as exit_info:
        train.cli(argv)
    err = capsys.readouterr().err
    last = err.replace("\r", "\n").strip().splitlines()[-1]      # after the progress bar
    assert exit_info.value.code == code and last.startswith("error: "), err
    assert err.count("error") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in last, err


@pytest.fixture(scope="module")
def finished(opt_dir, tmp_path_factory):
    """A short finished ZO-SGD run to resume."""
    out = tmp_path_factory.mktemp("finished") / "out"
    train.cli(args(opt_dir, out, "--steps", "4", "--lr", "1e-3"))
    return out


def test_resume_refuses_what_changes_the_numbers(finished, capsys):
    """--lr, a linear schedule's --steps, another machine or another CPU chunking of u: refused
    in one line naming it."""
    expect_error(capsys, ["--resume", str(finished), "--lr", "0.5"], 2, "--lr 0.5",
                 "(the run has 0.001)")
    expect_error(capsys, ["--resume", str(finished), "--opt", "zo_adam", "--q", "2"], 2,
                 "--opt zo_adam", "--q 2")
    path = checkpoint.latest(finished)
    state = checkpoint.read_state(path)
    for key, value in (("device_name", "Other CPU"), ("u_chunk", 4096)):
        moved = state | dict(fingerprint=state["fingerprint"] | {key: value})
        with open(os.path.join(path, checkpoint.STATE), "w") as f:
            json.dump(moved, f)
        try:
            expect_error(capsys, ["--resume", str(finished)], 2, key, str(value))
        finally:
            with open(os.path.join(path, checkpoint.STATE), "w") as f:
                json.dump(state, f)


def test_a_run_from_before_cpu_linear_resumes_on_torch_kernel(finished, capsys):
    """A config.json without --cpu_linear (written before the flag) ran torch's kernel: the
    resume keeps it, and refuses oneDNN as a change of the numbers."""
    path = finished / "config.json"
    saved = json.loads(path.read_text())
    path.write_text(json.dumps({k: v for k, v in saved.items() if k != "cpu_linear"}))
    try:
        assert train.resumed(*train.parse_args(["--resume", str(finished)]))[0].cpu_linear \
            == "torch"
        expect_error(capsys, ["--resume", str(finished), "--cpu_linear", "onednn"], 2,
                     "--cpu_linear onednn (the run has torch)")
    finally:
        path.write_text(json.dumps(saved))


def test_resume_extends_a_run_with_more_steps(opt_dir, finished, tmp_path):
    """--steps 6 continues the 4-step run: its first 4 log lines stay, 2 follow, and the
    weights equal a 6-step run's that evaluated at the same steps."""
    train.cli(["--resume", str(finished), "--steps", "6", "--eval_every", "2"])
    with open(finished / "log.jsonl") as f:
        log = [json.loads(line) for line in f]
    assert [line["step"] for line in log] == list(range(1, 7))
    straight = tmp_path / "out"
    train.cli(args(opt_dir, straight, "--steps", "6", "--lr", "1e-3", "--eval_every", "2"))
    a = load_file(finished / "checkpoint-6" / checkpoint.WEIGHTS)
    b = load_file(straight / "checkpoint-6" / checkpoint.WEIGHTS)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_linear_schedule_refuses_new_steps(opt_dir, tmp_path, capsys):
    out = tmp_path / "out"
    train.cli(args(opt_dir, out, "--steps", "2", "--lr_schedule", "linear"))
    expect_error(capsys, ["--resume", str(out), "--steps", "4"], 2, "--steps 4")


def test_fo_sgd_that_diverges_stops_and_saves_nothing_non_finite(opt_dir, tmp_path, capsys):
    """lr 1e30: the weights overflow; exit 1 with one line, result.json strict JSON saying why,
    no saved model, and every checkpoint left finite."""
    out = tmp_path / "out"
    expect_error(capsys, args(opt_dir, out, "--opt", "fo_sgd", "--lr", "1e30",
                              "--checkpoint_every", "1"), 1, "diverged at step")
    with open(out / "result.json") as f:
        result = json.load(f, parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))
    assert result["test_accuracy"] is None and "diverged" in result["error"]
    assert not (out / "model").exists()
    for path in out.glob("checkpoint-*"):
        assert all(torch.isfinite(t).all() for t in load_file(path / checkpoint.WEIGHTS).values())


def test_checkpoint_keeps_fp32_moments_of_half_weights(tmp_path):
    """torch's load_state_dict casts state to the weight dtype; ZO-Adam's fp32 moments of bf16
    weights come back fp32 and bitwise, with the seed stream's state."""
    import optimizers
    layer = torch.nn.Linear(3, 4, bias=False, dtype=torch.bfloat16)
    w, x = layer.weight, torch.randn(2, 3, dtype=torch.bfloat16)
    opt = optimizers.ZOAdam([w], lr=1e-3, seed=3)
    opt.step(lambda: layer(x).float().pow(2).sum())
    path = checkpoint.save(str(tmp_path), 1, dict(step=1), {"w": w}, None, [opt])
    fresh = optimizers.ZOAdam([torch.nn.Parameter(w.detach().clone())], lr=1e-3, seed=0)
    weights, best = checkpoint.load(path, [fresh], "cpu")
    assert best is None and torch.equal(weights["w"], w)
    a, b = opt.state[w], fresh.state[fresh.param_groups[0]["params"][0]]
    for k in ("exp_avg", "exp_avg_sq"):
        assert b[k].dtype == torch.float32 and torch.equal(a[k], b[k])
    assert opt.next_seed() == fresh.next_seed()


def test_save_is_atomic_and_keeps_only_the_newest(tmp_path):
    """A cut-short save (.tmp-*) is cleared; once a checkpoint is complete the older goes."""
    (tmp_path / ".tmp-checkpoint-half").mkdir()
    w = {"w": torch.ones(2)}
    for step in (1, 2):
        path = checkpoint.save(str(tmp_path), step, dict(step=step), w, None, [])
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2"]
    assert checkpoint.latest(str(tmp_path)) == path
