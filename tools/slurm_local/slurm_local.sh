#!/usr/bin/env bash
# A real SLURM cluster on this host, by hand (no systemd): munged, a private MariaDB, slurmdbd,
# slurmctld and NODES slurmd instances (emulated nodes node1..nodeN), for the launch tests.
#
#   tools/slurm_local/slurm_local.sh start    # prints the SLURM_CONF to export
#   tools/slurm_local/slurm_local.sh status
#   tools/slurm_local/slurm_local.sh stop     # stops, by pid, only what `start` started
#
# Needs root and Debian's packages: slurmctld slurmd slurm-client slurmdbd munge mariadb-server.
# Everything (configs, state, logs, the database) lives under SLURM_STATE_DIR, wiped at start so
# job ids and the accounting database always start together. Nothing in /etc is written, except
# a munge key when the package did not create one. Environment knobs (defaults):
#   SLURM_STATE_DIR=/tmp/pr2-slurm NODES=2 CPUS=$(nproc) PARTITION=debug ACCOUNT=ci
#   CTLD_PORT=16817 DBD_PORT=16819 DB_PORT=13306 SLURMD_PORT=17001
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
STATE=${SLURM_STATE_DIR:-/tmp/pr2-slurm}
NODES=${NODES:-2}
CPUS=${CPUS:-$(nproc)}
PARTITION=${PARTITION:-debug}
ACCOUNT=${ACCOUNT:-ci}
CLUSTER=${CLUSTER:-pr2ci}
CTLD_PORT=${CTLD_PORT:-16817}
DBD_PORT=${DBD_PORT:-16819}
DB_PORT=${DB_PORT:-13306}
SLURMD_PORT=${SLURMD_PORT:-17001}
HOST=$(hostname -s)
RUN=$STATE/run
export SLURM_CONF=$STATE/etc/slurm.conf

log() { echo "[slurm_local] $*" >&2; }

wait_for() {  # $1 seconds, $2.. command; polls every 0.5 s; rc 99 from the command = give up
  local deadline=$((SECONDS + $1)) rc; shift
  while true; do
    rc=0; "$@" >/dev/null 2>&1 || rc=$?
    if ((rc == 0)); then return 0; fi
    if ((rc == 99 || SECONDS >= deadline)); then return 1; fi
    sleep 0.5
  done
}

render() {  # $1 template, $2 output
  sed -e "s|@STATE@|$STATE|g" -e "s|@HOST@|$HOST|g" -e "s|@NODES@|$NODES|g" \
    -e "s|@CPUS@|$CPUS|g" -e "s|@MEM_MB@|${MEM_MB:-2000}|g" -e "s|@PARTITION@|$PARTITION|g" \
    -e "s|@CLUSTER@|$CLUSTER|g" -e "s|@CTLD_PORT@|$CTLD_PORT|g" -e "s|@DBD_PORT@|$DBD_PORT|g" \
    -e "s|@DB_PORT@|$DB_PORT|g" -e "s|@DB_PASS@|$DB_PASS|g" \
    -e "s|@SLURMD_PORTS@|$SLURMD_PORT-$((SLURMD_PORT + NODES - 1))|g" "$1" >"$2"
}

start_munge() {
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    log "munged already running: using it (and leaving it running at stop)"
    return
  fi
  if [ ! -s /etc/munge/munge.key ]; then
    log "creating /etc/munge/munge.key"
    mkdir -p /etc/munge && mungekey -c -k /etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key && chmod 600 /etc/munge/munge.key
  fi
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
  wait_for 10 test -s /run/munge/munged.pid
  cp /run/munge/munged.pid "$RUN/munged.pid"
  wait_for 10 bash -c 'munge -n | unmunge' || { log "munged does not answer"; return 1; }
}

mariadb_ready() {  # $1 socket; fails at once when mariadbd has exited
  kill -0 "$(cat "$RUN/mariadbd.launched")" 2>/dev/null || return 99
  mariadb --socket="$1" -uroot -e "select 1"
}

