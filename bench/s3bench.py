"""Figures against a loopback S3 server (s3s-fs on 127.0.0.1), for litestreamd, Litestream
0.3.13 and Litestream 0.5.17 with the same intervals:

  3. replication lag p50/p99 at 100 and 1,000 tx/s, with the replicator's CPU and peak RSS over
     the same runs (figure 4) and its object-store requests while busy (figure 5, 100 tx/s);
  5. object-store requests by kind for an idle database;
  6. peak RSS while snapshotting a large database to S3.

Requests are counted by bench/s3proxy.py, a byte-for-byte HTTP proxy between the replicator and
s3s-fs that logs every request with its kind, key, and start and completion times.

Replication lag of a commit (tool-agnostic, works for the v0.3 and the LTX layout): every row
the writer inserts starts with 32 random bytes unique to its commit, and the writer records the
wall time at which each commit returned. After the run the driver reads every WAL-segment /
level-0 LTX object from the bucket; a commit's lag is the completion time of the first such
upload whose bytes contain the commit's token, minus the commit time ("commit to a segment
readable in the bucket"). Both formats LZ4-compress, and LZ4 stores bytes it has not seen
before as literals, so a random token is found verbatim (any 8-byte quarter of it suffices).

For comparison the report also gives the "start rule" (no content inspection): the completion
of the first segment upload that *started* after the commit. It is a lower bound: a tool reads
the WAL on its monitor tick and uploads on its sync tick, so an upload that starts after a
commit may carry only what was read before it.
"""

from __future__ import annotations

import bisect
import json
import shutil
import sqlite3
import statistics
import subprocess
import sys
import time
from array import array
from pathlib import Path
from urllib.parse import parse_qs

from common import (MB, MiB, PAGE_SIZE, TOKEN, BenchError, CHILDREN, can_connect, count_rows, finish_writer, free_port,
                    log, med, new_wal_db, percentile, proc_cpu_seconds, proc_status_kib,
                    ratio, spawn, start_writer, stop, summary, system_busy_seconds, table,
                    tail, wait_for, wait_quiet)
from tools import BUCKET, KEY, SECRET, S3Target, Tool

KINDS = ["PUT", "GET", "LIST", "DELETE", "HEAD", "OTHER"]


class S3Server:
    """s3s-fs on 127.0.0.1, objects stored as files under work/s3/<bucket>/<key>."""

    def __init__(self, binary: str, work: Path):
        self.root = work / "s3"
        (self.root / BUCKET).mkdir(parents=True)
        self.work = work
        self.port = free_port()
        lg = work / "s3s-fs.log"
        self.proc = spawn([binary, "--host", "127.0.0.1", "--port", str(self.port),
                           "--access-key", KEY, "--secret-key", SECRET, str(self.root)], lg)
        wait_for(lambda: can_connect(self.port), 30, "s3s-fs to listen", self.proc, lg)

    def dir(self, prefix: str) -> Path:
        return self.root / BUCKET / prefix

    def remove(self, prefix: str) -> None:
        shutil.rmtree(self.dir(prefix), ignore_errors=True)

    def close(self) -> None:
        stop(self.proc)


class Proxy:
    """A counting proxy in front of the S3 server, one per measured replicator."""

    def __init__(self, s3: S3Server, name: str):
        self.port = free_port()
        self.log = s3.work / f"requests-{name}.jsonl"
        out = s3.work / f"proxy-{name}.out"
        self.proc = spawn([sys.executable, str(Path(__file__).with_name("s3proxy.py")),
                           "--listen", str(self.port), "--upstream", str(s3.port),
                           "--log", str(self.log)], out)
        wait_for(lambda: can_connect(self.port), 30, "the proxy to listen", self.proc, out)

    def requests(self) -> list[dict]:
        if not self.log.exists():
            return []
        out = []
        for line in self.log.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass  # a line being written
        return out

    def close(self) -> None:
        stop(self.proc)


