"""Figure 8: what a restore drill costs, from a directory and from S3 (s3s-fs), in the same run.

A --db-mib database is replicated by `litestreamd run` while a writer commits 50 small
transactions a second. After 30 s of baseline, per target, --reps times in turn:
  drill     `litestreamd drill app` (wall time: waiting for the replica to reach the drill's
            position, restore, integrity_check with the restored file's checksum, and the
            source's checksum, which runs beside the restore from S3 and beside the
            integrity check from a directory)
  restore   `litestreamd restore` of the same replica to a new file right after the drill,
            under the same load (daemon, writer, sampler) at normal priority: the main part of
            a drill, which runs at nice 10 in the idle I/O class
  read      reading the database file once (`dd bs=1M` to /dev/null): one checksum pass is
            bounded by it (xxh3 runs at memory speed)
The page cache is dropped before each drill, restore and read (when permitted): a drill reads
a replica and a database that are not in memory. Figures are medians over the reps.
  lag       the replica's lag (`status --json`, sampled every 100 ms) before and during drills
  commit    the writer's p99 and longest commit in the 30 s before the drills and during them
Claim checked (issue 17): drill <= restore + read, and the lag during a drill stays at its
usual level.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import tools
from common import (BenchError, drop_caches, fmt_s, log, percentile, ratio, rm_db, spawn, stop,
                    table, tail, wait_for)


BASELINE = 30  # seconds of lag and commit timing before the drill
BASELINE_QUICK = 1


def status(a, sock: Path) -> list[dict]:
    out = subprocess.run([a.litestreamd, "status", "--json", "--socket", str(sock)],
                         capture_output=True, text=True, timeout=30)
    try:
        return json.loads(out.stdout)
    except json.JSONDecodeError:
        return []


def caught_up(a, sock: Path) -> bool:
    st = status(a, sock)
    return bool(st) and all(r.get("pos") == st[0].get("pos") and r.get("pos") is not None
                            for r in st[0]["replicas"])


class Writer:
    """Small commits at a fixed rate in a thread; the longest commit of each phase."""

    def __init__(self, db: Path, rate: float):
        self.db, self.rate = db, rate
        # "drop": while the bench syncs and drops the page cache before the drill (a global
        # sync and a cold database stall commits by themselves; not the drill's doing).
        self.times: dict[str, list[float]] = {"before": [], "drop": [], "during": [],
                                              "after": []}
        self.phase = "before"
        self.stop = threading.Event()
        self.t = threading.Thread(target=self.run, daemon=True)
        self.t.start()

    def run(self) -> None:
        con = sqlite3.connect(self.db, isolation_level=None, timeout=30)
        con.execute("PRAGMA busy_timeout=30000")
        con.execute("CREATE TABLE IF NOT EXISTS w(id INTEGER PRIMARY KEY, v BLOB)")
        i = 0
        t0 = time.monotonic()
        while not self.stop.is_set():
            due = t0 + i / self.rate
            now = time.monotonic()
            if due > now:
                time.sleep(due - now)
            s, phase = time.monotonic(), self.phase
            con.execute("INSERT INTO w(v) VALUES (randomblob(200))")
            self.times[phase].append(time.monotonic() - s)
            i += 1
        con.close()

    def close(self) -> None:
        self.stop.set()
        self.t.join()


def lag_sampler(a, sock: Path, out: list, done: threading.Event) -> threading.Thread:
    def run():
        while not done.is_set():
            st = status(a, sock)
            if st:
                out.append(max(r.get("lag_seconds", 0.0) for r in st[0]["replicas"]))
            time.sleep(0.1)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def read_seconds(path: Path) -> float:
    t = time.monotonic()
    subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=1M"], check=True,
                   capture_output=True)
    return time.monotonic() - t


def one_rep(a, d: Path, name: str, db: Path, sock: Path, url: str, env: dict, w: "Writer",
            lg: Path) -> dict:
    """One drill and, right after it, one plain restore of the same replica under the same
    load, each from a cold page cache, then one read of the database."""
    w.phase = "drop"
    cold = drop_caches()
    lags_during: list[float] = []
    done = threading.Event()
    w.phase = "during"
    th = lag_sampler(a, sock, lags_during, done)
    t = time.monotonic()
    out = subprocess.run([a.litestreamd, "drill", "app", "--json", "--socket", str(sock)],
                         capture_output=True, text=True, env=env)
    drill_s = time.monotonic() - t
    done.set()
    th.join()
    w.phase = "after"
    if out.returncode != 0:
        raise BenchError(f"{name}: drill exited {out.returncode}: {out.stdout}{out.stderr}"
                         f"\n{tail(lg)}")
    res = json.loads(out.stdout)[0]
    if res["result"] != "passed":
        raise BenchError(f"{name}: drill {res}")
    # The plain restore under the same load (the daemon replicating, the writer, the
    # sampler), at normal priority: what the drill is compared with.
    restored = d / "restored.db"
    rm_db(restored)
    drop_caches()
    t = time.monotonic()
    r = subprocess.run([a.litestreamd, "--log-level", "warn", "restore", "-o",
                        str(restored), url], capture_output=True, text=True, env=env)
    restore_s = time.monotonic() - t
    if r.returncode != 0:
        raise BenchError(f"{name}: restore failed: {r.stderr}")
    rm_db(restored)
    drop_caches()
    read_s = read_seconds(db)
    return {"cold": cold, "drill_s": drill_s, "restore_s": restore_s, "read_s": read_s,
            "bytes": res["restored_bytes"], "lags_during": lags_during}


def one_target(a, work: Path, name: str, db: Path, replica_toml: str, url: str,
               env: dict) -> dict:
    d = work / f"drill-{name}"
    shutil.rmtree(d, ignore_errors=True)
    (d / "dbs.d").mkdir(parents=True)
    sock = d / "control.sock"
    (d / "litestreamd.toml").write_text(
        f'dbs_dir = "dbs.d"\nmetrics_addr = ""\ncontrol_socket = "{sock}"\n'
        f'state_dir = "{d / "state"}"\n[defaults]\ndrill_dir = "{d / "drills"}"\n'
        'monitor_interval = "100ms"\nsync_interval = "100ms"\n')
    (d / "dbs.d" / "app.toml").write_text(f'path = "{db}"\n' + replica_toml)
    lg = d / "daemon.log"
    p = spawn([a.litestreamd, "--log-level", os.environ.get("DRILL_LOG", "info"), "run", "--config",
               str(d / "litestreamd.toml")], lg, env=env)
    try:
        wait_for(lambda: caught_up(a, sock), 600, f"{name}: the first snapshot", p, lg)
        w = Writer(db, 50)
        lags_before: list[float] = []
        done = threading.Event()
        th = lag_sampler(a, sock, lags_before, done)
        # As long as a drill takes, and more: the engine's own checkpoints stall a commit now
        # and then whether or not a drill runs, and the baseline must see them too.
        time.sleep(BASELINE_QUICK if a.quick else BASELINE)
        done.set()
        th.join()
        reps = []
        for k in range(max(1, a.reps)):
            reps.append(one_rep(a, d, name, db, sock, url, env, w, lg))
            log(f"  drill {name} run {k + 1}/{max(1, a.reps)}: drill {reps[-1]['drill_s']:.2f} s, "
                f"restore {reps[-1]['restore_s']:.2f} s, read {reps[-1]['read_s']:.2f} s")
        w.close()
    finally:
        stop(p)
    med = lambda k: statistics.median(r[k] for r in reps)
    cold = all(r["cold"] for r in reps)
    lags_during = [x for r in reps for x in r["lags_during"]]
    return {
        "target": name, "cold": cold, "reps": len(reps),
        "drill_s": med("drill_s"), "restore_s": med("restore_s"), "read_s": med("read_s"),
        "drill_range": [min(r["drill_s"] for r in reps), max(r["drill_s"] for r in reps)],
        "bound_ratios": [r["drill_s"] / bound(r) for r in reps],
        "bytes": reps[0]["bytes"],
        "lag_before_max": max(lags_before, default=0.0),
        "lag_during_max": max(lags_during, default=0.0),
        "commit_before_ms": max(w.times["before"], default=0.0) * 1000,
        "commit_during_ms": max(w.times["during"], default=0.0) * 1000,
        "commit_drop_ms": max(w.times["drop"], default=0.0) * 1000,
        "commit_before_p99_ms": percentile(w.times["before"] or [0.0], 99) * 1000,
        "commit_during_p99_ms": percentile(w.times["during"] or [0.0], 99) * 1000,
        "commits_before": len(w.times["before"]),
        "commits_during": len(w.times["during"]),
    }


def bench_drill(a, work: Path, s3, make_db) -> dict:
    db = work / "drill.db"
    rm_db(db)
    make_db(db, a.db_mib)
    env = tools.Litestreamd(a.litestreamd).env()
    rows = []
    replica = work / "drill-replica"
    shutil.rmtree(replica, ignore_errors=True)
    file_toml = f'[[replicas]]\nname = "dir"\ntype = "file"\npath = "{replica}"\n'
    rows.append(one_target(a, work, "directory", db, file_toml, f"file://{replica}", env))
    shutil.rmtree(replica, ignore_errors=True)
    shutil.rmtree(work / f".{db.name}-litestream", ignore_errors=True)
    if s3 is not None:
        target = tools.S3Target(s3.port, "drill")
        url = tools.Litestreamd.url(target)
        s3_toml = f'[[replicas]]\nname = "s3"\nurl = "{url}"\n'
        rows.append(one_target(a, work, "S3 (s3s-fs)", db, s3_toml, url, env))
        s3.remove("drill")
    rm_db(db)
    shutil.rmtree(work / f".{db.name}-litestream", ignore_errors=True)
    return {"db_mib": a.db_mib, "rows": rows,
            "baseline_s": BASELINE_QUICK if a.quick else BASELINE}


def bound(r: dict) -> float:
    """Issue 17's bound for a row: the restore plus one checksum pass (a read of the database)."""
    return r["restore_s"] + r["read_s"]


