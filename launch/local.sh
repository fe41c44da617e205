#!/usr/bin/env bash
# One machine, all its accelerators (or CPU). Extra arguments go to the trainer.
#
#   launch/local.sh configs/tiny.py /tmp/tiny
#   launch/local.sh configs/tiny.py /tmp/tiny_fsdp --config.mesh.fsdp=2 --fake_devices=2
#       (on 2 accelerators drop --fake_devices; on a CPU it runs on 2 fake devices)
#   FAKE_DEVICES=8 launch/local.sh configs/tiny.py /tmp/tiny --config.mesh.tensor=2
#   launch/local.sh configs/flamingo_9b.py /tmp/9b --compile_only --fake_devices=256 \
#       --config.mesh.tensor=16 --config.mesh.zero1=True
#
# Hardware knobs live here, not in Python: XLA flags, the compilation cache.
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 CONFIG WORKDIR [--config.a.b=value ...] [--compile_only] [--fake_devices=N]" >&2
  exit 2
fi
CONFIG=$1; WORKDIR=$2; shift 2
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}

# Reuse compiled steps across runs (same config and mesh -> no recompilation).
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$HOME/.cache/flamingo_jax/jit}
if [[ -n "${FAKE_DEVICES:-}" ]]; then
  export JAX_PLATFORMS=cpu
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${FAKE_DEVICES}"
fi
exec "$PYTHON" -m flamingo_jax.train --config "$CONFIG" --workdir "$WORKDIR" "$@"
