"""The terminal: one stderr console for progress, reports and errors, shared by the CLI and the library.

Paths, class names and messages are user strings: the console reads no rich markup (`[...]`) and no
emoji codes (`:name:`) in printed text, so every string reaches the terminal verbatim. Styles come
from :class:`rich.text.Text` parts (see :func:`warn`).
"""

from __future__ import annotations

from rich.console import Console
from rich.text import Text

#: stdout stays free for machine-readable output. Lines are never hard-wrapped (soft_wrap), so
#: paths stay whole in logs and pipes.
console = Console(stderr=True, soft_wrap=True, markup=False, emoji=False)


def warning(message: str) -> Text:
    """`warning: message`, the prefix in yellow, to print on a console."""
    return Text.assemble(("warning: ", "yellow"), message)


def readable(name: str) -> str:
    """`name` with the bytes of a non-UTF-8 file name (surrogate escapes) shown as U+FFFD, for
    drawing libraries that cannot encode surrogates (matplotlib)."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