def object_writes(reqs: list[dict]) -> list[tuple[float, float, str]]:
    """Completed object uploads as (start, end, key): a PutObject from its request to its
    response; a multipart upload from its CreateMultipartUpload request to the response of its
    CompleteMultipartUpload."""
    starts: dict[str, float] = {}
    out = []
    for r in sorted(reqs, key=lambda r: r["t0"]):
        if r["status"] >= 300 or not r["key"]:
            continue
        q = parse_qs(r["query"], keep_blank_values=True)
        if r["method"] == "PUT" and "uploadId" not in q:
            out.append((r["t0"], r["t1"], r["key"]))
        elif r["method"] == "POST" and "uploads" in q:
            starts[r["key"]] = r["t0"]
        elif r["method"] == "POST" and "uploadId" in q:
            out.append((starts.pop(r["key"], r["t0"]), r["t1"], r["key"]))
    return out


def count_kinds(reqs: list[dict], t0: float, t1: float) -> dict[str, int]:
    c = {k: 0 for k in KINDS}
    for r in reqs:
        if t0 <= r["t0"] < t1:
            c[r["kind"]] += 1
    return c


def content_lags(commits, tokens: bytes, writes, body) -> tuple[list[float], int]:
    """Lag of every commit (seconds): completion time of the first segment upload whose bytes
    contain the commit's row, minus the commit time. A row is recognised by any 8-byte quarter
    of its random token (LZ4 copies new bytes as literals; a quarter can be lost to a chance
    4-byte match, all four practically never). Also returns how many commits were found in no
    segment. `body(key)` returns an object's bytes (None if gone)."""
    writes = sorted(writes, key=lambda w: w[1])
    ends = [w[1] for w in writes]
    bodies = [body(w[2]) or b"" for w in writes]
    lags, missing = [], 0
    for k, c in enumerate(commits):
        tok = tokens[k * TOKEN:(k + 1) * TOKEN]
        pieces = [tok[i:i + 8] for i in range(0, TOKEN, 8)]
        for i in range(bisect.bisect_left(ends, c), len(writes)):
            if any(p in bodies[i] for p in pieces):
                lags.append(ends[i] - c)
                break
        else:
            missing += 1
    return lags, missing


def commit_lags(commits, writes) -> tuple[list[float], int]:
    """Lag of every commit (seconds) by the definition in the module docstring, and how many
    commits had no upload starting after them."""
    writes = sorted(writes)
    starts = [w[0] for w in writes]
    lags, missing = [], 0
    for c in commits:
        i = bisect.bisect_right(starts, c)
        if i == len(writes):
            missing += 1
        else:
            lags.append(writes[i][1] - c)
    return lags, missing


# --------------------------------------------------------------------------------------------
# figure 3/4/5: lag, CPU and busy requests

