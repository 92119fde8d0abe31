#!/usr/bin/env bash
# GPU acceptance for issue 13, on a CUDA machine with torch preinstalled and hwprune's other dependencies
# brought as wheels in .whl/ (see shared/gpu/FACTS.md section 7; `pip download` them on a networked box).
#
#   bash bench/gpu_acceptance.sh [RESULTS_DIR]     (default bench/results/gpu-<gpu name>)
#
# What it runs: the gpu-marked tests; `hwprune profile --target cuda` of the built-in models at batches where
# the GPU is busy, every format (fp16/bf16 as precision regions, with cast entries), with configurations/s;
# `hwprune validate` of each (predictor fidelity) in each runtime (eager, cudagraph, compile); the headline
# (search/resnet20-mnist5k-cuda.yaml, --budget 10ms, in each runtime; the batch doubles where the dense
# model is under 15 ms in that runtime), its export measured, and the best searched point against the best
# uniform seed (whole-model fp16/bf16 included); fine-tune throughput GPU vs CPU. Every command's output and
# the tables go to RESULTS_DIR. Env: RUNTIMES (default "eager cudagraph compile"), SAMPLES (20), PROBE=0
# skips the throughput, HEADLINE=0 skips the headline, COMPILE_GRID (the compile runtime's keep-ratio grid,
# default 0.25,0.5,0.75,1.0: every configuration is compiled, ~1-3 s each), BLOCKS=0 skips bench/blocks.py (fused
# blocks vs bare layers, side by side on the same runs, eager and cudagraph, for cnn1d and resnet20: the RNNs
# have no epilogue).
# Tables profiled here are fused-block tables (each layer with its BatchNorm/activation/pooling epilogue).
# STAGES (default "tests profile blocks headline probe") picks what runs; the summary is appended to, so calls
# can be split. Device time: eager+cudagraph profiles and validates took ~8 min on an H100 (issue 13, session 4);
# compile adds compile time per configuration. With a 10-minute limit per command, split by runtime and stage:
#   STAGES="tests profile" RUNTIMES=eager bash bench/gpu_acceptance.sh R; STAGES=headline RUNTIMES=eager ...;
#   STAGES=blocks RUNTIMES="eager cudagraph" ...; then the same for cudagraph and compile; STAGES=probe last.
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
RUNTIMES=${RUNTIMES:-eager cudagraph compile}
COMPILE_GRID=${COMPILE_GRID:-0.25,0.5,0.75,1.0}
STAGES=${STAGES:-tests profile blocks headline probe}
[ "${BLOCKS:-1}" = 1 ] || STAGES=${STAGES//blocks/}
[ "${HEADLINE:-1}" = 1 ] || STAGES=${STAGES//headline/}
[ "${PROBE:-1}" = 1 ] || STAGES=${STAGES//probe/}
has() { case " $STAGES " in *" $1 "*) return 0 ;; esac; return 1; }
echo "==== $(date -u +%FT%TZ) RUNTIMES='$RUNTIMES' STAGES='$STAGES'" | tee -a "$R/summary.txt"
if has tests; then
echo "== gpu tests" | tee -a "$R/summary.txt"
python3 -m pytest -q -p no:cacheprovider -m gpu tests/ 2>&1 | tail -3 | tee -a "$R/summary.txt"
fi
# model | args   (batches: the GPU busy, the dense model well above launch overhead)
GPU_MODELS='cnn1d --batch-size 4096
resnet20 --input-shape 1,28,28 --batch-size 4096
gru --model-args num_layers=2 --batch-size 1024
lstm --model-args num_layers=2 --input-shape 28,28 --batch-size 1024'
if has profile; then
for rt in $RUNTIMES; do
while read -r m args; do
    [ -z "$m" ] && continue
    echo "== profile $m $args --runtime $rt" | tee -a "$R/summary.txt"
    grid=""
    [ "$rt" = compile ] && grid="--grid $COMPILE_GRID"
    python3 -m hwprune profile --target cuda --runtime $rt --model $m $args $grid --tables "$T" --json \
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
done <<< "$GPU_MODELS"
done
fi
# fused blocks against bare layers (issue 13 item 4): the same calibration and validation runs priced both ways
if has blocks; then
for rt in $RUNTIMES; do
    [ "$rt" = compile ] && continue  # every block compiled twice over: too slow for one call
    while read -r m args; do
        case $m in gru|lstm) continue ;; esac  # no layer of theirs has an epilogue: both tables would be the same
        echo "== blocks vs bare layers: $m $args --runtime $rt" | tee -a "$R/summary.txt"
        python3 bench/blocks.py --target cuda --runtime $rt --models $m $args --samples "$SAMPLES" --out "$R" \
            --name "blocks-$m-$rt" > "$R/blocks-$m-$rt.log" 2>&1
        echo "rc=$? $(grep -E '^\| '"$m"' ' "$R/blocks-$m-$rt.log" | tail -1)" | tee -a "$R/summary.txt"
    done <<< "$GPU_MODELS"
done
fi
if has headline; then
for rt in $RUNTIMES; do
    for b in 4096 8192 16384; do
        out=$R/headline-$rt-b$b
        grid=""
        [ "$rt" = compile ] && grid="--grid $COMPILE_GRID"
        # the table first (the search profiles on demand too, but with the default grid)
        python3 -m hwprune profile --target cuda --runtime $rt --model resnet20 --input-shape 1,28,28 --batch-size $b \
            $grid --tables "$T" --json > "$out-profile.json" 2> "$out-profile.log"
        echo "== headline $rt batch $b" | tee -a "$R/summary.txt"
        python3 -m hwprune search --spec search/resnet20-mnist5k-cuda.yaml --runtime $rt --batch-size $b \
            --tables "$T" --out "$out" --json > "$out.json" 2> "$out.log"
        echo "search rc=$?" | tee -a "$R/summary.txt"
        dense=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['dense_predicted_ms'])" "$out.json" 2>/dev/null || echo 0)
        if python3 -c "import sys; sys.exit(0 if float(sys.argv[1]) >= 15 else 1)" "$dense"; then break; fi
        echo "dense model predicted at $dense ms in $rt at batch $b: under 15 ms, doubling the batch" | tee -a "$R/summary.txt"
    done
    python3 -m hwprune export "$out" --trial best --finetune-steps 300 --json > "$out-export.json" 2> "$out-export.log"
    echo "export rc=$?" | tee -a "$R/summary.txt"
    python3 - "$out.json" "$out-export.json" <<'PY' | tee -a "$R/summary.txt"
