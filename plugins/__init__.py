"""Built-in plugins. Each is registered through the ``mot.plugins`` entry-point group in
pyproject.toml, exactly like a third-party plugin."""
