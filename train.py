"""Fine-tune a language model with a zeroth-order (or first-order) optimizer: the plain loop.

    python train.py --model facebook/opt-1.3b --opt zo_sgd --task sst2

One step (arXiv:2402.11592 §3, eq. (2)): take a batch, hand the optimizer a closure that returns the
batch loss, and let it update θ. A ZO optimizer calls the closure 2q times on perturbed weights and
never back-propagates; an FO one calls it once and back-propagates. The loop does not know which.

Protocol (paper §4.1, as MeZO): 1000 train / 500 dev examples from one seeded permutation of the
train split, up to 1000 test examples from the validation split; dev accuracy every --eval_every
steps selects the weights (--select best); test accuracy is measured once, at the end, on the
selected weights, and never used for anything else. The model stays in eval mode throughout (no
dropout), so f(θ+μu) and f(θ−μu) are the same function of θ. The best-dev copy stays on the
device when it fits (CUDA: free memory beside the step's peak), else goes to best.safetensors.

Outputs in --output_dir: config.json (the resolved Config and the hardware), log.jsonl (one line
per step, flushed: step, loss, lr, projected_grad, time_s, forward_passes, and dev_accuracy at an
evaluation), result.json, checkpoint-<step>/ (checkpoint.py), and with --save the tuned weights.
A non-empty --output_dir is refused unless --resume continues it or --overwrite clears it.

Long runs (checkpoint.py): a checkpoint every --checkpoint_every steps, at the end and on the
first Ctrl-C/SIGTERM (the step in flight finishes; exit 130/143; a second signal stops at once).
`--resume OUT` continues bitwise: the same log lines, weights and result as a run never stopped
(time and memory readings aside). It refuses a change of anything that changes the numbers: the
configuration (except --steps, which extends a constant-lr run, --eval_every, --checkpoint_every
and --save) and the machine. Determinism has a limit: CUDA's normal kernel draws u in an order
set by the GPU's SM count, so one seed gives different directions on an A100 and an H200; the
device name, SM count and versions are recorded (config.json, result.json) and checked on resume.

Precision: --dtype auto (the default) is bf16 on CUDA where supported (else fp16) and fp32 on CPU.
Weights load straight onto the device. --amp (FO mixed precision) needs fp32 weights. On CPU,
freed blocks stay with the process for the next step (memory.cache_freed_memory, as CUDA's
caching allocator does): a ZO step's draws then reuse memory rather than fault in fresh pages;
fp32 linears outside autograd run on oneDNN (cpu_linear.py, --cpu_linear), and u is drawn on
every core (rge.gaussian), OpenMP's workers spinning briefly so that they free the cores.

Exit status: 0 done; 2 bad input (one line, before anything is written); 1 a non-finite loss or
update (one line; nothing non-finite is saved; result.json says why), or data-parallel ranks
whose weights differ; 130/143 interrupted.

More than one GPU (distributed.py): `torchrun --nproc_per_node N train.py ...` runs ZO data-parallel
(--batch_size is the global batch; rank 0 writes); --device_map auto splits one model over GPUs.

Not here: estimators (rge.py, forward_grad.py), update rules (optimizers.py), adapters (peft.py),
data, templates and losses (tasks.py), memory readings (memory.py), checkpoints (checkpoint.py),
data parallelism and device maps (distributed.py).
"""
import argparse
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field

# OpenMP workers spin 10^4 times (libgomp's default: 3·10^5) before they sleep, so the threads of
# a CPU draw (rge.gaussian) get the cores right after a matmul; read when torch loads libgomp
os.environ.setdefault("GOMP_SPINCOUNT", "10000")
import torch
from safetensors.torch import load_file
from tqdm import tqdm
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM,
                          AutoTokenizer)
from transformers.utils import logging as hf_logging

import checkpoint
import cpu_linear
import distributed
import memory
import models
import optimizers
import peft
import rge
import tasks
import variants

# what a resumed run may change: none of it changes the numbers of the steps already taken
RESUMABLE = ("steps", "eval_every", "checkpoint_every", "save", "output_dir", "resume",
             "overwrite")
# integer flags that must be at least 1
POSITIVE = ("steps", "batch_size", "q", "eval_every", "eval_batch_size", "mask_every", "lora_r",
            "num_prefix", "num_virtual_tokens", "num_train", "num_dev", "num_eval",
            "checkpoint_every")


