"""train.py end to end: the output contract of DESIGN §7 and one-line errors on bad input.

Runs the CLI on a tiny random OPT saved with the real OPT tokenizer and the real SST-2 files from
../shared (skipped when absent).  python -m pytest tests/test_train.py -q
"""
import json
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import tasks
import train
from tiny import DATA, needs_shared, save_tiny, fast_first

pytestmark = needs_shared
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOG_KEYS = {"step", "loss", "lr", "projected_grad", "time_s", "forward_passes"}
RESULT_KEYS = {"dev_accuracy", "test_accuracy", "peak_memory_gb", "step_time_s",
               "forward_passes", "trainable_params", "steps", "num_train", "num_dev", "num_test"}


@pytest.fixture(scope="module")
def opt_dir(tmp_path_factory):
    return save_tiny("opt", str(tmp_path_factory.mktemp("tiny-opt")))


def small_run(model, out, *extra):
    """CLI arguments of a short SST-2 run on the real files."""
    return ["--model", model, "--task", "sst2", "--data_dir", os.path.join(DATA, "sst2"),
            "--num_train", "64", "--num_dev", "16", "--num_eval", "16", "--batch_size", "4",
            "--eval_every", "25", "--device", "cpu", "--output_dir", str(out), *extra]


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("opt,passes", [("zo_sgd", 2), ("fo_sgd", 1)])
def test_cli_writes_the_three_files(opt_dir, tmp_path, opt, passes):
    """50 steps write config.json, a 50-line log.jsonl and every result.json key."""
    out = tmp_path / "out"
    train.cli(small_run(opt_dir, out, "--opt", opt, "--steps", "50", "--lr", "1e-4"))
    log = read_log(out)
    assert len(log) == 50 and all(LOG_KEYS <= set(line) for line in log)
    assert [line["step"] for line in log] == list(range(1, 51))
    assert all(line["forward_passes"] == passes for line in log)
    with open(out / "result.json") as f:
        result = json.load(f)
    assert RESULT_KEYS <= set(result)
    assert result["steps"] == 50 and result["forward_passes"] == 50 * passes
    assert (result["num_train"], result["num_dev"], result["num_test"]) == (64, 16, 16)
    assert 0.0 <= result["test_accuracy"] <= 1.0 and result["peak_memory_gb"] > 0
    assert result["peak_memory"]["cpu"]["resident"] == result["peak_memory_gb"]
    assert [line["step"] for line in log if "dev_accuracy" in line] == [25, 50]
    assert log[-1]["dev_accuracy"] == result["dev_accuracy"] or result["selected_step"] == 25
    with open(out / "config.json") as f:
        config = json.load(f)
    assert config["opt"] == opt and config["dtype"] == "fp32"           # --dtype auto on CPU
    assert config["hardware"] == result["hardware"]
    assert result["hardware"]["world_size"] == 1 and result["hardware"]["device_type"] == "cpu"


def test_save_writes_a_loadable_model(opt_dir, tmp_path):
    """--save stores the tuned full model, and it loads back with from_pretrained."""
    from transformers import AutoModelForCausalLM
    out = tmp_path / "out"
    train.cli(small_run(opt_dir, out, "--steps", "2", "--save", "--lr", "1e-2"))
    AutoModelForCausalLM.from_pretrained(out / "model")


def run_cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args],
                          capture_output=True, text=True, cwd=ROOT)


def test_unknown_opt_is_one_line_without_traceback(opt_dir, tmp_path):
    """An unknown --opt prints the valid choices on one line and exits 2, writing nothing."""
    proc = run_cli(*small_run(opt_dir, tmp_path / "out", "--opt", "zo_magic"))
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "zo_magic" in proc.stderr and "zo_sgd" in proc.stderr and "fo_sgd" in proc.stderr
    assert not (tmp_path / "out").exists()


def expect_error(capsys, args, *needles):
    capsys.readouterr()                               # what earlier runs printed
    with pytest.raises(SystemExit) as exit_info:
        train.cli(args)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err.startswith("error: ") and "\n" not in err, err
    for needle in needles:
        assert needle in err, err


