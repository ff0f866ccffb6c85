"""Every relative link in README, docs/ and the analysis results points at a file that exists, and
every ``#fragment`` at a heading of that file, with GitHub's anchor rules: README moves its
reasoning into docs/ often, and a dead link there is what a reader meets first."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_FENCE = re.compile(r"^```.*?^```", re.S | re.M)
_LINK = re.compile(r"\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation but '-' and '_' dropped, spaces '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of a markdown file's headings (outside code fences); repeats get -1, -2, …"""
    seen: dict[str, int] = {}
    for line in _FENCE.sub("", path.read_text(encoding="utf-8")).splitlines():
        m = re.match(r"#+\s+(.*)", line)
        if m:
            s = slug(m.group(1))
            seen[s] = seen.get(s, -1) + 1
            if seen[s]:
                seen[f"{s}-{seen[s]}"] = 0
    return set(seen)


def dead_links(md: Path) -> list[str]:
    out = []
    for link in _LINK.findall(_FENCE.sub("", md.read_text(encoding="utf-8"))):
        if re.match(r"[a-z][a-z0-9+.-]*:", link):   # http:, https:, mailto:
            continue
        path, _, fragment = link.partition("#")
        target = (md.parent / path) if path else md
        if not target.exists():
            out.append(f"{link} (no such file)")
        elif fragment and target.suffix == ".md" and fragment not in anchors(target):
            out.append(f"{link} (no such heading)")
    return out


def documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
            *sorted((ROOT / "analysis" / "results").rglob("*.md"))]


def test_every_relative_link_resolves():
    dead = {str(md.relative_to(ROOT)): d for md in documents() if (d := dead_links(md))}
    assert dead == {}


def test_the_checker_finds_a_dead_file_and_a_dead_heading(tmp_path):
    (tmp_path / "other.md").write_text("# How a study runs\n\n## Why 20 (not 16)?\n")
    doc = tmp_path / "doc.md"
    doc.write_text("[a](other.md#how-a-study-runs) [b](other.md#why-20-not-16) "
                   "[c](missing.md) [d](other.md#how-a-run-runs) [e](https://x.org/#y)\n"
                   "```\n[f](in-a-fence.md)\n```\n")
    assert dead_links(doc) == ["missing.md (no such file)",
                               "other.md#how-a-run-runs (no such heading)"]


def test_repeated_headings_get_numbered_anchors(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("## Notes\n\n## Notes\n\n### FreeU's b1, b2\n")
    assert anchors(doc) == {"notes", "notes-1", "freeus-b1-b2"}
