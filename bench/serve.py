"""Benchmark of `sdpipe serve`: the real server on 127.0.0.1, driven by a bounded number of concurrent clients
for a bounded time, with dynamic batching on and off; then an overload run and an optional soak.

    .venv/bin/python bench/serve.py --model runs/demo/model --clients 16 --seconds 30
    .venv/bin/python bench/serve.py --model runs/demo/model --soak-seconds 600     # memory over 10 minutes

Each client sends one request at a time (`n` images, a random label and seed) and waits for the answer;
a 429 is waited out (its Retry-After, at most 1 s) and counted. Prints, per run: requests, status codes,
throughput (requests/s, images/s), p50 and p99 latency of the 200s, and the server's RSS at start and end.
Only loopback is used; every loop ends by itself at its deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Server:
    """`sdpipe serve` in a subprocess on a free loopback port, stopped (SIGINT, then kill) on exit."""

    def __init__(self, model: str, settings: list[str]) -> None:
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        cmd = [sys.executable, "-m", "sdpipe.cli", "serve", "--model", model, "--host", HOST]
        cmd += ["--port", str(self.port), "--log-level", "warning"]
        for s in settings:
            cmd += ["--set", s]
        self.proc = subprocess.Popen(cmd)

    def wait_ready(self, timeout_s: float = 180) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with code {self.proc.returncode}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready after {timeout_s} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)
    statuses: Counter = field(default_factory=Counter)
    images: int = 0


async def client(url: str, k: int, n: int, labels: int, deadline: float, tally: Tally, max_seed: int) -> None:
    rng = random.Random(k)
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        while time.monotonic() < deadline:
            body = {"label": str(rng.randrange(labels)), "n": n, "seed": rng.randrange(max_seed)}
            t0 = time.perf_counter()
            try:
                r = await http.post("/v1/generate", json=body)
            except httpx.HTTPError as exc:
                tally.statuses[type(exc).__name__] += 1
                continue
            tally.statuses[r.status_code] += 1
            if r.status_code == 200:
                tally.latencies.append(time.perf_counter() - t0)
                tally.images += len(r.json()["images"])
            elif r.status_code == 429:
                await asyncio.sleep(min(1.0, float(r.headers.get("Retry-After", "1"))))


async def drive(url: str, clients: int, seconds: float, n: int, labels: int) -> tuple[Tally, float]:
    tally = Tally()
    t0 = time.monotonic()
    deadline = t0 + seconds
    await asyncio.gather(*(client(url, k, n, labels, deadline, tally, 2**31) for k in range(clients)))
    return tally, time.monotonic() - t0


def report(name: str, tally: Tally, wall: float, rss: list[float]) -> dict:
    lat = np.array(tally.latencies) * 1000 if tally.latencies else np.array([float("nan")])
    result = {
        "run": name,
        "requests_per_s": tally.statuses.get(200, 0) / wall,
        "images_per_s": tally.images / wall,
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "statuses": {str(k): v for k, v in sorted(tally.statuses.items(), key=str)},
        "rss_mib": [round(r, 1) for r in rss],  # at start, every tenth of the run, at end
    }
    statuses = ", ".join(f"{k}: {v}" for k, v in result["statuses"].items())
    print(
        f"{name:<22} {result['requests_per_s']:8.2f} req/s {result['images_per_s']:8.1f} img/s"
        f"   p50 {result['p50_ms']:7.0f} ms   p99 {result['p99_ms']:7.0f} ms"
        f"   statuses {{{statuses}}}   server RSS {rss[0]:.0f} -> {rss[-1]:.0f} MiB (max {max(rss):.0f})",
        flush=True,
    )
    return result


def run(model: str, settings: list[str], clients: int, seconds: float, n: int, labels: int, name: str) -> dict:
    server = Server(model, settings)
    try:
        server.wait_ready()
        asyncio.run(drive(server.url, min(clients, 2), 2.0, n, labels))  # warm-up, not counted
        samples: list[float] = []
        stop = threading.Event()
        sampler = threading.Thread(target=sample_rss, args=(server.proc.pid, seconds / 10, samples, stop))
        sampler.start()
        tally, wall = asyncio.run(drive(server.url, clients, seconds, n, labels))
        stop.set()
        sampler.join()
        samples.append(rss_mib(server.proc.pid))
        return report(name, tally, wall, samples) | server_stats(server.url)
    finally:
        server.stop()


def server_stats(url: str) -> dict:
    """Batching as the server saw it, from its /metrics (warm-up included)."""
    values = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if not line.startswith("#") and " " in line:
            key, value = line.rsplit(" ", 1)
            values[key] = float(value)
    batches = max(values.get("sdpipe_batch_requests_count", 0), 1)
    micro = max(values.get("sdpipe_micro_batches_total", 0), 1)
    stats = {
        "requests_per_batch": values.get("sdpipe_batch_requests_sum", 0) / batches,
        "micro_batches_per_batch": micro / batches,
        "rows_used_per_micro_batch": values.get("sdpipe_micro_batch_rows_used_total", 0) / micro,
    }
    print("    server: " + ", ".join(f"{k.replace('_', ' ')} {v:.1f}" for k, v in stats.items()), flush=True)
    return stats


def sample_rss(pid: int, every_s: float, samples: list[float], stop: threading.Event) -> None:
    """The server's RSS now and every `every_s` seconds until `stop` is set."""
    samples.append(rss_mib(pid))
    while not stop.wait(every_s):
        samples.append(rss_mib(pid))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="runs/demo/model", help="model directory or registry reference")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients, each one request at a time")
    p.add_argument("--seconds", type=float, default=30, help="length of each measured run")
    p.add_argument("--n", type=int, default=1, help="images per request")
    p.add_argument("--labels", type=int, default=10, help="labels are drawn from 0..LABELS-1")
    p.add_argument("--max-wait-ms", type=float, help="batching window (default: the server's)")
    p.add_argument("--overload-clients", type=int, default=64, help="clients of the overload run (0: skip it)")
    p.add_argument("--overload-queue", type=int, default=8, help="queue size of the overload run")
    p.add_argument("--soak-seconds", type=float, default=0, help="length of the soak run (0: skip it)")
    p.add_argument("--set", dest="server_set", action="append", default=[], help="server setting for every run")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--skip-off", action="store_true", help="skip the one-request-at-a-time run")
    a = p.parse_args()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    print(f"model {a.model}; {a.clients} clients x {a.seconds:g} s; {a.n} image(s)/request; settings {a.server_set}")
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start")
    extra, load = a.server_set, (a.clients, a.seconds, a.n, a.labels)
    if a.max_wait_ms is not None:
        extra = [*extra, f"max_wait_ms={a.max_wait_ms}"]
    results = [run(a.model, extra, *load, "batching on")]
    if not a.skip_off:
        results.append(run(a.model, [*extra, "max_batch=1", "max_wait_ms=0"], *load, "batching off"))
        speedup = results[0]["requests_per_s"] / max(results[1]["requests_per_s"], 1e-9)
        print(f"batching speed-up: {speedup:.1f}x the throughput of one request at a time")
    overload = [*extra, f"queue_size={a.overload_queue}"]
    if a.overload_clients:
        load = (a.overload_clients, a.seconds, a.n, a.labels)
        results.append(run(a.model, overload, *load, f"overload ({a.overload_clients} cl.)"))
    if a.soak_seconds:
        load = (a.overload_clients or a.clients, a.soak_seconds, a.n, a.labels)
        results.append(run(a.model, overload, *load, "soak"))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
