#!/usr/bin/env python3
"""Benchmark driver: litestreamd against Litestream 0.3.13 and 0.5.17, same machine, same run.

Figures (bench/README.md describes each, docs/benchmarks.md has the latest table)
  1. Restore time from a local-directory replica: (a) a long WAL history (hundreds of WAL
     indexes after the snapshot), (b) a freshly snapshotted database. litestreamd and 0.3.13
     restore the SAME v0.3 replica; 0.5.17 (which cannot read it) restores its own LTX replica
     of the same database after the same transactions.
  3. Replication lag p50/p99 at 100 and 1,000 tx/s to a loopback S3 server (s3bench.py),
  4. with the replicator's CPU seconds and peak RSS over the same runs,
  5. object-store requests by kind per minute, idle and busy (counted by s3proxy.py),
  6. peak RSS while snapshotting the restore figure's database to S3,
  7. many databases (100 and 1,000) in one process (scalebench.py).
  9. only with --only standby: a litestreamd standby (issue 19; standbybench.py): end-to-end lag
     from a commit on the primary to a reader of the standby, requests of an idle standby
     against Litestream 0.5.17's follow mode, promote --force after the primary died.
  2. only with --only cpu-file: replication CPU with a local-directory replica (the first
     version of figure 4; litestreamd and 0.3.13).

Every figure is the median of --reps runs, with min and max, and the ratio to Litestream 0.3.13
next to it. Standard library only (plus sqlite3). Normally started by bench/run.sh, which
builds litestreamd and installs Litestream and s3s-fs first.

The script also runs itself as the load generator (`bench.py --writer ...`), so the writer's
CPU is never counted against a replicator.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (BLOB, CHILDREN, MB, MiB, PAGE_SIZE, SEG_RE, SNAP_RE, BenchError, start_launcher,
                    drop_caches, file_sha256, generations, integrity_check, log, med,
                    proc_cpu_seconds, proc_status_kib, ratio, rm_db, snapshot_files, spawn, stop,
                    stop_all_children, summary, system_busy_seconds, table, table_digest, tail,
                    timed_run, wait_for, wait_quiet, wal_indexes, write_fsync_seconds, writer_main)
import drillbench
import restorebench
import s3bench
import scalebench
import standbybench
from tools import FileTarget, Litestream, all_tools

# --------------------------------------------------------------------------------------------
# databases

def make_restore_db(path: Path, mib: int) -> int:
    """A database of about `mib` MiB of random blobs, written in large transactions, then put in
    WAL mode. The bulk load runs without a journal (the result is the same file, written once
    instead of twice)."""
    con = sqlite3.connect(path, isolation_level=None)
    con.execute(f"PRAGMA page_size={PAGE_SIZE}")
    con.execute("PRAGMA journal_mode=OFF")
    con.execute("PRAGMA synchronous=OFF")
    con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, b BLOB NOT NULL)")
    target = mib * MiB
    rows_per_tx = (64 * MiB) // (BLOB + 30)
    while True:
        pages = con.execute("PRAGMA page_count").fetchone()[0]
        if pages * PAGE_SIZE >= target:
            break
        left = (target - pages * PAGE_SIZE) // (PAGE_SIZE // 4) + 1  # ~4 rows a page
        n = max(1, min(rows_per_tx, left))
        con.execute("BEGIN")
        con.execute(
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c WHERE x<?) "
            "INSERT INTO t(b) SELECT randomblob(?) FROM c", (n, BLOB))
        con.execute("COMMIT")
    con.execute("PRAGMA journal_mode=WAL")
    rows = con.execute("SELECT count(*) FROM t").fetchone()[0]
    con.close()
    return rows


def history_batch(con: sqlite3.Connection, rng: random.Random, max_id: int, updates: int) -> int:
    """One small write transaction: rewrite `updates` random rows (scattered pages) and append
    two rows. Returns the new max id."""
    # The data come from `rng`, so the same seed replays the same history (Litestream 0.5.17's
    # copy of the database receives exactly the batches litestreamd's did).
    con.execute("BEGIN IMMEDIATE")
    for _ in range(updates):
        con.execute("UPDATE t SET b=? WHERE id=?", (rng.randbytes(BLOB), rng.randint(1, max_id)))
    con.execute("INSERT INTO t(b) VALUES (?), (?)", (rng.randbytes(BLOB), rng.randbytes(BLOB)))
    con.execute("COMMIT")
    return max_id + 2


# --------------------------------------------------------------------------------------------
# figure 1: restore

def litestreamd_toml(work: Path, db: Path, replica: Path, min_pages: int,
                     listeners_off: bool) -> Path:
    cfg = work / "lsd-config"
    (cfg / "dbs.d").mkdir(parents=True, exist_ok=True)
    main = 'dbs_dir = "dbs.d"\n'
    if listeners_off:
        # No metrics listener (default 127.0.0.1:9093 could collide) and no control socket in
        # /run; builds that predate these keys reject them, see start_litestreamd_run.
        main += 'metrics_addr = ""\ncontrol_socket = ""\n'
    (cfg / "litestreamd.toml").write_text(main)
    (cfg / "dbs.d" / "app.toml").write_text(
        f'path = "{db}"\n'
        'monitor_interval = "50ms"\n'
        f"min_checkpoint_page_count = {min_pages}\n"
        "max_checkpoint_page_count = 10000\n"
        'checkpoint_interval = "1m"\n'
        "[[replicas]]\n"
        'name = "local"\n'
        'type = "file"\n'
        f'path = "{replica}"\n'
        'sync_interval = "50ms"\n')
    return cfg / "litestreamd.toml"


def start_litestreamd_run(a, work: Path, db: Path, replica: Path, lg: Path):
    """`litestreamd run` with listeners disabled; an older build that does not know the keys
    (unknown field) is started again without them."""
    for listeners_off in (True, False):
        cfg = litestreamd_toml(work, db, replica, min_pages=16, listeners_off=listeners_off)
        p = spawn([a.litestreamd, "--log-level", "warn", "run", "--config", str(cfg)], lg)
        try:
            p.wait(1.5)
        except subprocess.TimeoutExpired:
            return p
        CHILDREN.pop(p.pid, None)
        if not (listeners_off and "unknown field" in tail(lg)):
            raise BenchError(f"litestreamd run exited with {p.returncode}:\n{tail(lg)}")
        log("this litestreamd build has no metrics_addr/control_socket keys; starting it "
            "without them")
    raise AssertionError


def build_history_replica(a, work: Path) -> dict:
    db = work / "app.db"
    replica = work / "replica-history"
    t0 = time.monotonic()
    rows = make_restore_db(db, a.db_mib)
    size = db.stat().st_size
    log(f"created {db.name}: {size / MiB:.0f} MiB, {rows} rows in {time.monotonic() - t0:.1f}s")
    db05 = None
    if a.litestream05:
        # Litestream 0.5.17 cannot read v0.3 replicas: it gets its own copy of the database,
        # replays the same batches on it below and restores its own (LTX) replica.
        db05 = work / "app05.db"
        shutil.copyfile(db, db05)

    # Each batch writes ~updates+3 pages; a PASSIVE checkpoint (=> next WAL index) happens once
    # the WAL holds min_pages, so every batch ends its own index.
    updates = 24
    lg = work / "litestreamd-run.log"
    p = start_litestreamd_run(a, work, db, replica, lg)
    t0 = time.monotonic()
    wait_for(lambda: snapshot_files(replica), 600, "the initial snapshot", p, lg)
    snap = snapshot_files(replica)[0]
    snap_index = int(SNAP_RE.match(snap.name).group(1), 16)
    log(f"initial snapshot {snap.name} ({snap.stat().st_size / MiB:.0f} MiB) "
        f"after {time.monotonic() - t0:.1f}s; writing {a.indexes} batches")

    con = sqlite3.connect(db, isolation_level=None, timeout=30)
    con.execute("PRAGMA busy_timeout=30000")
    con.execute("PRAGMA synchronous=NORMAL")
    con.execute("PRAGMA wal_autocheckpoint=0")  # the replicator checkpoints
    rng = random.Random(1)
    max_id = con.execute("SELECT max(id) FROM t").fetchone()[0]
    t0 = time.monotonic()
    batches = 0
    slow = 0
    while len([i for i in wal_indexes(replica) if i > snap_index]) < a.indexes:
        before = max(wal_indexes(replica), default=-1)
        max_id = history_batch(con, rng, max_id, updates)
        batches += 1
        try:
            wait_for(lambda: max(wal_indexes(replica), default=-1) > before, 10,
                     "the next WAL index", p, lg, interval=0.01)
        except BenchError:
            if p.poll() is not None:
                raise
            slow += 1
        if batches > 3 * a.indexes + 50:
            raise BenchError(f"{batches} batches produced only "
                             f"{len(wal_indexes(replica))} WAL indexes")
    con.close()
    elapsed = time.monotonic() - t0
    rc = stop(p)
    if rc != 0:
        raise BenchError(f"litestreamd run exited with {rc}:\n{tail(lg)}")
    log(f"{batches} batches in {elapsed:.1f}s ({slow} waited >10s for an index); "
        f"litestreamd stopped")

    gens = generations(replica)
    if len(gens) != 1:
        raise BenchError(f"expected one generation in the history replica, found {gens}")
    # Count with the tool itself, as a cross-check of the directory listing.
    segs = json.loads(subprocess.run(
        [a.litestreamd, "--log-level", "error", "wal", "--json", f"file://{replica}"],
        check=True, capture_output=True, text=True).stdout)
    snaps = json.loads(subprocess.run(
        [a.litestreamd, "--log-level", "error", "snapshots", "--json", f"file://{replica}"],
        check=True, capture_output=True, text=True).stdout)
    snap_index = max(s["index"] for s in snaps)
    idx = sorted({s["index"] for s in segs if s["index"] >= snap_index})
    if idx != list(range(snap_index, snap_index + len(idx))):
        raise BenchError(f"WAL indexes after the snapshot are not contiguous: {idx[:10]}...")
    wal_bytes = sum(s["size"] for s in segs if s["index"] >= snap_index)
    n_after = len([i for i in idx if i > snap_index])
    log(f"replica: snapshot index {snap_index:08x}, {len(idx)} WAL indexes from it "
        f"({n_after} after it), {len(segs)} segments, {wal_bytes / MiB:.1f} MiB of LZ4 WAL")
    return {
        "db": db, "replica": replica, "db_bytes": size, "snapshot_index": snap_index,
        "snapshot_bytes": snapshot_files(replica)[-1].stat().st_size,
        "indexes": len(idx), "indexes_after_snapshot": n_after, "segments": len(segs),
        "wal_lz4_bytes": wal_bytes, "batches": batches, "db05": db05,
    }


LS05_LEVEL0 = "ltx/0"


def ltx_max_txid(replica: Path, level: int = 0) -> int:
    d = replica / "ltx" / str(level)
    if not d.is_dir():
        return -1
    return max((int(n[17:33], 16) for n in os.listdir(d) if n.endswith(".ltx")), default=-1)


def ltx_summary(replica: Path) -> str:
    parts = []
    for lvl in sorted(replica.glob("ltx/*"), key=lambda p: int(p.name)):
        files = list(lvl.glob("*.ltx"))
        parts.append(f"L{lvl.name}: {len(files)} files "
                     f"{sum(f.stat().st_size for f in files) / MiB:.1f} MiB")
    return ", ".join(parts)


def build_ls05_replica(a, work: Path, db: Path, case: str, batches: int) -> dict:
    """Litestream 0.5.17 replicates `db` to a local directory (LTX layout) with 50 ms intervals;
    for the history case it then receives the same `batches` transactions as litestreamd's copy
    (same seed), each waited for until its level-0 LTX file is in the replica."""
    tool = Litestream(a.litestream05, "0.5.17")
    replica = work / f"replica05-{case}"
    shutil.rmtree(work / f".{db.name}-litestream", ignore_errors=True)
    lg = work / f"litestream05-{case}.log"
    interval = "50ms" if batches else "1s"
    p = spawn(tool.replicate_argv(work, db, FileTarget(replica), interval, interval), lg,
              env=tool.env())
    t0 = time.monotonic()
    try:
        wait_for(lambda: tool.has_snapshot(replica), 600, "Litestream 0.5.17's snapshot", p, lg)
        log(f"Litestream 0.5.17 snapshot of {db.name} after {time.monotonic() - t0:.1f}s"
            + (f"; replaying {batches} batches" if batches else ""))
        if batches:
            con = sqlite3.connect(db, isolation_level=None, timeout=30)
            con.execute("PRAGMA busy_timeout=30000")
            con.execute("PRAGMA synchronous=NORMAL")
            rng = random.Random(1)
            max_id = con.execute("SELECT max(id) FROM t").fetchone()[0]
            t0 = time.monotonic()
            slow = 0
            for _ in range(batches):
                before = ltx_max_txid(replica)
                max_id = history_batch(con, rng, max_id, 24)
                try:
                    wait_for(lambda: ltx_max_txid(replica) > before, 10, "the next LTX file", p,
                             lg, interval=0.01)
                except BenchError:
                    if p.poll() is not None:
                        raise
                    slow += 1  # it lands in a later file; the restore is still verified
            con.close()
            log(f"{batches} batches in {time.monotonic() - t0:.1f}s ({slow} waited >10s)")
        time.sleep(2.5)
    finally:
        rc = stop(p)
    if rc != 0:
        raise BenchError(f"Litestream 0.5.17 exited with {rc}:\n{tail(lg)}")
    info = ltx_summary(replica)
    log(f"Litestream 0.5.17 replica ({case}): {info}")
    return {"replica05": replica, "ltx05": info}


def build_fresh_replica(a, work: Path, source: Path) -> dict:
    """A freshly snapshotted copy: `source` (a restored database, no -wal) replicated by
    `litestreamd replicate` until its first snapshot is uploaded."""
    db = work / "fresh.db"
    replica = work / "replica-fresh"
    os.replace(source, db)
    lg = work / "litestreamd-replicate-fresh.log"
    p = spawn([a.litestreamd, "--log-level", "warn", "replicate", str(db), f"file://{replica}",
               "--monitor-interval", "1s", "--sync-interval", "1s"], lg)
    wait_for(lambda: snapshot_files(replica), 600, "the snapshot", p, lg)
    time.sleep(2.5)  # let the first WAL segment (litestreamd's own header write) land
    rc = stop(p)
    if rc != 0:
        raise BenchError(f"litestreamd replicate exited with {rc}:\n{tail(lg)}")
    snaps = snapshot_files(replica)
    snap_index = int(SNAP_RE.match(snaps[-1].name).group(1), 16)
    idx = sorted(i for i in wal_indexes(replica) if i >= snap_index)
    segs = sum(1 for g in generations(replica)
               for n in os.listdir(replica / "generations" / g / "wal") if SEG_RE.match(n))
    log(f"fresh replica: snapshot {snaps[-1].name} "
        f"({snaps[-1].stat().st_size / MiB:.0f} MiB), WAL indexes {idx}")
    return {"db": db, "replica": replica, "db_bytes": db.stat().st_size,
            "snapshot_index": snap_index, "snapshot_bytes": snaps[-1].stat().st_size,
            "indexes": len(idx), "indexes_after_snapshot": len([i for i in idx if i > snap_index]),
            "segments": segs}


RESTORE_TOOLS = [
    ("ls", "Litestream 0.3.13"),
    ("lsd", "litestreamd --no-integrity-check"),
    ("lsd_ic", "litestreamd (default: + integrity_check)"),
    ("ls05", "Litestream 0.5.17 (its own LTX replica)"),
]


def restore_tools(a) -> list[tuple[str, str]]:
    return [t for t in RESTORE_TOOLS if t[0] != "ls05" or a.litestream05]


def restore_argv(a, tool: str, out: Path, rep: dict) -> list[str]:
    url = f"file://{rep['replica']}"
    if tool == "ls":
        return [a.litestream, "restore", "-o", str(out), url]
    if tool == "ls05":
        # no integrity check by default (-integrity-check none), like 0.3.13
        return [a.litestream05, "restore", "-o", str(out), f"file://{rep['replica05']}"]
    argv = [a.litestreamd, "--log-level", "warn", "restore", "-o", str(out)]
    if tool == "lsd":
        argv.append("--no-integrity-check")
    return argv + [url]


def bench_restore(a, work: Path, case: str, rep: dict, cold: bool, keep_one: bool) -> dict:
    """Times every tool restoring rep['replica'], interleaved, a.reps times; verifies the first
    output of every tool. If keep_one, the litestreamd output of the first run is returned
    (renamed) for reuse."""
    replica = rep["replica"]
    tools = restore_tools(a)
    times: dict[str, list[dict]] = {k: [] for k, _ in tools}
    lg = work / f"restore-{case}.log"
    first_outputs: dict[str, Path] = {}
    cache_state = set()
    for r in range(a.reps):
        order = tools[r % len(tools):] + tools[:r % len(tools)]
        for tool, label in order:
            out = work / f"restored-{case}-{tool}-{r}.db"
            rm_db(out)
            if a.quiet_wait:
                wait_quiet(a.quiet_wait)
            if cold:
                cache_state.add("cold" if drop_caches() else "warm")
            else:
                os.sync()
                cache_state.add("warm")
            env = None
            if tool == "ls05":
                env = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}
            m = timed_run(restore_argv(a, tool, out, rep), lg, env=env)
            if not out.exists():
                raise BenchError(f"{label} exited 0 but {out} does not exist")
            # Anything else named after the output is a leftover (Litestream 0.3.13 leaves
            # OUT.tmp-wal and OUT.tmp-shm behind); note it and remove it.
            m["leftovers"] = sorted(n[len(out.name):] for n in os.listdir(work)
                                    if n.startswith(out.name) and n != out.name)
            for sfx in m["leftovers"]:
                if sfx not in ("-wal", "-shm"):
                    Path(str(out) + sfx).unlink()
            m["bytes"] = out.stat().st_size
            times[tool].append(m)
            log(f"  {case} run {r + 1}/{a.reps} {label}: {m['wall']:.2f}s "
                f"(cpu {m['cpu']:.2f}s = {m['user']:.2f} user + {m['sys']:.2f} sys, maxrss {m['maxrss_kib'] / 1024:.0f} MiB, "
                f"other busy cores {m['other_cores']:.2f})")
            if r == 0:
                first_outputs[tool] = out
            else:
                rm_db(out)
        if r == 0:
            verify_restores(rep, first_outputs)
            for tool, out in first_outputs.items():
                if keep_one and tool == "lsd":
                    continue
                rm_db(out)
    res = {"case": case, "cache": "/".join(sorted(cache_state)), "tools": {}}
    for tool, label in tools:
        runs = times[tool]
        walls = [m["wall"] for m in runs]
        res["tools"][tool] = {
            "label": label, "wall": summary(walls),
            "mb_s": summary([m["bytes"] / MB / m["wall"] for m in runs]),
            "cpu": summary([m["cpu"] for m in runs]),
            "maxrss_mib": max(m["maxrss_kib"] for m in runs) / 1024,
            "leftovers": sorted({x for m in runs for x in m["leftovers"]}),
            "other_cores_max": max(m["other_cores"] for m in runs),
        }
    res["verification"] = rep.get("verification")
    if keep_one:
        res["kept"] = first_outputs["lsd"]
    return res


def verify_restores(rep: dict, outputs: dict[str, Path]) -> None:
    """Both tools must produce the same database, and it must hold the source's rows."""
    t0 = time.monotonic()
    shas = {tool: file_sha256(p) for tool, p in outputs.items()}
    distinct = {}
    for tool, sha in shas.items():
        distinct.setdefault(sha, []).append(tool)
    checks = {}
    for sha, tools in distinct.items():
        p = outputs[tools[0]]
        ic = integrity_check(p)
        n, digest = table_digest(p)
        checks[sha] = {"tools": tools, "integrity_check": ic, "rows": n, "digest": digest}
        if ic != "ok":
            raise BenchError(f"restored database of {tools} fails integrity_check: {ic}")
    if rep.get("source_digest"):
        for c in checks.values():
            if (c["rows"], c["digest"]) != rep["source_digest"]:
                raise BenchError(f"restored data of {c['tools']} differs from the source: "
                                 f"{c['rows']} rows vs {rep['source_digest'][0]}")
    digests = {(c["rows"], c["digest"]) for c in checks.values()}
    if len(digests) != 1:
        raise BenchError(f"the tools restored different data: {checks}")
    identical = len({sha for tool, sha in shas.items() if tool != "ls05"}) == 1
    rep["verification"] = {
        "byte_identical": identical,
        "integrity_check": "ok",
        "rows": next(iter(digests))[0],
        "matches_source": bool(rep.get("source_digest")),
    }
    log(f"  verified: {'byte-identical' if identical else 'NOT byte-identical but same rows'}, "
        f"integrity_check ok, {rep['verification']['rows']} rows"
        f"{', equal to the source' if rep.get('source_digest') else ''} "
        f"({time.monotonic() - t0:.1f}s)")


