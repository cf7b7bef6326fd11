"""Weight conversion: rename tables and loaders from published formats to vlakit blocks.

Lives beside the model code, not inside it: blocks never import this package.
"""

from vlakit.convert.rename import Rules, rename_keys

__all__ = ["Rules", "rename_keys"]
