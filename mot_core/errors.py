"""The one exception type users see.

Anything raised as ``MotError`` is a problem with the user's input (config, data, checkpoint,
plugin) and is printed by the CLI as a single line with a non-zero exit, never a traceback.
Everything else is a bug and keeps its traceback.
"""


class MotError(Exception):
    """A user-facing error: the message alone must say what is wrong and how to fix it."""
