"""Figure 9: a standby (issue 19) — end-to-end lag, requests of an idle standby, promotion.

Two `litestreamd run` daemons on this machine stand for two hosts: a primary (its own config
directory and database) and a standby (`role = "standby"`, default 1 s poll, its own config
directory and database path), both with the same S3 replica URL on s3s-fs (loopback). Each
daemon talks to s3s-fs through its own counting proxy (s3proxy.py), so the standby's requests
are counted apart from the primary's, and the primary's segment uploads are timed.

  lag      a fresh pair per run; the writer (`bench.py --writer`, single-row inserts at 100 and
           1,000 tx/s, the wall time of every commit recorded) starts once the standby reports
           `following`; a reader thread polls the standby database through a read-only
           connection every 10 ms (`SELECT max(id)`) and records when each row first became
           visible. Row k is commit k (the table starts empty, one writer), so a commit's lag is
           its row's first visible time minus the time its COMMIT returned on the primary.
           Also, from the proxies: commit → segment in the bucket (the content rule of figure
           3) and segment uploaded → fetched by the standby; and the standby's own
           `litestreamd_standby_apply_lag_seconds` (object time → applied, per batch).
  idle     litestreamd primary + standby on an idle database of 100 rows, and Litestream 0.5.17
           replicating a copy of it (LTX layout, its own prefix) with `litestream restore -f`
           (follow mode, default 1 s interval) following that; the followers' requests over
           --idle-seconds (split into --reps parts), extrapolated to an hour.
  promote  a fresh pair per run; 200 rows written and seen on the standby; the primary is killed
           (SIGKILL); `litestreamd promote bank --force` is timed (a) until it returns, (b) until
           a first write on the promoted database is accepted, (c) until the segment holding
           that write is uploaded (found by its random token in the objects the promoted daemon
           PUT, as in figure 3). The replica is then restored and must hold every row.
"""

from __future__ import annotations

import bisect
import datetime
import json
import os
import random
import re
import shutil
import signal
import sqlite3
import statistics
import subprocess
import threading
import time
import urllib.request
from array import array
from pathlib import Path

from common import (CHILDREN, BenchError, TOKEN, count_rows, finish_writer, free_port, log, med,
                    new_wal_db, percentile, proc_cpu_seconds, spawn, start_writer, stop, summary,
                    system_busy_seconds, table, tail, wait_for, wait_quiet)
from s3bench import KINDS, Proxy, S3Server, content_lags, count_kinds, object_writes
from tools import BUCKET, KEY, SECRET, Litestream, Litestreamd, S3Target

DB = "bank"
READER_INTERVAL = 0.010  # the standby reader's poll
PROMOTE_ROWS = 200       # written (100 tx/s) and seen on the standby before the primary dies
# The standby's documented idle cost (src/standby.rs, LIST_EVERY) at a 1 s poll.
DOC_GET_H, DOC_LIST_H = 7200, 240
# Log lines that are expected: the lease taken over by promote --force.
EXPECTED_WARN = ("lease taken over", "took the replica's lease")


class Daemon:
    """`litestreamd run` in its own directory (config, state, control socket, metrics port),
    one database `bank` with one S3 replica; a standby when `standby`."""

    def __init__(self, a, d: Path, db: Path, target: S3Target, standby: bool):
        self.a, self.d, self.db = a, d, db
        (d / "dbs.d").mkdir(parents=True, exist_ok=True)
        self.sock = d / "control.sock"
        self.metrics_port = free_port()
        (d / "litestreamd.toml").write_text(
            f'dbs_dir = "dbs.d"\nstate_dir = "state"\ncontrol_socket = "{self.sock}"\n'
            f'metrics_addr = "127.0.0.1:{self.metrics_port}"\n'
            '[defaults]\nmonitor_interval = "1s"\nsync_interval = "1s"\n')
        (d / "dbs.d" / f"{DB}.toml").write_text(
            f'path = "{db}"\n' + ('role = "standby"\npoll_interval = "1s"\n' if standby else "")
            + f'\n[[replicas]]\nname = "s3"\nurl = "{Litestreamd.url(target)}"\n'
              f'access_key_id = "{KEY}"\nsecret_access_key = "{SECRET}"\n')
        self.log = d / "daemon.log"
        # The standby logs each applied batch (debug) with its time: the lag figure's
        # "uploaded → applied" comes from it.
        level = "info,litestreamd::worker::standby=debug" if standby else "info"
        self.proc = spawn([a.litestreamd, "--log-level", level, "run", "--config",
                           str(d / "litestreamd.toml")], self.log,
                          env=Litestreamd(a.litestreamd).env())

    def status(self) -> dict:
        out = subprocess.run([self.a.litestreamd, "status", "--json", "--socket", str(self.sock)],
                             capture_output=True, text=True, timeout=30)
        try:
            return json.loads(out.stdout)[0]
        except (ValueError, IndexError):
            return {}

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics",
                                    timeout=10) as r:
            return r.read().decode()

    def cpu(self) -> float:
        return proc_cpu_seconds(self.proc.pid)

    def wait_state(self, state: str, timeout: float = 60) -> dict:
        def reached():
            st = self.status()
            return st if st.get("state") == state else None
        return wait_for(reached, timeout, f"{self.d.name}: state {state}", self.proc, self.log,
                        interval=0.1)

    def problems(self) -> list[str]:
        """WARN and ERROR lines of the log, less the expected ones (promote --force)."""
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return []
        return [x for x in lines if (" WARN " in x or " ERROR " in x)
                and not any(e in x for e in EXPECTED_WARN)]

    def applied_times(self) -> list[float]:
        """Wall times of the standby's applied batches (its debug log line)."""
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            if "standby applied" in line:
                try:
                    out.append(datetime.datetime.fromisoformat(line.split()[0]).timestamp())
                except ValueError:
                    pass
        return out

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        CHILDREN.pop(self.proc.pid, None)

    def stop(self) -> None:
        stop(self.proc)