def test_unknown_task_lists_the_tasks(opt_dir, tmp_path, capsys):
    """An unknown --task names the valid tasks."""
    args = small_run(opt_dir, tmp_path / "out")
    args[args.index("sst2")] = "imdb"
    expect_error(capsys, args, "imdb", "sst2")
    assert not (tmp_path / "out").exists()


def test_data_dir_without_the_files(opt_dir, tmp_path, capsys):
    """A --data_dir missing train.tsv/dev.tsv says which file is missing."""
    empty = tmp_path / "empty"
    empty.mkdir()
    args = small_run(opt_dir, tmp_path / "out")
    args[args.index("--data_dir") + 1] = str(empty)
    expect_error(capsys, args, str(empty), "train.tsv")
    assert not (tmp_path / "out").exists()


def test_malformed_tsv_line_names_file_and_line(opt_dir, tmp_path, capsys):
    """A TSV line without its label column fails with path:line."""
    bad = tmp_path / "bad"
    shutil.copytree(os.path.join(DATA, "sst2"), bad)
    with open(bad / "train.tsv") as f:
        lines = f.readlines()
    lines[3] = "a sentence with no label column\n"
    with open(bad / "train.tsv", "w") as f:
        f.writelines(lines)
    args = small_run(opt_dir, tmp_path / "out")
    args[args.index("--data_dir") + 1] = str(bad)
    expect_error(capsys, args, f"{bad / 'train.tsv'}:4")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("task", fast_first(["sst2", "copa", "rte", "winogrande", "multirc"], 2))
def test_every_task_trains_through_the_cli(opt_dir, tmp_path, task):
    """30 ZO-SGD steps on each task with the real files; the logged loss is finite."""
    out = tmp_path / "out"
    args = small_run(opt_dir, out, "--steps", "30", "--lr", "1e-3", "--max_length", "256")
    args[args.index("sst2")] = task
    args[args.index("--data_dir") + 1] = DATA
    result = train.cli(args)
    log = read_log(out)
    assert len(log) == 30 and all(line["loss"] == line["loss"] for line in log)   # no NaN
    assert result["num_train"] > 0 and 0.0 <= result["test_accuracy"] <= 1.0
    if task == "multirc":
        assert {"f1a", "em"} <= set(result["test_metrics"])


@pytest.fixture(scope="module")
def roberta_dir(tmp_path_factory):
    return save_tiny("roberta", str(tmp_path_factory.mktemp("tiny-roberta")))


def test_masked_lm_trains_on_sst2(roberta_dir, tmp_path):
    """RoBERTa is loaded as a masked LM and scored at the mask token."""
    out = tmp_path / "out"
    result = train.cli(small_run(roberta_dir, out, "--steps", "5", "--lr", "1e-3"))
    assert len(read_log(out)) == 5 and 0.0 <= result["test_accuracy"] <= 1.0


def test_masked_lm_on_copa_is_one_clear_line(roberta_dir, tmp_path, capsys):
    """A masked LM on a task it cannot score says which tasks it supports."""
    args = small_run(roberta_dir, tmp_path / "out")
    args[args.index("sst2")] = "copa"
    args[args.index("--data_dir") + 1] = DATA
    expect_error(capsys, args, "copa", "sst2, rte")


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {f: save_tiny(f, str(root / f)) for f in ("opt", "roberta", "llama", "mistral")}


@pytest.mark.parametrize("peft_method", fast_first(["lora", "prefix", "prompt"]))
@pytest.mark.parametrize("family", fast_first(["opt", "roberta", "llama", "mistral"]))
def test_every_peft_scheme_trains_each_family(family_dirs, tmp_path, family, peft_method):
    """--peft lora|prefix|prompt runs through the CLI for each family and saves its adapter."""
    out = tmp_path / "out"
    result = train.cli(small_run(family_dirs[family], out, "--peft", peft_method, "--steps", "3",
                                 "--lr", "1e-3", "--save"))
    assert len(read_log(out)) == 3 and result["trainable_params"] > 0
    assert os.path.isfile(out / "adapter" / "zo_adapter.safetensors")
    exported = family != "roberta" or peft_method == "lora"        # what HF peft can express
    assert os.path.isfile(out / "adapter_peft" / "adapter_config.json") == exported


