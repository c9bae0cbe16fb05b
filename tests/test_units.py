"""Pure logic: backoff, payload samples, connection settings checks."""

import json
import random

import pytest

from services.logger import URGENT_BURST, URGENT_BURST_WINDOW, Bursts, payload_sample
from shared import backoff
from shared.connections import ConnectionSettings
from tests.bench.results import service_env


def test_backoff_grows_to_the_cap_with_jitter():
    rng = random.Random(1)
    for attempt in range(1, 12):
        nominal = min(0.5 * 2 ** (attempt - 1), 8.0)
        for _ in range(20):
            assert nominal / 2 <= backoff.delay(attempt, 0.5, 8.0, rng) <= nominal
    with pytest.raises(ValueError):
        backoff.delay(0, 1, 2)


def test_payload_sample_keeps_json():
    assert json.loads(payload_sample(b'{"a": [1, 2]}')) == {"a": [1, 2]}


@pytest.mark.parametrize("raw", [b"\xff\xfe\x00abc", b'{"a": "\\u0000"}', b"x\x00y", b"{bad",
                                 b'{"a": NaN}', b"[" * 100000])
def test_payload_sample_takes_any_bytes(raw):
    doc = json.loads(payload_sample(raw))
    assert "sample" in doc and "\x00" not in doc["sample"]


def test_payload_sample_is_cut_to_5000_characters():
    doc = json.loads(payload_sample(json.dumps({"k": "x" * 20000}).encode()))
    assert doc["truncated"] is True and len(doc["sample"]) == 5000


def settings(**kw):
    base = dict(connection_id=1, site_id=1, broker_host="h", broker_port=1883)
    return ConnectionSettings(**{**base, **kw})


def test_settings_problems_are_plain():
    assert settings().problems() == []
    assert "unknown parser" in settings(parser_name="nope").problems()[0]
    assert "topic" in settings(topics=("a/#/b",)).problems()[0]
    assert "does not exist" in settings(use_tls=True, tls_ca_path="/nonexistent/ca.pem").problems()[0]


def test_fingerprint_follows_broker_settings_only():
    assert settings().fingerprint == settings(monitor_pid=5).fingerprint
    assert settings().fingerprint != settings(password="x", username="u").fingerprint
    assert settings().effective_client_id == "sitelink-1"


def test_a_lone_status_change_is_due_at_once():
    """A connection going up or down, or several in a row at a human pace, never waits for company."""
    bursts = Bursts()
    assert [bursts.arrived(t) for t in (0.0, 0.002)] == [False, False]  # connecting, connected
    assert not any(bursts.arrived(1.0 + n * URGENT_BURST_WINDOW / 10) for n in range(100))


def test_a_burst_of_status_changes_is_seen_by_its_rate():
    bursts = Bursts()
    seen = [bursts.arrived(n * 0.002) for n in range(URGENT_BURST + 5)]
    assert seen == [False] * (URGENT_BURST - 1) + [True] * 6
    # Once the burst is over, the next change is lone again.
    assert not bursts.arrived(10.0)


def test_a_bench_run_changes_only_settings_the_services_have():
    assert service_env("") == {}
    assert service_env("SITELINK_BATCH_WAIT=0.05  SITELINK_CONNECT_RATE=1000") == {
        "SITELINK_BATCH_WAIT": "0.05", "SITELINK_CONNECT_RATE": "1000"}
    for bad in ("SITELINK_BATCH_WAIT", "SITELINK_NO_SUCH=1", "batch_wait=1", "=1"):
        with pytest.raises(ValueError, match="SITELINK_BENCH_SERVICE_ENV"):
            service_env(bad)
