"""The labeling task's store (a second ranking replaces the first, a skip never erases a ranking, the task is written
whole), who sees which prompt (shared prompts reach every labeler, the others one; a labeler resumes where they
left off), and the agreement figures against a brute-force count."""

from __future__ import annotations

import itertools
import random
import sqlite3
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_jax.errors import UserError
from rlhf_jax.label import agreement, store
from rlhf_jax.label.assign import Assigner, is_shared
from rlhf_jax.label.service import LabelService
from rlhf_jax.label.store import Ranking, Store

SOURCE = {"policy": "runs/sft/export", "step": 30}


def make_task(path: Path, prompts: int = 10, responses: int = 4, cut: tuple[int, ...] = ()) -> Store:
    """`cut`: the places of each prompt's responses that ran to the sampler's length limit."""
    store.create(path, [(f"prompt {i}", i % 5 == 4, [(f"response {i}.{j}", [SOURCE], j not in cut)
                                                     for j in range(responses)])
                        for i in range(prompts)], {"target": prompts})
    return Store(path)


def ids(task: Store, pid: int) -> list[int]:
    return [r.id for r in task.prompts[pid].responses]


def test_the_task_is_stored_whole_with_each_responses_sources(tmp_path):
    db = tmp_path / "label.db"
    task = make_task(db, prompts=3)
    assert not (tmp_path / "label.db.tmp").exists()
    assert [p.text for p in task.prompts.values()] == ["prompt 0", "prompt 1", "prompt 2"]
    assert [r.id for p in task.prompts.values() for r in p.responses] == list(range(12))  # ids in the order shown
    assert task.prompts[1].responses[2].text == "response 1.2" and task.prompts[1].responses[2].sources == (SOURCE,)
    assert task.meta["target"] == 3 and task.done() == 0
    task.close()


def test_a_second_ranking_replaces_the_first_and_a_skip_never_erases_one(tmp_path):
    task = make_task(tmp_path / "label.db")
    a, b, c, d = ids(task, 0)
    first = Ranking("ann", 0, ((a,), (b, c), (d,)), {a: 7}, {d: ("harmful",)}, 3.0)
    second = Ranking("ann", 0, ((d,), (c,), (b,), (a,)), {}, {}, None)
    assert task.save_ranking(first, now=1.0) == 1
    assert task.save_ranking(Ranking("bob", 0, ((a,), (b, c, d)), {}, {}, 1.0), now=2.0) == 2
    assert task.save_ranking(second, now=3.0) == 2
    assert task.rankings()[0] == second and len(task.rankings()) == 2
    assert not task.save_skip("ann", 0, now=4.0)  # ranked: the skip writes nothing
    assert task.skips() == {} and task.rankings()[0] == second
    assert task.save_skip("ann", 1, now=5.0) and task.save_skip("ann", 1, now=6.0)
    assert task.skips() == {"ann": 1} and task.answered("ann") == {0, 1}
    task.save_ranking(Ranking("ann", 1, ((a,), (b,)), {}, {}, None), now=7.0)  # ranking a skipped prompt: no skip
    assert task.skips() == {} and task.answered("ann") == {0, 1} and task.ranked_by_others("bob") == {0, 1}
    task.close()
    assert Store(tmp_path / "label.db").rankings()[0] == second  # on disk


def test_what_is_no_task_is_one_line(tmp_path):
    with pytest.raises(UserError, match="label.db: no labeling task"):
        Store(tmp_path / "label.db")
    (tmp_path / "label.db").write_text("not a database at all" * 100)
    with pytest.raises(UserError, match="label.db: not a labeling database"):
        Store(tmp_path / "label.db")


def test_a_failed_write_rolls_back_and_leaves_the_database_as_it_was(tmp_path):
    task = make_task(tmp_path / "label.db")
    a, b, c, d = ids(task, 0)
    task.save_ranking(Ranking("ann", 0, ((a,), (b, c, d)), {}, {}, None), now=1.0)
    task.save_skip("bob", 0, now=2.0)
    with pytest.raises(sqlite3.IntegrityError):  # no prompt 99: the foreign key refuses it
        task.save_ranking(Ranking("ann", 99, ((a,), (b,)), {}, {}, None), now=3.0)
    with pytest.raises(sqlite3.IntegrityError):  # bob's skip is deleted first, then the ranking is refused
        task.save_ranking(Ranking("bob", 0, ((a,), (b, c, d)), {}, {}, None), now=None)
    assert task.done() == 1 and task.skips() == {"bob": 1}
    task.close()
    assert Store(tmp_path / "label.db").skips() == {"bob": 1}