@pytest.mark.parametrize("opt,passes", fast_first([
    ("zo_sgd", 2), ("fo_sgd", 1), ("zo_sgd_sign", 2), ("zo_sgd_mmt", 2), ("zo_sgd_cons", 5),
    ("zo_adam", 2), ("forward_grad", 1), ("fo_adam", 1)], keep=2))
def test_every_optimizer_runs_through_the_cli(opt_dir, tmp_path, opt, passes):
    """Each --opt trains 3 steps; log.jsonl records its forward passes per step (q = 1)."""
    out = tmp_path / "out"
    result = train.cli(small_run(opt_dir, out, "--opt", opt, "--steps", "3", "--lr", "1e-4"))
    assert [line["forward_passes"] for line in read_log(out)] == [passes] * 3
    assert result["forward_passes"] == 3 * passes


@pytest.mark.parametrize("flags, needle", [
    (["--amp"], "--amp"), (["--opt", "forward_grad", "--dtype", "fp16"], "forward_grad"),
    (["--opt", "zo_sgd_cons", "--weight_decay", "0.1"], "weight decay"),
    (["--opt", "fo_sgd", "--block"], "options of the ZO optimizers"),
    (["--zo_layers", "9"], "--zo_layers must be in 0..2"), (["--steps", "0"], "--steps"),
    (["--sparsity", "1.5"], "[0, 1)"), (["--dtype", "fp8"], "fp32"), (["--mu", "0"], "--mu"),
    (["--num_train", "0"], "--num_train"), (["--device", "tpu9"], "--device"),
    (["--max_length", "1"], "--max_length"), (["--num_dev", "0"], "--num_dev"),
    (["--peft", "lora", "--lora_r", "0"], "--lora_r"), (["--peft", "lora", "--lora_r", "-2"],
                                                         "--lora_r"),
    (["--peft", "prompt", "--num_virtual_tokens", "0"], "--num_virtual_tokens"),
    (["--peft", "prefix", "--num_prefix", "0"], "--num_prefix"), (["--lr", "nan"], "--lr"),
    (["--mu", "nan"], "--mu"), (["--num_dev", "0", "--select", "last"], "--num_dev"),
    (["--num_eval", "0"], "--num_eval"), (["--checkpoint_every", "0"], "--checkpoint_every"),
    (["--model", "./models/opt-tinyy"], "no such directory"),
    (["--opt", "fo_sgd", "--amp", "--dtype", "bf16"], "--amp"),
    (["--resume", "nowhere"], "--resume nowhere")])
def test_bad_flag_combinations_are_one_line(opt_dir, tmp_path, capsys, flags, needle):
    """Options that cannot work together stop before anything is written."""
    expect_error(capsys, small_run(opt_dir, tmp_path / "out", *flags), needle)
    assert not (tmp_path / "out").exists()


def test_model_without_tokenizer_or_unwritable_output(opt_dir, tmp_path, capsys):
    """Weights without tokenizer files, or an output path under a file: one line, exit 2."""
    bare = tmp_path / "bare"
    shutil.copytree(opt_dir, bare, ignore=shutil.ignore_patterns("tokenizer*", "*.txt", "*.json"))
    shutil.copy(os.path.join(opt_dir, "config.json"), bare)
    expect_error(capsys, small_run(str(bare), tmp_path / "out"), str(bare))
    assert not (tmp_path / "out").exists()
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    expect_error(capsys, small_run(opt_dir, blocker / "out"), "file")


def keyword_data(path, num_train=300, num_dev=64, seed=0):
    """SST-2-format files whose label is a keyword: "good film 12" is 1, "awful show 7" is 0."""
    rng, nouns = random.Random(seed), "movie film show story plot cast scene song book play"
    os.makedirs(path, exist_ok=True)
    for name, n in (("train.tsv", num_train), ("dev.tsv", num_dev)):
        rows = ["sentence\tlabel"]
        for _ in range(n):
            label = rng.randrange(2)
            word = rng.choice(("good", "great", "fine") if label else ("bad", "awful", "poor"))
            rows.append(f"{word} {rng.choice(nouns.split())} {rng.randrange(100)}\t{label}")
        with open(os.path.join(path, name), "w") as f:
            f.write("\n".join(rows) + "\n")
    return str(path)


