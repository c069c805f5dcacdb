"""Tasks: data, prompt templates, candidates, the training loss and evaluation (paper §3, §4.1).

Scoring. Every example is a prompt and C candidate continuations; a model scores candidate c by
the mean log-probability of its option tokens given the prompt (MeZO's length-normalised score):
    s(c) = (1/|c|) Σ_k log p(c_k | prompt, c_<k)
Classification tasks (SST2, RTE, MultiRC) train with cross-entropy over the candidates,
    L = −log softmax_c s(c)[gold]                       (averaged over the batch's examples);
COPA and WinoGrande train with the LM loss, the NLL of the gold option's tokens averaged over all
of the batch's gold tokens, so a training step runs forward passes on gold sequences only.
Evaluation = argmax_c s(c) vs gold (MultiRC also SuperGLUE F1a and exact match per question; its
test split is sampled in whole questions).

A batch is a few padded tensors, one row per example (B examples, C candidates, T tokens,
K = the longest option of the batch in tokens):
    input_ids, attention_mask  [B, S, T]  S = C for a causal LM: candidate c continues the prompt
                                          in sequence c; S = 1 for a masked LM, whose one
                                          sequence scores every candidate at its mask
    positions, targets         [B, C, K]  where candidate c's k-th option token is predicted (the
                                          hidden state at t−1 predicts token t) and that token
    scored                     [B, C, K]  bool: False past the end of a shorter option (padding)
The LM head runs on the B·C·K gathered hidden states only, never on all T positions, and
log-softmax is taken in fp32 even for fp16/bf16 weights (DESIGN §2). The score is then a masked
mean, s = Σ_k log p · scored / Σ_k scored → [B, C], with no scatter: the scoring adds no atomics
on CUDA (the index_add_ segment sum it replaces did, summing in a varying order, and 1/(2μ) in the
ZO estimate amplifies such last-bit jitter), so the same batch gives the same scores every run.

Data parallelism: loss_terms returns the loss as (sum, count), count = the examples ("cls") or
gold tokens ("lm") summed, so ranks that each score a shard of a batch get the exact global mean
Σ sum / Σ count. A mean of the shards' means is not it for the LM loss: shards hold different
numbers of tokens. Evaluation shards too: predict(shard=(rank, world)) fills its share of the
predictions, and a sum over the ranks completes them. Resuming: training batch k is a function of
(seed, k), never of a live iterator's history; epoch e's order is a permutation drawn from
np.random.default_rng([seed, e]). Evaluation encodes a split once, batches it in order of length
(less padding) and copies the predictions to the host once, at the end.

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
import io
import itertools
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

MASK = "<mask>"  # RoBERTa's mask token; replaced by tokenizer.mask_token when encoding
# The hub's parquet export exists for every viewer-supported dataset, script-based or not, so it
# loads with any `datasets` version (>= 4 refuses loading scripts).
HUB = "hf://datasets/{repo}@refs/convert/parquet"
log = logging.getLogger(__name__)  # notes (e.g. fewer training examples than asked) on stderr


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

def _records(task, rows, where, decode):
    """Parse numbered raw rows into records; any problem -> DataError "where:n: what is wrong"."""
    out = []
    for n, raw in rows:
        try:
            row = decode(raw)
            if not isinstance(row, dict):
                raise ValueError("expected a JSON object")
            out += task.parse(row)
        except (KeyError, ValueError, TypeError, AttributeError) as e:
            why = (f"bad JSON ({e.msg})" if isinstance(e, json.JSONDecodeError) else
                   f"missing key {e}" if isinstance(e, KeyError) else str(e))
            raise DataError(f"{where}:{n}: {why}") from None
    if not out:  # an empty file, a header alone: nothing to train on or evaluate
        raise DataError(f"{where}: no examples")
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


def _lines(path):
    """The lines of a UTF-8 text file (universal newlines, as open() reads them); a byte that is
    not UTF-8 -> DataError "path:line: not valid UTF-8"."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:  # e.start is a byte offset: count the newlines before it
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte {data[e.start]:#04x})") from None
    return io.StringIO(text, newline=None).readlines()


def _read_files(task, data_dir):
    folder = os.path.join(data_dir, task.name)
    folder = folder if os.path.isdir(folder) else data_dir  # data_dir/<task>/ or the files in it
    paths = [os.path.join(folder, f) for f in task.files]
    if not all(os.path.isfile(p) for p in paths):
        raise DataError(f"{task.name} data not found: expected {' and '.join(paths)} "
                        f"(the original {'/'.join(task.files)} files)")
    splits = []
    for path in paths:
        lines = [(n, line) for n, line in enumerate(_lines(path), 1) if line.strip()]
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
    return [_records(task, enumerate(ds[s]), f"{repo} {config} {s}", dict) for s in files]


# ---- sampling (MeZO: train ∥ dev from one permutation of the train split)

def _sample(train, valid, num_train, num_dev, num_eval, seed):
    unique = {}
    for r in train:  # an example repeated in the train split could land in both train and dev
        unique.setdefault(tuple((k, v) for k, v in r.items() if k not in ("label", "group")), r)
    train = list(unique.values())
    if num_dev >= len(train):
        raise DataError(f"num_dev {num_dev} leaves no training examples "
                        f"(the train split has {len(train)})")
    available = len(train) - num_dev
    if num_train > available:
        log.warning(f"note: num_train {num_train} > {available} available "
                    f"(after num_dev {num_dev}); using {available}")
    rng = np.random.default_rng(seed)
    picked = [train[i] for i in rng.permutation(len(train))[:num_train + num_dev]]
    n_train = len(picked) - num_dev  # dev = the last num_dev picked
    test = [] if num_eval is None else _whole_questions(valid, num_eval, rng)
    return picked[:n_train], picked[n_train:], test


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
    if not test:
        raise DataError(f"num_eval {num_eval} holds no whole question (the smallest has "
                        f"{min(map(len, questions.values()))} answer options)")
    return test


# ---- encoding: token ids, and where each candidate's option tokens are predicted

@dataclass(frozen=True)
class Encoded:
    """One example in token ids. A causal LM reads candidate c in its own sequence c; a masked
    LM has one sequence and scores every candidate at its mask."""
    sequences: list[list[int]]  # S token-id lists: prompt + candidate c, or the masked prompt
    positions: list[list[int]]  # C lists: the hidden positions that predict candidate c's tokens
    targets: list[list[int]]    # C lists: those tokens (a masked LM: the one verbalizer token)
    label: int                  # the gold candidate (0 when only the gold one is encoded)


def _truncate(tokenizer, ids, max_length):
    """Left-truncate to max_length, keeping a leading BOS (the prompt's start matters least)."""
    if len(ids) <= max_length:
        return ids
    keep = int(tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id)
    return ids[:keep] + ids[len(ids) - max_length + keep:]


def _encode(tokenizer, ex, max_length, mlm, gold_only) -> Encoded:
    """Tokens of `ex` and where its candidates are scored (all of them, or the gold one only).

    Causal LM: the hidden state at t−1 predicts token t, and the option tokens are the last
    len(tok(prompt+c)) − len(tok(prompt)) tokens (as the anchors). Masked LM: one sequence, each
    candidate is one token scored at the mask.
    """
    candidates, label = ([ex.candidates[ex.label]], 0) if gold_only else (ex.candidates, ex.label)
    if mlm:
        ids = tokenizer(ex.prompt.replace(MASK, tokenizer.mask_token)).input_ids
        ids = _truncate(tokenizer, ids, max_length)
        targets = [tokenizer(c, add_special_tokens=False).input_ids for c in candidates]
        if any(len(t) != 1 for t in targets):
            raise DataError(f"verbalizers {candidates} must be single tokens for a masked LM")
        if tokenizer.mask_token_id not in ids:
            raise DataError(f"max_length {max_length} truncates the mask token away")
        at = ids.index(tokenizer.mask_token_id)
        return Encoded([ids], [[at] for _ in targets], targets, label)
    n_prompt = len(tokenizer(ex.prompt).input_ids)
    sequences, positions, targets = [], [], []
    for c in candidates:
        ids = tokenizer(ex.prompt + c).input_ids
        n_option = max(1, len(ids) - n_prompt)
        ids = _truncate(tokenizer, ids, max_length)
        first = len(ids) - min(n_option, len(ids) - 1)  # token 0 has no prediction
        sequences.append(ids)
        positions.append(list(range(first - 1, len(ids) - 1)))  # h at t−1 predicts token t
        targets.append(ids[first:])
    return Encoded(sequences, positions, targets, label)


def _collate(encoded: list[Encoded], pad_id) -> dict:
    """Right-padded tensors of a batch of encoded examples (shapes in the module docstring).

    Padded option slots point at position 0, a valid index, so the gather needs no special case;
    `scored` masks them out of every sum.
    """
    B, S, C = len(encoded), len(encoded[0].sequences), len(encoded[0].targets)
    T = max(len(ids) for e in encoded for ids in e.sequences)
    K = max(len(t) for e in encoded for t in e.targets)
    input_ids = torch.full((B, S, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, S, T), dtype=torch.long)
    positions = torch.zeros((B, C, K), dtype=torch.long)
    targets = torch.zeros((B, C, K), dtype=torch.long)
    scored = torch.zeros((B, C, K), dtype=torch.bool)
    for b, e in enumerate(encoded):
        assert (len(e.sequences), len(e.targets)) == (S, C), \
            "all examples of a batch need the same number of candidates"
        for s, ids in enumerate(e.sequences):
            input_ids[b, s, :len(ids)] = torch.tensor(ids)
            attention_mask[b, s, :len(ids)] = 1
        for c, (pos, tokens) in enumerate(zip(e.positions, e.targets)):
            positions[b, c, :len(pos)] = torch.tensor(pos)
            targets[b, c, :len(tokens)] = torch.tensor(tokens)
            scored[b, c, :len(tokens)] = True
    labels = torch.tensor([e.label for e in encoded], dtype=torch.long)
    return dict(input_ids=input_ids, attention_mask=attention_mask, positions=positions,
                targets=targets, scored=scored, labels=labels)


# ---- scoring: log p of the option tokens, the LM head on those positions only

def _option_logprobs(model, batch):
    """log p(option token | everything before it), fp32, [B, C, K]; 0 at padded slots.

    Cost of the padding: the head runs on all B·C·K slots, not only the option tokens, so that
    the gather is one fixed-shape index with no host sync (selecting the scored slots would need
    their count on the host). For one-token verbalizers (SST2, RTE, MultiRC) K = 1 and nothing is
    wasted; on COPA / WinoGrande with the OPT tokenizer the head sees 1.5× / 1.8× the option
    tokens in training (batches of 16 gold options), 1.3× / 1.6× in evaluation (sorted batches of
    8): a few hundred rows, a small share of a forward pass over the batch's sequences.
    """
    B, S, T = batch["input_ids"].shape
    C = batch["targets"].shape[1]
    h = model.base_model(input_ids=batch["input_ids"].flatten(0, 1),            # [B·S, T]
                         attention_mask=batch["attention_mask"].flatten(0, 1),
                         use_cache=False).last_hidden_state    # no KV cache: nothing generates
    h = h.unflatten(0, (B, S))                                       # [B, S, T, H]
    if S != C:                      # a masked LM: its one sequence serves every candidate (a view)
        h = h.expand(B, C, T, h.shape[-1])                           # [B, C, T, H]
    # the index tensors follow h, which a model split over devices leaves on its last device
    positions, targets, scored = (batch[k].to(h.device) for k in ("positions", "targets", "scored"))
    example = torch.arange(B, device=h.device)[:, None, None]        # [B, 1, 1]
    candidate = torch.arange(C, device=h.device)[None, :, None]      # [1, C, 1]
    h = h[example, candidate, positions]                             # [B, C, K, H], a copy
    logp = model.lm_head(h).float().log_softmax(-1)                  # [B, C, K, V]
    logp = logp.gather(-1, targets[..., None]).squeeze(-1)           # [B, C, K]
    return logp.where(scored, 0.0)


def _scores(model, batch):
    """s(c): the mean log-probability of each candidate's option tokens, [B, C]."""
    logp = _option_logprobs(model, batch)                            # [B, C, K]
    return logp.sum(-1) / batch["scored"].to(logp.device).sum(-1)


def _count(batch) -> int:
    """The terms the loss sums: examples ("cls"), or the gold options' tokens ("lm")."""
    labels = batch["labels"]
    if batch["loss_type"] == "cls":
        return len(labels)
    gold = batch["scored"][torch.arange(len(labels), device=labels.device), labels]  # [B, K]
    return int(gold.sum())


# ---- training batches: batch k is a function of (seed, k)

@dataclass(frozen=True)
class Batches:
    """Training batches by step: at(k) is the batch of step k, counted from 0 (k optimizer steps
    done). Epoch e = k // steps_per_epoch visits every example once, in the order of a permutation
    drawn from np.random.default_rng([seed, e]); its last batch is smaller when batch_size does
    not divide the examples. Nothing depends on which batches were asked for before, so a resumed
    run gets the batches it would have had. Iterating yields at(0), at(1), ... without end.
    """
    encoded: list = field(repr=False)  # Encoded examples, encoded once
    loss_type: str
    batch_size: int
    seed: int
    pad_id: int

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.encoded) / self.batch_size)

    def at(self, step: int) -> dict:
        epoch, offset = divmod(step, self.steps_per_epoch)  # step = batch `offset` of `epoch`
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.encoded))
        chosen = order[offset * self.batch_size:(offset + 1) * self.batch_size]
        batch = _collate([self.encoded[i] for i in chosen], self.pad_id)
        batch["loss_type"] = self.loss_type
        batch["count"] = _count(batch)
        return batch

    def __iter__(self) -> Iterator[dict]:
        return map(self.at, itertools.count())


