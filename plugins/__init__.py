"""Built-in plugins. Each is registered through the ``mot.plugins`` entry-point group in
pyproject.toml, exactly like a third-party plugin. ``plugins.common`` is not one of them: it
holds the code they share, so that none of them imports another."""
