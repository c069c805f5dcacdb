"""tasks.py: exact templates, sampling on the real files, bad input, the hub path (offline),
scores / loss / evaluation against a slow full-logits oracle on tiny models, sharded loss terms,
and training batches as a function of (seed, step).

Run: python -m pytest tests/test_tasks.py -q
"""
import functools
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tasks
from tasks import MASK, DataError
from tiny import DATA, needs_shared, real_tokenizer, tiny_model

needs_data = pytest.mark.skipif(not os.path.isdir(DATA), reason="../shared/data is absent")
# built once per session: no test changes a model or a tokenizer
real_tokenizer, tiny_model = functools.cache(real_tokenizer), functools.cache(tiny_model)


def text(ex, c):
    """The full scored text of candidate c: prompt + candidate, or the candidate at the mask."""
    return ex.prompt.replace(MASK, c) if MASK in ex.prompt else ex.prompt + c


def render(name, row, align, mlm=False):
    task = tasks.get(name)
    exs = [task.template(r, align, mlm) for r in task.parse(row)]
    for ex in exs:  # shown by `pytest -s`
        print(f"--- {name} align={align} mlm={mlm} label={ex.label}",
              *[repr(text(ex, c)) for c in ex.candidates], sep="\n")
    return exs


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
    (ex,) = render("sst2", row, align=False, mlm=True)
    assert text(ex, ex.candidates[1]) == "a gorgeous , witty , seductive movie . great"


def test_rte_template():
    """RTE: MeZO's question form; no_align = premise, quoted hypothesis, verbalizer; Tab. 1 MLM."""
    row = {"premise": "Dana Reeve died at 44.", "hypothesis": "Dana Reeve is dead.",
           "label": "entailment", "idx": 0}
    (ex,) = render("rte", row, align=True)
    assert text(ex, ex.candidates[0]) == ('Dana Reeve died at 44.\nDoes this mean that '
                                          '"Dana Reeve is dead." is true? Yes or No?\nYes')
    assert ex.candidates == ["Yes", "No"] and ex.label == 0
    (ex,) = render("rte", row, align=False)
    assert text(ex, ex.candidates[1]) == 'Dana Reeve died at 44.\n"Dana Reeve is dead."\nNo'
    (ex,) = render("rte", row, align=True, mlm=True)
    assert text(ex, ex.candidates[0]) == "Dana Reeve died at 44? Yes, Dana Reeve is dead."
    (ex,) = render("rte", row, align=False, mlm=True)
    assert text(ex, ex.candidates[1]) == 'Dana Reeve died at 44.\n"Dana Reeve is dead." No'


def test_copa_template():
    """COPA: premise + because/so + choice (first letter lower-cased, except "I")."""
    row = {"premise": "My body cast a shadow over the grass.", "choice1": "The sun was rising.",
           "choice2": "I cut the grass.", "question": "cause", "label": 0, "idx": 0}
    (ex,) = render("copa", row, align=True)
    assert [text(ex, c) for c in ex.candidates] == [
        "My body cast a shadow over the grass because the sun was rising.",
        "My body cast a shadow over the grass because I cut the grass."]
    (ex,) = render("copa", dict(row, question="effect"), align=True)
    assert text(ex, ex.candidates[0]) == \
        "My body cast a shadow over the grass so the sun was rising."
    (ex,) = render("copa", row, align=False)
    assert text(ex, ex.candidates[0]) == "My body cast a shadow over the grass the sun was rising."
    assert ex.prompt == "My body cast a shadow over the grass"


def test_winogrande_template():
    """WinoGrande: prompt = context before "_"; candidate = option + the rest, all scored."""
    row = {"qID": "x-1", "option1": "Sarah", "option2": "Maria", "answer": "2",
           "sentence": "Sarah was a better surgeon than Maria so _ got the easy cases."}
    (ex,) = render("winogrande", row, align=True)
    assert ex.prompt == "Sarah was a better surgeon than Maria so"
    assert ex.candidates == [" Sarah got the easy cases.", " Maria got the easy cases."]
    assert ex.label == 1
    (ex,) = render("winogrande", row, align=False)
    assert text(ex, ex.candidates[0]) == \
        "Sarah was a better surgeon than Maria so _ got the easy cases. Sarah"


