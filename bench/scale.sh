#!/usr/bin/env bash
# Scale benchmark for the supervisor: one litestreamd daemon with N idle databases and M busy
# ones (local-directory replicas). Prints RSS, open file descriptors, CPU over an idle window,
# the time from start to READY=1 (sd_notify, received here), and the time a SIGHUP takes when one
# file among N changes.
#   bench/scale.sh [IDLE=1000] [BUSY=100] [SECONDS=30]   (LITESTREAMD_BIN=... skips the build)
# The comparison with Litestream 0.3.13/0.5.17 (100 and 1,000 idle databases in one process) is
# figure 7 of bench/run.sh (bench/scalebench.py); this script adds busy databases and a reload.
set -euo pipefail
cd "$(dirname "$0")/.."
IDLE=${1:-1000}; BUSY=${2:-100}; WINDOW=${3:-30}
if [ -n "${LITESTREAMD_BIN:-}" ]; then
  BIN="$LITESTREAMD_BIN"
else
  export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/litestreamd-target}"
  cargo build --release --quiet --bin litestreamd
  BIN="$CARGO_TARGET_DIR/release/litestreamd"
fi
# `litestreamd run` reads LITESTREAMD_* variables as configuration and rejects unknown keys.
for v in $(compgen -e | grep '^LITESTREAMD_' || true); do unset "$v"; done
W=$(mktemp -d /tmp/litestreamd-scale.XXXXXX)
trap 'kill $PID 2>/dev/null || true; kill $WRITER 2>/dev/null || true; kill $LISTENER 2>/dev/null || true; rm -rf "$W"' EXIT
mkdir -p "$W/dbs.d" "$W/data" "$W/replicas"
python3 - "$W" "$IDLE" "$BUSY" <<'PY'
import sqlite3, sys, os
w, idle, busy = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for i in range(idle + busy):
    name = f"db{i:05d}"
    p = f"{w}/data/{name}.db"
    c = sqlite3.connect(p); c.execute("pragma journal_mode=wal"); c.execute("create table t(v)"); c.execute("insert into t values (randomblob(100))"); c.commit(); c.close()
    open(f"{w}/dbs.d/{name}.toml", "w").write(f'path = "{p}"\n[[replicas]]\nname = "local"\ntype = "file"\npath = "{w}/replicas/{name}"\n')
open(f"{w}/litestreamd.toml", "w").write(f'dbs_dir = "dbs.d"\nmetrics_addr = ""\ncontrol_socket = "{w}/control.sock"\n')
PY
# READY=1 (sd_notify) arrives on a datagram socket of our own: its time is start-up's end.
python3 - "$W" <<'PY' &
import socket, sys, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(f"{sys.argv[1]}/notify.sock")
open(f"{sys.argv[1]}/notify.bound", "w").close()
while True:
    msg = s.recv(65536).decode(errors="replace")
    if "READY=1" in msg.split("\n"):
        open(f"{sys.argv[1]}/ready.tmp", "w").write(repr(time.time()))
        break
PY
LISTENER=$!
until [ -e "$W/notify.bound" ]; do sleep 0.05; done
start=$(date +%s.%N)
NOTIFY_SOCKET="$W/notify.sock" "$BIN" run --config "$W/litestreamd.toml" 2> "$W/daemon.log" &
PID=$!
# Wait until every database has its first snapshot.
until [ "$(find "$W/replicas" -name '*.snapshot.lz4' | wc -l)" -ge $((IDLE + BUSY)) ]; do sleep 1; done
ready=$(date +%s.%N)
wait $LISTENER
sd_ready=$(cat "$W/ready.tmp")
# Busy databases: one small transaction per database per 100 ms.
python3 - "$W" "$IDLE" "$BUSY" <<'PY' &
import sqlite3, sys, time
w, idle, busy = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
conns = [sqlite3.connect(f"{w}/data/db{i:05d}.db", timeout=5) for i in range(idle, idle + busy)]
while True:
    for c in conns:
        c.execute("insert into t values (randomblob(100))"); c.commit()
    time.sleep(0.1)
PY
WRITER=$!
sleep 5
ticks() { awk '{print $14 + $15}' /proc/$PID/stat; }
t0=$(ticks); sleep "$WINDOW"; t1=$(ticks)
hz=$(getconf CLK_TCK)
rss_kb=$(awk '/VmRSS/ {print $2}' /proc/$PID/status)
hwm_kb=$(awk '/VmHWM/ {print $2}' /proc/$PID/status)
fds=$(ls /proc/$PID/fd | wc -l)
kill $WRITER; wait $WRITER 2>/dev/null || true
sleep 3
# Idle CPU with the busy writers stopped.
i0=$(ticks); sleep "$WINDOW"; i1=$(ticks)
# Steady idle: once park_after (60 s) has passed since the last write, the busy ones are parked
# too. PERF_DATA=file records a profile of a further window (perf record -g).
rest=$((65 - 3 - WINDOW)); [ "$rest" -gt 0 ] && sleep "$rest"
s0=$(ticks); sleep "$WINDOW"; s1=$(ticks)
if [ -n "${PERF_DATA:-}" ]; then
  perf record -F 499 -g -p "$PID" -o "$PERF_DATA" -- sleep "$WINDOW" > /dev/null 2>&1
fi
# Reload: change one file among all of them.
echo 'retention = "48h"' >> "$W/dbs.d/db00000.toml"; sed -i 's/^retention = "48h"$//' "$W/dbs.d/db00000.toml"
sed -i 's|^name = "local"|name = "local2"|' "$W/dbs.d/db00000.toml"
r0=$(date +%s.%N); kill -HUP $PID
until grep -q 'reload done' "$W/daemon.log"; do sleep 0.01; done
r1=$(date +%s.%N)
kill -TERM $PID; wait $PID || true
python3 - <<PY
idle, busy = $IDLE, $BUSY
n = idle + busy
cpu_busy = ($t1 - $t0) / $hz / $WINDOW * 100
cpu_idle = ($i1 - $i0) / $hz / $WINDOW * 100
cpu_steady = ($s1 - $s0) / $hz / $WINDOW * 100
print(f"databases           {n} ({idle} idle, {busy} busy at 10 tx/s each)")
print(f"start to READY=1     {$sd_ready - $start:.1f} s")
print(f"start to all snapshotted  {$ready - $start:.1f} s")
print(f"RSS                 {$rss_kb/1024:.1f} MiB (peak {$hwm_kb/1024:.1f} MiB) = {$rss_kb/n:.0f} KiB per database")
print(f"open fds            {$fds} = {$fds/n:.2f} per database")
print(f"CPU, busy window    {cpu_busy:.1f}% of one core")
print(f"CPU, all idle       {cpu_idle:.2f}% of one core (3 s after the writers stopped)")
print(f"CPU, steady idle    {cpu_steady:.2f}% of one core (65 s after: all parked)")
print(f"SIGHUP, 1 of {n} changed: {($r1 - $r0)*1000:.0f} ms until 'reload done'")
PY