def bound_measurements(a, work: Path, snap: Path, size: int, cold: bool) -> dict:
    """What the disk and LZ4 allow: cold sequential read of the snapshot object, a write+fsync
    of a file of the database's size, and `lz4 -d` of the snapshot into a file + fsync."""
    out = {}
    if cold:
        drop_caches()
    t0 = time.perf_counter()
    with open(snap, "rb", buffering=0) as f:
        while f.read(8 * MiB):
            pass
    out["read_snapshot_mb_s"] = snap.stat().st_size / MB / (time.perf_counter() - t0)

    tmp = work / "bound.tmp"
    out["write_fsync_mb_s"] = size / MB / write_fsync_seconds(tmp, size)

    # Latency of one small durable write (Litestream pays several per WAL index on restore).
    lat = []
    page = os.urandom(PAGE_SIZE)
    with open(tmp, "wb", buffering=0) as f:
        for i in range(50):
            f.write(page)
            t0 = time.perf_counter()
            os.fsync(f.fileno())
            lat.append(time.perf_counter() - t0)
    tmp.unlink()
    out["fsync_ms"] = statistics.median(lat) * 1000

    lz4 = shutil.which("lz4")
    if lz4:
        if cold:
            drop_caches()
        t0 = time.perf_counter()
        with open(tmp, "wb") as f:
            subprocess.run([lz4, "-dc", str(snap)], stdout=f, check=True)
            os.fsync(f.fileno())
        out["lz4_cli_restore_s"] = time.perf_counter() - t0
        out["lz4_cli_restore_mb_s"] = tmp.stat().st_size / MB / out["lz4_cli_restore_s"]
        # decompression alone, from the page cache, to /dev/null
        t0 = time.perf_counter()
        subprocess.run([lz4, "-dc", str(snap)], stdout=subprocess.DEVNULL, check=True)
        out["lz4_decompress_mb_s"] = tmp.stat().st_size / MB / (time.perf_counter() - t0)
        tmp.unlink()
    return out