class Pair:
    """A primary and a standby of the same database over the same S3 prefix, each through its
    own counting proxy. Ready once the primary's snapshot is in the bucket and the standby
    reports `following`."""

    def __init__(self, a, work: Path, s3: S3Server, name: str, rows: int = 0):
        self.name, self.s3 = name, s3
        self.d = work / name
        (self.d / "p").mkdir(parents=True)
        (self.d / "s").mkdir(parents=True)
        self.pdb, self.sdb = self.d / "p" / f"{DB}.db", self.d / "s" / f"{DB}.db"
        new_wal_db(self.pdb, rows)
        self.pproxy = self.sproxy = self.primary = self.standby = None
        lsd = Litestreamd(a.litestreamd)
        try:
            self.pproxy = Proxy(s3, f"{name}-primary")
            self.sproxy = Proxy(s3, f"{name}-standby")
            self.primary = Daemon(a, self.d / "p", self.pdb, S3Target(self.pproxy.port, name),
                                  standby=False)
            wait_for(lambda: lsd.has_snapshot(s3.dir(name)), 60, "the primary's first snapshot",
                     self.primary.proc, self.primary.log)
            t0 = time.monotonic()
            self.standby = Daemon(a, self.d / "s", self.sdb, S3Target(self.sproxy.port, name),
                                  standby=True)
            self.standby.wait_state("following")
            self.follow_s = time.monotonic() - t0
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for x in (self.primary, self.standby, self.pproxy, self.sproxy):
            if x is not None:
                stop(x.proc)

    def remove(self) -> None:
        shutil.rmtree(self.d, ignore_errors=True)
        self.s3.remove(self.name)


class Reader:
    """A read-only connection on the standby database, polled every READER_INTERVAL: the wall
    time at which each new max(id) was first seen."""

    def __init__(self, db: Path):
        self.db = db
        self.seen: list[tuple[float, int]] = []  # (time.time(), max id), max id increasing
        self.polls = 0
        self.error: Exception | None = None
        self.done = threading.Event()
        self.t = threading.Thread(target=self.run, daemon=True)
        self.t.start()

    def run(self) -> None:
        try:
            con = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, isolation_level=None,
                                  check_same_thread=False)
            last = -1
            nxt = time.monotonic()
            while not self.done.is_set():
                m = con.execute("SELECT coalesce(max(id), 0) FROM t").fetchone()[0]
                now = time.time()
                self.polls += 1
                if m > last:
                    self.seen.append((now, m))
                    last = m
                nxt += READER_INTERVAL
                delay = nxt - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                else:
                    nxt = time.monotonic()
            con.close()
        except Exception as e:  # reported by the caller
            self.error = e

    def max_id(self) -> int:
        return self.seen[-1][1] if self.seen else 0

    def close(self) -> None:
        self.done.set()
        self.t.join()
        if self.error:
            raise BenchError(f"standby reader failed: {self.error}")


def parse_summary(text: str, name: str) -> dict:
    """A Prometheus summary's quantiles, sum and count (database `bank`)."""
    out: dict = {"quantiles": {}}
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        m = re.match(rf'{name}(_sum|_count)?\{{([^}}]*)\}} (\S+)$', line)
        if not m:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
        if labels.get("db") != DB:
            continue
        v = float(m.group(3))
        if m.group(1) == "_sum":
            out["sum"] = v
        elif m.group(1) == "_count":
            out["count"] = v
        elif "quantile" in labels:
            out["quantiles"][labels["quantile"]] = v
    return out


