"""Checkpoints: a run's whole state on disk, written atomically, resumed bitwise.

A run is a deterministic function of its configuration and the machine it runs on, so stopping at
step s and continuing must give the very bits an uninterrupted run gives. That holds when the
checkpoint holds *everything* step s+1 reads:

    θ_s          the trainable tensors (all weights, or the adapter's)       weights.safetensors
    state_s      each optimizer's torch state_dict: per-tensor state (moments), the param groups
                 (lr, the sparse masks' seeds and ages, ...) and every torch.Generator the
                 optimizer owns (the ZO seed stream that draws u's seeds)   optimizer-<i>.pt
    the data     nothing: batch k is a function of (seed, k) (tasks.Batches.at)
    the lr       nothing: lr_at(step) is a function of the step and the configuration
    the record   the step, the best dev accuracy, its step and its weights   state.json,
                 forward passes and seconds so far, log.jsonl's length      best.safetensors
    the machine  torch/transformers versions, the device (CUDA: name and SM count; the normal
                 kernel's output depends on the SM count), CPU threads       state.json

Atomic: a checkpoint is written into a temporary directory, every file is fsync'ed, and the
directory is renamed to `checkpoint-<step>` (a rename is atomic on POSIX), then the directory
holding it is fsync'ed; only then are older checkpoints removed. A crash at any moment leaves
the previous complete checkpoint, and at worst a `.tmp-*` directory that the next save clears.

torch's Optimizer.load_state_dict casts floating state to the weight's dtype; the ZO optimizers
keep fp32 moments beside 16-bit weights, so `load` puts back the saved dtypes afterwards.
Not here: when to save, what may change on resume (train.py).
"""
import json
import os
import platform
import shutil
import tempfile

import torch
import transformers
from safetensors.torch import load_file, save_file

import rge

PREFIX = "checkpoint-"
STATE, WEIGHTS, BEST = "state.json", "weights.safetensors", "best.safetensors"


def fingerprint(device) -> dict:
    """What the numbers of a run depend on besides its configuration."""
    device = torch.device(device)
    info = dict(torch=torch.__version__, transformers=transformers.__version__,
                cuda=torch.version.cuda, device_type=device.type, world_size=1)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device_name=props.name, sm_count=props.multi_processor_count)
    else:       # u's CPU draw is cut in chunks of rge.CHUNK entries, each its own generator
        info.update(device_name=_cpu_name(), threads=torch.get_num_threads(), u_chunk=rge.CHUNK)
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _host(tensors: dict) -> dict:
    return {k: t.detach().to("cpu").contiguous() for k, t in tensors.items()}


def write_tensors(tensors: dict, path: str):
    """safetensors file written atomically (temporary name, fsync, rename)."""
    save_file(_host(tensors), path + ".tmp")
    _fsync(path + ".tmp")
    os.replace(path + ".tmp", path)


def latest(out_dir) -> str | None:
    """The newest complete checkpoint in out_dir, or None."""
    steps = [int(n[len(PREFIX):]) for n in os.listdir(out_dir)
             if n.startswith(PREFIX) and n[len(PREFIX):].isdigit()]
    return os.path.join(out_dir, f"{PREFIX}{max(steps)}") if steps else None


def optimizer_state(opt) -> dict:
    """torch's state_dict, plus the optimizer's own generators and gradient scaler, if any."""
    extra = vars(opt).items()
    return dict(state_dict=opt.state_dict(),
                generators={k: g.get_state() for k, g in extra if isinstance(g, torch.Generator)},
                scalers={k: s.state_dict() for k, s in extra
                         if isinstance(s, torch.amp.GradScaler) and s.is_enabled()})


def load_optimizer_state(opt, saved: dict):
    opt.load_state_dict(saved["state_dict"])
    params = [p for group in opt.param_groups for p in group["params"]]
    for i, state in saved["state_dict"]["state"].items():   # back to the saved dtypes
        live = opt.state[params[i]]
        for k, v in state.items():
            if torch.is_tensor(v):
                live[k] = v.to(live[k].device)
    for k, g in saved["generators"].items():
        getattr(opt, k).set_state(g)
    for k, s in saved["scalers"].items():
        getattr(opt, k).load_state_dict(s)


def save(out_dir, step: int, state: dict, weights: dict, best, optimizers: list) -> str:
    """Write checkpoint-<step>: `weights` (name -> tensor), `best` (the best-dev
    weights: name -> tensor, the path of a safetensors file, or None), the optimizers' states
    and `state` (JSON). Older checkpoints are removed once it is complete; returns its path."""
    for old in os.listdir(out_dir):                 # a save that a crash cut short
        if old.startswith(".tmp-" + PREFIX):
            shutil.rmtree(os.path.join(out_dir, old), ignore_errors=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-" + PREFIX, dir=out_dir)
    save_file(_host(weights), os.path.join(tmp, WEIGHTS))
    if isinstance(best, str):                       # a file that is replaced, never rewritten
        try:
            os.link(best, os.path.join(tmp, BEST))
        except OSError:
            shutil.copyfile(best, os.path.join(tmp, BEST))
    elif best is not None:
        save_file(_host(best), os.path.join(tmp, BEST))
    for i, opt in enumerate(optimizers):
        torch.save(optimizer_state(opt), os.path.join(tmp, f"optimizer-{i}.pt"))
    with open(os.path.join(tmp, STATE), "w") as f:
        json.dump(state, f, indent=1)
    for name in os.listdir(tmp):
        _fsync(os.path.join(tmp, name))
    path = os.path.join(out_dir, f"{PREFIX}{step}")
    if os.path.exists(path):                        # the same step saved again (e.g. the end)
        shutil.rmtree(path)
    os.rename(tmp, path)
    _fsync(out_dir)
    for old in os.listdir(out_dir):
        if old.startswith(PREFIX) and os.path.join(out_dir, old) != path:
            shutil.rmtree(os.path.join(out_dir, old))
    return path


def read_state(path) -> dict:
    with open(os.path.join(path, STATE)) as f:
        return json.load(f)


def load(path, optimizers: list, device) -> tuple[dict, str | None]:
    """Restore the optimizers from checkpoint `path`; return its weights (name -> tensor on
    `device`) and the path of its best-dev weights (None if it has none)."""
    for i, opt in enumerate(optimizers):
        saved = torch.load(os.path.join(path, f"optimizer-{i}.pt"), map_location="cpu",
                           weights_only=True)
        load_optimizer_state(opt, saved)
    best = os.path.join(path, BEST)
    return (load_file(os.path.join(path, WEIGHTS), device=str(device)),
            best if os.path.exists(best) else None)
