"""The one exception type users see.

Anything raised as ``MotError`` is a problem with the user's input (config, data, checkpoint,
plugin) and is printed by the CLI as a single line with a non-zero exit, never a traceback.
Everything else is a bug and keeps its traceback.
"""


class MotError(Exception):
    """A user-facing error: the message alone must say what is wrong and how to fix it."""


class BadRecordError(MotError):
    """A record a data source could not read, met with ``data.on_bad_record: error``: it names
    the dataset, the file and the record, and passes through the boundary of whichever plugin
    was reading the data (a modality sampling its tokenizer's fit data is not at fault)."""


def plugin_boundary(where: str):
    """Context manager around a call into plugin code: whatever escapes it becomes ONE line that
    names ``where`` (the plugin and its hook or method, and the dataset when there is one).

    A plugin's own ``MotError`` gets ``where`` prefixed; any other exception (a bug in the
    plugin) is reported with its type, message and the plugin's file and line."""
    import contextlib
    import traceback

    @contextlib.contextmanager
    def boundary():
        try:
            yield
        except BadRecordError:
            raise
        except MotError as exc:
            message = str(exc)
            raise MotError(message if message.startswith(where) else f"{where}: {message}") from None
        except Exception as exc:  # noqa: BLE001 - the point is to name the plugin, whatever it raised
            frames = traceback.extract_tb(exc.__traceback__)
            at = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else "no message"
            raise MotError(f"{where} raised {type(exc).__name__}: {detail}{at}") from None

    return boundary()


def one_per_item(results, count: int, where: str, noun: str, items: str, advice: str) -> list:
    """What a plugin's batch method returned, as a list, if it holds one entry per input
    (``count``); else one MotError: "<where> returned <n> <noun> for <count> <items>; <advice>"."""
    if not isinstance(results, (list, tuple)) or len(results) != count:
        got = f"{len(results)} {noun}" if isinstance(results, (list, tuple)) else type(results).__name__
        raise MotError(f"{where} returned {got} for {count} {items}; {advice}")
    return list(results)
