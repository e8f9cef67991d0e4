"""Shared helpers of the benchmark driver: child processes, /proc sampling, waiting, the v0.3
replica layout on disk, SQLite checks, statistics and table formatting, and the load generator.

Every process started through spawn()/timed_run() is recorded in CHILDREN and stopped by pid on
any exit path (stop_all_children)."""

from __future__ import annotations

import array
import hashlib
import json
import os
import random
import re
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path

PAGE_SIZE = 4096
BLOB = 1000  # bytes of random data per row of the restore database
CLK_TCK = os.sysconf("SC_CLK_TCK")
MB = 1_000_000
MiB = 1 << 20
TOKEN = 32  # random bytes at the start of each load-generator row, unique per commit

# Processes this script started and has not yet reaped; stopped (by pid) on any exit path.
CHILDREN: dict[int, subprocess.Popen] = {}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class BenchError(RuntimeError):
    pass


# --------------------------------------------------------------------------------------------
# processes

def spawn(argv, log_path: Path, **kw) -> subprocess.Popen:
    out = open(log_path, "ab")
    p = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **kw)
    out.close()
    CHILDREN[p.pid] = p
    return p


def stop(p: subprocess.Popen, timeout: float = 60.0) -> int:
    """SIGTERM, wait (both tools do a final sync on SIGTERM), SIGKILL as a last resort."""
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            log(f"pid {p.pid} did not stop within {timeout}s; killing it")
            p.kill()
            p.wait()
    CHILDREN.pop(p.pid, None)
    return p.returncode


def stop_all_children() -> None:
    for pid, p in list(CHILDREN.items()):
        if p.poll() is None:
            try:
                p.send_signal(signal.SIGTERM)
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            except ProcessLookupError:
                pass
        CHILDREN.pop(pid, None)


def tail(path: Path, n: int = 25) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


# A small Python process, started before the benchmark grows, that starts every timed command.
# The kernel charges a child's peak RSS (ru_maxrss) with the peak of the process it was forked
# or vforked from, up to the exec: started from this script (hundreds of MiB after building the
# databases) every command would report at least that. The launcher stays at ~10 MiB.
_LAUNCHER_CODE = r"""
import json, os, sys, time
for line in sys.stdin:
    req = json.loads(line)
    out = os.open(req["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    null = os.open(os.devnull, os.O_RDONLY)
    t0 = time.perf_counter()
    pid = os.posix_spawnp(req["argv"][0], req["argv"], req["env"], file_actions=[
        (os.POSIX_SPAWN_DUP2, null, 0), (os.POSIX_SPAWN_DUP2, out, 1),
        (os.POSIX_SPAWN_DUP2, out, 2)])
    os.close(out)
    os.close(null)
    print(json.dumps({"pid": pid}), flush=True)
    _, status, ru = os.wait4(pid, 0)
    print(json.dumps({"rc": os.waitstatus_to_exitcode(status), "wall": time.perf_counter() - t0,
                      "user": ru.ru_utime, "sys": ru.ru_stime, "maxrss_kib": ru.ru_maxrss}),
          flush=True)
"""
_launcher: subprocess.Popen | None = None


