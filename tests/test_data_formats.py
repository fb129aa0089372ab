"""Dataset importers: each user format becomes canonical sft / rankings / prompts records, every bad row a RowError;
ranking records grouped by prompt into unique responses and (better, worse) pairs."""

import gzip
import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlhf_jax.data import formats
from rlhf_jax.data.formats import download, hh_rlhf, read_rows, tldr
from rlhf_jax.data.formats.rows import RowError
from rlhf_jax.data.formats.tldr import tldr_query
from rlhf_jax.data.prepare import group_comparisons
from rlhf_jax.errors import UserError

HH_CHOSEN = ("\n\nHuman: What are some good vegetables to grow in a small garden?"
             "\n\nAssistant: Tomatoes, lettuce and herbs like basil do well in small spaces."
             "\n\nHuman: Which of those needs the least sun?"
             "\n\nAssistant: Lettuce tolerates partial shade best.\n\nIt bolts in strong heat.")
HH_PROMPT = HH_CHOSEN[: HH_CHOSEN.rfind("\n\nAssistant:") + len("\n\nAssistant:")]
HH_REJECTED = HH_PROMPT + " I don't know, maybe tomatoes?"

TLDR_SFT_ROW = {"id": "t3_1", "subreddit": "relationships", "title": "My (25F) roommate never cleans",
                "post": "  We split rent evenly but she leaves dishes for days.\nWhat do I do?\n",
                "summary": "  Roommate leaves dishes out, how do I bring it up?  "}


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def write_jsonl(path, rows):
    return write_lines(path, [json.dumps(row) for row in rows])


def read_all(fmt, paths, fields=None):
    return list(read_rows(fmt, paths if isinstance(paths, list) else [paths], fields))


def records(fmt, paths, fields=None):
    rows = read_all(fmt, paths, fields)
    assert [r.error for r in rows] == [None] * len(rows)
    return [r.record for r in rows]


def single_error(fmt, path):
    [row] = read_all(fmt, path)
    assert row.record is None and isinstance(row.error, RowError)
    assert isinstance(row.error, UserError)
    return row.error


def comparison(choice, subreddit="tifu", texts=("first summary ", "  second summary")):
    info = {"id": "t3_x", "post": "Long story about a cat.\n", "title": "TIFU by feeding the cat"}
    if subreddit != "absent":
        info["subreddit"] = subreddit
    return {"info": info, "summaries": [{"text": t, "policy": "sup2"} for t in texts], "choice": choice,
            "worker": "w1", "batch": "batch3", "split": "train"}


# ---------------------------------------------------------------------------------------------------------------------
# Valid rows per format


def test_formats_map_to_kinds():
    assert set(formats.FORMATS.values()) == set(formats.KINDS)
    assert formats.FORMATS["hh_rlhf"] == "rankings" and formats.FORMATS["tldr_sft"] == "sft"
    assert formats.FORMATS["hh_rlhf_sft"] == "sft" and formats.FORMATS["hh_rlhf_prompts"] == "prompts"
    assert formats.FORMATS["tldr_prompts"] == "prompts"


def test_jsonl_sft_keeps_metadata_as_compact_sorted_json(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [
        {"prompt": "Say hi.", "response": " Hi!", "metadata": {"source": "web", "id": 7}},
        {"prompt": "Count to 2.", "response": "1 2", "extra": "ignored"},
    ])
    assert records("jsonl_sft", path) == [
        {"prompt": "Say hi.", "response": " Hi!", "metadata": '{"id":7,"source":"web"}'},
        {"prompt": "Count to 2.", "response": "1 2", "metadata": ""},
    ]


def test_jsonl_sft_field_remapping(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "2+2?", "answer": "4", "info": ["a"]}])
    fields = {"prompt": "question", "response": "answer", "metadata": "info"}
    assert records("jsonl_sft", path, fields) == [{"prompt": "2+2?", "response": "4", "metadata": '["a"]'}]
    [row] = read_all("jsonl_sft", path, {"prompt": "question"})  # the response is still looked up as "response"
    assert row.error.reason == "missing_field" and "'response'" in str(row.error)


