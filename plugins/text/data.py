"""Real text offline: the Wikipedia articles shipped with gensim, or the user's own files.

The held-out split is chosen by a hash of each document's name (an article's title, a file's
name, or ``<file name>#<index>`` for the pieces of a file cut by ``split_documents``), so it
does not move when documents are added, the corpus moves, or the loader's order changes.
"""

from __future__ import annotations

import glob
import re
import zlib
from pathlib import Path
from typing import Iterator, Literal

from pydantic import Field

from mot_core.errors import MotError
from mot_core.plugin_api import DataSource, PluginOptions, RawDocument, RawSegment, Split, fingerprint_files
from plugins.common.wikipedia import iter_wikipedia, load_wikipedia, wikipedia_dump_path

MAX_TEXT_PARTS = 64  # text_files: a split is read in at most this many parts (contiguous groups of files)


def in_val_split(name: str, val_fraction: float) -> bool:
    return zlib.crc32(name.encode("utf-8")) % 10_000 < val_fraction * 10_000


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

    def documents(self, split: Split) -> Iterator[RawDocument]:
        """Read lazily: a dump of one's own (``path``) is parsed as the documents are taken, never
        held whole; gensim's small default dump is parsed once per process and kept."""
        opts: WikipediaOptions = self.options
        file = wikipedia_dump_path(opts.path)
        if not file.is_file():
            raise MotError(f"wikipedia dump not found: {file}")
        if opts.path is None:
            articles = iter(load_wikipedia(None, opts.min_chars))
        else:
            wanted = lambda title: in_val_split(title, opts.val_fraction) == (split == "val")  # noqa: E731
            articles = iter_wikipedia(file, opts.min_chars, wanted)
        return self._documents(articles, split)

    def _documents(self, articles, split: Split) -> Iterator[RawDocument]:
        opts: WikipediaOptions = self.options
        count = 0
        for title, body in articles:
            if in_val_split(title, opts.val_fraction) != (split == "val"):
                continue
            if opts.split_documents == "article":
                count += 1
                yield RawDocument((RawSegment("text", f"{title}\n\n{body}"),))
            else:
                for block in paragraph_documents(body, opts.min_paragraph_chars):
                    count += 1
                    yield RawDocument((RawSegment("text", f"{title}\n\n{block}"),))
        if not count:
            raise MotError(f"dataset '{self.name}' has no documents in its '{split}' split")

    def fingerprint(self) -> str:
        """The dump's name, size and modification time, and the options."""
        return fingerprint_files([wikipedia_dump_path(self.options.path)], extra=super().fingerprint(), contents=False)


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

    def _files(self) -> list[Path]:
        """The files, in order: patterns as listed, each pattern's matches sorted; a pattern
        that matches no file is an error."""
        opts: TextFilesOptions = self.options
        files: list[Path] = []
        for pattern in opts.paths:
            matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
            if not matches or not all(Path(m).is_file() for m in matches):
                raise MotError(f"dataset 'text_files': no file found at '{pattern}'")
            files.extend(Path(m) for m in matches)
        return files

    @staticmethod
    def _groups(count: int) -> list[tuple[int, int]]:
        """[start, stop) indices of the contiguous groups of files that make the parts."""
        parts = min(count, MAX_TEXT_PARTS)
        return [(part * count // parts, (part + 1) * count // parts) for part in range(parts)]

    def num_parts(self, split: Split) -> int:
        """One part per file, or per contiguous group of files when there are more than 64."""
        return len(self._groups(len(self._files())))

    def read_part(self, split: Split, part: int) -> Iterator[RawDocument]:
        """The documents of one group of files; a part may be empty (its files all in the other
        split): only ``documents`` knows that a whole split is empty."""
        files = self._files()
        groups = self._groups(len(files))
        if not 0 <= part < len(groups):
            raise MotError(f"dataset 'text_files' has {len(groups)} parts, asked for part {part}")
        start, stop = groups[part]
        return self._read_files(files[start:stop], split, {"total": 0, "empty": 0})

    def documents(self, split: Split) -> Iterator[RawDocument]:
        """Read lazily, one file at a time."""
        return self._documents(self._files(), split)

    def fingerprint(self) -> str:
        """Each matched file's name, size and modification time, and the options."""
        return fingerprint_files(self._files(), extra=super().fingerprint(), contents=False)

    def _read_files(self, files: list[Path], split: Split, counts: dict[str, int]) -> Iterator[RawDocument]:
        """The documents of ``split`` in ``files``; ``counts`` gathers the documents of both
        splits ("total") and the empty files ("empty"), for the message of an empty split."""
        opts: TextFilesOptions = self.options
        for file in files:
            if opts.split_documents == "file":
                # By file name, not path: the split must not change when the corpus moves.
                counts["total"] += 1
                if in_val_split(file.name, opts.val_fraction) != (split == "val"):
                    continue
                text = _read(file)
                if text.strip():
                    yield RawDocument((RawSegment("text", text),))
                else:
                    counts["empty"] += 1
                continue
            text = _read(file)
            pieces = (
                paragraph_documents(text, opts.min_paragraph_chars)
                if opts.split_documents == "paragraphs"
                else chunk_documents(text, opts.chunk_chars)
            )
            del text
            counts["total"] += len(pieces)
            for index, piece in enumerate(pieces):
                if in_val_split(f"{file.name}#{index}", opts.val_fraction) == (split == "val"):
                    yield RawDocument((RawSegment("text", piece),))

    def _documents(self, files: list[Path], split: Split) -> Iterator[RawDocument]:
        opts: TextFilesOptions = self.options
        counts = {"total": 0, "empty": 0}
        yielded = 0
        for doc in self._read_files(files, split, counts):
            yielded += 1
            yield doc
        if yielded:
            return
        total, empty = counts["total"], counts["empty"]
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
