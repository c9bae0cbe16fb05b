"""What an attacker (or a broken process) can put on the logger's socket:
the cases the unit tests feed to ``protocol.decode_events`` and the real
processes of ``tests/test_hostile.py`` and the soak benchmark face."""

from __future__ import annotations

import json
import math
import random
import time

import msgpack

from shared import limits, protocol


def doc(kind="connlog", body=None, *, cid=1, **header):
    """An event envelope as a map, valid unless ``body``/``header`` say otherwise."""
    d = {"v": protocol.VERSION, "k": kind, "s": f"conn:{cid}", "i": "12.ab", "n": 3, "f": 0, "t": time.time(),
         "b": {"connection_id": cid, "level": "INFO", "message": "m"} if body is None else body}
    d.update(header)
    return d


def pack(d) -> bytes:
    return msgpack.packb(d, use_bin_type=True)


def envelopes(cid: int, other: int) -> list[tuple[str, dict, bool]]:
    """(name, envelope map, whether the logger can tell whose it is) for
    connection ``cid``; ``other`` is another connection's id."""
    now = time.time()
    message = {"connection_id": cid, "level": "INFO", "message": "m"}
    data = {"connection_id": cid, "topic": "t", "gateway": "GW", "ts": now, "sensors": {"S": {"t": 1.0}}}
    status = {"connection_id": cid, "status": "error", "message": "m"}
    parsefail = {"connection_id": cid, "topic": "t", "parser_name": "json", "error_type": "PARSE_ERROR",
                 "error_message": "m", "payload": b"x"}
    cycle = {"instance_id": "m1", "running": 1, "started": 0, "stopped": 0, "offline": {}, "duration": 0.0}

    def d(kind="connlog", body=None, **header):
        return doc(kind, message if body is None else body, cid=cid, **header)
    return [
        ("seq beyond bigint", d(n=2**63), False),
        ("seq beyond 64 bits", d(n=2**64 - 1), False),
        ("seq zero", d(n=0), False),
        ("floor not below seq", d(n=3, f=3), True),
        ("negative floor", d(f=-1), True),
        ("floor beyond bigint", d(f=2**63 + 5), True),
        ("NaN timestamp", d(t=math.nan), True),
        ("infinite timestamp", d(t=math.inf), True),
        ("timestamp in 2100", d(t=4102444800.0), True),
        ("timestamp 1e300", d(t=1e300), True),
        ("timestamp as text", d(t="now"), True),
        ("unknown kind", d(kind="launch"), True),
        ("body not a map", d(body=[1, 2]), True),
        ("connection id beyond bigint", d(body={**message, "connection_id": 2**63}), True),
        ("connection id zero", d(body={**message, "connection_id": 0}), True),
        ("connection id as text", d(body={**message, "connection_id": str(cid)}), True),
        ("another connection's event", d(body={**message, "connection_id": other}), True),
        ("a child sending a monitor cycle", d(kind="cycle", body={
            "instance_id": "m", "running": 1, "started": 0, "stopped": 0, "offline": {}, "duration": 0.0}), True),
        ("a monitor sending data", d(kind="data", s="monitor:m1", body=data), True),
        *((f"a cycle's parts {what}", d(kind="cycle", s="monitor:m1", body={**cycle, "parts": parts}), True)
          for what, parts in (("not a map", [0.1]), ("of text", {"read": "slow"}), ("negative", {"read": -1.0}),
                              ("NaN", {"read": math.nan}), ("infinite", {"read": math.inf}),
                              ("of a year", {"read": 365 * 86400.0}), ("as booleans", {"read": True}),
                              ("named at length", {"r" * 33: 0.1}),
                              ("too many", {f"p{i}": 0.1 for i in range(17)}))),
        ("level not a level", d(body={**message, "level": "LOUD"}), True),
        ("missing field", d(body={"connection_id": cid, "level": "INFO"}), True),
        ("unknown field", d(body={**message, "extra": 1}), True),
        ("message of a megabyte", d(body={**message, "message": "x" * 2**20}), True),
        ("retry attempt beyond integer", d(body={**message, "retry_attempt": 2**40}), True),
        ("status stamped in 2100", d(kind="status", body=status, t=4102444800.0), True),
        ("status retry time in 3000", d(kind="status", body={**status, "next_retry_at": 32503680000.0}), True),
        ("status not a status", d(kind="status", body={**status, "status": "party"}), True),
        ("gave_up not a bool", d(kind="status", body={**status, "gave_up": 1}), True),
        ("a child's final status", d(kind="status", body={**status, "final": True}), True),
        ("a final status beyond bigint", d(kind="status", s="monitor:m1", n=2**62 + 1,
                                           body={**status, "final": True}), True),
        ("epoch beyond bigint", d(kind="status", body={**status, "epoch": 2**63}), True),
        ("negative epoch", d(kind="status", body={**status, "epoch": -1}), True),
        ("data ts NaN", d(kind="data", body={**data, "ts": math.nan}), True),
        ("data ts in 2100", d(kind="data", body={**data, "ts": 4102444800.0}), True),
        ("gateway with a newline", d(kind="data", body={**data, "gateway": "GW\n2026 | ERROR | forged"}), True),
        ("gateway with an escape", d(kind="data", body={**data, "gateway": "GW\x1b[31m"}), True),
        ("gateway too long", d(kind="data", body={**data, "gateway": "G" * 129}), True),
        ("gateway empty", d(kind="data", body={**data, "gateway": " "}), True),
        ("gateway a number", d(kind="data", body={**data, "gateway": 5}), True),
        ("sensors a list", d(kind="data", body={**data, "sensors": [1]}), True),
        ("metrics a number", d(kind="data", body={**data, "sensors": {"S": 5}}), True),
        ("metrics empty", d(kind="data", body={**data, "sensors": {"S": {}}}), True),
        ("value a string", d(kind="data", body={**data, "sensors": {"S": {"t": "hot"}}}), True),
        ("value a list", d(kind="data", body={**data, "sensors": {"S": {"t": [1.0]}}}), True),
        ("value an integer", d(kind="data", body={**data, "sensors": {"S": {"t": 2**63}}}), True),
        ("value infinite", d(kind="data", body={**data, "sensors": {"S": {"t": math.inf}}}), True),
        ("metric name with U+2028", d(kind="data", body={**data, "sensors": {"S": {"t\u2028": 1.0}}}), True),
        ("too many sensors", d(kind="data", body={**data, "sensors": {
            f"S{i}": {"t": 1.0} for i in range(limits.MAX_SENSORS + 1)}}), True),
        ("too many metrics", d(kind="data", body={**data, "sensors": {
            "S": {f"m{i}": 1.0 for i in range(limits.MAX_METRICS + 1)}}}), True),
        ("too many values", d(kind="data", body={**data, "sensors": {
            f"S{i}": {f"m{j}": 1.0 for j in range(200)} for i in range(60)}}), True),
        ("payload sample too big", d(kind="parsefail", body={
            **parsefail, "payload": b"x" * (protocol.MAX_PAYLOAD_SAMPLE_BYTES + 1)}), True),
        ("payload as text", d(kind="parsefail", body={**parsefail, "payload": "text"}), True),
        ("whole payload beyond what a frame carries", d(kind="parsefail", body={
            **parsefail, "replayable": True, "payload": b"x" * (protocol.MAX_WHOLE_PAYLOAD_BYTES + 1)}), True),
        ("a cut payload offered for replay", d(kind="parsefail", body={
            **parsefail, "replayable": True, "payload_bytes": 10}), True),
        ("payload size below what came", d(kind="parsefail", body={
            **parsefail, "payload": b"xyz", "payload_bytes": 2}), True),
        ("replayable not a bool", d(kind="parsefail", body={**parsefail, "replayable": 1}), True),
    ]