def test_jsonl_prompts(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Write a poem.", "metadata": 3}, {"prompt": "Hello"}])
    assert records("jsonl_prompts", path) == [{"prompt": "Write a poem.", "metadata": "3"},
                                              {"prompt": "Hello", "metadata": ""}]


def test_jsonl_rankings_normalises_ranks_and_keeps_ties(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [
        {"prompt": "p1", "responses": ["a", "b", "c"], "ranks": [2, 1, 1]},
        {"prompt": "p2", "responses": ["a", "b", "c", "d"], "ranks": [0, 1, 2, 3]},
        {"prompt": "p3", "responses": ["a", "b", "c"], "ranks": [2, 0, 2]},
    ])
    assert [r["ranks"] for r in records("jsonl_rankings", path)] == [[1, 0, 0], [0, 1, 2, 3], [1, 0, 1]]
    assert records("jsonl_rankings", path)[0] == {"prompt": "p1", "responses": ["a", "b", "c"], "ranks": [1, 0, 0]}


def test_jsonl_rankings_say_which_responses_ended_in_one_boolean_each(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [
        {"prompt": "p", "responses": ["a", "b"], "ranks": [0, 1], "ended": [False, True]},
        {"prompt": "p", "responses": ["a", "b"], "ranks": [0, 1], "ended": [True]},
        {"prompt": "p", "responses": ["a", "b"], "ranks": [0, 1], "ended": [1, 0]},
        {"prompt": "p", "responses": ["a", "b"], "ranks": [0, 1], "ended": "yes"},
        {"prompt": "p", "chosen": "a", "rejected": "b", "ended": [True, True]}])
    rows = read_all("jsonl_rankings", path)
    assert rows[0].record == {"prompt": "p", "responses": ["a", "b"], "ranks": [0, 1], "ended": [False, True]}
    assert [row.error.problem for row in rows[1:]] == [
        "field 'ended' must have one value per response (2), got 1",
        "field 'ended' must be a list of booleans (false: the response was cut before its end), got a list with a "
        "non-boolean",
        "field 'ended' must be a list of booleans (false: the response was cut before its end), got a string",
        "field 'ended' goes with 'responses', not a 'chosen'/'rejected' pair"]


def test_jsonl_rankings_accepts_chosen_rejected_pairs(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Q", "chosen": " good", "rejected": " bad"}])
    assert records("jsonl_rankings", path) == [{"prompt": "Q", "responses": [" good", " bad"], "ranks": [0, 1]}]


def test_jsonl_rankings_field_remapping(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [{"q": "Q", "outs": ["x", "y"], "order": [1, 0]},
                                              {"q": "Q2", "win": "w", "lose": "l"}])
    fields = {"prompt": "q", "responses": "outs", "ranks": "order", "chosen": "win", "rejected": "lose"}
    assert records("jsonl_rankings", path, fields) == [
        {"prompt": "Q", "responses": ["x", "y"], "ranks": [1, 0]},
        {"prompt": "Q2", "responses": ["w", "l"], "ranks": [0, 1]},
    ]


def test_hh_rlhf_splits_multi_turn_dialogue_at_last_assistant_turn(tmp_path):
    single_turn = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello! How can I help?",
                   "rejected": "\n\nHuman: Hi\n\nAssistant: What."}
    path = tmp_path / "train.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for row in [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}, single_turn]:
            f.write(json.dumps(row) + "\n")
    multi, single = records("hh_rlhf", str(path))
    assert multi["prompt"] == HH_PROMPT and multi["prompt"].endswith("\n\nAssistant:")
    assert "Which of those needs the least sun?" in multi["prompt"]
    assert multi["responses"] == [" Lettuce tolerates partial shade best.\n\nIt bolts in strong heat.",
                                  " I don't know, maybe tomatoes?"]
    assert multi["ranks"] == [0, 1]
    assert multi["prompt"] + multi["responses"][0] == HH_CHOSEN
    assert single == {"prompt": "\n\nHuman: Hi\n\nAssistant:", "responses": [" Hello! How can I help?", " What."],
                      "ranks": [0, 1]}


def test_tldr_sft_query_template(tmp_path):
    no_subreddit = dict(TLDR_SFT_ROW, subreddit=None)
    path = write_jsonl(tmp_path / "train.jsonl", [TLDR_SFT_ROW, no_subreddit])
    first, second = records("tldr_sft", path)
    assert first == {
        "prompt": "SUBREDDIT: r/relationships\n\nTITLE: My (25F) roommate never cleans\n\n"
                  "POST: We split rent evenly but she leaves dishes for days.\nWhat do I do?\n\nTL;DR:",
        "response": " Roommate leaves dishes out, how do I bring it up?",
        "metadata": "",
    }
    assert second["prompt"].startswith("SUBREDDIT: r/\n\nTITLE:")
    assert tldr_query("a", "t", " p ") == "SUBREDDIT: r/a\n\nTITLE: t\n\nPOST: p\n\nTL;DR:"


def test_hh_rlhf_reply_running_on_into_more_turns_is_its_sides_response_on_either_side(tmp_path):
    """The prompt is the dialogue both texts share, up to its last Assistant turn: a reply that goes on into
    further turns is that side's response, whether it is the chosen or the rejected one."""
    more = " Maybe.\n\nHuman: and?\n\nAssistant: Peas."
    path = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": HH_CHOSEN, "rejected": HH_PROMPT + more},
                                               {"chosen": HH_PROMPT + more, "rejected": HH_CHOSEN}])
    rejected_runs_on, chosen_runs_on = records("hh_rlhf", path)
    reply = HH_CHOSEN[len(HH_PROMPT):]
    assert rejected_runs_on == {"prompt": HH_PROMPT, "responses": [reply, more], "ranks": [0, 1]}
    assert chosen_runs_on == {"prompt": HH_PROMPT, "responses": [more, reply], "ranks": [0, 1]}


def test_jsonl_nulls_are_absent_fields_as_in_parquet(tmp_path):
    """A dataframe's export writes null for the fields a row lacks: K-way and pairwise rows mix."""
    rows = [{"prompt": "p1", "responses": ["a", "b", "c"], "ranks": [0, 1, 2], "chosen": None, "rejected": None},
            {"prompt": "p2", "responses": None, "ranks": None, "chosen": "x", "rejected": "y"}]
    as_jsonl = records("jsonl_rankings", write_jsonl(tmp_path / "mixed.jsonl", rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "mixed.parquet")
    assert as_jsonl == records("jsonl_rankings", str(tmp_path / "mixed.parquet"))
    assert [r["responses"] for r in as_jsonl] == [["a", "b", "c"], ["x", "y"]]


def test_hh_rlhf_sft_and_prompts_share_the_rankings_prompts(tmp_path):
    rows = [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED},
            {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello! How can I help?",
             "rejected": "\n\nHuman: Hi\n\nAssistant: What."},
            # the chosen reply runs on into another turn: its prompt is still the dialogue both texts share
            {"chosen": "\n\nHuman: Hi\n\nAssistant: Sure.\n\nHuman: thanks\n\nAssistant: Welcome.",
             "rejected": "\n\nHuman: Hi\n\nAssistant: No."}]
    path = tmp_path / "train.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    rankings, sft, prompts = (records(fmt, str(path)) for fmt in ("hh_rlhf", "hh_rlhf_sft", "hh_rlhf_prompts"))
    assert [r["prompt"] for r in sft] == [r["prompt"] for r in prompts] == [r["prompt"] for r in rankings]
    assert [r["response"] for r in sft] == [r["responses"][0] for r in rankings]  # the chosen reply
    assert [r["prompt"] + r["response"] for r in sft] == [row["chosen"] for row in rows]
    assert prompts[0] == {"prompt": HH_PROMPT, "metadata": ""} and sft[0]["metadata"] == ""
    only_chosen = write_jsonl(tmp_path / "chosen.jsonl", [{"chosen": HH_CHOSEN}])  # 'rejected' is not needed
    assert records("hh_rlhf_prompts", only_chosen) == [prompts[0]]
    assert records("hh_rlhf_sft", only_chosen) == [sft[0]]


