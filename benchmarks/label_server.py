"""Latency of the ranking app under load on loopback: `python -m rlhf_jax.label serve` in a subprocess, a task of
prompts with 4 responses each, every labeler ranking every prompt (overlap 1), and N concurrent labelers (threads,
one keep-alive connection each) asking GET /api/next and posting POST /api/rankings until --rankings are stored;
once for each N of --labelers (one labeler: the latency of a request alone). Each ranking is committed (SQLite
WAL, synchronous=FULL) before it is acknowledged. Prints one JSON document: p50/p95/max latency of each endpoint
and rankings/s per N.

  python benchmarks/label_server.py [--labelers 1 20] [--rankings 2000] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from rlhf_jax.label import store  # noqa: E402

from report import emit  # noqa: E402  benchmarks/report.py


def labeler(url: str, name: str, quota: int, seed: int, times: dict) -> None:
    rng = random.Random(seed)
    with httpx.Client(base_url=url, timeout=60) as client:
        for _ in range(quota):
            t0 = time.perf_counter()
            task = client.get("/api/next", params={"labeler": name}).json()
            t1 = time.perf_counter()
            if task["prompt_id"] is None:
                return
            ids = [r["id"] for r in task["responses"]]
            answer = client.post("/api/rankings", json={"labeler": name, "prompt_id": task["prompt_id"],
                                                        "order": [[i] for i in rng.sample(ids, len(ids))],
                                                        "ratings": {str(ids[0]): 5}, "seconds": 10.0})
            t2 = time.perf_counter()
            answer.raise_for_status()
            times["next"].append(t1 - t0)
            times["rankings"].append(t2 - t1)


def summary(seconds: list[float]) -> dict:
    ms = sorted(1000 * s for s in seconds)
    return {"requests": len(ms), "p50_ms": round(statistics.median(ms), 2),
            "p95_ms": round(ms[int(0.95 * (len(ms) - 1))], 2), "max_ms": round(ms[-1], 2)}


def run(labelers: int, rankings: int) -> dict:
    quota = -(-rankings // labelers)
    with tempfile.TemporaryDirectory() as tmp:
        store.create(Path(tmp) / "label.db", [(f"Prompt {i}: write one sentence.", False,
                                               [(f"Response {j} to prompt {i}.", [{"policy": "p", "step": 0}], True)
                                                for j in range(4)]) for i in range(quota)], {})
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = subprocess.Popen([sys.executable, "-m", "rlhf_jax.label", "serve", tmp, "--port", str(port),
                                   "--overlap", "1", "--target", str(quota * labelers)], cwd=REPO,
                                  stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        while True:
            try:
                httpx.get(f"{url}/api/stats")
                break
            except httpx.TransportError:
                time.sleep(0.05)
        times: dict = {"next": [], "rankings": []}
        threads = [threading.Thread(target=labeler, args=(url, f"labeler{i}", quota, i, times))
                   for i in range(labelers)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - start
        server.wait(timeout=60)
    return {"labelers": labelers, "rankings": len(times["rankings"]), "seconds": round(elapsed, 2),
            "rankings_per_s": round(len(times["rankings"]) / elapsed, 1), "next": summary(times["next"]),
            "rankings_post": summary(times["rankings"])}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--labelers", type=int, nargs="+", default=[1, 20])
    ap.add_argument("--rankings", type=int, default=2000)
    ap.add_argument("--out")
    args = ap.parse_args()
    result = {"benchmark": "label_server", "runs": [run(n, args.rankings) for n in args.labelers],
              "note": "client threads and server share the CPUs; with N labelers a request waits for up to N-1 "
                      "others; latency includes the commit (fsync) of each ranking",
              "platform": platform.platform(), "cpu_count": os.cpu_count()}
    emit(result, args.out)


if __name__ == "__main__":
    main()