def stats_ms(values: list[float]) -> dict:
    if not values:
        return {"p50": float("nan"), "p99": float("nan"), "max": float("nan"), "n": 0}
    return {"p50": percentile(values, 50) * 1000, "p99": percentile(values, 99) * 1000,
            "max": max(values) * 1000, "n": len(values)}


def s3_body(s3: S3Server):
    def body(key: str) -> bytes | None:
        try:
            return (s3.root / BUCKET / key).read_bytes()
        except OSError:
            return None
    return body


# --------------------------------------------------------------------------------------------
# lag

def lag_run(a, work: Path, s3: S3Server, tps: int, r: int) -> dict:
    name = f"sb-lag-{tps}-{r}"
    pair = Pair(a, work, s3, name)
    lsd = Litestreamd(a.litestreamd)
    try:
        time.sleep(a.lag_settle)
        if a.quiet_wait:
            wait_quiet(a.quiet_wait)
        reader = Reader(pair.sdb)
        times = pair.d / "commits.f64"
        w = start_writer(pair.pdb, tps, a.standby_seconds, times)
        procs = [pair.primary.proc, pair.standby.proc, pair.pproxy.proc, pair.sproxy.proc,
                 s3.proc]
        cpu0 = [proc_cpu_seconds(p.pid) for p in procs]
        self0 = os.times()
        b0, t0 = system_busy_seconds(), time.monotonic()
        ws, writer_cpu = finish_writer(w)
        b1, t1 = system_busy_seconds(), time.monotonic()
        cpu1 = [proc_cpu_seconds(p.pid) for p in procs]
        self1 = os.times()
        # Every row reaches the standby (or the run fails).
        wait_for(lambda: reader.max_id() >= ws["tx"], 60,
                 f"the standby to show all {ws['tx']} rows (it shows {reader.max_id()})",
                 pair.standby.proc, pair.standby.log)
        reader.close()
        metrics = pair.standby.metrics()
        st = pair.standby.status()
        rows = count_rows(pair.sdb)
        problems = pair.standby.problems() + pair.primary.problems()
    finally:
        pair.close()
    if rows != ws["tx"]:
        raise BenchError(f"standby holds {rows} rows, the writer committed {ws['tx']}")
    commits = array("d")
    with open(times, "rb") as f:
        commits.frombytes(f.read())
    tokens = (pair.d / "commits.f64.tok").read_bytes()
    # end to end: row k (ids from 1) is commit k-1
    seen_ids = [m for _, m in reader.seen]
    lags = []
    for k, c in enumerate(commits, start=1):
        i = bisect.bisect_left(seen_ids, k)
        lags.append(reader.seen[i][0] - c)
    # commit -> segment in the bucket (primary's proxy), segment -> fetched (standby's proxy)
    preqs, sreqs = pair.pproxy.requests(), pair.sproxy.requests()
    segs = [x for x in object_writes(preqs) if lsd.is_segment(x[2])]
    bucket_lags, bucket_missing = content_lags(commits, tokens, segs, s3_body(s3))
    first_get: dict[str, float] = {}
    for q in sorted(sreqs, key=lambda q: q["t1"]):
        if q["method"] == "GET" and q["status"] == 200 and q["key"]:
            first_get.setdefault(q["key"], q["t1"])
    w0, w1 = commits[0], commits[-1]
    segs_w = [(b, e, k) for b, e, k in segs if w0 <= e <= w1 + 5]
    fetch = [first_get[k] - e for b, e, k in segs_w if k in first_get]
    unfetched = sum(1 for b, e, k in segs_w if k not in first_get)
    # A batch applied at T holds the segments first fetched since the previous batch; its lag
    # is T minus the upload of the oldest of them (the definition of the daemon's apply_lag,
    # with the proxy's upload time instead of the object's Last-Modified).
    applied = sorted(pair.standby.applied_times())
    up_applied, applied_visible = [], []
    seen_t = [t for t, _ in reader.seen]
    prev = float("-inf")
    for T in applied:
        batch = [e for b, e, k in segs_w if k in first_get and prev < first_get[k] <= T]
        prev = T
        if batch:
            up_applied.append(T - min(batch))
            i = bisect.bisect_left(seen_t, T)
            if i < len(seen_t):
                applied_visible.append(seen_t[i] - T)
    # Last-Modified has whole seconds over HTTP (the daemon's apply_lag uses the upload's own
    # send time from its metadata; this is how high Last-Modified would read).
    truncation = [e - int(e) for b, e, k in segs_w]
    summ = parse_summary(metrics, "litestreamd_standby_apply_lag_seconds")
    q = summ["quantiles"]
    window = t1 - t0
    ours = sum(c1 - c0 for c0, c1 in zip(cpu0, cpu1)) + writer_cpu + (
        (self1.user + self1.system) - (self0.user + self0.system))
    res = {
        "tps": tps, "commits": len(commits), "writer_rate": ws["rate"],
        "e2e": stats_ms(lags), "bucket": stats_ms(bucket_lags), "bucket_missing": bucket_missing,
        "fetch": stats_ms(fetch), "segments": len(segs), "segments_unfetched": unfetched,
        "applied": stats_ms(up_applied), "applied_visible": stats_ms(applied_visible),
        "truncation_mean_ms": 1000 * sum(truncation) / len(truncation) if truncation else 0.0,
        "visibility_steps": len(reader.seen), "reader_polls": reader.polls,
        "apply_lag": {"count": summ.get("count", 0), "sum": summ.get("sum", 0.0),
                      "p50_ms": q.get("0.5", float("nan")) * 1000,
                      "p99_ms": q.get("0.99", float("nan")) * 1000,
                      "max_ms": q.get("1", float("nan")) * 1000},
        "apply_lag_last_s": (st.get("standby") or {}).get("apply_lag_seconds"),
        "standby_state": st.get("state"), "bootstraps": (st.get("standby") or {}).get("bootstraps"),
        "standby_requests": (st.get("replicas") or [{}])[0].get("requests"),
        "standby_cpu_s": cpu1[1] - cpu0[1], "standby_pct_core": 100 * (cpu1[1] - cpu0[1]) / window,
        "primary_pct_core": 100 * (cpu1[0] - cpu0[0]) / window,
        "follow_s": pair.follow_s,
        "other_cores": max(0.0, (b1 - b0) - ours) / window,
        "log_problems": problems[:5], "log_problem_count": len(problems),
        "lags_ms": [round(x * 1000) for x in lags],  # every commit's, in commit order
    }
    if not a.keep:
        pair.remove()
    return res


