"""The limits on what enters sitelink are stated where users read them, and
the private parts of paho that the child's MQTT boundary relies on exist."""

import re

import paho.mqtt.client as mqtt
from paho.mqtt import _packet

from shared import config, limits, protocol
from services.connection import MAX_PUBLISH_HEADER, ReadAheadClient

README = (config.PROJECT_ROOT / "README.md").read_text()


def section(title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", README, re.S | re.M)
    assert match, f"README has no section {title!r}"
    return match.group(1)


def test_every_limit_is_in_the_security_section_with_its_value():
    text = section("Security and limits").replace(",", "")
    for name, value in [("MAX_NAME_CHARS", limits.MAX_NAME_CHARS), ("MAX_SENSORS", limits.MAX_SENSORS),
                        ("MAX_METRICS", limits.MAX_METRICS), ("MAX_VALUES", limits.MAX_VALUES),
                        ("MAX_RECORDS", limits.MAX_RECORDS),
                        ("MAX_FRAME_BYTES", protocol.MAX_FRAME_BYTES // 2**20),
                        ("MAX_BATCH_EVENTS", protocol.MAX_BATCH_EVENTS),
                        ("MAX_WHOLE_PAYLOAD_BYTES", f"{protocol.MAX_WHOLE_PAYLOAD_BYTES // 2**20} MiB"),
                        ("MAX_PAYLOAD_SAMPLE_BYTES", f"{protocol.MAX_PAYLOAD_SAMPLE_BYTES // 1024} KiB")]:
        assert str(value) in text, f"{name} ({value}) is not stated in README's Security and limits"
    for variable in ("SITELINK_MAX_PAYLOAD", "SITELINK_MAX_UNACKED_BYTES", "SITELINK_MAX_UNACKED",
                     "SITELINK_RUNTIME_DIR", "SITELINK_BATCH_MAX"):
        assert variable in text
    assert str(MAX_PUBLISH_HEADER // 1024) in text


def test_the_private_parts_of_paho_we_rely_on_exist():
    client = ReadAheadClient(mqtt.CallbackAPIVersion.VERSION2, client_id="probe", manual_ack=True)
    for name in ("_sock_recv", "_sock_close", "_handle_publish", "_handle_pubrel", "_send_pubrec",
                 "_send_pubcomp", "_send_pingreq", "_handle_on_message", "_packet_queue"):
        assert callable(getattr(mqtt.Client, name, None)), name
    for name in ("_in_packet", "_ping_t", "_in_messages", "_in_message_mutex", "_manual_ack", "_protocol",
                 "_keepalive", "_last_msg_out", "_last_bytes_received", "_in_callback_mutex", "_msgtime_mutex",
                 "_userdata"):
        assert hasattr(client, name), name
    assert {"command", "packet", "remaining_length", "to_process"} <= set(client._in_packet)
    assert callable(_packet.decode_pubrel)
    assert hasattr(mqtt.MQTTMessage(topic=b"t"), "_topic")
