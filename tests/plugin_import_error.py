"""A plugin module that fails while being imported (for the error message test)."""

raise ImportError("a dependency of this plugin is missing")
