"""Fine-tune a language model with a zeroth-order (or first-order) optimizer: the plain loop.

    python train.py --model facebook/opt-1.3b --opt zo_sgd --task sst2

One step (arXiv:2402.11592 §3, eq. (2)): take a batch, hand the optimizer a closure that returns the
batch loss, and let it update θ. A ZO optimizer calls the closure 2q times on perturbed weights and
never back-propagates; an FO one calls it once and back-propagates. The loop does not know which.

Protocol (paper §4.1, as MeZO): 1000 train / 500 dev examples from one seeded permutation of the
train split, up to 1000 test examples from the validation split; dev accuracy every --eval_every
steps selects the checkpoint (--select best); test accuracy is measured once, at the end, on the
selected weights, and never used for anything else. The model stays in eval mode throughout (no
dropout), so f(θ+μu) and f(θ−μu) are the same function of θ.

Outputs in --output_dir: config.json (the resolved Config), log.jsonl (one line per step: step,
loss, lr, projected_grad, time_s, forward_passes), result.json, and with --save the tuned weights.
Bad input (unknown names, missing or malformed data) stops with one line and exit status 2 before
anything is written.

Not here: estimators (rge.py, forward_grad.py), update rules (optimizers.py), adapters (peft.py),
data, templates and losses (tasks.py), memory readings (memory.py).
"""
import argparse
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM,
                          AutoTokenizer)
from transformers.utils import logging as hf_logging

import memory
import models
import optimizers
import peft
import tasks
import variants


def opt_field(default, help, **kw):
    return field(default=default, metadata=dict(help=help, **kw))


@dataclass
class Config:
    # model
    model: str = opt_field("facebook/opt-1.3b", "hub id or local directory of the model")
    dtype: str = opt_field("fp32", "weight dtype", choices=tuple(models.DTYPES))
    device: str = opt_field(None, "device (default: cuda if available, else cpu)")
    # task
    task: str = opt_field("sst2", "task", choices=tuple(tasks.TASKS))
    data_dir: str = opt_field(None, "directory with the original data files (default: the hub)")
    num_train: int = opt_field(1000, "training examples sampled from the train split")
    num_dev: int = opt_field(None, "dev examples from the train split (default: the task's, 500)")
    num_eval: int = opt_field(1000, "test examples sampled from the validation split")
    no_align: bool = opt_field(False, "bare input + verbalizer instead of the aligned template")
    max_length: int = opt_field(2048, "longest input in tokens (left-truncated)")
    # optimizer
    opt: str = opt_field("zo_sgd", "optimizer", choices=tuple(optimizers.OPTIMIZERS))
    lr: float = opt_field(1e-6, "learning rate η")
    lr_schedule: str = opt_field("constant", "learning-rate schedule",
                                 choices=("constant", "linear"))
    weight_decay: float = opt_field(0.0, "weight decay on tensors with ≥ 2 dims")
    mu: float = opt_field(1e-3, "ZO perturbation radius μ")
    q: int = opt_field(1, "ZO queries (directions) per step")
    momentum: float = opt_field(0.9, "zo_sgd_mmt momentum β")
    beta1: float = opt_field(0.9, "zo_adam / fo_adam first-moment decay β1")
    beta2: float = opt_field(0.999, "zo_adam / fo_adam second-moment decay β2")
    eps: float = opt_field(1e-8, "zo_adam / fo_adam ε")
    no_amsgrad: bool = opt_field(False, "zo_adam as plain Adam, without App. A's max rule")
    sign: str = opt_field("element", "zo_sgd_sign: element-wise sign(ĝ) (§3) or App. A's "
                          "sign(projected gradient)·u", choices=("element", "scalar"))
    amp: bool = opt_field(False, "fo_sgd / fo_adam in mixed precision (fp16 autocast + grad "
                          "scaling on CUDA, bf16 autocast on CPU); keep --dtype fp32")
    batch_size: int = opt_field(16, "training examples per step")
    steps: int = opt_field(20000, "optimizer steps")
    # parameter-efficient fine-tuning
    peft: str = opt_field("ft", "what is trained", choices=peft.METHODS)
    lora_r: int = opt_field(8, "LoRA rank r")
    lora_alpha: float = opt_field(16, "LoRA scale α (the update is (α/r)·BA)")
    lora_targets: str = opt_field(None, "comma-separated LoRA projections (default: q and v)")
    num_prefix: int = opt_field(5, "prefix-tuning tokens per layer")
    num_virtual_tokens: int = opt_field(10, "prompt-tuning virtual tokens")
    # zo variants (paper §5; options of the ZO optimizers, they combine)
    block: bool = opt_field(False, "block-wise ZO: one estimate per block (embeddings, each layer, "
                                   "head), updated in turn (Tab. 6)")
    zo_layers: int = opt_field(None, "hybrid: embeddings and the first K layers by ZO, the rest by "
                                     "back-prop with the FO twin of --opt (Tab. 7)")
    sparsity: float = opt_field(0.0, "sparse ZO: share of direction entries zeroed, per-tensor "
                                     "ratios from one magnitude threshold (Tab. 8; adapters: "
                                     "the same ratio for every tensor)")
    mask_every: int = opt_field(1, "redraw the sparse masks every this many steps")
    # run
    seed: int = opt_field(0, "seed of the optimizer's directions and of batch order")
    data_seed: int = opt_field(0, "seed of the train/dev/test sampling")
    eval_every: int = opt_field(500, "dev evaluation every this many steps (and at the end)")
    eval_batch_size: int = opt_field(8, "examples per evaluation batch")
    select: str = opt_field("best", "weights to test: best dev accuracy or the last step",
                            choices=("best", "last"))
    output_dir: str = opt_field("out", "where config.json, log.jsonl, result.json go")
    save: bool = opt_field(False, "also save the tuned weights (full model or adapter)")