def opt_field(default, help, **kw):
    return field(default=default, metadata=dict(help=help, **kw))


@dataclass
class Config:
    # model
    model: str = opt_field("facebook/opt-1.3b", "hub id or local directory of the model")
    dtype: str = opt_field("auto", "weight dtype; auto: bf16 on CUDA where supported (else fp16), "
                           "fp32 on CPU", choices=("auto", *models.DTYPES))
    device: str = opt_field(None, "device (default: cuda if available, else cpu)")
    device_map: str = opt_field(None, "auto: split the model over the visible GPUs (accelerate, "
                                "no offload); for data parallelism use torchrun instead")
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
    sequential: bool = opt_field(False, "ZO: f(θ+μu) and f(θ−μu) in two forwards instead of one "
                                 "over a doubled batch (half the activations, one more draw of u)")
    rounding: str = opt_field("stochastic", "ZO with 16-bit weights: round the update to the "
                              "weight dtype stochastically (unbiased) or to nearest",
                              choices=optimizers.ROUNDINGS)
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
    overwrite: bool = opt_field(False, "clear a non-empty --output_dir first")
    cpu_linear: str = opt_field("onednn", "on the CPU, fp32 linears outside autograd (every ZO "
                                "forward) run on oneDNN or on torch's default (MKL, AVX2 code on "
                                "AMD)", choices=cpu_linear.CHOICES)
    checkpoint_every: int = opt_field(None, "also checkpoint every this many steps (always at "
                                      "the end and on Ctrl-C/SIGTERM)")
    resume: str = opt_field(None, "continue the run in this output directory from its last "
                            "checkpoint; may change only --steps, --eval_every, "
                            "--checkpoint_every and --save")


class UserError(Exception):
    """Bad input: reported as one line, exit status 2."""


class Diverged(Exception):
    """A non-finite loss or update: one line, exit status 1, nothing non-finite saved."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM, after the checkpoint: one line, exit status 128 + the signal."""

    def __init__(self, signum, message):
        super().__init__(message)
        self.signum = signum


# ---- set-up -------------------------------------------------------------------------------------

