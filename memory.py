"""Peak memory and step time: readings that mean the same thing on a GPU and on a laptop CPU.

On CUDA the allocator keeps exact statistics: `torch.cuda.reset_peak_memory_stats(device)` starts a
phase and `torch.cuda.max_memory_allocated(device)` reads its peak (tensors only, per device).
On CPU the closest reading is the process's resident set: Linux keeps its high-water mark VmHWM
in /proc/self/status, and writing "5" to /proc/self/clear_refs resets it to the current resident
size, so a phase's peak excludes everything before it (model loading, in particular). Elsewhere we
fall back to ru_maxrss, a peak since process start.

    python memory.py --model opt-125m --opt zo_sgd --batch_size 4 --seq_len 128

builds the model from its configuration with random weights (no download; weights do not change
memory or time), and prints the peak memory and time of one inference forward next to one step of
the optimizer on the same synthetic batch (LM loss on every token, as the paper's App. C setup).

References: Zhang et al. 2024, arXiv:2402.11592, §4.3 and App. C (memory model, Tab. 4, 5).
Not here: the optimizers (optimizers.py); the training loop (train.py).
"""
import argparse
import os
import resource
import sys
import time

import torch

GIB = 2**30
CLEAR_REFS, STATUS = "/proc/self/clear_refs", "/proc/self/status"


# ---- readings -----------------------------------------------------------------------------------

def _is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def _status_kib(field):
    with open(STATUS) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def reset(device="cpu"):
    """Start a phase: the next `peak_bytes` reports the peak from now on."""
    if _is_cuda(device):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    elif os.path.exists(CLEAR_REFS):
        with open(CLEAR_REFS, "w") as f:
            f.write("5")


def peak_bytes(device="cpu") -> int:
    """Peak since the last `reset`: allocated tensor bytes on CUDA, resident bytes on CPU."""
    if _is_cuda(device):
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    if os.path.exists(STATUS):
        return _status_kib("VmHWM") * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_bytes(device="cpu") -> int:
    """What is held now: allocated tensor bytes on CUDA, resident bytes on CPU."""
    if _is_cuda(device):
        return torch.cuda.memory_allocated(device)
    return _status_kib("VmRSS") * 1024 if os.path.exists(STATUS) else peak_bytes(device)


def measure(fn, device="cpu"):
    """Run fn() as one phase; return (its result, peak bytes, seconds)."""
    reset(device)
    start = time.perf_counter()
    result = fn()
    if _is_cuda(device):
        torch.cuda.synchronize(device)
    return result, peak_bytes(device), time.perf_counter() - start


# ---- the model zoo: the paper's configurations, random weights ---------------------------------

OPT_SHAPES = {  # name: (hidden, layers, heads, ffn), from the released OPT configs
    "opt-125m": (768, 12, 12, 3072), "opt-350m": (1024, 24, 16, 4096),
    "opt-1.3b": (2048, 24, 32, 8192), "opt-2.7b": (2560, 32, 32, 10240),
    "opt-6.7b": (4096, 32, 32, 16384), "opt-13b": (5120, 40, 40, 20480),
}


def build_model(name, dtype=torch.float32):
    """A randomly initialised model of a paper configuration, or of a local config directory."""
    from transformers import AutoConfig, AutoModelForCausalLM, OPTConfig
    if name in OPT_SHAPES:
        hidden, layers, heads, ffn = OPT_SHAPES[name]
        config = OPTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                           ffn_dim=ffn, word_embed_proj_dim=hidden, vocab_size=50272,
                           max_position_embeddings=2048)
    else:
        config = AutoConfig.from_pretrained(name)
    return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


# ---- the benchmark ------------------------------------------------------------------------------

def compare(model, opt, batch, device):
    """Peak memory and time of one inference forward, then of optimizer steps, on `batch`."""
    def loss():
        return model(input_ids=batch, labels=batch).loss.float()

    with torch.no_grad():
        loss()                                                     # warm-up
        _, fwd_peak, fwd_s = measure(loss, device)
    opt.step(loss)                                                 # warm-up (allocates state)
    _, step_peak, step_s = measure(lambda: opt.step(loss), device)
    return fwd_peak, fwd_s, step_peak, step_s


def main(argv=None):
    import optimizers
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="opt-125m",
                    help=f"one of {', '.join(OPT_SHAPES)} or a local config directory")
    ap.add_argument("--opt", default="zo_sgd", help=f"one of {', '.join(optimizers.OPTIMIZERS)}")
    ap.add_argument("--batch_size", type=int, default=4, help="sequences per batch")
    ap.add_argument("--seq_len", type=int, default=128, help="tokens per sequence")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    if args.opt not in optimizers.OPTIMIZERS:
        sys.exit(f"error: unknown --opt '{args.opt}'; choose from: "
                 f"{', '.join(optimizers.OPTIMIZERS)}")
    torch.manual_seed(0)
    model = build_model(args.model).to(args.device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = optimizers.build(args.opt, params, lr=0.0)
    batch = torch.randint(4, 50000, (args.batch_size, args.seq_len), device=args.device)
    base = current_bytes(args.device)
    fwd_peak, fwd_s, step_peak, step_s = compare(model, opt, batch, args.device)
    hw = torch.cuda.get_device_name(args.device) if _is_cuda(args.device) else "cpu"
    print(f"{args.model} | {args.opt} | batch {args.batch_size}x{args.seq_len} | {hw} "
          f"({torch.get_num_threads()} threads) | held before: {base / GIB:.2f} GiB")
    print(f"inference forward: peak {fwd_peak / GIB:.3f} GiB | {fwd_s * 1e3:.0f} ms")
    print(f"{args.opt} step: peak {step_peak / GIB:.3f} GiB | {step_s * 1e3:.0f} ms "
          f"({opt.forward_passes} forwards) | ratio to forward: memory "
          f"{step_peak / fwd_peak:.2f}x, time {step_s / fwd_s:.2f}x")


if __name__ == "__main__":
    main()