def test_rankings_come_back_in_the_order_first_saved_and_the_database_is_durable(tmp_path):
    task = make_task(tmp_path / "label.db")
    for name, pid in (("bob", 3), ("ann", 1), ("bob", 0), ("ann", 1)):  # ann's second ranking of 1 replaces hers
        task.save_ranking(Ranking(name, pid, ((ids(task, pid)[0],), tuple(ids(task, pid)[1:])), {}, {}, None), 1.0)
    assert [(r.labeler, r.prompt_id) for r in task.rankings()] == [("bob", 3), ("ann", 1), ("bob", 0)]
    # an acknowledged ranking is on disk: every commit synced, write-ahead logged
    assert task._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert task._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    task.close()


def test_a_new_task_ignores_what_a_killed_server_left_beside_a_deleted_one(tmp_path):
    """A server killed with -9 leaves label.db-wal; the operator deletes label.db to start over. SQLite would replay
    that log onto the new database: the old ranking, of responses the new task does not have."""
    db = tmp_path / "label.db"
    killed = ("import os, sys; from pathlib import Path; from rlhf_jax.label import store; "
              "store.create(Path(sys.argv[1]), [('old prompt', False, [('a', [], True), ('b', [], True)])], {}); "
              "task = store.Store(Path(sys.argv[1])); "
              "task.save_ranking(store.Ranking('ann', 0, ((0,), (1,)), {}, {}, None), 1.0); os._exit(0)")
    subprocess.run([sys.executable, "-c", killed, str(db)], check=True, cwd=Path(__file__).parents[1])
    assert (tmp_path / "label.db-wal").stat().st_size > 0
    db.unlink()
    task = make_task(db, prompts=2, responses=3)
    assert task.rankings() == [] and [p.text for p in task.prompts.values()] == ["prompt 0", "prompt 1"]
    task.close()


def test_a_database_of_another_schema_is_one_line(tmp_path):
    make_task(tmp_path / "label.db").close()
    with sqlite3.connect(tmp_path / "label.db") as conn:
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    conn.close()
    with pytest.raises(UserError, match=r"label.db: labeling database of schema 99; this version reads schemas 1, 2$"):
        Store(tmp_path / "label.db")


def test_a_task_stored_before_responses_said_whether_they_ended_reads_them_as_ended(tmp_path):
    """Schema 1 had no `ended` column: its samples were all trained with an EOS, which is what reading them as
    ended keeps; a new task stores each response's own."""
    db = tmp_path / "label.db"
    make_task(db, prompts=2, responses=3, cut=(1,)).close()
    assert [r.ended for r in Store(db).prompts[0].responses] == [True, False, True]
    with sqlite3.connect(db) as conn:
        conn.execute("ALTER TABLE responses DROP COLUMN ended")
        conn.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    conn.close()
    task = Store(db)
    assert [r.ended for r in task.prompts[0].responses] == [True, True, True]
    task.save_ranking(Ranking("ann", 0, ((0,), (1, 2)), {}, {}, None), 1.0)  # and it takes answers as before
    assert task.done() == 1
    task.close()


def test_serving_settings_are_recorded_for_the_next_serve(tmp_path):
    make_task(tmp_path / "label.db").set_meta("overlap", 0.5)
    assert Store(tmp_path / "label.db").meta == {"target": 10, "overlap": 0.5, "schema_version": 2}


@pytest.mark.parametrize("overlap, shared", [(0.0, []), (0.25, [3, 7, 11, 15, 19]), (0.1, [9, 19]),
                                             (0.3, [3, 6, 9, 13, 16, 19]), (1.0, list(range(20)))])
def test_shared_prompts_are_spread_evenly(overlap, shared):
    assert [i for i in range(20) if is_shared(i, overlap)] == shared  # the last of every 1/overlap


def test_unshared_prompts_go_to_one_labeler_and_shared_ones_to_every_labeler(tmp_path):
    task = make_task(tmp_path / "label.db", prompts=20)
    service = LabelService(task, target=100, overlap=0.25)
    seen: dict[str, list[int]] = {"ann": [], "bob": [], "cy": []}
    for _ in range(40):  # the three take turns until nothing is left for them
        for name in seen:
            pid = service.next(name)["prompt_id"]
            if pid is not None:
                seen[name].append(pid)
                service.rank({"labeler": name, "prompt_id": pid, "order": [[i] for i in ids(task, pid)]})
    shared = {pid for pid in task.prompts if pid in service.assigner.shared}
    assert len(shared) == 5
    for name, pids in seen.items():
        assert shared <= set(pids) and len(pids) == len(set(pids))
    unshared = [pid for pids in seen.values() for pid in pids if pid not in shared]
    assert sorted(unshared) == sorted(set(task.prompts) - shared)  # each ranked by exactly one labeler
    assert all(service.next(name)["prompt_id"] is None for name in seen)


