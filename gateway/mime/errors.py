"""Errors of the MIME package.

``plan()`` turns structural trouble into a ``Passthrough`` and raises only for
misuse; template loading and rendering raise for bad input.

Exception tree::

    MimeError                  root: everything this package raises
     ├── TemplateError         a notice template is unreadable or has a bad placeholder
     ├── RenderError           render() was given notices that do not fit the plan
     └── ScanError             internal: the scanner gave up (never leaves plan())
          ├── StructureError   broken structure (.what names the defect)
          ├── LimitExceeded    a configured limit was crossed (.what: depth, parts, header-size)
          └── Protected        signed or encrypted content (.what: signed, encrypted)
"""

from __future__ import annotations


class MimeError(Exception):
    """Root of every error raised by ``gateway.mime``."""


class TemplateError(MimeError):
    """A notice template cannot be used; the message names the file."""


class RenderError(MimeError):
    """``Extraction.render`` was called with arguments that do not match the plan."""


class ScanError(MimeError):
    """The scanner stopped; ``what`` is a short machine-readable word."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


class StructureError(ScanError):
    """The message structure is broken in a way that is not handled safely."""


class LimitExceeded(ScanError):
    """Depth, part count or header size is beyond the configured limit."""


class Protected(ScanError):
    """Signed or encrypted content that must not be touched."""
