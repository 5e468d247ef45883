"""Plugin registry: pluggy hookspecs and the plugin manager that finds built-in and
third-party plugins alike (entry-point group ``mot.plugins``)."""

from registry.hookspecs import hookimpl, hookspec
from registry.manager import PluginInfo, Registry, get_registry

__all__ = ["hookimpl", "hookspec", "PluginInfo", "Registry", "get_registry"]