def parser(defaults=True) -> argparse.ArgumentParser:
    """argparse generated from Config: every field a flag with its help and default. Without
    defaults, parsing yields only the flags given (what a resume may compare)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for f in dataclasses.fields(Config):
        meta = dict(f.metadata)
        default = f.default if defaults else argparse.SUPPRESS
        if f.type is bool:
            ap.add_argument(f"--{f.name}", action="store_true", default=default, help=meta["help"])
        else:
            text = meta["help"] + (f": {', '.join(meta['choices'])}" if "choices" in meta else "")
            text += "" if f.default is None else f" (default: {f.default})"
            ap.add_argument(f"--{f.name}", type=f.type, default=default, metavar=f.name.upper(),
                            help=text)
    return ap


def parse_args(argv=None) -> tuple[Config, set]:
    """The Config of the command line, and the names of the flags it gave."""
    return Config(**vars(parser().parse_args(argv))), set(vars(parser(False).parse_args(argv)))


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


def pick_dtype(cfg: Config, device: str) -> str:
    """--dtype, with auto = bf16 on CUDA where supported, else fp16; fp32 on CPU."""
    if cfg.dtype != "auto":
        return cfg.dtype
    if torch.device(device).type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def check(cfg: Config) -> Config:
    """Reject bad values in one line, before anything runs; return cfg with its device and
    dtype resolved."""
    for f in dataclasses.fields(Config):
        value, choices = getattr(cfg, f.name), f.metadata.get("choices")
        if choices and value not in choices:
            raise UserError(f"unknown --{f.name} '{value}'; choose from: {', '.join(choices)}")
        if f.type is float and value is not None and not math.isfinite(value):
            raise UserError(f"--{f.name} must be a finite number, got {value}")
        if f.name in POSITIVE and value is not None and value < 1:
            raise UserError(f"--{f.name} must be at least 1, got {value}")
    if cfg.mu <= 0:
        raise UserError(f"--mu must be positive, got {cfg.mu}")
    if cfg.lr < 0:
        raise UserError(f"--lr must be at least 0, got {cfg.lr}")
    if cfg.resume and cfg.overwrite:
        raise UserError("--overwrite clears a run; it cannot be combined with --resume")
    device = pick_device(cfg)
    try:
        variants.check(cfg.opt, **variant(cfg))
        distributed.check(cfg.opt, cfg.zo_layers, cfg.device_map, device, cfg.batch_size,
                          cfg.num_train)
    except ValueError as e:
        raise UserError(str(e)) from e
    cfg = dataclasses.replace(cfg, device=device, dtype=pick_dtype(cfg, device))
    if cfg.amp and not issubclass(optimizers.OPTIMIZERS[cfg.opt], optimizers.BackProp):
        raise UserError(f"--amp is mixed precision for back-prop (fo_sgd, fo_adam), not {cfg.opt}")
    if cfg.amp and cfg.dtype != "fp32":
        raise UserError(f"--amp runs 16-bit forwards over fp32 weights; the weights here are "
                        f"{cfg.dtype}: add --dtype fp32")
    if cfg.opt == "forward_grad" and cfg.dtype == "fp16":   # layer norm's JVP overflows in fp16
        raise UserError("forward_grad needs --dtype fp32 or bf16 (the paper runs it in fp32)")
    if cfg.data_dir is not None and not os.path.isdir(cfg.data_dir):
        raise UserError(f"--data_dir {cfg.data_dir}: no such directory")
    local = cfg.model.startswith((".", "/", "~")) or cfg.model.count("/") > 1
    if local and not os.path.isdir(os.path.expanduser(cfg.model)):   # not a hub id: no retries
        raise UserError(f"--model {cfg.model}: no such directory")
    return cfg


def check_output_dir(cfg: Config):
    """A fresh run needs an empty (or new) --output_dir, or --overwrite; it must be writable."""
    out = cfg.output_dir
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--output_dir {out}: exists and is not a directory")
    if os.path.isdir(out) and os.listdir(out):
        if not cfg.overwrite:
            raise UserError(f"--output_dir {out} is not empty; continue its run with --resume "
                            f"{out}, or clear it with --overwrite")
        if not os.path.exists(os.path.join(out, "config.json")):
            raise UserError(f"--overwrite clears a run's output directory; {out} holds no "
                            "config.json, so it is not one")
    if os.path.isdir(out):
        try:
            tempfile.TemporaryFile(dir=out).close()
        except OSError as e:
            raise UserError(f"--output_dir {out}: not writable ({e.strerror})") from None


def resumed(cfg: Config, given: set) -> tuple[Config, str]:
    """The Config of the run in cfg.resume with the flags given here applied, and its newest
    checkpoint; refuses a change that would change the numbers, naming it."""
    out = cfg.resume
    if not os.path.isfile(os.path.join(out, "config.json")):
        raise UserError(f"--resume {out}: no config.json there (not a run's output directory)")
    path = checkpoint.latest(out)
    if path is None:
        raise UserError(f"--resume {out}: no checkpoint there (it stopped before its first)")
    with open(os.path.join(out, "config.json")) as f:
        saved = {k: v for k, v in json.load(f).items() if k in Config.__dataclass_fields__}
    saved.setdefault("cpu_linear", "torch")     # a run from before the flag: torch's kernel
    here = {k: getattr(cfg, k) for k in given} | dict(output_dir=out, resume=out,
                                                      overwrite=cfg.overwrite)
    new = check(Config(**saved | here))
    linear = new.lr_schedule != "constant"           # its lr depends on --steps
    fixed = [k for k in saved if k not in RESUMABLE or k == "steps" and linear]
    changed = [f"--{k} {getattr(new, k)} (the run has {saved[k]})" for k in fixed
               if getattr(new, k) != saved[k]]
    if changed:
        raise UserError(f"--resume {out}: {'; '.join(changed)} would change the numbers; only "
                        "--steps (constant lr), --eval_every, --checkpoint_every and --save may")
    state = checkpoint.read_state(path)
    if new.steps < state["progress"]["step"]:
        raise UserError(f"--steps {new.steps} is before the checkpoint's step "
                        f"{state['progress']['step']}")
    now = checkpoint.fingerprint(new.device)
    moved = [f"{k} {now.get(k)} (the run has {v})" for k, v in state["fingerprint"].items()
             if now.get(k) != v]
    if moved:
        raise UserError(f"--resume {out}: this machine differs: {'; '.join(moved)}; the numbers "
                        "would not be the same")
    return new, path


def variant(cfg: Config) -> dict:
    """The §5 options as variants.check and variants.build take them."""
    return dict(block=cfg.block, zo_layers=cfg.zo_layers, sparsity=cfg.sparsity)


def hyperparameters(cfg: Config, name: str) -> dict:
    """The constructor arguments of optimizer `name`, spelled out: a misspelt one is an error."""
    fo = dict(lr=cfg.lr, weight_decay=cfg.weight_decay)
    zo = fo | dict(mu=cfg.mu, q=cfg.q, seed=cfg.seed, pair=not cfg.sequential,
                   rounding=cfg.rounding)
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
        raise UserError(f"--model {cfg.model}: cannot load ({str(e).splitlines()[0]}); without "
                        "the hub, pass a local directory (save_pretrained's output)") from None
    return models.is_masked_lm(config)


def check_model(model, device):
    """Refuse a model whose forward the ZO hooks cannot see into: f(θ+μu) = f(θ−μu), c = 0,
    and nothing trains. torch.compile bypasses module hooks; accelerate's offload moves weights
    in and out behind its own hooks."""
    if hasattr(model, "_orig_mod"):
        raise UserError("a torch.compile'd model skips the module hooks that perturb its "
                        "weights (rge.py); pass the uncompiled model")
    placed = {str(v) for v in (getattr(model, "hf_device_map", None) or {}).values()}
    off = {"disk"} | ({"cpu"} if torch.device(device).type == "cuda" else set())
    hooked = any(getattr(getattr(m, "_hf_hook", None), "offload", False) for m in model.modules())
    if placed & off or hooked:
        raise UserError("an accelerate-offloaded model (device_map with cpu/disk) moves weights "
                        "behind the ZO hooks; load it whole onto one device")


def load_model(cfg: Config, mlm: bool):
    """Model and tokenizer from a hub id or a local directory, frozen, in eval mode; the weights
    are loaded straight onto the device (no full copy through host memory)."""
    hf_logging.disable_progress_bar()               # one progress bar on screen: the training one
    auto = AutoModelForMaskedLM if mlm else AutoModelForCausalLM
    kw = {"attn_implementation": "eager"} if cfg.opt == "forward_grad" else {}
    model = auto.from_pretrained(cfg.model, dtype=models.DTYPES[cfg.dtype],
                                 device_map=cfg.device_map or {"": cfg.device}, **kw).eval()
    check_model(model, cfg.device)
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
    """The lr of the step after `step` steps: constant, or linear decay, η(1 − step/steps)."""
    return cfg.lr if cfg.lr_schedule == "constant" else cfg.lr * (1 - step / cfg.steps)


def jsonable(obj):
    """obj with every NaN/inf float as None: strict JSON, which any reader parses."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj


