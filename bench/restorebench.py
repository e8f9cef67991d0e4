"""Figure 1: restore on three shapes of history, from a directory and from S3, with a cold and a
warm page cache, against Litestream 0.3.13 and the machine's floor, all in the same run.

Shapes (v0.3 replicas written by litestreamd; both tools restore the same objects):
  snapshot  a freshly snapshotted database of --db-mib MiB, nothing after the snapshot
  wal       most data arrived through the WAL: a small snapshot, then --db-mib/2 MiB of bulk
            inserts in 32 MiB transactions (a WAL index each, many segments)
  history   the --db-mib database and --indexes small WAL indexes after its snapshot

Targets: the replica directory (file://), and the same objects served by s3s-fs on loopback
(hard-linked into its storage, so both targets hold the very same files).

Floor of each shape, measured in the same run:
  read   reading every object the restore needs, cold (caches dropped) or warm
  write  writing and fsyncing a file of the output's size (8 MiB writes)
  floor  read + write: a restore that reads and writes at the disk's speed without overlapping
         the two; overlapping them is how a restore gets below it
  lz4    decoding every object from memory on all cores with the restore's own decoder
         (examples/lz4_decode_rate.rs), for the CPU side of the bound
For S3 the floor is the directory's: s3s-fs serves the same files from the same disk, and
loopback HTTP costs CPU, not a physical bound.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import time
from pathlib import Path

import statistics

from common import (MB, MiB, BenchError, drop_caches, file_sha256, integrity_check, log,
                    proc_cpu_seconds, rm_db,
                    snapshot_files, spawn, stop, summary, table_digest, tail, timed_run,
                    wait_for, wait_quiet, wal_indexes, write_fsync_seconds)
from tools import BUCKET, FileTarget, Litestream, Litestreamd, S3Target

SHAPES = ("snapshot", "wal", "history")


def replica_objects(replica: Path) -> list[Path]:
    return sorted(p for p in replica.rglob("*.lz4") if p.is_file())


def build_wal_replica(a, work: Path, make_db) -> dict:
    """A small snapshot, then bulk inserts replicated through the WAL."""
    db = work / "walheavy.db"
    replica = work / "replica-wal"
    make_db(db, 4)
    lg = work / "litestreamd-replicate-wal.log"
    p = spawn([a.litestreamd, "--log-level", "warn", "replicate", str(db), f"file://{replica}",
               "--monitor-interval", "100ms", "--sync-interval", "100ms"], lg)
    wait_for(lambda: snapshot_files(replica), 120, "the snapshot", p, lg)
    con = sqlite3.connect(db, isolation_level=None, timeout=30)
    con.execute("PRAGMA busy_timeout=30000")
    con.execute("PRAGMA wal_autocheckpoint=0")  # the replicator checkpoints
    target = max(8, a.db_mib // 2) * MiB
    t0 = time.monotonic()
    while db.stat().st_size + Path(str(db) + "-wal").stat().st_size < target + 4 * MiB:
        con.execute("BEGIN")
        con.execute("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c WHERE x<?) "
                    "INSERT INTO t(b) SELECT randomblob(3000) FROM c", (32 * MiB // 3100,))
        con.execute("COMMIT")
        # Let the replicator copy and checkpoint (a new WAL index per transaction or two).
        time.sleep(0.3)
    con.close()

    def settled():
        segs = [s.stat().st_size for s in replica.rglob("*.wal.lz4")]
        return (len(segs), sum(segs))
    last, still = None, 0
    while still < 3:
        time.sleep(1)
        now = settled()
        still = still + 1 if now == last else 0
        last = now
    rc = stop(p)
    if rc != 0:
        raise BenchError(f"litestreamd replicate exited with {rc}:\n{tail(lg)}")
    snaps = snapshot_files(replica)
    if len(snaps) != 1:
        raise BenchError(f"the WAL-heavy replica should hold one snapshot: {snaps}")
    idx = wal_indexes(replica)
    segs = list(replica.rglob("*.wal.lz4"))
    log(f"wal shape: snapshot {snaps[0].stat().st_size / MiB:.1f} MiB, {len(idx)} WAL indexes, "
        f"{len(segs)} segments, {sum(s.stat().st_size for s in segs) / MiB:.0f} MiB of LZ4 WAL, "
        f"database {db.stat().st_size / MiB:.0f} MiB, in {time.monotonic() - t0:.0f}s")
    return {"db": db, "replica": replica, "indexes": len(idx), "segments": len(segs)}


def floor(a, work: Path, replica: Path, out_bytes: int, cold: bool) -> dict:
    objs = replica_objects(replica)
    if cold:
        drop_caches()
    t0 = time.perf_counter()
    n = 0
    for o in objs:
        with open(o, "rb", buffering=0) as f:
            while True:
                b = f.read(8 * MiB)
                if not b:
                    break
                n += len(b)
    read_s = time.perf_counter() - t0
    write_s = write_fsync_seconds(work / "floor.tmp", out_bytes)
    res = {"read_s": read_s, "read_bytes": n, "write_s": write_s, "floor_s": read_s + write_s}
    if a.lz4_rate:
        out = subprocess.run([a.lz4_rate, str(replica)], check=True, capture_output=True,
                             text=True).stdout
        r = json.loads(out)
        res["lz4_decode_s"] = r["seconds"]
        res["lz4_decode_mb_s"] = r["decoded"] / MB / max(r["seconds"], 1e-9)
    return res


def bench_shapes(a, work: Path, s3, build_history, build_fresh, make_db) -> dict:
    """Builds the three replicas, then times both tools on every shape, target and cache state,
    interleaved, a.reps times each, with the floor measured alongside."""
    lsd = Litestreamd(a.litestreamd)
    ls = Litestream(a.litestream, "0.3.13")
    shapes: dict[str, dict] = {}

    log("shapes: building the long-history replica")
    hist = build_history(a, work)
    hist["digest"] = table_digest(hist["db"])
    shapes["history"] = hist
    # The snapshot shape is a fresh copy of the history's result.
    first = work / "history-first.db"
    timed_run(lsd.restore_argv(work, first, hist["db"], FileTarget(hist["replica"])),
              work / "restore-shapes.log")
    rm_db(hist["db"])
    shutil.rmtree(work / f".{hist['db'].name}-litestream", ignore_errors=True)
    log("shapes: snapshotting a fresh copy")
    fresh = build_fresh(a, work, first)
    fresh["digest"] = hist["digest"]
    shapes["snapshot"] = fresh
    log("shapes: building the WAL-heavy replica")
    wal = build_wal_replica(a, work, make_db)
    wal["digest"] = table_digest(wal["db"])
    shapes["wal"] = wal
    for rep in shapes.values():
        rm_db(rep["db"])
        shutil.rmtree(work / f".{rep['db'].name}-litestream", ignore_errors=True)

    # The same files, served by s3s-fs: hard-linked into its storage, with the metadata it
    # keeps for an object it stored itself (without its ETag, s3s-fs hashes the whole file on
    # every GET, ranged or not).
    for name, rep in shapes.items():
        shutil.copytree(rep["replica"], s3.dir(f"shape-{name}"), copy_function=os.link)
        for o in replica_objects(rep["replica"]):
            key = f"shape-{name}/{o.relative_to(rep['replica'])}"
            h = hashlib.md5()
            with open(o, "rb") as f:
                while b := f.read(8 * MiB):
                    h.update(b)
            b64 = lambda t: base64.urlsafe_b64encode(t.encode()).decode().rstrip("=")
            (s3.root / f".bucket-{b64(BUCKET)}.object-{b64(key)}.internal.json").write_text(
                json.dumps({"e_tag": h.hexdigest()}))

    results = []
    lg = work / "restore-shapes.log"
    for name in SHAPES:
        rep = shapes[name]
        targets = [("dir", FileTarget(rep["replica"])),
                   ("s3", S3Target(s3.port, f"shape-{name}"))]
        for tname, target in targets:
            for cold in (True, False):
                cache = "cold" if cold else "warm"
                runs: dict[str, list[dict]] = {"lsd": [], "ls03": []}
                floors = []
                outputs = {}
                for r in range(a.reps):
                    order = [("lsd", lsd), ("ls03", ls)]
                    if r % 2:
                        order.reverse()
                    for key, tool in order:
                        out = work / f"shape-{name}-{tname}-{cache}-{key}-{r}.db"
                        rm_db(out)
                        if a.quiet_wait:
                            wait_quiet(a.quiet_wait)
                        if cold:
                            drop_caches()
                        else:
                            # Warm: the replica's objects are in the page cache.
                            for o in replica_objects(rep["replica"]):
                                with open(o, "rb", buffering=0) as f:
                                    while f.read(8 * MiB):
                                        pass
                            os.sync()
                        # From S3, the server's CPU during the restore: s3s-fs shares the
                        # machine's two cores with the restore and is what bounds those cells.
                        c0 = proc_cpu_seconds(s3.proc.pid) if tname == "s3" else 0.0
                        m = timed_run(tool.restore_argv(work, out, rep["db"], target), lg,
                                      env=tool.env())
                        if tname == "s3":
                            m["server_cpu"] = proc_cpu_seconds(s3.proc.pid) - c0
                        m["bytes"] = out.stat().st_size
                        runs[key].append(m)
                        if r == 0:
                            outputs[key] = out
                        else:
                            rm_db(out)
                        for sfx in ("-wal", "-shm", ".tmp-wal", ".tmp-shm"):
                            Path(str(out) + sfx).unlink(missing_ok=True)
                    floors.append(floor(a, work, rep["replica"], runs["lsd"][-1]["bytes"],
                                        cold))
                verify(name, rep, outputs)
                for out in outputs.values():
                    rm_db(out)
                res = {"shape": name, "target": tname, "cache": cache, "tools": {}}
                for key, ms in runs.items():
                    res["tools"][key] = {"wall": summary([m["wall"] for m in ms]),
                                         "cpu": summary([m["cpu"] for m in ms]),
                                         "maxrss_mib": max(m["maxrss_kib"] for m in ms) / 1024,
                                         "server_cpu": (summary([m["server_cpu"] for m in ms])
                                                        if "server_cpu" in ms[0] else None),
                                         "bytes": ms[0]["bytes"]}
                fl = {k: statistics.median([f[k] for f in floors]) for k in floors[0]}
                res["floor"] = fl
                lsd_s, ls_s = res["tools"]["lsd"]["wall"]["median"], res["tools"]["ls03"]["wall"]["median"]
                log(f"  {name:8s} {tname:3s} {cache}: litestreamd {lsd_s:.2f}s "
                    f"(RSS {res['tools']['lsd']['maxrss_mib']:.0f} MiB), Litestream 0.3.13 "
                    f"{ls_s:.2f}s, floor {fl['floor_s']:.2f}s (read {fl['read_s']:.2f} + write "
                    f"{fl['write_s']:.2f})"
                    + (f", LZ4 on all cores {fl['lz4_decode_s']:.2f}s" if "lz4_decode_s" in fl
                       else ""))
                results.append(res)
    info = {name: {k: v for k, v in rep.items()
                   if k in ("db_bytes", "indexes", "indexes_after_snapshot", "segments")}
            for name, rep in shapes.items()}
    for name, rep in shapes.items():
        info[name]["replica_mib"] = sum(o.stat().st_size for o in
                                        replica_objects(rep["replica"])) / MiB
        if not a.keep:
            shutil.rmtree(rep["replica"], ignore_errors=True)
            s3.remove(f"shape-{name}")
    return {"results": results, "shapes": info}


def verify(name: str, rep: dict, outputs: dict[str, Path]) -> None:
    """Both tools restore the same bytes, a sound database holding the source's rows."""
    shas = {k: file_sha256(p) for k, p in outputs.items()}
    if len(set(shas.values())) != 1:
        raise BenchError(f"{name}: the tools restored different bytes: {shas}")
    p = next(iter(outputs.values()))
    ic = integrity_check(p)
    if ic != "ok":
        raise BenchError(f"{name}: restored database fails integrity_check: {ic}")
    if table_digest(p) != rep["digest"]:
        raise BenchError(f"{name}: restored rows differ from the source")


