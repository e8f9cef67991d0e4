#!/usr/bin/env python3
"""A counting HTTP/1.1 proxy for a loopback S3 server (benchmark instrument).

    python3 bench/s3proxy.py --listen PORT --upstream PORT --log FILE [--bucket NAME]

Listens on 127.0.0.1:PORT, forwards every connection to 127.0.0.1:UPSTREAM byte for byte (no
request or response is changed, so SigV4 signatures stay valid), and appends one JSON line per
completed request to FILE:

    {"t0": 1732470000.123, "t1": 1732470000.130, "method": "PUT", "kind": "PUT",
     "key": "path/generations/…/wal/00000001_00000000.wal.lz4", "query": "", "status": 200,
     "req_bytes": 4711, "resp_bytes": 0, "port": PORT}

t0 is when the proxy had the request's header (wall clock, `time.time()`), t1 when the last byte
of the response had been handed to the client's socket. Both are CLOCK_REALTIME, the clock the
benchmark's writer uses for its commit times.

Kinds (one count per HTTP request):
  PUT     PUT of an object (PutObject, CopyObject, UploadPart) and the multipart POSTs
          (CreateMultipartUpload `?uploads`, CompleteMultipartUpload `?uploadId=`): S3 bills all
          of them as PUT-class requests, so a multipart upload of n parts counts n + 2.
  GET     GET of an object.
  LIST    GET on the bucket itself (ListObjects v1/v2, any prefix/delimiter, ListMultipartUploads).
  DELETE  DELETE (DeleteObject, AbortMultipartUpload) and POST `?delete` (DeleteObjects, one
          request whatever the number of keys).
  HEAD    HEAD of an object or the bucket.
  OTHER   anything else (GetBucketLocation, …).

Only 127.0.0.1 is ever contacted. Standard library only. Stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from collections import deque
from urllib.parse import unquote, urlsplit, parse_qsl


def classify(method: str, target: str) -> tuple[str, str, str]:
    """(kind, key, query) of a path-style S3 request line."""
    u = urlsplit(target)
    path = unquote(u.path).lstrip("/")
    bucket, _, key = path.partition("/")
    q = dict(parse_qsl(u.query, keep_blank_values=True))
    m = method.upper()
    if m == "HEAD":
        kind = "HEAD"
    elif m == "PUT":
        kind = "PUT" if key else "OTHER"  # PUT on the bucket = CreateBucket etc.
    elif m == "POST":
        if "delete" in q:
            kind = "DELETE"
        elif "uploads" in q or "uploadId" in q:
            kind = "PUT"
        else:
            kind = "OTHER"
    elif m == "DELETE":
        kind = "DELETE" if key else "OTHER"
    elif m == "GET":
        if key:
            kind = "GET"
        elif "location" in q or "versioning" in q or "policy" in q:
            kind = "OTHER"
        else:
            kind = "LIST"
    else:
        kind = "OTHER"
    return kind, key, u.query


class Message:
    """Incremental HTTP/1.1 message framing: feed() bytes, get back the headers as they complete
    and a 'done' event when the body has ended (Content-Length, chunked, or none)."""

    def __init__(self, is_response: bool):
        self.is_response = is_response
        self.buf = b""
        self.state = "head"
        self.left = 0
        self.body_bytes = 0

    def _take_body(self) -> bool:
        """Consumes buffered bytes of the current body part; True once all `left` are in."""
        n = min(self.left, len(self.buf))
        self.left -= n
        self.body_bytes += n
        self.buf = self.buf[n:]
        return not self.left

    def feed(self, data: bytes, head_of_request=None):
        """Yields ('head', start_line, headers) and ('done', body_bytes) events. For responses,
        head_of_request() returns the method of the request being answered (for HEAD)."""
        self.buf += data
        while True:
            if self.state == "head":
                i = self.buf.find(b"\r\n\r\n")
                if i < 0:
                    return
                raw, self.buf = self.buf[:i].decode("latin-1"), self.buf[i + 4:]
                lines = raw.split("\r\n")
                headers = {}
                for line in lines[1:]:
                    k, _, v = line.partition(":")
                    headers[k.strip().lower()] = v.strip()
                start = lines[0]
                self.body_bytes = 0
                yield ("head", start, headers)
                no_body = False
                if self.is_response:
                    status = int(start.split()[1])
                    if 100 <= status < 200:
                        continue  # interim (100 Continue): the final response follows
                    method = head_of_request() if head_of_request else ""
                    no_body = method == "HEAD" or status in (204, 304)
                te = headers.get("transfer-encoding", "").lower()
                if no_body:
                    self.state = "done"
                elif "chunked" in te:
                    self.state = "chunk-size"
                elif "content-length" in headers:
                    self.left = int(headers["content-length"])
                    self.state = "body"
                elif self.is_response:
                    self.state = "until-close"
                else:
                    self.state = "done"
            elif self.state == "body":
                if not self._take_body():
                    return
                self.state = "done"
            elif self.state == "chunk-size":
                i = self.buf.find(b"\r\n")
                if i < 0:
                    return
                size = int(self.buf[:i].split(b";")[0].strip() or b"0", 16)
                self.buf = self.buf[i + 2:]
                if size == 0:
                    self.state = "trailer"
                else:
                    self.left = size + 2  # data and its CRLF
                    self.state = "chunk-data"
            elif self.state == "chunk-data":
                if not self._take_body():
                    return
                self.body_bytes -= 2
                self.state = "chunk-size"
            elif self.state == "trailer":
                i = self.buf.find(b"\r\n")
                if i < 0:
                    return
                line, self.buf = self.buf[:i], self.buf[i + 2:]
                if not line:
                    self.state = "done"
            elif self.state == "until-close":
                self.body_bytes += len(self.buf)
                self.buf = b""
                return
            if self.state == "done":
                self.state = "head"
                yield ("done", self.body_bytes)


class Proxy:
    def __init__(self, upstream: int, log_path: str, port: int):
        self.upstream = upstream
        self.log = open(log_path, "a", buffering=1)
        self.port = port

    def record(self, req: dict, status: int, resp_bytes: int) -> None:
        req.update(t1=time.time(), status=status, resp_bytes=resp_bytes, port=self.port)
        self.log.write(json.dumps(req) + "\n")

    async def handle(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter):
        try:
            ureader, uwriter = await asyncio.open_connection("127.0.0.1", self.upstream)
        except OSError:
            cwriter.close()
            return
        pending: deque[dict] = deque()  # requests sent upstream, not yet answered

        async def client_to_upstream():
            parser = Message(is_response=False)
            current = None
            try:
                while data := await creader.read(1 << 16):
                    for ev in parser.feed(data):
                        if ev[0] == "head":
                            method, target = ev[1].split()[:2]
                            kind, key, query = classify(method, target)
                            current = {"t0": time.time(), "method": method, "kind": kind,
                                       "key": key, "query": query, "req_bytes": 0}
                            pending.append(current)
                        else:
                            current["req_bytes"] = ev[1]
                    uwriter.write(data)
                    await uwriter.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                try:
                    uwriter.write_eof()
                except (OSError, RuntimeError):
                    pass

        async def upstream_to_client():
            parser = Message(is_response=True)
            status = 0
            head_method = lambda: pending[0]["method"] if pending else ""
            try:
                while True:
                    data = await ureader.read(1 << 16)
                    if not data:
                        # A response delimited by the connection's end completes here.
                        if parser.state == "until-close" and pending:
                            self.record(pending.popleft(), status, parser.body_bytes)
                        break
                    cwriter.write(data)
                    await cwriter.drain()
                    for ev in parser.feed(data, head_method):
                        if ev[0] == "head":
                            status = int(ev[1].split()[1])
                        elif pending:
                            self.record(pending.popleft(), status, ev[1])
            except (ConnectionError, OSError):
                pass
            finally:
                cwriter.close()

        await asyncio.gather(client_to_upstream(), upstream_to_client())
        uwriter.close()


async def main_async(a) -> None:
    proxy = Proxy(a.upstream, a.log, a.listen)
    server = await asyncio.start_server(proxy.handle, "127.0.0.1", a.listen, reuse_address=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    async with server:
        await stop.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--listen", type=int, required=True)
    ap.add_argument("--upstream", type=int, required=True)
    ap.add_argument("--log", required=True)
    a = ap.parse_args()
    asyncio.run(main_async(a))
    return 0


if __name__ == "__main__":
    sys.exit(main())