def unattributable() -> list[tuple[str, dict]]:
    """Envelopes whose sender cannot be told apart: they can only be dropped."""
    return [(f"header {h}", doc(**h)) for h in (
        {"s": "root"}, {"s": "conn:0"}, {"s": "conn:x"}, {"s": 5}, {"s": "conn:1\n"},
        {"i": ""}, {"i": "a b"}, {"i": "x" * 65}, {"i": None})]


def frames() -> list[tuple[str, list[bytes]]]:
    """Whole messages that are no event frame at all (each a list of ZeroMQ frames)."""
    rng = random.Random(5)
    return [
        ("garbage", [rng.randbytes(300)]),
        ("empty", [b""]),
        ("not msgpack", [b"\xc1"]),
        ("a list", [msgpack.packb([1, 2])]),
        ("wrong version", [pack(doc(v=99))]),
        ("an ack", [pack({"v": protocol.VERSION, "k": "ack", "i": "x", "u": 1})]),
        ("a batch of too many", [pack({"v": protocol.VERSION, "k": "batch",
                                       "e": [1] * (protocol.MAX_BATCH_EVENTS + 1)})]),
        ("three frames", [b"a", b"b", b"c"]),
        ("deep nesting", [b"\x91" * 100_000 + b"\xc0"]),
    ]


def payloads(limit: int) -> list[tuple[str, bytes, str]]:
    """(name, payload, the error type it must become) for a child whose
    SITELINK_MAX_PAYLOAD is ``limit``."""
    number = b'{"gateway": "G", "ts": 1795860000, "sensors": {"S": {"t": 1'
    return [
        ("not UTF-8", b"\xff\xfe{}", "PARSE_ERROR"),
        ("not JSON", b"{gateway", "PARSE_ERROR"),
        ("empty", b"", "PARSE_ERROR"),
        ("NaN", b'{"gateway": "G", "ts": 1795860000, "sensors": {"S": {"t": NaN}}}', "PARSE_ERROR"),
        ("deep nesting", b"[" * 4000, "PARSE_ERROR"),
        ("huge integer", number + b"0" * 3000 + b"}}}", "VALIDATION_ERROR"),
        ("integer of 5000 digits", number + b"0" * 5000 + b"}}}", "PARSE_ERROR"),
        ("an array", b"[1, 2]", "VALIDATION_ERROR"),
        ("escaped lone surrogate", b'{"gateway": "G\\ud800", "ts": 1795860000}', "VALIDATION_ERROR"),
        ("newline in a sensor name",
         b'{"gateway": "G", "ts": 1795860000, "sensors": {"S\\n2026 | ERROR | x": {"t": 1}}}', "VALIDATION_ERROR"),
        ("terminal escape", b'{"gateway": "G\\u001b[2J", "ts": 1795860000}', "VALIDATION_ERROR"),
        ("NUL in a name", b'{"gateway": "G\\u0000", "ts": 1795860000}', "VALIDATION_ERROR"),
        ("too many sensors", json.dumps({"gateway": "G", "ts": 1795860000,
                                         "sensors": {str(i): {"t": 1} for i in range(1001)}}).encode(),
         "VALIDATION_ERROR"),
        ("over the payload limit", json.dumps({"gateway": "G", "ts": 1795860000, "pad": "x" * limit}).encode(),
         "VALIDATION_ERROR"),
        ("three megabytes", b"{" + b" " * (3 * 2**20) + b"}", "VALIDATION_ERROR"),
    ]
