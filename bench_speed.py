"""Speed benchmark: a ZO-SGD step beside its floor and beside a MeZO-style step, in one process.

    python bench_speed.py --model opt-125m --variants full,lora --reps 3
    python bench_speed.py --model opt-125m --variants block --reps 1 --out results/speed

What a ZO step costs. ZO-SGD (arXiv:2402.11592 §3, eq. (1)–(2)) evaluates f(θ + μu) and f(θ − μu)
and writes θ − η d u. Its work is two forwards of the batch and Gaussian draws over the trainable
tensors, so with T_f = one inference forward of the same loss and T_u = one draw of u over all
trainable tensors, the floor of a step is

    floor = 2·T_f + 2·T_u        (one draw for the pair, one for the update)

This project draws u once per query for both signs (the paired forward: the batch doubled, its
first half seeing θ + μu and its second θ − μu, see rge.py) and once for the update; a tied
embedding/LM head is perturbed once per forward; d is folded into the update's step size.
A MeZO-style step (written here from the description of MeZO, arXiv:2305.17333 Alg. 1, and of
the released code: a global `torch.manual_seed(s)` and `torch.normal` per tensor, in-place
θ += μz, θ −= 2μz, θ += μz around two forwards, a fourth draw for the update, the loss from
full-vocabulary logits of every position, no hooks) draws u four times and adds it four times.
(MeZO's code rebinds p.data = p.data + s·z·μ out of place; the in-place add used here is faster,
so the reference is, if anything, favoured.)

Measured per model and variant, interleaved (each repetition runs every measurement once, in
turn, so a slow change in the machine's load hits all of them alike), in wall time and in the
process's CPU time (all threads; on a shared machine the steadier clock, since time spent
waiting for a core is not counted, but it also counts OpenMP workers spinning between
operations). Times are reported as medians; each ratio is formed within a repetition and its
median over the repetitions reported, with every repetition's value in the JSON:
  T_f         one forward of the step's loss (no_grad): the transformer on all B×T tokens, the LM
              head on the last position only, log-softmax in fp32 (train.py's work)
  T_f_full    one forward with full-vocabulary logits (the MeZO-style loss)
  T_u         rge.direction over every trainable tensor
  T_add       θ + μu over every trainable tensor, into a new buffer (the cost of one perturbed
              copy; the floor counts none, this step makes three: θ + μu, θ − μu, the update)
  T_upd       the step's update alone: u drawn again and written by the optimizer's `write`
              with a zero step (same passes, weights unchanged); for 16-bit weights it includes
              the configured rounding, so T_upd − T_u is what the write costs beyond the draw
  zo_pair     this project's ZO-SGD step, paired forward (the default)
  zo_seq      the same step with pair=False: two forwards, u drawn three times
  mezo        the MeZO-style step
and the ratios mezo / zo_pair (speed-up, target ≥ 1.6) and zo_pair / floor (target ≤ 1.1). The
variants: full fine-tuning; block-wise ZO (§5, Tab. 6: p blocks, one estimate each, floor
2p·T_f + 2·T_u; the MeZO-style reference perturbs block by block); LoRA (§4, r 8 on q and v).
Weights are random (models.CONFIGS shapes, fp32), token ids random: speed does not depend on them.
On CPU the process keeps freed blocks for reuse, as train.py does (memory.cache_freed_memory;
`--malloc default` measures glibc's default, which maps every block above 32 MiB afresh).

References: Zhang et al. 2024, arXiv:2402.11592, §3, §5, Tab. 4; Malladi et al. 2023, MeZO,
arXiv:2305.17333. Not here: memory (bench_memory.py); what the step does (rge.py, optimizers.py).
"""
import argparse
import json
import os
import platform
import statistics
import time

# OpenMP workers spin 10^4 times (libgomp's default: 3·10^5) before they sleep, so the threads of
# a CPU draw (rge.gaussian) get the cores right after a matmul; read when torch loads libgomp
os.environ.setdefault("GOMP_SPINCOUNT", "10000")
import torch

import checkpoint
import cpu_linear
import memory
import models
import optimizers
import peft
import rge
import variants

MEASURES = ("T_f", "T_f_full", "T_u", "T_add", "T_upd", "zo_pair", "zo_seq", "mezo")


# ---- the two losses ------------------------------------------------------------------------------