class UserError(Exception):
    """Bad input: reported as one line, exit status 2."""


# ---- set-up -------------------------------------------------------------------------------------

def parse_args(argv=None) -> Config:
    """argparse generated from Config: every field a flag with its help and default."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for f in dataclasses.fields(Config):
        meta = dict(f.metadata)
        if f.type is bool:
            ap.add_argument(f"--{f.name}", action="store_true", help=meta["help"])
        else:
            text = meta["help"] + (f": {', '.join(meta['choices'])}" if "choices" in meta else "")
            text += "" if f.default is None else f" (default: {f.default})"
            ap.add_argument(f"--{f.name}", type=f.type, default=f.default, metavar=f.name.upper(),
                            help=text)
    return check(Config(**vars(ap.parse_args(argv))))


def check(cfg: Config) -> Config:
    """Reject unknown names with the valid choices, before anything runs."""
    for f in dataclasses.fields(Config):
        choices = f.metadata.get("choices")
        if choices and getattr(cfg, f.name) not in choices:
            raise UserError(f"unknown --{f.name} '{getattr(cfg, f.name)}'; "
                            f"choose from: {', '.join(choices)}")
    if cfg.mu <= 0:
        raise UserError(f"--mu must be positive, got {cfg.mu}")
    if cfg.select == "best" and cfg.num_dev == 0:
        raise UserError("--select best picks the weights by dev accuracy; it needs --num_dev > 0")
    for name in ("steps", "batch_size", "q", "eval_every", "eval_batch_size", "mask_every"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(cfg, name)}")
    try:
        variants.check(cfg.opt, **variant(cfg))
    except ValueError as e:
        raise UserError(str(e)) from e
    if cfg.amp and not issubclass(optimizers.OPTIMIZERS[cfg.opt], optimizers.BackProp):
        raise UserError(f"--amp is mixed precision for back-prop (fo_sgd, fo_adam), not {cfg.opt}")
    if cfg.opt == "forward_grad" and cfg.dtype == "fp16":   # layer norm's JVP overflows in fp16
        raise UserError("forward_grad needs --dtype fp32 or bf16 (the paper runs it in fp32)")
    if cfg.data_dir is not None and not os.path.isdir(cfg.data_dir):
        raise UserError(f"--data_dir {cfg.data_dir}: no such directory")
    return cfg


def variant(cfg: Config) -> dict:
    """The §5 options as variants.check and variants.build take them."""
    return dict(block=cfg.block, zo_layers=cfg.zo_layers, sparsity=cfg.sparsity)


def hyperparameters(cfg: Config, name: str) -> dict:
    """The constructor arguments of optimizer `name`, spelled out: a misspelt one is an error."""
    fo = dict(lr=cfg.lr, weight_decay=cfg.weight_decay)
    zo = fo | dict(mu=cfg.mu, q=cfg.q, seed=cfg.seed)
    adam = dict(beta1=cfg.beta1, beta2=cfg.beta2, eps=cfg.eps)
    return {"zo_sgd": zo, "zo_sgd_sign": zo | dict(sign=cfg.sign),
            "zo_sgd_mmt": zo | dict(momentum=cfg.momentum), "zo_sgd_cons": zo,
            "zo_adam": zo | adam | dict(amsgrad=not cfg.no_amsgrad), "forward_grad": zo,
            "fo_sgd": fo | dict(amp=cfg.amp), "fo_adam": fo | adam | dict(amp=cfg.amp)}[name]


def is_masked_lm(cfg: Config) -> bool:
    """Read the model's config only (no weights): True for a masked LM such as RoBERTa."""
    try:
        config = AutoConfig.from_pretrained(cfg.model)
    except (OSError, ValueError) as e:
        raise UserError(f"--model {cfg.model}: cannot load ({str(e).splitlines()[0]})")
    return models.is_masked_lm(config)


