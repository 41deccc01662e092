"""File names: neutralising what senders put in them.

``safe_filename`` makes a name fit for display and for ``Content-Disposition``
on download: no directory parts, no control or bidirectional-override
characters, no Windows device names, no leading dots, no trailing dots or
spaces, at most 200 characters with the extension kept.
"""

from __future__ import annotations

import re
import unicodedata

MAX_FILENAME = 200
_MAX_EXTENSION = 20
DEFAULT_NAME = "attachment"

# Explicit bidirectional formatting characters: embeddings and overrides,
# isolates, marks (LRM, RLM, ALM).
BIDI_CONTROLS = frozenset(
    "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c"
)
_DROP_CATEGORIES = frozenset({"Cc", "Cs", "Co", "Zl", "Zp"})
_WINDOWS_FORBIDDEN = re.compile(r'[<>:"|?*]')
_DRIVE = re.compile(r"^[A-Za-z]:")
RESERVED_NAMES = frozenset(
    {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$", "CLOCK$"}
    | {f"COM{d}" for d in "0123456789¹²³"}
    | {f"LPT{d}" for d in "0123456789¹²³"}
)


def _drop_char(ch: str) -> bool:
    return ch in BIDI_CONTROLS or ch == "\ufeff" or unicodedata.category(ch) in _DROP_CATEGORIES


def is_reserved(name: str) -> bool:
    """True when Windows would open a device for this name (``CON``, ``nul.txt``)."""
    stem = name.split(".", 1)[0].rstrip(" ")
    return stem.upper() in RESERVED_NAMES


def _strip_edges(name: str) -> str:
    return name.lstrip(" .").rstrip(" .")


def _truncate(name: str) -> str:
    if len(name) <= MAX_FILENAME:
        return name
    stem, dot, ext = name.rpartition(".")
    if dot and stem and 0 < len(ext) <= _MAX_EXTENSION:
        keep = MAX_FILENAME - len(ext) - 1
        return _strip_edges(stem[:keep]) + "." + ext
    return _strip_edges(name[:MAX_FILENAME])


def safe_filename(name: str) -> str:
    """A neutralised file name; ``"attachment"`` when nothing usable is left."""
    text = unicodedata.normalize("NFC", name)
    text = "".join(ch for ch in text if not _drop_char(ch))
    # Directory parts, POSIX and Windows alike; then a drive prefix.
    text = re.split(r"[/\\]", text)[-1]
    text = _DRIVE.sub("", text)
    text = _WINDOWS_FORBIDDEN.sub("_", text)
    text = " ".join(text.split())  # tabs, odd spaces and runs of them become one space
    text = _truncate(_strip_edges(text))
    if not text:
        return DEFAULT_NAME
    if is_reserved(text):
        text = "_" + text
        if len(text) > MAX_FILENAME:
            text = _truncate(text)
    return text