def task_loss(model, ids):
    """The step's loss, train.py's work for a one-token answer at the last position, fp32.
    pair=True doubles the batch and returns [f(first half), f(second half)] (rge.estimate)."""
    n = len(ids)

    def loss(pair=False):
        x = torch.cat([ids, ids]) if pair else ids
        h = model.base_model(input_ids=x, use_cache=False).last_hidden_state[:, -1]
        nll = -model.lm_head(h).float().log_softmax(-1).gather(1, x[:, :1]).squeeze(1)
        return torch.stack([nll[:n].mean(), nll[n:].mean()]) if pair else nll.mean()
    return loss


def full_logits_loss(model, ids):
    """MeZO's loss: the LM's cross-entropy from the logits of every position, B×T×V."""
    return lambda: model(input_ids=ids, labels=ids, use_cache=False).loss


# ---- the MeZO-style reference step ---------------------------------------------------------------

def mezo_perturb(params, seed, scale):
    """θ += scale·z for every tensor, z redrawn from the global RNG seeded with `seed`."""
    torch.manual_seed(seed)
    for p in params:
        z = torch.normal(0.0, 1.0, size=p.shape, device=p.device, dtype=p.dtype)
        p.add_(z, alpha=scale)


@torch.no_grad()
def mezo_step(loss, blocks, seed, mu, lr):
    """One MeZO-style ZO-SGD step, block by block (one block: full fine-tuning)."""
    for b, params in enumerate(blocks):
        s = seed + b
        mezo_perturb(params, s, mu)
        f_plus = float(loss())
        mezo_perturb(params, s, -2 * mu)
        f_minus = float(loss())
        mezo_perturb(params, s, mu)
        mezo_perturb(params, s, -lr * (f_plus - f_minus) / (2 * mu))       # the fourth draw


# ---- one configuration -------------------------------------------------------------------------

def timed(fn, device) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all threads) of fn(); on CUDA the wall time
    runs until the GPU has finished."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else lambda: None
    sync()
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    sync()
    return time.perf_counter() - wall, time.process_time() - cpu


def build(name, variant, seed, dtype=torch.float32, device="cpu"):
    """The model of shape `name` with random weights, its trainable tensors and their blocks."""
    torch.manual_seed(seed)
    model = models.from_config(models.config(name), dtype, device)
    params = peft.apply(model, "lora" if variant == "lora" else "ft")
    if variant == "block":
        blocks = [ps for _, ps in variants.blocks(model, params)]
    else:
        blocks = [params]
    return model, params, blocks


