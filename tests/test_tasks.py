"""tasks.py: exact templates, sampling on the real files, bad input, the hub path (offline), and
loss / evaluation against a slow full-logits oracle on tiny models.

Run: python -m pytest tests/test_tasks.py -q
"""
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

import tasks
from tasks import MASK, DataError
from tiny import DATA, needs_shared, real_tokenizer, tiny_model

needs_data = pytest.mark.skipif(not os.path.isdir(DATA), reason="../shared/data is absent")


def text(ex, c):
    """The full scored text of candidate c: prompt + candidate, or the candidate at the mask."""
    return ex.prompt.replace(MASK, c) if MASK in ex.prompt else ex.prompt + c


def render(name, row, align, mlm=False):
    task = tasks.get(name)
    return [task.template(r, align, mlm) for r in task.parse(row)]


# ---- 1. exact templates on hand-written rows (in the data files' format)

def test_sst2_template():
    """SST2: Tab. 1 `<sentence> It was terrible|great`; no_align = sentence + verbalizer."""
    row = {"sentence": "a gorgeous , witty , seductive movie . ", "label": "1"}
    (ex,) = render("sst2", row, align=True)
    assert [text(ex, c) for c in ex.candidates] == [
        "a gorgeous , witty , seductive movie . It was terrible",
        "a gorgeous , witty , seductive movie . It was great"]
    assert ex.label == 1
    (ex,) = render("sst2", row, align=False)
    assert text(ex, ex.candidates[1]) == "a gorgeous , witty , seductive movie . great"
    (ex,) = render("sst2", row, align=True, mlm=True)
    assert ex.prompt == "a gorgeous , witty , seductive movie . It was<mask>."
    assert text(ex, ex.candidates[0]) == "a gorgeous , witty , seductive movie . It was terrible."


# ---- 2. real files: sizes, disjoint splits, label balance

SIZES = {"sst2": (1000, 500, 872), "rte": (1000, 500, 277), "copa": (300, 100, 100),
         "winogrande": (1000, 100, 1000), "multirc": (1000, 500, 1000)}


def key(ex):
    return ex.prompt, tuple(ex.candidates)


@needs_data
@pytest.mark.parametrize("name", list(tasks.TASKS))
def test_real_data_sampling(name):
    """Default sizes as in the anchors; no example in two splits; labels balanced like the source."""
    train, dev, test = tasks.load(name, DATA)
    assert (len(train), len(dev), len(test)) == SIZES[name]
    assert not {key(e) for e in train} & {key(e) for e in dev}
    assert not {key(e) for e in train + dev} & {key(e) for e in test}
    source_train, source_valid = tasks._read_files(tasks.get(name), DATA)
    for sample, source in ((train, source_train), (test, source_valid)):
        p = sum(r["label"] == 1 for r in source) / len(source)
        q = sum(e.label == 1 for e in sample) / len(sample)
        assert abs(p - q) <= 4 * (p * (1 - p) / len(sample)) ** 0.5, (name, p, q)  # ≈ 3-9 points
    assert tasks.load(name, DATA, num_train=20, num_dev=10, num_eval=5, seed=1)[0] == \
        tasks.load(name, DATA, num_train=20, num_dev=10, num_eval=5, seed=1)[0]


# ---- 3. bad input

BAD = {  # task -> (file to corrupt, 1-based line to replace, bad line, expected message part)
    "sst2": ("train.tsv", 5, "a sentence\t1\textra\n", "expected 2 tab-separated columns"),
}


@needs_data
@pytest.mark.parametrize("name", list(tasks.TASKS))
def test_malformed_line_names_file_and_line(name, tmp_path):
    """A corrupted line in a copy of the data fails with path:line and what is wrong."""
    fname, line, bad, why = BAD[name]
    task = tasks.get(name)
    for f in task.files:
        with open(os.path.join(DATA, name, f), encoding="utf-8") as src:
            lines = [next(src) for _ in range(40)]
        if f == fname:
            lines[line - 1] = bad
        (tmp_path / f).write_text("".join(lines), encoding="utf-8")
    with pytest.raises(DataError, match=f"{tmp_path / fname}:{line}: .*{why}"):
        tasks.load(name, str(tmp_path), num_train=10, num_dev=5, num_eval=5)


def test_unknown_task_lists_the_five():
    """An unknown task name lists the valid choices."""
    with pytest.raises(DataError, match="choose from: sst2, rte, copa, winogrande, multirc"):
        tasks.get("mnli")


@pytest.mark.parametrize("name", list(tasks.TASKS))
def test_missing_files_are_named(name, tmp_path):
    """A data_dir without the task's files names the files it expected."""
    with pytest.raises(DataError, match=" and ".join(tasks.get(name).files[:1])):
        tasks.load(name, str(tmp_path))


# ---- 4. the hub path, offline: the same rows in the hub's schema and in the original files

def rows(name, n):
    """n synthetic rows of `name` as (hub schema rows, original-file lines)."""
    hub, lines = [], []
    for i in range(n):
        y = i % 2
        if name == "sst2":
            hub.append({"sentence": f"film number {i} ", "label": y, "idx": i})
            lines.append(f"film number {i} \t{y}")
    if name == "sst2":
        lines.insert(0, "sentence\tlabel")
    return hub, lines