def _uf_row(prompt, chosen, rejected, **extra):
    """A row of UltraFeedback binarized's layout: conversations of messages, scores beside them."""
    conversation = lambda reply: [{"content": prompt, "role": "user"}, {"content": reply, "role": "assistant"}]
    return {"prompt": prompt, "prompt_id": "0" * 64, "chosen": conversation(chosen), "rejected": conversation(rejected),
            "messages": conversation(chosen), "score_chosen": 8.5, "score_rejected": 3.0, **extra}


def test_ultrafeedback_ranks_the_chosen_reply_first_in_all_three_kinds(tmp_path):
    path = tmp_path / "train_prefs-00000-of-00001.parquet"
    pq.write_table(pa.Table.from_pylist([_uf_row("Name a prime.", "7 is prime.", "Nine."),
                                         _uf_row("Say hi", " Hi!\n", "bye")]), path)
    rankings, sft, prompts = (records(fmt, str(path)) for fmt in ("ultrafeedback", "ultrafeedback_sft",
                                                                    "ultrafeedback_prompts"))
    assert rankings == [{"prompt": "Name a prime.", "responses": ["7 is prime.", "Nine."], "ranks": [0, 1]},
                        {"prompt": "Say hi", "responses": [" Hi!\n", "bye"], "ranks": [0, 1]}]
    assert sft == [{"prompt": "Name a prime.", "response": "7 is prime.", "metadata": ""},
                   {"prompt": "Say hi", "response": " Hi!\n", "metadata": ""}]
    assert prompts == [{"prompt": "Name a prime.", "metadata": ""}, {"prompt": "Say hi", "metadata": ""}]


@pytest.mark.parametrize("change, reason, problem", [
    (lambda r: r.update(chosen="7"), "wrong_type", "field 'chosen' must be a list of messages, got a string"),
    (lambda r: r["rejected"].append({"content": "more?", "role": "user"}), "not_one_turn",
     "field 'rejected' must be one user message and the assistant's reply, got roles ['user', 'assistant', 'user']"),
    (lambda r: r["chosen"][0].update(content="another prompt"), "prompt_mismatch",
     "field 'chosen[0].content' is not the row's 'prompt'"),
    (lambda r: r["rejected"][1].update(content="7 is prime."), "identical_responses",
     "fields 'chosen' and 'rejected' end in the same reply"),
    (lambda r: r["chosen"][1].update(content="  "), "empty_response", "field 'chosen[1].content' (the reply) is empty"),
    (lambda r: r["chosen"][1].pop("role"), "missing_field", "missing field 'chosen[1].role'"),
])
def test_ultrafeedback_rows_that_are_not_one_turn_ranked_are_named(tmp_path, change, reason, problem):
    row = _uf_row("Name a prime.", "7 is prime.", "Nine.")
    change(row)
    error = single_error("ultrafeedback", write_jsonl(tmp_path / "uf.jsonl", [row]))
    assert (error.reason, error.problem) == (reason, problem)


def _shp_row(post, a, b, label):
    return {"post_id": "abc", "domain": "askscience_train", "upvote_ratio": 0.99, "history": post,
            "c_root_id_A": "x", "c_root_id_B": "y", "created_at_utc_A": 1, "created_at_utc_B": 2, "score_A": 30,
            "score_B": 4, "human_ref_A": a, "human_ref_B": b, "labels": label, "seconds_difference": 1.0,
            "score_ratio": 7.5}


def test_shp_ranks_the_preferred_comment_first_and_groups_a_posts_rows(tmp_path):
    """labels 1: A was preferred; 0: B was. Three comments on one post, in two rows, make one element."""
    post = "Why is the sky blue?"
    path = write_jsonl(tmp_path / "train.json", [_shp_row(post, "Rayleigh scattering.", "Magic.", 1),
                                                 _shp_row(post, "Because.", "Rayleigh scattering.", 0)])
    rankings = records("shp", str(path))
    assert rankings == [{"prompt": post, "responses": ["Rayleigh scattering.", "Magic."], "ranks": [0, 1]},
                        {"prompt": post, "responses": ["Because.", "Rayleigh scattering."], "ranks": [1, 0]}]
    [element], _ = group_comparisons(rankings)
    assert element["responses"] == ["Rayleigh scattering.", "Magic.", "Because."]
    assert sorted(zip(element["better"], element["worse"])) == [(0, 1), (0, 2)]
    for label, problem in ((2, "field 'labels' must be 1 (A preferred) or 0 (B preferred), got 2"),
                           (True, "field 'labels' must be 1 (A preferred) or 0 (B preferred), got True")):
        error = single_error("shp", write_jsonl(tmp_path / "bad.json", [_shp_row(post, "a", "b", label)]))
        assert (error.reason, error.problem) == ("invalid_choice", problem)


def test_tldr_prompts_are_the_sft_queries(tmp_path):
    rows = [TLDR_SFT_ROW, dict(TLDR_SFT_ROW, subreddit=None), {k: v for k, v in TLDR_SFT_ROW.items() if k != "summary"}]
    path = write_jsonl(tmp_path / "valid.jsonl", rows)
    prompts = records("tldr_prompts", path)
    assert [r["prompt"] for r in prompts[:2]] == [r["prompt"] for r in records("tldr_sft", write_jsonl(
        tmp_path / "sft.jsonl", rows[:2]))]
    assert prompts[2] == prompts[0] == {"prompt": tldr_query(TLDR_SFT_ROW["subreddit"], TLDR_SFT_ROW["title"],
                                                             TLDR_SFT_ROW["post"]), "metadata": ""}


def test_prompt_and_sft_formats_report_their_siblings_problems(tmp_path):
    """A row the sibling format refuses for its prompt is refused with the very same message."""
    for fmt, sibling, row in [
        ("hh_rlhf_sft", "hh_rlhf", {"chosen": "\n\nHuman: hi there", "rejected": "x"}),
        ("hh_rlhf_prompts", "hh_rlhf", {"chosen": 3, "rejected": "x"}),
        ("hh_rlhf_sft", "hh_rlhf", {"chosen": HH_PROMPT + " ", "rejected": HH_REJECTED}),
        ("tldr_prompts", "tldr_sft", {k: v for k, v in TLDR_SFT_ROW.items() if k != "title"}),
        ("tldr_prompts", "tldr_sft", dict(TLDR_SFT_ROW, subreddit=5)),
    ]:
        path = write_jsonl(tmp_path / "row.jsonl", [row])
        mine, theirs = single_error(fmt, path), single_error(sibling, path)
        assert (str(mine), mine.reason) == (str(theirs), theirs.reason), fmt