def lag_run(a, work: Path, s3: S3Server, tool: Tool, tps: int, r: int) -> dict:
    name = f"lag-{tool.key}-{tps}-{r}"
    d = work / name
    d.mkdir()
    db = d / "app.db"
    new_wal_db(db)
    proxy = Proxy(s3, name)
    target = S3Target(proxy.port, name)
    lg = d / "replicator.log"
    p = spawn(tool.replicate_argv(d, db, target), lg, env=tool.env())
    try:
        wait_for(lambda: tool.has_snapshot(s3.dir(name)), 60, f"{tool.label}'s first snapshot",
                 p, lg)
        time.sleep(a.lag_settle)  # past start-up and the first sync
        if a.quiet_wait:
            wait_quiet(a.quiet_wait)
        times = d / "commits.f64"
        w = start_writer(db, tps, a.lag_seconds, times)
        cpu0, t0, w0, b0 = (proc_cpu_seconds(p.pid), time.monotonic(), time.time(),
                            system_busy_seconds())
        ws, writer_cpu = finish_writer(w)
        cpu1, t1, w1, b1 = (proc_cpu_seconds(p.pid), time.monotonic(), time.time(),
                            system_busy_seconds())
        hwm = proc_status_kib(p.pid, "VmHWM")
        time.sleep(a.drain_seconds)  # the last commits reach the bucket
        if p.poll() is not None:
            raise BenchError(f"{tool.label} exited early ({p.returncode}):\n{tail(lg)}")
    finally:
        rc = stop(p)
    if rc != 0:
        log(f"  note: {tool.label} exited with {rc} on SIGTERM")
    commits = array("d")
    with open(times, "rb") as f:
        commits.frombytes(f.read())
    tokens = (d / "commits.f64.tok").read_bytes()
    reqs = proxy.requests()
    segs = [w for w in object_writes(reqs) if tool.is_segment(w[2])]

    def body(key: str) -> bytes | None:
        try:
            return (s3.root / BUCKET / key).read_bytes()
        except OSError:
            return None

    lags, missing = content_lags(commits, tokens, segs, body)
    start_lags, start_missing = commit_lags(commits, segs)
    if not lags:
        raise BenchError(f"{tool.label}: no commit found in any segment upload ({len(segs)} "
                         f"segments, {len(reqs)} requests logged)")
    counts = count_kinds(reqs, w0, w1)
    # Verify with the tool's own restore (through the proxy, after the window).
    out = d / "restored.db"
    rlog = d / "restore.log"
    rp = spawn(tool.restore_argv(d, out, db, target), rlog, env=tool.env())
    try:
        rc = rp.wait(300)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{tool.label} restore from S3 did not finish in 300 s:\n{tail(rlog)}")
    CHILDREN.pop(rp.pid, None)
    if rc != 0:
        raise BenchError(f"{tool.label} restore from S3 failed:\n{tail(rlog)}")
    rows = count_rows(out)
    proxy.close()
    if rows != ws["tx"]:
        raise BenchError(f"{tool.label}: S3 replica restored {rows} rows, writer committed "
                         f"{ws['tx']}")
    window = t1 - t0
    res = {
        "lag_p50_ms": percentile(lags, 50) * 1000, "lag_p99_ms": percentile(lags, 99) * 1000,
        "lag_max_ms": max(lags) * 1000, "lag_missing": missing, "commits": len(commits),
        "start_p50_ms": percentile(start_lags, 50) * 1000 if start_lags else float("nan"),
        "start_p99_ms": percentile(start_lags, 99) * 1000 if start_lags else float("nan"),
        "segment_puts": sum(1 for s in segs if w0 <= s[0] < w1),
        "put_ms": 1000 * statistics.median([e - b for b, e, _ in segs if w0 <= b < w1]
                                           or [e - b for b, e, _ in segs]),
        "wal_mb": len(commits) * (24 + PAGE_SIZE) / MB,
        "cpu_s": cpu1 - cpu0, "pct_core": 100 * (cpu1 - cpu0) / window,
        "vmhwm_mib": hwm / 1024, "writer": ws, "writer_cpu_s": writer_cpu,
        "requests_per_min": {k: v * 60 / (w1 - w0) for k, v in counts.items()},
        "rows_restored": rows,
        "other_cores": max(0.0, (b1 - b0) - (cpu1 - cpu0) - writer_cpu) / window,
    }
    shutil.rmtree(d)
    s3.remove(name)
    return res


def bench_lag(a, work: Path, s3: S3Server, tools: list[Tool]) -> dict:
    out: dict = {}
    for tps in a.lag_tps:
        runs: dict[str, list[dict]] = {t.key: [] for t in tools}
        for r in range(a.reps):
            order = tools[r % len(tools):] + tools[:r % len(tools)]
            for tool in order:
                m = lag_run(a, work, s3, tool, tps, r)
                runs[tool.key].append(m)
                log(f"  lag {tps} tx/s run {r + 1}/{a.reps} {tool.label}: p50 "
                    f"{m['lag_p50_ms']:.0f} ms, p99 {m['lag_p99_ms']:.0f} ms (start rule "
                    f"{m['start_p50_ms']:.0f} / {m['start_p99_ms']:.0f}), "
                    f"{m['lag_missing']} not found, CPU "
                    f"{m['cpu_s']:.2f} s ({m['pct_core']:.2f}% core), VmHWM "
                    f"{m['vmhwm_mib']:.1f} MiB, {m['segment_puts']} segment PUTs, requests/min "
                    + ", ".join(f"{k} {v:.0f}" for k, v in m["requests_per_min"].items() if v)
                    + f", {m['rows_restored']} rows verified, other busy cores "
                      f"{m['other_cores']:.2f}")
        out[tps] = {}
        for key, ms in runs.items():
            out[tps][key] = {
                f: summary([m[f] for m in ms])
                for f in ("lag_p50_ms", "lag_p99_ms", "lag_max_ms", "start_p50_ms",
                          "start_p99_ms", "cpu_s", "pct_core",
                          "vmhwm_mib", "segment_puts", "put_ms", "wal_mb")
            }
            out[tps][key]["requests_per_min"] = {
                k: summary([m["requests_per_min"][k] for m in ms]) for k in KINDS}
            out[tps][key]["writer_rate"] = summary([m["writer"]["rate"] for m in ms])
            out[tps][key]["lag_missing"] = sum(m["lag_missing"] for m in ms)
            out[tps][key]["other_cores_max"] = max(m["other_cores"] for m in ms)
    return out


