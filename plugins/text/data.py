"""Real text offline: the Wikipedia articles shipped with gensim, or the user's own files.

The held-out split is chosen by a hash of each document's name, so it does not move when
documents are added or the loader's order changes.
"""

from __future__ import annotations

import bz2
import functools
import glob
import re
import zlib
from pathlib import Path

from pydantic import Field

from mot_core.errors import MotError
from mot_core.plugin_api import DataSource, PluginOptions, RawDocument, RawSegment, Split

GENSIM_WIKI = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def in_val_split(name: str, val_fraction: float) -> bool:
    return zlib.crc32(name.encode("utf-8")) % 10_000 < val_fraction * 10_000


def _check_split(docs: list[RawDocument], split: Split, source: str) -> list[RawDocument]:
    if not docs:
        raise MotError(f"dataset '{source}' has no documents in its '{split}' split")
    return docs


class WikipediaOptions(PluginOptions):
    path: str | None = Field(None, description="a MediaWiki XML(.bz2) dump; default: gensim's 206 articles")
    val_fraction: float = Field(0.05, gt=0, lt=1)
    min_chars: int = Field(500, ge=0, description="skip redirects and stubs shorter than this")


class Wikipedia(DataSource):
    """Wikipedia articles (title + cleaned body), one document per article."""

    name = "wikipedia"
    Options = WikipediaOptions
    modalities = ("text",)

    def documents(self, split: Split) -> list[RawDocument]:
        opts: WikipediaOptions = self.options
        articles = _load_wikipedia(opts.path, opts.min_chars)
        docs = [
            RawDocument((RawSegment("text", f"{title}\n\n{body}"),))
            for title, body in articles
            if in_val_split(title, opts.val_fraction) == (split == "val")
        ]
        return _check_split(docs, split, self.name)


@functools.lru_cache(maxsize=4)
def _load_wikipedia(path: str | None, min_chars: int) -> tuple[tuple[str, str], ...]:
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    if path is None:
        from gensim.test.utils import datapath

        path = datapath(GENSIM_WIKI)
    file = Path(path)
    if not file.is_file():
        raise MotError(f"wikipedia dump not found: {file}")
    opener = bz2.open if file.suffix == ".bz2" else open
    articles = []
    try:
        with opener(file, "rb") as handle:
            for title, markup, *_ in extract_pages(handle):
                body = _clean(filter_wiki(markup))
                if not body.upper().startswith("#REDIRECT") and len(body) >= min_chars:
                    articles.append((title, body))
    except (OSError, EOFError, SyntaxError) as exc:  # SyntaxError: ElementTree's ParseError
        raise MotError(f"cannot read wikipedia dump {file}: {exc}") from None
    return tuple(articles)


def _clean(text: str) -> str:
    # filter_wiki leaves image captions as "thumb|...", empty bullet lines and runs of blanks.
    text = re.sub(r"^(thumb|left|right|upright)\|.*$", "", text, flags=re.MULTILINE)
    text = re.sub(r"[ \t]+\n", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


class TextFilesOptions(PluginOptions):
    paths: list[str] = Field(min_length=1, description="files or glob patterns; one document per file")
    val_fraction: float = Field(0.05, gt=0, lt=1)


class TextFiles(DataSource):
    """Plain UTF-8 text files, one document each."""

    name = "text_files"
    Options = TextFilesOptions
    modalities = ("text",)

    def documents(self, split: Split) -> list[RawDocument]:
        opts: TextFilesOptions = self.options
        files: list[Path] = []
        for pattern in opts.paths:
            matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
            if not matches or not all(Path(m).is_file() for m in matches):
                raise MotError(f"dataset 'text_files': no file found at '{pattern}'")
            files.extend(Path(m) for m in matches)
        docs = []
        for file in files:
            # By file name, not path: the split must not change when the corpus moves.
            if in_val_split(file.name, opts.val_fraction) != (split == "val"):
                continue
            try:
                text = file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise MotError(f"dataset 'text_files': cannot read {file}: {exc}") from None
            if text.strip():
                docs.append(RawDocument((RawSegment("text", text),)))
        return _check_split(docs, split, self.name)
