"""Data-parallel ZO (torchrun, gloo, 2 ranks) and a dispatched model (accelerate), on CPU.

One launch of `python -m torch.distributed.run --nproc_per_node 2` runs train.py five times in one
process group (tests/dp_worker.py): ZO-SGD on SST-2, ZO-SGD on COPA (the token-level LM loss),
ZO-Adam, ZO-SGD with LoRA, a run whose rank 1 has another --seed, and last a run whose rank 1's
loss turns NaN, which ends the launch. The oracle of each run is the same run in one process
(train.cli here). The global batch of 5 splits 3 + 2, so a mean of the ranks' means would be off.

Tolerance against one process: the losses differ only in summation order: one process sums the 5
per-example losses (or the gold tokens' NLLs) in fp32; the ranks sum 3 and 2 in fp32 and add the
two sums in float64; the kernels also see batches of 3 and 2 rows instead of 5, which may change
their accumulation order. Each fp32 sum of B terms is off by at most about B ulps, so we allow
|Δf| ≤ 8·B·2⁻²⁴·|f| (≈ 2.4e-6 relative; we see ≤ 7e-7) for f = f(θ ± μu), and for the projected
gradient c = (f+ − f−)/(2μ) the same error of f+ and f− divided by μ.

    python -m pytest tests/test_distributed.py -q
"""
import copy
import json
import os
import socket
import subprocess
import sys

import accelerate
import pytest
import torch

import distributed
import optimizers
import rge
import tasks
import train
from tiny import DATA, needs_shared, real_tokenizer, save_tiny, tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B = 5                                            # the global batch: 3 + 2 on two ranks
REL = 8 * B * 2.0**-24                           # the stated tolerance on f, relative
MU = 1e-3
LAUNCH_TIMEOUT_S = 300                           # a hang fails the test instead of blocking it