def test_a_labeler_resumes_where_they_left_off_and_others_do_not_take_their_prompt(tmp_path):
    now = [0.0]
    task = make_task(tmp_path / "label.db")
    assigner = Assigner(sorted(task.prompts), overlap=0.0, lease=60, clock=lambda: now[0])
    assert assigner.next("ann", set(), set()) == 0
    assert assigner.next("ann", set(), set()) == 0  # shown again until answered (a reload resumes there)
    assert assigner.next("bob", set(), set()) == 1  # held for ann
    now[0] = 61.0
    assert assigner.next("cy", set(), set()) == 0  # ann left it for longer than the lease
    assigner.release(0, "cy")
    assert assigner.next("bob", {1}, {0}) == 2  # ranked by another labeler: taken
    assert assigner.next("ann", {0}, set()) == 1  # skipped by ann (answered): ann goes on with the next one


def test_a_prompt_is_held_for_half_an_hour_by_default(tmp_path):
    now = [0.0]
    assigner = Assigner([0, 1, 2], overlap=0.0, clock=lambda: now[0])
    assert assigner.next("ann", set(), set()) == 0
    now[0] = 1799.0
    assert assigner.next("bob", set(), set()) == 1
    assert assigner.held_for_another(0, "bob") and not assigner.held_for_another(0, "ann")
    now[0] = 1801.0  # ann's lease ran out: bob may rank 0, and cy is shown it
    assert not assigner.held_for_another(0, "bob")
    assert assigner.next("cy", set(), set()) == 0


def test_a_skip_frees_an_unshared_prompt_for_the_others(tmp_path):
    task = make_task(tmp_path / "label.db", prompts=3)
    service = LabelService(task, target=3, overlap=0.0)
    assert service.next("ann")["prompt_id"] == 0 and service.next("bob")["prompt_id"] == 1
    service.skip({"labeler": "ann", "prompt_id": 0})
    assert service.next("ann")["prompt_id"] == 2
    service.rank({"labeler": "bob", "prompt_id": 1, "order": [[i] for i in ids(task, 1)]})
    assert service.next("bob")["prompt_id"] == 0
    # 0 held for bob, 1 ranked, 2 ann's: cy may find one later
    assert service.next("cy") == {"prompt_id": None, "reason": "held", "done": 1, "target": 3}
    service.rank({"labeler": "ann", "prompt_id": 2, "order": [[i] for i in ids(task, 2)]})
    service.skip({"labeler": "bob", "prompt_id": 0})  # bob ranked 1 and skipped 0; 2 is ann's: none will come
    assert service.next("bob") == {"prompt_id": None, "reason": "answered", "done": 2, "target": 3}
    assert service.next("cy")["prompt_id"] == 0


def brute_force(rankings: list[Ranking]) -> dict:
    """Agreement counted the slow way: every two rankings of one prompt by two labelers, every ordered pair."""
    agreed = compared = tied = 0
    per_labeler = {}
    for x, y in itertools.combinations(rankings, 2):
        if x.prompt_id != y.prompt_id or x.labeler == y.labeler:
            continue
        place = [{rid: n for n, level in enumerate(r.levels) for rid in level} for r in (x, y)]
        responses = sorted(place[0])
        for i in responses:
            for j in responses:
                if i >= j:
                    continue
                prefer = [(p[i] < p[j]) - (p[i] > p[j]) for p in place]
                if 0 in prefer:
                    tied += 1
                    continue
                compared += 1
                agreed += prefer[0] == prefer[1]
                for name in (x.labeler, y.labeler):
                    a, c = per_labeler.get(name, (0, 0))
                    per_labeler[name] = (a + (prefer[0] == prefer[1]), c + 1)
    return {"agreed": agreed, "compared": compared, "tied": tied, "per_labeler": per_labeler}


