"""The shared lower layer of the built-in plugins: code that more than one of them uses (image
files and grids, the FID feature network, the tokenizer fits' folder writing and learning-rate
schedule, the Wikipedia loader), so that no built-in plugin imports another.

A plain package, not a plugin: it registers nothing (no entry point, no hooks). It is internal
to the built-in plugins and may change without notice; a third-party plugin imports only
``mot_core.plugin_api``, ``mot_core.errors`` and ``registry``. Like the plugins it serves, it
imports nothing else from the engine, and it imports no plugin (import-linter holds it to both).
"""
