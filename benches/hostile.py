#!/usr/bin/env python3
"""Hostile-clients bench: does berth keep answering its real clients while others misbehave?

    python3 benches/hostile.py [--slow 2000] [--flood 300] [--samples 10] [--duration 20]
                               [--binary PATH]

Starts berth (target/release/berth if it exists, else target/debug/berth; build one first) on
127.0.0.1 with an htpasswd user, a private namespace readable without credentials, and one
pushed blob. Then, all at once:

  - holds --slow connections that send a partial request header and trickle one more byte
    every second (a slowloris), reopening any berth closes so the number stays up; they come
    from 127.0.1.1 to 127.0.1.10, so no address is over the per-client cap;
  - fires --flood requests with a wrong password (Basic auth) from 127.0.0.3 (--flood-from),
    30 at a time;
  - measures, from 127.0.0.1 on new connections, GETs of the cached blob and valid logins
    (GET /v2/ with the right password), one of each every 50 ms: at least --samples, until
    the flood is over and for at least --duration seconds (longer than berth's 15 s header
    timeout, so the slow connections are closed and reopened meanwhile).

Prints the latencies and what berth's metrics said about the connections, and exits 1 if any
blob GET or login took longer than 1 s (or failed). python3 standard library only; CI does not
run it.
"""

import argparse
import asyncio
import base64
import hashlib
import http.client
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

LIMIT_S = 1.0
USER, PASSWORD = "bench", "correct horse battery staple"
REPO = "private/bench"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raise_fd_limit(need):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, need)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft < need:
        sys.exit(f"hostile.py: needs {need} open files, the hard limit is {hard} (ulimit -Hn)")
    return soft


def basic(user, password):
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def request(port, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, dict(resp.getheaders()), data


def push_blob(port, blob):
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    auth = {"Authorization": basic(USER, PASSWORD)}
    status, headers, body = request(port, "POST", f"/v2/{REPO}/blobs/uploads/", headers=auth)
    if status != 202:
        sys.exit(f"hostile.py: upload start answered {status}: {body[:200]!r}")
    location = headers.get("Location") or headers.get("location")
    sep = "&" if "?" in location else "?"
    status, _, body = request(
        port,
        "PUT",
        f"{location}{sep}digest={digest}",
        body=blob,
        headers={**auth, "Content-Type": "application/octet-stream"},
    )
    if status != 201:
        sys.exit(f"hostile.py: upload answered {status}: {body[:200]!r}")
    return digest


async def http_get(port, path, headers=(), source="127.0.0.1"):
    """One GET on a new connection; returns (status, body length, seconds)."""
    start = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    head = f"GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n"
    for k, v in headers:
        head += f"{k}: {v}\r\n"
    writer.write((head + "\r\n").encode())
    await writer.drain()
    data = await reader.read()
    elapsed = time.monotonic() - start
    writer.close()
    status_line, _, rest = data.partition(b"\r\n")
    parts = status_line.split()
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    body = rest.partition(b"\r\n\r\n")[2]
    return status, len(body), elapsed


class Slowloris:
    """Holds `n` connections with partial headers, trickling a byte a second each."""

    def __init__(self, port, n):
        self.port, self.n = port, n
        self.open = 0
        self.opened = 0
        self.closed_by_server = 0
        self.connect_errors = 0
        self.stop = asyncio.Event()

    async def one(self, source):
        while not self.stop.is_set():
            try:
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", self.port, local_addr=(source, 0)
                )
            except OSError:
                self.connect_errors += 1
                await asyncio.sleep(1)
                continue
            self.open += 1
            self.opened += 1
            try:
                writer.write(b"GET /v2/ HTTP/1.1\r\nHost: bench\r\nX-Slow: ")
                await writer.drain()
                while not self.stop.is_set():
                    try:
                        await asyncio.wait_for(reader.read(1), timeout=1.0)
                        break  # the server closed it (or answered): reopen
                    except asyncio.TimeoutError:
                        pass
                    writer.write(b"a")
                    await writer.drain()
                else:
                    continue
                self.closed_by_server += 1
            except OSError:
                self.closed_by_server += 1
            finally:
                self.open -= 1
                writer.close()

    def start(self):
        return [
            asyncio.create_task(self.one(f"127.0.1.{1 + i % 10}")) for i in range(self.n)
        ]


async def flood(port, n, source, concurrency=30):
    statuses = {}
    queue = asyncio.Queue()
    for _ in range(n):
        queue.put_nowait(None)
    wrong = basic(USER, "wrong password")

    async def worker():
        while not queue.empty():
            queue.get_nowait()
            try:
                status, _, _ = await http_get(
                    port, "/v2/", [("Authorization", wrong)], source=source
                )
            except OSError:
                status = "error"
            statuses[status] = statuses.get(status, 0) + 1

    start = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return statuses, time.monotonic() - start


def metric(port, name, labels=""):
    try:
        _, _, body = request(port, "GET", "/metrics")
    except OSError:
        return None
    total = None
    for line in body.decode().splitlines():
        if line.startswith(name + (labels and "{")) or line.startswith(name + " "):
            if labels and labels not in line:
                continue
            total = (total or 0) + float(line.rsplit(" ", 1)[1])
    return total


METRICS = [
    ("berth_connections_open", ""),
    ("berth_connections_max", ""),
    ("berth_connections_refused_total", ""),
    ("berth_connections_closed_total", 'reason="header_read_timeout"'),
    ("berth_responses_in_flight", ""),
]


