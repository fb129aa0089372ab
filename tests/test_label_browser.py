"""The ranking page in a real headless Chromium (Debian's `chromium`, installed by tests/install_browser.sh): a
labeler ranks two prompts, one by dragging and one by keyboard, with a tie, a rating and a flag, then skips a
third; the database holds exactly those, and reloading the page resumes at the fourth prompt."""

from __future__ import annotations

import shutil
import signal

import httpx
import pytest

from rlhf_jax.label.store import Ranking, Store

from test_label_api import servers  # noqa: F401 - a fixture
from test_label_store import SOURCE, make_task

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in requirements-dev.txt")
expect = sync_api.expect
CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (tests/install_browser.sh "
                                                         "installs it)")


@pytest.fixture
def page(tmp_path, servers):
    make_task(tmp_path / "label.db", prompts=6, cut=(2,)).close()
    proc, url = servers(tmp_path, "--overlap", "0")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        page = browser.new_page()
        page.set_default_timeout(10_000)
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url + "/")
        yield page, tmp_path / "label.db"
        browser.close()
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    assert not errors


def card(page, response_id: int):
    return page.locator(f'.card[data-id="{response_id}"]')


def shown_order(page) -> list[list[int]]:
    return page.eval_on_selector_all(".level", "levels => levels.map(l => [...l.querySelectorAll('.card')]"
                                               ".map(c => Number(c.dataset.id)))")


def test_rank_by_dragging_and_by_keyboard_skip_then_reload_resumes(page):
    page, db = page
    page.fill("#name", "Ada")
    page.click("text=Start")
    expect(page.locator("#prompt")).to_have_text("prompt 0")
    assert SOURCE["policy"] not in page.content()  # people never see where a response came from
    expect(card(page, 2).locator(".cut")).to_have_text("[cut off at the length limit]")  # it ran to the limit
    assert card(page, 1).locator(".cut").count() == 0

    # prompt 0 (responses 0-3) with the mouse: D dragged to the top, C dropped onto B (a tie), A rated, D flagged
    card(page, 3).drag_to(page.locator('.gap[data-gap="0"]'))
    assert shown_order(page) == [[3], [0], [1], [2]]
    card(page, 2).drag_to(card(page, 1))
    assert shown_order(page) == [[3], [0], [1, 2]]
    card(page, 0).locator("select").select_option("6")
    card(page, 3).get_by_label("Makes up facts").check()
    page.click("#submit")
    expect(page.locator("#prompt")).to_have_text("prompt 1")

    # prompt 1 (responses 4-7) with the keyboard alone
    card(page, 5).focus()
    page.keyboard.press("ArrowUp")  # B above A
    assert shown_order(page) == [[5], [4], [6], [7]]
    card(page, 7).focus()
    page.keyboard.press("t")  # D tied with C
    page.keyboard.press("ArrowUp")  # D leaves the tie to a line of its own above C
    page.keyboard.press("t")  # D tied with A
    page.keyboard.press("u")  # untied: alone, below A
    page.keyboard.press("ArrowDown")  # below C
    page.keyboard.press("t")  # tied with C again
    assert shown_order(page) == [[5], [4], [6, 7]]
    assert page.locator("#status").inner_text() == "Response D is at place 3, tied"
    page.keyboard.press("2")  # D rated 2
    card(page, 4).focus()
    page.keyboard.press("Tab")  # into A's rating, then its first flag
    page.keyboard.press("Tab")
    page.keyboard.press("Space")  # A fails to follow the instruction
    expect(page.locator("#submit")).to_be_enabled()  # a moment after a prompt appears (see the double-click test)
    page.locator("#submit").focus()
    page.keyboard.press("Enter")
    expect(page.locator("#prompt")).to_have_text("prompt 2")

    page.click("#skip")
    expect(page.locator("#prompt")).to_have_text("prompt 3")
    assert page.locator("#progress-text").inner_text() == "2 / 6"

    task = Store(db)
    assert task.rankings() == [
        Ranking("Ada", 0, ((3,), (0,), (1, 2)), {0: 6}, {3: ("hallucination",)}, task.rankings()[0].seconds),
        Ranking("Ada", 1, ((5,), (4,), (6, 7)), {7: 2}, {4: ("fails_instruction",)}, task.rankings()[1].seconds)]
    assert all(r.seconds > 0 for r in task.rankings()) and task.skips() == {"Ada": 1}

    page.reload()  # the name is remembered and the labeler resumes at the fourth prompt
    expect(page.locator("#prompt")).to_have_text("prompt 3")
    assert page.input_value("#name") == "Ada" and len(task.rankings()) == 2 and task.skips() == {"Ada": 1}

    # a ranking the server refuses with 409 (its prompt ranked by another labeler, or labeling finished): the page
    # says why and asks for the next prompt (here the server never saw it, so the same one comes back)
    refusal = "prompt_id: prompt 3 is ranked by another labeler (it is not shared)"
    page.route("**/api/rankings", lambda route: route.fulfill(status=409, content_type="application/json",
                                                               body='{"error": "%s"}' % refusal))
    page.click("#submit")
    expect(page.locator("#status")).to_have_text(f"Not saved: {refusal}")
    expect(page.locator("#prompt")).to_have_text("prompt 3")
    assert len(task.rankings()) == 2