def test_multirc_template():
    """MultiRC: one Yes/No example per answer option, grouped by its question."""
    row = {"idx": 0, "version": 1.1, "passage": {"text": "Tom ate an apple.", "questions": [
        {"question": "What did Tom eat?", "idx": 7, "answers": [
            {"text": "An apple", "idx": 0, "label": 1},
            {"text": "A pear", "idx": 1, "label": 0}]}]}}
    exs = render("multirc", row, align=True)
    assert text(exs[0], exs[0].candidates[1]) == (
        'Tom ate an apple.\nQuestion: What did Tom eat?\nI found this answer "An apple". '
        'Is that correct? Yes or No?\nYes')
    assert [(e.label, e.group) for e in exs] == [(1, 7), (0, 7)]
    assert exs[0].candidates == ["No", "Yes"]
    exs = render("multirc", row, align=False)
    assert text(exs[1], "No") == "Tom ate an apple.\nWhat did Tom eat?\nA pear\nNo"


def test_mlm_only_for_single_token_tasks():
    """A masked LM supports SST2 and RTE; other tasks fail with one clear message."""
    with pytest.raises(DataError, match="masked LM supports: sst2, rte"):
        tasks.load("copa", "/nonexistent", mlm=True)


# ---- 2. real files: sizes, disjoint splits, label balance

SIZES = {"sst2": (1000, 500, 872), "rte": (1000, 500, 277), "copa": (300, 100, 100),
         "winogrande": (1000, 100, 1000), "multirc": (1000, 500, 1000)}


def key(ex):
    return ex.prompt, tuple(ex.candidates)


@needs_data
@pytest.mark.parametrize("name", list(tasks.TASKS))
def test_real_data_sampling(name):
    """Anchors' default sizes; no example in two splits; labels balanced like the source."""
    train, dev, test = tasks.load(name, DATA)
    assert (len(train), len(dev), len(test)) == SIZES[name]
    assert not {key(e) for e in train} & {key(e) for e in dev}
    assert not {key(e) for e in train + dev} & {key(e) for e in test}
    source_train, source_valid = tasks._read_files(tasks.get(name), DATA)
    for sample, source in ((train, source_train), (test, source_valid)):
        p = sum(r["label"] == 1 for r in source) / len(source)
        q = sum(e.label == 1 for e in sample) / len(sample)
        assert abs(p - q) <= 4 * (p * (1 - p) / len(sample)) ** 0.5, (name, p, q)  # ≈ 3-9 points
    if name == "multirc":  # test questions come whole, so exact match means what it says
        options = {}
        for r in source_valid:
            options[r["group"]] = options.get(r["group"], 0) + 1
        sampled = {}
        for e in test:
            sampled[e.group] = sampled.get(e.group, 0) + 1
        assert sampled == {g: options[g] for g in sampled}
    assert tasks.load(name, DATA, num_train=20, num_dev=10, num_eval=5, seed=1)[0] == \
        tasks.load(name, DATA, num_train=20, num_dev=10, num_eval=5, seed=1)[0]


# ---- 3. bad input