def summary(samples):
    """Latencies of the samples (each (status, seconds)), and the answers other than 200."""
    times = [t for _, t in samples]
    failed = {}
    for status, _ in samples:
        if status != 200:
            failed[status] = failed.get(status, 0) + 1
    return (
        f"n={len(times)} median={statistics.median(times) * 1000:.0f} ms "
        f"max={max(times) * 1000:.0f} ms not-200={failed or 0}"
    )


async def storm(port, digest, blob_len, args):
    slow = Slowloris(port, args.slow)
    tasks = slow.start()
    deadline = time.monotonic() + 60
    while slow.open < args.slow and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    print(f"slow connections open: {slow.open} (of {args.slow})", flush=True)
    blob_samples, login_samples = [], []
    good = basic(USER, PASSWORD)

    flood_done = asyncio.Event()

    async def measure():
        # At least --samples of each, and on until the flood is over and --duration has passed
        # (longer than the header timeout, so that berth closes and the slowloris reopens).
        end = time.monotonic() + args.duration
        while (
            len(blob_samples) < args.samples
            or not flood_done.is_set()
            or time.monotonic() < end
        ):
            try:
                status, n, t = await http_get(port, f"/v2/{REPO}/blobs/{digest}")
                blob_samples.append((status if n == blob_len else f"{status} short", t))
            except OSError as e:
                blob_samples.append((type(e).__name__, float("inf")))
            try:
                status, _, t = await http_get(port, "/v2/", [("Authorization", good)])
                login_samples.append((status, t))
            except OSError as e:
                login_samples.append((type(e).__name__, float("inf")))
            await asyncio.sleep(0.05)

    async def flood_then_done():
        try:
            return await flood(port, args.flood, args.flood_from)
        finally:
            flood_done.set()

    _, (statuses, flood_s) = await asyncio.gather(measure(), flood_then_done())
    open_during = slow.open
    loop = asyncio.get_running_loop()
    gauges = {}
    for name, labels in METRICS:
        gauges[(name, labels)] = await loop.run_in_executor(None, metric, port, name, labels)
    slow.stop.set()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return slow, open_during, gauges, blob_samples, login_samples, statuses, flood_s


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--slow", type=int, default=2000)
    ap.add_argument("--flood", type=int, default=300)
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument(
        "--flood-from",
        default="127.0.0.3",
        help="source address of the flood (127.0.0.1: the measured client's own address)",
    )
    ap.add_argument("--binary")
    args = ap.parse_args()

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    binary = args.binary
    if not binary:
        for profile in ("release", "debug"):
            candidate = os.path.join(root, "target", profile, "berth")
            if os.path.exists(candidate):
                binary = candidate
                break
    if not binary:
        sys.exit("hostile.py: no berth binary: run `cargo build` (or --release) first")
    raise_fd_limit(args.slow + args.flood + 500)

    work = tempfile.mkdtemp(prefix="berth-hostile-")
    berth = None
    try:
        htpasswd = os.path.join(work, "htpasswd")
        subprocess.run(
            [binary, "user", "add", USER, "--htpasswd", htpasswd, "--password-stdin"],
            input=PASSWORD.encode(),
            check=True,
            capture_output=True,
        )
        port = free_port()
        config = os.path.join(work, "berth.toml")
        with open(config, "w") as f:
            f.write(
                f'listen = "127.0.0.1:{port}"\n'
                f'data_dir = "{os.path.join(work, "data")}"\n'
                f'htpasswd = "{htpasswd}"\n'
                'private_ns = ["private"]\n'
                "private_pull_public = true\n"
            )
        log = open(os.path.join(work, "berth.log"), "w")
        berth = subprocess.Popen(
            [binary, "serve", "--config", config],
            stdout=subprocess.DEVNULL,
            stderr=log,
            env={**os.environ, "BERTH_LOG": os.environ.get("BERTH_LOG", "warn")},
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                if request(port, "GET", "/healthz")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or berth.poll() is not None:
                sys.exit("hostile.py: berth did not start; see " + log.name)
            time.sleep(0.05)
        blob = os.urandom(4 << 20)
        digest = push_blob(port, blob)
        # Read once so it is a warm cache hit, like any blob pulled before.
        status, _, body = request(port, "GET", f"/v2/{REPO}/blobs/{digest}")
        assert status == 200 and body == blob, status

        print(f"berth: {binary}")
        print(
            f"storm: {args.slow} slow connections + {args.flood} wrong-password requests; "
            f"cached blob GETs (4 MiB) and valid logins measured for {args.duration:.0f} s or more"
        )
        slow, open_during, gauges, blobs, logins, statuses, flood_s = asyncio.run(
            storm(port, digest, len(blob), args)
        )
        print(f"slow connections still open at the end of the measurements: {open_during}")
        print(
            f"slow connections opened {slow.opened}, closed by berth {slow.closed_by_server}, "
            f"connect errors {slow.connect_errors}"
        )
        print(f"wrong-password flood: {statuses} in {flood_s:.1f} s")
        print(f"cached blob GET: {summary(blobs)}")
        print(f"valid login:     {summary(logins)}")
        print("berth's metrics at the end of the storm:")
        for (name, labels), value in gauges.items():
            print(f"  {name}{'{' + labels + '}' if labels else ''} = {value}")
        bad = [
            what
            for what, samples in (("blob GET", blobs), ("login", logins))
            if any(status != 200 or t > LIMIT_S for status, t in samples)
        ]
        if bad:
            print(f"FAIL: {', '.join(bad)}: over {LIMIT_S:.0f} s, or not answered 200")
            return 1
        print(f"ok: every blob GET and login answered within {LIMIT_S:.0f} s")
        return 0
    finally:
        if berth is not None:
            berth.terminate()
            try:
                berth.wait(timeout=10)
            except subprocess.TimeoutExpired:
                berth.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
