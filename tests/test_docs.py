"""Docs that cannot go stale: sample outputs in the plugin guide are the real outputs, and the README
and the pages in docs/ stay short, reachable and free of dead links."""

from __future__ import annotations

import re

import pytest

from conftest import ROOT, run_mot

GUIDE = ROOT / "docs" / "writing_a_plugin.md"


def _block_after(text: str, command: str) -> str:
    start = text.index(f"$ {command}\n") + len(f"$ {command}\n")
    return text[start : text.index("```", start)]


def test_the_guides_mot_plugins_listing_is_the_real_output(plugin_site, tmp_path):
    result = run_mot(plugin_site, tmp_path, "plugins")
    assert result.returncode == 0, result.stderr
    assert _block_after(GUIDE.read_text(), "mot plugins") == result.stdout


def test_config_show_prints_the_resolved_loss_evaluators_and_their_options(write_config, capsys):
    import yaml

    from mot_core.cli import main

    assert main(["config", "show", str(write_config())]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    text = shown["mixture"]["modalities"]["text"]
    assert text["loss"] == "autoregressive" and text["evaluators"] == ["text_lm"]
    assert text["evaluator_options"] == {"text_lm": {}}
    assert shown["mixture"]["weight_unit"] == "tokens"
    assert shown["launch"]["strategy"] == "fsdp2"


# The README and the guides in docs/: short enough to read, every page reachable, no dead links.

README = ROOT / "README.md"
DOC_PAGES = sorted((ROOT / "docs").glob("*.md"))
LINKED_FILES = [README, *DOC_PAGES]

_FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", re.M | re.S)
_CODE_SPAN = re.compile(r"(`+).+?\1", re.S)
_INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE_LINK = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$", re.M)
_HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$", re.M)


def _prose(text: str) -> str:
    """The text outside fenced code blocks and code spans: where links and headings live."""
    return _CODE_SPAN.sub("", _FENCE.sub("", text))


def _links(path) -> list[str]:
    prose = _prose(path.read_text())
    return _INLINE_LINK.findall(prose) + _REFERENCE_LINK.findall(prose)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lowercase, punctuation other than '-' and
    '_' removed, each space a '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text
    text = text.replace("`", "").lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path) -> set[str]:
    anchors: set[str] = set()
    counts: dict[str, int] = {}
    for match in _HEADING.finditer(_FENCE.sub("", path.read_text())):
        slug = _slug(match.group(2))
        n = counts.get(slug, 0)
        counts[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def _is_relative(target: str) -> bool:
    return not re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) and not target.startswith("#")


def test_the_readme_is_at_most_300_lines():
    lines = README.read_text().count("\n")
    assert lines <= 300, f"README.md has {lines} lines: move detail into a page under docs/"


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(README.parent / target.split("#")[0]).resolve() for target in _links(README) if _is_relative(target)}
    missing = [page.name for page in DOC_PAGES if page.resolve() not in linked]
    assert not missing, f"docs pages not linked from README.md: {missing}"


@pytest.mark.parametrize("page", LINKED_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    dead = []
    for target in _links(page):
        if not _is_relative(target):
            continue
        file_part, _, anchor = target.partition("#")
        path = (page.parent / file_part).resolve()
        if not path.exists():
            dead.append(f"{target} (no such path)")
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            dead.append(f"{target} (no heading makes #{anchor} in {path.name})")
    assert not dead, f"dead links in {page.relative_to(ROOT)}: {dead}"


@pytest.mark.parametrize("page", LINKED_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_anchor_within_a_page_names_one_of_its_headings(page):
    anchors = _anchors(page)
    dead = [t for t in _links(page) if t.startswith("#") and t[1:] not in anchors]
    assert not dead, f"anchors in {page.relative_to(ROOT)} that no heading there makes: {dead}"


def test_the_configuration_guides_key_reference_is_every_key_of_the_schema():
    """docs/configuration.md's table is `mot config keys --markdown` of the current schema:
    a key added, removed or redescribed fails here until the page is regenerated."""
    from mot_core.config import config_keys_markdown

    text = (ROOT / "docs" / "configuration.md").read_text()
    section = text[text.index("\n## Every key\n") :]
    begin, end = "<!-- keys:begin -->\n", "<!-- keys:end -->"
    table = section[section.index(begin) + len(begin) : section.index(end)]
    assert table == config_keys_markdown(), "regenerate it: mot config keys --markdown"


# Every Markdown table renders: its header is followed by a delimiter row (`|---|---|`) with as
# many cells as the header, and no row has more cells than the header (GitHub drops the extra
# ones). A block of `|` lines without a delimiter row renders as a paragraph of pipes.

_TABLE_LINE = re.compile(r"^ {0,3}\|")
_DELIMITER_CELL = re.compile(r"^\s*:?-+:?\s*$")


def _cells(line: str) -> list[str]:
    """A table row's cells as GitHub splits them: on every `|` not escaped by a backslash (code
    spans included), the outer pipes dropped."""
    row = line.strip()
    row = row[1:] if row.startswith("|") else row
    row = row[:-1] if row.endswith("|") and not row.endswith("\\|") else row
    return re.split(r"(?<!\\)\|", row)


def _tables(path) -> list[tuple[int, list[str]]]:
    """(first line number, lines) of each block of consecutive lines that start with `|`, outside
    fenced code blocks (blanked, so line numbers stay those of the file)."""
    text = _FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), path.read_text())
    tables: list[tuple[int, list[str]]] = []
    block: list[str] = []
    for number, line in enumerate([*text.split("\n"), ""], start=1):
        if _TABLE_LINE.match(line):
            block.append(line)
            continue
        if block:
            tables.append((number - len(block), block))
            block = []
    return tables


def _table_problems(path, root=ROOT) -> list[str]:
    problems = []
    for first, lines in _tables(path):
        where = f"{path.relative_to(root)}:{first}"
        header = _cells(lines[0])
        if len(lines) < 2 or not all(_DELIMITER_CELL.match(cell) for cell in _cells(lines[1])):
            problems.append(f"{where}: no |---| row under the header {lines[0].strip()[:60]!r}")
            continue
        if len(_cells(lines[1])) != len(header):
            problems.append(f"{where}: the |---| row has {len(_cells(lines[1]))} cells, the header {len(header)}")
        for offset, row in enumerate(lines[2:], start=2):
            if len(_cells(row)) > len(header):
                problems.append(f"{where}: row at line {first + offset} has {len(_cells(row))} cells, the header {len(header)}")
    return problems


def test_the_table_check_finds_a_table_without_a_delimiter_row(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("intro\n\n| a | b |\n| 1 | 2 |\n\n| a | b |\n|---|---|---|\n\n| a | b |\n|---|---|\n| 1 | 2 | 3 |\n\n"
                    "```\n| in a fence |\n```\n\n| ok | `x\\|y` |\n|:--|--:|\n| 1 | 2 |\n")
    problems = _table_problems(page, root=tmp_path)
    assert [p.split(": ", 1)[0] for p in problems] == ["page.md:3", "page.md:6", "page.md:9"], problems


@pytest.mark.parametrize("page", LINKED_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_markdown_table_has_a_delimiter_row_as_wide_as_its_header(page):
    problems = _table_problems(page)
    assert not problems, "tables that do not render:\n" + "\n".join(problems)