# --------------------------------------------------------------------------------------------
# figure 2: CPU cost of steady replication


def cpu_run(a, work: Path, tool: str, r: int) -> dict:
    d = work / f"cpu-{tool}-{r}"
    d.mkdir()
    db = d / "app.db"
    replica = d / "replica"
    con = sqlite3.connect(db, isolation_level=None)
    con.execute(f"PRAGMA page_size={PAGE_SIZE}")
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT NOT NULL)")
    con.close()
    lg = d / "replicator.log"
    if tool == "ls":
        yml = d / "litestream.yml"
        yml.write_text(
            "dbs:\n"
            f"  - path: {db}\n"
            "    monitor-interval: 1s\n"
            "    replicas:\n"
            "      - type: file\n"
            f"        path: {replica}\n"
            "        sync-interval: 1s\n")
        argv = [a.litestream, "replicate", "-config", str(yml)]
    else:
        argv = [a.litestreamd, "--log-level", "warn", "replicate", str(db), f"file://{replica}",
                "--monitor-interval", "1s", "--sync-interval", "1s"]
    p = spawn(argv, lg)
    try:
        wait_for(lambda: snapshot_files(replica), 60, "the initial snapshot", p, lg)
        time.sleep(2.0)  # past start-up and the first sync
        if a.quiet_wait:
            wait_quiet(a.quiet_wait)
        w = subprocess.Popen([sys.executable, __file__, "--writer", str(db), str(a.tps),
                              str(a.cpu_seconds)], stdout=subprocess.PIPE, text=True)
        CHILDREN[w.pid] = w
        if w.stdout.readline().strip() != "ready":
            raise BenchError("writer failed to start")
        cpu0, t0, b0 = proc_cpu_seconds(p.pid), time.monotonic(), system_busy_seconds()
        line = w.stdout.readline()
        cpu1, t1, b1 = proc_cpu_seconds(p.pid), time.monotonic(), system_busy_seconds()
        hwm = proc_status_kib(p.pid, "VmHWM")
        _, status, ru = os.wait4(w.pid, 0)
        w.returncode = os.waitstatus_to_exitcode(status)
        CHILDREN.pop(w.pid, None)
        if w.returncode != 0 or not line:
            raise BenchError(f"writer exited with {w.returncode}")
        ws = json.loads(line)
        time.sleep(3.0)  # two more sync intervals: the last writes reach the replica
        if p.poll() is not None:
            raise BenchError(f"replicator exited early ({p.returncode}):\n{tail(lg)}")
    finally:
        rc = stop(p)
    if rc != 0:
        log(f"  note: {tool} replicator exited with {rc} on SIGTERM")
    # Verify: the replica restores to every row the writer committed.
    out = d / "restored.db"
    subprocess.run([a.litestreamd, "--log-level", "error", "restore", "--no-integrity-check",
                    "-o", str(out), f"file://{replica}"], check=True, capture_output=True)
    con = sqlite3.connect(out)
    rows = con.execute("SELECT count(*) FROM t").fetchone()[0]
    con.close()
    if rows != ws["tx"]:
        raise BenchError(f"{tool}: replica restored {rows} rows, writer committed {ws['tx']}")
    replica_bytes = sum(f.stat().st_size for f in replica.rglob("*") if f.is_file())
    res = {"cpu_s": cpu1 - cpu0, "wall_s": t1 - t0, "pct_core": 100 * (cpu1 - cpu0) / (t1 - t0),
           "vmhwm_mib": hwm / 1024, "writer": ws,
           "writer_pct_core": 100 * (ru.ru_utime + ru.ru_stime) / (t1 - t0),
           "rows_restored": rows, "replica_mib": replica_bytes / MiB,
           "other_cores": max(0.0, (b1 - b0) - (cpu1 - cpu0) - (ru.ru_utime + ru.ru_stime))
           / (t1 - t0)}
    shutil.rmtree(d)
    return res


