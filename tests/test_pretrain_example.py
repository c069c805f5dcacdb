"""examples/pretrain_tiny_opt.py in its tiny mode: it learns, saves a model the project can load,
is deterministic, and reads no validation file.

    python -m pytest tests/test_pretrain_example.py -q
"""
import importlib.util
import math
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tiny import DATA, TOKENIZERS, needs_shared, real_tokenizer

pytestmark = needs_shared
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_FILES = {"sst2": "train.tsv", "rte": "train.jsonl", "copa": "train.jsonl",
               "multirc": "train.jsonl", "winogrande": "train_m.jsonl"}


def load_example():
    path = os.path.join(ROOT, "examples", "pretrain_tiny_opt.py")
    spec = importlib.util.spec_from_file_location("pretrain_tiny_opt", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def train_only(tmp_path_factory):
    """A data directory holding the train files only: a read of a dev file would fail."""
    root = tmp_path_factory.mktemp("train-only")
    for task, name in TRAIN_FILES.items():
        os.makedirs(root / task)
        os.symlink(os.path.join(os.path.abspath(DATA), task, name), root / task / name)
    return str(root)


def tiny_args(example, data_dir, out):
    return example.parse_args(["--out", str(out), "--data_dir", data_dir, "--tokenizer",
                               os.path.join(TOKENIZERS, "roberta-opt"), "--steps", "6",
                               "--layers", "1", "--hidden", "32", "--seq_len", "32",
                               "--batch_size", "4", "--print_every", "100"])


def lm_loss(model, rows):
    with torch.no_grad():
        return model(input_ids=rows, labels=rows).loss.item()


@pytest.mark.slow
def test_tiny_pretraining_learns_and_saves_a_loadable_model(train_only, tmp_path):
    example = load_example()
    args = tiny_args(example, train_only, tmp_path / "a")
    summary = example.pretrain(args)
    # a fresh model is nearly uniform over the vocabulary: its first loss is ≈ ln |V|
    assert summary["first_loss"] == pytest.approx(math.log(50272), abs=0.05)
    assert summary["last_loss"] < summary["first_loss"] - 0.1

    model = AutoModelForCausalLM.from_pretrained(args.out).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.out)
    text = "the film is a charming and often affecting journey . It was great"
    assert tokenizer(text).input_ids == real_tokenizer("opt")(text).input_ids
    assert tokenizer.pad_token_id == 1 and tokenizer.bos_token_id == 2
    # the saved weights are the trained ones: lower loss on the training rows than at init
    rows = example.token_rows(tokenizer, example.corpus(train_only), 6 * 4, 32, args.seed)
    assert lm_loss(model, rows) < lm_loss(example.build_model(args).eval(), rows) - 0.1

    again = example.pretrain(tiny_args(example, train_only, tmp_path / "b"))
    assert again["last_loss"] == summary["last_loss"]
    twin = AutoModelForCausalLM.from_pretrained(str(tmp_path / "b"))
    for (name, p), q in zip(model.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(p, q), name