def load_model(cfg: Config, device, mlm: bool):
    """Model and tokenizer from a hub id or a local directory, frozen, in eval mode."""
    hf_logging.disable_progress_bar()               # one progress bar on screen: the training one
    auto = AutoModelForMaskedLM if mlm else AutoModelForCausalLM
    kw = {"attn_implementation": "eager"} if cfg.opt == "forward_grad" else {}
    model = auto.from_pretrained(cfg.model, dtype=models.DTYPES[cfg.dtype], **kw).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    if not tokenizer("a", add_special_tokens=False).input_ids:
        raise UserError(f"--model {cfg.model}: its tokenizer encodes text to nothing "
                        "(are the tokenizer files there?)")
    if tokenizer.pad_token_id is None:          # LLaMA/Mistral ship without a pad token
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    model.requires_grad_(False)
    return model, tokenizer


def max_length(cfg: Config, model) -> int:
    """The longest input the model can take, less the positions a prompt or prefix occupies."""
    limit = getattr(model.config, "max_position_embeddings", cfg.max_length)
    if models.is_masked_lm(model.config):
        limit -= 2                               # RoBERTa's positions start after the pad index
    reserved = {"prompt": cfg.num_virtual_tokens, "prefix": cfg.num_prefix}.get(cfg.peft, 0)
    return min(cfg.max_length, limit) - reserved


def lr_at(cfg: Config, step: int) -> float:
    """Constant, or linear decay to 0 over the run."""
    return cfg.lr if cfg.lr_schedule == "constant" else cfg.lr * (1 - step / cfg.steps)


def write_json(path, obj):
    """Write atomically: a reader never sees half a file."""
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(path + ".tmp", path)


# ---- the loop -----------------------------------------------------------------------------------

@dataclass
class Run:
    """What setup() prepared: everything the loop needs, all checked."""
    device: str
    model: torch.nn.Module
    tokenizer: object
    mlm: bool                 # a masked LM (RoBERTa), scored at the mask token
    splits: tuple             # train, dev, test examples
    params: list              # the trainable tensors
    opt: torch.optim.Optimizer
    batches: tasks.Batches    # training batches by step: batches.at(k) for step k + 1
    eval_sets: tuple          # dev and test, encoded once (tasks.EvalSet)
    length: int               # the longest input, in tokens


def train(cfg: Config, run: Run) -> dict:
    """The plain loop; returns the result dict of DESIGN §7."""
    model, opt, params, device = run.model, run.opt, run.params, run.device
    train_set, dev_set, test_set = run.splits

    def evaluate(data):
        return tasks.evaluate(model, data, batch_size=cfg.eval_batch_size)

    best = {"dev_accuracy": -1.0, "step": 0, "weights": None}
    peak, step_times, passes = 0, [], 0
    log = open(os.path.join(cfg.output_dir, "log.jsonl"), "w")
    bar = tqdm(range(1, cfg.steps + 1), desc=f"{cfg.opt} {cfg.task}", dynamic_ncols=True)
    for step in bar:
        batch = tasks.to(run.batches.at(step - 1), device)
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step - 1)
        memory.reset(device)
        start = time.perf_counter()
        loss = opt.step(lambda: tasks.loss(model, batch))
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
        step_times.append(time.perf_counter() - start)
        peak = max(peak, memory.peak_bytes(device))
        passes += opt.forward_passes
        log.write(json.dumps(dict(step=step, loss=loss, lr=opt.param_groups[0]["lr"],
                                  projected_grad=opt.projected_grad, time_s=step_times[-1],
                                  forward_passes=opt.forward_passes)) + "\n")
        bar.set_postfix(loss=f"{loss:.4f}", ms=f"{step_times[-1] * 1e3:.0f}")
        if step % cfg.eval_every == 0 or step == cfg.steps:
            dev = evaluate(run.eval_sets[0])["accuracy"]
            tqdm.write(f"step {step} | dev accuracy {dev:.4f}")
            if dev > best["dev_accuracy"]:
                keep = cfg.select == "best" and step != cfg.steps
                best = {"dev_accuracy": dev, "step": step,
                        "weights": [p.detach().cpu().clone() for p in params] if keep else None}
    log.close()
    if cfg.select == "last":
        best = {"dev_accuracy": dev, "step": cfg.steps, "weights": None}
    if best["weights"] is not None:                   # back to the best dev checkpoint
        with torch.no_grad():
            for p, w in zip(params, best["weights"]):
                p.copy_(w)
    test = evaluate(run.eval_sets[1])
    return dict(dev_accuracy=best["dev_accuracy"], test_accuracy=test["accuracy"],
                test_metrics=test, selected_step=best["step"],
                peak_memory_gb=peak / memory.GIB, step_time_s=sum(step_times) / len(step_times),
                forward_passes=passes, trainable_params=sum(p.numel() for p in params),
                steps=cfg.steps, num_train=len(train_set), num_dev=len(dev_set),
                num_test=len(test_set), device=str(device))