# --------------------------------------------------------------------------------------------
# figure 5: an idle database

def idle_timers(a) -> dict:
    """Every periodic timer, scaled so the idle window holds several of each: a lease TTL of a
    quarter of the window (renewals every eighth if they ran), a retention check every ninth,
    an interval snapshot every third (of an unchanged database)."""
    w = a.idle_seconds
    return {"lease": f"{max(w / 4, 2):.0f}s", "retention_check": f"{max(w / 9, 1):.0f}s",
            "snapshot": f"{max(w / 3, 2):.0f}s"}


def bench_idle(a, work: Path, s3: S3Server, tools: list[Tool]) -> dict:
    """All replicators at once (they are idle, so they do not disturb each other), each with its
    own database, proxy and prefix. After the first snapshot and a settling time, the window is
    split into a.reps equal parts; every part gives one per-minute rate."""
    procs = {}
    try:
        for tool in tools:
            name = f"idle-{tool.key}"
            d = work / name
            d.mkdir()
            db = d / "app.db"
            new_wal_db(db, rows=100)
            proxy = Proxy(s3, name)
            lg = d / "replicator.log"
            p = spawn(tool.replicate_argv(d, db, S3Target(proxy.port, name),
                                          timers=idle_timers(a)), lg,
                      env=tool.env())
            procs[tool.key] = (tool, name, proxy, p, lg)
        for tool, name, proxy, p, lg in procs.values():
            wait_for(lambda: tool.has_snapshot(s3.dir(name)), 60,
                     f"{tool.label}'s first snapshot", p, lg)
        time.sleep(a.idle_settle)
        part = a.idle_seconds / a.reps
        bounds = [time.time()]
        cpu0 = {k: proc_cpu_seconds(v[3].pid) for k, v in procs.items()}
        for _ in range(a.reps):
            time.sleep(part)
            bounds.append(time.time())
        cpu1 = {k: proc_cpu_seconds(v[3].pid) for k, v in procs.items()}
        for tool, name, proxy, p, lg in procs.values():
            if p.poll() is not None:
                raise BenchError(f"{tool.label} exited while idle:\n{tail(lg)}")
    finally:
        for tool, name, proxy, p, lg in procs.values():
            stop(p)
            proxy.close()
    out = {}
    for key, (tool, name, proxy, p, lg) in procs.items():
        reqs = proxy.requests()
        parts = [count_kinds(reqs, bounds[i], bounds[i + 1]) for i in range(a.reps)]
        total = count_kinds(reqs, bounds[0], bounds[-1])
        out[key] = {
            "per_min": {k: summary([c[k] * 60 / part for c in parts]) for k in KINDS},
            "total": total, "window_s": bounds[-1] - bounds[0],
            "per_hour": {k: v * 3600 / (bounds[-1] - bounds[0]) for k, v in total.items()},
            "puts_keys": sorted({r["key"] for r in reqs
                                 if r["kind"] == "PUT" and bounds[0] <= r["t0"] < bounds[-1]})[:5],
            "pct_core": 100 * (cpu1[key] - cpu0[key]) / (bounds[-1] - bounds[0]),
        }
        shutil.rmtree(work / name)
        s3.remove(name)
    return out


