"""Tasks: data, prompt templates, candidates, the training loss and evaluation (paper §3, §4.1).

Every example is a prompt and a few candidate continuations; a model scores candidate c by the
mean log-probability of its option tokens given the prompt (MeZO's length-normalised score):
    s(c) = (1/|c|) Σ_t log p(c_t | prompt, c_<t)
Classification tasks (SST2, RTE, MultiRC) train with cross-entropy over the candidates,
    L = −log softmax_c s(c)[gold];
COPA and WinoGrande train with the LM loss: token-averaged NLL of the gold option only, so a
training step runs forward passes on gold sequences only. Evaluation = argmax_c s(c) vs gold
(MultiRC also SuperGLUE F1a and exact match per question; its test split is sampled in
whole questions). The LM head runs only on the scored
positions, and log-softmax is taken in fp32 even for fp16/bf16 weights (DESIGN §2).

Task alignment (paper §3, Tab. 1): aligned templates turn each task into next-token prediction;
--no_align (align=False) keeps only the bare input followed by the verbalizer. Causal wording is
MeZO's (templates.py v0; no_align = its "empty" v1 form). RoBERTa (masked LM, SST2 and RTE only)
uses Tab. 1: `<sentence> It was<mask>.` and `<premise>?<mask>, <hypothesis>`; the mask stands for
a one-token verbalizer that carries its own leading space (" great", " Yes"), as in LM-BFF. RTE's
Tab. 1 form puts the answer before the hypothesis, which a left-to-right LM cannot use, so causal
models keep MeZO's question form. WinoGrande scores option + the rest of the sentence after "_".

Data: the HF hub (parquet export of nyu-mll/glue, aps/super_glue, allenai/winogrande) or
data_dir with the original GLUE TSV / SuperGLUE / WinoGrande JSONL files. Sampling as in MeZO:
exact duplicates of the train split are dropped, one seeded permutation of it gives the first
num_train+num_dev examples, of which dev = the last num_dev (COPA: 300/100); test = the first
num_eval of a seeded permutation of the validation split.
References: Zhang et al. 2024 (arXiv:2402.11592) §3, Tab. 1, §4.1; MeZO (arXiv:2305.17333);
LM-BFF (arXiv:2012.15723); SuperGLUE (arXiv:1905.00537) for F1a/EM.
Not here: the optimizers (optimizers.py), adapters (peft.py), the loop and CLI (train.py).
"""
import json
import os
import re
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

MASK = "<mask>"  # RoBERTa's mask token; replaced by tokenizer.mask_token when encoding
# The hub's parquet export exists for every viewer-supported dataset, script-based or not, so it
# loads with any `datasets` version (>= 4 refuses loading scripts).
HUB = "hf://datasets/{repo}@refs/convert/parquet"


class DataError(ValueError):
    """Bad task name, option or data file; the message is one line for the CLI."""


@dataclass
class Example:
    prompt: str            # text before the candidate (with MASK for a masked LM)
    candidates: list[str]  # continuations scored after the prompt (or at the mask)
    label: int             # index of the gold candidate
    group: int = -1        # MultiRC: question id (for F1a / EM); -1 otherwise


@dataclass(frozen=True)
class Task:
    name: str
    loss_type: str        # "cls": CE over candidates; "lm": NLL of the gold option's tokens
    files: tuple          # (train, validation) file names in data_dir
    hub: tuple            # (repo, config) on the HF hub
    parse: Callable       # one raw row (file line or hub row) -> list of records (dicts)
    template: Callable    # (record, align, mlm) -> Example
    num_dev: int = 500
    mlm_ok: bool = False


def _label(value, choices):
    """Index of `value` in `choices` (a dict raw label -> index); ValueError names the choices."""
    if isinstance(value, (str, int)) and value in choices:
        return choices[value]
    raise ValueError(f"bad label {value!r}; expected one of {sorted(set(map(str, choices)))}")


# ---- SST2 (GLUE): "<sentence> It was terrible|great"

def _parse_sst2(row):  # TSV: sentence, label "0"/"1"; hub: sentence, label 0/1, idx
    return [dict(sentence=row["sentence"].strip(),
                 label=_label(row["label"], {"0": 0, "1": 1, 0: 0, 1: 1}))]


