"""A small authoritative DNS server on loopback for tests.

``ZoneServer`` answers queries for a fixed list of records over UDP and TCP on
the same free port of 127.0.0.1, each transport served by its own thread. It
behaves like an authoritative server for every name it is asked about:

* a name in the zone with records of the asked type: those records (AA set);
* a name in the zone (or a parent of one, an "empty non-terminal") without
  records of that type: NOERROR with an empty answer;
* any other name: NXDOMAIN.

Names are case-insensitive. TXT data in zone-file form (``'"part one" "part two"'``)
keeps its character-strings; TXT data that does not start with a double quote is
taken as one string and split into 255-byte character-strings, so
``("example.com", "TXT", "v=spf1 -all")`` means what a reader expects.

A UDP answer larger than the client allows (512 bytes, or its EDNS payload size)
is sent truncated (TC set, no records), so a resolver retries over TCP as it
would against a real server.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import struct
import threading
from collections.abc import Callable
from types import TracebackType

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import dns.rrset

__all__ = ["ZoneServer"]

_TTL = 300
_UDP_MAX = 65535
_TXT_CHUNK = 255


def _txt_zone_text(text: str) -> str:
    """Turn a bare TXT value into zone-file character-strings; keep quoted text as it is."""
    if text.lstrip().startswith('"'):
        return text
    raw = text.encode()
    chunks = [raw[i : i + _TXT_CHUNK] for i in range(0, len(raw), _TXT_CHUNK)] or [b""]
    quoted = []
    for chunk in chunks:
        escaped = chunk.decode().replace("\\", "\\\\").replace('"', '\\"')
        quoted.append(f'"{escaped}"')
    return " ".join(quoted)


def _build_zone(
    records: list[tuple[str, str, str]],
) -> dict[dns.name.Name, dict[dns.rdatatype.RdataType, dns.rrset.RRset]]:
    """Parse the record list into rrsets keyed by lower-cased name and type (raises on bad data)."""
    texts: dict[tuple[dns.name.Name, dns.rdatatype.RdataType], list[str]] = {}
    for name_text, type_text, data in records:
        name = dns.name.from_text(name_text).canonicalize()
        rdtype = dns.rdatatype.from_text(type_text)
        text = _txt_zone_text(data) if rdtype == dns.rdatatype.TXT else data
        texts.setdefault((name, rdtype), []).append(text)
    zone: dict[dns.name.Name, dict[dns.rdatatype.RdataType, dns.rrset.RRset]] = {}
    for (name, rdtype), datas in texts.items():
        # Names inside rdata are absolute whether or not they end in a dot.
        rrset = dns.rrset.from_text_list(
            name, _TTL, dns.rdataclass.IN, rdtype, datas, origin=dns.name.root, relativize=False
        )
        zone.setdefault(name, {})[rdtype] = rrset
    return zone


class ZoneServer:
    """Serve ``records`` (``(name, type, rdata text)``) authoritatively on 127.0.0.1."""

    def __init__(self, records: list[tuple[str, str, str]]) -> None:
        self._lock = threading.Lock()
        self._zone = _build_zone(records)
        self._udp: socket.socket | None = None
        self._tcp: socket.socket | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._conns: set[socket.socket] = set()
        self._stopping = threading.Event()
        self.address: tuple[str, int] | None = None
        self.queries: list[tuple[str, str, str]] = []
        """Every question answered, as ``(transport, name, type)``; tests may read it."""
        self.errors: list[Exception] = []
        """Exceptions raised while answering (each answered SERVFAIL); empty when all is well."""

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> tuple[str, int]:
        """Bind UDP and TCP on one free port, start serving, return ``(host, port)``."""
        if self.address is not None:
            raise RuntimeError("ZoneServer already started")
        udp, tcp = self._bind_pair()
        self._udp, self._tcp = udp, tcp
        self._wake_r, self._wake_w = socket.socketpair()
        self._stopping.clear()
        self._threads = [
            threading.Thread(target=self._serve_udp, name="zone-udp", daemon=True),
            threading.Thread(target=self._serve_tcp, name="zone-tcp", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        port: int = tcp.getsockname()[1]
        self.address = ("127.0.0.1", port)
        return self.address

    def stop(self) -> None:
        """Stop both threads, close every socket; safe to call twice."""
        if self.address is None:
            return
        self._stopping.set()
        assert self._wake_w is not None
        self._wake_w.send(b"x")
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            # Unblocks a connection thread waiting in recv().
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for thread in self._threads[:2]:
            thread.join(timeout=5)
        # The accept thread has ended, so the list of connection threads is final.
        for thread in self._threads[2:]:
            thread.join(timeout=5)
        for sock in (self._udp, self._tcp, self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        self._udp = self._tcp = self._wake_r = self._wake_w = None
        self._threads = []
        self.address = None

    def set_records(self, records: list[tuple[str, str, str]]) -> None:
        """Replace the whole zone; queries after this call see only the new records."""
        zone = _build_zone(records)
        with self._lock:
            self._zone = zone

    def __enter__(self) -> ZoneServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- sockets -------------------------------------------------------------------

    @staticmethod
    def _bind_pair() -> tuple[socket.socket, socket.socket]:
        """A TCP listener on a free port and a UDP socket on the same port (retries on races)."""
        last_error: OSError | None = None
        for _ in range(50):
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            tcp.bind(("127.0.0.1", 0))
            port = tcp.getsockname()[1]
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                udp.bind(("127.0.0.1", port))
            except OSError as exc:
                last_error = exc
                udp.close()
                tcp.close()
                continue
            tcp.listen(16)
            return udp, tcp
        raise OSError(f"no free port for both UDP and TCP: {last_error}")

    def _serve_udp(self) -> None:
        assert self._udp is not None and self._wake_r is not None
        udp = self._udp
        with selectors.DefaultSelector() as sel:
            sel.register(udp, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while not self._stopping.is_set():
                for key, _ in sel.select():
                    if key.fileobj is not udp:
                        return
                    try:
                        wire, peer = udp.recvfrom(_UDP_MAX)
                    except OSError:
                        return
                    reply = self._safe_answer(wire, "udp")
                    if reply is not None:
                        udp.sendto(reply, peer)

    def _serve_tcp(self) -> None:
        assert self._tcp is not None and self._wake_r is not None
        tcp = self._tcp
        with selectors.DefaultSelector() as sel:
            sel.register(tcp, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while not self._stopping.is_set():
                for key, _ in sel.select():
                    if key.fileobj is not tcp:
                        return
                    try:
                        conn, _peer = tcp.accept()
                    except OSError:
                        return
                    with self._lock:
                        self._conns.add(conn)
                    thread = threading.Thread(
                        target=self._serve_conn, args=(conn,), name="zone-tcp-conn", daemon=True
                    )
                    self._threads.append(thread)
                    thread.start()

    def _serve_conn(self, conn: socket.socket) -> None:
        try:
            while not self._stopping.is_set():
                header = self._recv_exact(conn, 2)
                if header is None:
                    return
                (length,) = struct.unpack("!H", header)
                wire = self._recv_exact(conn, length)
                if wire is None:
                    return
                reply = self._safe_answer(wire, "tcp")
                if reply is None:
                    return
                conn.sendall(struct.pack("!H", len(reply)) + reply)
        except OSError:
            return
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    @staticmethod
    def _recv_exact(conn: socket.socket, size: int) -> bytes | None:
        data = b""
        while len(data) < size:
            chunk = conn.recv(size - len(data))
            if not chunk:
                return None
            data += chunk
        return data

    # -- answering -----------------------------------------------------------------

    def _safe_answer(self, wire: bytes, transport: str) -> bytes | None:
        """Answer, or SERVFAIL when answering raised (kept in ``errors`` for the test to see)."""
        try:
            return self._answer(wire, transport)
        except Exception as exc:
            with self._lock:
                self.errors.append(exc)
            try:
                failure = dns.message.make_response(dns.message.from_wire(wire))
            except dns.exception.DNSException:
                return None
            failure.set_rcode(dns.rcode.SERVFAIL)
            return failure.to_wire()

    def _answer(self, wire: bytes, transport: str) -> bytes | None:
        """The reply to one query message, or None when the bytes are not a query at all."""
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        if query.flags & dns.flags.QR:
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if query.opcode() != dns.opcode.QUERY or len(query.question) != 1:
            response.set_rcode(dns.rcode.NOTIMP)
            return response.to_wire()
        question = query.question[0]
        qname = question.name.canonicalize()
        qtype = dns.rdatatype.RdataType(question.rdtype)
        with self._lock:
            zone = self._zone
            self.queries.append((transport, qname.to_text(), dns.rdatatype.to_text(qtype)))
        records = zone.get(qname)
        if records is None and not any(name.is_subdomain(qname) for name in zone):
            response.set_rcode(dns.rcode.NXDOMAIN)
        elif records is not None and qtype in records:
            answer = records[qtype]
            # The owner name keeps the case of the question, as real servers do.
            response.answer.append(dns.rrset.from_rdata_list(question.name, _TTL, list(answer)))
        if transport == "tcp":
            return response.to_wire()
        limit = max(512, query.payload) if query.edns >= 0 else 512
        try:
            return response.to_wire(max_size=limit)
        except dns.exception.TooBig:
            truncated = dns.message.make_response(query)
            truncated.flags |= dns.flags.AA | dns.flags.TC
            return truncated.to_wire()


def txt_lookup(server: ZoneServer) -> Callable[..., bytes | None]:
    """A TXT lookup answered by ``server``, in the form of dkimpy's ``dnsfunc`` hook:
    the record's strings joined, or None when there is none."""
    assert server.address is not None
    host, port = server.address
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [host]
    resolver.port = port
    resolver.lifetime = 5

    def lookup(name: bytes, timeout: float = 5) -> bytes | None:
        try:
            answer = resolver.resolve(name.decode("ascii").rstrip("."), "TXT", lifetime=timeout)
        except dns.exception.DNSException:
            return None
        return b"".join(b"".join(rdata.strings) for rdata in answer)

    return lookup