def keyword_run(model, data, out, *extra):
    return ["--model", model, "--task", "sst2", "--data_dir", data, "--num_train", "64",
            "--num_dev", "32", "--num_eval", "32", "--batch_size", "8", "--device", "cpu",
            "--output_dir", str(out), *extra]


@pytest.mark.parametrize("content, needle", [
    (b"", "dev.tsv"), (b"sentence\tlabel\n", "dev.tsv"),
    (b"sentence\tlabel\nfine\t1\ncaf\xe9 bad\t0\n", "dev.tsv:3")])
def test_bad_data_files_are_one_line(opt_dir, tmp_path, capsys, content, needle):
    """An empty or header-only dev.tsv, a byte that is not UTF-8 (file:line): exit 2."""
    data = keyword_data(tmp_path / "data")
    with open(os.path.join(data, "dev.tsv"), "wb") as f:
        f.write(content)
    expect_error(capsys, keyword_run(opt_dir, data, tmp_path / "out"), needle)
    assert not (tmp_path / "out").exists()


def test_output_dir_is_refused_when_taken_or_read_only(opt_dir, tmp_path, capsys, monkeypatch):
    """A non-empty --output_dir needs --resume or --overwrite, and --overwrite clears only a
    run's directory; a read-only one is one line (as root, which writes anywhere, simulated)."""
    data, out = keyword_data(tmp_path / "data"), tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    expect_error(capsys, keyword_run(opt_dir, data, out), "not empty", "--overwrite")
    expect_error(capsys, keyword_run(opt_dir, data, out, "--overwrite"), "no config.json")
    (out / "config.json").write_text("{}")
    train.cli(keyword_run(opt_dir, data, out, "--overwrite", "--steps", "1"))
    assert not (out / "notes.txt").exists() and (out / "result.json").exists()
    assert train.cli(["--resume", str(out)])["steps"] == 1       # --overwrite is not carried
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    if os.geteuid() == 0:
        def refuse(*args, **kw):
            raise PermissionError(13, "Permission denied")
        monkeypatch.setattr(train.tempfile, "TemporaryFile", refuse)
    expect_error(capsys, keyword_run(opt_dir, data, locked), "not writable")
    assert os.listdir(locked) == []


def test_num_train_beyond_the_split_says_how_many(opt_dir, tmp_path, capsys, caplog):
    """--num_train above what the split holds after dev: a note says how many were used."""
    data = keyword_data(tmp_path / "data", num_train=50)
    result = train.cli(keyword_run(opt_dir, data, tmp_path / "out", "--num_train", "1000",
                                   "--steps", "1"))
    assert "using 18" in capsys.readouterr().err + caplog.text and result["num_train"] == 18


