from __future__ import annotations

from importlib import resources

import pytest

from web.templates import PartialCache

PAGES = [
    "landing.html",
    "not_found.html",
    "gone.html",
    "error.html",
    "status.html",
    "admin.html",
    "unfreeze_confirm.html",
    "unfreeze_result.html",
]
PUBLIC = PAGES[:5]


@pytest.mark.parametrize("name", PAGES)
def test_page_is_a_complete_document(name: str) -> None:
    page = PartialCache().page(name)
    assert page.startswith('<!doctype html>\n<html lang="en">\n<head>\n')
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in page
    assert page.count("<style>") == 1
    assert "{{" not in page
    assert "<script" not in page
    assert "<link" not in page


@pytest.mark.parametrize("name", PUBLIC)
def test_public_pages_share_one_style(name: str) -> None:
    style = resources.files("web.templates").joinpath("_page_style.html").read_text("utf-8")
    assert style in PartialCache().page(name)


def test_unknown_partial_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    cache = PartialCache()
    monkeypatch.setattr(cache, "_read", lambda name: "{{head}}\n{{ broken }}\n")
    with pytest.raises(ValueError, match="malformed"):
        cache.page("x.html")