def bench_cpu(a, work: Path) -> dict:
    runs: dict[str, list[dict]] = {"ls": [], "lsd": []}
    for r in range(a.reps):
        for tool in (["ls", "lsd"] if r % 2 == 0 else ["lsd", "ls"]):
            m = cpu_run(a, work, tool, r)
            runs[tool].append(m)
            log(f"  cpu run {r + 1}/{a.reps} {tool}: {m['pct_core']:.2f}% of a core "
                f"({m['cpu_s']:.2f} CPU-s over {m['wall_s']:.1f}s), VmHWM {m['vmhwm_mib']:.1f} MiB, "
                f"writer {m['writer']['rate']:.0f} tx/s (worst commit "
                f"{m['writer']['worst_commit_ms']:.1f} ms), {m['rows_restored']} rows verified, "
                f"other busy cores {m['other_cores']:.2f}")
    out = {}
    for tool, ms in runs.items():
        out[tool] = {"pct_core": summary([m["pct_core"] for m in ms]),
                     "cpu_s": summary([m["cpu_s"] for m in ms]),
                     "vmhwm_mib": summary([m["vmhwm_mib"] for m in ms]),
                     "writer_rate": summary([m["writer"]["rate"] for m in ms]),
                     "writer_pct_core": summary([m["writer_pct_core"] for m in ms]),
                     "worst_commit_ms": max(m["writer"]["worst_commit_ms"] for m in ms),
                     "replica_mib": summary([m["replica_mib"] for m in ms]),
                     "other_cores_max": max(m["other_cores"] for m in ms)}
    return out


