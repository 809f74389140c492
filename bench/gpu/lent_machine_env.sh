# Sourced by the bench/gpu/run_*.sh scripts: $OUT (the device tool's output folder, or
# bench/gpu/out), wheels from .whl/ for packages the lent machine lacks (see run_lent_gpu.sh),
# and the repository on PYTHONPATH (nothing is pip-installed there).
OUT=${OUT:-bench/gpu/out}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1 TORCHDYNAMO_DISABLE=1