def render(R: dict) -> list[str]:
    cold = all(r.get("cold") for r in R["rows"])
    reps = max((r.get("reps", 1) for r in R["rows"]), default=1)
    out = [f"### Restore drill of a {R['db_mib']} MiB database, medians of {reps} (writer: 50 commits/s; page "
           f"cache {'dropped before the drill, the restore and the read' if cold else 'NOT dropped (no permission): warm'})", ""]
    rows = []
    for r in R["rows"]:
        lim = bound(r)
        rows.append([
            r["target"],
            f"{fmt_s(r['drill_s'])} [{fmt_s(r['drill_range'][0])}-{fmt_s(r['drill_range'][1])}]"
            if "drill_range" in r else fmt_s(r["drill_s"]),
            fmt_s(r["restore_s"]), fmt_s(r["read_s"]), fmt_s(lim), ratio(r["drill_s"], lim),
            f"{r['lag_before_max']:.1f} s", f"{r['lag_during_max']:.1f} s",
            f"{r['commit_before_p99_ms']:.0f} / {r['commit_before_ms']:.0f} ms",
            f"{r['commit_during_p99_ms']:.0f} / {r['commit_during_ms']:.0f} ms",
            f"{r['commit_drop_ms']:.0f} ms" if "commit_drop_ms" in r else "n/a",
        ])
    b = R.get("baseline_s", BASELINE)
    out.append(table(["target", "drill [min-max]", "restore", "read db", "restore + read",
                      "drill / that", f"lag max before ({b} s)", "lag max during",
                      f"commit p99 / max before ({b} s)", "commit p99 / max during",
                      "commit max in sync + drop_caches"], rows))
    return out


def targets(R: dict) -> list[tuple[str, bool]]:
    """(target text, met) for issue 17's drill bound, per target."""
    out = []
    for r in R["rows"]:
        lim = bound(r)
        per_run = (f"; per run {min(r['bound_ratios']):.2f}-{max(r['bound_ratios']):.2f}x"
                   if r.get("bound_ratios") else "")
        out.append((f"drill from {r['target']} at most the restore plus one read of the database "
                    f"({r['drill_s']:.2f} s vs {lim:.2f} s, {r['drill_s'] / lim:.2f}x{per_run})",
                    r["drill_s"] <= lim))
    return out