def test_a_double_click_ranks_only_the_prompt_the_labeler_saw(page):
    """The second click of a double-click on Submit or Skip (here 150 ms after the first, when the next prompt is
    already shown) must not store that prompt, unseen, in its shuffled order, nor skip it."""
    page, db = page
    page.fill("#name", "Ada")
    page.click("text=Start")
    expect(page.locator("#prompt")).to_have_text("prompt 0")
    card(page, 2).focus()
    page.keyboard.press("ArrowUp")
    for button in ("#submit", "#skip"):
        expect(page.locator(button)).to_be_enabled()
        page.locator(button).scroll_into_view_if_needed()
        box = page.locator(button).bounding_box()
        x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
        page.mouse.click(x, y)
        page.wait_for_timeout(150)
        page.mouse.click(x, y)
    expect(page.locator("#prompt")).to_have_text("prompt 2")
    page.wait_for_timeout(500)
    task = Store(db)
    assert [(r.prompt_id, r.levels) for r in task.rankings()] == [(0, ((0,), (2,), (1,), (3,)))]
    assert task.skips() == {"Ada": 1}
    expect(page.locator("#prompt")).to_have_text("prompt 2")


def test_the_page_says_why_no_prompt_is_shown_and_asks_again_while_others_hold_them(page):
    """Six labelers hold the six prompts (unshared): the page says so and asks again every 30 s, so a prompt let go
    meanwhile reaches it; a ranking the server never answers stays on the page, not saved, to send again."""
    page, db = page
    page.clock.install()
    url = page.url.rstrip("/")
    assert [httpx.get(f"{url}/api/next", params={"labeler": f"h{i}"}).json()["prompt_id"] for i in range(6)] == \
        list(range(6))
    page.fill("#name", "Ada")
    page.click("text=Start")
    expect(page.locator("#finished")).to_have_text("The prompts left are being ranked by other labelers. This page "
                                                   "asks again every 30 seconds.")
    assert httpx.post(f"{url}/api/skip", json={"labeler": "h4", "prompt_id": 4}).json()["skipped"]
    page.clock.run_for(29_000)
    expect(page.locator("#finished")).to_be_visible()
    page.clock.run_for(1_000)
    expect(page.locator("#prompt")).to_have_text("prompt 4")

    page.route("**/api/rankings", lambda route: route.abort())  # the server stopped, or the network is down
    page.click("#submit")
    expect(page.locator("#status")).to_have_text("Not saved: the labeling server cannot be reached (it stops once "
                                                 "labeling is finished)")
    expect(page.locator("#prompt")).to_have_text("prompt 4")
    assert Store(db).rankings() == []