def bench_lag(a, work: Path, s3: S3Server) -> dict:
    out = {}
    for tps in a.lag_tps:
        runs = []
        for r in range(a.reps):
            m = lag_run(a, work, s3, tps, r)
            runs.append(m)
            log(f"  standby lag {tps} tx/s run {r + 1}/{a.reps}: commit → visible p50 "
                f"{m['e2e']['p50']:.0f} ms, p99 {m['e2e']['p99']:.0f} ms, max "
                f"{m['e2e']['max']:.0f} ms ({m['commits']} commits, {m['visibility_steps']} "
                f"visibility steps); commit → bucket p50/p99 {m['bucket']['p50']:.0f}/"
                f"{m['bucket']['p99']:.0f} ms; uploaded → fetched p50/p99 "
                f"{m['fetch']['p50']:.0f}/{m['fetch']['p99']:.0f} ms; uploaded → applied "
                f"p50/p99 {m['applied']['p50']:.0f}/{m['applied']['p99']:.0f} ms; applied → "
                f"visible p50 {m['applied_visible']['p50']:.0f} ms; apply_lag p50/p99 "
                f"{m['apply_lag']['p50_ms']:.0f}/{m['apply_lag']['p99_ms']:.0f} ms over "
                f"{m['apply_lag']['count']:.0f} batches; standby CPU {m['standby_pct_core']:.2f}% "
                f"core; other busy cores {m['other_cores']:.2f}"
                + (f"; {m['log_problem_count']} WARN/ERROR log lines" if m["log_problem_count"]
                   else ""))
        agg = {"runs": runs}
        for part in ("e2e", "bucket", "fetch", "applied", "applied_visible"):
            for f in ("p50", "p99", "max"):
                agg[f"{part}_{f}_ms"] = summary([m[part][f] for m in runs])
        for f in ("p50_ms", "p99_ms", "max_ms"):
            agg[f"apply_{f}"] = summary([m["apply_lag"][f] for m in runs])
        agg["apply_batches"] = summary([m["apply_lag"]["count"] for m in runs])
        for f in ("writer_rate", "standby_pct_core", "primary_pct_core", "follow_s",
                  "truncation_mean_ms"):
            agg[f] = summary([m[f] for m in runs])
        agg["other_cores_max"] = max(m["other_cores"] for m in runs)
        agg["commits"] = runs[0]["commits"]
        out[tps] = agg
    return out


# --------------------------------------------------------------------------------------------
# idle