# --------------------------------------------------------------------------------------------
# report

def environment(a) -> dict:
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kib = int(f.readline().split()[1])
    fs = subprocess.run(["df", "-T", str(a.bench_dir)], capture_output=True, text=True).stdout
    fs = fs.splitlines()[-1].split()[1] if fs else "?"
    lsd_v = subprocess.run([a.litestreamd, "--version"], capture_output=True, text=True).stdout
    ls_v = subprocess.run([a.litestream, "version"], capture_output=True, text=True).stdout
    rev = subprocess.run(["git", "-C", str(Path(__file__).resolve().parent.parent), "describe",
                          "--always", "--dirty"], capture_output=True, text=True).stdout.strip()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(), "cpu": cpu, "mem_gib": round(mem_kib / (1 << 20), 1),
        "kernel": platform.release(), "os": platform.platform(terse=True), "fs": fs,
        "loadavg_start": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
        "python": platform.python_version(), "sqlite": sqlite3.sqlite_version,
        "litestreamd": f"{lsd_v.strip()} (binary built {a.litestreamd_built}; tree at git "
                       f"{rev or '?'})",
        "litestream": ls_v.strip(),
        "litestream05": (subprocess.run([a.litestream05, "version"], capture_output=True,
                                        text=True, env=env05()).stdout.strip()
                         if a.litestream05 else "not run"),
    }


def env05() -> dict:
    return {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}



def labels_for(a) -> dict[str, str]:
    return {t.key: t.label for t in all_tools(a)}


def render_restore(a, restore: list[dict], reps_info: dict, bounds: dict) -> list[str]:
    out = []
    for res in restore:
        info = reps_info[res["case"]]
        v = res["verification"] or {}
        title = {"history": "Restore, long WAL history",
                 "fresh": "Restore, fresh snapshot"}[res["case"]]
        out.append(f"## {title}: {info['db_bytes'] / MiB:.0f} MiB database, snapshot "
                   f"{info['snapshot_bytes'] / MiB:.0f} MiB LZ4, {info['indexes_after_snapshot']} "
                   f"WAL indexes after the snapshot ({info['segments']} segments"
                   + (f", {info['wal_lz4_bytes'] / MiB:.1f} MiB LZ4" if "wal_lz4_bytes" in info
                      else "") + ")")
        cache = res["cache"]
        out.append(f"page cache: {'dropped before every run (cold)' if cache == 'cold' else cache + ' (could not drop caches)' if a.cold else 'warm (--warm)'}; "
                   f"v0.3-layout outputs {'byte-identical' if v.get('byte_identical') else 'NOT byte-identical'}"
                   f", integrity_check {v.get('integrity_check')}, {v.get('rows')} rows"
                   f"{', equal to the source database' if v.get('matches_source') else ''}")
        if "ltx05" in info:
            out.append(f"Litestream 0.5.17 restores its own replica of the same database after "
                       f"the same transactions (it cannot read v0.3 replicas): {info['ltx05']}")
        base = res["tools"]["ls"]["wall"]["median"]
        lsd = res["tools"]["lsd"]["wall"]["median"]
        rows = []
        for tool, t in res["tools"].items():
            w, mbs = t["wall"], t["mb_s"]
            if tool == "ls":
                rel = "1.00"
            elif tool == "ls05":
                rel = (f"{ratio(w['median'], base)}; lsd/this "
                       f"{ratio(lsd, w['median'])} ({w['median'] / lsd:.1f}x)")
            elif w["median"] < base:
                rel = f"{ratio(w['median'], base)} ({base / w['median']:.1f}x faster)"
            else:
                rel = f"{ratio(w['median'], base)} ({w['median'] / base:.1f}x slower)"
            rows.append([t["label"], med(w), med(mbs, "{:.0f}"), f"{t['cpu']['median']:.2f}",
                         f"{t['maxrss_mib']:.0f}", f"{t['other_cores_max']:.2f}", rel])
        out.append(table(["tool", "seconds", "MB/s (db bytes / s)", "CPU s", "peak RSS MiB",
                          "other busy cores (max)", "time ratio to 0.3.13"], rows))
        for tool, t in res["tools"].items():
            if t["leftovers"]:
                out.append(f"note: {t['label']} left files behind next to the output: "
                           + ", ".join("OUT" + x for x in t["leftovers"]))
        out.append("")
    if bounds:
        b = bounds
        parts = [f"cold sequential read of the snapshot object {b['read_snapshot_mb_s']:.0f} MB/s",
                 f"write+fsync of a database-sized file {b['write_fsync_mb_s']:.0f} MB/s",
                 f"fsync of a 4 KiB append {b['fsync_ms']:.2f} ms (median)"]
        if "lz4_cli_restore_s" in b:
            parts.append(f"`lz4 -d` of the snapshot into a file + fsync "
                         f"{b['lz4_cli_restore_s']:.2f}s ({b['lz4_cli_restore_mb_s']:.0f} MB/s)")
            parts.append(f"LZ4 decompression alone (page cache → /dev/null) "
                         f"{b['lz4_decompress_mb_s']:.0f} MB/s")
        out.append("Physical bounds on this machine: " + "; ".join(parts) + ".")
        out.append("")
    return out