# --------------------------------------------------------------------------------------------
# figure 6: peak RSS while snapshotting a large database to S3

def bench_snapshot(a, work: Path, s3: S3Server, tools: list[Tool], db: Path) -> dict:
    """Each tool replicates `db` (no WAL history, no generation) to a new S3 prefix directly on
    s3s-fs (no proxy: it would cap the throughput); when the snapshot object has landed, the
    replicator's VmHWM is its peak RSS."""
    runs: dict[str, list[dict]] = {t.key: [] for t in tools}
    for r in range(a.reps):
        order = tools[r % len(tools):] + tools[:r % len(tools)]
        for tool in order:
            # Start from the same state: no replicator metadata, WAL checkpointed into the db.
            shutil.rmtree(db.parent / f".{db.name}-litestream", ignore_errors=True)
            con = sqlite3.connect(db)
            con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            con.close()
            name = f"snap-{tool.key}-{r}"
            lg = work / f"{name}.log"
            if a.quiet_wait:
                wait_quiet(a.quiet_wait)
            t0 = time.monotonic()
            p = spawn(tool.replicate_argv(work, db, S3Target(s3.port, name)), lg, env=tool.env())
            try:
                wait_for(lambda: tool.has_snapshot(s3.dir(name)), 600,
                         f"{tool.label}'s snapshot", p, lg, interval=0.1)
                t_snap = time.monotonic() - t0
                if tool.layout == "ltx":
                    # 0.5.17 uploads the database twice at start: level 0 and a level-9 snapshot.
                    try:
                        wait_for(lambda: any(s3.dir(name).glob("0009/*.ltx")), 120,
                                 "the level-9 snapshot", p, lg, interval=0.1)
                    except BenchError:
                        log("  note: no level-9 snapshot from Litestream 0.5.17")
                    t_snap = time.monotonic() - t0
                hwm = proc_status_kib(p.pid, "VmHWM")
                cpu = proc_cpu_seconds(p.pid)
            finally:
                stop(p)
            uploaded = sum(f.stat().st_size for f in s3.dir(name).rglob("*") if f.is_file())
            m = {"vmhwm_mib": hwm / 1024, "seconds": t_snap, "cpu_s": cpu,
                 "uploaded_mib": uploaded / MiB}
            runs[tool.key].append(m)
            log(f"  snapshot run {r + 1}/{a.reps} {tool.label}: VmHWM {m['vmhwm_mib']:.1f} MiB, "
                f"{m['uploaded_mib']:.0f} MiB uploaded in {t_snap:.1f}s, CPU {cpu:.2f}s")
            s3.remove(name)
    shutil.rmtree(db.parent / f".{db.name}-litestream", ignore_errors=True)
    return {k: {f: summary([m[f] for m in ms]) for f in ms[0]} for k, ms in runs.items()}


# --------------------------------------------------------------------------------------------
# report

def render_lag(a, lag: dict, labels: dict[str, str]) -> list[str]:
    out = []
    for tps, res in lag.items():
        wal = next(iter(res.values()))["wal_mb"]["median"]
        out.append(f"## Replication lag, CPU and memory: {tps} single-row insert tx/s for "
                   f"{a.lag_seconds:g} s ({wal:.0f} MB of WAL frames), S3 (s3s-fs on loopback via "
                   f"the counting proxy), monitor and sync interval 1 s")
        base = res.get("ls03")
        rows = []
        for key, m in res.items():
            rows.append([
                labels[key],
                med(m["lag_p50_ms"], "{:.0f}"), med(m["lag_p99_ms"], "{:.0f}"),
                f"{m['start_p50_ms']['median']:.0f} / {m['start_p99_ms']['median']:.0f}",
                med(m["cpu_s"]), med(m["pct_core"]), med(m["vmhwm_mib"], "{:.1f}"),
                f"{m['segment_puts']['median']:.0f}", f"{m['put_ms']['median']:.1f}",
                f"{m['writer_rate']['median']:.0f}",
                f"{m['other_cores_max']:.2f}",
                "1.00 / 1.00 / 1.00" if key == "ls03" or not base else
                f"{ratio(m['lag_p99_ms']['median'], base['lag_p99_ms']['median'])} / "
                f"{ratio(m['cpu_s']['median'], base['cpu_s']['median'])} / "
                f"{ratio(m['vmhwm_mib']['median'], base['vmhwm_mib']['median'])}",
            ])
        out.append(table(["replicator", "lag p50 ms", "lag p99 ms", "start rule p50 / p99",
                          "CPU s", "% of one core",
                          "peak RSS MiB", "segment uploads", "upload ms (median)",
                          "achieved tx/s",
                          "other busy cores (max)", "ratio to 0.3.13 (p99 / CPU / RSS)"], rows))
        missing = {k: m["lag_missing"] for k, m in res.items() if m["lag_missing"]}
        if missing:
            out.append("note: commits found in no segment upload (not in the lag figures): "
                       + ", ".join(f"{labels[k]} {v}" for k, v in missing.items()))
        out.append("")
    return out


