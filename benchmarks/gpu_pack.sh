#!/usr/bin/env bash
# Packed trials on one GPU (issue 18), for a session that is lent the device machine. NOT RUN YET:
# no GPU was lent to the session that wrote it; it was dry-run on the CPU (see the end of this comment).
#
#   OUT=/some/dir bash benchmarks/gpu_pack.sh
#
# Same set-up as benchmarks/gpu_check.sh (read it first: .devicepkg/site312.tar.xz holds Ray & co.
# for the machine's Python 3.12, .devicepkg/data_mnist.tar.xz the MNIST IDX files). Two measurements:
#  1. bench_pack.py on CUDA, no Ray: 4 solo trials, then packs of k = 4 .. 64 (MNIST 7,500, keras_cnn,
#     3 epochs, 3 cheap detectors): trials per hour and the share of time in training.
#  2. The engine, N_TRIALS trials (seeds x 2 poison rates) three ways: today's four fractional-GPU solo
#     trials (resources.gpu 0.25, pack 1), four fractional-GPU packs of 8 (gpu 0.25, pack 8), and
#     one pack of N_TRIALS on the whole GPU (gpu 1, pack N_TRIALS). Trials per hour = trials / (last
#     finish - first start); $OUT/pack_<mode>_trials.csv hold the tables (clean accuracy per trial, to
#     check that packing changes no result beyond the spread over seeds: on CUDA the dropout masks of
#     a packed model are drawn from its own generator, not by the fused solo kernel).
# Knobs (environment): PY (python3), N_TRIALS (32), KS ("4 8 16 32 64"), EPOCHS (3), N_TRAIN (7500),
# TRIAL_CPU (3, CPUs per fractional-GPU trial or pack), PACK_CPU (12, CPUs of the one whole-GPU pack).
# CPU dry run: PY=$PWD/.venv/bin/python SITE=skip DATA=/tmp/gpu_pack_data DEVICE=cpu GPU_SHARE=0 TRIAL_CPU=1 \
#   PACK_CPU=2 N_TRIALS=2 KS=2 N_TRAIN=200 EPOCHS=1 OUT=/tmp/gpu_pack bash benchmarks/gpu_pack.sh
set -x
set -o pipefail

PY=${PY:-python3}
SITE=${SITE:-/tmp/site}
DATA=${DATA:-/tmp/data}
OUT=${OUT:-/tmp/gpu_pack_out}
DEVICE=${DEVICE:-cuda}
GPU_SHARE=${GPU_SHARE:-0.25}
N_TRIALS=${N_TRIALS:-32}
KS=${KS:-4 8 16 32 64}
EPOCHS=${EPOCHS:-3}
N_TRAIN=${N_TRAIN:-7500}
TRIAL_CPU=${TRIAL_CPU:-3}
PACK_CPU=${PACK_CPU:-12}
WORK=$(mktemp -d /tmp/gpupack.XXXX)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0 RAY_OBJECT_STORE_ALLOW_SLOW_STORAGE=1 COLUMNS=160
exec > >(tee -a "$OUT/log.txt") 2>&1

if [ "$SITE" != skip ]; then
    mkdir -p "$SITE" && tar -C "$SITE" -xJf .devicepkg/site312.tar.xz || exit 1
    export PYTHONPATH="$SITE:$PWD"
else
    export PYTHONPATH="$PWD"
fi
mkdir -p "$DATA"
[ -f .devicepkg/data_mnist.tar.xz ] && { tar -C "$DATA" -xJf .devicepkg/data_mnist.tar.xz || exit 1; }
command -v nvidia-smi >/dev/null && nvidia-smi

# 1. the science alone
# shellcheck disable=SC2086
"$PY" benchmarks/bench_pack.py --device "$DEVICE" --threads 4 --ks $KS --solo 4 --n-train "$N_TRAIN" \
    --epochs "$EPOCHS" --data-root "$DATA" --json "$OUT/bench_pack.json" || exit 1

# 2. the engine: the same trials, solo on GPU quarters, packs of 8 on GPU quarters, one pack on the GPU
SEEDS=$("$PY" -c "print(list(range(max(1, $N_TRIALS // 2))))")
# configs/mnist_oneshift.yaml (keras_cnn, Adam, batch 64, rates 0.01 and 0.33) with the cheap detectors
SWEEP=(configs/mnist_oneshift.yaml --set "sweep.seed=$SEEDS" --set data.n_train="$N_TRAIN" --set data.n_test=2000
       --set train.epochs="$EPOCHS" --set train.device="$DEVICE" --set resources.cpu="$TRIAL_CPU" --set resources.gpu="$GPU_SHARE"
       --set "detectors=[activation_clustering, spectral_signature, loss]" --data-root "$DATA")
FULL_GPU=$([ "$GPU_SHARE" = 0 ] && echo 0 || echo 1)
for mode in "solo:--set resources.pack=1" "pack8:--set resources.pack=8" \
            "one:--set resources.pack=$N_TRIALS --set resources.gpu=$FULL_GPU --set resources.cpu=$PACK_CPU"; do
    name=${mode%%:*}
    # shellcheck disable=SC2086
    "$PY" -m poisonsweep.engine.cli run "${SWEEP[@]}" --out "$WORK/$name" ${mode#*:} || exit 1
    "$PY" - "$WORK/$name" "$OUT/pack_${name}_trials.csv" "$name" <<'PYEOF'
import sys
import pandas as pd
out, csv, name = sys.argv[1:]
trials = pd.read_parquet(f"{out}/trials")
trials.drop(columns=["config_json", "error"]).to_csv(csv, index=False)
span = (trials.finished_at.max() - trials.started_at.min()).total_seconds()
ok = trials[trials.status == "ok"]
print(f"{name}: {len(trials)} trials ({len(ok)} ok) in {span:.1f} s = {3600 * len(trials) / span:.0f} trials/hour; "
      f"pack sizes {sorted(set(ok.pack_size))}; train {ok.train_seconds.sum():.1f} s, "
      f"eval+detect {(ok.eval_seconds + ok.detect_seconds).sum():.1f} s (summed over trials); "
      f"clean acc by rate {ok.groupby('poison_rate').clean_test_acc.agg(['mean', 'std']).round(4).to_dict('index')}")
PYEOF
done
rm -rf "$WORK"