def _template_sst2(r, align, mlm):
    s = r["sentence"]
    if mlm:
        prompt = f"{s} It was{MASK}." if align else f"{s}{MASK}"
    else:
        prompt = f"{s} It was" if align else s
    return Example(prompt, [" terrible", " great"], r["label"])


# ---- RTE (SuperGLUE): MeZO's question form; Tab. 1 `<premise>?<mask>, <hypothesis>` for RoBERTa

def _parse_rte(row):
    # JSONL: premise, hypothesis, label "entailment"/"not_entailment", idx; hub: label 0/1
    choices = {"entailment": 0, "not_entailment": 1, 0: 0, 1: 1}
    return [dict(premise=row["premise"], hypothesis=row["hypothesis"],
                 label=_label(row["label"], choices))]


def _template_rte(r, align, mlm):
    p, h = r["premise"], r["hypothesis"]
    if mlm and align:
        prompt = f"{p.rstrip('.?!')}?{MASK}, {h}"
    elif align:
        prompt = f'{p}\nDoes this mean that "{h}" is true? Yes or No?\n'
    else:
        prompt = f'{p}\n"{h}"' + (MASK if mlm else "\n")
    return Example(prompt, [" Yes", " No"] if mlm else ["Yes", "No"], r["label"])


# ---- COPA (SuperGLUE): "<premise> because|so <choice>"; no_align drops the conjunction

def _parse_copa(row):  # JSONL and hub: premise, choice1, choice2, question, label 0/1, idx
    _label(row["question"], {"cause": 0, "effect": 1})
    return [dict(premise=row["premise"], question=row["question"], choice1=row["choice1"],
                 choice2=row["choice2"], label=_label(row["label"], {0: 0, 1: 1}))]


def _template_copa(r, align, mlm):
    conj = {"cause": " because", "effect": " so"}[r["question"]] if align else ""
    # the choice continues the sentence: lower-case its first letter unless it starts with "I"
    cands = [" " + (c if re.match(r"I\b", c) else c[:1].lower() + c[1:])
             for c in (r["choice1"], r["choice2"])]
    return Example(r["premise"].strip().removesuffix(".") + conj, cands, r["label"])


# ---- WinoGrande: the context before "_" is the prompt; option + the rest is scored

def _parse_winogrande(row):  # JSONL and hub: sentence (one "_"), option1, option2, answer "1"/"2"
    if row["sentence"].count("_") != 1:
        raise ValueError("the sentence needs exactly one blank '_'")
    return [dict(sentence=row["sentence"], option1=row["option1"], option2=row["option2"],
                 label=_label(row["answer"], {"1": 0, "2": 1}))]


def _template_winogrande(r, align, mlm):
    s, options = r["sentence"], (r["option1"], r["option2"])
    if not align:  # bare sentence with its blank, then the option as a verbalizer
        return Example(s, [" " + o for o in options], r["label"])
    before, after = s.split("_")
    before = before.rstrip()  # the option carries the space, as BPE tokens do
    return Example(before, [(" " if before else "") + o + after for o in options], r["label"])


# ---- MultiRC (SuperGLUE): one Example per answer option, grouped by question

def _parse_multirc(row):
    def option(paragraph, question, answer, label, group):
        return dict(paragraph=paragraph, question=question, answer=answer,
                    label=_label(label, {0: 0, 1: 1}), group=int(group))

    if "passage" in row:  # original JSONL: a passage with nested questions and answers
        p = row["passage"]
        return [option(p["text"], q["question"], a["text"], a["label"], q["idx"])
                for q in p["questions"] for a in q["answers"]]
    # hub: one row per answer option: paragraph, question, answer, idx.{question,...}, label
    return [option(row["paragraph"], row["question"], row["answer"], row["label"],
                   row["idx"]["question"])]


def _template_multirc(r, align, mlm):
    p, q, a = r["paragraph"], r["question"], r["answer"]
    prompt = (f'{p}\nQuestion: {q}\nI found this answer "{a}". Is that correct? Yes or No?\n'
              if align else f"{p}\n{q}\n{a}\n")
    return Example(prompt, ["No", "Yes"], r["label"], r["group"])