def render_cpu_file(a, cpu: dict) -> list[str]:
    out = [f"## Replication CPU, local-directory replica: {a.tps} single-row (~100 B) insert "
           f"transactions/s for {a.cpu_seconds} s, monitor and sync interval 1 s"]
    base = cpu["ls"]
    rows = []
    for tool, label in (("ls", "Litestream 0.3.13"), ("lsd", "litestreamd")):
        c = cpu[tool]
        p, h = c["pct_core"], c["vmhwm_mib"]
        rows.append([
            label, med(p), f"{c['cpu_s']['median']:.2f}", med(h, "{:.1f}"),
            f"{c['writer_rate']['median']:.0f} (worst commit {c['worst_commit_ms']:.0f} ms)",
            f"{c['writer_pct_core']['median']:.0f}", f"{c['replica_mib']['median']:.1f}",
            f"{c['other_cores_max']:.2f}",
            "1.00 / 1.00" if tool == "ls" else
            f"{ratio(p['median'], base['pct_core']['median'])} / "
            f"{ratio(h['median'], base['vmhwm_mib']['median'])}",
        ])
    out.append(table(["replicator", "% of one core", "CPU s", "peak RSS (VmHWM) MiB",
                      "achieved tx/s", "writer % core", "replica MiB", "other busy cores (max)",
                      "ratio lsd/ls (CPU / RSS)"], rows))
    out.append("")
    return out


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else "MET" if ok else "NOT MET"


def render_targets(a, R: dict) -> list[str]:
    out = ["## Targets (issue 16 restore, issue 6 'The bar', issue 3 performance, issue 7 scale"
           + (", issue 19 standby)" if R.get("standby") else ")")]
    if R.get("shapes"):
        for text, ok in restorebench.targets(R["shapes"]):
            out.append(f"- [issue 16] {text} — {verdict(ok)}")
    if R.get("drill"):
        for text, ok in drillbench.targets(R["drill"]):
            out.append(f"- [issue 17] {text} — {verdict(ok)}")
    hist = next((r for r in R["restore"] if r["case"] == "history"), None)
    if hist:
        t = hist["tools"]
        s = t["ls"]["wall"]["median"] / t["lsd"]["wall"]["median"]
        s_ic = t["ls"]["wall"]["median"] / t["lsd_ic"]["wall"]["median"]
        out.append(f"- [bar] long-history restore ≥2x faster than Litestream 0.3.13 (no integrity "
                   f"check on either side): {s:.2f}x — {verdict(s >= 2)} (with litestreamd's "
                   f"default integrity_check: {s_ic:.2f}x)")
    else:
        out.append("- [bar] long-history restore ≥2x faster than 0.3.13: n/a (not run)")
    lag = R.get("lag") or {}
    for tps, res in lag.items():
        if "ls03" in res:
            p, q = res["lsd"]["lag_p99_ms"]["median"], res["ls03"]["lag_p99_ms"]["median"]
            out.append(f"- [bar] p99 lag no worse than Litestream 0.3.13 at {tps} tx/s: "
                       f"{p:.0f} ms vs {q:.0f} ms — {verdict(p <= q)}")
    if not lag:
        out.append("- [bar] p99 lag no worse than 0.3.13: n/a (not run)")
    if lag:
        tps = max(lag)
        res = lag[tps]
        c = res["lsd"]["cpu_s"]["median"]
        parts = []
        ok = None
        for key in ("ls03", "ls05"):
            if key in res:
                b = res[key]["cpu_s"]["median"]
                parts.append(f"{c / b:.2f} of {labels_for(a)[key]}'s ({c:.2f} vs {b:.2f} CPU s)")
                if key == "ls03":
                    ok = c <= b / 2
        out.append(f"- [bar] replication CPU at most half of Litestream's for the same WAL "
                   f"(same {tps} tx/s workload, S3): " + "; ".join(parts)
                   + f" — {verdict(ok)} against 0.3.13")
        out.append(f"- replication CPU under 5% of one core at {tps} tx/s (S3): "
                   f"{res['lsd']['pct_core']['median']:.2f}% — "
                   f"{verdict(res['lsd']['pct_core']['median'] < 5)}")
    if R.get("cpu"):
        p = R["cpu"]["lsd"]["pct_core"]["median"]
        out.append(f"- replication CPU under 5% of one core (file replica): {p:.2f}% — "
                   f"{verdict(p < 5)}")
    scale = R.get("scale") or {}
    big = scale.get(1000, {}).get("lsd")
    if big:
        r = big["rss_mib"]["median"]
        out.append(f"- [bar] 1,000 databases in one litestreamd under 512 MiB RSS: {r:.0f} MiB — "
                   f"{verdict(r < 512)}")
        cpu = big["pct_core"]["median"]
        out.append(f"- [issue 7] idle CPU for 1,000 databases under 2% of one core: {cpu:.2f}% — "
                   f"{verdict(cpu < 2)}")
    else:
        out.append("- [bar] 1,000 databases under 512 MiB RSS: n/a (1,000 databases not run: "
                   f"sizes {sorted(scale) or 'none'})")
    if len(scale) >= 2:
        kib = scalebench.per_db(scale, "lsd", "rss_mib")
        fds = scalebench.per_db(scale, "lsd", "fds")
        if kib is not None:
            out.append(f"- [issue 7] under 1 MiB RSS and 6 fds per idle database beyond a base: "
                       f"{kib * 1024:.0f} KiB, {fds:.2f} fds — {verdict(kib < 1 and fds <= 6)}")
    idle = (R.get("idle") or {}).get("lsd")
    if idle:
        tot = idle["total"]
        n = sum(tot.values())
        out.append(f"- [issue 18] idle database: 0 requests over a window holding every timer "
                   f"(lease, retention check, interval snapshot; see the requests figure): "
                   f"{n} ({', '.join(f'{v} {k}' for k, v in tot.items() if v) or 'none'}) in "
                   f"{idle['window_s']:.0f} s — {verdict(n == 0)}")
    snap = (R.get("snapshot") or {}).get("lsd")
    if snap:
        h = snap["vmhwm_mib"]["max"]
        out.append(f"- [issue 3] RSS while snapshotting a {R['snapshot_db_mib']:.0f} MiB database "
                   f"to S3 under 64 MiB: {h:.1f} MiB (max of runs) — {verdict(h < 64)}")
    if R.get("standby"):
        for text, ok in standbybench.targets(R["standby"]):
            out.append(f"- [issue 19] {text} — {verdict(ok)}")
    if a.quick:
        out.append("- (quick mode: tiny sizes, one run — a smoke test of the harness; the "
                   "verdicts above mean nothing)")
    return out


