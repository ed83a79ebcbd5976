"""README stays the user's path; docs/reference.md is what the commands' --help prints; no link is dead."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))


def test_readme_is_short_and_starts_with_the_two_commands():
    text = README.read_text()
    assert len(text.splitlines()) <= 250, "README.md is the user's path; the detail goes to docs/USAGE.md"
    first = re.search(r"^```[^\n]*\n(.*?)^```", text, re.S | re.M)
    assert first, "README.md has no code block"
    lines = first.group(1).splitlines()
    assert len(lines) == 2 and lines[0].startswith("make demo") and lines[1].startswith("make test"), lines


def test_reference_is_what_the_commands_print():
    page = (ROOT / "docs" / "reference.md").read_text()
    made_with = re.search(r"\(Python (\d+\.\d+),", page)
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    if made_with and made_with.group(1) != here:
        pytest.skip(
            f"docs/reference.md was made with Python {made_with.group(1)}; argparse's layout differs by version"
        )
    done = subprocess.run(
        [sys.executable, str(ROOT / "docs" / "reference.py"), "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup and punctuation dropped, lower case, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
    return {slug(m) for m in re.findall(r"^#+ (.+)$", text, re.M)}


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    dead = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        if not path.exists():
            dead.append(target)
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            dead.append(target)
    assert not dead, f"{page.relative_to(ROOT)}: dead links {dead}"
