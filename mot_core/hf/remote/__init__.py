"""The code a whole-model export carries (``mot export RUN --format hf``): configuration,
model and processor modules copied verbatim into the exported folder, which ``transformers``
loads with ``trust_remote_code=True`` on a machine without this package. Nothing here
imports ``mot_core`` or ``plugins`` (an import-linter contract holds it)."""