def start_ls05_follow(a, work: Path, s3: S3Server, procs: list) -> dict:
    """Litestream 0.5.17 replicating a 100-row database to its own prefix, and `litestream
    restore -f` following it; each through its own proxy. Appends both to `procs`."""
    tool = Litestream(a.litestream05, "0.5.17")
    name = "sb-idle-ls05"
    d = work / name
    d.mkdir()
    db = d / "app.db"
    new_wal_db(db, rows=100)
    rproxy = Proxy(s3, f"{name}-replicator")
    rlog = d / "replicator.log"
    rp = spawn(tool.replicate_argv(d, db, S3Target(rproxy.port, name)), rlog, env=tool.env())
    procs.append(("ls05_replicator", "Litestream 0.5.17 replicate", rp, rlog, rproxy,
                  "replicator"))
    wait_for(lambda: tool.has_snapshot(s3.dir(name)), 60, "Litestream 0.5.17's first snapshot",
             rp, rlog)
    fproxy = Proxy(s3, f"{name}-follower")
    out = d / "follow.db"
    argv = tool.restore_argv(d, out, db, S3Target(fproxy.port, name))
    argv.insert(argv.index("restore") + 1, "-f")
    flog = d / "follower.log"
    fp = spawn(argv, flog, env=tool.env())
    procs.append(("ls05", "Litestream 0.5.17 restore -f (follow 1 s)", fp, flog, fproxy,
                  "follower"))
    wait_for(lambda: "entering follow mode" in flog.read_text(errors="replace"), 60,
             "Litestream 0.5.17 to enter follow mode", fp, flog)
    return {"argv": " ".join(["litestream"] + argv[1:]), "out": out}


def bench_idle(a, work: Path, s3: S3Server) -> dict:
    """litestreamd standby and Litestream 0.5.17's follow mode side by side (idle processes do
    not disturb each other), each follower through its own proxy."""
    pair = None
    procs: list = []          # (key, label, proc, log, proxy, role)
    ls05, ls05_error = None, None
    try:
        pair = Pair(a, work, s3, "sb-idle-lsd", rows=100)
        procs.append(("lsd", "litestreamd standby (poll 1 s)", pair.standby.proc,
                      pair.standby.log, pair.sproxy, "follower"))
        procs.append(("lsd_primary", "litestreamd primary", pair.primary.proc, pair.primary.log,
                      pair.pproxy, "replicator"))
        if not a.litestream05:
            ls05_error = "no Litestream 0.5.17 binary (--litestream05)"
        else:
            try:
                ls05 = start_ls05_follow(a, work, s3, procs)
            except BenchError as e:
                # Reported as n/a with the reason; the litestreamd figure still runs.
                ls05_error = str(e).splitlines()[0]
                log(f"  Litestream 0.5.17 follow mode did not start: {e}")
                for k, label, p, lg, proxy, role in [x for x in procs if x[0].startswith("ls05")]:
                    stop(p)
                    proxy.close()
                procs = [x for x in procs if not x[0].startswith("ls05")]
        time.sleep(a.idle_settle)
        st0 = pair.standby.status()
        part = a.idle_seconds / a.reps
        bounds = [time.time()]
        cpu0 = {k: proc_cpu_seconds(p.pid) for k, _, p, *_ in procs}
        for _ in range(a.reps):
            time.sleep(part)
            bounds.append(time.time())
        cpu1 = {k: proc_cpu_seconds(p.pid) for k, _, p, *_ in procs}
        st1 = pair.standby.status()
        for k, label, p, lg, proxy, role in procs:
            if p.poll() is not None:
                raise BenchError(f"{label} exited while idle:\n{tail(lg)}")
        if st1.get("state") != "following":
            raise BenchError(f"the standby is {st1.get('state')} after the idle window: {st1}")
        if ls05 and count_rows(ls05["out"]) != 100:
            raise BenchError(f"Litestream 0.5.17's follower holds {count_rows(ls05['out'])} "
                             f"rows, not 100")
        problems = pair.standby.problems() + pair.primary.problems()
    finally:
        for k, label, p, lg, proxy, role in procs:
            if k.startswith("ls05"):
                stop(p)
                proxy.close()
        if pair is not None:
            pair.close()
    win = bounds[-1] - bounds[0]
    res: dict = {"window_s": win, "parts": a.reps, "tools": {}, "log_problems": problems[:5],
                 "log_problem_count": len(problems),
                 "ls05": {"argv": ls05["argv"]} if ls05 else None, "ls05_error": ls05_error}
    for k, label, p, lg, proxy, role in procs:
        reqs = proxy.requests()
        parts = [count_kinds(reqs, bounds[i], bounds[i + 1]) for i in range(a.reps)]
        total = count_kinds(reqs, bounds[0], bounds[-1])
        res["tools"][k] = {
            "label": label, "role": role, "total": total,
            "per_min": {q: summary([c[q] * 60 / part for c in parts]) for q in KINDS},
            "per_hour": {q: v * 3600 / win for q, v in total.items()},
            "pct_core": 100 * (cpu1[k] - cpu0[k]) / win,
        }
    # The standby's own request meter over the same window (status --json).
    r0 = (st0.get("replicas") or [{}])[0].get("requests") or {}
    r1 = (st1.get("replicas") or [{}])[0].get("requests") or {}
    res["lsd_self_count"] = {q: r1.get(q, 0) - r0.get(q, 0) for q in r1}
    if not a.keep:
        pair.remove()
        shutil.rmtree(work / "sb-idle-ls05", ignore_errors=True)
        s3.remove("sb-idle-ls05")
    return res