def test_tldr_comparisons_put_the_chosen_summary_first(tmp_path):
    path = write_jsonl(tmp_path / "batch3.json", [comparison(0), comparison(1, subreddit=None),
                                                  comparison(1, subreddit="absent")])
    chose_first, chose_second, no_subreddit = records("tldr_comparisons", path)
    assert chose_first["responses"] == [" first summary", " second summary"]
    assert chose_second["responses"] == [" second summary", " first summary"]  # summaries[1] is responses[0]
    assert chose_first["ranks"] == chose_second["ranks"] == [0, 1]
    assert chose_first["prompt"] == tldr_query("tifu", "TIFU by feeding the cat", "Long story about a cat.\n")
    assert chose_second["prompt"] == no_subreddit["prompt"] == tldr_query("", "TIFU by feeding the cat",
                                                                          "Long story about a cat.")


def test_tldr_comparison_with_more_than_two_summaries_ties_the_unchosen(tmp_path):
    path = write_jsonl(tmp_path / "batch9.json", [comparison(1, texts=("a", "b", "c"))])
    [record] = records("tldr_comparisons", path)
    assert record["responses"] == [" b", " a", " c"] and record["ranks"] == [0, 1, 1]


def test_parquet_matches_jsonl_and_numbers_rows_from_one(tmp_path):
    rows = [{"prompt": "p1", "responses": ["a", "b"], "ranks": [1, 0]},
            {"prompt": "p2", "responses": ["a"], "ranks": [0]},
            {"prompt": "p3", "responses": ["x", "y", "z"], "ranks": [0, 0, 1]}]
    path = tmp_path / "r.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    jsonl = write_jsonl(tmp_path / "r.jsonl", rows)
    from_parquet, from_jsonl = read_all("jsonl_rankings", str(path)), read_all("jsonl_rankings", jsonl)
    assert [r.record for r in from_parquet] == [r.record for r in from_jsonl]
    assert from_parquet[1].error.reason == "too_few_responses"
    assert str(from_parquet[1].error).startswith(f"{path}:2: ")
    assert [r.where for r in from_parquet] == [f"{path}:{n}" for n in (1, 2, 3)]


def test_parquet_tldr_comparisons_with_null_subreddit(tmp_path):
    path = tmp_path / "c.parquet"
    pq.write_table(pa.Table.from_pylist([comparison(1, subreddit=None), comparison(0)]), path)
    first, second = records("tldr_comparisons", str(path))
    assert first["prompt"].startswith("SUBREDDIT: r/\n\n") and first["responses"][0] == " second summary"
    assert second["prompt"].startswith("SUBREDDIT: r/tifu\n\n")


def test_several_files_stream_in_order(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "1"}, {"prompt": "2"}])
    b, c = tmp_path / "b.jsonl.gz", tmp_path / "c.JSON.gz"  # either gzipped suffix, in any case
    for path, prompt in ((b, "3"), (c, "4")):
        with gzip.open(path, "wt") as f:
            f.write(json.dumps({"prompt": prompt}) + "\n")
    rows = read_all("jsonl_prompts", [a, str(b), str(c)])
    assert [r.record["prompt"] for r in rows] == ["1", "2", "3", "4"]
    assert [r.where for r in rows] == [f"{a}:1", f"{a}:2", f"{b}:1", f"{c}:1"]
    assert [r.record for r in read_rows("jsonl_prompts", str(a))] == [r.record for r in rows[:2]]  # one path, bare


# ---------------------------------------------------------------------------------------------------------------------
# Invalid rows: one RowError each, with a reason and a one-line "file:line: ..." message

GOOD_HH = {"chosen": HH_CHOSEN, "rejected": HH_REJECTED}

