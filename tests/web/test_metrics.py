"""The metrics registry: sample keys, the text exposition, flushing to a real
SQLite state store, and the ``/metrics`` listener over real HTTP."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from storage.interfaces import StateUnavailable
from storage.sqlite import SqliteStateStore
from tests.helpers.clock import FakeClock
from web.metrics import (
    CONTENT_TYPE,
    COUNTERS,
    GAUGES,
    Metrics,
    build_metrics_app,
    render,
    sample_key,
)

# --- the Prometheus text format 0.0.4, strictly -----------------------------------

METRIC_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
LABEL_NAME = r"[a-zA-Z_][a-zA-Z0-9_]*"
# Inside the quotes: anything but a quote, a backslash or a line end, or one
# of the three escapes the format defines.
LABEL_VALUE = r'"(?:[^"\\\n]|\\[\\"n])*"'
LABEL = rf"{LABEL_NAME}={LABEL_VALUE}"
VALUE = r"[+-]?(?:[0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?|Inf|NaN)"
SAMPLE_RE = re.compile(
    rf"(?P<key>(?P<name>{METRIC_NAME})(?:\{{(?:{LABEL}(?:,{LABEL})*,?)?\}})?)"
    rf" (?P<value>{VALUE})(?: -?[0-9]+)?"
)
HELP_RE = re.compile(rf"# HELP (?P<name>{METRIC_NAME}) (?P<text>(?:[^\\\n]|\\[\\n])*)")
TYPE_RE = re.compile(rf"# TYPE (?P<name>{METRIC_NAME}) (?P<type>counter|gauge|untyped)")
LABEL_PAIR_RE = re.compile(rf"({LABEL_NAME})=({LABEL_VALUE})")


def check_exposition(text: str) -> dict[str, str]:
    """Fail unless ``text`` is a well-formed exposition; return each family's type.

    Every line is a HELP, a TYPE or a sample; a family's HELP and TYPE come
    once, before its samples, and its samples are contiguous.
    """
    assert text.endswith("\n"), "the exposition must end with a line end"
    types: dict[str, str] = {}
    helps: set[str] = set()
    current: str | None = None
    finished: set[str] = set()
    for number, line in enumerate(text[:-1].split("\n"), 1):
        where = f"line {number}: {line!r}"
        if m := HELP_RE.fullmatch(line):
            name = m["name"]
            assert name not in helps, f"second HELP, {where}"
            assert name not in types, f"HELP after TYPE, {where}"
            helps.add(name)
        elif m := TYPE_RE.fullmatch(line):
            name = m["name"]
            assert name not in types, f"second TYPE, {where}"
            types[name] = m["type"]
        elif line.startswith("#"):
            raise AssertionError(f"unexpected comment, {where}")
        else:
            sample = SAMPLE_RE.fullmatch(line)
            assert sample is not None, f"not a sample, {where}"
            name = sample["name"]
            assert name in types, f"sample before its TYPE, {where}"
            assert name not in finished, f"family split up, {where}"
            if current is not None and current != name:
                finished.add(current)
            current = name
    assert helps == set(types), "every family has both HELP and TYPE"
    return types


def parse_exposition(text: str) -> dict[str, float]:
    """``{sample_key: value}`` of every sample (the text is checked first)."""
    check_exposition(text)
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = SAMPLE_RE.fullmatch(line)
        assert m is not None, line
        assert m["key"] not in samples, f"duplicate sample {m['key']}"
        samples[m["key"]] = float(m["value"])
    return samples


def labels_of(key: str) -> dict[str, str]:
    """The labels of a sample key, unescaped."""
    _, _, inner = key.partition("{")
    out: dict[str, str] = {}
    for name, quoted in LABEL_PAIR_RE.findall(inner.removesuffix("}")):
        out[name] = re.sub(
            r"\\(.)", lambda m: "\n" if m[1] == "n" else m[1], quoted[1:-1], flags=re.S
        )
    return out


# --- sample keys ----------------------------------------------------------------------


def test_sample_key_without_labels_is_the_name() -> None:
    assert sample_key("attachgate_downloads_total", {}) == "attachgate_downloads_total"


def test_sample_key_sorts_labels() -> None:
    key = sample_key("x_total", {"stage": "rcpt", "case": "relay_denied", "b": "2"})
    assert key == 'x_total{b="2",case="relay_denied",stage="rcpt"}'
    assert key == sample_key("x_total", {"case": "relay_denied", "b": "2", "stage": "rcpt"})


@pytest.mark.parametrize(
    ("value", "escaped"),
    [
        ("back\\slash", "back\\\\slash"),
        ('say "hi"', 'say \\"hi\\"'),
        ("two\nlines", "two\\nlines"),
        ('\\"\n', '\\\\\\"\\n'),
        ("\\n", "\\\\n"),  # a backslash then an n is not a line end
        ("plain-value_1.2", "plain-value_1.2"),
    ],
)
def test_sample_key_escapes_label_values(value: str, escaped: str) -> None:
    key = sample_key("x_total", {"v": value})
    assert key == f'x_total{{v="{escaped}"}}'
    assert "\n" not in key
    assert SAMPLE_RE.fullmatch(f"{key} 1") is not None
    assert labels_of(key) == {"v": value}


# --- counting --------------------------------------------------------------------------


def test_inc_refuses_undeclared_names() -> None:
    m = Metrics()
    with pytest.raises(ValueError, match="undeclared counter 'attachgate_nope_total'"):
        m.inc("attachgate_nope_total")
    with pytest.raises(ValueError, match="undeclared"):
        m.inc("attachgate_frozen_accounts")  # a gauge, not a counter
    assert m.pending == {}


def test_inc_adds_up_per_sample() -> None:
    m = Metrics()
    m.inc("attachgate_auth_total", result="ok")
    m.inc("attachgate_auth_total", result="failed")
    m.inc("attachgate_auth_total", result="ok")
    m.inc("attachgate_attachment_bytes_linked_total", 1500)
    m.inc("attachgate_attachment_bytes_linked_total", 500)
    m.inc("attachgate_refusals_total", case="relay_denied")
    assert dict(m.pending) == {
        'attachgate_auth_total{result="ok"}': 2,
        'attachgate_auth_total{result="failed"}': 1,
        "attachgate_attachment_bytes_linked_total": 2000,
        'attachgate_refusals_total{case="relay_denied"}': 1,
    }


# --- rendering ---------------------------------------------------------------------------


def test_render_of_nothing_has_every_family_at_zero() -> None:
    text = render({}, {}, {"version": "1.2.3"})
    types = check_exposition(text)
    assert types == {
        **dict.fromkeys(COUNTERS, "counter"),
        **dict.fromkeys(GAUGES, "gauge"),
        "attachgate_info": "gauge",
    }
    lines = text.splitlines()
    for name, help_text in COUNTERS.items():
        at = lines.index(f"# HELP {name} {help_text}")
        assert lines[at + 1 : at + 3] == [f"# TYPE {name} counter", f"{name} 0"]
    for name, help_text in GAUGES.items():
        at = lines.index(f"# HELP {name} {help_text}")
        assert lines[at + 1 : at + 3] == [f"# TYPE {name} gauge", f"{name} 0"]
    assert lines[-3:] == [
        "# HELP attachgate_info The running version.",
        "# TYPE attachgate_info gauge",
        'attachgate_info{version="1.2.3"} 1',
    ]
    samples = parse_exposition(text)
    assert samples == {
        **dict.fromkeys(COUNTERS, 0.0),
        **dict.fromkeys(GAUGES, 0.0),
        'attachgate_info{version="1.2.3"}': 1.0,
    }


def test_render_shows_counted_samples_and_gauges() -> None:
    counters = {
        'attachgate_auth_total{result="ok"}': 7,
        'attachgate_auth_total{result="failed"}': 3,
        "attachgate_downloads_total": 12,
        'attachgate_messages_total{outcome="delivered"}': 5,
        'attachgate_messages_total{outcome="deferred"}': 1,
        # Not declared (a counter an older version kept): not shown.
        "attachgate_retired_total": 9,
        'attachgate_retired_total{x="y"}': 9,
    }
    gauges = {"attachgate_frozen_accounts": 2, "attachgate_banned_addresses": 4}
    text = render(counters, gauges, {"version": "0.1.0"})
    samples = parse_exposition(text)
    assert "attachgate_retired_total" not in text
    expected: dict[str, float] = dict.fromkeys(COUNTERS, 0.0)
    for name in (
        "attachgate_auth_total",
        "attachgate_downloads_total",
        "attachgate_messages_total",
    ):
        del expected[name]  # a counted family shows its samples, no unlabelled 0
    expected.update(
        {
            'attachgate_auth_total{result="failed"}': 3,
            'attachgate_auth_total{result="ok"}': 7,
            "attachgate_downloads_total": 12,
            'attachgate_messages_total{outcome="deferred"}': 1,
            'attachgate_messages_total{outcome="delivered"}': 5,
            "attachgate_frozen_accounts": 2,
            "attachgate_banned_addresses": 4,
            'attachgate_info{version="0.1.0"}': 1,
        }
    )
    assert samples == expected
    # A family's samples come sorted, right after its TYPE line.
    lines = text.splitlines()
    at = lines.index("# TYPE attachgate_auth_total counter")
    assert lines[at + 1 : at + 3] == [
        'attachgate_auth_total{result="failed"} 3',
        'attachgate_auth_total{result="ok"} 7',
    ]
    assert lines[at + 3].startswith("# HELP ")


def test_render_keeps_escaped_label_values_on_one_line() -> None:
    odd = 'a\\b "c"\nd'
    key = sample_key("attachgate_refusals_total", {"case": odd})
    text = render({key: 1}, {}, {"version": 'v"1\n\\'})
    samples = parse_exposition(text)
    assert samples[key] == 1
    assert labels_of(key) == {"case": odd}
    info = [k for k in samples if k.startswith("attachgate_info")]
    assert [labels_of(k) for k in info] == [{"version": 'v"1\n\\'}]


def test_every_declared_name_is_a_valid_metric_name() -> None:
    for name in (*COUNTERS, *GAUGES):
        assert re.fullmatch(METRIC_NAME, name), name
        assert name.startswith("attachgate_")
    for name in COUNTERS:
        assert name.endswith("_total"), name
    for name, help_text in {**COUNTERS, **GAUGES}.items():
        assert "\n" not in help_text and "\\" not in help_text, name


# --- flushing to a real store -------------------------------------------------------------


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStateStore]:
    opened = await SqliteStateStore.open(tmp_path / "state.db")
    yield opened
    await opened.close()


async def test_flush_adds_to_the_store(store: SqliteStateStore) -> None:
    m = Metrics()
    m.inc("attachgate_downloads_total")
    m.inc("attachgate_auth_total", result="failed")
    m.inc("attachgate_auth_total", result="failed")
    await m.flush(store)
    assert m.pending == {}
    assert await store.counters() == {
        "attachgate_downloads_total": 1,
        'attachgate_auth_total{result="failed"}': 2,
    }
    m.inc("attachgate_downloads_total", 4)
    await m.flush(store)
    await m.flush(store)  # nothing new: nothing added
    assert await store.counters() == {
        "attachgate_downloads_total": 5,
        'attachgate_auth_total{result="failed"}': 2,
    }


async def test_failed_flush_keeps_the_counts_for_the_next_try(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = await SqliteStateStore.open(path)
    await store.close()
    m = Metrics()
    m.inc("attachgate_downloads_total", 3)
    m.inc("attachgate_refusals_total", case="relay_denied")
    with pytest.raises(StateUnavailable):
        await m.flush(store)
    assert dict(m.pending) == {
        "attachgate_downloads_total": 3,
        'attachgate_refusals_total{case="relay_denied"}': 1,
    }
    m.inc("attachgate_downloads_total")
    with pytest.raises(StateUnavailable):
        await m.flush(store)
    assert dict(m.pending) == {
        "attachgate_downloads_total": 4,
        'attachgate_refusals_total{case="relay_denied"}': 1,
    }
    store = await SqliteStateStore.open(path)
    try:
        await m.flush(store)
        assert m.pending == {}
        assert await store.counters() == {
            "attachgate_downloads_total": 4,
            'attachgate_refusals_total{case="relay_denied"}': 1,
        }
    finally:
        await store.close()


class GatedStore(SqliteStateStore):
    """A real SQLite store whose ``add_counters`` waits for the test."""

    entered: asyncio.Event
    release: asyncio.Event
    fail: bool

    async def add_counters(self, deltas: Mapping[str, int]) -> None:
        self.entered.set()
        await self.release.wait()
        if self.fail:
            raise StateUnavailable("injected")
        await super().add_counters(deltas)


async def open_gated(path: Path, *, fail: bool) -> GatedStore:
    store = await GatedStore.open(path)
    assert isinstance(store, GatedStore)
    store.entered, store.release, store.fail = asyncio.Event(), asyncio.Event(), fail
    return store


@pytest.mark.parametrize("fail", [False, True])
async def test_counts_made_during_a_flush_are_kept(tmp_path: Path, fail: bool) -> None:
    store = await open_gated(tmp_path / "state.db", fail=fail)
    try:
        m = Metrics()
        m.inc("attachgate_downloads_total", 2)
        flushing = asyncio.create_task(m.flush(store))
        await store.entered.wait()
        # The flush is under way: these counts arrive meanwhile.
        m.inc("attachgate_downloads_total", 5)
        m.inc("attachgate_landing_views_total")
        store.release.set()
        if fail:
            with pytest.raises(StateUnavailable):
                await flushing
            assert dict(m.pending) == {
                "attachgate_downloads_total": 7,
                "attachgate_landing_views_total": 1,
            }
            assert await store.counters() == {}
        else:
            await flushing
            assert await store.counters() == {"attachgate_downloads_total": 2}
            assert dict(m.pending) == {
                "attachgate_downloads_total": 5,
                "attachgate_landing_views_total": 1,
            }
        store.fail = False
        await m.flush(store)
        assert m.pending == {}
        assert await store.counters() == {
            "attachgate_downloads_total": 7,
            "attachgate_landing_views_total": 1,
        }
    finally:
        await store.close()


async def test_concurrent_flushes_add_each_count_once(store: SqliteStateStore) -> None:
    m = Metrics()
    for _ in range(50):
        m.inc("attachgate_downloads_total")
        await asyncio.gather(m.flush(store), m.flush(store))
    assert await store.counters() == {"attachgate_downloads_total": 50}
    assert m.pending == {}


async def wait_for_counters(store: SqliteStateStore, wanted: dict[str, int]) -> None:
    async with asyncio.timeout(10):
        while await store.counters() != wanted:
            await asyncio.sleep(0.01)


async def test_run_flushes_periodically_and_once_more_when_cancelled(
    store: SqliteStateStore,
) -> None:
    m = Metrics()
    runner = asyncio.create_task(m.run(store, interval=0.01))
    m.inc("attachgate_downloads_total")
    await wait_for_counters(store, {"attachgate_downloads_total": 1})
    m.inc("attachgate_downloads_total", 2)
    await wait_for_counters(store, {"attachgate_downloads_total": 3})
    runner.cancel()
    with pytest.raises(asyncio.CancelledError):
        await runner
    # Long interval: only the flush at cancellation can bring this count in.
    runner = asyncio.create_task(m.run(store, interval=3600))
    await asyncio.sleep(0)
    m.inc("attachgate_landing_views_total", 4)
    runner.cancel()
    with pytest.raises(asyncio.CancelledError):
        await runner
    assert m.pending == {}
    assert await store.counters() == {
        "attachgate_downloads_total": 3,
        "attachgate_landing_views_total": 4,
    }


async def test_run_survives_an_unavailable_store(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = await SqliteStateStore.open(tmp_path / "state.db")
    await store.close()
    m = Metrics()
    m.inc("attachgate_downloads_total")
    runner = asyncio.create_task(m.run(store, interval=0.01))
    async with asyncio.timeout(10):
        while not any("metrics flush failed" in r.getMessage() for r in caplog.records):
            await asyncio.sleep(0.01)
    assert not runner.done()
    runner.cancel()
    with pytest.raises(asyncio.CancelledError):
        await runner
    assert dict(m.pending) == {"attachgate_downloads_total": 1}


# --- the /metrics listener over real HTTP -------------------------------------------------


async def test_scrape_sums_two_workers_sharing_one_store(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store_a = await SqliteStateStore.open(path)
    store_b = await SqliteStateStore.open(path)
    clock = FakeClock()
    try:
        worker_a, worker_b = Metrics(), Metrics()
        worker_a.inc("attachgate_downloads_total", 2)
        worker_a.inc("attachgate_auth_total", result="ok")
        await worker_a.flush(store_a)  # worker A's own periodic flush
        worker_b.inc("attachgate_downloads_total", 3)
        worker_b.inc("attachgate_auth_total", result="failed")
        worker_b.inc("attachgate_attachment_bytes_linked_total", 123_456)
        # Gauges come from the shared state: one frozen account (and one
        # disabled, not frozen), one live ban, one ban that ran out.
        assert await store_a.freeze("alice@example.test", "test", clock())
        assert await store_a.set_disabled("bob@example.test", True)
        await store_a.ban("192.0.2.1", clock() + 600, "test", clock())
        await store_a.ban("192.0.2.2", clock() - 1, "test", clock() - 600)
        # Worker A's counts since its flush are not seen by a scrape of B.
        worker_a.inc("attachgate_downloads_total", 100)

        app = build_metrics_app(store_b, worker_b, version="9.9.9", clock=clock)
        async with TestClient(TestServer(app)) as client:
            resp = await client.get("/metrics")
            assert resp.status == 200
            assert resp.headers["Content-Type"] == CONTENT_TYPE
            assert resp.content_type == "text/plain"
            assert "version=0.0.4" in resp.headers["Content-Type"]
            text = await resp.text()
            missing = await client.get("/other")
            assert missing.status == 404
            posted = await client.post("/metrics")
            assert posted.status == 405

        assert worker_b.pending == {}  # the scrape flushed B
        samples = parse_exposition(text)
        assert samples["attachgate_downloads_total"] == 5
        assert samples['attachgate_auth_total{result="ok"}'] == 1
        assert samples['attachgate_auth_total{result="failed"}'] == 1
        assert samples["attachgate_attachment_bytes_linked_total"] == 123_456
        assert samples["attachgate_frozen_accounts"] == 1
        assert samples["attachgate_banned_addresses"] == 1
        assert samples['attachgate_info{version="9.9.9"}'] == 1
        nonzero = {k: v for k, v in samples.items() if v and k.split("{")[0] in COUNTERS}
        assert nonzero == {
            "attachgate_downloads_total": 5,
            'attachgate_auth_total{result="ok"}': 1,
            'attachgate_auth_total{result="failed"}': 1,
            "attachgate_attachment_bytes_linked_total": 123_456,
        }
        assert await store_a.counters() == {
            "attachgate_downloads_total": 5,
            'attachgate_auth_total{result="ok"}': 1,
            'attachgate_auth_total{result="failed"}': 1,
            "attachgate_attachment_bytes_linked_total": 123_456,
        }
    finally:
        await store_a.close()
        await store_b.close()


async def test_scrape_answers_503_when_the_store_is_unavailable(tmp_path: Path) -> None:
    store = await SqliteStateStore.open(tmp_path / "state.db")
    m = Metrics()
    m.inc("attachgate_downloads_total", 2)
    app = build_metrics_app(store, m, version="0.1.0")
    async with TestClient(TestServer(app)) as client:
        resp = await client.get("/metrics")
        assert resp.status == 200
        assert parse_exposition(await resp.text())["attachgate_downloads_total"] == 2

        await store.close()
        m.inc("attachgate_downloads_total", 3)
        resp = await client.get("/metrics")
        assert resp.status == 503
        assert resp.content_type == "text/plain"
        assert await resp.text() == "state store unavailable\n"
    # The counts the failed scrape could not flush are kept.
    assert dict(m.pending) == {"attachgate_downloads_total": 3}
