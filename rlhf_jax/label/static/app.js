// The ranking page: one prompt at a time from GET /api/next, its responses ordered into levels (best first; a
// level with several responses is a tie) by drag and drop or the keyboard, rated 1-7 and flagged, then sent to
// POST /api/rankings (or POST /api/skip). Texts are shown with textContent only: responses are model output.
"use strict";

const FLAGS = [["fails_instruction", "Fails to follow the instruction"], ["hallucination", "Makes up facts"],
               ["harmful", "Harmful"], ["other", "Other problem"]];
const NAME_KEY = "rlhf_jax.label.name";

const state = {labeler: "", task: null, levels: [], ratings: {}, flags: {}, letters: {}, shownAt: 0, recheck: 0};
// What the page says when GET /api/next has no prompt for the labeler, by its `reason`.
const NOTHING_LEFT = {
  finished: "Labeling is finished. Thank you!",
  held: "The prompts left are being ranked by other labelers. This page asks again every 30 seconds.",
  answered: "Nothing is left for you to rank. Thank you!",
};
const RECHECK_MS = 30000;
// a response that ran to the sampler's length limit: judged as written, knowing its end is missing
const CUT_NOTE = "[cut off at the length limit]";
const $ = (id) => document.getElementById(id);

function el(tag, props = {}, children = []) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "text") node.textContent = value;
    else if (key.startsWith("data-") || key.startsWith("aria-") || key === "role") node.setAttribute(key, value);
    else node[key] = value;
  }
  for (const child of children) node.append(child);
  return node;
}

