"""More than one GPU: data-parallel ZO over torch.distributed, and one model split across GPUs.

1. Data parallel: `torchrun --nproc_per_node N train.py ...`. N processes (ranks) each hold the
whole model; every batch of --batch_size examples (the global batch) is cut into N shares, one per
rank.

Why ZO makes this almost free. A ZO step (rge.py) needs only the scalars f(θ ± μu_j) from the data:
u_j is a function of (seed_j, tensor index) and the seeds come from a generator seeded by --seed,
the same on every rank. Every rank draws the same u and, given the same scalars, makes the same
update, so no gradient and no weight ever travels. First-order data parallelism all-reduces a
gradient of |x| bytes every step (2.6 GB for OPT-1.3B in fp16); ZO all-reduces 4 float64 numbers
per query.

The exact global mean. tasks.loss_terms gives a rank's share as (S_r, n_r): the loss summed over its
terms and how many there are (examples for the classification loss, gold tokens for the LM loss).
The mean over the global batch is

    f = Σ_r S_r / Σ_r n_r,

not the mean of the ranks' means (1/N) Σ_r S_r / n_r, which weights each term by 1/n_r of its own
rank: wrong for the token-level LM loss, whose shares hold different numbers of tokens, and for a
batch that does not split evenly. One all_reduce(SUM) of the float64 vector [S, n] per loss
(with the paired forward [S+, S−, n+, n−]: one all-reduce per query) gives every rank the same
buffer, bit for bit (gloo and NCCL reduce each chunk once, then broadcast it), so the same f and
projected gradient c = (f+ − f−)/(2μ), and the same update. From a one-process run on the same
batch it differs only in summation order: each rank sums its terms in fp32, the ranks' sums are
added in float64, where one process sums all B terms in fp32 (a relative difference of order
B·2⁻²⁴, which 1/(2μ) scales into c). A NaN or inf on one rank poisons the sum on every rank, so
rge's finite check stops all of them at the same query: no rank is left waiting in an all-reduce
the others quit.

The checksum. Identical updates need identical u on every rank. torch's CPU generator gives the
same numbers everywhere, but CUDA's normal kernel depends on the GPU model (its SM count) and the
torch version, so ranks on different GPUs or builds would draw different u from the same seed and
drift apart without any error. At the start and at each evaluation every rank sums a fixed strided
sample (≤ 1024 entries) of every trainable tensor in float64; the vectors are all-gathered and
compared bit for bit, and a difference stops every rank with one line.

Evaluation is sharded too: each rank predicts every N-th example (in order of length), an
all-reduce SUM of the prediction vector (zeros elsewhere) gives every rank all of them, hence the
same dev accuracy and the same best-dev decision. Rank 0 alone writes files (config, log, result,
checkpoints) and prints; a stop signal seen by any rank stops all of them after the same step.

First-order optimizers, the hybrid and Forward-Grad are refused under torchrun. Back-prop needs
its gradients all-reduced, which DistributedDataParallel does only for a forward that passes
through its wrapper; the loss here calls the model's trunk and its LM head separately (the head
runs on the scored positions only). FO data parallelism is what every training library already
does well; this file is about what ZO makes cheap.

2. One model over several GPUs: `python train.py --device_map auto ...`. accelerate's dispatch puts
consecutive layers on consecutive GPUs and moves the activations along, so a batch runs one device
at a time: memory is split, time is not. The perturbation needs nothing more: rge.direction draws
u on each tensor's own device, the swap hooks replace tensors where they live, and tasks moves its
index tensors to the device of the last hidden state. Offload to CPU or disk is refused
(train.check_model): the trainable tensors are then placeholders on the meta device, and
accelerate's hooks load the real weights into each module just before its forward, over any
perturbed copy rge put there, so ZO could neither perturb nor update them.

References: torch.distributed (all_reduce, all_gather, torchrun's RANK/WORLD_SIZE/LOCAL_RANK);
accelerate's big-model inference (dispatch_model, AlignDevicesHook). MeZO (arXiv:2305.17333) gives
the seed trick; Zhang et al. 2024 (arXiv:2402.11592) §3 the estimator.
Not here: the estimate (rge.py), the loss and its shares (tasks.py), the loop (train.py).
"""
import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

import optimizers
import tasks

CHECKSUM_SAMPLES = 1024        # entries summed per tensor: cheap, and any drift reaches them


class Mismatch(RuntimeError):
    """The ranks' weights differ: they would no longer be one data-parallel run."""