# ---- evaluation sets: encoded once, batched by length

@dataclass(frozen=True)
class EvalSet:
    """An evaluation split, encoded once with all candidates, for predict / evaluate / metrics."""
    encoded: list = field(repr=False)  # Encoded examples in the split's order
    groups: list                       # MultiRC question ids (F1a / EM); -1 for other tasks
    by_length: list                    # example indices, shortest longest-sequence first
    pad_id: int

    def __len__(self):
        return len(self.encoded)


def _pad_id(tokenizer):
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def _task(task):
    return task if isinstance(task, Task) else get(task)


# ---- public entry points

def get(name) -> Task:
    if name not in TASKS:
        raise DataError(f"unknown task {name!r}; choose from: {', '.join(TASKS)}")
    return TASKS[name]


def load(task, data_dir=None, *, num_train=1000, num_dev=None, num_eval=1000, seed=0,
         align=True, mlm=False) -> tuple[list[Example], list[Example], list[Example]]:
    """(train, dev, test) Examples of `task`, sampled as in MeZO (see the module docstring).

    num_train beyond what the train split holds (after dev) uses all of it, with a note on the
    `tasks` logger (stderr by default); len(train) is the number used. num_eval must be >= 1
    (evaluation needs examples); num_eval=None asks for no test set (test = []).
    """
    task = _task(task)
    num_dev = task.num_dev if num_dev is None else num_dev
    if mlm and not task.mlm_ok:
        ok = ", ".join(t.name for t in TASKS.values() if t.mlm_ok)
        raise DataError(f"task {task.name!r} needs a causal LM; a masked LM supports: {ok}")
    if min(num_train, num_dev) < 0:
        raise DataError("num_train and num_dev must be >= 0")
    if num_eval is not None and num_eval < 1:
        raise DataError(f"num_eval must be at least 1 (evaluation needs examples), got {num_eval}")
    train, valid = _read_hub(task) if data_dir is None else _read_files(task, data_dir)
    splits = _sample(train, valid, num_train, num_dev, num_eval, seed)
    return tuple([task.template(r, align, mlm) for r in split] for split in splits)