def start_launcher() -> None:
    """Starts the launcher (call it early, while this process is small)."""
    global _launcher
    if _launcher is None:
        _launcher = subprocess.Popen([sys.executable, "-c", _LAUNCHER_CODE], text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        CHILDREN[_launcher.pid] = _launcher


def timed_run(argv, log_path: Path, env: dict | None = None) -> dict:
    """Runs a command to completion; wall time, and the child's own CPU and peak RSS (wait4)."""
    start_launcher()
    with open(log_path, "ab") as out:
        out.write(("\n$ " + " ".join(map(str, argv)) + "\n").encode())
    b0 = system_busy_seconds()
    _launcher.stdin.write(json.dumps({"argv": [str(x) for x in argv], "log": str(log_path),
                                      "env": dict(os.environ if env is None else env)}) + "\n")
    _launcher.stdin.flush()
    pid = json.loads(_launcher.stdout.readline())["pid"]
    try:
        r = json.loads(_launcher.stdout.readline())
    except BaseException:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        raise
    busy = system_busy_seconds() - b0
    if r["rc"] != 0:
        raise BenchError(f"{argv[0]} exited with {r['rc']}:\n{tail(log_path)}")
    cpu = r["user"] + r["sys"]
    wall = r["wall"]
    # Busy cores not accounted to the command: other processes, and kernel threads (writeback).
    return {"wall": wall, "cpu": cpu, "user": r["user"], "sys": r["sys"],
            "maxrss_kib": r["maxrss_kib"],
            "other_cores": max(0.0, busy - cpu) / wall}


def proc_cpu_seconds(pid: int) -> float:
    """utime+stime of every thread of the process, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_status_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise BenchError(f"{key} not in /proc/{pid}/status")


def system_busy_seconds() -> float:
    """CPU-seconds all cores spent not idle (user+nice+system+irq+softirq+steal), /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return (sum(v) - v[3] - v[4]) / CLK_TCK


def wait_quiet(max_wait: float, threshold: float = 0.25) -> float:
    """Waits (up to max_wait s) until the machine is nearly idle: under `threshold` cores busy
    over one second. Returns the busy cores of the last sample."""
    deadline = time.monotonic() + max_wait
    logged = False
    while True:
        b0, t0 = system_busy_seconds(), time.monotonic()
        time.sleep(1.0)
        busy = (system_busy_seconds() - b0) / (time.monotonic() - t0)
        if busy < threshold or time.monotonic() >= deadline:
            if logged:
                log(f"  ... {'quiet' if busy < threshold else 'still busy, going on'} "
                    f"({busy:.2f} cores busy)")
            return busy
        if not logged:
            log(f"  machine busy ({busy:.2f} cores, not ours); waiting up to {max_wait:.0f}s")
            logged = True


# --------------------------------------------------------------------------------------------
# page cache

def write_fsync_seconds(path: Path, size: int) -> float:
    """Seconds to write `size` bytes of random data to a new file in 8 MiB writes and fsync it:
    the disk's side of a restore's floor. The file is removed."""
    buf = os.urandom(8 * MiB)
    os.sync()
    t0 = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        left = size
        while left > 0:
            left -= f.write(buf[:min(left, len(buf))])
        os.fsync(f.fileno())
    elapsed = time.perf_counter() - t0
    path.unlink()
    return elapsed


def drop_caches() -> bool:
    """Writes back dirty pages and drops the page cache; False if not permitted."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------------------------
# replica layout (Litestream v0.3: generations/<gen>/snapshots/<idx>.snapshot.lz4,
#                                  generations/<gen>/wal/<idx>_<off>.wal.lz4)

SEG_RE = re.compile(r"^([0-9a-f]{8})_([0-9a-f]{8})\.wal\.lz4$")
SNAP_RE = re.compile(r"^([0-9a-f]{8})\.snapshot\.lz4$")


def generations(replica: Path) -> list[str]:
    d = replica / "generations"
    return sorted(os.listdir(d)) if d.is_dir() else []


def snapshot_files(replica: Path) -> list[Path]:
    out = []
    for g in generations(replica):
        d = replica / "generations" / g / "snapshots"
        if d.is_dir():
            out += [d / n for n in sorted(os.listdir(d)) if SNAP_RE.match(n)]
    return out


def wal_indexes(replica: Path) -> set[int]:
    out = set()
    for g in generations(replica):
        d = replica / "generations" / g / "wal"
        if d.is_dir():
            for n in os.listdir(d):
                m = SEG_RE.match(n)
                if m:
                    out.add(int(m.group(1), 16))
    return out


def wait_for(cond, timeout: float, what: str, proc: subprocess.Popen | None = None,
             log_path: Path | None = None, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"replicator exited ({proc.returncode}) while waiting for {what}:\n"
                             f"{tail(log_path) if log_path else ''}")
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout}s waiting for {what}"
                             + (f":\n{tail(log_path)}" if log_path else ""))
        time.sleep(interval)


def table_digest(path: Path, table: str = "t") -> tuple[int, str]:
    """Row count and SHA-256 of every row of `table` in id order (opened read-only)."""
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    h = hashlib.sha256()
    n = 0
    for row in con.execute(f"SELECT * FROM {table} ORDER BY id"):
        n += 1
        h.update(repr(row).encode())
    con.close()
    return n, h.hexdigest()


def integrity_check(path: Path) -> str:
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    r = con.execute("PRAGMA integrity_check").fetchall()
    con.close()
    return "; ".join(str(x[0]) for x in r[:5])


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(8 * MiB)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def rm_db(path: Path) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        p = Path(str(path) + suffix)
        if p.exists():
            p.unlink()


# --------------------------------------------------------------------------------------------
# statistics and formatting

def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "runs": values}


def fmt_s(v: float) -> str:
    return f"{v:.2f}" if v < 100 else f"{v:.0f}"


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep] + [line(r) for r in rows])


def ratio(x: float, y: float) -> str:
    return f"{x / y:.2f}" if y else "-"



def writer_main(db: str, rate: float, seconds: float, times_path: str | None = None) -> None:
    """Load generator: `rate` single-row insert transactions per second, paced on an absolute
    schedule. Each row's value is 100 random bytes whose first TOKEN bytes identify the commit.
    Prints 'ready', then one JSON line of statistics. With `times_path`, also writes the
    wall-clock time (`time.time()`, CLOCK_REALTIME) at which each commit returned, as native
    doubles, and every commit's token to `times_path + ".tok"` (the replication-lag figure finds
    the tokens in the uploaded objects)."""
    con = sqlite3.connect(db, isolation_level=None, timeout=30)
    con.execute("PRAGMA busy_timeout=30000")
    con.execute("PRAGMA synchronous=NORMAL")
    rng = random.Random(2)
    print("ready", flush=True)
    n = int(rate * seconds)
    commits = array.array("d")
    tokens = bytearray()
    t0 = time.monotonic()
    worst = 0.0
    late = 0
    for i in range(n):
        tok = rng.randbytes(TOKEN)
        value = tok + rng.randbytes(100 - TOKEN)
        due = t0 + i / rate
        now = time.monotonic()
        if due > now:
            time.sleep(due - now)
        elif now - due > 0.1:
            late += 1
        s = time.monotonic()
        con.execute("INSERT INTO t(v) VALUES (?)", (value,))
        commits.append(time.time())
        worst = max(worst, time.monotonic() - s)
        tokens += tok
    elapsed = time.monotonic() - t0
    con.close()
    if times_path:
        with open(times_path, "wb") as f:
            commits.tofile(f)
        with open(times_path + ".tok", "wb") as f:
            f.write(tokens)
    print(json.dumps({"tx": n, "elapsed": elapsed, "rate": n / elapsed,
                      "worst_commit_ms": worst * 1000, "late_by_100ms": late,
                      "first_commit": commits[0] if commits else None,
                      "last_commit": commits[-1] if commits else None}), flush=True)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def can_connect(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty list."""
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(p / 100 * len(s) + 0.5)) - 1))
    return s[k]


