#!/usr/bin/env bash
# One short GPU benchmark run (issue 13 item 7), under 8 minutes including installs:
#   (a) ours on configs/bench_3b.py (Flamingo-3B-like, bfloat16; scanned layers and fused
#       attention where the model has them), the largest batch that fits one H200;
#   (b) the same workload in OpenFlamingo's modules with its bfloat16 autocast;
# then prints one JSON object: frozen-aware MFU, tokens/s, step and host time, peak memory
# of both, and our tokens/s over OpenFlamingo's.
#
#   benchmarks/gpu_wheels.sh                      # once, where PyPI is reachable
#   WHEELS=.whl benchmarks/gpu_suite.sh           # on the GPU machine (repository root)
#   benchmarks/gpu_suite.sh --tiny                # the same code paths on a CPU, in ~2 min
#
# Environment: PYTHON (default python3), WHEELS (a folder of wheels installed with
# --no-index when the modules are missing; without it pip asks PyPI), OUT (where the
# JSON files go; default a temporary folder), STEPS / WARMUP (timed / untimed steps,
# default 10 / 3), BATCH (default: configs/bench_3b.py's BATCH; halved once if it does
# not fit). --tiny: configs/bench_3b.py:tiny, 1 timed step, CPU, float32 peak.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
TINY=0
[ "${1:-}" = "--tiny" ] && TINY=1
T0=$(date +%s)

# ---------------------------------------------------------------- installs
# Everything `import flamingo_jax.train` and the OpenFlamingo harness import.
NEEDED="jax flax optax orbax.checkpoint ml_collections grain array_record sentencepiece PIL msgpack tensorboardX torch transformers einops einops_exts open_flamingo"
missing() {
  "$PY" - "$@" <<'PYEOF'
import importlib.util, sys
print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m.split(".")[0]) is None or
               (m == "orbax.checkpoint" and importlib.util.find_spec(m) is None)))