BAD_ROWS = [
    ("jsonl_sft", '{"prompt": "p", "response": ', "invalid_json"),
    ("jsonl_sft", '["prompt", "response"]', "not_an_object"),
    ("jsonl_sft", '"just a string"', "not_an_object"),
    ("jsonl_sft", {"response": "r"}, "missing_field"),
    ("jsonl_sft", {"prompt": "p"}, "missing_field"),
    ("jsonl_sft", {"prompt": 5, "response": "r"}, "wrong_type"),
    ("jsonl_sft", {"prompt": "p", "response": None}, "missing_field"),
    ("jsonl_sft", {"prompt": " \n\t", "response": "r"}, "empty_prompt"),
    ("jsonl_sft", {"prompt": "p", "response": "  "}, "empty_response"),
    ("jsonl_prompts", {"prompt": ""}, "empty_prompt"),
    ("jsonl_prompts", {"text": "p"}, "missing_field"),
    ("jsonl_rankings", {"prompt": "p", "ranks": [0, 1]}, "missing_field"),
    ("jsonl_rankings", {"prompt": "p", "responses": ["a", "b"]}, "missing_field"),
    ("jsonl_rankings", {"prompt": "p", "responses": "a", "ranks": [0]}, "wrong_type"),
    ("jsonl_rankings", {"prompt": "p", "responses": ["a", 2], "ranks": [0, 1]}, "wrong_type"),
    ("jsonl_rankings", {"prompt": "p", "responses": ["a", "b"], "ranks": [0, 1.0]}, "wrong_type"),
    ("jsonl_rankings", {"prompt": "p", "responses": ["a", "b"], "ranks": [False, True]}, "wrong_type"),
    ("jsonl_rankings", {"prompt": "p", "responses": ["a", " "], "ranks": [0, 1]}, "empty_response"),
    ("jsonl_rankings", {"prompt": "p", "responses": ["a"], "ranks": [0]}, "too_few_responses"),
    ("jsonl_rankings", {"prompt": "p", "responses": [], "ranks": []}, "too_few_responses"),
    ("jsonl_rankings", {"prompt": "p", "responses": ["a", "b"], "ranks": [0]}, "invalid_ranks"),
    ("jsonl_rankings", {"prompt": "p", "responses": ["a", "b"], "ranks": [-1, 0]}, "invalid_ranks"),
    ("jsonl_rankings", {"prompt": "p", "responses": ["a", "b"], "ranks": [1, 2]}, "invalid_ranks"),  # 1-based
    ("jsonl_rankings", {"prompt": "p", "responses": ["a", "b", "c"], "ranks": [2, 2, 2]}, "invalid_ranks"),
    ("jsonl_rankings", {"prompt": "p", "chosen": "a"}, "missing_field"),
    ("jsonl_rankings", {"prompt": "p", "chosen": "a", "rejected": ""}, "empty_response"),
    ("jsonl_rankings", {"prompt": "", "chosen": "a", "rejected": "b"}, "empty_prompt"),
    ("jsonl_rankings", {"prompt": "p", "responses": ["a", "b", "a"], "ranks": [0, 1, 2]}, "identical_responses"),
    ("jsonl_rankings", {"prompt": "p", "responses": ["a", "a"], "ranks": [0, 0]}, "identical_responses"),
    ("jsonl_rankings", {"prompt": "p", "chosen": " a", "rejected": " a"}, "identical_responses"),
    ("jsonl_rankings", {"prompt": "p", "responses": ["a", "b"], "ranks": [0, 1], "chosen": "c", "rejected": "d"},
     "ambiguous_fields"),
    ("hh_rlhf", {"chosen": HH_CHOSEN}, "missing_field"),
    ("hh_rlhf", {"chosen": HH_CHOSEN, "rejected": 1}, "wrong_type"),
    ("hh_rlhf", {"chosen": "\n\nHuman: hi there", "rejected": "\n\nHuman: hi there"}, "missing_field"),
    ("hh_rlhf", {"chosen": HH_CHOSEN, "rejected": "\n\nHuman: Something else\n\nAssistant: No."}, "prefix_mismatch"),
    ("hh_rlhf", {"chosen": HH_PROMPT + "  ", "rejected": HH_REJECTED}, "empty_response"),
    ("hh_rlhf", {"chosen": HH_CHOSEN, "rejected": HH_PROMPT}, "empty_response"),
    ("hh_rlhf", {"chosen": HH_CHOSEN, "rejected": HH_CHOSEN}, "identical_responses"),  # HH-RLHF has such rows
    ("tldr_sft", dict(TLDR_SFT_ROW, summary=" "), "empty_response"),
    ("tldr_sft", {k: v for k, v in TLDR_SFT_ROW.items() if k != "post"}, "missing_field"),
    ("tldr_sft", dict(TLDR_SFT_ROW, title=["x"]), "wrong_type"),
    ("tldr_comparisons", comparison(2), "invalid_choice"),
    ("tldr_comparisons", comparison(-1), "invalid_choice"),
    ("tldr_comparisons", comparison(True), "wrong_type"),
    ("tldr_comparisons", dict(comparison(0), summaries=[{"text": "only one"}]), "too_few_responses"),
    ("tldr_comparisons", dict(comparison(0), summaries=[{"text": "a"}, {"policy": "b"}]), "missing_field"),
    ("tldr_comparisons", dict(comparison(0), summaries=[{"text": "a"}, {"text": " "}]), "empty_response"),
    ("tldr_comparisons", dict(comparison(0), info="a post"), "wrong_type"),
    ("tldr_comparisons", comparison(0, texts=("same ", " same")), "identical_responses"),  # equal once stripped
    ("tldr_comparisons", {"summaries": [], "choice": 0}, "missing_field"),
    ("hh_rlhf_sft", {"rejected": HH_REJECTED}, "missing_field"),
    ("hh_rlhf_sft", {"chosen": "\n\nHuman: hi there"}, "missing_field"),
    ("hh_rlhf_sft", {"chosen": HH_PROMPT + "  "}, "empty_response"),
    ("hh_rlhf_prompts", {"chosen": ["a"]}, "wrong_type"),
    ("hh_rlhf_prompts", {"chosen": "\n\nHuman: no reply yet"}, "missing_field"),
    ("tldr_prompts", {k: v for k, v in TLDR_SFT_ROW.items() if k != "post"}, "missing_field"),
    ("tldr_prompts", dict(TLDR_SFT_ROW, title=None), "missing_field"),  # null: absent, as in Parquet
    ("tldr_prompts", '{"post": 1' + "0" * 5000 + "}", "invalid_json"),  # past Python's digit limit
    ("tldr_prompts", "[" * 100000 + "]" * 100000, "invalid_json"),  # nested past the recursion limit
    ("tldr_prompts", '{"post": "p", ', "invalid_json"),
    ("jsonl_sft", '{"prompt": "p", "response": "r", "response": "r2"}', "invalid_json"),  # never the last one wins
    ("jsonl_sft", '{"prompt": "p", "response": "r", "metadata": {"x": NaN}}', "invalid_json"),
    ("jsonl_prompts", '{"prompt": "p", "metadata": {"x": -Infinity}}', "invalid_json"),
]


@pytest.mark.parametrize("fmt,line,reason", BAD_ROWS)
def test_bad_row_gives_row_error_with_reason(tmp_path, fmt, line, reason):
    good = {"jsonl_sft": {"prompt": "p", "response": "r"}, "jsonl_prompts": {"prompt": "p"},
            "jsonl_rankings": {"prompt": "p", "responses": ["a", "b"], "ranks": [0, 1]}, "hh_rlhf": GOOD_HH,
            "tldr_sft": TLDR_SFT_ROW, "tldr_comparisons": comparison(0), "hh_rlhf_sft": GOOD_HH,
            "hh_rlhf_prompts": GOOD_HH, "tldr_prompts": TLDR_SFT_ROW}[fmt]
    bad = line if isinstance(line, str) else json.dumps(line)
    path = write_lines(tmp_path / "data.jsonl", [json.dumps(good), json.dumps(good), bad, json.dumps(good)])
    rows = read_all(fmt, path)
    assert len(rows) == 4
    assert [r.error is None for r in rows] == [True, True, False, True]  # the rows after a bad one still load
    error = rows[2].error
    assert error.reason == reason
    assert str(error).startswith(f"{path}:3: ") and "\n" not in str(error)
    assert rows[2].where == f"{path}:3"