@dataclass(frozen=True)
class World:
    """This process's place in the run: rank r of size N."""
    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes files and prints."""
        return self.rank == 0


def launched() -> bool:
    """Started by torchrun (or python -m torch.distributed.run), which sets WORLD_SIZE."""
    return "WORLD_SIZE" in os.environ


def world() -> World:
    """This process's World: from the process group under torchrun, else rank 0 of 1."""
    return World(dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else World()


def say(*args, **kw):
    """print on rank 0 only (every rank reaches the same messages)."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kw)


# ---- data parallel ------------------------------------------------------------------------------

def check(opt: str, zo_layers, device_map, device: str, batch_size: int, num_train: int):
    """Raise ValueError, in one line, for what data parallelism (or --device_map) cannot run."""
    if device_map not in (None, "auto"):
        raise ValueError(f"unknown --device_map '{device_map}'; choose from: auto")
    if not launched():
        return
    size, tail = int(os.environ["WORLD_SIZE"]), num_train % batch_size
    if batch_size < size or 0 < tail < size:        # a rank with no example reaches no tensor
        raise ValueError(f"--batch_size {batch_size} is the global batch; on {size} ranks every "
                         f"batch needs one example per rank, and with --num_train {num_train} "
                         f"the last of each epoch has {tail or batch_size}")
    if device_map:
        raise ValueError("--device_map splits one model over the GPUs; under torchrun every rank "
                         "holds the whole model: use one or the other")
    if torch.device(device).index is not None:
        raise ValueError(f"--device {device}: under torchrun rank r runs on cuda:LOCAL_RANK; "
                         "pass --device cuda (or nothing)")
    cls = optimizers.OPTIMIZERS[opt]
    rge_only = issubclass(cls, optimizers.ZeroOrderOptimizer) and cls is not optimizers.FwdGradSGD
    if not rge_only or zo_layers is not None:
        raise ValueError(f"torchrun runs the RGE optimizers (zo_*) data-parallel; {opt}"
                         f"{' with --zo_layers' if zo_layers is not None else ''} needs a "
                         "gradient all-reduce (back-prop or JVP): run it in one process")


@contextmanager
def session():
    """Under torchrun, be a member of its process group for the block (gloo for CPU tensors,
    NCCL for CUDA ones, each rank's "cuda" being cuda:LOCAL_RANK) and leave it at the end. A
    process that has joined already (a test driver) keeps its group; without torchrun, nothing."""
    joined = dist.is_initialized() or not launched()
    if not joined:
        backend = "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
            backend = "cpu:gloo,cuda:nccl"
        dist.init_process_group(backend)
    try:
        yield
    finally:
        if not joined:
            dist.destroy_process_group()


def global_mean(sums: torch.Tensor, counts, world: World) -> torch.Tensor:
    """Σ_ranks sums / Σ_ranks counts, element-wise, from one all-reduce of float64 [sums, counts]
    (on the device of `sums`: this rank's GPU under NCCL)."""
    sums = sums.detach().to(torch.float64).reshape(-1)
    counts = torch.as_tensor(counts, dtype=torch.float64, device=sums.device).reshape(-1)
    terms = torch.cat([sums, counts])
    if world.size > 1:
        dist.all_reduce(terms)
    return terms[:len(sums)] / terms[len(sums):]


def closure(model, batch: dict, world: World):
    """The optimizer's loss closure for a global batch, in rge's protocol: loss() is f, and
    loss(pair=True) is [f+, f−] of the paired forward (tasks.loss_terms doubles the batch).
    One process: tasks.loss or tasks.pair_loss, in fp32 (FO back-propagates through the first).
    Data parallel: this rank's share of the batch, and the global mean of every rank's terms
    from one all-reduce ([S, n], or [S+, S−, n+, n−] for a pair)."""
    share = tasks.shard(batch, world.rank, world.size) if world.size > 1 else batch

    def loss(pair=False):
        if world.size == 1:
            return (tasks.pair_loss if pair else tasks.loss)(model, batch)
        total, count = tasks.loss_terms(model, share, pair=pair)
        return global_mean(total, [count] * total.numel(), world).reshape(total.shape)
    return loss


def evaluate(model, data, world: World, batch_size: int) -> dict:
    """tasks.evaluate; data parallel: tasks.metrics of the predictions, each rank predicting
    its share."""
    if world.size == 1:
        return tasks.evaluate(model, data, batch_size=batch_size)
    preds = tasks.predict(model, data, batch_size=batch_size, shard=(world.rank, world.size))
    dist.all_reduce(preds)               # every example predicted by one rank, 0 on the others
    return tasks.metrics(data, preds.tolist())


@torch.no_grad()
def checksum(params) -> torch.Tensor:
    """float64 sums of ≤ CHECKSUM_SAMPLES evenly strided entries of every tensor: [len(params)]."""
    return torch.stack([p.detach().reshape(-1)[::max(1, p.numel() // CHECKSUM_SAMPLES)]
                        .to(torch.float64).sum().cpu() for p in params])


def check_replicas(params, world: World, when: str):
    """Stop every rank, with the same message, unless all ranks' checksums agree bit for bit."""
    if world.size == 1:
        return
    mine = checksum(params)
    every = [torch.empty_like(mine) for _ in range(world.size)]
    dist.all_gather(every, mine)                      # CPU tensors: gloo, even beside NCCL
    bits = [t.view(torch.int64) for t in every]       # NaN compares equal to itself as bits
    odd = [r for r in range(world.size) if not torch.equal(bits[r], bits[0])]
    if odd:
        raise Mismatch(f"{when}: the weights of rank(s) {', '.join(map(str, odd))} differ from "
                       "rank 0's; every rank needs the same model files, --seed, torch version "
                       "and GPU model (CUDA's random normals depend on the last two)")


def stop_together(stop: list, world: World):
    """A stop signal seen by any rank stops every rank after the same step: stop gets the
    largest signal number any rank holds (one all-reduce of one integer per step)."""
    if world.size == 1:
        return
    signum = torch.tensor([stop[0] if stop else 0])
    dist.all_reduce(signum, op=dist.ReduceOp.MAX)
    if signum.item() and not stop:
        stop.append(int(signum.item()))


def per_rank(name: str) -> str:
    """A file name of rank 0's, or this rank's own copy of it (ranks > 0 write no shared file)."""
    rank = world().rank
    return f"rank{rank}-{name}" if rank else name
