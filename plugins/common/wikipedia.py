"""Wikipedia articles offline: a MediaWiki XML(.bz2) dump parsed into (title, cleaned body)
pairs, by default the small dump shipped with gensim (206 articles). Read by the text plugin's
``wikipedia`` dataset and by the speech plugin, which synthesises sentences of the articles.
"""

from __future__ import annotations

import bz2
import functools
import re
from pathlib import Path
from typing import Iterator

from mot_core.errors import MotError

GENSIM_WIKI = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def wikipedia_dump_path(path: str | None) -> Path:
    """The dump at ``path``, or gensim's small default one when ``path`` is None."""
    if path is None:
        from gensim.test.utils import datapath

        path = datapath(GENSIM_WIKI)
    return Path(path)


@functools.lru_cache(maxsize=4)
def load_wikipedia(path: str | None, min_chars: int) -> tuple[tuple[str, str], ...]:
    """Every article of a dump, parsed once per process and kept: for gensim's small default
    dump (``path`` None). A dump of one's own is read with ``iter_wikipedia``, lazily."""
    file = wikipedia_dump_path(path)
    if not file.is_file():
        raise MotError(f"wikipedia dump not found: {file}")
    return tuple(iter_wikipedia(file, min_chars))


def iter_wikipedia(file: Path, min_chars: int, wanted=None) -> Iterator[tuple[str, str]]:
    """(title, cleaned body) of each article of a dump, in order, parsed as they are taken;
    ``wanted(title)`` False skips an article without cleaning its markup."""
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    opener = bz2.open if file.suffix == ".bz2" else open
    try:
        with opener(file, "rb") as handle:
            for title, markup, *_ in extract_pages(handle):
                if wanted is not None and not wanted(title):
                    continue
                body = _clean(filter_wiki(markup))
                if not body.upper().startswith("#REDIRECT") and len(body) >= min_chars:
                    yield title, body
    except (OSError, EOFError, SyntaxError) as exc:  # SyntaxError: ElementTree's ParseError
        raise MotError(f"cannot read wikipedia dump {file}: {exc}") from None


def _clean(text: str) -> str:
    # filter_wiki leaves image captions as "thumb|...", empty bullet lines and runs of blanks.
    text = re.sub(r"^(thumb|left|right|upright)\|.*$", "", text, flags=re.MULTILINE)
    text = re.sub(r"[ \t]+\n", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()