def pick_device(cfg: Config) -> str:
    """--device, or cuda when there is one; a device that is not there is bad input."""
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise UserError(f"--device {device}: not a device (e.g. cpu, cuda, cuda:1)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available here")
    return device


def setup(cfg: Config) -> Run:
    """Everything that can fail on bad input, before anything is written."""
    device = pick_device(cfg)
    try:
        task, mlm = tasks.get(cfg.task), is_masked_lm(cfg)
        splits = tasks.load(task, cfg.data_dir, num_train=cfg.num_train, num_dev=cfg.num_dev,
                            num_eval=cfg.num_eval, seed=cfg.data_seed, align=not cfg.no_align,
                            mlm=mlm)
        model, tokenizer = load_model(cfg, device, mlm)
        length = max_length(cfg, model)
        if length < 2:                     # a candidate needs a token to be scored after another
            raise UserError(f"--max_length leaves {length} token(s) for the input")
        targets = cfg.lora_targets.split(",") if cfg.lora_targets else None
        params = peft.apply(model, cfg.peft, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                            lora_targets=targets, num_prefix=cfg.num_prefix,
                            num_virtual_tokens=cfg.num_virtual_tokens, seed=cfg.seed)
        partner = variants.FO_PARTNER.get(cfg.opt)
        opt = variants.build(cfg.opt, model, params, hyperparameters(cfg, cfg.opt),
                             hyperparameters(cfg, partner) if partner else None, **variant(cfg),
                             mask_every=cfg.mask_every, pretrained=cfg.peft == "ft")
        batches = tasks.batches(tokenizer, task, splits[0], batch_size=cfg.batch_size,
                                seed=cfg.seed, max_length=length, mlm=mlm)
        eval_sets = tuple(tasks.encode_eval(tokenizer, split, max_length=length, mlm=mlm)
                          for split in splits[1:])
        os.makedirs(cfg.output_dir, exist_ok=True)
    except (ValueError, OSError) as e:   # DataError, peft's and the optimizers' checks, files
        raise UserError(str(e).splitlines()[0] if str(e) else type(e).__name__) from e
    return Run(device, model, tokenizer, mlm, splits, params, opt, batches, eval_sets, length)


def main(cfg: Config) -> dict:
    """Set up, train, write the outputs; returns result.json's content."""
    run = setup(cfg)
    total = sum(p.numel() for p in run.model.parameters())
    trainable = sum(p.numel() for p in run.params)
    print(f"{cfg.model} | {cfg.peft} | trainable {trainable:,} of {total:,} parameters "
          f"({100 * trainable / total:.3f}%) | {run.device} {cfg.dtype}")
    write_json(os.path.join(cfg.output_dir, "config.json"), dataclasses.asdict(cfg))
    result = train(cfg, run)
    if cfg.save:
        save_weights(cfg, run.model, run.tokenizer)
    write_json(os.path.join(cfg.output_dir, "result.json"), result)
    print(json.dumps({k: v for k, v in result.items() if k != "test_metrics"}))
    return result


def save_weights(cfg, model, tokenizer):
    """The full model (save_pretrained) for ft, else the adapter in our and in peft's format."""
    path = os.path.join(cfg.output_dir, "model" if cfg.peft == "ft" else "adapter")
    if cfg.peft == "ft":
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    else:
        peft.save(model, path)
        try:                                 # raises before writing where peft has no such method
            peft.export_peft(model, os.path.join(cfg.output_dir, "adapter_peft"), cfg.model)
        except ValueError as e:
            print(f"note: {e}; only our own adapter format was written")


def cli(argv=None):
    """Entry point: bad input is one line on stderr and exit status 2, no traceback."""
    try:
        cfg = parse_args(argv)
        return main(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