def test_agreement_of_a_hand_made_set():
    # prompt 0, responses 0..3: ann 0 > 1 > 2 > 3; bob 0 > 2 > 1 = 3 -> of 6 pairs bob ties (1, 3): 5 compared,
    # they disagree on (1, 2) only: 4 of 5. cy ranks prompt 1 alone: no pairs.
    # bob saved first: the pair is still named once, in name order; dee only skipped and is listed too
    rankings = [Ranking("bob", 0, ((0,), (2,), (1, 3)), {}, {3: ("hallucination", "harmful")}, 20.0),
                Ranking("ann", 0, ((0,), (1,), (2,), (3,)), {0: 6}, {3: ("hallucination",)}, 10.0),
                Ranking("cy", 1, ((4,), (5,)), {}, {}, None)]
    s = agreement.stats(rankings, {"cy": 2, "dee": 1})
    assert list(s["labelers"]) == ["ann", "bob", "cy", "dee"]
    assert s["labelers"]["dee"] == {"rankings": 0, "skips": 1, "median_seconds": None,
                                    "agreement_with_others": None, "compared_pairs": 0}
    assert s["agreement"] == pytest.approx(4 / 5) and s["compared_pairs"] == 5 and s["tied_pairs_excluded"] == 1
    assert s["labeler_pairs"] == [{"labelers": ["ann", "bob"], "prompts": 1, "compared_pairs": 5,
                                   "tied_pairs_excluded": 1, "agreement": pytest.approx(0.8)}]
    assert s["labelers"]["cy"] == {"rankings": 1, "skips": 2, "median_seconds": None, "agreement_with_others": None,
                                   "compared_pairs": 0}
    assert s["labelers"]["bob"]["median_seconds"] == 20.0 and s["shared_prompts"] == 1
    assert s["flags"] == {"fails_instruction": 0, "hallucination": 2, "harmful": 1, "other": 0}


def test_agreement_equals_a_brute_force_count_on_random_rankings():
    rng = random.Random(0)
    rankings = []
    for pid in range(12):
        responses = list(range(pid * 10, pid * 10 + rng.randint(2, 6)))
        for name in rng.sample(["ann", "bob", "cy", "dee"], rng.randint(1, 4)):
            shuffled = rng.sample(responses, len(responses))
            cuts = sorted(rng.sample(range(1, len(responses)), rng.randint(1, len(responses) - 1)))
            levels = tuple(tuple(shuffled[a:b]) for a, b in zip([0, *cuts], [*cuts, len(responses)]))
            rankings.append(Ranking(name, pid, levels, {}, {}, rng.choice([None, rng.uniform(1, 60)])))
    s, expected = agreement.stats(rankings, {}), brute_force(rankings)
    assert expected["tied"] > 0 and expected["compared"] > 50
    assert s["agreement"] == pytest.approx(expected["agreed"] / expected["compared"])
    assert (s["compared_pairs"], s["tied_pairs_excluded"]) == (expected["compared"], expected["tied"])
    for name, (agreed, compared) in expected["per_labeler"].items():
        assert s["labelers"][name]["agreement_with_others"] == pytest.approx(agreed / compared)
        seconds = [r.seconds for r in rankings if r.labeler == name and r.seconds is not None]
        assert s["labelers"][name]["median_seconds"] == (statistics.median(seconds) if seconds else None)
    assert sum(p["compared_pairs"] for p in s["labeler_pairs"]) == expected["compared"]


def test_target_0_waits_for_every_prompt_however_many_rank_the_shared_ones(tmp_path):
    """With overlap, a shared prompt collects a ranking per labeler: counting rankings would reach one per prompt
    with prompts still unranked. Target 0 counts prompts ranked; a number counts every labeler's rankings."""
    task = make_task(tmp_path / "label.db", prompts=4)
    saved = []
    service = LabelService(task, target=0, overlap=0.5, on_saved=saved.append)
    shared = [pid for pid in range(4) if pid in service.assigner.shared]
    assert len(shared) == 2
    for name in ("ann", "bob", "cy"):  # all three rank both shared prompts: 6 rankings, 2 prompts
        for pid in shared:
            answer = service.rank({"labeler": name, "prompt_id": pid, "order": [[i] for i in ids(task, pid)]})
    assert task.done() == 6 and answer == {"saved": True, "done": 2, "target": 4} and saved[-1] == 2
    assert service.next("ann")["done"] == 2
    assert str(service.goal) == "2/4 prompts ranked"
    counted = LabelService(task, target=5, overlap=0.5)
    assert (counted.goal.done(), counted.target, str(counted.goal)) == (6, 5, "6/5 rankings stored")
