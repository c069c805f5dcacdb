"""Pre-train a small OPT-shaped language model on the project's unlabeled training text (CPU).

No pretrained checkpoint can be downloaded on the machines this project is developed on, so the
learning run in results/learning-run/ starts from a model made here. The result is NOT any
facebook/opt checkpoint: it is a freshly initialised OPTForCausalLM (by default 4 layers,
hidden 128, 4 heads, 7.24M parameters, 6.43M of them the embedding tied to the LM head),
trained with AdamW on next-token prediction over 614k tokens, with the real OPT/GPT-2 BPE
tokenizer (50,272 ids).
The LM head over the full vocabulary is ~90% of the FLOPs, hence the small width.

    python examples/pretrain_tiny_opt.py --out /work/models/tiny-opt
    # 600 steps, loss 10.84 -> 6.76: 32 min at ~316 tokens/s on one thread of a 2-core AMD EPYC
    # that other jobs were loading; --steps 5 --layers 1 --hidden 32 runs in seconds (its test)

Recipe:
1. Corpus: text of the *train* splits in --data_dir, labels dropped: SST-2 sentences and phrases
   (lower-cased movie-review snippets), RTE premises and hypotheses, COPA premises and both
   choices, MultiRC passages, WinoGrande (train_m) sentences with the blank filled by each option
   in turn (both, so the text says nothing about the answer). Validation/dev files are never read:
   SST-2's dev.tsv is the test split train.py reports. train.py samples its SST-2 train and dev
   examples from train.tsv, so their sentences (not their labels) were seen here.
2. Documents are shuffled with --seed, each tokenized as OPT does (a leading </s>), concatenated
   and cut into rows of --seq_len tokens; only as many documents as --steps needs are tokenized,
   so every token is seen once (no epochs).
3. Loss: next-token cross-entropy over the full vocabulary,
       L(θ) = −(1/N) Σ_t log p_θ(x_{t+1} | x_≤t).
   AdamW (β = 0.9, 0.95, decay 0.1 on matrices), linear warm-up then cosine decay to 10% of --lr,
   gradients clipped to norm 1. Torch's deterministic algorithms, one seed, --threads fixed: the
   same command on the same machine gives the same weights (the test checks it).
4. Saved with save_pretrained (model + tokenizer, OPT's settings: bos </s>, pad <pad>), plus
   pretrain_log.jsonl (loss per step) and pretrain.json (the configuration, corpus and timing).
   max_position_embeddings = --seq_len: train.py truncates its inputs to the positions trained.
"""
import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
from transformers import GPT2Tokenizer, OPTConfig, OPTForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.join(HERE, "..", "..", "shared")


# ---- the corpus: unlabeled text of the train splits -------------------------------------------

def _jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def corpus(data_dir) -> list[str]:
    """Every training text of the five tasks, without labels; validation files are not opened."""
    with open(os.path.join(data_dir, "sst2", "train.tsv"), encoding="utf-8") as f:
        texts = [line.split("\t")[0].strip() for line in list(f)[1:]]    # drop header and label
    for r in _jsonl(os.path.join(data_dir, "rte", "train.jsonl")):
        texts.append(f"{r['premise']} {r['hypothesis']}")
    for r in _jsonl(os.path.join(data_dir, "copa", "train.jsonl")):
        texts.append(f"{r['premise']} {r['choice1']} {r['choice2']}")
    for r in _jsonl(os.path.join(data_dir, "multirc", "train.jsonl")):
        texts.append(r["passage"]["text"].replace("<br>", " "))
    for r in _jsonl(os.path.join(data_dir, "winogrande", "train_m.jsonl")):
        texts += [r["sentence"].replace("_", r[option]) for option in ("option1", "option2")]
    return sorted(set(t for t in texts if t))      # SST-2 repeats a few phrases


def token_rows(tokenizer, texts, rows, seq_len, seed) -> torch.Tensor:
    """[rows, seq_len] token ids: documents in a seeded order, concatenated, cut into rows."""
    order = np.random.default_rng(seed).permutation(len(texts))
    stream, need = [], rows * seq_len
    for i in order:
        stream += tokenizer(texts[i]).input_ids           # "</s> text ..." as OPT was trained
        if len(stream) >= need:
            break
    if len(stream) < need:
        sys.exit(f"error: the corpus has {len(stream)} tokens; --steps × --batch_size × "
                 f"--seq_len needs {need}")
    return torch.tensor(stream[:need]).view(rows, seq_len)