def render(a, env: dict, R: dict, total_s: float) -> str:
    out = []
    mode = "quick" if a.quick else "full"
    versions = "Litestream 0.3.13" + (" and 0.5.17" if a.litestream05 else "")
    out.append(f"litestreamd vs {versions} — {mode} mode, {a.reps} run(s) per figure "
               f"(median [min–max])")
    out.append(f"date {env['date']}; {env['nproc']} CPU ({env['cpu']}), {env['mem_gib']} GiB RAM, "
               f"kernel {env['kernel']}, {env['fs']} at {a.bench_dir}")
    out.append(f"{env['litestreamd']}; Litestream {env['litestream']} and "
               f"{env['litestream05']}; SQLite {env['sqlite']} (load generator)")
    la0, la1 = env["loadavg_start"], env.get("loadavg_end", "?")
    other = [t["other_cores_max"] for r in R["restore"] for t in r["tools"].values()]
    other += [c["other_cores_max"] for c in (R.get("cpu") or {}).values()]
    other += [m["other_cores_max"] for res in (R.get("lag") or {}).values() for m in res.values()]
    if R.get("standby"):
        other.append(standbybench.other_cores_max(R["standby"]))
    worst = max(other, default=0.0)
    out.append(f"load average (1/5/15 min) at start {la0}, at end {la1}; busiest measurement "
               f"had {worst:.2f} cores busy outside the measured process"
               + (" — OTHER WORK WAS RUNNING, figures are noisy" if worst > 0.3 else ""))
    out.append("")
    labels = labels_for(a)
    if R.get("shapes"):
        out += restorebench.render(a, R["shapes"])
    if R.get("drill"):
        out += drillbench.render(R["drill"])
        out.append("")
    if R["restore"]:
        out += render_restore(a, R["restore"], R["replicas"], R["bounds"])
    if R.get("snapshot"):
        out += s3bench.render_snapshot(a, R["snapshot"], labels, R["snapshot_db_mib"])
    if R.get("lag"):
        out += s3bench.render_lag(a, R["lag"], labels)
    if R.get("lag") or R.get("idle"):
        out += s3bench.render_requests(a, R.get("lag") or {}, R.get("idle"), labels)
    if R.get("scale"):
        out += scalebench.render_scale(a, R["scale"], labels)
    if R.get("standby"):
        out += standbybench.render(a, R["standby"])
    if R.get("cpu"):
        out += render_cpu_file(a, R["cpu"])
    out += render_targets(a, R)
    out.append("")
    out.append(f"total benchmark time {total_s / 60:.1f} min")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------

FIGURES = ["shapes", "restore", "snapshot", "lag", "idle", "scale", "drill", "cpu-file",
           "standby"]
# `restore` (the older figure 1: directory only, cold, with 0.5.17 and the integrity-check
# variant) and `standby` (figure 9) run when named; `shapes` is the restore figure of every run.
DEFAULT_FIGURES = ["shapes", "snapshot", "lag", "idle", "scale", "drill"]