# --------------------------------------------------------------------------------------------
# promote

def promote_run(a, work: Path, s3: S3Server, r: int) -> dict:
    name = f"sb-promote-{r}"
    pair = Pair(a, work, s3, name)
    lsd = Litestreamd(a.litestreamd)
    try:
        w = start_writer(pair.pdb, 100, PROMOTE_ROWS / 100)
        ws, _ = finish_writer(w)
        wait_for(lambda: count_rows(pair.sdb) == ws["tx"], 60,
                 f"the standby to show the {ws['tx']} rows", pair.standby.proc, pair.standby.log,
                 interval=0.1)
        if a.quiet_wait:
            wait_quiet(a.quiet_wait)
        pair.primary.kill()
        tok = random.randbytes(TOKEN)
        wall0, t0 = time.time(), time.monotonic()
        out = subprocess.run([a.litestreamd, "promote", DB, "--force", "--socket",
                              str(pair.standby.sock)], capture_output=True, text=True,
                             timeout=120)
        t_ret = time.monotonic() - t0
        if out.returncode != 0:
            raise BenchError(f"promote exited {out.returncode}: {out.stdout}{out.stderr}\n"
                             f"{tail(pair.standby.log)}")
        # The first write on the promoted database (retried while it is busy).
        attempts = 0
        while True:
            attempts += 1
            try:
                con = sqlite3.connect(pair.sdb, isolation_level=None, timeout=0.05)
                con.execute("INSERT INTO t(v) VALUES (?)", (tok + random.randbytes(100 - TOKEN),))
                con.close()
                break
            except sqlite3.OperationalError as e:
                if time.monotonic() - t0 > 60:
                    raise BenchError(f"no write accepted on the promoted database: {e}")
                time.sleep(0.01)
        t_write = time.monotonic() - t0
        pieces = [tok[i:i + 8] for i in range(0, TOKEN, 8)]
        body = s3_body(s3)
        checked: set[str] = set()

        def replicated():
            for b, e, k in object_writes(pair.sproxy.requests()):
                if b < wall0 or k in checked or not (lsd.is_segment(k) or lsd.is_snapshot(k)):
                    continue
                data = body(k) or b""
                checked.add(k)
                if any(p in data for p in pieces):
                    return e, "snapshot" if lsd.is_snapshot(k) else "WAL segment"
            return None

        t_rep_wall, carried_by = wait_for(replicated, 60, "the first write's segment upload",
                              pair.standby.proc, pair.standby.log, interval=0.02)
        st = pair.standby.status()
        problems = pair.standby.problems()
        rows = count_rows(pair.sdb)
    finally:
        pair.close()
    if rows != ws["tx"] + 1:
        raise BenchError(f"promoted database holds {rows} rows, expected {ws['tx'] + 1}")
    # The replica's latest is the promoted database, with every row.
    restored = pair.d / "restored.db"
    subprocess.run(lsd.restore_argv(pair.d, restored, pair.sdb, S3Target(s3.port, name)),
                   check=True, capture_output=True, env=lsd.env(), timeout=120)
    got = count_rows(restored)
    if got != rows:
        raise BenchError(f"restore of the replica after promote: {got} rows, expected {rows}")
    res = {"promote_s": t_ret, "first_write_s": t_write, "replicated_s": t_rep_wall - wall0,
           "write_attempts": attempts, "output": out.stdout.strip(), "carried_by": carried_by,
           "state": st.get("state"), "promoted_at": (st.get("standby") or {}).get("promoted_at"),
           "rows": rows, "restored_rows": got, "log_problems": problems[:5],
           "log_problem_count": len(problems)}
    if not a.keep:
        pair.remove()
    return res


def bench_promote(a, work: Path, s3: S3Server) -> dict:
    runs = []
    for r in range(a.reps):
        m = promote_run(a, work, s3, r)
        runs.append(m)
        log(f"  promote run {r + 1}/{a.reps}: returned after {m['promote_s']:.3f} s, first write "
            f"at {m['first_write_s']:.3f} s, replicated at {m['replicated_s']:.3f} s "
            f"({m['output']!r}; {m['rows']} rows, restore of the replica has "
            f"{m['restored_rows']})")
    return {"runs": runs,
            **{f: summary([m[f] for m in runs])
               for f in ("promote_s", "first_write_s", "replicated_s")}}