BAD = {  # task -> (file to corrupt, 1-based line to replace, bad line, expected message part)
    "sst2": ("train.tsv", 5, "a sentence\t1\textra\n", "expected 2 tab-separated columns"),
    "rte": ("val.jsonl", 3, '{"premise": "A", "hypothesis": "B", "label": "maybe"}\n', "bad label"),
    "copa": ("train.jsonl", 7, '{"premise": "A", "choice1": "B"\n', "bad JSON"),
    "winogrande": ("train_m.jsonl", 2, '{"sentence": "A _ b", "option1": "A", "answer": "1"}\n',
                   "missing key 'option2'"),
    "multirc": ("train.jsonl", 4, '{"passage": {"text": "T", "questions": [{"question": "Q", '
                '"idx": 0, "answers": [{"text": "A", "idx": 0, "label": 2}]}]}}\n', "bad label"),
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
    first, second = tasks.get(name).files
    with pytest.raises(DataError, match=f"expected .*{first} and .*{second}"):
        tasks.load(name, str(tmp_path))


# ---- 4. the hub path, offline: the same rows in the hub's schema and in the original files

def rows(name, n):
    """n synthetic rows of `name` as (hub schema rows, original-file lines)."""
    hub, local = [], []
    for i in range(n):
        y, words = i % 2, " ".join(["word"] * (i % 4))  # varying lengths exercise the padding
        if name == "sst2":
            hub.append({"sentence": f"film {words} number {i} ", "label": y, "idx": i})
        elif name == "rte":
            hub.append({"premise": f"A man {words} ate {i} apples.", "hypothesis": "He ate.",
                        "idx": i, "label": y})
            local.append(dict(hub[-1], label=["entailment", "not_entailment"][y]))
        elif name == "copa":
            hub.append({"premise": f"The {words} glass {i} fell.", "choice1": "It broke.",
                        "choice2": "I laughed at it.", "question": ["cause", "effect"][y],
                        "idx": i, "label": y})
        elif name == "winogrande":
            hub.append({"sentence": f"Ann {words} hit Bo {i} times so _ cried.", "option1": "Ann",
                        "option2": "Bo", "answer": "12"[y]})
        elif name == "multirc":  # 3 options per question, 2 questions per passage
            p, q = i // 6, i // 3
            hub.append({"paragraph": f"Passage {p}" + " word" * p, "question": f"Question {q}?",
                        "answer": f"answer {i} {words}", "label": y,
                        "idx": {"paragraph": p, "question": q, "answer": i}})
    if name == "sst2":
        return hub, ["sentence\tlabel"] + [f"{r['sentence']}\t{r['label']}" for r in hub]
    if name == "multirc":  # the original nesting: passage -> questions -> answers
        passages = {}
        for r in hub:
            idx = r["idx"]
            p = passages.setdefault(idx["paragraph"], {"text": r["paragraph"], "questions": {}})
            q = p["questions"].setdefault(idx["question"], {"question": r["question"],
                                                            "idx": idx["question"], "answers": []})
            q["answers"].append({"text": r["answer"], "idx": idx["answer"], "label": r["label"]})
        local = [{"idx": k, "passage": {"text": p["text"], "questions": [*p["questions"].values()]}}
                 for k, p in passages.items()]
    return hub, [json.dumps(r) for r in (local or hub)]


def write_files(name, folder, n_train=12, n_valid=6):
    """The task's two original-format files in `folder`, with n_train and n_valid rows."""
    folder.mkdir(parents=True, exist_ok=True)
    for fname, n in zip(tasks.get(name).files, (n_train, n_valid)):
        (folder / fname).write_text("\n".join(rows(name, n)[1]) + "\n", encoding="utf-8")
    return folder


def write_both(name, tmp_path, n_train=12, n_valid=6):
    import datasets

    repo, config = tasks.get(name).hub
    for split, n in zip(("train", "validation"), (n_train, n_valid)):
        folder = tmp_path / "hub" / repo / config / split
        folder.mkdir(parents=True)
        datasets.Dataset.from_list(rows(name, n)[0]).to_parquet(str(folder / "0000.parquet"))
    write_files(name, tmp_path / "files", n_train, n_valid)


@pytest.mark.parametrize("name", list(tasks.TASKS))
def test_hub_columns_give_the_same_examples(name, tmp_path, monkeypatch):
    """Hub-schema parquet, read by the real `datasets` loader, gives the file path's Examples."""
    write_both(name, tmp_path)
    monkeypatch.setattr(tasks, "HUB", str(tmp_path / "hub" / "{repo}"))
    kw = dict(num_train=6, num_dev=3, num_eval=4, seed=3)
    hub = tasks.load(name, None, **kw)
    whole = 3 if name == "multirc" else 4             # MultiRC's test: whole 3-option questions
    assert [len(s) for s in hub] == [6, 3, whole]
    assert hub == tasks.load(name, str(tmp_path / "files"), **kw)


def test_hub_failure_is_one_clear_line(tmp_path, monkeypatch):
    """When the hub cannot be read, load() says so and points to --data_dir."""
    monkeypatch.setattr(tasks, "HUB", str(tmp_path / "nowhere" / "{repo}"))
    with pytest.raises(DataError, match="cannot load nyu-mll/glue sst2 .*--data_dir"):
        tasks.load("sst2")



# ---- 5. data that cannot be used: bytes that are not UTF-8, empty files, sizes

@pytest.mark.parametrize("name,fname,line", [("sst2", "train.tsv", 5), ("copa", "val.jsonl", 3)])
def test_non_utf8_byte_names_file_and_line(name, fname, line, tmp_path):
    """A Latin-1 byte in line `line` of a data file: DataError "path:line: not valid UTF-8"."""
    folder = write_files(name, tmp_path)
    lines = (folder / fname).read_bytes().split(b"\n")
    lines[line - 1] = lines[line - 1].replace(b"e", b"\xe9", 1)   # "é" in Latin-1
    (folder / fname).write_bytes(b"\n".join(lines))
    with pytest.raises(DataError, match=f"^{folder / fname}:{line}: not valid UTF-8"):
        tasks.load(name, str(folder), num_train=4, num_dev=2, num_eval=2)


@pytest.mark.parametrize("name,fname,content", [
    ("sst2", "dev.tsv", ""), ("sst2", "dev.tsv", "sentence\tlabel\n"),
    ("sst2", "train.tsv", "sentence\tlabel\n\n"), ("rte", "train.jsonl", "\n")])
def test_empty_or_header_only_file_has_no_examples(name, fname, content, tmp_path):
    """An empty file, or a TSV header alone: DataError naming the file."""
    folder = write_files(name, tmp_path)
    (folder / fname).write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=f"^{folder / fname}: no examples$"):
        tasks.load(name, str(folder), num_train=4, num_dev=2, num_eval=2)


