#!/usr/bin/env bash
# Launch tests in their own venv (.venv-launch: nemo-run 0.11.1 + leptonai 0.27.3 + the trainer),
# against a real SLURM on localhost: Debian's slurmctld/slurmd/slurmdbd, munge and MariaDB,
# started by hand with two emulated nodes (tools/slurm_local/slurm_local.sh) and stopped by pid
# on exit. The SLURM submission tests may skip only when slurmctld cannot start; this script
# then says so loudly. Called from .ci/run; runnable alone (needs root for apt and the daemons).
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 TORCHDYNAMO_DISABLE=1 OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
VENV=.venv-launch

loud() {
  echo "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
  echo "!!! $*"
  echo "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
}

echo "=== launch venv ($VENV: nemo-run==0.11.1, leptonai==0.27.3; newer leptonai breaks import)"
if [ ! -x "$VENV/bin/python" ]; then python3 -m venv "$VENV"; fi
"$VENV/bin/pip" install -q -U pip 2>&1 | grep -v "^WARNING: Location" || true
"$VENV/bin/pip" install -q torch==2.13.0 -r requirements.txt "nemo-run==0.11.1" "leptonai==0.27.3" \
  2>&1 | grep -v "^WARNING: Location" || true
"$VENV/bin/pip" install -q --no-deps -e . 2>&1 | grep -v "^WARNING: Location" || true
"$VENV/bin/python" -c "import nemo_run, leptonai; print('nemo-run', nemo_run.__version__)"

echo "=== SLURM packages"
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  apt-get update -q >/dev/null || echo "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    slurmctld slurmd slurm-client slurmdbd munge mariadb-server >/dev/null ||
    echo "apt-get install of the SLURM packages failed"
else
  echo "not root or no apt-get: using whatever SLURM is installed"
fi

echo "=== localhost SLURM (2 emulated nodes, accounting via slurmdbd + MariaDB)"
SLURM_STATE_DIR=$(mktemp -d /tmp/pr2-slurm-ci.XXXXXX)
NEMO_TMP=$(mktemp -d /tmp/pr2-launch-tests.XXXXXX)
export SLURM_STATE_DIR
cleanup() {
  SLURM_STATE_DIR=$SLURM_STATE_DIR tools/slurm_local/slurm_local.sh stop || true
  rm -rf "$SLURM_STATE_DIR" "$NEMO_TMP"
}
trap cleanup EXIT
if conf=$(NODES=2 tools/slurm_local/slurm_local.sh start); then
  export SLURM_CONF=$conf PR2_REQUIRE_SLURM=1  # from here on a skipped SLURM test is a failure
else
  loud "SLURM TESTS WILL BE SKIPPED: slurmctld could not start on this machine (logs below)"
  tail -n 20 "$SLURM_STATE_DIR"/log/*.log 2>/dev/null || true
fi

echo "=== launch tests ($VENV): dry runs, LocalExecutor torchrun x2, real SLURM submissions"
# torchx and srun start torchrun from PATH; a private basetemp keeps job folders out of reach
# of other pytest runs' cleanup.
PATH="$PWD/$VENV/bin:$PATH" "$VENV/bin/python" -m pytest -q -p no:cacheprovider -rs \
  --basetemp "$NEMO_TMP/pytest" tests/slurm tests/unit/test_launch.py \
  tests/unit/test_launch_dryrun.py tests/unit/test_recipes.py tests/unit/test_recipe_weights.py
if [ -z "${PR2_REQUIRE_SLURM:-}" ]; then
  loud "SLURM SUBMISSION TESTS WERE SKIPPED: slurmctld could not start"
fi
