#!/usr/bin/env bash
# GPU acceptance for issue 13, on a CUDA machine with torch preinstalled and hwprune's other dependencies
# brought as wheels in .whl/ (see shared/gpu/FACTS.md section 7; `pip download` them on a networked box).
#
#   bash bench/gpu_acceptance.sh [RESULTS_DIR]     (default bench/results/gpu-<gpu name>)
#
# What it runs today (the parts of issue 13 that exist): the gpu-marked tests; `hwprune profile --target cuda`
# of the built-in models at batches where the GPU is busy, every format, with configurations/s; `hwprune
# validate` of each (predictor fidelity) in each runtime (eager, cudagraph); fine-tune throughput GPU vs
# CPU. Every command's
# output and the tables go to RESULTS_DIR. Env: RUNTIMES, SAMPLES (20), PROBE=0 skips the throughput.
# Not yet: precision regions, --runtime compile, the 10 ms headline with them.
set -uo pipefail
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/hwprune-site .whl/*.whl
    export PYTHONPATH=/tmp/hwprune-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'" || exit 2
GPU=$(python3 -c "import torch; print(torch.cuda.get_device_name().lower().replace(' ', '-'))")
R=${1:-bench/results/gpu-$GPU}
T=$R/tables
mkdir -p "$R"
SAMPLES=${SAMPLES:-20}
echo "== gpu tests" | tee "$R/summary.txt"
python3 -m pytest -q -p no:cacheprovider -m gpu tests/ 2>&1 | tail -3 | tee -a "$R/summary.txt"
RUNTIMES=${RUNTIMES:-eager cudagraph}
# model | args   (batches: the GPU busy, the dense model well above launch overhead)
for rt in $RUNTIMES; do
while read -r m args; do
    [ -z "$m" ] && continue
    echo "== profile $m $args --runtime $rt" | tee -a "$R/summary.txt"
    python3 -m hwprune profile --target cuda --runtime $rt --model $m $args --tables "$T" --json \
        > "$R/profile-$m-$rt.json" 2> "$R/profile-$m-$rt.log"
    echo "rc=$? $(grep -E 'measured .* configurations' "$R/profile-$m-$rt.log" | tail -1)" | tee -a "$R/summary.txt"
    python3 -m hwprune validate --target cuda --runtime $rt --model $m $args --tables "$T" --samples "$SAMPLES" \
        --json > "$R/validate-$m-$rt.json" 2> "$R/validate-$m-$rt.log"
    python3 - "$R/validate-$m-$rt.json" <<'PY' | tee -a "$R/summary.txt"
import json, sys
try:
    d = json.load(open(sys.argv[1]))
    print(f"validate: within 10% {d['within_10pct']:.0%}, tau {d['kendall_tau']:.3f}, MAPE {d['mape']:.1%}, "
          f"worst {d['worst']:.1%}, noise {d['noise_pct']:.1f}%")
except Exception as exc:
    print(f"validate failed: {exc}")
PY
done <<'LIST'
cnn1d --batch-size 4096
resnet20 --input-shape 1,28,28 --batch-size 4096
gru --model-args num_layers=2 --batch-size 1024
lstm --model-args num_layers=2 --input-shape 28,28 --batch-size 1024
LIST
done
[ "${PROBE:-1}" = 1 ] || exit 0
echo "== fine-tune throughput" | tee -a "$R/summary.txt"
python3 bench/gpu_probe.py --steps 100 | tee -a "$R/summary.txt"