def test_num_train_beyond_the_split_uses_what_there_is(tmp_path, caplog):
    """num_train > the train split (after dev): all of it is used, and a note says how many."""
    folder = write_files("sst2", tmp_path, n_train=12)
    train, dev, _ = tasks.load("sst2", str(folder), num_train=5000, num_dev=2, num_eval=2)
    assert (len(train), len(dev)) == (10, 2)
    assert caplog.messages == ["note: num_train 5000 > 10 available (after num_dev 2); using 10"]
    caplog.clear()
    tasks.load("sst2", str(folder), num_train=10, num_dev=2, num_eval=2)
    assert caplog.messages == []


def test_num_eval_zero_is_refused_and_none_skips_the_test_set(tmp_path):
    """Evaluation needs examples: num_eval 0 is a DataError; num_eval=None asks for no test set,
    and MultiRC's whole questions cannot fit in fewer options than its smallest question has."""
    folder = write_files("sst2", tmp_path / "sst2")
    with pytest.raises(DataError, match="num_eval must be at least 1"):
        tasks.load("sst2", str(folder), num_train=4, num_dev=2, num_eval=0)
    assert tasks.load("sst2", str(folder), num_train=4, num_dev=2, num_eval=None)[2] == []
    folder = write_files("multirc", tmp_path / "multirc")    # 3 answer options per question
    with pytest.raises(DataError, match="num_eval 2 holds no whole question"):
        tasks.load("multirc", str(folder), num_train=4, num_dev=2, num_eval=2)