def batches(tokenizer, task, examples, *, batch_size, seed=0, max_length=512,
            mlm=False) -> Batches:
    """Training batches by step (see Batches), built with a private RNG (never the global one).

    The examples are checked and encoded here, at the call, so bad input fails before training;
    "lm" tasks encode the gold candidate only: its option tokens are all the loss needs.
    """
    task = _task(task)
    if not examples:
        raise DataError(f"no training examples for {task.name}")
    gold_only = task.loss_type == "lm"
    encoded = [_encode(tokenizer, e, max_length, mlm, gold_only) for e in examples]
    return Batches(encoded, task.loss_type, batch_size, seed, _pad_id(tokenizer))


def to(batch, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def shard(batch, rank, world) -> dict:
    """Rank's share of a training batch's examples, as np.array_split cuts B into `world` parts:
    the first B mod world ranks take one example more; a rank gets none only when B < world.
    The share's count is its own (loss_terms)."""
    sizes = [len(part) for part in np.array_split(range(len(batch["labels"])), world)]
    lo = sum(sizes[:rank])
    hi = lo + sizes[rank]
    part = {k: v[lo:hi] if torch.is_tensor(v) else v for k, v in batch.items()}
    part["count"] = _count(part)
    return part


def loss_terms(model, batch) -> tuple[torch.Tensor, int]:
    """(sum, count): the fp32 loss summed over the batch's terms, and how many terms it sums.

    "cls": Σ over examples of −log softmax_c s(c)[gold]; count = examples.
    "lm":  Σ over the gold options' tokens of −log p(token); count = those tokens.
    An empty shard gives (0, 0) without running the model.
    """
    labels = batch["labels"]
    if len(labels) == 0:
        return torch.zeros((), dtype=torch.float32, device=next(model.parameters()).device), 0
    if batch["loss_type"] == "lm":
        logp = _option_logprobs(model, batch)                        # [B, C, K]
        example = torch.arange(len(labels), device=logp.device)
        gold = logp[example, labels.to(logp.device)]                 # [B, K], 0 past the option
        return -gold.sum(), batch["count"]
    scores = _scores(model, batch)                                   # [B, C]
    return F.cross_entropy(scores, labels.to(scores.device), reduction="sum"), batch["count"]


def loss(model, batch) -> torch.Tensor:
    """fp32 scalar: the batch's mean loss, sum / count of loss_terms."""
    total, count = loss_terms(model, batch)
    return total / count


def encode_eval(tokenizer, examples, *, max_length=512, mlm=False) -> EvalSet:
    """Encode an evaluation split once (all candidates of every example)."""
    encoded = [_encode(tokenizer, e, max_length, mlm, False) for e in examples]
    longest = [max(map(len, e.sequences)) for e in encoded]  # sets a batch's padded width T
    return EvalSet(encoded, [e.group for e in examples],
                   np.argsort(longest, kind="stable").tolist(), _pad_id(tokenizer))


@torch.inference_mode()
def predict(model, data: EvalSet, *, batch_size=8, shard=None) -> torch.Tensor:
    """argmax_c s(c) of every example, in data's order: a long tensor [N] on the model's device,
    for the caller to copy to the host once (no sync per batch).

    shard=(rank, world) predicts only examples by_length[rank::world] (similar lengths on every
    rank) and leaves 0 elsewhere, so an all-reduce SUM over the ranks gives every rank all N.
    """
    device = next(model.parameters()).device
    rank, world = shard or (0, 1)
    mine = data.by_length[rank::world]
    preds = torch.zeros(len(data), dtype=torch.long, device=device)
    for i in range(0, len(mine), batch_size):
        chosen = mine[i:i + batch_size]
        batch = to(_collate([data.encoded[j] for j in chosen], data.pad_id), device)
        preds[torch.tensor(chosen, device=device)] = _scores(model, batch).argmax(-1).to(device)
    return preds


def metrics(data: EvalSet, preds: list[int]) -> dict[str, float]:
    """Accuracy of the predictions; with question groups (MultiRC) also F1a and exact match."""
    labels = [e.label for e in data.encoded]
    right = [p == y for p, y in zip(preds, labels)]
    out = {"accuracy": sum(right) / len(right) if right else float("nan")}
    if any(g >= 0 for g in data.groups):
        # F1a: F1 of the positive class (candidate 1 = "Yes") over all answer options
        tp = sum(p == 1 and y == 1 for p, y in zip(preds, labels))
        positives = sum(p == 1 for p in preds) + sum(y == 1 for y in labels)
        out["f1a"] = 2 * tp / max(positives, 1)
        questions = {}
        for ok, g in zip(right, data.groups):
            questions[g] = questions.get(g, True) and ok
        out["em"] = sum(questions.values()) / len(questions)
    return out


def evaluate(model, data: EvalSet, *, batch_size=8) -> dict[str, float]:
    """metrics() of predict() on one process."""
    return metrics(data, predict(model, data, batch_size=batch_size).tolist())


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