# ---- readers: original files (path:line errors) and the hub

def _records(task, items, where, decode):
    """Parse numbered raw rows into records; any problem -> DataError "where:n: what is wrong"."""
    out = []
    for n, raw in items:
        try:
            row = decode(raw)
            if not isinstance(row, dict):
                raise ValueError("expected a JSON object")
            out += task.parse(row)
        except (KeyError, ValueError, TypeError, AttributeError) as e:
            why = (f"bad JSON ({e.msg})" if isinstance(e, json.JSONDecodeError) else
                   f"missing key {e}" if isinstance(e, KeyError) else str(e))
            raise DataError(f"{where}:{n}: {why}") from None
    return out


def _tsv(header):
    """Decoder of one GLUE TSV line into a dict keyed by the header's column names."""
    names = header.rstrip("\n").split("\t")

    def decode(line):
        cols = line.rstrip("\n").split("\t")
        if len(cols) != len(names):
            raise ValueError(f"expected {len(names)} tab-separated columns "
                             f"({', '.join(names)}), got {len(cols)}")
        return dict(zip(names, cols))
    return decode


def _read_files(task, data_dir):
    folder = os.path.join(data_dir, task.name)
    folder = folder if os.path.isdir(folder) else data_dir  # data_dir/<task>/ or the files in it
    paths = [os.path.join(folder, f) for f in task.files]
    if not all(os.path.isfile(p) for p in paths):
        raise DataError(f"{task.name} data not found: expected {' and '.join(paths)} "
                        f"(the original {'/'.join(task.files)} files)")
    splits = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            lines = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
        decode = _tsv(lines.pop(0)[1] if lines else "") if path.endswith(".tsv") else json.loads
        splits.append(_records(task, lines, path, decode))
    return splits


def _read_hub(task):
    import datasets  # only the hub path needs it

    repo, config = task.hub
    files = {s: f"{HUB.format(repo=repo)}/{config}/{s}/*.parquet" for s in ("train", "validation")}
    try:
        ds = datasets.load_dataset("parquet", data_files=files)
    except Exception as e:  # network, missing repo, ...: one line, with the offline alternative
        why = (str(e).splitlines() or [type(e).__name__])[0]
        raise DataError(f"cannot load {repo} {config} from the hub ({why}); "
                        f"use --data_dir with the original files") from None
    return [_records(task, enumerate(ds[s]), f"{repo} {config} {s} row", dict) for s in files]


# ---- sampling (MeZO: train ∥ dev from one permutation of the train split)

def _sample(train, valid, num_train, num_dev, num_eval, seed):
    unique = {}
    for r in train:  # an example repeated in the train split could land in both train and dev
        unique.setdefault(tuple((k, v) for k, v in r.items() if k not in ("label", "group")), r)
    train = list(unique.values())
    if num_dev >= len(train):
        raise DataError(f"num_dev {num_dev} leaves no training examples "
                        f"(the train split has {len(train)})")
    rng = np.random.default_rng(seed)
    picked = [train[i] for i in rng.permutation(len(train))[:num_train + num_dev]]
    cut = len(picked) - num_dev
    return picked[:cut], picked[cut:], _whole_questions(valid, num_eval, rng)


def _whole_questions(valid, num_eval, rng):
    """Up to num_eval test records; MultiRC's come in whole questions, so that exact match
    (all of a question's options right) is computed over complete questions."""
    if "group" not in valid[0]:
        return [valid[i] for i in rng.permutation(len(valid))[:num_eval]]
    questions = {}
    for r in valid:
        questions.setdefault(r["group"], []).append(r)
    test = []
    for q in rng.permutation(list(questions)):
        if len(test) + len(questions[q]) <= num_eval:
            test += questions[q]
    return test


# ---- encoding: token ids, and for each candidate the (sequence, position, token) it scores

def _truncate(tokenizer, ids, max_length):
    """Left-truncate to max_length, keeping a leading BOS (the prompt's start matters least)."""
    if len(ids) <= max_length:
        return ids
    keep = int(tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id)
    return ids[:keep] + ids[len(ids) - max_length + keep:]


