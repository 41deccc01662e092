"""Shared helpers for the MIME tests: the real-world corpus and fake notices."""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from pathlib import Path

import pytest

from gateway.mime import Attachment, LinkNotice

EXPIRES = datetime.datetime(2026, 12, 24, 10, 0, tzinfo=datetime.UTC)


def corpus_dir() -> Path | None:
    configured = os.environ.get("ATTACHGATE_CORPUS")
    if configured:
        path = Path(configured)
    else:
        path = Path(__file__).resolve().parents[3].parent / "shared" / "corpus"
    return path if path.is_dir() else None


def corpus_files() -> list[str]:
    root = corpus_dir()
    if root is None:
        return []
    return sorted(
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() and p.name != "LICENSE" and not p.name.startswith("README")
    )


def crlf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def load(name: str) -> bytes:
    root = corpus_dir()
    if root is None:
        pytest.skip("corpus not found: set ATTACHGATE_CORPUS or put it at ../shared/corpus")
    return crlf((root / name).read_bytes())


def notices_for(attachments: Sequence[Attachment]) -> list[LinkNotice]:
    return [
        LinkNotice(
            filename=a.safe_filename,
            size=len(a.data),
            url=f"https://files.example.com/d/token-{a.index}",
            expires=EXPIRES,
        )
        for a in attachments
    ]