def bench_standby(a, work: Path, s3: S3Server) -> dict:
    log(f"  standby lag at {a.lag_tps} tx/s, {a.standby_seconds:g} s per run, {a.reps} run(s)")
    lag = bench_lag(a, work, s3)
    log(f"  idle standby vs Litestream 0.5.17 follow mode, {a.idle_seconds:g} s")
    idle = bench_idle(a, work, s3)
    log(f"  promote --force after SIGKILL of the primary, {a.reps} run(s)")
    promote = bench_promote(a, work, s3)
    return {"lag": lag, "idle": idle, "promote": promote, "seconds": a.standby_seconds}


# --------------------------------------------------------------------------------------------
# report

def render(a, R: dict) -> list[str]:
    out = [f"## Standby (issue 19): primary and standby `litestreamd run` on this machine, S3 "
           f"(s3s-fs on loopback, each daemon through its own counting proxy); primary monitor "
           f"and sync 1 s, standby poll 1 s; median of {a.reps} [min–max]", ""]
    lag = R["lag"]
    out.append(f"### End-to-end lag: commit on the primary → row visible to a read-only reader "
               f"of the standby (polled every {READER_INTERVAL * 1000:.0f} ms); single-row "
               f"inserts for {R['seconds']:g} s after the standby reports `following`")
    rows = []
    for tps, m in lag.items():
        rows.append([
            f"{tps}", f"{m['commits']}", med(m["e2e_p50_ms"], "{:.0f}"),
            med(m["e2e_p99_ms"], "{:.0f}"), med(m["e2e_max_ms"], "{:.0f}"),
            f"{m['bucket_p50_ms']['median']:.0f} / {m['bucket_p99_ms']['median']:.0f}",
            f"{m['fetch_p50_ms']['median']:.0f} / {m['fetch_p99_ms']['median']:.0f}",
            f"{m['applied_p50_ms']['median']:.0f} / {m['applied_p99_ms']['median']:.0f} / "
            f"{m['applied_max_ms']['median']:.0f}",
            f"{m['apply_p50_ms']['median']:.0f} / {m['apply_p99_ms']['median']:.0f} / "
            f"{m['apply_max_ms']['median']:.0f} ({m['apply_batches']['median']:.0f})",
            f"{m['applied_visible_p50_ms']['median']:.0f}",
            med(m["standby_pct_core"]), f"{m['writer_rate']['median']:.0f}",
            f"{m['other_cores_max']:.2f}",
        ])
    out.append(table(["tx/s", "commits per run", "lag p50 ms", "lag p99 ms", "lag max ms",
                      "commit → segment in bucket p50 / p99 ms",
                      "uploaded → fetched p50 / p99 ms",
                      "uploaded → applied p50 / p99 / max ms",
                      "standby's own apply_lag p50 / p99 / max ms (batches)",
                      "applied → visible p50 ms",
                      "standby % of one core", "achieved tx/s", "other busy cores (max)"], rows))
    trunc = [r["truncation_mean_ms"] for m in lag.values() for r in m["runs"]]
    out.append("Columns after the lag split it: commit → segment in bucket (the content rule of "
               "the replication-lag figure, primary's proxy); uploaded → fetched (primary's PUT "
               "done → the standby's first successful GET of that key done, the two proxies); "
               "uploaded → applied (a batch's oldest segment's PUT done → the standby's "
               "`standby applied` log line); applied → visible (→ the reader's first poll that "
               "sees it). The standby's own apply_lag is its "
               "`litestreamd_standby_apply_lag_seconds` summary (object time → applied): over "
               "S3 the object time is the send time litestreamd's uploads carry as user "
               "metadata (`x-amz-meta-litestreamd-put-ms`, the primary's clock); the "
               "Last-Modified header, whole seconds over HTTP, would read high by the upload's "
               f"fraction of a second (in these runs {statistics.mean(trunc):.0f} ms on "
               f"average, per run {min(trunc):.0f}–{max(trunc):.0f} ms)")
    notes = [f"{tps} tx/s run {i + 1}: {x}" for tps, m in lag.items()
             for i, r in enumerate(m["runs"]) for x in r["log_problems"]]
    missing = [f"{tps} tx/s: {r['bucket_missing']} commits in no segment" for tps, m in lag.items()
               for r in m["runs"] if r["bucket_missing"]]
    if missing:
        out.append("note: " + "; ".join(missing))
    if notes:
        out.append("note: WARN/ERROR lines in the daemons' logs: " + " | ".join(notes[:5]))
    out.append("")

    idle = R["idle"]
    out.append(f"### Requests of an idle standby: database of 100 rows, no writes, "
               f"{idle['window_s']:.0f} s window in {idle['parts']} part(s), extrapolated to "
               f"an hour")
    rows = []
    for k, t in idle["tools"].items():
        ph = t["per_hour"]
        rows.append([t["label"] + ("" if t["role"] == "follower" else " (context)")]
                    + [f"{ph[q]:.0f}" for q in ("GET", "LIST", "HEAD", "PUT", "DELETE")]
                    + [f"{sum(ph.values()):.0f}",
                       f"{med(t['per_min']['GET'], '{:.0f}')} / "
                       f"{med(t['per_min']['LIST'], '{:.0f}')}",
                       f"{t['pct_core']:.2f}"])
    if "ls05" not in idle["tools"]:
        rows.append(["Litestream 0.5.17 restore -f"] + ["n/a"] * 6
                    + [f"n/a ({idle.get('ls05_error')})", "n/a"])
    out.append(table(["process", "GET/h", "LIST/h", "HEAD/h", "PUT/h", "DELETE/h", "total/h",
                      "GET / LIST per minute", "idle % of one core"], rows))
    sc = idle.get("lsd_self_count") or {}
    out.append(f"litestreamd standby's own request meter (status --json) over the window: "
               + ", ".join(f"{v} {k.upper()}" for k, v in sc.items() if v) + "; documented "
               f"(src/standby.rs, LIST_EVERY = 60 polls): {DOC_GET_H} GET + {DOC_LIST_H} LIST "
               f"per hour (a listing every 60 idle polls, so a window holds a whole number of "
               f"listing rounds: LIST/h is coarse for windows of a few minutes)")
    if idle.get("ls05"):
        out.append(f"Litestream 0.5.17 follower: `{idle['ls05']['argv']}` (its replicator: "
                   f"`litestream replicate`, monitor and sync 1 s, its own prefix, defaults "
                   f"otherwise)")
    if idle["log_problems"]:
        out.append("note: WARN/ERROR lines in the daemons' logs: "
                   + " | ".join(idle["log_problems"]))
    out.append("")

    pr = R["promote"]
    out.append(f"### Promotion: {PROMOTE_ROWS} rows written and seen on the standby, primary "
               f"killed (SIGKILL), then `litestreamd promote {DB} --force`; seconds from the "
               f"promote's start")
    rows = []
    for i, m in enumerate(pr["runs"]):
        rows.append([f"{i + 1}", f"{m['promote_s']:.3f}", f"{m['first_write_s']:.3f}",
                     f"{m['replicated_s']:.3f} ({m['carried_by']})",
                     f"{m['rows']} / {m['restored_rows']}",
                     m["output"]])
    rows.append(["median [min–max]", med(pr["promote_s"], "{:.3f}"),
                 med(pr["first_write_s"], "{:.3f}"), med(pr["replicated_s"], "{:.3f}"), "", ""])
    out.append(table(["run", "(a) promote returned", "(b) first write accepted",
                      "(c) that write uploaded", "rows on promoted db / in restore of replica",
                      "promote's output"], rows))
    out.append("(c): the completion of the promoted daemon's first PUT (WAL segment, or the new "
               "generation's snapshot when the write made it into that) whose bytes hold the "
               "write's random token; the promoted database replicates with the 1 s intervals")
    notes = [x for m in pr["runs"] for x in m["log_problems"]]
    if notes:
        out.append("note: WARN/ERROR lines in the standby's log: " + " | ".join(notes[:5]))
    out.append("")
    return out