async function api(path, body) {
  let response;
  try {
    response = await fetch(path, body === undefined ? {} : {
      method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
  } catch {  // no answer at all: the server stopped (it does once labeling is finished) or the network is down
    throw new Error("the labeling server cannot be reached (it stops once labeling is finished)");
  }
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = new Error(data.error || `the server answered ${response.status}`);
    error.status = response.status;
    throw error;
  }
  return data;
}

function say(message, isError = false) {
  const status = $("status");
  status.textContent = message;
  status.classList.toggle("error", isError);
}

function showProgress(done, target) {
  $("progress").max = Math.max(target, 1);
  $("progress").value = Math.min(done, target);
  $("progress-text").textContent = `${done} / ${target}`;
}

async function loadNext() {
  clearTimeout(state.recheck);
  const data = await api(`/api/next?labeler=${encodeURIComponent(state.labeler)}`);
  showProgress(data.done, data.target);
  if (data.prompt_id === null) {
    state.task = null;
    $("task").hidden = true;
    $("finished").textContent = NOTHING_LEFT[data.reason] || NOTHING_LEFT.answered;
    $("finished").hidden = false;
    if (data.reason === "held") state.recheck = setTimeout(guarded(loadNext), RECHECK_MS);
    return;
  }
  state.task = data;
  state.levels = data.responses.map((r) => [r.id]);
  state.ratings = {};
  state.flags = {};
  state.letters = Object.fromEntries(data.responses.map((r, i) => [r.id, String.fromCharCode(65 + i)]));
  $("prompt").textContent = data.prompt;
  $("finished").hidden = true;
  $("task").hidden = false;
  render();
  state.shownAt = performance.now();
}

function render(focusId) {
  const list = $("levels");
  list.replaceChildren();
  list.append(gap(0));
  state.levels.forEach((level, i) => {
    const row = el("div", {className: "level", role: "listitem", "data-level": i,
                           "aria-label": `Place ${i + 1}${level.length > 1 ? " (tied)" : ""}`},
                   [el("span", {className: "place", text: `${i + 1}`, "aria-hidden": "true"})]);
    level.forEach((id) => row.append(card(id, i, level.length > 1)));
    dropTarget(row, (id) => move(id, {tieWith: i}));
    list.append(row, gap(i + 1));
  });
  if (focusId !== undefined) list.querySelector(`.card[data-id="${focusId}"]`).focus();
}

function gap(index) {
  const node = el("div", {className: "gap", "aria-hidden": "true", "data-gap": index});
  dropTarget(node, (id) => move(id, {insertAt: index}));
  return node;
}

function dropTarget(node, drop) {
  node.addEventListener("dragover", (event) => { event.preventDefault(); node.classList.add("over"); });
  node.addEventListener("dragleave", () => node.classList.remove("over"));
  node.addEventListener("drop", (event) => {
    event.preventDefault();
    event.stopPropagation();
    node.classList.remove("over");
    const id = Number(event.dataTransfer.getData("text/plain"));
    if (Number.isInteger(id) && state.letters[id]) drop(id);
  });
}

function card(id, levelIndex, tied) {
  const letter = state.letters[id], response = state.task.responses.find((r) => r.id === id);
  const rating = el("select", {"aria-label": `Rating of response ${letter}`, "data-rating": id},
                    [el("option", {value: "", text: "rate 1-7"}),
                     ...[1, 2, 3, 4, 5, 6, 7].map((n) => el("option", {value: String(n), text: String(n)}))]);
  rating.value = state.ratings[id] ? String(state.ratings[id]) : "";
  rating.addEventListener("change", () => setRating(id, rating.value ? Number(rating.value) : null));
  const flags = el("fieldset", {className: "flags"}, [el("legend", {text: "Flags"})]);
  for (const [flag, label] of FLAGS) {
    const box = el("input", {type: "checkbox", value: flag, checked: (state.flags[id] || []).includes(flag),
                             "data-flag": flag});
    box.addEventListener("change", () => setFlag(id, flag, box.checked));
    flags.append(el("label", {}, [box, ` ${label}`]));
  }
  const node = el("article", {className: "card", tabIndex: 0, draggable: true, "data-id": id,
                              "aria-label": `Response ${letter}, place ${levelIndex + 1}${tied ? ", tied" : ""}`},
                  [el("h3", {text: `Response ${letter}`}), el("div", {className: "text", text: response.text}),
                   ...(response.ended ? [] : [el("p", {className: "cut", text: CUT_NOTE})]),
                   el("div", {className: "controls"}, [el("label", {}, ["Rating ", rating]), flags])]);
  node.addEventListener("dragstart", (event) => {
    event.dataTransfer.setData("text/plain", String(id));
    event.dataTransfer.effectAllowed = "move";
  });
  node.addEventListener("keydown", (event) => onKey(event, id));
  return node;
}

function setRating(id, value) {
  if (value === null) delete state.ratings[id];
  else state.ratings[id] = value;
}

function setFlag(id, flag, on) {
  const flags = new Set(state.flags[id] || []);
  if (on) flags.add(flag); else flags.delete(flag);
  state.flags[id] = [...flags];
}

function levelOf(id) {
  return state.levels.findIndex((level) => level.includes(id));
}

// Moves the response `id` into level `tieWith`, or onto a new level inserted before index `insertAt`.
function move(id, {tieWith, insertAt}) {
  const from = levelOf(id);
  const target = tieWith !== undefined ? state.levels[tieWith] : null;
  if (target && target.includes(id)) return;
  state.levels[from] = state.levels[from].filter((x) => x !== id);
  if (target) target.push(id);
  else state.levels.splice(insertAt, 0, [id]);
  state.levels = state.levels.filter((level) => level.length);
  render(id);
  const place = levelOf(id);
  say(`Response ${state.letters[id]} is at place ${place + 1}` +
      (state.levels[place].length > 1 ? ", tied" : ""));
}

function onKey(event, id) {
  if (event.target !== event.currentTarget) return;  // a key in its rating or flags is theirs
  const i = levelOf(id);
  const alone = state.levels[i].length === 1;
  if (event.key === "ArrowUp") {
    if (!alone) move(id, {insertAt: i});
    else if (i > 0) move(id, {insertAt: i - 1});
  } else if (event.key === "ArrowDown") {
    if (!alone) move(id, {insertAt: i + 1});
    else if (i < state.levels.length - 1) move(id, {insertAt: i + 2});
  } else if (event.key === "t" || event.key === "T") {
    if (i > 0) move(id, {tieWith: i - 1});
  } else if (event.key === "u" || event.key === "U") {
    if (!alone) move(id, {insertAt: i + 1});
  } else if (/^[1-7]$/.test(event.key)) {
    setRating(id, Number(event.key));
    event.currentTarget.querySelector("select").value = event.key;
    say(`Response ${state.letters[id]} rated ${event.key}`);
  } else {
    return;
  }
  event.preventDefault();
}

async function submit() {
  const task = state.task;
  const flags = Object.fromEntries(Object.entries(state.flags).filter(([, f]) => f.length));
  try {
    const data = await api("/api/rankings", {labeler: state.labeler, prompt_id: task.prompt_id, order: state.levels,
                                             ratings: state.ratings, flags,
                                             seconds: (performance.now() - state.shownAt) / 1000});
    showProgress(data.done, data.target);
    say("Saved.");
  } catch (error) {
    say(`Not saved: ${error.message}`, true);
    // a prompt taken by another labeler, or labeling finished: move on; otherwise the ranking stays to send again
    if (error.status !== 409) return;
  }
  await loadNext();
}

async function skip() {
  await api("/api/skip", {labeler: state.labeler, prompt_id: state.task.prompt_id});
  say("Skipped.");
  await loadNext();
}

// Submit and Skip answer one click per prompt: off while a request runs and for ARM_MS after it, so the second
// click of a double-click cannot rank or skip the next prompt, which the labeler has not seen yet.
const ARM_MS = 600;

function setButtons(enabled) {
  $("submit").disabled = !enabled;
  $("skip").disabled = !enabled;
}

function once(action) {
  return guarded(async () => {
    setButtons(false);
    try {
      await action();
    } finally {
      setTimeout(() => setButtons(true), ARM_MS);
    }
  });
}

function guarded(action) {
  return async () => {
    try {
      await action();
    } catch (error) {
      say(error.message, true);
    }
  };
}

async function start(name) {
  state.labeler = name.trim();
  localStorage.setItem(NAME_KEY, state.labeler);
  say(`Ranking as ${state.labeler}.`);
  await loadNext();
}

document.addEventListener("DOMContentLoaded", () => {
  if (new URLSearchParams(location.search).has("token")) {
    history.replaceState(null, "", location.pathname);  // the server set a cookie with it
  }
  $("who").addEventListener("submit", (event) => {
    event.preventDefault();
    guarded(() => start($("name").value))();
  });
  $("submit").addEventListener("click", once(submit));
  $("skip").addEventListener("click", once(skip));
  const saved = localStorage.getItem(NAME_KEY);
  if (saved) {
    $("name").value = saved;
    guarded(() => start(saved))();
  }
});