def write_json(path, obj):
    """Write atomically: a reader never sees half a file."""
    with open(path + ".tmp", "w") as f:
        json.dump(jsonable(obj), f, indent=2, allow_nan=False)
    os.replace(path + ".tmp", path)


# ---- the loop -----------------------------------------------------------------------------------

@dataclass
class Run:
    """What setup() prepared: everything the loop needs, all checked."""
    model: torch.nn.Module
    tokenizer: object
    splits: tuple             # train, dev, test examples
    params: list              # the trainable tensors
    names: list               # their names in the model (safetensors keys)
    opt: torch.optim.Optimizer
    batches: tasks.Batches    # training batches by step: batches.at(k) for step k + 1
    eval_sets: tuple          # dev and test, encoded once (tasks.EvalSet)


@dataclass
class Progress:
    """Where a run stands after `step` steps: all the loop carries besides weights and
    optimizer state (a checkpoint's state.json)."""
    step: int = 0
    best_dev: float = -1.0       # best dev accuracy so far, at best_step
    best_step: int = 0
    last_dev: float = -1.0       # the latest dev accuracy
    forward_passes: int = 0
    seconds: float = 0.0         # summed step times
    peak: dict = field(default_factory=dict)   # device -> reading -> bytes (memory.py)
    log_bytes: int = 0           # log.jsonl's length at this step