# ---- 6. scores, loss and evaluation against the slow way: full logits, one sequence at a time

def examples(name, n, mlm=False):
    task = tasks.get(name)
    hub, _ = rows(name, n)
    return [task.template(r, True, mlm) for row in hub for r in task.parse(row)]


def slow_scores(model, tok, ex):
    """Option log-probs per candidate from full `model(ids).logits`, one sequence at a time."""
    out = []
    for c in ex.candidates:
        if MASK in ex.prompt:
            ids = tok(ex.prompt.replace(MASK, tok.mask_token)).input_ids
            logp = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
            (target,) = tok(c, add_special_tokens=False).input_ids
            out.append(logp[ids.index(tok.mask_token_id), target])
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


def slow_predictions(model, tok, exs):
    return [int(torch.stack([s.mean() for s in slow_scores(model, tok, e)]).argmax())
            for e in exs]


CASES = [(n, f) for n in tasks.TASKS for f in ("opt", "llama")] + \
        [(n, "roberta") for n, t in tasks.TASKS.items() if t.mlm_ok]
UNEVEN = {  # candidates of 1 to ~10 tokens; prompts of different lengths
    "causal": [tasks.Example("The film was", [" good", " a complete waste of everyone's evening,"
                                              " sadly", " fine, I guess"], 1),
               tasks.Example("After two long hours in the cinema I left feeling",
                             [" nothing", " happy and a little tired", " cheated"], 0)],
    "masked": [tasks.Example(f"The film was{MASK}.", [" good", " bad", " fine"], 0),
               tasks.Example(f"After two long hours in the cinema I felt{MASK}.",
                             [" nothing", " happy", " cheated"], 2)]}


@needs_shared
@pytest.mark.parametrize("family", ["opt", "llama", "roberta"])
def test_scores_of_options_of_different_lengths_match_the_oracle(family):
    """Padded scoring (a masked mean over K slots) = the mean log-prob from full logits; the LM
    head sees only the B·C·K gathered positions."""
    tok, model, mlm = real_tokenizer(family), tiny_model(family), family == "roberta"
    exs = UNEVEN["masked" if mlm else "causal"]
    data = tasks.encode_eval(tok, exs, mlm=mlm)
    batch = tasks._collate(data.encoded, data.pad_id)
    lengths = batch["scored"].sum(-1)                                  # [B, C] option tokens
    assert mlm or len(set(lengths.flatten().tolist())) >= 4             # truly uneven options
    head_rows = []
    hook = model.lm_head.register_forward_hook(
        lambda m, args, out: head_rows.append(args[0].shape[:-1].numel()))
    with torch.no_grad():
        scores = tasks._scores(model, batch)
        slow = [[s.mean() for s in slow_scores(model, tok, e)] for e in exs]
    hook.remove()
    torch.testing.assert_close(scores, torch.tensor(slow))
    assert head_rows[0] == batch["targets"].numel()                    # B·C·K, not B·S·T


@needs_shared
@pytest.mark.parametrize("name,family", CASES)
def test_loss_matches_full_logits_oracle(name, family):
    """loss() (LM head on scored positions only) equals CE / NLL from full logits."""
    task, tok, model = tasks.get(name), real_tokenizer(family), tiny_model(family)
    mlm = family == "roberta"
    exs = examples(name, 5, mlm)
    batch = tasks.batches(tok, task, exs, batch_size=len(exs), mlm=mlm).at(0)
    with torch.no_grad():
        torch.testing.assert_close(tasks.loss(model, batch), slow_loss(model, tok, task, exs))