start_mariadb() {
  local data=$STATE/mysql sock=$STATE/mysqld/mysqld.sock
  mkdir -p "$data" "$STATE/mysqld" && chown mysql:mysql "$data" "$STATE/mysqld"
  mariadb-install-db --user=mysql --datadir="$data" --auth-root-authentication-method=socket \
    --skip-test-db >"$STATE/log/mariadb-install.log" 2>&1
  # mariadbd stays in the foreground: its pid is $!.
  /usr/sbin/mariadbd --user=mysql --datadir="$data" --bind-address=127.0.0.1 --port="$DB_PORT" \
    --socket="$sock" --pid-file="$STATE/mysqld/mariadbd.pid" --skip-log-bin \
    --innodb-buffer-pool-size=64M </dev/null >"$STATE/log/mariadbd.log" 2>&1 &
  echo $! >"$RUN/mariadbd.launched"
  wait_for 60 mariadb_ready "$sock" ||
    { log "MariaDB did not come up: $STATE/log/mariadbd.log"; tail -5 "$STATE/log/mariadbd.log" >&2; return 1; }
  mariadb --socket="$sock" -uroot <<SQL
CREATE DATABASE slurm_acct_db;
CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
CREATE USER 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
SQL
}

nodes_idle() {  # all NODES nodes idle (or mixed/allocated: up and usable)
  [ "$(sinfo -h -N -o '%N %t' | grep -cE ' (idle|mix|alloc)$')" -ge "$NODES" ]
}

start() {
  [ "$(id -u)" = 0 ] || { log "needs root"; exit 1; }
  for bin in slurmctld slurmd slurmdbd munged mariadbd sbatch sacctmgr; do
    command -v "$bin" >/dev/null || [ -x "/usr/sbin/$bin" ] ||
      { log "missing $bin: apt-get install slurmctld slurmd slurm-client slurmdbd munge mariadb-server"; exit 1; }
  done
  if [ -d "$RUN" ] && ls "$RUN"/*.pid >/dev/null 2>&1; then
    log "a previous cluster under $STATE is still recorded: stopping it first"
    stop
  fi
  rm -rf "$STATE"
  mkdir -p "$STATE"/{etc,state,log,run} && chmod 755 "$STATE"
  for i in $(seq 1 "$NODES"); do mkdir -p "$STATE/spool/node$i"; done
  DB_PASS=$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')
  render "$HERE/slurm.conf.in" "$STATE/etc/slurm.conf"
  render "$HERE/slurmdbd.conf.in" "$STATE/etc/slurmdbd.conf"
  chmod 600 "$STATE/etc/slurmdbd.conf"

  start_munge
  start_mariadb
  /usr/sbin/slurmdbd
  wait_for 30 sacctmgr -n list cluster || { log "slurmdbd did not answer: $STATE/log/slurmdbd.log"; return 1; }
  sacctmgr -i add cluster "$CLUSTER" >/dev/null
  /usr/sbin/slurmctld
  wait_for 30 scontrol ping || { log "slurmctld did not answer: $STATE/log/slurmctld.log"; return 1; }
  for i in $(seq 1 "$NODES"); do /usr/sbin/slurmd -N "node$i"; done
  wait_for 60 nodes_idle || { sinfo >&2 || true; log "nodes not idle: $STATE/log/"; return 1; }
  sacctmgr -i add account "$ACCOUNT" cluster="$CLUSTER" >/dev/null
  sacctmgr -i add user "$(id -un)" account="$ACCOUNT" cluster="$CLUSTER" >/dev/null
  sinfo >&2
  log "up: export SLURM_CONF=$SLURM_CONF"
  echo "$SLURM_CONF"
}

stop_pidfile() {  # $1 pid file; TERM, wait up to 15 s, then KILL
  local file=$1 pid
  [ -s "$file" ] || return 0
  pid=$(cat "$file")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    if kill -0 "$pid" 2>/dev/null; then log "killing $pid ($file)"; kill -9 "$pid" 2>/dev/null || true; fi
  fi
  rm -f "$file"
}

stop() {
  [ -d "$RUN" ] || { log "nothing recorded under $STATE"; return 0; }
  for file in "$RUN"/slurmd-*.pid "$RUN/slurmctld.pid" "$RUN/slurmdbd.pid"; do
    [ -e "$file" ] && stop_pidfile "$file"
  done
  if [ -s "$RUN/mariadbd.launched" ]; then stop_pidfile "$RUN/mariadbd.launched"; fi
  if [ -s "$RUN/munged.pid" ]; then stop_pidfile "$RUN/munged.pid"; fi
  log "stopped"
}

status() {
  local file
  for file in "$RUN"/*.pid "$RUN"/*.launched; do
    [ -s "$file" ] || continue
    if kill -0 "$(cat "$file")" 2>/dev/null; then echo "up   $(basename "$file") $(cat "$file")"
    else echo "dead $(basename "$file") $(cat "$file")"; fi
  done
  sinfo 2>/dev/null || true
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