@pytest.mark.slow
def test_unreachable_hub_fails_fast_offline(tmp_path):
    """HF_HUB_OFFLINE=1 and a hub id not in the cache: one line saying to use a directory."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--model",
                           "facebook/opt-nonexistent", "--output_dir", str(tmp_path / "out")],
                          capture_output=True, text=True, cwd=ROOT,
                          env=os.environ | {"HF_HUB_OFFLINE": "1"}, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "local directory" in proc.stderr and not (tmp_path / "out").exists()


def test_dtype_auto_and_refused_models(opt_dir, monkeypatch):
    """auto: bf16 on CUDA where supported, else fp16, fp32 on CPU (CUDA mocked); a compiled or
    offloaded model is refused; from_pretrained onto one device adds no offload hook."""
    cfg = train.Config()
    assert train.pick_dtype(cfg, "cpu") == "fp32"
    for supported, dtype in ((True, "bf16"), (False, "fp16")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: supported)
        assert train.pick_dtype(cfg, "cuda:0") == dtype
    model, _ = train.load_model(train.Config(model=opt_dir, device="cpu", dtype="fp32"), False)
    assert not any(hasattr(m, "_hf_hook") for m in model.modules())
    with pytest.raises(train.UserError, match="torch.compile"):
        train.check_model(torch.compile(model), "cpu")
    model.hf_device_map = {"model.decoder.layers.0": 0, "lm_head": "cpu"}
    with pytest.raises(train.UserError, match="offloaded"):
        train.check_model(model, "cuda:0")
    train.check_model(model, "cpu")                      # all on the host: nothing moves
    model.hf_device_map = {"": "disk"}
    with pytest.raises(train.UserError, match="offloaded"):
        train.check_model(model, "cpu")
    del model.hf_device_map
    model.model.decoder.layers[0]._hf_hook = type("Hook", (), {"offload": True})()
    with pytest.raises(train.UserError, match="offloaded"):
        train.check_model(model, "cpu")


def test_linear_schedule_decays_to_zero(opt_dir, tmp_path):
    """The logged lr of step t is η(1 − (t−1)/T), falling to η/T at the last step; 0 after."""
    data, steps, lr = keyword_data(tmp_path / "data"), 5, 0.01
    train.cli(keyword_run(opt_dir, data, tmp_path / "out", "--steps", str(steps), "--lr",
                          str(lr), "--lr_schedule", "linear", "--opt", "fo_sgd"))
    logged = [line["lr"] for line in read_log(tmp_path / "out")]
    assert logged == pytest.approx([lr * (steps - t) / steps for t in range(steps)], rel=1e-12)
    assert all(a > b for a, b in zip(logged, logged[1:]))
    cfg = train.Config(lr=lr, steps=steps, lr_schedule="linear")
    assert train.lr_at(cfg, steps) == pytest.approx(0.0, abs=1e-18)


@pytest.mark.parametrize("on_device", [True, False])
def test_best_dev_weights_are_restored(opt_dir, tmp_path, monkeypatch, on_device):
    """Dev accuracies 0.5, 0.9, 0.7 at steps 2, 4, 6: the tested and saved weights are step 4's,
    i.e. those of a 4-step run (the oracle), not step 6's; kept on the device or, when they do
    not fit, in best.safetensors."""
    data, accuracies, tested = keyword_data(tmp_path / "data"), [], []
    evaluate = tasks.evaluate

    def scripted(model, dataset, **kw):
        if len(dataset) == 32 and accuracies:                         # dev: the script
            return {"accuracy": accuracies.pop(0)}
        tested.append([p.detach().clone() for p in model.parameters()])
        return evaluate(model, dataset, **kw)

    monkeypatch.setattr(tasks, "evaluate", scripted)
    monkeypatch.setattr(train, "fits_on_device", lambda device, nbytes: on_device)
    runs = {}
    for steps in (6, 4):
        accuracies[:] = [0.5, 0.9, 0.7][:steps // 2]
        out = tmp_path / f"out{steps}"
        select = "best" if steps == 6 else "last"
        runs[steps] = train.cli(keyword_run(opt_dir, data, out, "--steps", str(steps),
                                            "--eval_every", "2", "--lr", "1e-2", "--save",
                                            "--select", select))
    assert runs[6]["selected_step"] == 4 and runs[6]["dev_accuracy"] == 0.9
    assert (tmp_path / "out6" / "best.safetensors").exists() == (not on_device)
    best, oracle = (load_file(tmp_path / f"out{s}" / "model" / "model.safetensors")
                    for s in (6, 4))
    assert all(torch.equal(best[k], oracle[k]) for k in oracle)
    last = load_file(tmp_path / "out6" / "checkpoint-6" / "weights.safetensors")
    assert not all(torch.equal(last[k], oracle[k]) for k in last if k in oracle)
    assert all(torch.equal(a, b) for a, b in zip(tested[0], tested[1]))  # tested = saved


@pytest.mark.slow
def test_a_tiny_model_learns_the_keyword_task(opt_dir, tmp_path):
    """End to end: FO-Adam on the keyword task; the loss falls from chance (ln 2 ≈ 0.69) and
    dev and test accuracy reach 0.9 within 30 steps."""
    data, out = keyword_data(tmp_path / "data"), tmp_path / "out"
    result = train.cli(keyword_run(opt_dir, data, out, "--steps", "30", "--eval_every", "10",
                                   "--opt", "fo_adam", "--lr", "3e-2"))
    losses = [line["loss"] for line in read_log(out)]
    assert sum(losses[-5:]) / 5 < 0.2 < 0.6 < sum(losses[:5]) / 5
    assert result["dev_accuracy"] >= 0.9 and result["test_accuracy"] >= 0.9