def render_requests(a, lag: dict, idle: dict | None, labels: dict[str, str]) -> list[str]:
    out = []
    busy_tps = 100 if 100 in lag else (next(iter(lag)) if lag else None)
    out.append("## Object-store requests by kind, per minute (and per hour for PUT and LIST)")
    out.append("PUT = PutObject/UploadPart and multipart create/complete POSTs (each one request); "
               "LIST = GET on the bucket; DELETE includes POST ?delete")
    rows = []
    for state, src in (("idle", idle or {}), (f"busy, {busy_tps} tx/s", lag.get(busy_tps, {}))):
        for key, m in src.items():
            pm = m["per_min"] if "per_min" in m else m["requests_per_min"]
            # per hour: idle from the whole window's total (rare events), busy from the median
            ph = m.get("per_hour") or {k: pm[k]["median"] * 60 for k in pm}
            rows.append([labels[key], state] + [
                med(pm[k], "{:.1f}") for k in ("PUT", "GET", "LIST", "DELETE", "HEAD")] + [
                f"{ph['PUT']:.0f}", f"{ph['LIST']:.0f}"])
    if rows:
        out.append(table(["replicator", "database", "PUT/min", "GET/min", "LIST/min",
                          "DELETE/min", "HEAD/min", "PUT/h", "LIST/h"], rows))
    if idle:
        w = next(iter(idle.values()))["window_s"]
        t = idle_timers(a)
        out.append(f"timers scaled into the window: lease TTL {t['lease']} (litestreamd), "
                   f"retention check every {t['retention_check']}, interval snapshot every "
                   f"{t['snapshot']} (litestreamd and 0.3.13; 0.5.17 at its defaults)")
        out.append(f"idle: window {w:.0f} s after the first snapshot and {a.idle_settle:.0f} s of "
                   f"settling, split into {a.reps} parts (per minute: median [min–max] over the "
                   f"parts; per hour: the whole window's total scaled); "
                   f"idle CPU " + ", ".join(f"{labels[k]} {m['pct_core']:.2f}%"
                                            for k, m in idle.items()))
        for k, m in idle.items():
            if m["puts_keys"]:
                out.append(f"note: {labels[k]} PUT while idle: " + ", ".join(m["puts_keys"]))
    out.append("")
    return out


def render_snapshot(a, snap: dict, labels: dict[str, str], db_mib: float) -> list[str]:
    out = [f"## Peak RSS while snapshotting a {db_mib:.0f} MiB database to S3 (s3s-fs on "
           f"loopback, direct)"]
    base = snap.get("ls03")
    rows = []
    for key, m in snap.items():
        rows.append([labels[key], med(m["vmhwm_mib"], "{:.1f}"), med(m["seconds"]),
                     f"{m['cpu_s']['median']:.2f}", f"{m['uploaded_mib']['median']:.0f}",
                     "1.00" if key == "ls03" or not base else
                     ratio(m["vmhwm_mib"]["median"], base["vmhwm_mib"]["median"])])
    out.append(table(["replicator", "peak RSS (VmHWM) MiB", "seconds to snapshot", "CPU s",
                      "MiB uploaded", "RSS ratio to 0.3.13"], rows))
    out.append("")
    return out
