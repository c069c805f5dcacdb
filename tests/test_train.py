"""train.py end to end: the output contract of DESIGN §7 and one-line errors on bad input.

Runs the CLI on a tiny random OPT saved with the real OPT tokenizer and the real SST-2 files from
../shared (skipped when absent).  python -m pytest tests/test_train.py -q
"""
import json
import os
import shutil
import subprocess
import sys

import pytest

import train
from tiny import DATA, needs_shared, save_tiny

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
    with open(out / "config.json") as f:
        assert json.load(f)["opt"] == opt


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


@pytest.mark.parametrize("task", ["sst2", "rte", "copa", "winogrande", "multirc"])
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


@pytest.mark.parametrize("peft_method", ["lora", "prefix", "prompt"])
@pytest.mark.parametrize("family", ["opt", "roberta", "llama", "mistral"])
def test_every_peft_scheme_trains_each_family(family_dirs, tmp_path, family, peft_method):
    """--peft lora|prefix|prompt runs through the CLI for each family and saves its adapter."""
    out = tmp_path / "out"
    result = train.cli(small_run(family_dirs[family], out, "--peft", peft_method, "--steps", "3",
                                 "--lr", "1e-3", "--save"))
    assert len(read_log(out)) == 3 and result["trainable_params"] > 0
    assert os.path.isfile(out / "adapter" / "zo_adapter.safetensors")
    exported = family != "roberta" or peft_method == "lora"        # what HF peft can express
    assert os.path.isfile(out / "adapter_peft" / "adapter_config.json") == exported


@pytest.mark.parametrize("opt,passes", [
    ("zo_sgd", 2), ("zo_sgd_sign", 2), ("zo_sgd_mmt", 2), ("zo_sgd_cons", 5), ("zo_adam", 2),
    ("forward_grad", 1), ("fo_sgd", 1), ("fo_adam", 1)])
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
    (["--num_train", "0"], "no training examples"), (["--device", "tpu9"], "--device"),
    (["--max_length", "1"], "--max_length"), (["--num_dev", "0"], "--num_dev > 0")])
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
