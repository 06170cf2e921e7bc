"""The Markdown docs: every relative link resolves inside the repository (files, and `#anchors`
to a heading of the target, GitHub-style), the README stays short, and LICENSE is Apache-2.0."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 300
# Generated reports committed without their plots (never in git): the only links allowed to dangle.
MISSING_PLOTS = {
    **{f"docs/bench-threads/threads{n}/bench.md": {"latency_per_graph.png", "decode_tok_s.png"} for n in (1, 2)},
    **{f"docs/validate-tiny-v10/{run}/report.md": {"end_to_end.png"}
       for run in ("ptq-w4", "ptq-w8a8", "qat-w4", "qat-w8a8")},
}

FENCE = re.compile(r"^(```|~~~)")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def doc_files() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", ROOT / "CHANGELOG.md"]
    return files + sorted((ROOT / "docs").rglob("*.md"))


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    out, fenced = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line.lstrip()):
            fenced = not fenced
            continue
        if not fenced:
            out.append((number, line))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its rendered text, lower-cased, punctuation dropped, spaces
    to hyphens (duplicates get -1, -2, ... in `anchors`)."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links and images: their text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(path: Path) -> list[tuple[int, str]]:
    found = []
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        for m in LINK.finditer(INLINE_CODE.sub("", line)):
            found.append((number, m.group(1)))
    return found


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    problems = []
    for number, target in links(path):
        if SCHEME.match(target):  # http(s), mailto: not checked here
            continue
        where = f"{path.relative_to(root)}:{number}: {target}"
        file_part, _, anchor = target.partition("#")
        file_part = unquote(file_part)
        if not file_part:
            dest = path
        else:
            dest = ((root / file_part.lstrip("/")) if file_part.startswith("/") else (path.parent / file_part)).resolve()
        if root != dest and root not in dest.parents:
            problems.append(f"{where} (points outside the repository)")
            continue
        if not dest.exists() and target not in MISSING_PLOTS.get(str(path.relative_to(root)), ()):
            problems.append(f"{where} (no such file)")
            continue
        if anchor and dest.is_file() and dest.suffix == ".md" and unquote(anchor).lower() not in anchors(dest):
            problems.append(f"{where} (no heading #{anchor} in {dest.relative_to(root)})")
    return problems


def test_the_slugs_follow_github():
    assert slug("Report schema `manzano-edge/validate@2` (`report.json`)") == "report-schema-manzano-edgevalidate2-reportjson"
    assert slug("The paper-sized preset (`manzano-300m`, random weights): cost on 2 cores / 24 GiB") == \
        "the-paper-sized-preset-manzano-300m-random-weights-cost-on-2-cores--24-gib"
    assert slug("Measured: the embedded tiny model, `--recipe fp32` (Core ML computing in fp16)") == \
        "measured-the-embedded-tiny-model---recipe-fp32-core-ml-computing-in-fp16"
    assert slug("What changed in v16") == "what-changed-in-v16"


def test_the_link_checker_catches_what_it_should(tmp_path):
    root = tmp_path / "repo"
    (root / "docs").mkdir(parents=True)
    (tmp_path / "shared.md").write_text("# Outside\n")
    (root / "docs" / "other.md").write_text("# Other `x` (y)\n\n## Twice\n\n## Twice\n")
    doc = root / "docs" / "probe.md"
    doc.write_text("# Title\n\n[ok](#title) [bad](#nope) [gone](missing.md) [out](../../shared.md)\n"
                   "[there](other.md#other-x-y) [second](other.md#twice-1) [not there](other.md#twice-2)\n"
                   "```\n[in code](missing-too.md)\n```\n`[inline](missing-three.md)` [web](https://example.com)\n"
                   "[dir](../docs/) ![img](other.md)\n")
    problems = broken_links(doc, root)
    assert len(problems) == 4, problems
    assert any("#nope" in p for p in problems) and any("missing.md" in p for p in problems)
    assert any("outside the repository" in p for p in problems) and any("#twice-2" in p for p in problems)


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(path):
    assert path.is_file(), f"{path.relative_to(ROOT)} is missing"
    assert broken_links(path) == []


def test_the_readme_is_short_and_has_a_table_of_contents():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) < README_MAX_LINES
    assert "## Contents" in text
    own = anchors(ROOT / "README.md")
    toc = [t for _, t in links(ROOT / "README.md") if t.startswith("#")]
    assert len(toc) >= 8 and all(t[1:] in own for t in toc)


def test_the_license_is_the_apache_2_0_text():
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    lines = [line.strip() for line in text.strip().splitlines()]
    assert lines[:2] == ["Apache License", "Version 2.0, January 2004"]
    for section in ("1. Definitions.", "2. Grant of Copyright License.", "3. Grant of Patent License.",
                    "4. Redistribution.", "5. Submission of Contributions.", "6. Trademarks.",
                    "7. Disclaimer of Warranty.", "8. Limitation of Liability.",
                    "9. Accepting Warranty or Additional Liability."):
        assert any(line.startswith(section) for line in lines), section
    assert "END OF TERMS AND CONDITIONS" in lines
    assert "APPENDIX: How to apply the Apache License to your work." in lines
    assert text.rstrip().endswith("limitations under the License.")
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert 'license = { text = "Apache-2.0" }' in pyproject
