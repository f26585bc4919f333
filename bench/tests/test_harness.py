"""The harness's own checks: receivers count what they get, figures come out right."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from bench.config import BenchConfig, scenario
from bench.harness import ReceiverPool, SubmitResult, drive_async
from bench.measure import Figure, RunResult, fill, percentile
from bench.payloads import Item, encode, make_items
from bench.profile import EVENT_LOOP, read_profile, write_profile_report
from bench.receivers import fails_first
from bench.report import write_chart, write_markdown


@pytest.fixture
async def receivers(tmp_path: Path) -> AsyncIterator[ReceiverPool]:
    pool = ReceiverPool(tmp_path, endpoints=3)
    try:
        yield pool
    finally:
        await pool.close()


async def _post(session: aiohttp.ClientSession, url: str, notification_id: str) -> int:
    async with session.post(url, data=b"{}", headers={"webhook-id": notification_id}) as reply:
        return reply.status


async def test_receivers_count_posts_per_id_and_first_success(receivers: ReceiverPool) -> None:
    await receivers.reset()
    async with aiohttp.ClientSession() as session:
        assert await _post(session, receivers.urls[0], "a") == 204
        assert await _post(session, receivers.urls[0], "a") == 204
        assert await _post(session, receivers.urls[2], "b") == 204
    report = await receivers.report()
    assert report["posts"] == 3
    assert report["delivered"] == 2
    assert report["seen"]["a"][0] == 2
    assert report["seen"]["a"][2] == 0
    assert report["seen"]["b"][2] == 2
    await receivers.reset()
    assert (await receivers.progress())["posts"] == 0


async def test_flaky_receivers_refuse_the_first_post_of_the_chosen_ids_only(
    receivers: ReceiverPool,
) -> None:
    ids = [f"n-{i}" for i in range(200)]
    chosen = [i for i in ids if fails_first(i, 30)]
    assert 40 <= len(chosen) <= 80  # CRC32 spreads ids evenly enough
    await receivers.reset({"flaky_percent": 30})
    async with aiohttp.ClientSession() as session:
        first = {i: await _post(session, receivers.urls[1], i) for i in ids}
        second = {i: await _post(session, receivers.urls[1], i) for i in chosen}
    assert {i for i, status in first.items() if status == 500} == set(chosen)
    assert set(second.values()) == {204}
    progress = await receivers.progress()
    assert progress["delivered"] == 200
    assert progress["posts"] == 200 + len(chosen)


async def test_a_hanging_endpoint_never_counts_a_success(receivers: ReceiverPool) -> None:
    await receivers.reset({"hang": [1], "hang_s": 0.2})
    async with aiohttp.ClientSession() as session:
        assert await _post(session, receivers.urls[1], "slow") == 204
    progress = await receivers.progress()
    assert progress["posts"] == 1
    assert progress["delivered"] == 0


async def test_paced_producers_keep_to_the_rate() -> None:
    items = make_items("t", 20, 4, 128)

    async def submit(item: Item) -> str:
        return f"id-{item.index}"

    started = time.monotonic()
    result = await drive_async(items, 8, 100.0, time.monotonic() + 30, submit)
    took_s = time.monotonic() - started
    assert len(result.accepted) == 20
    assert 0.18 <= took_s < 1.0  # the 20th item is due 0.19 s after the first


def test_items_are_the_same_bytes_tidings_would_store() -> None:
    items = make_items("x", 5, 20, 256)
    assert [item.endpoint for item in items] == [0, 1, 2, 3, 4]
    assert all(item.body == encode(item.payload) for item in items)
    assert all(250 <= len(item.body) <= 256 for item in items)
    assert items[3].topic == "bench.e03"


def test_figures_come_from_first_submit_to_last_receipt() -> None:
    config = BenchConfig(endpoints=4, hang_endpoints=1)
    s2 = scenario("S2", config)
    submitted = SubmitResult(t0=100.0, t_end=101.0)
    submitted.accepted = {"a": (0, 100.5), "b": (1, 100.6), "c": (3, 100.7)}
    report = {"seen": {"a": [1, 101.0, 0], "b": [2, 102.5, 1], "c": [1, None, 3]}}
    result = RunResult("x", "S2", 0, 3)
    fill(result, s2, submitted, report)
    assert result.target == 2  # endpoint 3 hangs
    assert result.delivered == 2
    assert result.posts == 4
    assert result.duration_s == pytest.approx(2.5)
    assert result.delivery_rate == pytest.approx(0.8)
    assert result.submit_rate == pytest.approx(3.0)
    assert result.p50_ms == pytest.approx(500.0)
    assert result.p99_ms == pytest.approx(1900.0)


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == 50.0
    assert percentile(values, 0.99) == 99.0
    assert percentile([], 0.5) is None


def _figure(
    system: str,
    scenario_name: str,
    rate: float,
    p99_ms: float = 1.0,
    cpu_total_ms: float | None = None,
) -> Figure:
    return Figure(
        system=system,
        scenario=scenario_name,
        runs=3,
        delivery_rate=rate,
        submit_rate=rate,
        duration_s=1.0,
        posts_per_notification=1.0,
        p50_ms=p99_ms / 2,
        p99_ms=p99_ms,
        peak_rss_mb=100.0,
        cpu_producers_ms=None if cpu_total_ms is None else cpu_total_ms / 4,
        cpu_system_ms=None if cpu_total_ms is None else cpu_total_ms / 2,
        cpu_receivers_ms=None if cpu_total_ms is None else cpu_total_ms / 4,
        cpu_total_ms=cpu_total_ms,
        load=1.0,
        delivered=10,
        target=10,
        problems=(),
    )


def test_the_report_gives_tidings_ratios_to_celery_and_raw(tmp_path: Path) -> None:
    config = BenchConfig()
    found = {
        ("raw", "S1"): _figure("raw", "S1", 4000.0, cpu_total_ms=0.4),
        ("celery", "S1"): _figure("celery", "S1", 400.0),
        ("tidings", "S1"): _figure("tidings", "S1", 2400.0, cpu_total_ms=0.8),
        ("tidings", "S5"): _figure("tidings", "S5", 1200.0, p99_ms=40.0),
    }
    systems = [("raw", "raw"), ("celery", "Celery"), ("tidings", "Tidings embedded")]
    md = tmp_path / "latest.md"
    write_markdown(
        md,
        title_line="test",
        command="python -m bench.run",
        config=config,
        machine={"CPU": "test"},
        setup=["setup line"],
        scenarios=[scenario("S1", config), scenario("S5", config)],
        systems=systems,
        found=found,
        notes=["a note"],
        usable_cores=2,
    )
    text = md.read_text()
    assert "| Tidings embedded | 2,400 | 2,400 |" in text
    assert "| 6.00 | 0.60 | 1.0 |" in text  # x Celery, x raw, load
    assert "| S1: Tidings embedded >= 5x Celery | 6.00x | yes |" in text
    assert "| S1: Tidings embedded >= 0.5x raw limit | 0.60x | yes |" in text
    assert "| S5: Tidings embedded p99 <= 50 ms | 40.0 ms | yes |" in text
    assert "| S4: Tidings embedded >= 0.9x its S1 | — | not measured |" in text
    # producers, system, receivers, total ms per notification; 2 cores x 1000 / total
    assert "| Tidings embedded | 0.200 | 0.400 | 0.200 | 0.800 | 2,500 | 2,400 |" in text
    assert "| raw | 0.100 | 0.200 | 0.100 | 0.400 | 5,000 | 4,000 |" in text
    assert "| Celery | — | — | — | — | — | 400 |" in text
    assert text.count("CPU ceiling/s = 2 usable cores") == 1  # S5 measured no CPU
    png = tmp_path / "latest.png"
    write_chart(png, [scenario("S1", config), scenario("S5", config)], systems, found)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_profile_counts_self_and_inclusive_samples(tmp_path: Path) -> None:
    collapsed = tmp_path / "profile.txt"
    collapsed.write_text(
        "thread (0x1);Runner.run (asyncio/runners.py:118);claim_due (tidings/stores/sql.py:9) 30\n"
        "thread (0x1);Runner.run (asyncio/runners.py:118) 10\n"
        "thread (0x2);_connection_worker_thread (aiosqlite/core.py:59) 60\n"
    )
    found = read_profile(collapsed)
    assert found.total == 100
    assert found.own["claim_due (tidings/stores/sql.py)"] == 30
    assert found.inclusive["Runner.run (asyncio/runners.py)"] == 40
    assert found.packages["aiosqlite"] == 60
    assert found.threads[EVENT_LOOP] == 40
    by_self = write_profile_report(tmp_path / "profile.md", collapsed, "profile.svg", ["ctx"])
    assert by_self[0].function == "_connection_worker_thread (aiosqlite/core.py)"
    assert by_self[0].self_percent == pytest.approx(60.0)
    assert (
        "| `claim_due (tidings/stores/sql.py)` | 30.0 | 30.0 |"
        in (tmp_path / "profile.md").read_text()
    )
