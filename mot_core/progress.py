"""The progress display of every long step (tokenizer fits, data preparation, tokenize,
training): a tqdm bar on a terminal, plain lines anywhere else (a log file, a pipe, CI).

Plugins reach ``progress`` through ``mot_core.plugin_api`` (which re-exports it); the engine
imports it from here."""

from __future__ import annotations

from typing import Any, Iterable

__all__ = ["PlainProgress", "on_terminal", "progress"]


def on_terminal(stream: Any = None) -> bool:
    """Whether ``stream`` (default ``sys.stderr``, where progress goes) is a terminal."""
    import sys

    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress(iterable: Iterable | None = None, total: int | None = None, desc: str = "", unit: str = "it",
             disable: bool = False, every: int | None = None, seconds: float = 30.0, file: Any = None,
             **bar_options: Any):
    """The progress display of every long step (tokenizer fits, data preparation, tokenize,
    training).

    On a terminal: a tqdm bar, exactly as ``tqdm(iterable, total=..., desc=..., unit=...,
    **bar_options)`` draws it. Anywhere else (a log file, a pipe, CI): ``PlainProgress``, with
    the same interface (iteration, ``update``, ``set_postfix``, ``write``, ``close``, ``n``),
    which prints one plain line every ``every`` units (default: a tenth of ``total``) or every
    ``seconds``, whichever comes first, and one when it closes: a log holds readable lines
    instead of thousands of carriage-return frames. ``disable``: nothing is shown (a disabled
    tqdm: ``write`` still prints)."""
    from tqdm import tqdm

    if disable or on_terminal(file):
        return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, file=file, **bar_options)
    return PlainProgress(iterable, total=total, desc=desc, unit=unit, every=every, seconds=seconds, file=file,
                         initial=bar_options.get("initial", 0))


class PlainProgress:
    """Progress as plain lines, for output that is not a terminal (see ``progress``).

    A line: ``train: 40/400 it (10%) | 00:12 elapsed, ~01:48 left | 3.33 it/s | loss=4.123``
    (without ``total``: the count, the time and the rate). Lines go to ``file`` (default
    stderr, where tqdm draws), after flushing stdout so that they land in order with what the
    program printed; ``write`` prints to stdout, as ``tqdm.write`` does."""

    def __init__(self, iterable: Iterable | None = None, total: int | None = None, desc: str = "", unit: str = "it",
                 every: int | None = None, seconds: float = 30.0, file: Any = None, initial: int = 0):
        import math
        import time

        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.n = self.initial = self.shown = initial
        remaining = (total - initial) if total else 0
        self.every = every or (max(1, math.ceil(remaining / 10)) if remaining > 0 else None)
        self.seconds, self.file = seconds, file
        self.started = self.last_time = time.monotonic()
        self.postfix = ""
        self.closed = False

    def __iter__(self):
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __len__(self) -> int:
        return self.total if self.total is not None else len(self.iterable)

    def __enter__(self) -> "PlainProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        import time

        if self.closed or not n:
            return
        self.n += n
        now = time.monotonic()
        count_due = self.every is not None and self.n // self.every > self.shown // self.every
        if (count_due or now - self.last_time >= self.seconds) and not (self.total and self.n >= self.total):
            self._line()  # the last unit's line is the closing one

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kwargs: Any) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in items.items())
        if refresh:
            self.refresh()

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s
        if refresh:
            self.refresh()

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    def refresh(self) -> None:
        """A line if ``seconds`` have passed since the last one (a long unit, e.g. a big part
        of a tokenize, still shows it is alive); nothing otherwise."""
        import time

        if not self.closed and time.monotonic() - self.last_time >= self.seconds \
                and not (self.total and self.n >= self.total):
            self._line()

    @staticmethod
    def write(s: str, file: Any = None, end: str = "\n", nolock: bool = False) -> None:
        import sys

        print(s, file=file or sys.stdout, end=end, flush=True)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.n != self.initial:  # the closing line says how long it took
            self._line(done=True)

    def _line(self, done: bool = False) -> None:
        import sys
        import time

        from tqdm import tqdm

        now = time.monotonic()
        elapsed = now - self.started
        rate = (self.n - self.initial) / elapsed if elapsed > 0 else 0.0
        if self.total:
            parts = [f"{self.n}/{self.total} {self.unit} ({100 * self.n / self.total:.0f}%)"]
            left = "" if done or not rate else f", ~{tqdm.format_interval((self.total - self.n) / rate)} left"
        else:
            parts, left = [f"{self.n} {self.unit}"], ""
        parts.append(f"{'done in ' if done else ''}{tqdm.format_interval(elapsed)}{'' if done else ' elapsed'}{left}")
        if rate:
            parts.append(f"{rate:.2f} {self.unit}/s" if rate >= 1 else f"{1 / rate:.2f} s/{self.unit}")
        if self.postfix:
            parts.append(self.postfix)
        sys.stdout.flush()
        stream = self.file or sys.stderr
        print(f"{self.desc + ': ' if self.desc else ''}{' | '.join(parts)}", file=stream, flush=True)
        self.shown, self.last_time = self.n, now