# ---- model, schedule, training ------------------------------------------------------------------

def tokenizer_from(path):
    """OPT's tokenizer: GPT-2 BPE; </s> (id 2) starts every input, <pad> is id 1."""
    return GPT2Tokenizer.from_pretrained(path, bos_token="</s>", eos_token="</s>",
                                         unk_token="<unk>", pad_token="<pad>", add_bos_token=True)


def build_model(args) -> OPTForCausalLM:
    config = OPTConfig(vocab_size=50272, hidden_size=args.hidden, num_hidden_layers=args.layers,
                       ffn_dim=4 * args.hidden, num_attention_heads=args.heads,
                       word_embed_proj_dim=args.hidden, max_position_embeddings=args.seq_len,
                       dropout=0.0, attention_dropout=0.0)
    torch.manual_seed(args.seed)
    return OPTForCausalLM(config)


def lr_at(step, args) -> float:
    """Linear warm-up over the first 5% of steps, then cosine decay to 10% of --lr."""
    warmup = max(1, args.steps // 20)
    if step < warmup:
        return args.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, args.steps - warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def pretrain(args) -> dict:
    """Train, save to args.out, and return the summary written to pretrain.json."""
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(args.threads)       # the sums' order, hence the weights, depend on it
    tokenizer = tokenizer_from(args.tokenizer)
    texts = corpus(args.data_dir)
    data = token_rows(tokenizer, texts, args.steps * args.batch_size, args.seq_len, args.seed)
    model = build_model(args).train()
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    others = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": matrices, "weight_decay": 0.1},
                             {"params": others, "weight_decay": 0.0}], lr=args.lr,
                            betas=(0.9, 0.95))
    os.makedirs(args.out, exist_ok=True)
    losses, start = [], time.perf_counter()
    with open(os.path.join(args.out, "pretrain_log.jsonl"), "w") as log:
        for step, x in enumerate(data.split(args.batch_size)):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, args)
            loss = model(input_ids=x, labels=x).loss       # HF shifts the labels by one
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
            elapsed = time.perf_counter() - start
            log.write(json.dumps(dict(step=step + 1, loss=losses[-1], lr=lr_at(step, args),
                                      time_s=elapsed)) + "\n")
            if (step + 1) % args.print_every == 0 or step + 1 == args.steps:
                print(f"step {step + 1}/{args.steps} | loss {losses[-1]:.3f} | "
                      f"{(step + 1) * x.numel() / elapsed:.0f} tokens/s", flush=True)
    model.eval().save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    summary = dict(vars(args), parameters=sum(p.numel() for p in model.parameters()),
                   corpus_documents=len(texts), tokens_seen=data.numel(),
                   first_loss=losses[0], last_loss=losses[-1],
                   wall_s=time.perf_counter() - start, threads=torch.get_num_threads(),
                   torch=torch.__version__)
    with open(os.path.join(args.out, "pretrain.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output directory (save_pretrained)")
    ap.add_argument("--data_dir", default=os.path.join(SHARED, "data"),
                    help="the task files (only train splits are read)")
    ap.add_argument("--tokenizer", default=os.path.join(SHARED, "tokenizers", "roberta-opt"),
                    help="directory with OPT's GPT-2 BPE files (vocab.json, merges.txt)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seq_len", type=int, default=128, help="tokens per row = positions trained")
    ap.add_argument("--batch_size", type=int, default=8, help="rows per step")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--print_every", type=int, default=25)
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads; the weights depend on it, so 1 (also the fastest where "
                         "other jobs share the cores) makes them independent of the core count")
    args = ap.parse_args(argv)
    for name in ("layers", "hidden", "heads", "seq_len", "batch_size", "steps", "print_every",
                 "threads"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be at least 1")
    if args.hidden % args.heads:
        ap.error(f"--hidden {args.hidden} must be a multiple of --heads {args.heads}")
    for name in ("data_dir", "tokenizer"):
        if not os.path.isdir(getattr(args, name)):
            ap.error(f"--{name} {getattr(args, name)}: no such directory")
    return args


if __name__ == "__main__":
    s = pretrain(parse_args())
    print(f"saved {s['parameters']:,} parameters to {s['out']} | loss {s['first_loss']:.2f} -> "
          f"{s['last_loss']:.2f} | {s['tokens_seen']:,} tokens in {s['wall_s'] / 60:.1f} min")
