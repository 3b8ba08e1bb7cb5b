#!/usr/bin/env bash
# The prepared GPU run (python -m bench.gpu) on a lent GPU machine that can install nothing.
#
#   bench/gpu_run.sh fetch     here, with PyPI: fla's wheels into bench/wheels/ (gitignored, ~1 MB)
#   bench/gpu_run.sh [ARGS]    there: unpack them into bench/wheels/site, put it on PYTHONPATH, run
#                              python -m bench.gpu ARGS (< 8 min; writes bench/results/gpu.json)
#
# From a session with the device tool: run(command="bash bench/gpu_run.sh", carry=["bench/wheels"],
# timeout_s=540); then commit bench/results/gpu.json.
#
# flash-linear-attention is a thin package (fla.layers, fla.models; it requires transformers>=5.6.2);
# the kernels (fla.ops, all we call) are in fla-core, which needs einops. We carry all three and
# install fla-core + einops: the image's transformers may be older, and fla's __init__ only skips
# fla.layers cleanly when that package is absent.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=bench/wheels
FLA_VERSION=0.6.0

if [ "${1:-}" = fetch ]; then
    "${PIP:-.venv/bin/pip}" download --no-deps -d "$WHEELS" \
        "flash-linear-attention==$FLA_VERSION" "fla-core==$FLA_VERSION" einops
    exit 0
fi

PY="${PYTHON:-python3}"
SITE="$WHEELS/site"
rm -rf "$SITE"
mkdir -p "$SITE"
shopt -s nullglob
wheels=("$WHEELS"/fla_core-*.whl "$WHEELS"/einops-*.whl)
if [ ${#wheels[@]} -lt 2 ]; then
    echo "bench/gpu_run.sh: no fla-core/einops wheels in $WHEELS (run 'bench/gpu_run.sh fetch' where PyPI is reachable); the fla rows will say fla=false" >&2
elif "$PY" -m pip --version >/dev/null 2>&1; then
    "$PY" -m pip install --quiet --no-deps --no-index --target "$SITE" "${wheels[@]}"
else  # wheels are zip files: pure-Python ones unpack into a path entry as they are
    for w in "${wheels[@]}"; do "$PY" -m zipfile -e "$w" "$SITE"; done
fi
export PYTHONPATH="$PWD/$SITE${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import fla.ops.gated_delta_rule as m, fla; print('fla', fla.__version__, 'from', m.__file__)" \
    || echo "bench/gpu_run.sh: fla does not import (above); continuing without it" >&2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec "$PY" -m bench.gpu "$@"