def _encode(tokenizer, ex, max_length, mlm, gold_only):
    """(sequences, scored): scored[c] lists (sequence, hidden position, target id) of candidate c.

    Causal LM: the hidden state at t−1 predicts token t, and the option tokens are the last
    len(tok(prompt+c)) − len(tok(prompt)) tokens (as the anchors). Masked LM: one sequence, each
    candidate is one token scored at the mask.
    """
    cands = [ex.candidates[ex.label]] if gold_only else ex.candidates
    if mlm:
        ids = tokenizer(ex.prompt.replace(MASK, tokenizer.mask_token)).input_ids
        ids = _truncate(tokenizer, ids, max_length)
        targets = [tokenizer(c, add_special_tokens=False).input_ids for c in cands]
        if any(len(t) != 1 for t in targets):
            raise DataError(f"verbalizers {cands} must be single tokens for a masked LM")
        pos = ids.index(tokenizer.mask_token_id)
        return [ids], [[(0, pos, t[0])] for t in targets]
    n_prompt = len(tokenizer(ex.prompt).input_ids)
    seqs, scored = [], []
    for c in cands:
        ids = tokenizer(ex.prompt + c).input_ids
        n_opt = max(1, len(ids) - n_prompt)
        ids = _truncate(tokenizer, ids, max_length)
        n_opt, L = min(n_opt, len(ids) - 1), len(ids)  # token 0 has no prediction
        scored.append([(len(seqs), t - 1, ids[t]) for t in range(L - n_opt, L)])
        seqs.append(ids)
    return seqs, scored


def _collate(tokenizer, encoded, labels):
    """Right-padded batch; seg[k] = the (example, candidate) score that scored token k adds to."""
    seqs, rows, cols, targets, seg = [], [], [], [], []
    C = len(encoded[0][1])
    for i, (ex_seqs, scored) in enumerate(encoded):
        assert len(scored) == C, "all examples of a batch need the same number of candidates"
        for c, tokens in enumerate(scored):
            for s, pos, target in tokens:
                rows.append(len(seqs) + s), cols.append(pos), targets.append(target)
                seg.append(i * C + c)
        seqs += ex_seqs
    T = max(map(len, seqs))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(seqs), T), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        input_ids[i, :len(s)] = torch.tensor(s)
        attention_mask[i, :len(s)] = 1
    long = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return dict(input_ids=input_ids, attention_mask=attention_mask, rows=long(rows),
                cols=long(cols), targets=long(targets), seg=long(seg), labels=long(labels),
                num_candidates=C)


def _token_logprobs(model, batch):
    """log p of every scored token, fp32; the LM head sees only the scored positions."""
    h = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         use_cache=False).last_hidden_state   # no KV cache: nothing generates
    logits = model.lm_head(h[batch["rows"], batch["cols"]]).float()  # [K, V]
    return logits.log_softmax(-1).gather(1, batch["targets"][:, None]).squeeze(1)  # [K]


def _scores(model, batch):
    """Mean option log-probability of every candidate: [B, C]."""
    logp, seg = _token_logprobs(model, batch), batch["seg"]
    n = len(batch["labels"]) * batch["num_candidates"]
    total = logp.new_zeros(n).index_add_(0, seg, logp)
    count = logp.new_zeros(n).index_add_(0, seg, torch.ones_like(logp))
    return (total / count).view(-1, batch["num_candidates"])


def _shuffled(tokenizer, task, encoded, labels, batch_size, rng):
    """Batches of the encoded examples, endlessly, in a fresh order every epoch."""
    while True:
        order = rng.permutation(len(encoded))
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            batch = _collate(tokenizer, [encoded[j] for j in idx], [labels[j] for j in idx])
            batch["loss_type"] = task.loss_type
            yield batch


def _task(task):
    return task if isinstance(task, Task) else get(task)


# ---- public entry points

def get(name) -> Task:
    if name not in TASKS:
        raise DataError(f"unknown task {name!r}; choose from: {', '.join(TASKS)}")
    return TASKS[name]