def measure(name, variant, *, batch_size, seq_len, reps, lr=1e-6, mu=1e-3, seed=0,
            dtype=torch.float32, device="cpu", rounding="stochastic", kernel="onednn") -> dict:
    """Median seconds of every measurement over `reps` interleaved repetitions, and the ratios.
    `rounding`: how this project's step writes 16-bit weights (fp32 weights: a plain add).
    `kernel`: cpu_linear's, for every forward (both losses), where train.py would route them."""
    model, params, blocks = build(name, variant, seed, dtype, device)
    ids = torch.randint(3, model.config.vocab_size, (batch_size, seq_len),
                        generator=torch.Generator().manual_seed(seed)).to(device)
    kernel = cpu_linear.kernel_for(model, device, kernel)
    loss, full = (cpu_linear.routed(f(model, ids), kernel) for f in (task_loss, full_logits_loss))
    hp = dict(lr=lr, mu=mu, seed=seed, rounding=rounding)
    steppers = {pair: variants.build("zo_sgd", model, params, hp | dict(pair=pair),
                                     block=variant == "block") for pair in (True, False)}
    noise = [torch.randn_like(p) for p in params]   # a second copy of the weights, for T_add
    for opt in steppers.values():                  # learn the tied tensor; warm the allocator
        opt.step(loss)
    @torch.no_grad()
    def each(make):
        """make(i, p, u) for every tensor, each result dropped before the next is made, as a
        step drops each tensor's u (holding them all would fault in fresh memory every time)."""
        for i, (p, u) in enumerate(zip(params, noise)):
            make(i, p, u)

    zo = steppers[True]
    runs = {
        "T_f": lambda: torch.no_grad()(loss)(),
        "T_f_full": lambda: torch.no_grad()(full)(),
        "T_u": lambda: each(lambda i, p, u: rge.direction(p, seed, i)),
        "T_add": lambda: each(lambda i, p, u: torch.add(p, u, alpha=mu)),
        "T_upd": lambda: each(lambda i, p, u: zo.write(p, rge.direction(p, seed, i), 0.0,
                                                       zo.param_groups[0], seed=seed, i=i)),
        "zo_pair": lambda: zo.step(loss),
        "zo_seq": lambda: steppers[False].step(loss),
        "mezo": lambda: mezo_step(full, blocks, seed, mu, lr),
    }
    times = {clock: {k: [] for k in MEASURES} for clock in ("wall", "cpu")}
    for rep in range(reps):
        for k in MEASURES:
            wall, cpu = timed(runs[k], device)
            times["wall"][k].append(wall)
            times["cpu"][k].append(cpu)
        print(f"  {name} {variant} rep {rep + 1}/{reps} (wall/cpu s): " + " ".join(
            f"{k} {times['wall'][k][-1]:.2f}/{times['cpu'][k][-1]:.2f}" for k in MEASURES),
            flush=True)
    result = dict(model=name, variant=variant, blocks=len(blocks), batch_size=batch_size,
                  seq_len=seq_len, cpu_linear=kernel, reps=reps, dtype=str(dtype),
                  rounding=rounding, trainable=sum(p.numel() for p in params),
                  threads=torch.get_num_threads(), seconds=times)
    for clock in ("wall", "cpu"):
        t = times[clock]
        floors = [2 * len(blocks) * f + 2 * u for f, u in zip(t["T_f"], t["T_u"])]
        ratios = dict(speedup_vs_mezo=[m / z for m, z in zip(t["mezo"], t["zo_pair"])],
                      pair_over_floor=[z / f for z, f in zip(t["zo_pair"], floors)],
                      seq_over_floor=[z / f for z, f in zip(t["zo_seq"], floors)],
                      mezo_over_floor=[m / f for m, f in zip(t["mezo"], floors)])
        # each ratio within one repetition (seconds apart), then the median over repetitions:
        # a drift of the machine's speed between repetitions cancels out
        result[clock] = dict(median={k: statistics.median(v) for k, v in t.items()},
                             floor=statistics.median(floors), per_rep=ratios,
                             **{k: statistics.median(v) for k, v in ratios.items()})
    return result


@torch.no_grad()
def rounding_shares(name, dtype, *, step=1e-6, steps=3, seed=0) -> dict:
    """16-bit weights (§4, F16 ZO): how much of a ZO-SGD update the write keeps, per rounding.

    The model of shape `name` in `dtype`; the closure is a cheap loss through the LM head alone
    (allow_unreached: every tensor is still updated by η·d·u), with η set so that |η·d| = `step`,
    the scale of lr·d in the paper's runs (lr 1e-6 to 1e-7, |d| ~ 1). Per rounding: moved, the
    share of entries a step changes (opt.moved_fraction), and kept = Σ (θ' − θ)·Δ / Σ Δ², the
    share of the intended update Δ = −η d u that reached the weights (1 when nothing is lost).
    """
    out = {}
    for rounding in optimizers.ROUNDINGS:
        torch.manual_seed(seed)
        model = models.from_config(models.config(name), dtype=dtype)
        params = list(model.parameters())
        x = torch.randn(1, model.config.hidden_size, dtype=dtype)
        loss = lambda: model.lm_head(x).float().logsumexp(-1).sum()   # noqa: E731
        opt = optimizers.ZOSGD(params, lr=0.0, seed=seed, rounding=rounding, allow_unreached=True)
        moved, kept = [], []
        for _ in range(steps):
            before = [p.clone() for p in params]
            seeds = opt.seed_stream.get_state()
            opt.step(loss)                        # lr 0: learn d, then redo the step at η·|d|
            opt.seed_stream.set_state(seeds)
            opt.param_groups[0]["lr"] = step / abs(opt.projected_grad)
            opt.step(loss)
            opt.param_groups[0]["lr"] = 0.0
            d, lr = opt.projected_grad, step / abs(opt.projected_grad)
            num = den = 0.0
            for i, (p, b) in enumerate(zip(params, before)):
                delta = -lr * d * rge.direction(b, rge_seed(opt, seeds), i).double()
                num += float(((p.double() - b.double()) * delta).sum())
                den += float((delta * delta).sum())
            moved.append(opt.moved_fraction)
            kept.append(num / den)
        out[rounding] = dict(moved=statistics.mean(moved), kept=statistics.mean(kept))
    return out


