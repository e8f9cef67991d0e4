"""The three replicators under test, behind one interface: how to start each on one database or
many, with a local-directory or an S3 replica, how to restore, and how to tell from the replica's
files that the first snapshot has landed.

    litestreamd        (`litestreamd replicate DB URL`, or `litestreamd run` with per-db files)
    Litestream 0.3.13  (YAML config, v0.3 layout: generations/<g>/{snapshots,wal}/…)
    Litestream 0.5.17  (YAML config, LTX layout: <level>/<min>-<max>.ltx; file replicas put the
                        levels under ltx/<n>/, S3 replicas under <nnnn>/)

Both Litestream versions get the same intervals as litestreamd (monitor and sync 1 s unless a
figure says otherwise) and their default checkpoint settings. Litestream 0.5.17 runs without
AWS_CA_BUNDLE in its environment: this machine exports one, and 0.5.17 fails on it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

KEY = "litestreamd-bench"
SECRET = "litestreamd-bench-secret"
BUCKET = "bench"
REGION = "us-east-1"


@dataclass
class FileTarget:
    path: Path


@dataclass
class S3Target:
    port: int      # 127.0.0.1 only
    prefix: str    # path inside BUCKET


Target = FileTarget | S3Target

V03_SNAPSHOT = re.compile(r"(^|/)generations/[0-9a-f]{16}/snapshots/[0-9a-f]{8}\.snapshot\.lz4$")
V03_SEGMENT = re.compile(r"(^|/)generations/[0-9a-f]{16}/wal/[0-9a-f]{8}_[0-9a-f]{8}\.wal\.lz4$")
LTX_FILE = re.compile(r"(^|/)(?:ltx/(\d+)|([0-9a-f]{4}))/[0-9a-f]{16}-[0-9a-f]{16}\.ltx$")


def ltx_level(key: str) -> int | None:
    m = LTX_FILE.search(key)
    if not m:
        return None
    return int(m.group(2)) if m.group(2) is not None else int(m.group(3), 16)


def base_env() -> dict:
    # Children never see LITESTREAMD_* (bench.py removes them from os.environ at start).
    return dict(os.environ)


class Tool:
    key = ""
    label = ""
    layout = ""  # "v03" or "ltx"

    def __init__(self, binary: str):
        self.bin = binary

    def env(self) -> dict:
        return base_env()

    # --- layout -----------------------------------------------------------------------------
    def is_segment(self, key: str) -> bool:
        """An object that carries new WAL data (what replication lag waits for)."""
        if self.layout == "v03":
            return bool(V03_SEGMENT.search(key))
        return ltx_level(key) == 0

    def is_snapshot(self, key: str) -> bool:
        if self.layout == "v03":
            return bool(V03_SNAPSHOT.search(key))
        # 0.5 uploads the whole database as its first level-0 file (and a level-9 snapshot).
        return ltx_level(key) in (0, 9)

    def has_snapshot(self, replica_dir: Path) -> bool:
        """True once a snapshot object exists under replica_dir (a file replica, or the prefix's
        directory in the S3 server's root; s3s-fs renames finished objects into place)."""
        if not replica_dir.is_dir():
            return False
        for root, _dirs, files in os.walk(replica_dir):
            for f in files:
                if self.is_snapshot(os.path.relpath(os.path.join(root, f), replica_dir)):
                    return True
        return False

    # --- configuration ----------------------------------------------------------------------
    def replicate_argv(self, d: Path, db: Path, target: Target, monitor: str = "1s",
                       sync: str = "1s", timers: dict | None = None) -> list[str]:
        """`timers`: {"lease", "retention_check", "snapshot"} durations, for the idle figure
        (a tool without such a timer ignores it)."""
        raise NotImplementedError

    def multi_argv(self, d: Path, dbs: list[tuple[Path, Path]]) -> list[str]:
        """One process replicating every (db, replica dir) pair, default intervals (1 s)."""
        raise NotImplementedError

    def restore_argv(self, d: Path, out: Path, db: Path, target: Target) -> list[str]:
        """Restore the replica `target` of `db` (as configured by replicate_argv) into `out`."""
        raise NotImplementedError


class Litestreamd(Tool):
    key, label, layout = "lsd", "litestreamd", "v03"

    def env(self) -> dict:
        e = base_env()
        e.update(AWS_ACCESS_KEY_ID=KEY, AWS_SECRET_ACCESS_KEY=SECRET)
        e.pop("AWS_PROFILE", None)
        return e

    @staticmethod
    def url(target: Target) -> str:
        if isinstance(target, FileTarget):
            return f"file://{target.path}"
        return (f"s3://{BUCKET}/{target.prefix}?endpoint=http://127.0.0.1:{target.port}"
                f"&region={REGION}&force-path-style=true")

    def replicate_argv(self, d, db, target, monitor="1s", sync="1s", timers=None):
        argv = [self.bin, "--log-level", "warn", "replicate", str(db), self.url(target),
                "--monitor-interval", monitor, "--sync-interval", sync]
        if timers:
            argv += ["--lease-ttl", timers["lease"],
                     "--retention-check-interval", timers["retention_check"],
                     "--snapshot-interval", timers["snapshot"]]
        return argv

    def multi_argv(self, d, dbs):
        (d / "dbs.d").mkdir(parents=True, exist_ok=True)
        (d / "litestreamd.toml").write_text(
            'dbs_dir = "dbs.d"\nmetrics_addr = ""\ncontrol_socket = ""\n')
        for db, replica in dbs:
            (d / "dbs.d" / f"{db.stem}.toml").write_text(
                f'path = "{db}"\n[[replicas]]\nname = "local"\ntype = "file"\n'
                f'path = "{replica}"\n')
        return [self.bin, "--log-level", "warn", "run", "--config", str(d / "litestreamd.toml")]

    def restore_argv(self, d, out, db, target):
        return [self.bin, "--log-level", "warn", "restore", "--no-integrity-check", "-o",
                str(out), self.url(target)]


class Litestream(Tool):
    """Litestream 0.3.13 (replicas: list) or 0.5.17 (replica: one)."""

    def __init__(self, binary: str, version: str):
        super().__init__(binary)
        self.version = version
        if version == "0.3.13":
            self.key, self.label, self.layout = "ls03", "Litestream 0.3.13", "v03"
        else:
            self.key, self.label, self.layout = "ls05", "Litestream 0.5.17", "ltx"

    def env(self) -> dict:
        e = base_env()
        if self.layout == "ltx":
            e.pop("AWS_CA_BUNDLE", None)
        return e

    @staticmethod
    def replica_yaml(target: Target, sync: str | None, indent: str) -> str:
        if isinstance(target, FileTarget):
            lines = ["type: file", f"path: {target.path}"]
        else:
            lines = ["type: s3", f"bucket: {BUCKET}", f"path: {target.prefix}",
                     f"endpoint: http://127.0.0.1:{target.port}", f"region: {REGION}",
                     "force-path-style: true", f"access-key-id: {KEY}",
                     f"secret-access-key: {SECRET}"]
        if sync:
            lines.append(f"sync-interval: {sync}")
        return "".join(indent + x + "\n" for x in lines)

    def db_yaml(self, db: Path, target: Target, monitor: str | None, sync: str | None) -> str:
        s = f"  - path: {db}\n"
        if monitor:
            s += f"    monitor-interval: {monitor}\n"
        if self.layout == "v03":
            r = self.replica_yaml(target, sync, "        ")
            return s + "    replicas:\n      -" + r[7:]
        return s + "    replica:\n" + self.replica_yaml(target, sync, "      ")

    def config(self, d: Path, name: str, body: str) -> Path:
        p = d / f"{name}-{self.key}.yml"
        p.write_text("dbs:\n" + body)
        return p

    def replicate_argv(self, d, db, target, monitor="1s", sync="1s", timers=None):
        body = self.db_yaml(db, target, monitor, sync)
        if timers and self.layout == "v03":
            body += (f"        retention-check-interval: {timers['retention_check']}\n"
                     f"        snapshot-interval: {timers['snapshot']}\n")
        cfg = self.config(d, db.stem, body)
        return [self.bin, "replicate", "-config", str(cfg)]

    def multi_argv(self, d, dbs):
        body = "".join(self.db_yaml(db, FileTarget(r), "1s", "1s") for db, r in dbs)
        return [self.bin, "replicate", "-config", str(self.config(d, "all", body))]

    def restore_argv(self, d, out, db, target):
        if isinstance(target, FileTarget):
            return [self.bin, "restore", "-o", str(out), f"file://{target.path}"]
        cfg = self.config(d, f"restore-{db.stem}", self.db_yaml(db, target, None, None))
        return [self.bin, "restore", "-config", str(cfg), "-o", str(out), str(db)]


def all_tools(a) -> list[Tool]:
    tools: list[Tool] = [Litestreamd(a.litestreamd), Litestream(a.litestream, "0.3.13")]
    if a.litestream05:
        tools.append(Litestream(a.litestream05, "0.5.17"))
    return tools