@needs_shared
@pytest.mark.parametrize("name", ["sst2", "copa"])
def test_shard_terms_add_up_to_the_full_batch_loss(name):
    """Σ sum / Σ count over uneven shards (7 examples over 3 ranks, and over 9: two ranks get
    none, (0, 0)) = the full batch's loss, to fp32 tolerance (rtol 1.3e-6, atol 1e-5)."""
    tok, model = real_tokenizer("opt"), tiny_model("opt")
    batch = tasks.batches(tok, name, examples(name, 7), batch_size=7).at(0)
    with torch.no_grad():
        full = tasks.loss(model, batch)
        for world in (3, 9):
            parts = [tasks.shard(batch, rank, world) for rank in range(world)]
            assert [len(p["labels"]) for p in parts] == \
                [len(a) for a in np.array_split(np.arange(7), world)]
            terms = [tasks.loss_terms(model, p) for p in parts]
            assert all(t == (0.0, 0) for t, p in zip(terms, parts) if len(p["labels"]) == 0)
            total = sum(s for s, _ in terms)
            count = sum(n for _, n in terms)
            assert total.dtype == torch.float32 and count == batch["count"]
            torch.testing.assert_close(total / count, full)


@needs_shared
def test_a_mean_of_shard_means_is_not_the_lm_loss():
    """Two equal shares of examples hold different numbers of gold tokens: the mean of the two
    shard means misses the token-level loss that Σ sum / Σ count gets."""
    tok, model = real_tokenizer("opt"), tiny_model("opt")
    exs = UNEVEN["causal"] * 2
    batch = tasks.batches(tok, "copa", exs, batch_size=4).at(0)
    with torch.no_grad():
        full = tasks.loss(model, batch)
        terms = [tasks.loss_terms(model, tasks.shard(batch, rank, 2)) for rank in range(2)]
    assert terms[0][1] != terms[1][1]                                  # tokens per shard differ
    mean_of_means = sum(s / n for s, n in terms) / 2
    torch.testing.assert_close(sum(s for s, _ in terms) / sum(n for _, n in terms), full)
    assert abs(mean_of_means - full) > 100 * (1e-5 + 1.3e-6 * abs(full))


@needs_shared
@pytest.mark.parametrize("family,dtype", [("opt", torch.float16), ("llama", torch.bfloat16),
                                          ("roberta", torch.float16)])
def test_loss_is_fp32_and_finite_in_half_precision(family, dtype):
    """Half-precision weights still give a finite fp32 loss (log-softmax in fp32)."""
    tok, model, mlm = real_tokenizer(family), tiny_model(family, dtype), family == "roberta"
    for name in ("sst2", "copa") if not mlm else ("sst2",):
        batch = tasks.batches(tok, name, examples(name, 4, mlm), batch_size=4, mlm=mlm).at(0)
        with torch.no_grad():
            value = tasks.loss(model, batch)
        assert value.dtype == torch.float32 and torch.isfinite(value)


@needs_shared
@pytest.mark.parametrize("name,family", [(n, "opt") for n in tasks.TASKS] +
                         [(n, "roberta") for n, t in tasks.TASKS.items() if t.mlm_ok])
def test_evaluate_by_length_matches_one_at_a_time(name, family):
    """Length-sorted, padded batches predict what one example at a time does, and what the slow
    oracle's argmax does; sharded predictions sum to all of them; F1a / EM from the oracle's."""
    tok, model, mlm = real_tokenizer(family), tiny_model(family), family == "roberta"
    exs = examples(name, 7, mlm)
    data = tasks.encode_eval(tok, exs, mlm=mlm)
    longest = [max(map(len, data.encoded[i].sequences)) for i in data.by_length]
    assert longest == sorted(longest) and sorted(data.by_length) == list(range(len(exs)))
    with torch.no_grad():
        preds = slow_predictions(model, tok, exs)
    one_at_a_time = tasks.predict(model, data, batch_size=1)
    assert torch.is_tensor(one_at_a_time) and one_at_a_time.tolist() == preds
    assert tasks.predict(model, data, batch_size=3).tolist() == preds
    shards = [tasks.predict(model, data, batch_size=2, shard=(r, 3)) for r in range(3)]
    assert sum(shards).tolist() == preds
    right = [p == e.label for p, e in zip(preds, exs)]
    metrics = tasks.evaluate(model, data, batch_size=3)
    assert metrics == tasks.metrics(data, preds)
    assert metrics["accuracy"] == pytest.approx(sum(right) / len(exs))
    if any(e.group >= 0 for e in exs):
        tp = sum(p == 1 == e.label for p, e in zip(preds, exs))
        f1 = 2 * tp / (sum(p == 1 for p in preds) + sum(e.label == 1 for e in exs))
        em = [all(r for r, e in zip(right, exs) if e.group == g) for g in {e.group for e in exs}]
        assert metrics["f1a"] == pytest.approx(f1)
        assert metrics["em"] == pytest.approx(sum(em) / len(em))


