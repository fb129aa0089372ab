"""The documentation stays true: the configuration reference is the one generated from the config schema, every
config key it names exists, every relative link in the README and docs/ leads to a file, and the README stays a
front door of at most 200 lines."""

from __future__ import annotations

import re
from pathlib import Path

from rlhf_jax import config_reference
from rlhf_jax.config import Config
from rlhf_jax.typed_yaml import _all_keys

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
# [text](target) and ![alt](target); the target ends at whitespace (a title may follow) or the closing paren.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE = re.compile(r"```.*?```|`[^`\n]*`", re.S)


def test_configuration_reference_is_generated_from_the_schema():
    path = REPO / "docs" / "configuration.md"
    assert path.read_text() == config_reference.markdown(), (
        f"docs/configuration.md differs from the config schema; regenerate it: {config_reference.REGENERATE}")


def _links(text: str) -> list[str]:
    return LINK.findall(CODE.sub("", text))


def test_link_pattern_finds_links_and_skips_code():
    text = "see [a](docs/a.md#x) and ![img](b.png \"t\"), not `[c](c.md)`\n```\n[d](d.md)\n```\n"
    assert _links(text) == ["docs/a.md#x", "b.png"]


def test_every_relative_link_points_to_an_existing_file():
    missing = []
    for page in PAGES:
        for target in _links(page.read_text()):
            if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue  # a URL (https:, mailto:) or an anchor in the same page
            path = (page.parent / target.split("#", 1)[0]).resolve()
            if not path.exists():
                missing.append(f"{page.relative_to(REPO)}: {target}")
    assert not missing, "links to files that do not exist:\n" + "\n".join(missing)


# `section.key`, `section.key: value` or `section.key=value` in running text
DOTTED = re.compile(r"`([a-z_]+(?:\.[a-z0-9_]+)+)(?:[:=][^`]*)?`")
FILE_NAME = re.compile(r"\.(py|md|json|jsonl|yaml|db|txt|sh|png|safetensors)$")


def test_every_config_key_the_docs_name_exists():
    """Users copy keys from the docs into configs and overrides: a renamed or removed key must not live on there.
    Code is named by its package path (`rl.ppo.rollout`), which starts with no section's name."""
    keys = set(_all_keys(Config))
    sections = {k for k in keys if "." not in k}
    unknown = [f"{page.relative_to(REPO)}: {key}" for page in PAGES for key in DOTTED.findall(page.read_text())
               if key.split(".")[0] in sections and key not in keys and not FILE_NAME.search(key)]
    assert not unknown, "config keys that do not exist:\n" + "\n".join(unknown)


def test_readme_is_at_most_200_lines():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; move detail to docs/ (at most 200)"
