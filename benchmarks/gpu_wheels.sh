#!/usr/bin/env bash
# Downloads the wheels benchmarks/gpu_suite.sh needs on a GPU machine that has
# no network (the project's device machines: jax[cuda], flax, optax, orbax,
# torch+CUDA and transformers are in their image; these are not). Run it on a
# machine with PyPI access, from the repository root; it writes .whl/ (kept out
# of git through .git/info/exclude), which the device run carries:
#
#   benchmarks/gpu_wheels.sh            # then: WHEELS=.whl benchmarks/gpu_suite.sh
#
# Target: CPython 3.12 on x86-64 Linux (the device image's python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=${WHEELS:-.whl}
PYVER=${WHEEL_PYTHON_VERSION:-3.12}
grep -qxF "/$DEST/" .git/info/exclude 2>/dev/null || echo "/$DEST/" >> .git/info/exclude
mkdir -p "$DEST"
# Pure-Python and binary wheels, pinned to the versions setup.py's tests run with.
PKGS=(ml-collections==1.1.0 open-flamingo==2.0.1 einops-exts==0.0.4 grain==0.2.18
      array-record==0.8.6 portpicker==1.6.0 tensorboardX==2.6.5 sentencepiece==0.2.3
      msgpack==1.2.4 pillow==13.0.0)
PLATFORMS=()
for p in manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_27_x86_64 manylinux_2_28_x86_64 \
         manylinux_2_31_x86_64 manylinux_2_34_x86_64 manylinux_2_35_x86_64; do
  PLATFORMS+=(--platform "$p")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" \
  --implementation cp "${PLATFORMS[@]}" -d "$DEST" "${PKGS[@]}"
ls -l "$DEST"
