"""Transfer decoding: the fast base64 decoder answers exactly as the standard one."""

from __future__ import annotations

import base64
import binascii
import os
import re

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from gateway.mime.transfer import decode_base64, encode_base64

_NOT_B64 = re.compile(rb"[^A-Za-z0-9+/]")


def reference(data: bytes) -> bytes | None:
    """The lenient decoding with the standard library only."""
    try:
        return binascii.a2b_base64(data)
    except binascii.Error:
        pass
    clean = _NOT_B64.sub(b"", data.split(b"=", 1)[0])
    if len(clean) % 4 == 1:
        return None
    try:
        return binascii.a2b_base64(clean + b"=" * ((4 - len(clean) % 4) % 4))
    except binascii.Error:
        return None


# Mostly base64 characters, with what mail programs add or break: line ends,
# spaces, padding in odd places, and bytes outside the alphabet.
_b64ish = st.binary(max_size=0) | st.lists(
    st.sampled_from(
        [
            *(b"Q", b"U", b"J", b"D", b"a", b"z", b"0", b"9", b"+", b"/", b"=", b"==", b"\r\n"),
            *(b" ", b"\t", b"-", b"_", b"*", b".", b"\x00", b"\xff", b"\xc3\xa4"),
        ]
    ),
    max_size=80,
).map(b"".join)


@given(_b64ish)
@example(b"QUJDRA==QUJD")  # data after the padding
@example(b"QU=JD")  # padding in the middle
@example(b"Q")  # one character too many
@example(b"QUJD\r\nRA")  # padding missing
@example(b"QUJD-_RA==")  # the URL-safe alphabet is not base64 in mail
def test_decoding_matches_the_standard_library(data: bytes) -> None:
    assert decode_base64(data) == reference(data)


@given(st.binary(max_size=3000))
def test_what_we_encode_decodes_back(data: bytes) -> None:
    encoded = encode_base64(data)
    assert all(len(line) <= 76 for line in encoded.split(b"\r\n"))
    assert decode_base64(encoded) == data


@pytest.mark.parametrize("size", [0, 1, 2, 3, 57, 1 << 20])
def test_mail_shaped_base64_of_any_length(size: int) -> None:
    data = os.urandom(size)
    wrapped = base64.encodebytes(data).replace(b"\n", b"\r\n")
    assert decode_base64(wrapped) == data
    assert decode_base64(wrapped.rstrip(b"=\r\n")) == data  # padding dropped
