"""MIME work for the gateway: a byte-level scanner and the attachment rewriter.

See ``rewrite`` for the public API and ``errors`` for the exception tree.
"""

from gateway.mime.errors import MimeError, RenderError, TemplateError
from gateway.mime.filenames import safe_filename
from gateway.mime.notice import LinkNotice, Templates, human_size
from gateway.mime.rewrite import (
    Attachment,
    Extraction,
    LinkingRules,
    MimeLimits,
    Passthrough,
    plan,
)

__all__ = [
    "Attachment",
    "Extraction",
    "LinkNotice",
    "LinkingRules",
    "MimeError",
    "MimeLimits",
    "Passthrough",
    "RenderError",
    "TemplateError",
    "Templates",
    "human_size",
    "plan",
    "safe_filename",
]