def main() -> int:
    if len(sys.argv) >= 2 and sys.argv[1] == "--writer":
        writer_main(sys.argv[2], float(sys.argv[3]), float(sys.argv[4]),
                    sys.argv[5] if len(sys.argv) > 5 else None)
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: tiny sizes and windows, 1 repetition (under 3 minutes)")
    ap.add_argument("--litestreamd", default=os.environ.get("LITESTREAMD_BIN"))
    ap.add_argument("--litestream", default=os.environ.get("LITESTREAM_BIN"),
                    help="Litestream 0.3.13 binary")
    ap.add_argument("--litestream05", default=os.environ.get("LITESTREAM05_BIN"),
                    help="Litestream 0.5.17 binary (figures show n/a without it)")
    ap.add_argument("--s3s-fs", default=os.environ.get("S3S_FS_BIN"),
                    help="s3s-fs binary (the loopback S3 server)")
    ap.add_argument("--lz4-rate", default=os.environ.get("LZ4_RATE_BIN"),
                    help="examples/lz4_decode_rate binary (the restore floor's LZ4 figure)")
    ap.add_argument("--bench-dir", type=Path,
                    default=Path(os.environ.get("BENCH_DIR", "/tmp/litestreamd-bench")))
    ap.add_argument("--reps", type=int)
    ap.add_argument("--db-mib", type=int)
    ap.add_argument("--indexes", type=int, help="WAL indexes after the snapshot (history case)")
    ap.add_argument("--lag-seconds", type=float, help="writer time per lag run")
    ap.add_argument("--lag-tps", help="comma-separated write rates (default 100,1000)")
    ap.add_argument("--idle-seconds", type=float, help="idle request window (all parts)")
    ap.add_argument("--standby-seconds", type=float,
                    help="writer time per run of the standby lag figure (default 20; quick 5)")
    ap.add_argument("--scale-dbs", help="comma-separated database counts (default 100,1000)")
    ap.add_argument("--scale-seconds", type=float, help="idle window of the many-databases figure")
    ap.add_argument("--scale-tools", default="lsd,ls03,ls05",
                    help="comma-separated tools of the many-databases figure (lsd, ls03, ls05), "
                         "e.g. lsd,ls05 for 10,000 databases")
    ap.add_argument("--scale-deadline", type=float,
                    help="seconds a tool may take to snapshot every database (default 60 + "
                         "0.2 per database); past it the tool's run is reported as failed")
    ap.add_argument("--cpu-seconds", type=int, help="writer time of --only cpu-file")
    ap.add_argument("--tps", type=int, default=1000, help="write rate of --only cpu-file")
    ap.add_argument("--warm", dest="cold", action="store_false",
                    help="do not drop the page cache before each restore")
    ap.add_argument("--only", help="comma-separated figures: " + ", ".join(FIGURES)
                    + f" (default: {','.join(DEFAULT_FIGURES)}; restore, cpu-file and standby only "
                      "when named)")
    ap.add_argument("--quiet-wait", type=float,
                    help="before each measurement wait up to this many seconds for the machine "
                         "to be idle (default 30 in full mode, 0 in quick mode)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory")
    ap.add_argument("--json", type=Path, help="also write the results as JSON here")
    a = ap.parse_args()
    start_launcher()
    if not a.litestreamd or not a.litestream:
        ap.error("--litestreamd and --litestream (or LITESTREAMD_BIN, LITESTREAM_BIN) are required")
    figures = a.only.split(",") if a.only else DEFAULT_FIGURES
    for f in figures:
        if f not in FIGURES:
            ap.error(f"unknown figure {f!r}; choose from {', '.join(FIGURES)}")
    if not a.s3s_fs and set(figures) & {"shapes", "snapshot", "lag", "idle", "standby"}:
        ap.error("the S3 figures need --s3s-fs (or S3S_FS_BIN)")
    a.litestreamd = str(Path(a.litestreamd).resolve())
    # Children must not see LITESTREAMD_* variables: `litestreamd run` merges every one of them
    # into its main configuration and (binary of 2026-11-24) rejects unknown keys such as BIN.
    for k in [k for k in os.environ if k.startswith("LITESTREAMD_")]:
        del os.environ[k]
    a.litestream = str(Path(a.litestream).resolve())
    if a.litestream05:
        a.litestream05 = str(Path(a.litestream05).resolve())
    defaults = (dict(reps=1, db_mib=32, indexes=20, lag_seconds=3, idle_seconds=8,
                     scale_dbs="10,40", scale_seconds=2, cpu_seconds=10, quiet_wait=0,
                     lag_tps="100,1000", standby_seconds=5)
                if a.quick else
                dict(reps=3, db_mib=1024, indexes=320, lag_seconds=10, idle_seconds=90,
                     scale_dbs="100,1000", scale_seconds=15, cpu_seconds=60, quiet_wait=30,
                     lag_tps="100,1000", standby_seconds=20))
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    a.lag_tps = [int(x) for x in str(a.lag_tps).split(",")]
    a.scale_dbs = [int(x) for x in str(a.scale_dbs).split(",")]
    a.drain_seconds = 3.0          # after the writer: the last commits reach the bucket
    a.lag_settle = 1.0 if a.quick else 2.0  # after the first snapshot, before the writer
    a.idle_settle = 2.0 if a.quick else 10.0
    a.scale_settle = 1.0 if a.quick else 3.0

    a.bench_dir.mkdir(parents=True, exist_ok=True)
    work = a.bench_dir / f"run-{os.getpid()}"
    work.mkdir()
    # Run a private copy: a concurrent `cargo build` must not swap the binary mid-benchmark.
    (work / "bin").mkdir()
    a.litestreamd_built = datetime.datetime.fromtimestamp(
        os.stat(a.litestreamd).st_mtime).strftime("%Y-%m-%d %H:%M")
    a.litestreamd = str(shutil.copy2(a.litestreamd, work / "bin" / "litestreamd"))
    t_start = time.monotonic()
    env = environment(a)
    log(f"scratch directory {work}; figures {', '.join(figures)}")
    tools = all_tools(a)
    ok = False

    def on_signal(sig, _frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    s3 = None
    try:
        R: dict = {"restore": [], "replicas": {}, "bounds": {}}
        big_db = None  # the snapshot figure's database
        if set(figures) & {"shapes", "snapshot", "lag", "idle", "drill", "standby"}:
            s3 = s3bench.S3Server(a.s3s_fs, work)
        if "shapes" in figures:
            if a.cold and not drop_caches():
                log("cannot drop the page cache (no permission); cold restores run warm")
            log(f"figure 1: restore on three shapes ({a.db_mib} MiB, {a.indexes} indexes), "
                "directory and S3, cold and warm")
            R["shapes"] = restorebench.bench_shapes(a, work, s3, build_history_replica,
                                                    build_fresh_replica, make_restore_db)
        if "restore" in figures:
            if a.cold and not drop_caches():
                log("cannot drop the page cache (no permission); restores run warm")
            log(f"figure 1: building a {a.db_mib} MiB database with {a.indexes} WAL indexes")
            hist = build_history_replica(a, work)
            hist["source_digest"] = table_digest(hist["db"])
            if hist["db05"]:
                hist.update(build_ls05_replica(a, work, hist["db05"], "history",
                                               hist["batches"]))
                rm_db(hist["db05"])
                shutil.rmtree(work / f".{hist['db05'].name}-litestream", ignore_errors=True)
            R["replicas"]["history"] = hist
            log("figure 1a: restoring the long-history replica")
            res = bench_restore(a, work, "history", hist, a.cold, keep_one=True)
            R["restore"].append(res)
            rm_db(hist["db"])
            shutil.rmtree(work / f".{hist['db'].name}-litestream", ignore_errors=True)
            log("figure 1b: snapshotting a fresh copy")
            fresh = build_fresh_replica(a, work, res.pop("kept"))
            fresh["source_digest"] = hist["source_digest"]
            if a.litestream05:
                fresh.update(build_ls05_replica(a, work, fresh["db"], "fresh", 0))
            R["replicas"]["fresh"] = fresh
            res = bench_restore(a, work, "fresh", fresh, a.cold, keep_one=False)
            R["restore"].append(res)
            log("measuring physical bounds")
            R["bounds"] = bound_measurements(a, work, snapshot_files(fresh["replica"])[-1],
                                             fresh["db_bytes"], a.cold)
            big_db = fresh["db"]
            if not a.keep:
                for r in (hist, fresh):
                    shutil.rmtree(r["replica"], ignore_errors=True)
                    if "replica05" in r:
                        shutil.rmtree(r["replica05"], ignore_errors=True)
        if "snapshot" in figures:
            if big_db is None:
                big_db = work / "big.db"
                log(f"building a {a.db_mib} MiB database for the snapshot figure")
                make_restore_db(big_db, a.db_mib)
            R["snapshot_db_mib"] = big_db.stat().st_size / MiB
            log(f"figure 6: peak RSS while snapshotting {R['snapshot_db_mib']:.0f} MiB to S3")
            R["snapshot"] = s3bench.bench_snapshot(a, work, s3, tools, big_db)
        if big_db is not None:
            rm_db(big_db)
        if "lag" in figures:
            log(f"figures 3-5: replication lag, CPU, requests at {a.lag_tps} tx/s for "
                f"{a.lag_seconds}s, {a.reps} run(s) per tool")
            R["lag"] = s3bench.bench_lag(a, work, s3, tools)
        if "idle" in figures:
            log(f"figure 5: requests of an idle database, {a.idle_seconds}s")
            R["idle"] = s3bench.bench_idle(a, work, s3, tools)
        if "drill" in figures:
            log(f"figure 8: restore drill of a {a.db_mib} MiB database, directory and S3")
            R["drill"] = drillbench.bench_drill(a, work, s3, make_restore_db)
        if "standby" in figures:
            log(f"figure 9: standby lag ({a.lag_tps} tx/s), idle requests, promote")
            R["standby"] = standbybench.bench_standby(a, work, s3)
        if s3:
            s3.close()
            s3 = None
        if "scale" in figures:
            log(f"figure 7: {a.scale_dbs} databases in one process")
            keys = a.scale_tools.split(",")
            R["scale"] = scalebench.bench_scale(a, work, [t for t in tools if t.key in keys])
        if "cpu-file" in figures:
            log(f"file-replica CPU: {a.tps} tx/s for {a.cpu_seconds}s, {a.reps} run(s) per tool")
            R["cpu"] = bench_cpu(a, work)
        env["loadavg_end"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])
        report = render(a, env, R, time.monotonic() - t_start)
        print(report, flush=True)
        results = {"env": env, "mode": "quick" if a.quick else "full", "reps": a.reps,
                   "figures": figures, **R}
        blob = json.dumps(results, indent=2, default=str)
        (a.bench_dir / "last-results.json").write_text(blob)
        (a.bench_dir / "last-report.txt").write_text(report + "\n")
        if a.json:
            a.json.write_text(blob)
        ok = True
        return 0
    except BenchError as e:
        log(f"BENCHMARK FAILED: {e}")
        return 1
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        stop_all_children()
        if a.keep:
            log(f"scratch kept at {work}")
        else:
            if not ok:
                log(f"removing scratch {work} (use --keep to inspect it)")
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