def parts(opt) -> list:
    """The torch optimizers inside `opt` (the hybrid holds two)."""
    return [opt.zo, opt.fo] if isinstance(opt, variants.Hybrid) else [opt]


def finite(params) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in params)


def fits_on_device(device, nbytes) -> bool:
    """Can a copy of nbytes stay on the device? CPU: yes (host memory). CUDA: if it fits in the
    free memory (the driver's and the allocator's cache) beside the step's dynamic peak."""
    if not memory.is_cuda(device):
        return True
    free = torch.cuda.mem_get_info(device)[0]
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    dynamic = torch.cuda.max_memory_allocated(device) - torch.cuda.memory_allocated(device)
    return nbytes + dynamic <= 0.95 * (free + cached)


def best_on_device(cfg: Config, nbytes) -> bool:
    """Does a best-dev copy of nbytes stay on the device (adapters always), or go to a file?"""
    return cfg.peft != "ft" or fits_on_device(cfg.device, nbytes)


def best_file(cfg: Config) -> str:
    """The best-dev copy's file in the output directory, when it does not stay on the device."""
    return os.path.join(cfg.output_dir, distributed.per_rank(checkpoint.BEST))


def copy_best(cfg: Config, run: Run):
    """The current weights as the best-dev copy: tensors on the device when they fit (adapters
    always), else best.safetensors in the output directory (its path)."""
    if best_on_device(cfg, sum(p.nbytes for p in run.params)):
        return [p.detach().clone() for p in run.params]
    path = best_file(cfg)
    checkpoint.write_tensors(dict(zip(run.names, run.params)), path)
    return path


@torch.no_grad()
def load_weights(run: Run, weights):
    """Copy weights (a list in run.params' order, or name -> tensor, or a safetensors path)
    into the trainable tensors."""
    if isinstance(weights, str):
        weights = load_file(weights, device=str(run.params[0].device))
    if isinstance(weights, dict):
        weights = [weights[n] for n in run.names]
    for p, w in zip(run.params, weights):
        p.copy_(w)


def save_checkpoint(cfg, run, progress, best, log) -> str:
    """checkpoint.save of the run after progress.step steps, the log flushed to disk first."""
    log.flush()
    os.fsync(log.fileno())
    progress.log_bytes = log.tell()
    if not finite(run.params):
        raise Diverged(f"step {progress.step}: the weights hold NaN/inf; no checkpoint written")
    state = dict(progress=dataclasses.asdict(progress), config=dataclasses.asdict(cfg),
                 fingerprint=checkpoint.fingerprint(cfg.device))
    best = dict(zip(run.names, best)) if isinstance(best, list) else best
    return checkpoint.save(cfg.output_dir, progress.step, state,
                           dict(zip(run.names, run.params)), best, parts(run.opt))


def restore(cfg: Config, run: Run, path: str):
    """Progress and best-dev copy from checkpoint `path`, its weights and optimizer state loaded,
    log.jsonl cut back to the checkpoint's step."""
    weights, saved_best = checkpoint.load(path, parts(run.opt), cfg.device)
    load_weights(run, weights)
    del weights
    progress = Progress(**checkpoint.read_state(path)["progress"])
    with open(os.path.join(cfg.output_dir, "log.jsonl"), "r+b") as f:
        f.truncate(progress.log_bytes)          # lines written after the checkpoint
    best = None
    if saved_best is not None:
        if best_on_device(cfg, os.path.getsize(saved_best)):
            saved = load_file(saved_best, device=str(cfg.device))
            best = [saved[n] for n in run.names]
        else:
            best = best_file(cfg)
            shutil.copyfile(saved_best, best + ".tmp")
            os.replace(best + ".tmp", best)
    elif cfg.select == "best" and progress.best_step == progress.step < cfg.steps:
        best = copy_best(cfg, run)        # the run ended at its best step and is extended
    return progress, best