# ---- 7. training batches: a function of (seed, step)

def first_sequences(batch):
    """Token ids of each example's first sequence (its first candidate), padding dropped."""
    return [tuple(ids[m.bool()].tolist())
            for ids, m in zip(batch["input_ids"][:, 0], batch["attention_mask"][:, 0])]


@needs_shared
def test_batches_reshuffle_without_the_global_rng():
    """Endless epochs, each a new order of all examples; the global RNGs are never touched."""
    tok, exs = real_tokenizer("opt"), examples("sst2", 6)
    state = torch.random.get_rng_state()
    it = iter(tasks.batches(tok, "sst2", exs, batch_size=4, seed=1))
    epochs = [[next(it) for _ in range(2)] for _ in range(3)]
    assert torch.equal(state, torch.random.get_rng_state())
    orders = [[s for b in e for s in first_sequences(b)] for e in epochs]
    assert all(sorted(o) == sorted(orders[0]) for o in orders) and orders[0] != orders[1]
    first = tasks.batches(tok, "sst2", exs, batch_size=4, seed=1).at(0)
    assert torch.equal(first["input_ids"], epochs[0][0]["input_ids"])


@needs_shared
def test_batch_at_a_step_depends_on_seed_and_step_only():
    """at(k) = the k-th batch of iterating from the start = a fresh object's at(k), asked in any
    order; epoch e is the permutation default_rng([seed, e]) draws, in batches of 4, 4, 2."""
    tok, exs = real_tokenizer("opt"), examples("copa", 10)
    make = functools.partial(tasks.batches, tok, "copa", exs, batch_size=4, seed=3)
    it = iter(make())
    walked = [next(it) for _ in range(12)]                          # 4 epochs of 3 steps
    gold = [tuple(tok(e.prompt + e.candidates[e.label]).input_ids) for e in exs]
    for k, batch in enumerate(walked):
        epoch, offset = divmod(k, 3)
        order = np.random.default_rng([3, epoch]).permutation(10)[offset * 4:offset * 4 + 4]
        assert first_sequences(batch) == [gold[i] for i in order]
    fresh = make()
    for k in np.random.default_rng(0).permutation(12).tolist() + [1000, 7]:
        expected = walked[k] if k < 12 else make().at(k)
        got = fresh.at(k)
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[key], expected[key]) if torch.is_tensor(got[key]) else
                   got[key] == expected[key] for key in got)
    assert first_sequences(make().at(0)) != first_sequences(tasks.batches(
        tok, "copa", exs, batch_size=4, seed=4).at(0))


@needs_shared
@pytest.mark.parametrize("family", ["opt", "llama"])
def test_left_truncation_keeps_bos_and_the_option(family):
    """Too-long inputs lose their oldest tokens but keep BOS, and the option is still scored."""
    tok, ex = real_tokenizer(family), examples("copa", 1)[0]
    batch = tasks.batches(tok, "copa", [ex], batch_size=1, max_length=6).at(0)
    full = tok(ex.prompt + ex.candidates[ex.label]).input_ids
    n_opt = len(full) - len(tok(ex.prompt).input_ids)
    assert batch["input_ids"][0, 0].tolist() == full[:1] + full[-5:]
    assert batch["targets"][0, 0].tolist() == full[-min(n_opt, 5):]
