"""The DATA payload the gateway writes to the next hop."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gateway.delivery import dot_stuff

lines = st.lists(
    st.binary(max_size=20).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
    max_size=12,
)


@given(lines, st.booleans())
def test_dot_stuffing_round_trips(parts: list[bytes], final_crlf: bool) -> None:
    content = b"\r\n".join(parts) + (b"\r\n" if final_crlf else b"")
    payload = dot_stuff(content)
    assert payload.endswith(b"\r\n.\r\n")
    body = payload[:-3]
    wire_lines = body.split(b"\r\n")[:-1]
    # No line of the payload is a lone dot before the end marker.
    assert b"." not in wire_lines
    # Undoing the stuffing the way a receiver does gives the content back.
    unstuffed = [ln[1:] if ln.startswith(b".") else ln for ln in wire_lines]
    expected = content if content.endswith(b"\r\n") else content + b"\r\n"
    assert b"".join(x + b"\r\n" for x in unstuffed) == (expected if content else b"\r\n")


def test_leading_dot_and_dot_lines() -> None:
    assert dot_stuff(b".a\r\n.\r\nb\r\n") == b"..a\r\n..\r\nb\r\n.\r\n"