def test_error_messages_name_field_and_expectation(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"prompt": "p", "responses": ["a"], "ranks": [0]}])
    assert str(single_error("jsonl_rankings", path)) == (
        f"{path}:1: field 'responses' must be a list of at least 2 strings, got 1")
    path = write_lines(tmp_path / "y.jsonl", ['{"prompt": "p",}'])
    error = single_error("jsonl_prompts", path)
    assert error.reason == "invalid_json" and "Expecting property name" in str(error)
    path = write_jsonl(tmp_path / "z.jsonl", [{"prompt": "p", "response": 3}])
    assert str(single_error("jsonl_sft", path)) == f"{path}:1: field 'response' must be a string, got an integer"


def test_identical_responses_name_both_indices(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "p", "responses": ["a", "b", "a"], "ranks": [0, 1, 2]}])
    error = single_error("jsonl_rankings", path)
    assert str(error) == f"{path}:1: field 'responses[0]' and 'responses[2]' are identical"
    path = write_jsonl(tmp_path / "p.jsonl", [{"q": "p", "win": "x", "lose": "x"}])
    [row] = read_all("jsonl_rankings", path, {"prompt": "q", "chosen": "win", "rejected": "lose"})
    assert str(row.error) == f"{path}:1: fields 'win' and 'lose' are identical"


def test_non_dense_ranks_are_renumbered_and_noted(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "p", "responses": ["a", "b", "c"], "ranks": [0, 2, 2]},
                                              {"prompt": "p", "responses": ["a", "b", "c"], "ranks": [2, 1, 1]},
                                              {"prompt": "p", "responses": ["a", "b", "c"], "ranks": [1, 0, 0]},
                                              {"prompt": "p", "chosen": "a", "rejected": "b"}])
    rows = read_all("jsonl_rankings", path)
    assert [r.record["ranks"] for r in rows] == [[0, 1, 1], [1, 0, 0], [1, 0, 0], [0, 1]]
    assert [r.notes for r in rows] == [("non_dense_ranks",), ("non_dense_ranks",), (), ()]


def test_json_array_file_is_refused_in_one_line(tmp_path):
    pretty = tmp_path / "rows.json"
    pretty.write_text(json.dumps([{"prompt": "a"}, {"prompt": "b"}], indent=2))
    one_line = tmp_path / "rows.jsonl.gz"
    with gzip.open(one_line, "wt") as f:
        f.write("\ufeff" + json.dumps([{"prompt": "a"}, {"prompt": "b"}]) + "\n")
    for path in (pretty, one_line):
        with pytest.raises(UserError) as e:
            read_all("jsonl_prompts", str(path))
        assert str(e.value) == f"{path}: is a JSON array; expected JSON lines (one object per line)"


def test_json_error_column_is_that_of_the_raw_line(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "a"}\n  {"prompt": }\n\xef\xbb\xbf{"prompt": ]\n{"prompt": "b"\n'
                     b'{"prompt": "c\n')
    first, second, third, fourth, fifth = read_all("jsonl_prompts", str(path))
    assert first.record == {"prompt": "a", "metadata": ""}  # a byte order mark is not an error
    assert str(second.error) == f"{path}:2: invalid JSON (Expecting value at column 14)"  # leading spaces count
    assert str(third.error) == f"{path}:3: invalid JSON (Expecting value at column 13)"  # and so does the BOM
    # an object left open: the error is at the end of its own line, not at column 1 of the next
    assert str(fourth.error) == f"{path}:4: invalid JSON (Expecting ',' delimiter at column 15)"
    assert str(fifth.error) == f"{path}:5: invalid JSON (Unterminated string starting at column 12)"  # 'at' once


def test_invalid_utf8_is_one_bad_row(tmp_path):
    path = tmp_path / "u.jsonl"
    path.write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n{"prompt": "also ok"}\n')
    rows = read_all("jsonl_prompts", str(path))
    assert [r.record and r.record["prompt"] for r in rows] == ["ok", None, "also ok"]
    assert rows[1].error.reason == "invalid_utf8"
    assert str(rows[1].error) == f"{path}:2: not valid UTF-8 (byte 15 of the line)"


def test_a_lone_surrogate_escape_is_one_bad_row(tmp_path):
    """JSON can escape half a UTF-16 pair, which Python reads but no UTF-8 file or dataset can hold."""
    path = tmp_path / "s.jsonl"
    path.write_text('{"prompt": "ok"}\n{"prompt": "hi \\ud800 there"}\n{"prompt": "pair \\ud83d\\ude00"}\n')
    rows = read_all("jsonl_prompts", str(path))
    assert [r.record and r.record["prompt"] for r in rows] == ["ok", None, "pair \U0001f600"]
    assert str(rows[1].error) == (f"{path}:2: field 'prompt' holds a lone surrogate escape (\\ud800-\\udfff "
                                  "without its pair), not text")


def test_blank_line_in_middle_is_an_error_but_leading_and_trailing_blanks_are_not(tmp_path):
    path = tmp_path / "b.jsonl"
    path.write_text('\n  \n{"prompt": "a"}\n\n{"prompt": "b"}\n   \n\n')
    rows = read_all("jsonl_prompts", str(path))
    assert len(rows) == 3
    assert rows[0].record["prompt"] == "a" and rows[0].where == f"{path}:3"
    assert rows[1].error.reason == "invalid_json" and str(rows[1].error).startswith(f"{path}:4: blank line")
    assert rows[2].record["prompt"] == "b" and rows[2].where == f"{path}:5"


def test_crlf_line_endings_are_accepted(tmp_path):
    path = tmp_path / "w.jsonl"
    path.write_bytes(b'{"prompt": "a"}\r\n{"prompt": "b"}\r\n')
    assert [r["prompt"] for r in records("jsonl_prompts", str(path))] == ["a", "b"]


# ---------------------------------------------------------------------------------------------------------------------
# Whole-call errors


def test_unknown_format_lists_the_formats(tmp_path):
    with pytest.raises(UserError, match="unknown dataset format 'csv'.*jsonl_sft.*tldr_comparisons"):
        read_rows("csv", [str(tmp_path / "x.jsonl")])


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(UserError) as e:
        read_all("jsonl_sft", str(missing))
    assert str(e.value) == f"{missing}: file not found"
    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(UserError, match="dir.jsonl: is a directory, expected a file"):
        read_all("jsonl_sft", str(tmp_path / "dir.jsonl"))  # a directory is not a readable file


