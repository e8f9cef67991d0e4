"""Figure 7: many databases in one replicator process.

For each size (100 and 1,000 in full mode) and each tool: that many small WAL databases (one
table, one row), each with its own local-directory replica, all in ONE process --
`litestreamd run` with a directory of per-database TOML files, or one Litestream YAML listing
every database -- with default intervals (monitor and sync 1 s). Once every replica has its first
snapshot and a settling time has passed, an idle window (no writes) is split into --reps parts;
at the end of each part the process's RSS (VmRSS) and open file descriptors are sampled and its
CPU over the part is computed from /proc/PID/stat. The per-database cost "beyond a base" is the
difference between the two sizes divided by the difference in databases.

(bench/scale.sh remains the supervisor-only benchmark with busy databases and a SIGHUP reload.)
"""

from __future__ import annotations

import shutil
import sqlite3
import time
from pathlib import Path

from common import (BenchError, fd_count, log, med, proc_cpu_seconds, proc_status_kib, ratio,
                    spawn, stop, summary, table, tail, wait_quiet)
from tools import Tool


def make_dbs(d: Path, n: int) -> list[tuple[Path, Path]]:
    (d / "data").mkdir(parents=True)
    out = []
    for i in range(n):
        db = d / "data" / f"db{i:05d}.db"
        con = sqlite3.connect(db, isolation_level=None)
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
        con.execute("INSERT INTO t(v) VALUES (randomblob(100))")
        con.close()
        out.append((db, d / "replicas" / db.stem))
    return out


def scale_run(a, work: Path, tool: Tool, n: int) -> dict:
    d = work / f"scale-{tool.key}-{n}"
    dbs = make_dbs(d, n)
    lg = d / "replicator.log"
    if a.quiet_wait:
        wait_quiet(a.quiet_wait)
    t0 = time.monotonic()
    p = spawn(tool.multi_argv(d, dbs), lg, env=tool.env())
    try:
        deadline = time.monotonic() + (a.scale_deadline or 60 + n * 0.2)
        pending = list(dbs)
        while pending:
            pending = [x for x in pending if not tool.has_snapshot(x[1])]
            if not pending:
                break
            if p.poll() is not None:
                raise BenchError(f"{tool.label} exited with {p.returncode} while starting "
                                 f"{n} databases:\n{tail(lg)}")
            if time.monotonic() > deadline:
                raise BenchError(f"{tool.label}: {len(pending)} of {n} databases still without "
                                 f"a snapshot after {deadline - t0:.0f}s:\n{tail(lg)}")
            time.sleep(0.5)
        ready = time.monotonic() - t0
        time.sleep(a.scale_settle)
        part = a.scale_seconds / a.reps
        samples = []
        c0, w0 = proc_cpu_seconds(p.pid), time.monotonic()
        for _ in range(a.reps):
            time.sleep(part)
            c1, w1 = proc_cpu_seconds(p.pid), time.monotonic()
            samples.append({"pct_core": 100 * (c1 - c0) / (w1 - w0),
                            "rss_mib": proc_status_kib(p.pid, "VmRSS") / 1024,
                            "fds": fd_count(p.pid)})
            c0, w0 = c1, w1
        hwm = proc_status_kib(p.pid, "VmHWM") / 1024
        if p.poll() is not None:
            raise BenchError(f"{tool.label} exited while idle:\n{tail(lg)}")
    finally:
        stop(p)
    shutil.rmtree(d)
    res = {f: summary([s[f] for s in samples]) for f in ("pct_core", "rss_mib", "fds")}
    res.update(ready_s=ready, vmhwm_mib=hwm, n=n)
    log(f"  {n} databases, {tool.label}: all snapshotted after {ready:.1f}s; idle "
        f"{res['pct_core']['median']:.2f}% of a core, RSS {res['rss_mib']['median']:.0f} MiB "
        f"(peak {hwm:.0f}), {res['fds']['median']:.0f} fds")
    return res


def bench_scale(a, work: Path, tools: list[Tool]) -> dict:
    out: dict = {}
    for n in a.scale_dbs:
        out[n] = {}
        for tool in tools:
            try:
                out[n][tool.key] = scale_run(a, work, tool, n)
            except BenchError as e:
                if tool.key == "lsd":
                    raise
                # A Litestream that cannot handle this many databases is a result, not a
                # harness failure.
                log(f"  {tool.label} with {n} databases failed: {e}")
                out[n][tool.key] = {"error": str(e).splitlines()[0]}
                shutil.rmtree(work / f"scale-{tool.key}-{n}", ignore_errors=True)
    return out


def per_db(scale: dict, key: str, field: str) -> float | None:
    """Marginal cost per database between the smallest and largest size."""
    ns = sorted(scale)
    if len(ns) < 2:
        return None
    lo, hi = scale[ns[0]].get(key, {}), scale[ns[-1]].get(key, {})
    if field not in lo or field not in hi:
        return None
    return (hi[field]["median"] - lo[field]["median"]) / (ns[-1] - ns[0])


def render_scale(a, scale: dict, labels: dict[str, str]) -> list[str]:
    out = [f"## Many databases in one process: idle, local-directory replicas, monitor and "
           f"sync 1 s; {a.scale_seconds:.0f} s window in {a.reps} parts"]
    rows = []
    for n, res in scale.items():
        base = res.get("ls03", {})
        for key, m in res.items():
            if "error" in m:
                rows.append([str(n), labels[key], "failed: " + m["error"][:60], "", "", "", "",
                             ""])
                continue
            rows.append([
                str(n), labels[key], med(m["rss_mib"], "{:.0f}"), f"{m['vmhwm_mib']:.0f}",
                med(m["pct_core"]), f"{m['fds']['median']:.0f}", f"{m['ready_s']:.1f}",
                "1.00 / 1.00" if key == "ls03" or "rss_mib" not in base else
                f"{ratio(m['rss_mib']['median'], base['rss_mib']['median'])} / "
                f"{ratio(m['pct_core']['median'], base['pct_core']['median'])}",
            ])
    out.append(table(["databases", "replicator", "RSS MiB", "peak RSS MiB", "idle % of one core",
                      "open fds", "s to all snapshotted", "ratio to 0.3.13 (RSS / CPU)"], rows))
    ns = sorted(scale)
    if len(ns) >= 2:
        parts = []
        for key in labels:
            kib = per_db(scale, key, "rss_mib")
            fds = per_db(scale, key, "fds")
            if kib is not None:
                parts.append(f"{labels[key]} {kib * 1024:.0f} KiB RSS and {fds:.2f} fds")
        out.append(f"per database beyond a base ({ns[0]} → {ns[-1]} databases): "
                   + "; ".join(parts))
    out.append("")
    return out