def train(cfg: Config, run: Run, progress: Progress, best) -> dict:
    """The plain loop from progress.step to cfg.steps; returns the result dict of DESIGN §7."""
    model, opt, params, device = run.model, run.opt, run.params, cfg.device
    devices, world = memory.devices(model), distributed.world()
    kernel = cpu_linear.kernel_for(model, device, cfg.cpu_linear)

    def evaluate(data):
        distributed.check_replicas(params, world, f"step {progress.step}")
        with cpu_linear.route(kernel):
            return distributed.evaluate(model, data, world, cfg.eval_batch_size)

    def read_peak():
        for d, reading in memory.peaks(devices).items():
            mine = progress.peak.setdefault(d, {})
            for k, v in reading.items():
                mine[k] = max(mine.get(k, 0), v)

    stop = []                            # the signal that asked to stop, if any

    def on_signal(signum, frame):
        if stop:                         # the second one: stop now, without a checkpoint
            raise KeyboardInterrupt
        stop.append(signum)

    handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    log = open(os.path.join(cfg.output_dir, "log.jsonl") if world.main else os.devnull, "a")
    bar = tqdm(range(progress.step + 1, cfg.steps + 1), initial=progress.step, total=cfg.steps,
               desc=f"{cfg.opt} {cfg.task}", dynamic_ncols=True, disable=not world.main)
    distributed.check_replicas(params, world, f"step {progress.step}")
    memory.reset_peaks(devices)          # the peak of training steps, read before evaluations
    try:
        for step in bar:
            batch = tasks.to(run.batches.at(step - 1), device)
            for group in opt.param_groups:
                group["lr"] = lr_at(cfg, step - 1)
            start = time.perf_counter()
            try:
                loss = opt.step(cpu_linear.routed(distributed.closure(model, batch, world),
                                                  kernel))
            except FloatingPointError as e:         # rge: a non-finite loss at θ ± μu
                raise Diverged(f"step {step}: {e}") from None
            except (rge.PairError, rge.Unreached) as e:     # the model does not fit the method
                raise UserError(str(e)) from None
            if memory.is_cuda(device):
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - start
            if not math.isfinite(loss):
                raise Diverged(f"step {step}: the loss is {loss}")
            progress.step, progress.seconds = step, progress.seconds + seconds
            progress.forward_passes += opt.forward_passes
            line = dict(step=step, loss=loss, lr=opt.param_groups[0]["lr"],
                        projected_grad=opt.projected_grad, time_s=seconds,
                        forward_passes=opt.forward_passes,
                        moved_fraction=getattr(opt, "moved_fraction", None))
            bar.set_postfix(loss=f"{loss:.4f}", ms=f"{seconds * 1e3:.0f}")
            if step % cfg.eval_every == 0 or step == cfg.steps:
                read_peak()
                if not finite(params):
                    raise Diverged(f"step {step}: the weights hold NaN/inf")
                progress.last_dev = line["dev_accuracy"] = evaluate(run.eval_sets[0])["accuracy"]
                if world.main:
                    tqdm.write(f"step {step} | dev accuracy {progress.last_dev:.4f}")
                if progress.last_dev > progress.best_dev:
                    progress.best_dev, progress.best_step = progress.last_dev, step
                    if cfg.select == "best":
                        best = None                     # free the old copy first
                        best = copy_best(cfg, run) if step != cfg.steps else None
                memory.reset_peaks(devices)
            log.write(json.dumps(jsonable(line), allow_nan=False) + "\n")
            log.flush()
            every = cfg.checkpoint_every and step % cfg.checkpoint_every == 0
            distributed.stop_together(stop, world)
            if every or step == cfg.steps or stop:
                path = save_checkpoint(cfg, run, progress, best, log) if world.main else None
            if stop:
                bar.close()
                raise Interrupted(stop[0], f"interrupted by {signal.Signals(stop[0]).name} after "
                                  f"step {step}; checkpoint in {path}; continue with "
                                  f"python train.py --resume {cfg.output_dir}")
        read_peak()
    finally:
        bar.close()
        log.close()
        for s, h in handlers.items():
            signal.signal(s, h)
    if cfg.select == "last":
        progress.best_dev, progress.best_step = progress.last_dev, cfg.steps
    elif best is not None:                            # back to the best dev weights
        load_weights(run, best)
    test = evaluate(run.eval_sets[1])
    peak = {d: {k: v / memory.GIB for k, v in r.items()} for d, r in progress.peak.items()}
    return dict(dev_accuracy=progress.best_dev, test_accuracy=test["accuracy"],
                test_metrics=test, selected_step=progress.best_step,
                peak_memory_gb=max(max(r.values()) for r in peak.values()), peak_memory=peak,
                step_time_s=progress.seconds / cfg.steps, forward_passes=progress.forward_passes,
                trainable_params=sum(p.numel() for p in params), steps=cfg.steps,
                num_train=len(run.splits[0]), num_dev=len(run.splits[1]),
                num_test=len(run.splits[2]), device=cfg.device, dtype=cfg.dtype,
                hardware=checkpoint.fingerprint(cfg.device), world_size=world.size)