def start_writer(db: Path, rate: float, seconds: float, times_path: Path | None = None):
    """Starts the load generator (`bench.py --writer`, its own process so its CPU is never
    counted against a replicator) and waits until it is ready to write."""
    argv = [sys.executable, str(Path(__file__).with_name("bench.py")), "--writer", str(db),
            str(rate), str(seconds)]
    if times_path:
        argv.append(str(times_path))
    w = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    CHILDREN[w.pid] = w
    if w.stdout.readline().strip() != "ready":
        raise BenchError("writer failed to start")
    return w


def finish_writer(w) -> tuple[dict, float]:
    """Waits for the writer's statistics line; returns them and the writer's CPU seconds."""
    line = w.stdout.readline()
    _, status, ru = os.wait4(w.pid, 0)
    w.returncode = os.waitstatus_to_exitcode(status)
    CHILDREN.pop(w.pid, None)
    if w.returncode != 0 or not line:
        raise BenchError(f"writer exited with {w.returncode}")
    return json.loads(line), ru.ru_utime + ru.ru_stime


def new_wal_db(path: Path, rows: int = 0) -> None:
    """An empty WAL-mode database with the load generator's table."""
    con = sqlite3.connect(path, isolation_level=None)
    con.execute(f"PRAGMA page_size={PAGE_SIZE}")
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT NOT NULL)")
    for i in range(rows):
        con.execute("INSERT INTO t(v) VALUES (?)", (f"row {i}",))
    con.close()


def count_rows(path: Path) -> int:
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    n = con.execute("SELECT count(*) FROM t").fetchone()[0]
    con.close()
    return n


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def med(s: dict, fmt: str = "{:.2f}") -> str:
    """'median [min–max]' of a summary()."""
    return f"{fmt.format(s['median'])} [{fmt.format(s['min'])}–{fmt.format(s['max'])}]"