CASES = {  # name: task and extra train.py arguments
    "zo_sgd": ("sst2", []),
    "lm_loss": ("copa", []),
    "zo_adam": ("sst2", ["--opt", "zo_adam", "--lr", "1e-3"]),
    "lora": ("sst2", ["--peft", "lora", "--lr", "1e-2"]),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_args(model, task, out, *extra):
    data = os.path.join(DATA, task)
    return ["--model", model, "--task", task, "--data_dir", data, "--num_train", "20",
            "--num_dev", "8", "--num_eval", "8", "--batch_size", str(B), "--steps", "10",
            "--eval_every", "5", "--lr", "1e-3", "--mu", str(MU), "--device", "cpu",
            "--select", "last", "--output_dir", str(out), *extra]


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def opt_dir(tmp_path_factory):
    return save_tiny("opt", str(tmp_path_factory.mktemp("tiny-opt")))


@pytest.fixture(scope="module")
def launch(opt_dir, tmp_path_factory):
    """The torchrun launch: (completed process, its root folder)."""
    root = tmp_path_factory.mktemp("dp")
    runs = [{"args": run_args(opt_dir, task, root / name, *extra)}
            for name, (task, extra) in CASES.items()]
    runs.append({"args": run_args(opt_dir, "sst2", root / "seed", "--eval_every", "2"),
                 "fault": "seed"})
    runs.append({"args": run_args(opt_dir, "sst2", root / "nan"), "fault": "nan"})
    spec = root / "spec.json"
    spec.write_text(json.dumps(runs))
    env = os.environ | {"PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           os.path.join(ROOT, "tests", "dp_worker.py"), str(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=LAUNCH_TIMEOUT_S)
    return proc, root


def one_process(opt_dir, tmp_path, name):
    task, extra = CASES[name]
    train.cli(run_args(opt_dir, task, tmp_path / name, *extra))
    return read_log(tmp_path / name)


pytestmark = [needs_shared]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_ranks_agree_bitwise_and_match_one_process(launch, opt_dir, tmp_path, name):
    """10 steps on 3 + 2 examples per batch: both ranks' trainable tensors are bitwise equal;
    every step's loss and projected gradient equal one process's within the stated tolerance,
    and the sharded evaluations give its dev and test accuracies."""
    _, root = launch
    out = root / name
    ranks = [torch.load(out / f"rank{r}.pt") for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) > 0
    assert all(torch.equal(a, b) for a, b in zip(*ranks))
    with open(out / "config.json") as f, open(out / "result.json") as g:
        assert json.load(f)["world_size"] == 2 and json.load(g)["world_size"] == 2
    dp, single = read_log(out), one_process(opt_dir, tmp_path, name)
    assert len(dp) == len(single) == 10
    for a, b in zip(dp, single):
        f_bound = abs(b["loss"]) + MU * abs(b["projected_grad"])          # ≥ |f+|, |f−|
        assert abs(a["loss"] - b["loss"]) <= REL * f_bound, (a, b)
        assert abs(a["projected_grad"] - b["projected_grad"]) <= REL * f_bound / MU, (a, b)
        assert a.get("dev_accuracy") == b.get("dev_accuracy")    # sharded, then all-reduced
    with open(out / "result.json") as f, open(tmp_path / name / "result.json") as g:
        assert json.load(f)["test_metrics"] == json.load(g)["test_metrics"]


@pytest.mark.slow
def test_lm_loss_is_the_global_token_mean(opt_dir, tmp_path):
    """COPA's loss averages tokens: the ranks' shares hold different numbers of gold tokens, so
    the mean of the shares' means is far outside the tolerance, while the data-parallel loss
    (checked against one process above) is the global mean Σ sums / Σ counts."""
    cfg = train.check(train.parse_args(run_args(opt_dir, "copa", tmp_path / "out"))[0])
    run = train.setup(cfg)
    batch = run.batches.at(0)
    shares = [tasks.shard(batch, r, 2) for r in range(2)]
    assert [len(s["labels"]) for s in shares] == [3, 2] and shares[0]["count"] != shares[1]["count"]
    with torch.no_grad():
        terms = [tasks.loss_terms(run.model, s) for s in shares]
        f = float(tasks.loss(run.model, batch))
    exact = float(sum(t[0] for t in terms)) / sum(t[1] for t in terms)
    mean_of_means = sum(float(t[0]) / t[1] for t in terms) / 2
    assert abs(exact - f) <= REL * f
    assert abs(mean_of_means - f) > 100 * REL * f


@pytest.mark.slow
def test_nan_on_one_rank_stops_both_with_one_line(launch):
    """Rank 1's loss turns NaN: the all-reduced loss is NaN on both ranks, both stop at the same
    query with one line, the launch exits non-zero (within the timeout: no hang)."""
    proc, root = launch
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0
    assert len(errors) == 2 and "differ from rank 0" in errors[0], proc.stderr[-2000:]
    assert errors[1].startswith("error: diverged at step 3: rge:") and "nan" in errors[1]
    with open(root / "nan" / "result.json") as f:
        assert json.load(f)["error"].startswith("diverged: step 3")


@pytest.mark.slow
def test_a_different_seed_on_one_rank_is_caught(launch):
    """Rank 1 runs with --seed 1: its u differs, and the checksum at the first evaluation stops
    both ranks (exit status 1) with one line naming the rank."""
    proc, root = launch
    for r in range(2):
        assert (root / "seed" / f"rank{r}.exit").read_text() == "1"
    errors = [line for line in proc.stderr.splitlines() if "differ from rank 0" in line]
    assert len(errors) == 1 and errors[0].startswith("error: step 2: the weights of rank(s) 1")
    assert not (root / "seed" / "result.json").exists()


@pytest.mark.parametrize("flags, needle", [
    (["--opt", "fo_sgd"], "fo_sgd needs a gradient all-reduce"),
    (["--opt", "forward_grad"], "forward_grad"),
    (["--zo_layers", "1"], "with --zo_layers"),
    (["--device_map", "auto"], "one or the other"),
    (["--device", "cuda:1"], "cuda:LOCAL_RANK")])
def test_what_torchrun_refuses(opt_dir, tmp_path, monkeypatch, flags, needle):
    """Under torchrun (WORLD_SIZE set), back-prop, JVPs, a device map and a fixed GPU are
    one-line refusals of train.check (which train.cli reports with exit status 2)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)   # let --device cuda:1 pass
    cfg = train.parse_args(run_args(opt_dir, "sst2", tmp_path / "out", *flags))[0]
    with pytest.raises(train.UserError) as info:
        train.check(cfg)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_device_map_must_be_auto(opt_dir, tmp_path):
    cfg = train.parse_args(run_args(opt_dir, "sst2", tmp_path / "out", "--device_map", "gpu"))[0]
    with pytest.raises(train.UserError, match="choose from: auto"):
        train.check(cfg)


def test_paired_closure_matches_two_forwards():
    """The closure's paired path (tasks.loss_terms(pair=True): the batch and its copy in one
    forward) gives rge the estimate of two sequential forwards, within the stated tolerance, for
    the classification loss and the token-level LM loss."""
    model = tiny_model("opt")
    params = list(model.parameters())
    cls = sst2_batch()
    examples = [tasks.Example("The man fell", [" because he slipped", " so he ran"], 0),
                tasks.Example("It rained all day", [" so the game was off", " because"], 0)]
    lm = tasks.batches(real_tokenizer("opt"), "copa", examples, batch_size=2).at(0)
    for batch in (cls, lm):
        loss = distributed.closure(model, batch, distributed.World())
        with torch.no_grad():
            f, pair = float(loss()), loss(pair=True).tolist()
        assert all(abs(g - f) <= REL * f for g in pair)
        one, two = (rge.estimate(loss, params, seeds=[3], mu=MU, pair=p) for p in (True, False))
        assert abs(one.loss - two.loss) <= REL * two.loss
        bound = REL * (two.loss + MU * abs(two.projected_grads[0])) / MU
        assert abs(one.projected_grads[0] - two.projected_grads[0]) <= bound


# ---- one model through accelerate's dispatch ----------------------------------------------------

def sst2_batch():
    examples = [tasks.Example("a fine, warm film. It was", [" terrible", " great"], 1),
                tasks.Example("dull, and far too long. It was", [" terrible", " great"], 0),
                tasks.Example("I would see it again. It was", [" terrible", " great"], 1)]
    return tasks.batches(real_tokenizer("opt"), "sst2", examples, batch_size=3).at(0)


def dispatched(model):
    """The model under accelerate's hooks with a CPU map of one entry per block, as a GPU map
    would place them (force_hooks: a one-device map is otherwise only moved, not hooked)."""
    blocks = ["model.decoder.embed_tokens", "model.decoder.embed_positions",
              "model.decoder.final_layer_norm", "lm_head",
              *(f"model.decoder.layers.{i}" for i in range(len(model.model.decoder.layers)))]
    return accelerate.dispatch_model(model, device_map={b: "cpu" for b in blocks},
                                     force_hooks=True)


def zo_steps(model, batch, lr, steps=3):
    params = list(model.parameters())
    opt = optimizers.ZOSGD(params, lr=lr, mu=MU, seed=0)
    for _ in range(steps):
        opt.step(lambda: tasks.loss(model, batch))
    return [p.detach().clone() for p in params]


def test_perturbation_reaches_every_tensor_under_accelerate_hooks():
    """With accelerate's hooks on every block, every trainable tensor is reached, the estimate is
    bitwise the plain model's, lr = 0 leaves the weights bitwise unchanged, and lr > 0 moves them
    exactly as on the plain model."""
    batch, plain = sst2_batch(), tiny_model("opt")
    hooked = dispatched(copy.deepcopy(plain))
    assert all(hasattr(layer, "_hf_hook") for layer in hooked.model.decoder.layers)
    train.check_model(hooked, "cpu")                          # hooks, but no offload: accepted
    params = list(hooked.parameters())
    with torch.no_grad(), rge.perturbed(params, 7, MU) as reached:
        tasks.loss(hooked, batch)
    assert set(reached) == set(range(len(params)))
    estimates = [rge.estimate(lambda m=m: tasks.loss(m, batch), list(m.parameters()), seeds=[7],
                              mu=MU) for m in (plain, hooked)]
    assert estimates[0] == estimates[1] and estimates[0].projected_grads[0] != 0
    before = [p.detach().clone() for p in params]
    assert all(torch.equal(a, b) for a, b in zip(before, zo_steps(hooked, batch, lr=0.0)))
    moved, expected = zo_steps(hooked, batch, lr=1e-2), zo_steps(plain, batch, lr=1e-2)
    assert all(torch.equal(a, b) for a, b in zip(moved, expected))
    assert not all(torch.equal(a, b) for a, b in zip(moved, before))


def test_offload_is_refused_in_one_line():
    """accelerate's CPU offload (the trainable tensors are meta placeholders, the weights loaded
    into each module at its forward) is refused in one line."""
    offloaded = accelerate.cpu_offload(tiny_model("opt"), execution_device="cpu")
    assert {p.device.type for p in offloaded.parameters()} == {"meta"}
    with pytest.raises(train.UserError) as info:
        train.check_model(offloaded, "cpu")
    assert "offloaded" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.slow
def test_device_map_auto_through_the_cli(opt_dir, tmp_path):
    """--device_map auto (all on the CPU here) trains exactly as the plain run."""
    train.cli(run_args(opt_dir, "sst2", tmp_path / "plain"))
    train.cli(run_args(opt_dir, "sst2", tmp_path / "map", "--device_map", "auto"))
    logs = [[line | {"time_s": 0} for line in read_log(tmp_path / out)] for out in ("plain", "map")]
    assert logs[0] == logs[1]
