"""One rank of tests/test_distributed.py's data-parallel runs: train.py's main, with faults.

    python -m torch.distributed.run --nproc_per_node 2 tests/dp_worker.py SPEC.json

SPEC.json lists runs, each {"args": train.py's arguments, "fault": null | "seed" | "nan"}, done in
order in one process group (one launch: importing torch and transformers is most of a launch's
time; a process group cannot be joined twice reliably). After a run, each rank saves its trainable
tensors to OUTPUT_DIR/rank{r}.pt; a run that stops writes its exit status to OUTPUT_DIR/rank{r}.exit
instead, except the last run, whose exit ends the process.
Faults, on rank 1 only: "seed" adds 1 to --seed (the checksum must catch it), "nan" makes the
loss of its share NaN from its third call on (step 3: one call per paired query); every rank must
stop at that query.
"""
import json
import os
import sys

import torch
import torch.distributed as dist

import tasks
import train


def save_params(cfg, run, *args):
    """train.train, then this rank's trainable tensors to OUTPUT_DIR/rank{r}.pt."""
    result = TRAIN(cfg, run, *args)
    torch.save([p.detach().clone() for p in run.params],
               os.path.join(cfg.output_dir, f"rank{dist.get_rank()}.pt"))
    return result


def nan_from_third(loss_terms):
    calls = [0]

    def poisoned(model, batch, **kw):
        total, count = loss_terms(model, batch, **kw)
        calls[0] += 1
        return (total * float("nan") if calls[0] >= 3 else total), count
    return poisoned


TRAIN, LOSS_TERMS = train.train, tasks.loss_terms
train.train = save_params

if __name__ == "__main__":
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    with open(sys.argv[1]) as f:
        runs = json.load(f)
    for i, spec in enumerate(runs):
        args, fault = list(spec["args"]), spec.get("fault")
        tasks.loss_terms = LOSS_TERMS
        if rank == 1 and fault == "seed":
            args += ["--seed", "1"]
        if rank == 1 and fault == "nan":
            tasks.loss_terms = nan_from_third(LOSS_TERMS)
        try:
            train.cli(args)                        # train.py's session keeps this group
        except SystemExit as e:
            if i == len(runs) - 1:
                dist.destroy_process_group()
                raise
            out = args[args.index("--output_dir") + 1]
            with open(os.path.join(out, f"rank{rank}.exit"), "w") as f:
                f.write(str(e.code))
    if dist.is_initialized():
        dist.destroy_process_group()