def render(a, R: dict) -> list[str]:
    lines = ["## Restore on three shapes of history, directory and S3, cold and warm "
             "(litestreamd without integrity check; medians of "
             f"{a.reps}, [min–max])", ""]
    for name, i in R["shapes"].items():
        lines.append(f"* `{name}`: " + ", ".join(f"{k} {v:.0f}" if isinstance(v, float) else
                                                 f"{k} {v}" for k, v in i.items()))
    lines.append("")
    lines.append("| shape | target | cache | litestreamd s | Litestream 0.3.13 s | vs Litestream "
                 "| floor s (read + write) | vs floor | LZ4 all cores s | peak RSS litestreamd / "
                 "Litestream | s3s-fs CPU s (litestreamd / Litestream) |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in R["results"]:
        t, fl = r["tools"], r["floor"]
        w, l = t["lsd"]["wall"], t["ls03"]["wall"]
        lz4 = f"{fl['lz4_decode_s']:.2f}" if "lz4_decode_s" in fl else "n/a"
        lines.append(
            f"| {r['shape']} | {r['target']} | {r['cache']} | {w['median']:.2f} [{w['min']:.2f}–"
            f"{w['max']:.2f}] | {l['median']:.2f} [{l['min']:.2f}–{l['max']:.2f}] | "
            f"{w['median'] / l['median']:.2f}x | {fl['floor_s']:.2f} ({fl['read_s']:.2f} + "
            f"{fl['write_s']:.2f}) | {w['median'] / fl['floor_s']:.2f}x | {lz4} | "
            f"{t['lsd']['maxrss_mib']:.0f} / {t['ls03']['maxrss_mib']:.0f} MiB | "
            + (f"{t['lsd']['server_cpu']['median']:.2f} / {t['ls03']['server_cpu']['median']:.2f}"
               if t["lsd"].get("server_cpu") else "–") + " |")
    return lines


def targets(R: dict) -> list[tuple[str, bool]]:
    """(target text, met) for issue 16's bar."""
    rs = R["results"]
    out = []
    worst_floor = max(r["tools"]["lsd"]["wall"]["median"] / r["floor"]["floor_s"] for r in rs)
    out.append((f"restore at most 1.5x the floor on every shape/target/cache "
                f"(worst {worst_floor:.2f}x)", worst_floor <= 1.5))
    worst_ls = max(r["tools"]["lsd"]["wall"]["median"] / r["tools"]["ls03"]["wall"]["median"]
                   for r in rs)
    # Cells that miss, and those of them where half of Litestream's time is less than writing
    # and fsyncing the output alone on this disk (the floor's write part, same run).
    miss = [r for r in rs
            if r["tools"]["lsd"]["wall"]["median"] > r["tools"]["ls03"]["wall"]["median"] / 2]
    below = [r for r in miss
             if r["tools"]["ls03"]["wall"]["median"] / 2 < r["floor"]["write_s"]]
    out.append((f"restore at most half of Litestream 0.3.13's time everywhere "
                f"(worst {worst_ls:.2f}x; {len(miss)} of {len(rs)} cells miss, in "
                f"{len(below)} of them half of Litestream's time is less than writing and "
                f"fsyncing the output alone)", worst_ls <= 0.5))
    rss = max(r["tools"]["lsd"]["maxrss_mib"] for r in rs)
    out.append((f"restore peak RSS under 64 MiB (max {rss:.0f} MiB)", rss < 64))
    s3 = min(r["tools"]["ls03"]["wall"]["median"] / r["tools"]["lsd"]["wall"]["median"]
             for r in rs if r["target"] == "s3")
    out.append((f"S3 restore at least 2x Litestream's speed (worst {s3:.2f}x)", s3 >= 2))
    return out
