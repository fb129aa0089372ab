"""The ranking app's pinned JSON API in-process: answers of the documented shape, every bad input refused with a 4xx
JSON error naming the problem and nothing written, the token when one is set; and the `python -m rlhf_jax.label`
CLI: stats, user errors in one line with exit 2, serving until the target (exit 0) or a signal (exit 4)."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from starlette.testclient import TestClient

from rlhf_jax.errors import UserError
from rlhf_jax.label import __main__ as label_cli
from rlhf_jax.label.app import MAX_BODY, make_app
from rlhf_jax.label.server import served_names
from rlhf_jax.label.service import LabelService
from rlhf_jax.label.store import Ranking, Store
from rlhf_jax.runtime.fsio import run_dir_lock

from cli_helpers import run_quietly
from test_label_store import ids, make_task

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def task(tmp_path) -> Store:
    return make_task(tmp_path / "label.db", prompts=10, responses=4, cut=(2,))


@pytest.fixture
def client(task) -> TestClient:
    return TestClient(make_app(LabelService(task, target=10, overlap=0.2)))


def snapshot(task: Store) -> tuple:
    return task.rankings(), task.skips()


def test_next_rank_skip_and_stats_answer_the_pinned_shapes(client, task):
    first = client.get("/api/next", params={"labeler": "ann"}).json()
    assert first == {"prompt_id": 0, "prompt": "prompt 0", "done": 0, "target": 10,
                     "responses": [{"id": i, "text": f"response 0.{i}", "ended": i != 2}  # no sources
                                   for i in range(4)]}
    saved = client.post("/api/rankings", json={"labeler": "ann", "prompt_id": 0, "order": [[2], [0, 1], [3]],
                                               "ratings": {"2": 7, "3": 1}, "flags": {"3": ["harmful", "other"]},
                                               "seconds": 12.5})
    assert saved.status_code == 200 and saved.json() == {"saved": True, "done": 1, "target": 10}
    assert task.rankings() == [Ranking("ann", 0, ((2,), (0, 1), (3,)), {2: 7, 3: 1}, {3: ("harmful", "other")}, 12.5)]
    assert client.get("/api/next", params={"labeler": "ann"}).json()["prompt_id"] == 1
    assert client.post("/api/skip", json={"labeler": "ann", "prompt_id": 1}).json() == \
        {"skipped": True, "done": 1, "target": 10}
    assert client.get("/api/next", params={"labeler": " ann "}).json()["prompt_id"] == 2  # the name as typed
    stats = client.get("/api/stats").json()
    assert stats["rankings"] == 1 and stats["labelers"]["ann"]["skips"] == 1 and stats["flags"]["harmful"] == 1
    page = client.get("/")
    assert page.status_code == 200 and "Rank the responses" in page.text
    # nothing from elsewhere, and never inside another site's frame (whose clicks would be the labeler's)
    assert page.headers["content-security-policy"] == "default-src 'self'; frame-ancestors 'none'"
    assert page.headers["x-frame-options"] == "DENY"
    assert "http" not in page.text.lower().replace('http-equiv', '')  # nothing loaded from elsewhere
    assert client.get("/static/app.js").headers["content-type"].startswith("text/javascript")


GOOD = {"labeler": "ann", "prompt_id": 0, "order": [[0], [1], [2], [3]]}


@pytest.mark.parametrize("change, status, message", [
    ({"order": [[0], [1], [2]]}, 422, "order: response 3 is missing"),
    ({"order": [[0], [1], [2], [3, 1]]}, 422, "order: response 1 appears more than once"),
    ({"order": [[0], [1], [2], [3], [4]]}, 422, "order: 4 is not a response id of prompt 0"),
    ({"order": [[0, 1, 2, 3]]}, 422, "order: every response is on one level"),
    ({"order": [[0], [], [1, 2, 3]]}, 422, "order: expected a list of levels"),
    ({"order": [["0"], [1], [2], [3]]}, 422, "order: '0' is not a response id"),
    ({"prompt_id": 99}, 422, "prompt_id: unknown prompt 99"),
    ({"prompt_id": "0"}, 422, "prompt_id: expected an integer"),
    ({"prompt_id": False}, 422, "prompt_id: expected an integer, got False"),  # JSON's false is no prompt 0
    ({"order": [[True], [0], [2], [3]]}, 422, "order: True is not a response id of prompt 0"),
    ({"ratings": {"0": True}}, 422, "ratings: response 0: expected an integer from 1 to 7, got True"),
    ({"seconds": True}, 422, "seconds: expected a number >= 0, got True"),
    ({"ratings": {"0": 8}}, 422, "ratings: response 0: expected an integer from 1 to 7, got 8"),
    ({"ratings": {"0": 0}}, 422, "ratings: response 0: expected an integer from 1 to 7, got 0"),
    ({"ratings": {"0": 4.5}}, 422, "ratings: response 0: expected an integer from 1 to 7"),
    ({"ratings": {"7": 4}}, 422, "ratings: '7' is not a response id of this prompt"),
    ({"flags": {"1": ["rude"]}}, 422, "flags: response 1: unknown flag 'rude'"),
    ({"flags": {"1": "harmful"}}, 422, "flags: response 1: expected a list of flags"),
    ({"flags": {"1": ["harmful", "harmful"]}}, 422, "flags: response 1: a flag appears more than once"),
    ({"seconds": -1}, 422, "seconds: expected a number >= 0"),
    ({"seconds": 10 ** 400}, 422, "seconds: expected a number >= 0"),  # beyond float: was an OverflowError, a 500
    ({"labeler": ""}, 422, "labeler: expected a non-empty name"),
    ({"labeler": "x" * 65}, 422, "labeler: expected at most 64 printable characters"),
    ({"labeler": "a\nb"}, 422, "labeler: expected at most 64 printable characters"),
    ({"source": "m"}, 422, "unknown field 'source'"),
    ({"labeler": None, "prompt_id": None, "order": None, "ratings": None}, 422, "labeler: expected a non-empty"),
])
def test_a_bad_ranking_is_refused_naming_the_problem_and_writes_nothing(client, task, change, status, message):
    client.post("/api/rankings", json={**GOOD, "labeler": "bob"})  # something stored that must stay as it is
    before = snapshot(task)
    answer = client.post("/api/rankings", json={**GOOD, **change})
    assert answer.status_code == status and answer.json()["error"].startswith(message), answer.text
    assert snapshot(task) == before


def _ranking(task: Store, labeler: str, pid: int) -> dict:
    return {"labeler": labeler, "prompt_id": pid, "order": [[i] for i in ids(task, pid)]}


def test_an_unshared_prompt_keeps_one_labelers_ranking(task):
    """With no overlap a prompt is one labeler's: a ranking of a prompt held for another (shown to them) or ranked
    by another is refused, also from a page shown before a restart (holds live in memory) or after the lease ran
    out; a free prompt takes whoever ranks it first."""
    clock = [0.0]
    service = LabelService(task, target=10, overlap=0.0)
    service.assigner.clock = lambda: clock[0]
    client = TestClient(make_app(service))
    rank = lambda who, pid: client.post("/api/rankings", json=_ranking(task, who, pid))
    assert [client.get("/api/next", params={"labeler": w}).json()["prompt_id"] for w in ("ann", "bob")] == [0, 1]
    refused = rank("bob", 0)
    assert refused.status_code == 409 and "prompt 0 is held for another labeler" in refused.json()["error"]
    assert rank("eve", 7).status_code == 200  # never shown to anyone: free
    assert rank("ann", 0).status_code == 200 and rank("ann", 0).status_code == 200  # her own, replaced
    clock[0] += 2 * service.assigner.lease  # ann's lease is long over, but she ranked it
    refused = rank("bob", 0)
    assert refused.status_code == 409 and "prompt 0 is ranked by another labeler" in refused.json()["error"]
    assert [client.get("/api/next", params={"labeler": w}).json()["prompt_id"] for w in ("bob", "ann")] == [1, 2]
    restarted = LabelService(task, target=10, overlap=0.0)  # ann's hold of prompt 2 is gone with the process
    client = TestClient(make_app(restarted))
    assert client.get("/api/next", params={"labeler": "cid"}).json()["prompt_id"] == 1  # bob's hold is gone too
    assert client.get("/api/next", params={"labeler": "dee"}).json()["prompt_id"] == 2
    assert rank("ann", 2).status_code == 409 and rank("dee", 2).status_code == 200
    assert sorted((r.labeler, r.prompt_id) for r in task.rankings()) == [("ann", 0), ("dee", 2), ("eve", 7)]


def test_nothing_is_handed_out_or_stored_once_the_target_is_reached(task):
    """The server stops at its target, but not before requests in flight are answered: they get no new prompt and
    store no new ranking (40 labelers at once stored 99 rankings for a target of 50); replacing one stays possible."""
    client = TestClient(make_app(LabelService(task, target=2, overlap=0.0)))
    for who, pid in (("ann", 0), ("bob", 1)):
        assert client.post("/api/rankings", json=_ranking(task, who, pid)).status_code == 200
    assert client.get("/api/next", params={"labeler": "cid"}).json() == {"prompt_id": None, "reason": "finished",
                                                                         "done": 2, "target": 2}
    late = client.post("/api/rankings", json=_ranking(task, "cid", 2))
    assert late.status_code == 409 and late.json()["error"].startswith("labeling is finished (2/2 rankings stored)")
    assert client.post("/api/rankings", json=_ranking(task, "ann", 0)).status_code == 200
    late = client.post("/api/skip", json={"labeler": "cid", "prompt_id": 2})
    assert late.status_code == 409 and late.json()["error"].startswith("labeling is finished")
    assert len(task.rankings()) == 2 and task.skips() == {}


@pytest.mark.parametrize("method, path, body, status, message", [
    ("POST", "/api/rankings", b"{not json", 400, "the body is not valid JSON"),
    ("POST", "/api/rankings", b"[1, 2]", 400, "the body must be a JSON object"),
    ("POST", "/api/rankings", b"\xff\xfe", 400, "the body is not valid JSON"),
    ("POST", "/api/rankings", b'{"labeler": "' + b"a" * MAX_BODY + b'"}', 413, "the body has"),
    ("POST", "/api/rankings", json.dumps({"labeler": "ann", "prompt_id": 0}).encode(), 422, "missing field 'order'"),
    ("POST", "/api/skip", json.dumps({"labeler": "ann", "prompt_id": 42}).encode(), 422, "prompt_id: unknown prompt"),
    ("POST", "/api/skip", json.dumps({"labeler": "ann"}).encode(), 422, "missing field 'prompt_id'"),
    ("POST", "/api/skip", b'{"labeler": "bob", "prompt_id": 0}', 409, "prompt_id: prompt 0 is ranked"),
    ("GET", "/api/next", None, 422, "labeler: expected a non-empty name"),
    ("GET", "/api/rankings", None, 405, "GET is not allowed on /api/rankings"),
    ("POST", "/api/next", b"{}", 405, "POST is not allowed on /api/next"),
    ("GET", "/admin", None, 404, "no such path /admin; the app serves /, "),
    ("GET", "/static/../store.py", None, 404, "no such path"),
    ("GET", "/static/index.html", None, 404, "no such path"),
])
def test_bad_requests_get_a_json_error_and_write_nothing(client, task, method, path, body, status, message):
    client.post("/api/rankings", json={**GOOD, "labeler": "bob"})
    before = snapshot(task)
    answer = client.request(method, path, content=body, headers={"Content-Type": "application/json"})
    assert answer.status_code == status and answer.json()["error"].startswith(message), answer.text
    assert snapshot(task) == before


@pytest.mark.parametrize("change, message", [
    ({"ratings": {"01": 2}}, "ratings: '01' is not a response id of this prompt"),
    ({"ratings": {"\uff11": 2, "1": 3}}, "ratings: '\uff11' is not a response id"),  # a full-width one
    ({"flags": {" 1": ["other"]}}, "flags: ' 1' is not a response id"),
])
def test_response_keys_are_the_ids_as_written_so_that_none_alias(client, task, change, message):
    answer = client.post("/api/rankings", json={**GOOD, **change})
    assert answer.status_code == 422 and answer.json()["error"].startswith(message), answer.text
    assert task.done() == 0


def test_a_body_nested_too_deeply_is_a_400(client, task):
    answer = client.post("/api/rankings", content=b"[" * 30_000 + b"]" * 30_000,
                         headers={"Content-Type": "application/json"})
    assert answer.status_code == 400 and "nested too deeply" in answer.json()["error"]


@pytest.mark.parametrize("headers, status, message", [
    ({"Content-Type": "text/plain"}, 415, "the body must be sent as Content-Type: application/json"),
    ({"Content-Type": "application/x-www-form-urlencoded"}, 415, "the body must be sent as"),
    ({"Content-Type": "application/json", "Origin": "http://evil.example"}, 403, "the API answers only"),
    ({"Content-Type": "application/json", "Origin": "http://testserver:8888"}, 403, "the API answers only"),
    ({"Content-Type": "application/json", "Origin": "null"}, 403, "the API answers only"),
    ({"Content-Type": "application/json", "Origin": "http://["}, 403, "the API answers only"),  # not a URL
    ({"Content-Type": "application/json", "Sec-Fetch-Site": "same-site"}, 403, "the API answers only"),
    ({"Content-Type": "application/json", "Sec-Fetch-Site": "cross-site"}, 403, "the API answers only"),
])
def test_what_another_sites_page_can_send_is_refused(client, task, headers, status, message):
    """A page of any site can make the labeler's browser POST text/plain or a form without asking first, or GET
    a URL (an image): none of it reaches the service."""
    answer = client.post("/api/rankings", content=json.dumps(GOOD).encode(), headers=headers)
    assert answer.status_code == status and answer.json()["error"].startswith(message), answer.text
    assert task.done() == 0
    held = client.get("/api/next", params={"labeler": "eve"}, headers={"Sec-Fetch-Site": "cross-site"})
    assert held.status_code == 403  # no prompt held for a name a page made up
    assert client.get("/api/next", params={"labeler": "ann"}).json()["prompt_id"] == 0
    # the page itself: same origin, and a link from anywhere may open it
    same = {"Content-Type": "application/json; charset=utf-8", "Origin": "http://testserver",
            "Sec-Fetch-Site": "same-origin"}
    assert client.post("/api/rankings", content=json.dumps(GOOD).encode(), headers=same).json()["saved"]
    assert client.get("/", headers={"Sec-Fetch-Site": "cross-site"}).status_code == 200


def test_a_loopback_server_answers_only_to_loopback_names(task):
    """A DNS-rebound name (an attacker's domain pointed at 127.0.0.1) reaches the socket, not the app."""
    app = make_app(LabelService(task, target=10, overlap=0.0), hosts=served_names("127.0.0.1"))
    for url in ("http://127.0.0.1:8000", "http://localhost:8000", "http://[::1]:8000"):
        assert TestClient(app, base_url=url).get("/api/next", params={"labeler": "ann"}).status_code == 200, url
    for url in ("http://evil.example:8000", "http://127.0.0.1.evil.example"):
        answer = TestClient(app, base_url=url).get("/api/next", params={"labeler": "bob"})
        assert answer.status_code == 403 and "is not this server's" in answer.json()["error"], url
    for host in ("[::1", "127.0.0.1:x:y]"):  # not a host[:port] at all
        answer = TestClient(app).get("/", headers={"Host": host})
        assert answer.status_code == 403 and "is not this server's" in answer.json()["error"], host
    assert served_names("0.0.0.0") is None  # reached by names it cannot know: the token guards it
    # bound to another loopback address, the server answers at the URL it prints
    app = make_app(LabelService(task, target=10, overlap=0.0), hosts=served_names("127.8.0.1"))
    assert TestClient(app, base_url="http://127.8.0.1:8000").get("/api/next", params={"labeler": "ann"}).status_code \
        == 200


def test_behind_a_tls_proxy_the_page_can_save(task):
    """A proxy sends the upstream's address as Host (nginx's default): the browser's Origin is the public name,
    and its Sec-Fetch-Site, which no page can set, says the request is the page's own."""
    app = make_app(LabelService(task, target=10, overlap=0.0), hosts=served_names("127.0.0.1"))
    client = TestClient(app, base_url="http://127.0.0.1:8000")
    public = {"Origin": "https://label.example.org", "Content-Type": "application/json"}
    answer = client.post("/api/rankings", json=GOOD, headers={**public, "Sec-Fetch-Site": "same-origin"})
    assert answer.status_code == 200 and task.done() == 1
    for site in ("cross-site", "same-site"):
        answer = client.post("/api/skip", json={"labeler": "bob", "prompt_id": 1}, headers={**public,
                                                                                            "Sec-Fetch-Site": site})
        assert answer.status_code == 403, site
    # a browser without Sec-Fetch-Site: its Origin must be the Host
    assert client.post("/api/skip", json={"labeler": "bob", "prompt_id": 1}, headers=public).status_code == 403
    assert task.skips() == {}


def test_one_server_per_task(task):
    """Which unshared prompt is held for whom lives in the server's memory: a second server on the run dir would
    hand the same prompts out again."""
    task.save_ranking(Ranking("ann", 0, ((0,), (1, 2, 3)), {}, {}, None), 0.0)  # target 1 met: a server would end
    with run_dir_lock(task.path.parent):
        rc, _, err = run_quietly(label_cli.main, ["serve", task.path.parent, "--port", "0", "--target", "1"])
    assert rc == 2 and err.startswith(f"error: RUN_DIR={task.path.parent}: in use by pid {os.getpid()}"), err


def test_a_body_over_the_limit_without_a_length_is_refused_while_read(client, task):
    def chunks():
        for _ in range(MAX_BODY // 1024 + 2):
            yield b" " * 1024

    answer = client.post("/api/rankings", content=chunks(),  # sent chunked: no Content-Length
                         headers={"Content-Type": "application/json"})
    assert answer.status_code == 413 and "over the limit" in answer.json()["error"]
    assert task.done() == 0


def test_with_a_token_every_request_must_carry_it(task):
    client = TestClient(make_app(LabelService(task, target=10, overlap=0.0), token="s3cret"))
    for path in ("/", "/static/app.js", "/api/next?labeler=ann", "/api/stats", "/nowhere"):
        answer = client.get(path)
        assert answer.status_code == 401 and answer.json()["error"].startswith("missing token"), path
    assert client.get("/api/stats", headers={"Authorization": "Bearer wrong"}).json()["error"].startswith("wrong token")
    assert client.get("/api/stats?token=s3cre").status_code == 401
    guesses = client.get("/api/stats?" + "&".join(f"token={t}" for t in ("s3cre", "s3cret", "nope")))
    assert guesses.status_code == 400 and "names `token` more than once" in guesses.json()["error"]
    assert client.get("/api/stats", headers={"Authorization": "Basic s3cret"}).status_code == 401  # Bearer only
    answer = client.post("/api/rankings", json=GOOD, headers={"Authorization": "Bearer nope"})
    assert answer.status_code == 401 and task.done() == 0
    assert client.get("/api/stats", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert client.get("/api/next?labeler=ann&token=s3cret").json()["prompt_id"] == 0
    page = client.get("/?token=s3cret")  # the page's cookie carries the token for its script and calls
    assert page.status_code == 200 and "httponly" in page.headers["set-cookie"].lower()
    assert page.headers["set-cookie"].startswith("label_token_80=s3cret;")  # the test client's port
    assert client.get("/static/app.js").status_code == 200
    assert client.post("/api/rankings", json=GOOD).json()["saved"] and task.done() == 1
    # cookies of other apps on this host come along; one that Python's SimpleCookie cannot parse hides nothing
    client.cookies.clear()
    for other in ('prefs={"a":1}', 'session="unterminated', "x=[1, 2]", "x=a\\b"):
        answer = client.get("/api/stats", headers={"Cookie": f"{other}; label_token_80=s3cret"})
        assert answer.status_code == 200, other
    assert client.get("/api/stats", headers={"Cookie": 'prefs={"a":1}; label_token_80=nope'}).status_code == 401
    # another label server's on this host (its port in the name) is not this one's
    assert client.get("/api/stats", headers={"Cookie": "label_token_8001=s3cret"}).status_code == 401


# -------------------------------------------------------------------------------------------------------- the CLI


def test_stats_prints_the_figures_and_says_ties_are_left_out(task, capsys):
    task.save_ranking(Ranking("ann", 0, ((0,), (1,), (2,), (3,)), {}, {3: ("harmful",)}, 10.0), now=1.0)
    task.save_ranking(Ranking("bob", 0, ((0,), (2,), (1, 3)), {}, {}, 30.0), now=2.0)
    rc, out, err = run_quietly(label_cli.main, ["stats", task.path.parent])
    assert rc == 0, err
    assert "2 rankings of 10 by 2 labelers; 1 prompts ranked by more than one" in out
    assert "pairwise agreement on shared prompts: 80.0% of 5 response pairs" in out
    assert "(1 pairs tied by either are left out)" in out and "harmful 1" in out
    assert [line.split()[:4] for line in out.splitlines() if line.startswith(("ann", "bob"))] == \
        [["ann", "1", "0", "10.0"], ["bob", "1", "0", "30.0"]]
    rc, out, _ = run_quietly(label_cli.main, ["stats", task.path.parent, "--json"])
    assert rc == 0 and json.loads(out)["agreement"] == pytest.approx(0.8)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("flags, message", [
    (["--host", "0.0.0.0"], "error: --host 0.0.0.0: other machines can reach it; set --token too"),
    (["--port", "70000"], "error: --port '70000': expected an integer from 0 to 65535"),
    (["--target", "-1"], "error: --target '-1': expected an integer >= 0 (0: every prompt ranked)"),
    (["--overlap", "nan"], "error: --overlap 'nan': expected a number from 0 to 1"),
    (["--overlap", "1.5"], "error: --overlap '1.5': expected a number from 0 to 1"),
    (["--token", "p\u00e4ss"], "error: --token: expected letters, digits and . _ ~ - only"),  # a header's latin-1
    (["--host", "0.0.0.0", "--token", "a b"], "error: --token: expected letters, digits and . _ ~ - only"),
    (["--host", "0.0.0.0", "--token", "Zm9v+YmFy"], "error: --token: expected letters, digits and . _ ~ - only"),
    (["--host", "0.0.0.0", "--token", "s3cret"], "error: --token: expected at least 16 characters, got 6"),
])
def test_serve_user_errors_are_one_line_with_exit_2(task, flags, message):
    """In-process on a task whose target is met: were a setting not checked, the server would return 0 at once
    instead of serving."""
    task.save_ranking(Ranking("ann", 0, ((0,), (1, 2, 3)), {}, {}, None), 0.0)
    task.set_meta("target", 1)
    rc, _, err = run_quietly(label_cli.main, ["serve", task.path.parent, "--port", _free_port(), *flags])
    assert rc == 2 and err.startswith(message) and len(err.splitlines()) == 1, err


def test_serving_a_task_whose_target_is_met_says_so_and_how_to_collect_more(task):
    """It said to rerun the label step to write a dataset that step had already written."""
    task.save_ranking(Ranking("ann", 0, ((0,), (1, 2, 3)), {}, {}, None), 0.0)
    task.set_meta("target", 1)
    rc, _, err = run_quietly(label_cli.main, ["serve", task.path.parent, "--port", _free_port()])
    assert rc == 0 and err == (f"label: 1/1 rankings stored in {task.path} already, nothing to serve; a larger "
                               "--target collects more (then rerun the label step to write the dataset)\n"), err
    for i in range(1, len(task.prompts)):  # every prompt ranked, none shared: no target collects more
        task.save_ranking(Ranking("ann", i, ((0,), (1, 2, 3)), {}, {}, None), 0.0)
    rc, _, err = run_quietly(label_cli.main, ["serve", task.path.parent, "--port", _free_port(), "--target", "0",
                                              "--overlap", "0"])
    assert rc == 0 and err.endswith("already, nothing to serve; every prompt is ranked and none is shared "
                                    "(--overlap): the task holds no more\n"), err


def test_a_target_no_labeler_can_reach_is_one_line_with_exit_2(task):
    """10 prompts, each ranked by one labeler when none is shared: the server would wait for ever (a process of its
    own, stopped by the timeout if it served)."""
    proc = subprocess.run([sys.executable, "-m", "rlhf_jax.label", "serve", str(task.path.parent), "--port", "0",
                           "--target", "11", "--overlap", "0"], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and proc.stderr.splitlines() == [
        "error: --target 11: at most 10 rankings can be stored, one per prompt, when no prompt is shared "
        "(--overlap 0); lower the target or share prompts"], proc.stderr


def test_an_address_not_of_this_machine_is_one_line_with_exit_2(task):
    proc = subprocess.run([sys.executable, "-m", "rlhf_jax.label", "serve", str(task.path.parent), "--port",
                           str(_free_port()), "--host", "192.0.2.1", "--token", "t" * 16], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=60)  # a server that started would be stopped here
    assert proc.returncode == 2 and proc.stderr.startswith("error: --host 192.0.2.1: cannot listen there") and \
        len(proc.stderr.splitlines()) == 1, proc.stderr


def test_an_ipv6_loopback_host_listens_on_ipv6():
    from rlhf_jax.label import server

    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError:
        pytest.skip("no IPv6 loopback here")
    with server.listen("::1", 0) as sock:
        assert sock.family == socket.AF_INET6 and sock.getsockname()[0] == "::1"


def test_a_port_in_use_and_a_run_dir_without_a_task_are_one_line_with_exit_2(task, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        rc, _, err = run_quietly(label_cli.main, ["serve", task.path.parent, "--port", port])
    assert rc == 2 and err.strip() == f"error: --port {port}: in use on 127.0.0.1; choose another (0 picks a free one)"
    rc, _, err = run_quietly(label_cli.main, ["stats", tmp_path / "nowhere"])
    assert rc == 2 and err.strip().endswith("label.db: no labeling task (the label stage with label.labeler=people "
                                            "writes it)")


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def start_server(run_dir: Path, *flags: str) -> tuple[subprocess.Popen, str]:
    """`python -m rlhf_jax.label serve RUN_DIR` in a subprocess on a free loopback port; (process, base URL) once
    it answers."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "rlhf_jax.label", "serve", str(run_dir), "--port", str(port),
                             *flags], cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            httpx.get(f"{url}/api/stats", timeout=1)
            return proc, url
        except httpx.TransportError:
            time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"the server did not start: {proc.communicate()}")


@pytest.fixture
def servers():
    """start_server for one test; a server still running after the test is killed."""
    started = []

    def start(run_dir: Path, *flags: str) -> tuple[subprocess.Popen, str]:
        proc, url = start_server(run_dir, *flags)
        started.append(proc)
        return proc, url

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_serve_stops_at_the_target_with_exit_0_and_on_sigterm_with_exit_4(task, servers):
    task.close()
    proc, url = servers(task.path.parent, "--target", "2")
    for pid in (0, 1):
        assert httpx.post(f"{url}/api/rankings", json={**GOOD, "prompt_id": pid, "order": [
            [i] for i in range(4 * pid, 4 * pid + 4)]}).json()["saved"]
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert err.strip().splitlines()[-1].startswith("label: 2/2 rankings stored in ") and "rerun the label step" in err
    proc, url = servers(task.path.parent)  # the label step's target (10): serves again, resuming
    assert httpx.get(f"{url}/api/next", params={"labeler": "ann"}).json()["prompt_id"] == 2
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 4, err
    assert err.strip().splitlines()[-1] == (f"label: stopped with 2/10 rankings stored in {task.path}; serve again to "
                                            "continue, or run the label step with label.finish=true to write the "
                                            "dataset")


def test_a_target_beyond_the_prompts_is_reachable_with_shared_prompts(task):
    """With one prompt in ten shared, every new labeler can add a ranking: any target can be met."""
    from rlhf_jax.label.server import check_target

    check_target(task, 10, 0.0)
    check_target(task, 1000, 0.1)
    with pytest.raises(UserError, match="label.target=11: at most 10 rankings"):
        check_target(task, 11, 0.05)  # one in twenty: no prompt of ten is shared


def _read_only(path, connect=sqlite3.connect):
    """A connection to `path` that SQLite may only read: what it opens for a file this process may not write."""
    return connect(f"file:{path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False)


def test_a_database_that_cannot_be_written_is_refused_at_start_and_stats_still_read_it(task, monkeypatch):
    from rlhf_jax.label import store as store_module

    task.save_ranking(Ranking("ann", 0, ((0,), (1, 2, 3)), {}, {}, None), 0.0)
    task.set_meta("target", 1)  # met: a server that started would return 0 at once
    monkeypatch.setattr(store_module.sqlite3, "connect", lambda path, **kw: _read_only(path))
    rc, _, err = run_quietly(label_cli.main, ["serve", task.path.parent, "--port", "0"])
    assert rc == 2 and err.strip() == f"error: {task.path}: cannot write it (attempt to write a readonly database)"
    rc, out, err = run_quietly(label_cli.main, ["stats", task.path.parent])
    assert rc == 0 and out.startswith("1 rankings of 1 by 1 labelers"), err


def test_a_write_that_fails_is_a_503_that_saved_nothing_and_the_next_one_lands(task):
    client = TestClient(make_app(LabelService(task, target=10, overlap=0.0)), raise_server_exceptions=False)
    writable, task._conn = task._conn, _read_only(task.path)  # as on a full disk: the transaction's write fails
    answer = client.post("/api/rankings", json=GOOD)
    assert answer.status_code == 503 and answer.json() == {
        "error": "label.db cannot be written (attempt to write a readonly database); nothing was saved"}
    assert task.done() == 0 and not task._conn.in_transaction  # rolled back: the next answer can begin its own
    task._conn.close()
    task._conn = writable  # the disk has room again
    assert client.post("/api/rankings", json=GOOD).json()["saved"] and task.done() == 1


def test_an_unexpected_failure_is_a_json_500_that_saved_nothing(task):
    client = TestClient(make_app(LabelService(task, target=10, overlap=0.0)), raise_server_exceptions=False)
    task.close()  # every store call now fails
    answer = client.get("/api/stats")
    assert answer.status_code == 500 and answer.json() == {"error": "internal error (ProgrammingError); nothing "
                                                                    "was saved"}


@pytest.mark.parametrize("host, loopback, url_host", [
    ("127.0.0.1", True, "127.0.0.1"), ("localhost", True, "localhost"), ("::1", True, "[::1]"),
    ("127.8.0.1", True, "127.8.0.1"), ("0.0.0.0", False, "0.0.0.0"), ("::", False, "[::]"),
    ("labels.example.org", False, "labels.example.org"),
])
def test_only_loopback_binds_without_a_token(host, loopback, url_host):
    from rlhf_jax.label import server

    assert server.is_loopback(host) == loopback and server._url_host(host) == url_host
    if loopback:
        server.check_binding(host, "")
    else:
        with pytest.raises(UserError, match=f"^label.host={host}: other machines can reach it; set label.token"):
            server.check_binding(host, "")
    server.check_binding(host, "t" * server.TOKEN_MIN)


def test_localhost_is_loopback_only_where_it_resolves_there_alone(monkeypatch):
    """A hosts file that maps `localhost` to an address other machines reach: binding there needs a token."""
    import socket

    from rlhf_jax.label import server

    def resolving_to(*addresses):
        return lambda host, port: [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, 0)) for a in addresses]

    monkeypatch.setattr(socket, "getaddrinfo", resolving_to("127.0.0.1", "::1"))
    assert server.is_loopback("localhost")
    monkeypatch.setattr(socket, "getaddrinfo", resolving_to("127.0.0.1", "10.1.2.3"))
    with pytest.raises(UserError, match="^label.host=localhost: other machines can reach it"):
        server.check_binding("localhost", "")