def write_both(name, tmp_path, n_train=12, n_valid=6):
    import datasets

    task = tasks.get(name)
    repo, config = task.hub
    for split, fname, n in (("train", task.files[0], n_train), ("validation", task.files[1], n_valid)):
        hub, lines = rows(name, n)
        folder = tmp_path / "hub" / repo / config / split
        folder.mkdir(parents=True)
        datasets.Dataset.from_list(hub).to_parquet(str(folder / "0000.parquet"))
        (tmp_path / "files").mkdir(exist_ok=True)
        (tmp_path / "files" / fname).write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.mark.parametrize("name", list(tasks.TASKS))
def test_hub_columns_give_the_same_examples(name, tmp_path, monkeypatch):
    """The hub schema (parquet read by the real `datasets` loader) gives the file path's Examples."""
    write_both(name, tmp_path)
    monkeypatch.setattr(tasks, "HUB", str(tmp_path / "hub" / "{repo}"))
    kw = dict(num_train=6, num_dev=3, num_eval=4, seed=3)
    hub = tasks.load(name, None, **kw)
    assert [len(s) for s in hub] == [6, 3, 4]
    assert hub == tasks.load(name, str(tmp_path / "files"), **kw)


# ---- 5. loss and evaluation against the slow way: full logits, log_softmax over everything

def examples(name, n, mlm=False):
    task = tasks.get(name)
    hub, _ = rows(name, n)
    return [task.template(r, True, mlm) for row in hub for r in task.parse(row)]


def slow_scores(model, tok, ex):
    """Mean option log-prob per candidate from full `model(ids).logits`, one sequence at a time."""
    out = []
    for c in ex.candidates:
        if MASK in ex.prompt:
            ids = tok(ex.prompt.replace(MASK, tok.mask_token)).input_ids
            logp = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
            out.append(logp[ids.index(tok.mask_token_id), tok(c, add_special_tokens=False).input_ids[0]])
            continue
        ids = tok(ex.prompt + c).input_ids
        n = len(ids) - len(tok(ex.prompt).input_ids)
        logp = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
        out.append(torch.stack([logp[t - 1, ids[t]] for t in range(len(ids) - n, len(ids))]))
    return out


def slow_loss(model, tok, task, exs):
    if task.loss_type == "lm":  # token-averaged NLL of the gold options
        return -torch.cat([slow_scores(model, tok, e)[e.label].view(-1) for e in exs]).mean()
    scores = torch.stack([torch.stack([s.mean() for s in slow_scores(model, tok, e)]) for e in exs])
    return F.cross_entropy(scores, torch.tensor([e.label for e in exs]))


CASES = [(n, f) for n in tasks.TASKS for f in ("opt", "llama")] + \
        [(n, "roberta") for n, t in tasks.TASKS.items() if t.mlm_ok]


@needs_shared
@pytest.mark.parametrize("name,family", CASES)
def test_loss_matches_full_logits_oracle(name, family):
    """loss() (LM head on scored positions only) equals CE / NLL from full logits."""
    task, tok, model, mlm = tasks.get(name), real_tokenizer(family), tiny_model(family), family == "roberta"
    exs = examples(name, 5, mlm)
    batch = next(tasks.batches(tok, task, exs, batch_size=len(exs), mlm=mlm))
    with torch.no_grad():
        torch.testing.assert_close(tasks.loss(model, batch), slow_loss(model, tok, task, exs))


@needs_shared
@pytest.mark.parametrize("family,dtype", [("opt", torch.float16), ("llama", torch.bfloat16),
                                          ("roberta", torch.float16)])
def test_loss_is_fp32_and_finite_in_half_precision(family, dtype):
    """Half-precision weights still give a finite fp32 loss (log-softmax in fp32)."""
    tok, model, mlm = real_tokenizer(family), tiny_model(family, dtype), family == "roberta"
    for name in ("sst2", "copa") if not mlm else ("sst2",):
        batch = next(tasks.batches(tok, name, examples(name, 4, mlm), batch_size=4, mlm=mlm))
        with torch.no_grad():
            value = tasks.loss(model, batch)
        assert value.dtype == torch.float32 and torch.isfinite(value)


@needs_shared
@pytest.mark.parametrize("name,family", [(n, "opt") for n in tasks.TASKS] +
                         [(n, "roberta") for n, t in tasks.TASKS.items() if t.mlm_ok])
def test_evaluate_matches_one_at_a_time_oracle(name, family):
    """Batched, padded evaluation = argmax of the unbatched slow scores (and F1a / EM)."""
    tok, model, mlm = real_tokenizer(family), tiny_model(family), family == "roberta"
    exs = examples(name, 7, mlm)
    with torch.no_grad():
        preds = [int(torch.stack([s.mean() for s in slow_scores(model, tok, e)]).argmax())
                 for e in exs]
    right = [p == e.label for p, e in zip(preds, exs)]
    metrics = tasks.evaluate(model, tok, name, exs, batch_size=3, mlm=mlm)
    assert metrics["accuracy"] == pytest.approx(sum(right) / len(exs))
    if any(e.group >= 0 for e in exs):
        tp = sum(p == 1 == e.label for p, e in zip(preds, exs))
        f1 = 2 * tp / (sum(p == 1 for p in preds) + sum(e.label == 1 for e in exs))
        em = [all(r for r, e in zip(right, exs) if e.group == g) for g in {e.group for e in exs}]
        assert metrics["f1a"] == pytest.approx(f1) and metrics["em"] == pytest.approx(sum(em) / len(em))
