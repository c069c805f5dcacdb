#!/usr/bin/env bash
# The recorded learning run (README.md beside this file): pre-train a small OPT-shaped model on
# unlabeled train text, then SST-2 zero-shot, ZO-SGD and FO-Adam with train.py, then the plot.
#   bash results/learning-run/run.sh           # the recorded runs (from the repository root)
#   bash results/learning-run/run.sh tune      # the dev-only search that chose their lr
# CPU, one thread a run (fastest where other jobs share the cores). The recorded runs ran side by
# side, two to four at a time, on a machine shared with other jobs.
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1
MODEL=${MODEL:-out/tiny-opt}         # the recorded runs: MODEL=/work/models/tiny-opt
DATA=${DATA:-../shared/data}
OUT=results/learning-run

[ -f "$MODEL/config.json" ] || python examples/pretrain_tiny_opt.py --out "$MODEL" --steps 600

sst2() {  # sst2 NAME ARGS...: one train.py run on SST-2, outputs in $OUT/NAME (replaced)
    local name=$1; shift
    python train.py --model "$MODEL" --task sst2 --data_dir "$DATA" --num_train 1000 \
        --num_dev 200 --device cpu --output_dir "$OUT/$name" --overwrite "$@"
}

if [ "${1:-}" != tune ]; then
    sst2 zero-shot --num_eval 872 --opt zo_sgd --lr 0 --steps 1 --eval_every 1
    sst2 zo-sgd-lora --num_eval 872 --opt zo_sgd --peft lora --lr 1e-2 --mu 1e-3 \
        --steps 1000 --eval_every 250
    sst2 zo-sgd-ft --num_eval 872 --opt zo_sgd --lr 1e-4 --mu 1e-3 --steps 500 --eval_every 250
    sst2 fo-adam-ft --num_eval 872 --opt fo_adam --lr 1e-3 --steps 400 --eval_every 50
    python "$OUT/plot.py"
else  # the choice is the best dev accuracy; these runs' test accuracy (100 sentences) is not used
      # (the recorded tune/ runs predate train.py's refusal of --num_eval 100 and scored none)
    for lr in 3e-3 3e-2; do
        sst2 "tune/zo-sgd-lora-lr$lr" --num_eval 100 --opt zo_sgd --peft lora --lr "$lr" \
            --mu 1e-3 --steps 300 --eval_every 300
    done
    sst2 tune/zo-sgd-lora-lr1e-2 --num_eval 100 --opt zo_sgd --peft lora --lr 1e-2 --mu 1e-3 \
        --steps 600 --eval_every 150
    sst2 tune/fo-adam-lora-lr1e-3 --num_eval 100 --opt fo_adam --peft lora --lr 1e-3 \
        --steps 100 --eval_every 100
    sst2 tune/fo-adam-lora-lr1e-2 --num_eval 100 --opt fo_adam --peft lora --lr 1e-2 \
        --steps 150 --eval_every 50
    sst2 tune/fo-adam-ft-lr1e-3 --num_eval 100 --opt fo_adam --lr 1e-3 --steps 150 --eval_every 50
    sst2 tune/fo-adam-ft-lr1e-4 --num_eval 100 --opt fo_adam --lr 1e-4 --steps 300 --eval_every 50
fi