PYEOF
}
MISSING=$(missing $NEEDED)
if [ -n "$MISSING" ]; then
  echo "gpu_suite: installing for: $MISSING" >&2
  if [ -n "${WHEELS:-}" ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/gpu_suite_site "$WHEELS"/*.whl
    export PYTHONPATH=/tmp/gpu_suite_site${PYTHONPATH:+:$PYTHONPATH}
  else
    "$PY" -m pip install -q "jax[cuda13]" flax optax orbax-checkpoint ml-collections \
      grain array-record sentencepiece pillow msgpack tensorboardX transformers einops einops-exts
    "$PY" -m pip install -q --no-deps open-flamingo==2.0.1
    "$PY" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null ||
      "$PY" -m pip install -q torch
  fi
  MISSING=$(missing $NEEDED)
  if [ -n "$MISSING" ]; then echo "error: still missing Python modules: $MISSING" >&2; exit 2; fi
fi
if [ "$TINY" = 1 ]; then
  CONFIG=bench_3b:tiny; STEPS=${STEPS:-1}; WARMUP=${WARMUP:-1}
  TORCH_DEVICE=cpu; PEAK=(--peak_dtype float32 --peak_size 256 --peak_seconds 1)
  export JAX_PLATFORMS=cpu
else
  CONFIG=bench_3b; STEPS=${STEPS:-10}; WARMUP=${WARMUP:-3}
  TORCH_DEVICE=cuda; PEAK=(--peak_dtype bfloat16 --peak_size 8192 --peak_seconds 3)
  "$PY" -c "import jax, sys; sys.exit(jax.devices()[0].platform != 'gpu')" || {
    echo "error: JAX sees no GPU (jax.devices() = $("$PY" -c 'import jax; print(jax.devices())'))" >&2
    exit 2; }
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2 || true
fi
BATCH=${BATCH:-$("$PY" -c "import sys; sys.path.insert(0, 'configs'); import bench_3b; print(2 if '$TINY' == '1' else bench_3b.BATCH)")}
echo "gpu_suite: set up in $(( $(date +%s) - T0 )) s; results in $OUT" >&2

# ---------------------------------------------------------------- (a) ours
ours() {  # batch
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 PYTHONUNBUFFERED=1 timeout 330 "$PY" benchmarks/train_step.py \
    --configs "$CONFIG" --set "synthetic.datasets.interleaved.batch_size=$1" \
    --steps "$STEPS" --warmup "$WARMUP" "${PEAK[@]}" --output "$OUT/ours.json" \
    > "$OUT/ours.log" 2>&1
}
if ! ours "$BATCH"; then
  tail -20 "$OUT/ours.log" >&2
  grep -q -i -E "RESOURCE_EXHAUSTED|out of memory" "$OUT/ours.log" || exit 1
  BATCH=$(( BATCH / 2 ))
  echo "gpu_suite: batch did not fit; again with batch $BATCH" >&2
  ours "$BATCH" || { tail -20 "$OUT/ours.log" >&2; exit 1; }
fi
PEAK_FLOPS=$("$PY" -c "import json; print(json.load(open('$OUT/ours.json'))['peak_matmul_flops_per_device'])")
echo "gpu_suite: ours done at $(( $(date +%s) - T0 )) s (batch $BATCH)" >&2

# ---------------------------------------------------------------- (b) OpenFlamingo
openflamingo() {  # batch
  XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 timeout 240 "$PY" benchmarks/train_step.py \
    --configs "$CONFIG" --set "synthetic.datasets.interleaved.batch_size=$1" \
    --openflamingo_only --torch_device "$TORCH_DEVICE" --openflamingo_precision amp_bf16 \
    --peak_flops "$PEAK_FLOPS" --steps "$STEPS" --warmup "$WARMUP" \
    --output "$OUT/openflamingo.json" > "$OUT/openflamingo.log" 2>&1
}
OF_BATCH=$BATCH
if ! openflamingo "$OF_BATCH"; then  # tokens/s stay comparable at a smaller batch
  tail -20 "$OUT/openflamingo.log" >&2
  grep -q -i -E "out of memory|RESOURCE_EXHAUSTED" "$OUT/openflamingo.log" || exit 1
  OF_BATCH=$(( OF_BATCH / 2 ))
  echo "gpu_suite: OpenFlamingo did not fit; again with batch $OF_BATCH" >&2
  openflamingo "$OF_BATCH" || { tail -20 "$OUT/openflamingo.log" >&2; exit 1; }
fi
echo "gpu_suite: OpenFlamingo done at $(( $(date +%s) - T0 )) s (batch $OF_BATCH)" >&2

# ---------------------------------------------------------------- summary
"$PY" - "$OUT" "$BATCH" "$OF_BATCH" "$(( $(date +%s) - T0 ))" <<'PYEOF'
import json, sys
out, batch, of_batch, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
ours_all, of_all = (json.load(open(f"{out}/{n}.json")) for n in ("ours", "openflamingo"))
(name, ours), = ours_all["configs"].items()
ours, of = ours["ours"], of_all["configs"][name]["openflamingo"]
gib = lambda b: None if b is None else round(b / 2 ** 30, 2)
summary = {
    "device": ours_all["device"], "jax": ours_all["jax"], "torch": of["torch_version"],
    "config": name, "batch": batch, "openflamingo_batch": of_batch, "peak_matmul_tflops": ours_all["peak_matmul_flops_per_device"] / 1e12,
    "frozen_aware_tflop_per_step": ours["flops_per_step"]["frozen_aware"] / 1e12,
    "ours": {"step_time_s": ours["step_time_s"], "tokens_per_s": ours["tokens_per_s"],
             "mfu_frozen_aware": ours["mfu_frozen_aware"],
             "host_time_per_step_s": ours["host_time_per_step_s"],
             "host_share_of_step": ours["host_share_of_step"],
             "peak_memory_gib": gib(ours["peak_bytes_in_use"]),
             "compiled_peak_estimate_gib": gib(ours["memory_per_device_bytes"]["peak_estimate"]),
             "final_loss": ours["final_loss"]},
    "openflamingo": {"step_time_s": of["step_time_s"], "tokens_per_s": of["tokens_per_s"],
                     "mfu_frozen_aware": of["mfu_frozen_aware"],
                     "peak_memory_gib": gib(of["peak_bytes_in_use"]),
                     "precision": of["precision"], "final_loss": of["final_loss"]},
    "tokens_per_s_ours_over_openflamingo": ours["tokens_per_s"] / of["tokens_per_s"],
    "suite_seconds": seconds,
}
print(json.dumps(summary, indent=2))
json.dump(summary, open(f"{out}/summary.json", "w"), indent=2)
PYEOF