def rge_seed(opt, state):
    """The first seed an optimizer's seed stream draws from generator state `state`."""
    g = torch.Generator().set_state(state)
    return int(torch.randint(2**40, (1,), generator=g))


def load_average():
    return os.getloadavg() if hasattr(os, "getloadavg") else None


def hardware(device="cpu") -> dict:
    info = dict(cpu=checkpoint.fingerprint("cpu")["device_name"], cores=os.cpu_count(),
                threads=torch.get_num_threads(), torch=torch.__version__,
                python=platform.python_version(), load_average=load_average())
    if torch.device(device).type == "cuda":
        record = checkpoint.fingerprint(device)
        info.update(gpu=record["device_name"], sm_count=record["sm_count"], cuda=record["cuda"])
    return info


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="opt-125m", help="comma-separated models.CONFIGS names")
    ap.add_argument("--variants", default="full,lora", help="comma-separated: full, block, lora")
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--seq_len", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3, help="interleaved repetitions (median)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--dtype", default="fp32", choices=sorted(models.DTYPES),
                    help="the weights' dtype (16-bit: the GPU setting of Tab. 4)")
    ap.add_argument("--zo_rounding", default="stochastic", choices=optimizers.ROUNDINGS,
                    help="how this project's step writes 16-bit weights")
    ap.add_argument("--malloc", default="cache", choices=("cache", "default"),
                    help="CPU: keep freed blocks for reuse as train.py does "
                         "(memory.cache_freed_memory), or glibc's default")
    ap.add_argument("--cpu_linear", default="onednn", choices=cpu_linear.CHOICES,
                    help="CPU: the kernel of fp32 linears outside autograd, as train.py's flag "
                         "(every measurement runs on it)")
    ap.add_argument("--out", default=None, help="directory for one JSON per model and variant")
    ap.add_argument("--rounding", action="store_true",
                    help="instead: the share of a 16-bit update kept, per rounding (bf16, fp16)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.malloc == "cache":
        memory.cache_freed_memory()
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: no CUDA device here; use --device cpu")
    for v in args.variants.split(","):
        if v not in ("full", "block", "lora"):
            ap.error(f"unknown variant {v!r}; choose from: full, block, lora")
    results = []
    if args.rounding:
        for name in args.model.split(","):
            for dtype in (torch.bfloat16, torch.float16):
                r = dict(model=name, dtype=str(dtype), step=1e-6,
                         shares=rounding_shares(name, dtype), hardware=hardware())
                results.append(r)
                print(json.dumps(r["shares"]), name, dtype, flush=True)
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "rounding.json"), "w") as f:
                json.dump(results, f, indent=2)
        return results
    for name in args.model.split(","):
        for v in args.variants.split(","):
            before = load_average()
            r = measure(name, v, batch_size=args.batch_size, seq_len=args.seq_len,
                        reps=args.reps, dtype=models.DTYPES[args.dtype], device=args.device,
                        rounding=args.zo_rounding, kernel=args.cpu_linear)
            r |= dict(hardware=hardware(args.device), load_average_before=before,
                      malloc=args.malloc)
            results.append(r)
            for clock in ("wall", "cpu"):
                c = r[clock]
                spread = c["per_rep"]["speedup_vs_mezo"]
                print(f"{name} {v} ({clock}): zo_pair {c['median']['zo_pair']:.2f}s, mezo "
                      f"{c['median']['mezo']:.2f}s → {c['speedup_vs_mezo']:.2f}× faster "
                      f"({min(spread):.2f}–{max(spread):.2f}); zo_pair / floor "
                      f"{c['pair_over_floor']:.2f}, zo_seq / floor {c['seq_over_floor']:.2f}",
                      flush=True)
            if args.out:
                os.makedirs(args.out, exist_ok=True)
                stem = os.path.basename(name.rstrip("/"))        # a config folder: its name
                with open(os.path.join(args.out, f"{stem}-{v}.json"), "w") as f:
                    json.dump(r, f, indent=2)
    return results


if __name__ == "__main__":
    main()
