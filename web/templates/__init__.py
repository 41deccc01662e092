"""HTML pages of the download service (read with importlib.resources).

Markup shared by every page lives in partials whose names start with an
underscore.  A page refers to a partial with a ``{{name}}`` line, which
:func:`read_page` replaces by the text of ``_name.html``; the result is a
complete, self-contained HTML document.
"""

from __future__ import annotations

import re
from importlib import resources

_INCLUDE = re.compile(r"\{\{(\w+)\}\}\n")


class PartialCache:
    """Reads each partial once and expands ``{{name}}`` lines in pages."""

    def __init__(self) -> None:
        self._folder = resources.files(__name__)
        self._partials: dict[str, str] = {}

    def _read(self, name: str) -> str:
        return self._folder.joinpath(name).read_text(encoding="utf-8")

    def _partial(self, match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in self._partials:
            self._partials[name] = self._read(f"_{name}.html")
        return self._partials[name]

    def page(self, name: str) -> str:
        text = _INCLUDE.sub(self._partial, self._read(name))
        if "{{" in text:
            raise ValueError(f"{name}: malformed partial reference")
        return text