def other_cores_max(R: dict) -> float:
    return max((m["other_cores_max"] for m in R["lag"].values()), default=0.0)


def targets(R: dict) -> list[tuple[str, bool | None]]:
    out = []
    for tps, m in R["lag"].items():
        p = m["e2e_p99_ms"]["median"]
        out.append((f"standby end-to-end lag p99 ≤ 2 s (one sync interval + one poll) at {tps} "
                    f"tx/s: {p:.0f} ms (median of runs; max of runs {m['e2e_p99_ms']['max']:.0f} "
                    f"ms)", p <= 2000))
    pr = R["promote"]
    out.append((f"promote --force returns in under 5 s: {pr['promote_s']['max']:.3f} s (max of "
                f"runs)", pr["promote_s"]["max"] < 5))
    out.append((f"first write on the promoted database accepted and uploaded under 5 s after the "
                f"promote started: accepted {pr['first_write_s']['max']:.3f} s, uploaded "
                f"{pr['replicated_s']['max']:.3f} s (max of runs)",
                pr["replicated_s"]["max"] < 5))
    ph = R["idle"]["tools"]["lsd"]["per_hour"]
    ls05 = R["idle"]["tools"].get("ls05")
    out.append((f"idle standby: {ph['GET']:.0f} GET/h + {ph['LIST']:.0f} LIST/h (documented "
                f"{DOC_GET_H} + {DOC_LIST_H}); Litestream 0.5.17 follow mode: "
                + (f"{sum(ls05['per_hour'].values()):.0f} requests/h" if ls05 else "n/a")
                + " (no target set)", None))
    return out
