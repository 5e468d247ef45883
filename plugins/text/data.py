"""Real text offline: the Wikipedia articles shipped with gensim, or the user's own files.

The held-out split is chosen by a hash of each document's name (an article's title, a file's
name, or ``<file name>#<index>`` for the pieces of a file cut by ``split_documents``), so it
does not move when documents are added, the corpus moves, or the loader's order changes.
"""

from __future__ import annotations

import bz2
import functools
import glob
import re
import zlib
from pathlib import Path
from typing import Literal

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
    split_documents: Literal["article", "paragraphs"] = Field(
        "article",
        description="article: one document per article; paragraphs: blocks of paragraphs of at least "
        "min_paragraph_chars (each starting with its article's title), so a mixture interleaves them with "
        "other sources instead of one article filling many batches",
    )
    min_paragraph_chars: int = Field(500, ge=1, description="paragraphs: consecutive paragraphs are joined up to this")


class Wikipedia(DataSource):
    """Wikipedia articles (title + cleaned body), one document per article or per block of
    paragraphs. The train/val split is by article, whatever the documents."""

    name = "wikipedia"
    Options = WikipediaOptions
    modalities = ("text",)

    def documents(self, split: Split) -> list[RawDocument]:
        opts: WikipediaOptions = self.options
        articles = _load_wikipedia(opts.path, opts.min_chars)
        docs = []
        for title, body in articles:
            if in_val_split(title, opts.val_fraction) != (split == "val"):
                continue
            if opts.split_documents == "article":
                docs.append(RawDocument((RawSegment("text", f"{title}\n\n{body}"),)))
            else:
                docs += [RawDocument((RawSegment("text", f"{title}\n\n{block}"),))
                         for block in paragraph_documents(body, opts.min_paragraph_chars)]
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
    paths: list[str] = Field(min_length=1, description="files or glob patterns")
    val_fraction: float = Field(0.05, gt=0, lt=1)
    split_documents: Literal["file", "paragraphs", "chunks"] = Field(
        "file",
        description="file: one document per file; paragraphs: blocks separated by blank lines, short ones "
        "merged up to min_paragraph_chars; chunks: pieces of about chunk_chars characters",
    )
    min_paragraph_chars: int = Field(
        500, ge=1, description="paragraphs: consecutive paragraphs are joined until a document has this many characters"
    )
    chunk_chars: int = Field(2000, ge=1, description="chunks: the most characters per document (cut at a line break or space)")


class TextFiles(DataSource):
    """Plain UTF-8 text files: one document each, or cut into paragraphs or chunks."""

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
        docs, total, empty = [], 0, 0
        for file in files:
            if opts.split_documents == "file":
                # By file name, not path: the split must not change when the corpus moves.
                total += 1
                if in_val_split(file.name, opts.val_fraction) != (split == "val"):
                    continue
                text = _read(file)
                if text.strip():
                    docs.append(RawDocument((RawSegment("text", text),)))
                else:
                    empty += 1
                continue
            text = _read(file)
            pieces = (
                paragraph_documents(text, opts.min_paragraph_chars)
                if opts.split_documents == "paragraphs"
                else chunk_documents(text, opts.chunk_chars)
            )
            total += len(pieces)
            for index, piece in enumerate(pieces):
                if in_val_split(f"{file.name}#{index}", opts.val_fraction) == (split == "val"):
                    docs.append(RawDocument((RawSegment("text", piece),)))
        if docs:
            return docs
        if opts.split_documents == "file":
            if len(files) == 1:
                raise MotError(
                    f"dataset 'text_files' has no documents in its '{split}' split: its only file, {files[0]}, is one "
                    "document with split_documents: file; set split_documents: paragraphs (or chunks) to cut it into many"
                )
            raise MotError(
                f"dataset 'text_files' has no documents in its '{split}' split ({len(files)} files, one document each"
                f"{f', {empty} of them empty' if empty else ''}, val_fraction {opts.val_fraction}); add files, {'raise' if split == 'val' else 'lower'} val_fraction, "
                "or set split_documents: paragraphs"
            )
        size = "min_paragraph_chars" if opts.split_documents == "paragraphs" else "chunk_chars"
        raise MotError(
            f"dataset 'text_files' has no documents in its '{split}' split ({_count(total, 'document')} from "
            f"{_count(len(files), 'file')} "
            f"with split_documents: {opts.split_documents}, val_fraction {opts.val_fraction}); add text, lower {size} "
            f"or {'raise' if split == 'val' else 'lower'} val_fraction"
        )


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _read(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise MotError(f"dataset 'text_files': cannot read {file}: {' '.join(str(exc).split())}") from None


def paragraph_documents(text: str, min_chars: int) -> list[str]:
    """Blocks separated by blank lines, consecutive ones joined (by a blank line) until each
    document has at least ``min_chars`` characters; a short remainder joins the last document."""
    paragraphs = [p.strip() for p in re.split(r"\n[ \t]*\n", text) if p.strip()]
    docs: list[str] = []
    current: list[str] = []
    length = 0
    for paragraph in paragraphs:
        current.append(paragraph)
        length += len(paragraph) + (2 if len(current) > 1 else 0)
        if length >= min_chars:
            docs.append("\n\n".join(current))
            current, length = [], 0
    if current:
        remainder = "\n\n".join(current)
        if docs:
            docs[-1] = f"{docs[-1]}\n\n{remainder}"
        else:
            docs.append(remainder)
    return docs


def chunk_documents(text: str, chunk_chars: int) -> list[str]:
    """Consecutive pieces of at most ``chunk_chars`` characters, cut after the last line break
    in the piece's second half, else after its last space, else exactly at the limit; pieces
    holding only whitespace are left out (the others joined give the text back)."""
    docs: list[str] = []
    start = 0
    while start < len(text):
        end = start + chunk_chars
        if end < len(text):
            half = start + chunk_chars // 2
            cut = text.rfind("\n", half, end)
            if cut < 0:
                cut = max(text.rfind(" ", half, end), text.rfind("\t", half, end))
            if cut >= 0:
                end = cut + 1
        piece = text[start:end]
        if piece.strip():
            docs.append(piece)
        start = end
    return docs