def test_missing_file_is_reported_before_any_row(tmp_path):
    good = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "p"}])
    with pytest.raises(UserError, match="nope.jsonl: file not found"):
        read_rows("jsonl_prompts", [good, str(tmp_path / "nope.jsonl")])


def test_unsupported_file_type_and_bad_field_remaps(tmp_path):
    with pytest.raises(UserError, match="unsupported file type"):
        read_rows("jsonl_sft", [str(tmp_path / "data.csv")])
    with pytest.raises(UserError, match="unsupported file type"):  # refused before any download
        read_rows("jsonl_sft", ["https://example.invalid/data.csv"])
    with pytest.raises(UserError, match="no field 'answer'"):
        read_rows("jsonl_sft", [], {"answer": "a"})
    with pytest.raises(UserError, match="fixed field names"):
        read_rows("hh_rlhf", [], {"prompt": "q"})


def test_corrupt_gzip_and_parquet_are_user_errors(tmp_path):
    gz = tmp_path / "bad.jsonl.gz"
    gz.write_bytes(b"not gzip at all\n")
    with pytest.raises(UserError, match="not a valid gzip file"):
        read_all("jsonl_prompts", str(gz))
    parquet = tmp_path / "bad.parquet"
    parquet.write_bytes(b"not parquet")
    with pytest.raises(UserError, match="not a readable Parquet file"):
        read_all("jsonl_prompts", str(parquet))


def test_parquet_values_json_or_python_cannot_hold_are_named(tmp_path):
    """A NaN metadata value is a bad row (metadata is stored as JSON); a timestamp past year 9999 names its column."""
    nan = tmp_path / "nan.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "p", "metadata": 1.5}, {"prompt": "q", "metadata": float("nan")}]),
                   nan)
    good, bad = read_all("jsonl_prompts", str(nan))
    assert good.record["metadata"] == "1.5" and bad.error.reason == "invalid_metadata"
    assert str(bad.error) == f"{nan}:2: field 'metadata' holds NaN or an infinity, which JSON has no value for"
    late = tmp_path / "late.parquet"
    stamps = pa.array([0, 253402300800000000], pa.timestamp("us"))  # 1970 and year 10000
    pq.write_table(pa.table({"prompt": ["p", "q"], "created_at": stamps}), late)
    with pytest.raises(UserError, match=rf"^{late}: rows 1-2, column 'created_at': a value Python cannot hold"):
        read_all("jsonl_prompts", str(late))


def test_an_input_given_twice_is_refused(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "p"}])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"^\./p\.jsonl: given twice as an input \(also as '.*p\.jsonl'\)"):
        read_all("jsonl_prompts", [path, "./p.jsonl"])
    with pytest.raises(UserError, match="given twice"):
        read_all("jsonl_prompts", ["https://example.org/a.jsonl"] * 2)  # refused before any download


# ---------------------------------------------------------------------------------------------------------------------
# Downloads (file:// URLs and a loopback server: tests never use the network)


def test_fetch_copies_once_into_cache(tmp_path):
    source = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "p"}])
    url = (tmp_path / "train.jsonl").as_uri()
    cache = tmp_path / "cache"
    first = download.fetch(url, cache)
    assert first.parent == cache and first.name.endswith("train.jsonl") and first.read_text() == open(source).read()
    first.write_text("cached copy\n")  # a second fetch must reuse the file, not download again
    assert download.fetch(url, cache) == first and first.read_text() == "cached copy\n"
    assert [p.name for p in cache.iterdir()] == [first.name]  # no temp file left behind
    (tmp_path / "test").mkdir()
    write_jsonl(tmp_path / "test" / "train.jsonl", [{"prompt": "q"}])
    other = download.fetch((tmp_path / "test" / "train.jsonl").as_uri(), cache)
    assert other != first and "q" in other.read_text()  # same file name, different URL: separate cache entries


def test_fetch_failure_is_user_error_and_leaves_no_partial_file(tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(UserError, match="download failed"):
        download.fetch((tmp_path / "missing.jsonl").as_uri(), cache)
    assert list(cache.iterdir()) == []


def test_an_unwritable_download_cache_is_one_line_naming_it(tmp_path):
    in_the_way = tmp_path / "a_file"
    in_the_way.write_text("")
    with pytest.raises(UserError, match=f"^{in_the_way / 'cache'}: cannot write the download cache .*RLHF_JAX_CACHE"):
        download.fetch("https://example.com/train.jsonl.gz", in_the_way / "cache")


def test_a_download_cut_short_is_not_cached(tmp_path):
    """A server that closes before its Content-Length: urllib reads to the end without an error."""
    import http.server
    import threading

    class CutShort(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b'{"prompt": "p"}\n' * 2)
            self.close_connection = True

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), CutShort)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    cache = tmp_path / "cache"
    try:
        with pytest.raises(UserError, match=r"download failed \(incomplete: 32 of 1000 bytes\)"):
            download.fetch(f"http://127.0.0.1:{server.server_port}/x.jsonl", cache)
    finally:
        server.shutdown()
    assert list(cache.iterdir()) == []


