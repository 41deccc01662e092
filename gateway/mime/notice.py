"""The notice that replaces taken-out attachments, and its templates.

A template is a ``string.Template`` text with one repeated block for the
files. The block is the lines between a line holding only ``$begin_files``
and a line holding only ``$end_files``; it is written once per file, in the
order of the attachments. Placeholders:

- inside the block: ``$filename``, ``$size`` (such as ``2.0 MB``), ``$url``,
  ``$expires`` (such as ``2026-12-24 10:00 UTC``);
- anywhere: ``$count`` (the number of files);
- ``$$`` is a literal dollar sign.

In ``notice.html`` every value is HTML-escaped before it is put in; the
template's own markup is used as written. An administrator replaces the
defaults by pointing ``Templates.from_dir`` at a directory with ``notice.txt``
and/or ``notice.html``; a missing file keeps the default, an unknown
placeholder is an error that names the file.
"""

from __future__ import annotations

import datetime
import html
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from gateway.mime.errors import RenderError, TemplateError

BEGIN = "$begin_files"
END = "$end_files"
_OUTER = frozenset({"count"})
_INNER = frozenset({"filename", "size", "url", "expires"}) | _OUTER


@dataclass(frozen=True, slots=True)
class LinkNotice:
    """One taken-out file as the recipient sees it."""

    filename: str  # safe filename
    size: int
    url: str
    expires: datetime.datetime  # aware UTC


def human_size(size: int) -> str:
    """``512 B``, ``1.5 KB``, ``2.0 MB``: binary multiples, one decimal."""
    if size < 1024:
        return f"{size} B"
    value = float(size)
    for unit in ("KB", "MB", "GB", "TB"):
        value /= 1024.0
        if value < 1024.0 or unit == "TB":
            break
    return f"{value:.1f} {unit}"


def format_expiry(when: datetime.datetime) -> str:
    if when.tzinfo is None or when.utcoffset() is None:
        raise RenderError("LinkNotice.expires must be timezone-aware")
    return when.astimezone(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


@dataclass(frozen=True, slots=True)
class _Compiled:
    head: string.Template
    item: string.Template
    tail: string.Template


def _compile(source: str, label: str) -> _Compiled:
    lines = source.replace("\r\n", "\n").split("\n")
    stripped = [line.strip() for line in lines]
    if stripped.count(BEGIN) != 1 or stripped.count(END) != 1:
        raise TemplateError(f"{label}: needs one line {BEGIN} and one line {END}")
    b, e = stripped.index(BEGIN), stripped.index(END)
    if e < b:
        raise TemplateError(f"{label}: {END} comes before {BEGIN}")
    parts = (
        ("\n".join(lines[:b]), _OUTER),
        ("\n".join(lines[b + 1 : e]), _INNER),
        ("\n".join(lines[e + 1 :]), _OUTER),
    )
    compiled: list[string.Template] = []
    for text, allowed in parts:
        tpl = string.Template(text)
        if not tpl.is_valid():
            raise TemplateError(f"{label}: malformed placeholder (use $$ for a dollar sign)")
        unknown = sorted(set(tpl.get_identifiers()) - allowed)
        if unknown:
            listed = ", ".join("$" + u for u in unknown)
            raise TemplateError(f"{label}: unknown or misplaced placeholder(s) {listed}")
        compiled.append(tpl)
    return _Compiled(*compiled)


def _render(compiled: _Compiled, notices: Sequence[LinkNotice], esc: Callable[[str], str]) -> str:
    count = {"count": str(len(notices))}
    items = [
        compiled.item.substitute(
            count,
            filename=esc(n.filename),
            size=esc(human_size(n.size)),
            url=esc(n.url),
            expires=esc(format_expiry(n.expires)),
        )
        for n in notices
    ]
    pieces = [compiled.head.substitute(count), *items, compiled.tail.substitute(count)]
    return "\n".join(pieces).strip("\n") + "\n"


def _identity(value: str) -> str:
    return value


def _html_escape(value: str) -> str:
    return html.escape(value, quote=True)


def _default_source(name: str) -> str:
    return resources.files("gateway.mime").joinpath("templates", name).read_text("utf-8")


@dataclass(frozen=True)
class Templates:
    """Notice texts; ``text`` for text/plain bodies, ``html`` for text/html."""

    text: str
    html: str

    def __post_init__(self) -> None:
        _compile(self.text, "text template")
        _compile(self.html, "html template")

    @classmethod
    def default(cls) -> Templates:
        return cls(text=_default_source("notice.txt"), html=_default_source("notice.html"))

    @classmethod
    def from_dir(cls, path: Path) -> Templates:
        sources: dict[str, str] = {}
        for name in ("notice.txt", "notice.html"):
            file = path / name
            try:
                source = file.read_text("utf-8")
            except FileNotFoundError:
                source = _default_source(name)
            except (OSError, UnicodeDecodeError) as exc:
                raise TemplateError(f"{file}: cannot be read: {exc}") from exc
            else:
                _compile(source, str(file))
            sources[name] = source
        return cls(text=sources["notice.txt"], html=sources["notice.html"])

    def render_text(self, notices: Sequence[LinkNotice]) -> str:
        return _render(_compile(self.text, "text template"), notices, _identity)

    def render_html(self, notices: Sequence[LinkNotice]) -> str:
        return _render(_compile(self.html, "html template"), notices, _html_escape)