import json, sys
try:
    s, e = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
    seeds = s["uniform_seeds"]
    top = max(seeds.items(), key=lambda kv: kv[1]["accuracy"]) if seeds else ("none", {"accuracy": float("nan")})
    b = s["best"]
    print(f"dense predicted {s['dense_predicted_ms']:.3f} ms; best trial {b['trial']} val {b['accuracy']:.4f} "
          f"(predicted {b['predicted_latency_ms']:.3f} ms) vs best uniform seed {top[0]} val {top[1]['accuracy']:.4f} "
          f"-> {'beats' if b['accuracy'] > top[1]['accuracy'] and b['trial'] != top[1].get('trial') else 'does NOT beat'} it")
    m = e["measurement"] or {}
    print(f"export: predicted {e['predicted_latency_ms']:.3f} ms, measured {e['measured_latency_ms']} ms "
          f"(budget {e['budget_ms']} ms, over={e['over_budget']}); test acc {e['test_accuracy']:.4f} vs dense "
          f"{e['dense_test_accuracy']:.4f}; formats {sorted(set(e['policy'].get('formats', {}).values()))}; "
          f"{e.get('precision_regions')} ({e.get('casts')} casts); aoti {m.get('aoti_median_ms')} ms")
except Exception as exc:
    print(f"headline summary failed: {exc}")
PY
done
fi
has probe || exit 0
echo "== fine-tune throughput" | tee -a "$R/summary.txt"
python3 bench/gpu_probe.py --steps 100 | tee -a "$R/summary.txt"