def setup(cfg: Config) -> Run:
    """Everything that can fail on bad input, before anything is written; then the output
    directory is made (or cleared, with --overwrite)."""
    try:
        task, mlm = tasks.get(cfg.task), is_masked_lm(cfg)
        splits = tasks.load(task, cfg.data_dir, num_train=cfg.num_train, num_dev=cfg.num_dev,
                            num_eval=cfg.num_eval, seed=cfg.data_seed, align=not cfg.no_align,
                            mlm=mlm)
        model, tokenizer = load_model(cfg, mlm)
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
        if distributed.world().main:                 # ranks > 0 write nothing here
            if cfg.overwrite:
                shutil.rmtree(cfg.output_dir)
            os.makedirs(cfg.output_dir, exist_ok=True)
    except (ValueError, OSError) as e:   # DataError, peft's and the optimizers' checks, files
        raise UserError(str(e).splitlines()[0] if str(e) else type(e).__name__) from e
    names = {id(p): n for n, p in model.named_parameters()}
    return Run(model, tokenizer, splits, params, [names[id(p)] for p in params], opt, batches,
               eval_sets)


def main(cfg: Config, given=()) -> dict:
    """Check, set up (or restore), train, write the outputs (under torchrun: rank 0 writes);
    returns result.json's content."""
    world = distributed.world()
    if cfg.resume:
        cfg, path = resumed(cfg, given)
    else:
        cfg, path = check(cfg), None
        if world.main:
            check_output_dir(cfg)
    if torch.device(cfg.device).type == "cpu":
        memory.cache_freed_memory()      # no fresh pages faulted in for every step's draws
    run = setup(cfg)
    total = sum(p.numel() for p in run.model.parameters())
    trainable = sum(p.numel() for p in run.params)
    distributed.say(f"{cfg.model} | {cfg.peft} | trainable {trainable:,} of {total:,} parameters "
                    f"({100 * trainable / total:.3f}%) | {cfg.device} {cfg.dtype} | "
                    f"{world.size} rank(s)")
    if world.main:
        write_json(os.path.join(cfg.output_dir, "config.json"), dataclasses.asdict(cfg) | dict(
            hardware=checkpoint.fingerprint(cfg.device), world_size=world.size))
    progress, best = restore(cfg, run, path) if path else (Progress(), None)
    try:
        result = train(cfg, run, progress, best)
    except Diverged as e:
        if world.main:
            write_json(os.path.join(cfg.output_dir, "result.json"),
                       dict(error=f"diverged: {e}", step=progress.step, test_accuracy=None,
                            dev_accuracy=None))
        raise
    if not world.main:
        return result
    if cfg.save:
        if not finite(run.params):
            raise Diverged(f"step {cfg.steps}: the selected weights hold NaN/inf")
        save_weights(cfg, run.model, run.tokenizer)
    write_json(os.path.join(cfg.output_dir, "result.json"), result)
    print(json.dumps(jsonable({k: v for k, v in result.items() if k != "test_metrics"})))
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
    """Entry point: bad input is one line on stderr and exit status 2, no traceback; a
    divergence exits 1, an interruption 128 + the signal."""
    try:
        with distributed.session():          # under torchrun: join its process group
            return main(*parse_args(argv))
    except UserError as e:
        distributed.say(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Diverged as e:
        distributed.say(f"error: diverged at {e}; nothing non-finite was saved (try a lower "
                        "--lr)", file=sys.stderr)
        sys.exit(1)
    except distributed.Mismatch as e:
        distributed.say(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except Interrupted as e:
        distributed.say(e, file=sys.stderr)
        sys.exit(128 + e.signum)
    except KeyboardInterrupt:
        distributed.say("interrupted (nothing written since the last checkpoint, if any)",
                        file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    cli()
