"""The ranking app under load on loopback, served by `python -m rlhf_jax.label serve` in a subprocess: 20 concurrent
labelers submit 2,000 rankings and every acknowledged one is stored exactly once; `kill -9` in the middle of that
loses nothing acknowledged, the database opens cleanly and a restarted server resumes."""

from __future__ import annotations

import random
import signal
import sqlite3
import threading
import time

import httpx

from rlhf_jax.label.store import Store

from test_label_api import servers  # noqa: F401 - a fixture
from test_label_store import make_task

LABELERS = 20
PROMPTS = 120  # every labeler may rank every prompt (overlap 1): up to 2,400 rankings
DEADLINE_S = 120


def labeler(url: str, name: str, quota: int, acknowledged: dict, stop: threading.Event, seed: int) -> None:
    """Rank up to `quota` prompts as `name`, re-ranking its first one halfway (a replacement); records what the
    server acknowledged as {(name, prompt id): levels}, the last acknowledged ranking of each."""
    rng = random.Random(seed)
    deadline = time.monotonic() + DEADLINE_S
    first = None
    with httpx.Client(base_url=url, timeout=30) as client:
        for n in range(quota):
            if stop.is_set() or time.monotonic() > deadline:
                return
            try:
                task = client.get("/api/next", params={"labeler": name}).json()
                if task["prompt_id"] is None:
                    return
                redo = n == quota // 2 and first is not None
                pid, ids = (first if redo else (task["prompt_id"], [r["id"] for r in task["responses"]]))
                levels = [[i] for i in rng.sample(ids, len(ids))]
                levels[-2:] = [levels[-2] + levels[-1]]  # the two worst tied
                answer = client.post("/api/rankings", json={"labeler": name, "prompt_id": pid, "order": levels,
                                                            "seconds": rng.uniform(1, 9)})
            except httpx.TransportError:
                return  # the server is gone
            assert answer.status_code == 200, answer.text
            acknowledged[name, pid] = tuple(tuple(level) for level in levels)
            first = first or (pid, ids)


def run_labelers(url: str, quota: int, stop: threading.Event) -> dict:
    acknowledged: dict = {}
    threads = [threading.Thread(target=labeler, args=(url, f"labeler{i:02d}", quota, acknowledged, stop, i))
               for i in range(LABELERS)]
    for t in threads:
        t.start()
    return {"threads": threads, "acknowledged": acknowledged}


def stored(db) -> dict:
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        rows = conn.execute("SELECT labeler, prompt_id FROM rankings").fetchall()
    assert len(rows) == len(set(rows))  # one row per (labeler, prompt)
    return {(r.labeler, r.prompt_id): r.levels for r in Store(db).rankings()}


def test_20_concurrent_labelers_store_2000_rankings_each_exactly_once(tmp_path, servers):
    make_task(tmp_path / "label.db", prompts=PROMPTS).close()
    proc, url = servers(tmp_path, "--overlap", "1", "--target", "2000")
    started = time.monotonic()
    run = run_labelers(url, quota=101, stop=threading.Event())  # 100 prompts and one replacement each
    for t in run["threads"]:
        t.join(DEADLINE_S + 30)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err  # it stopped at the target
    assert time.monotonic() - started < DEADLINE_S
    acknowledged, on_disk = run["acknowledged"], stored(tmp_path / "label.db")
    assert len(acknowledged) == 2000 and on_disk == acknowledged


def test_kill_9_during_the_load_loses_nothing_acknowledged_and_a_restart_resumes(tmp_path, servers):
    make_task(tmp_path / "label.db", prompts=PROMPTS).close()
    proc, url = servers(tmp_path, "--overlap", "1", "--target", "2400")
    stop = threading.Event()
    run = run_labelers(url, quota=101, stop=stop)
    deadline = time.monotonic() + DEADLINE_S
    while len(run["acknowledged"]) < 300 and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    stop.set()
    for t in run["threads"]:
        t.join(60)
    acknowledged, on_disk = run["acknowledged"], stored(tmp_path / "label.db")
    assert len(acknowledged) >= 300
    assert {k: on_disk.get(k) for k in acknowledged} == acknowledged  # every acknowledged ranking, as acknowledged
    assert len(on_disk) - len(acknowledged) <= LABELERS  # at most the answers in flight when it died

    proc, url = servers(tmp_path, "--overlap", "1", "--target", "2400")
    with httpx.Client(base_url=url, timeout=30) as client:
        for name in ("labeler00", "labeler07"):
            pid = client.get("/api/next", params={"labeler": name}).json()["prompt_id"]
            ranked = {p for (who, p) in on_disk if who == name}
            assert pid is not None and pid not in ranked and pid == min(set(range(PROMPTS)) - ranked)
        assert client.get("/api/stats").json()["rankings"] == len(on_disk)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    assert proc.returncode == 4