def load(task, data_dir=None, *, num_train=1000, num_dev=None, num_eval=1000, seed=0,
         align=True, mlm=False) -> tuple[list[Example], list[Example], list[Example]]:
    """(train, dev, test) Examples of `task`, sampled as in MeZO (see the module docstring)."""
    task = _task(task)
    num_dev = task.num_dev if num_dev is None else num_dev
    if mlm and not task.mlm_ok:
        ok = ", ".join(t.name for t in TASKS.values() if t.mlm_ok)
        raise DataError(f"task {task.name!r} needs a causal LM; a masked LM supports: {ok}")
    if min(num_train, num_dev, num_eval) < 0:
        raise DataError("num_train, num_dev and num_eval must be >= 0")
    train, valid = _read_hub(task) if data_dir is None else _read_files(task, data_dir)
    splits = _sample(train, valid, num_train, num_dev, num_eval, seed)
    return tuple([task.template(r, align, mlm) for r in split] for split in splits)


def batches(tokenizer, task, examples, *, batch_size, seed=0, max_length=512,
            mlm=False) -> Iterator[dict]:
    """Endless training batches, reshuffled every epoch by a private RNG (never the global one).

    The examples are checked and encoded here, at the call, so bad input fails before training;
    "lm" tasks encode the gold candidate only: its option tokens are all the loss needs.
    """
    task = _task(task)
    if not examples:
        raise DataError(f"no training examples for {task.name}")
    gold_only = task.loss_type == "lm"
    encoded = [_encode(tokenizer, e, max_length, mlm, gold_only) for e in examples]
    labels = [0 if gold_only else e.label for e in examples]
    return _shuffled(tokenizer, task, encoded, labels, batch_size, np.random.default_rng(seed))


def to(batch, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def loss(model, batch) -> torch.Tensor:
    """fp32 scalar: CE over the candidates' mean option log-probs ("cls"), or the gold option's
    token-averaged NLL ("lm")."""
    if batch["loss_type"] == "lm":
        return -_token_logprobs(model, batch).mean()
    return F.cross_entropy(_scores(model, batch), batch["labels"])


@torch.inference_mode()
def evaluate(model, tokenizer, task, examples, *, batch_size=8, max_length=512,
             mlm=False) -> dict[str, float]:
    """Accuracy of argmax_c s(c); with question groups (MultiRC) also F1a and exact match."""
    preds, device = [], next(model.parameters()).device
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        encoded = [_encode(tokenizer, e, max_length, mlm, False) for e in chunk]
        batch = to(_collate(tokenizer, encoded, [e.label for e in chunk]), device)
        preds += _scores(model, batch).argmax(-1).tolist()
    right = [p == e.label for p, e in zip(preds, examples)]
    out = {"accuracy": sum(right) / len(right) if right else float("nan")}
    if any(e.group >= 0 for e in examples):
        # F1a: F1 of the positive class (candidate 1 = "Yes") over all answer options
        tp = sum(p == 1 and e.label == 1 for p, e in zip(preds, examples))
        positives = sum(p == 1 for p in preds) + sum(e.label == 1 for e in examples)
        out["f1a"] = 2 * tp / max(positives, 1)
        groups = {}
        for ok, e in zip(right, examples):
            groups[e.group] = groups.get(e.group, True) and ok
        out["em"] = sum(groups.values()) / len(groups)
    return out


TASKS = {
    "sst2": Task("sst2", "cls", ("train.tsv", "dev.tsv"), ("nyu-mll/glue", "sst2"),
                 _parse_sst2, _template_sst2, mlm_ok=True),
    "rte": Task("rte", "cls", ("train.jsonl", "val.jsonl"), ("aps/super_glue", "rte"),
                _parse_rte, _template_rte, mlm_ok=True),
    "copa": Task("copa", "lm", ("train.jsonl", "val.jsonl"), ("aps/super_glue", "copa"),
                 _parse_copa, _template_copa, num_dev=100),
    "winogrande": Task("winogrande", "lm", ("train_m.jsonl", "dev.jsonl"),
                       ("allenai/winogrande", "winogrande_m"), _parse_winogrande,
                       _template_winogrande, num_dev=100),
    "multirc": Task("multirc", "cls", ("train.jsonl", "val.jsonl"), ("aps/super_glue", "multirc"),
                    _parse_multirc, _template_multirc),
}
