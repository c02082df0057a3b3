"""User text made safe to show: on a terminal (:func:`printable`) and in Markdown (:func:`markdown_text`).

A label, a dataset name, an error message quoting a config value or a file path is the user's text,
and a terminal obeys what it holds: ``ESC ] 0 ; … BEL`` sets the window title, ``ESC [ 2 J`` clears
the screen, CR returns to the line's start to overwrite it, U+202E reverses the rest of the line.
Rich passes ESC through (it strips only BEL, BS, VT, FF and CR), so every user string is made
printable before it reaches the console: :class:`PrintableConsole` and :class:`PrintableTable` do it for
every string printed or put in a cell, and progress fields call :func:`printable` themselves.
"""

from __future__ import annotations

import unicodedata

from rich.console import Console
from rich.table import Table

# Whitespace that moves the cursor (tab, newlines, CR) reads as one space; other separators (no-break
# space, em space) too.
_AS_SPACE = {"\t", "\n", "\r", "\v", "\f"}


def _shown(char: str, newlines: bool) -> str:
    if char == "\n" and newlines:
        return char
    if char in _AS_SPACE or unicodedata.category(char) == "Zs":
        return " "
    # control (C0, DEL, C1), format (bidi embeddings and isolates, LRM/RLM/ALM, zero-width), line and
    # paragraph separators, private use, unassigned: shown as their escape, visible and inert
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def printable(text: object, *, newlines: bool = False) -> str:
    """``text`` as a string with nothing a terminal would act on: every control, format (bidi) and
    separator character other than a plain space becomes its visible escape (``\\x1b``, ``\\u202e``),
    tabs and line breaks become spaces (``newlines=True`` keeps ``\\n``, for multi-line messages)."""
    text = str(text)
    if text.isprintable():  # Python's "printable": no Other (Cc, Cf, Cs, Co, Cn) or Separator but " "
        return text
    return "".join(c if c.isprintable() else _shown(c, newlines) for c in text)


class PrintableConsole(Console):
    """A rich ``Console`` whose ``print`` makes every string argument :func:`printable` (line breaks kept:
    our own messages use them). Markup is left to the caller (``rich.markup.escape`` user text)."""

    def print(self, *objects, **options) -> None:
        super().print(*(printable(o, newlines=True) if isinstance(o, str) else o for o in objects), **options)


class PrintableTable(Table):
    """A rich ``Table`` whose string cells are made :func:`printable` (a cell is one line of user text)."""

    def add_row(self, *renderables, **options) -> None:
        super().add_row(*(printable(r) if isinstance(r, str) else r for r in renderables), **options)


# ---------------------------------------------------------------------------------------------
# Markdown

# GitHub-flavoured Markdown keeps raw HTML (a <script> in a label would be live where the file is
# rendered) and splits table cells at |; backslash first, so that an escape the user wrote stays text
_MARKDOWN_ESCAPES = {"\\": "\\\\", "|": "\\|", "&": "&amp;", "<": "&lt;", ">": "&gt;"}


def markdown_text(text: object) -> str:
    """``text`` as inert Markdown, fit for a table cell or a heading: printable, on one line, with
    table syntax and HTML escaped."""
    return "".join(_MARKDOWN_ESCAPES.get(c, c) for c in printable(text))