def test_read_rows_downloads_http_urls_into_cache(tmp_path, monkeypatch):
    source = write_jsonl(tmp_path / "src.jsonl", [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}])
    fetched = []

    def fake_fetch(url, cache_dir):
        fetched.append((url, cache_dir))
        target = tmp_path / "downloaded.jsonl"
        shutil.copy(source, target)
        return target

    monkeypatch.setenv("RLHF_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(download, "fetch", fake_fetch)
    [record] = records("hh_rlhf", "https://example.invalid/helpful-base/train.jsonl")
    assert record["prompt"] == HH_PROMPT
    assert fetched == [("https://example.invalid/helpful-base/train.jsonl", tmp_path / "cache")]


def test_download_urls_are_well_formed():
    assert hh_rlhf.HH_RLHF_URLS["helpful-base/train"] == (
        "https://huggingface.co/datasets/Anthropic/hh-rlhf/resolve/main/helpful-base/train.jsonl.gz")
    assert tldr.TLDR_SFT_URLS["valid"].endswith("/datasets/tldr_3_filtered/valid.jsonl")
    assert tldr.TLDR_COMPARISONS_URL.format(n=3).endswith("/dataset/comparisons/batch3.json")
    assert list(tldr.TLDR_COMPARISONS_BATCHES) == list(range(3, 23))


# ---------------------------------------------------------------------------------------------------------------------
# Grouping comparisons by prompt (prepare): one element per prompt, its unique responses and (better, worse) pairs


def hh_row(prompt, chosen, rejected):
    return {"chosen": prompt + chosen, "rejected": prompt + rejected}


def grouped(fmt, path):
    return group_comparisons(records(fmt, path))


def test_hh_rows_of_one_prompt_become_one_element(tmp_path):
    other = "\n\nHuman: Hi\n\nAssistant:"
    path = write_jsonl(tmp_path / "hh.jsonl", [hh_row(HH_PROMPT, " A", " B"), hh_row(other, " yes", " no"),
                                               hh_row(HH_PROMPT, " A", " C")])
    groups, stats = grouped("hh_rlhf", path)
    assert groups == [{"prompt": HH_PROMPT, "responses": [" A", " B", " C"], "ended": [True] * 3,
                       "better": [0, 0], "worse": [1, 2]},
                      {"prompt": other, "responses": [" yes", " no"], "ended": [True] * 2, "better": [0], "worse": [1]}]
    assert stats == {"rows": 3, "prompts": 2, "pairs": 3, "inconsistent_pairs": 0, "cut_responses": 0,
                     "prompts_without_pairs": 0}


def test_each_labelers_ranking_of_a_prompt_is_its_own_element(tmp_path):
    """InstructGPT: several labelers' rankings of one prompt are separate batch elements; a labeler's rows of one
    prompt are one, and rows that name no labeler are grouped by prompt."""
    path = write_jsonl(tmp_path / "r.jsonl", [
        {"prompt": "p", "responses": ["a", "b", "c"], "ranks": [0, 1, 2], "labeler": "ann"},
        {"prompt": "p", "responses": ["a", "b", "c"], "ranks": [2, 1, 0], "labeler": "bob"},
        {"prompt": "p", "chosen": "d", "rejected": "a", "labeler": "ann"},
        {"prompt": "p", "chosen": "x", "rejected": "y"},
        {"prompt": "p", "chosen": "y", "rejected": "z"},
        {"prompt": "q", "chosen": "1", "rejected": "2", "labeler": "ann"}])
    groups, stats = grouped("jsonl_rankings", path)
    assert groups == [{"prompt": "p", "responses": ["a", "b", "c", "d"], "ended": [True] * 4,
                       "better": [0, 0, 1, 3], "worse": [1, 2, 2, 0]},
                      {"prompt": "p", "responses": ["a", "b", "c"], "ended": [True] * 3,
                       "better": [1, 2, 2], "worse": [0, 0, 1]},
                      {"prompt": "p", "responses": ["x", "y", "z"], "ended": [True] * 3,
                       "better": [0, 1], "worse": [1, 2]},
                      {"prompt": "q", "responses": ["1", "2"], "ended": [True] * 2, "better": [0], "worse": [1]}]
    assert stats == {"rows": 6, "prompts": 2, "pairs": 10, "inconsistent_pairs": 0, "cut_responses": 0,
                     "prompts_without_pairs": 0}
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "chosen": "x", "rejected": "y", "labeler": " "},
                                               {"prompt": "p", "chosen": "x", "rejected": "y", "labeler": 3}])
    assert [row.error.problem for row in read_rows("jsonl_rankings", [str(bad)])] == [
        "field 'labeler' is empty; leave it out when no labeler is known",
        "field 'labeler' must be a string, got an integer"]


def test_repeated_and_inconsistent_pairs_are_kept_and_counted(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Q", "chosen": "a", "rejected": "b"},
                                              {"prompt": "Q", "chosen": "a", "rejected": "b"},
                                              {"prompt": "Q", "chosen": "b", "rejected": "a"},
                                              {"prompt": "Q", "chosen": "c", "rejected": "b"}])
    [group], stats = grouped("jsonl_rankings", path)
    assert group["responses"] == ["a", "b", "c"]
    assert list(zip(group["better"], group["worse"])) == [(0, 1), (0, 1), (1, 0), (2, 1)]
    assert stats["pairs"] == 4 and stats["inconsistent_pairs"] == 1


def test_k_way_ranking_row_is_all_its_ordered_pairs(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [
        {"prompt": "p", "responses": ["w", "x", "y", "z"], "ranks": [2, 0, 3, 1]},
        {"prompt": "q", "responses": ["a", "b", "c"], "ranks": [0, 1, 1]},  # tie: no pair between b and c
        {"prompt": "p", "responses": ["v", "x"], "ranks": [0, 1]}])  # "x" is the same response as above
    [p, q], stats = grouped("jsonl_rankings", path)
    assert p["responses"] == ["w", "x", "y", "z", "v"]
    pairs = sorted(zip(p["better"], p["worse"]))
    assert pairs == [(0, 2), (1, 0), (1, 2), (1, 3), (3, 0), (3, 2), (4, 1)]  # 6 pairs of the K = 4 row, then 1
    assert q == {"prompt": "q", "responses": ["a", "b", "c"], "ended": [True] * 3, "better": [0, 0],
                 "worse": [1, 2]}
    assert stats["pairs"] == 9 and stats["prompts"] == 2


def test_a_text_seen_cut_and_ended_is_two_responses_and_cut_ones_are_counted(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [
        {"prompt": "p", "responses": ["x", "y"], "ranks": [0, 1], "ended": [True, False]},
        {"prompt": "p", "responses": ["y", "x"], "ranks": [0, 1], "ended": [False, False]}])
    [group], stats = grouped("jsonl_rankings", path)
    assert list(zip(group["responses"], group["ended"])) == [("x", True), ("y", False), ("x", False)]
    assert list(zip(group["better"], group["worse"])) == [(0, 1), (1, 2)]
    assert stats["cut_responses"] == 2
