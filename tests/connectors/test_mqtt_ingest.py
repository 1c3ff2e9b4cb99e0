"""`MqttIngest.handle_message` against arbitrary topics and bytes, and the small pure
helpers (topic parsing, broker URLs, the internal credential)."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from plantwatch.app import Container
from plantwatch.connectors.mqtt import (
    STORED,
    MqttIngest,
    MqttUrl,
    internal_password,
    is_internal,
    parse_telemetry_topic,
)
from plantwatch.connectors.mqtt_client import _read_varint, _varint
from tests.conftest import LoggedIn
from tests.connectors.conftest import rows, stored_points
from tests.telemetry.conftest import KeyedDevice, now_ms


def test_topic_parsing() -> None:
    assert parse_telemetry_topic("factories/acme/devices/M01/telemetry") == ("acme", "M01")
    for bad in (
        "factories/acme/devices/M01",
        "factories/acme/devices/M01/telemetry/x",
        "factories//devices/M01/telemetry",
        "factories/acme/devices//telemetry",
        "plants/acme/devices/M01/telemetry",
        "",
    ):
        assert parse_telemetry_topic(bad) is None, bad


def test_broker_urls() -> None:
    url = MqttUrl.parse("mqtt://ingest:s%40cret@broker.example:1884")
    assert (url.host, url.port, url.tls, url.username, url.password) == (
        "broker.example",
        1884,
        False,
        "ingest",
        "s@cret",
    )
    assert url.display == "mqtt://ingest@broker.example:1884"  # never the password
    assert MqttUrl.parse("mqtts://b.example").port == 8883
    assert MqttUrl.parse("mqtt://[::1]").display == "mqtt://[::1]:1883"
    for bad in ("http://b.example", "mqtt://", "mqtt://b:99999"):
        with pytest.raises(ValueError):
            MqttUrl.parse(bad)


def test_internal_credential_comes_from_the_secret() -> None:
    password = internal_password("a" * 40)
    assert password == internal_password("a" * 40) != internal_password("b" * 40)
    assert is_internal("$plantwatch", password, "a" * 40)
    assert not is_internal("$plantwatch", password, "b" * 40)
    assert not is_internal("M01", password, "a" * 40)


@given(st.integers(min_value=0, max_value=268_435_455))
def test_variable_byte_integers_round_trip(n: int) -> None:
    encoded = _varint(n)
    assert _read_varint(encoded, 0) == (n, len(encoded))
    assert _read_varint(encoded[:-1], 0) is None


KNOWN = "factories/acme/devices/M01/telemetry"
topics = st.one_of(
    st.just(KNOWN),  # weighted: half the examples exercise the payload checks
    st.just(KNOWN),
    st.just(KNOWN),
    st.sampled_from(
        [
            KNOWN,
            "factories/acme/devices/NEW-1/telemetry",
            "factories/acme/devices/bad key/telemetry",
            "factories/acme/devices/M01\n/telemetry",
            "factories/nope/devices/M01/telemetry",
            "factories/ACME/devices/M01/telemetry",
            "factories//devices//telemetry",
            KNOWN + "/extra",
            "",
        ]
    ),
    st.text(max_size=60),
    st.builds(
        "factories/{}/devices/{}/telemetry".format,
        st.text(max_size=12),
        st.text(max_size=12),
    ),
)
scalars = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.booleans(),
    st.text(max_size=8),
    st.none(),
)
entries = st.fixed_dictionaries(
    {"values": st.dictionaries(st.text(max_size=10), scalars, max_size=4)},
    optional={"ts": st.one_of(st.integers(), st.just(now_ms()), st.text(max_size=5))},
)


def _dumps(document: Any) -> bytes:
    def default(value: Any) -> Any:
        raise TypeError

    try:
        return orjson.dumps(document, default=default)
    except (TypeError, orjson.JSONEncodeError):
        return b'{"values": {"x": 1}}'


payload_bytes = st.one_of(
    st.binary(max_size=120),
    entries.map(_dumps),
    st.lists(entries, max_size=3).map(_dumps),
    st.just(b'{"values": {"temp": 20.5}}'),
)


async def test_arbitrary_topics_and_bytes_never_crash_and_every_reject_is_a_dead_letter(
    container: Container, mqtt_ingest: MqttIngest, device_a: KeyedDevice, admin_a: LoggedIn
) -> None:
    loop = asyncio.get_running_loop()
    seen: dict[str, int] = {}

    async def one(topic: str, payload: bytes) -> None:
        before = await rows(container, "SELECT coalesce(max(id), 0) FROM dead_letters")
        result = await mqtt_ingest.handle_message(topic, payload)
        seen[result] = seen.get(result, 0) + 1
        added = await rows(
            container,
            "SELECT reason, source FROM dead_letters WHERE id > :last",
            last=before[0][0],
        )
        if result != STORED:
            assert added, (topic, payload, result)
            assert (result, "mqtt") in added, (topic, payload, result, added)
        assert all(reason for reason, _ in added)

    @settings(
        max_examples=60,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(topics, payload_bytes)
    def check(topic: str, payload: bytes) -> None:
        asyncio.run_coroutine_threadsafe(one(topic, payload), loop).result(timeout=30)

    await asyncio.to_thread(check)
    # The strategies reach the interesting outcomes, not only one kind of reject.
    assert seen.get(STORED, 0) > 0 and seen.get("invalid_topic", 0) > 0, seen
    assert len(seen) >= 4, seen


async def test_a_valid_message_stores_every_value_once(
    container: Container, mqtt_ingest: MqttIngest, device_a: KeyedDevice
) -> None:
    body = orjson.dumps({"ts": now_ms(), "values": {"a": 1.5, "b": math.pi, "on": True}})
    assert await mqtt_ingest.handle_message(KNOWN, body) == STORED
    assert await mqtt_ingest.handle_message(KNOWN, body) == STORED  # a redelivery
    assert await stored_points(container, device_a.id) == 3


async def test_replayed_dead_letters_keep_what_the_device_sent(
    client: httpx.AsyncClient,
    container: Container,
    mqtt_ingest: MqttIngest,
    admin_a: LoggedIn,
) -> None:
    raw = b'{"ts": 1, "values": {"\\u0000": 1}}'
    result = await mqtt_ingest.handle_message("factories/acme/devices/NEW\x00/telemetry", raw)
    assert result == "invalid_topic"
    stored = await rows(container, "SELECT payload, topic FROM dead_letters")
    assert stored == [(raw, "factories/acme/devices/NEW\\x00/telemetry")]
