"""Operator mistakes in mqtt_connection: every row the schema admits runs or
says plainly why not, never a crash loop or a zygote restart loop.

The rules themselves (pure), the schema beside them (the same limits), the
zygote and the child at their boundaries, and one real stack that holds a row
of every kind of mistake, old and new, beside a good site that keeps storing.
"""

from __future__ import annotations

import dataclasses
import os
import pwd
import struct
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
import zmq

from services import connection
from services.zygote import MAX_REQUEST, PID, REFUSED, SpawnRefused, Zygote
from shared import config, db, exitcodes, protocol
from shared.connections import (BROKER_HOST_MAX_CHARS, CA_PATH_MAX_BYTES, CLIENT_ID_MAX_CHARS, KEEPALIVE_RANGE,
                                MQTT_STRING_MAX_BYTES, PARSER_NAME_MAX_CHARS, PING_TIMEOUT_RANGE,
                                TOPIC_MAX_LEVELS, TOPICS_MAX_BYTES, TOPICS_MAX_COUNT, ConnectionSettings,
                                is_host, mqtt_text_problem, topic_filter_problem)
from tests.support import (ROOT, Publisher, alive, children_of, comm, free_port, monitor_children, reading,
                           remove_tree, wait_for, world_traversable_tmpdir)

SECRET = "secret-" + "p" * 100_000  # a 100 KB password: paho's struct.error, once
USERNAME_SECRET = "token-user-"  # usernames can be tokens: never shown either


def settings(**kw) -> ConnectionSettings:
    base = dict(connection_id=1, site_id=1, broker_host="h", broker_port=1883)
    return ConnectionSettings(**{**base, **kw})


def make_ca(directory: Path) -> dict[str, Path]:
    """A CA certificate, its private key, the certificate in DER, and garbage."""
    key, cert, der = directory / "ca.key", directory / "ca.pem", directory / "ca.der"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=bad-rows",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    subprocess.run(["openssl", "x509", "-in", str(cert), "-outform", "DER", "-out", str(der)],
                   check=True, capture_output=True)
    garbage = directory / "garbage.pem"
    garbage.write_bytes(b"not a certificate\n\x00\xff")
    for path in (key, cert, der, garbage):
        path.chmod(0o644)
    return {"key": key, "cert": cert, "der": der, "garbage": garbage}


# --- the rules, pure ------------------------------------------------------------------

GOOD_FILTERS = ["#", "+", "a/#", "a/+/b", "/", "a//b", "+/+/#", "$SYS/#", "sites/north-pier/#", "é/ü",
                "a/" * (TOPIC_MAX_LEVELS - 1) + "a", "t" * MQTT_STRING_MAX_BYTES]
BAD_FILTERS = ["a/#/b", "a#", "+a", "a/+b", "#/x", "##", "a/b#", "", "a\nb", "a\x00b", "a\x7fb", "a\u0085b",
               "a\ufffeb", "a\U0010ffffb", "a/" * TOPIC_MAX_LEVELS + "a", "t" * (MQTT_STRING_MAX_BYTES + 1)]
GOOD_HOSTS = ["localhost", "broker.example.net", "broker.example.net.", "my_broker", "xn--mnchen-3ya.de",
              "1a.example", "127.0.0.1", "0.0.0.0", "255.255.255.255", "::1", "::", "fe80::1",
              "::ffff:1.2.3.4", "1:2:3:4:5:6:7:8", "ABCD::ef", "a" * 63 + ".example",
              ".".join(["a" * 63] * 3 + ["b" * 61])]
BAD_HOSTS = ["", " broker", "broker ", "a b", "tcp://broker", "mqtt://broker:1883", "broker:1883", "broker/path",
             "[::1]", "fe80::1%eth0", "::1/128", ":::", "1::2::3", "::1.2.3", "256.1.1.1", "01.2.3.4", "1.2.3",
             "1.2.3.4.", "1234", "a.1", "münchen.de", "-a.example", "a-.example", "a..b", ".a", "a\nb",
             "a" * 64 + ".example", "b" * (BROKER_HOST_MAX_CHARS + 1)]


@pytest.mark.parametrize("topic", GOOD_FILTERS, ids=lambda t: repr(t[:20]))
def test_valid_topic_filters_pass(topic):
    assert topic_filter_problem(topic) is None


@pytest.mark.parametrize("topic", BAD_FILTERS, ids=lambda t: repr(t[:20]))
def test_invalid_topic_filters_are_named(topic):
    assert topic_filter_problem(topic)


def test_hosts_are_names_or_ip_literals():
    assert [h for h in GOOD_HOSTS if not is_host(h)] == []
    assert [h for h in BAD_HOSTS if is_host(h)] == []


CASES = [
    # (the mistake, the settings' overrides, what the operator reads)
    ("long password", dict(username="gw", password=SECRET), "password is longer than 65535 bytes"),
    ("long username", dict(username=USERNAME_SECRET + "u" * 70_000), "username is longer than 65535 bytes"),
    ("password alone", dict(password="pw"), "a password is set without a username"),
    ("surrogate password", dict(username="gw", password="pw\ud800"), "password is not valid Unicode"),
    ("NUL in username", dict(username=USERNAME_SECRET + "\0"), "username holds the control character U+0000"),
    ("newline in username", dict(username=USERNAME_SECRET + "\n"), "username holds the control character U+000A"),
    ("surrogate username", dict(username=USERNAME_SECRET + "\udc80"), "username is not valid Unicode"),
    ("control in client id", dict(client_id="id\x07"), "client_id 'id\\x07' holds the control character"),
    ("non-character client id", dict(client_id="id\ufffe"), "non-character U+FFFE"),
    ("long client id", dict(client_id="c" * 129), "client_id must be 1 to 128 characters"),
    ("empty client id", dict(client_id=""), "client_id must be 1 to 128 characters"),
    ("no topics", dict(topics=()), "topics must hold 1 to 256"),
    ("many topics", dict(topics=tuple(f"t/{i}" for i in range(300))), "not 300"),
    ("huge topics", dict(topics=tuple(f"{i:03d}/" + "x" * 400 for i in range(200))), "at most 65536"),
    ("long filter", dict(topics=("x" * 70_000,)), "is longer than 65535 bytes"),
    ("deep filter", dict(topics=("a/" * 250 + "b",)), "has 251 levels"),
    ("hash in the middle", dict(topics=("a/#/b",)), "'#' must be the last level"),
    ("glued plus", dict(topics=("a/+b",)), "'+' must be a whole level"),
    ("empty filter", dict(topics=("a", "")), "topic filter '' is empty"),
    ("NUL in a filter", dict(topics=("a\0",)), "U+0000"),
    ("duplicates", dict(topics=("a/b", "c", "a/b")), "topics lists 'a/b' more than once"),
    ("nested topics", dict(topics=(["a", "b"],)), "one-dimensional list"),
    ("topics as text", dict(topics="a/b"), "one-dimensional list"),
    ("relative CA path", dict(use_tls=True, tls_ca_path="ca.pem"), "is not an absolute path"),
    ("CA path without TLS", dict(tls_ca_path="/etc/ssl/certs/ca-certificates.crt"), "use_tls is false"),
    ("missing CA file", dict(use_tls=True, tls_ca_path="/nonexistent/ca.pem"), "does not exist"),
    ("CA directory", dict(use_tls=True, tls_ca_path="/"), "is a directory"),
    ("CA device", dict(use_tls=True, tls_ca_path="/dev/null"), "is not a regular file"),
    ("long CA path", dict(use_tls=True, tls_ca_path="/" + "a" * CA_PATH_MAX_BYTES), "not a usable path"),
    ("URL as host", dict(broker_host="tcp://broker.example.net"), "is not a host name or an IP address"),
    ("host with port", dict(broker_host="broker:1883"), "is not a host name or an IP address"),
    ("NUL in host", dict(broker_host="bro\0ker"), "is not a host name"),
    ("port out of range", dict(broker_port=0), "broker_port must be between 1 and 65535"),
    ("keepalive too short", dict(keepalive=1), "keepalive must be between 5 and 3600"),
    ("keepalive as a flag", dict(keepalive=True), "keepalive must be a whole number"),
    ("ping timeout", dict(ping_timeout=0), "ping_timeout must be between 1 and 3600"),
    ("stall after", dict(stall_after=-1), "stall_after must be between 0"),
    ("qos", dict(qos=3), "qos must be 0, 1 or 2, not 3"),
    ("unknown parser", dict(parser_name="x" * 1000), "unknown parser 'xxxx"),
    ("protocol", dict(mqtt_protocol="3.1"), "mqtt_protocol must be '3.1.1' or '5', not '3.1'"),
]


@pytest.mark.parametrize("mistake, overrides, reason", CASES, ids=[c[0] for c in CASES])
def test_each_mistake_has_a_plain_reason_without_secrets(mistake, overrides, reason):
    found = settings(**overrides).problems()
    text = "; ".join(found)
    assert reason in text
    assert "p" * 20 not in text and USERNAME_SECRET not in text  # neither credential is shown
    assert len(text) < 1000  # an error_message, not a dump of the row


def test_problems_never_raise_whatever_the_values():
    weird = [None, True, -1, 0, 2**70, 1.5, "", "x" * 70_000, "\ud800", "a\0", b"bytes", [], {}, ("a",),
             (None,), object()]
    for name in (f.name for f in dataclasses.fields(ConnectionSettings)):
        for value in weird:
            found = settings(**{name: value}).problems()
            assert all(isinstance(p, str) and p for p in found), (name, value)


def test_limits_are_reported_one_per_rule():
    found = settings(topics=tuple(f"+a{i}" for i in range(10)) + ("b", "b")).problems()
    assert found[3] == "and 7 more invalid topic filters" and "more than once" in found[4]


def test_a_ca_file_that_is_not_a_certificate_is_named(tmp_path):
    files = make_ca(tmp_path)
    assert settings(use_tls=True, tls_ca_path=str(files["cert"])).problems() == []
    for kind in ("key", "der", "garbage"):
        [problem] = settings(use_tls=True, tls_ca_path=str(files[kind])).problems()
        assert "holds no PEM certificate" in problem, kind


def test_a_ca_file_the_service_user_cannot_read_is_named():
    """Root reads every file: as root, the rule is checked as the user nobody."""
    base = world_traversable_tmpdir("sitelink-test-ca-")
    try:
        cert = make_ca(base)["cert"]
        cert.chmod(0o600 if os.geteuid() == 0 else 0)
        check = settings(use_tls=True, tls_ca_path=str(cert))
        if os.geteuid() == 0:
            os.seteuid(pwd.getpwnam("nobody").pw_uid)
            try:
                found = check.problems()
            finally:
                os.seteuid(0)
        else:
            found = check.problems()
        assert len(found) == 1 and "cannot be read by this service's user" in found[0], found
        assert "permission denied" in found[0]
    finally:
        remove_tree(base)


def test_the_zygote_bound_holds_the_largest_row_the_rules_admit():
    largest = settings(username="u" * MQTT_STRING_MAX_BYTES, password="p" * MQTT_STRING_MAX_BYTES,
                       client_id="\U0001f600" * CLIENT_ID_MAX_CHARS, broker_host="b" * 63 + ".example",
                       topics=tuple(f"{i:03d}/" + "t" * (TOPICS_MAX_BYTES // TOPICS_MAX_COUNT - 4)
                                    for i in range(TOPICS_MAX_COUNT)),
                       state_fd=2**31 - 1, epoch=2**63 - 1, monitor_pid=2**22)
    assert largest.problems() == []
    frame = protocol.encode_settings(largest)
    # Under the kernel's default limit of one local datagram (212,960 bytes)
    # even before the zygote's socket asks for more, and under MAX_REQUEST.
    assert len(frame) < 212_960 and len(frame) < MAX_REQUEST


def test_the_redaction_hides_both_credentials():
    c = settings(username="the-user", password="the-pass")
    assert c.redact("bad the-user:the-pass") == "bad ***:***"


# --- the schema: the same rules, the same limits ------------------------------------------------

def test_the_schema_and_the_rules_agree_on_filters_hosts_and_text(database_url):
    with psycopg.connect(database_url) as conn:
        def sql(function, value):
            return conn.execute(f"SELECT {function}(%s)", (value,)).fetchone()[0]
        for topic in GOOD_FILTERS + BAD_FILTERS:
            if "\0" not in topic:  # text cannot hold a NUL: the schema never sees one
                assert sql("mqtt_topic_filter_ok", topic) == (topic_filter_problem(topic) is None), repr(topic[:30])
        for host in GOOD_HOSTS + BAD_HOSTS:
            assert sql("mqtt_broker_host_ok", host) == is_host(host), repr(host)
        for text in ["gw", "é", "a\x01", "a\x1f", "a\x7f", "a\x9f", "a\xa0", "a\ufdd0", "a\ufdef", "a\ufdf0",
                     "a\ufffd", "a\uffff", "a\U0001fffe", "a\U0010ffff", "\U0001f600"]:
            assert sql("mqtt_text_ok", text) == (mqtt_text_problem(text) is None), repr(text)


LIMITS = [
    # (the rule, the row at its limit, the row just past it, the constraints that may refuse it,
    #  what problems() says past it, or None where the rule exists only in the schema)
    ("username bytes", {"username": "é" * (MQTT_STRING_MAX_BYTES // 2) + "u"},
     {"username": "é" * (MQTT_STRING_MAX_BYTES // 2 + 1)},
     {"mqtt_connection_username_at_most_65535_bytes"}, "username is longer"),
    ("password bytes", {"username": "u", "password": "€" * (MQTT_STRING_MAX_BYTES // 3)},
     {"username": "u", "password": "€" * (MQTT_STRING_MAX_BYTES // 3) + "x"},
     {"mqtt_connection_password_at_most_65535_bytes"}, "password is longer"),
    ("client id characters", {"client_id": "€" * CLIENT_ID_MAX_CHARS}, {"client_id": "€" * (CLIENT_ID_MAX_CHARS + 1)},
     {"mqtt_connection_client_id_check"}, "client_id must be 1 to 128"),
    ("filters", {"topics": [f"t/{i}" for i in range(TOPICS_MAX_COUNT)]},
     {"topics": [f"t/{i}" for i in range(TOPICS_MAX_COUNT + 1)]},
     {"mqtt_connection_topics_1_to_256_filters"}, "topics must hold 1 to 256"),
    ("bytes of all filters", {"topics": ["a" * (TOPICS_MAX_BYTES // 2), "b" * (TOPICS_MAX_BYTES // 2)]},
     {"topics": ["a" * (TOPICS_MAX_BYTES // 2), "b" * (TOPICS_MAX_BYTES // 2 + 1)]},
     {"mqtt_connection_topics_at_most_65536_bytes"}, "at most 65536"),
    ("bytes of a filter", {"topics": ["f" * MQTT_STRING_MAX_BYTES]},
     {"topics": ["f" * (MQTT_STRING_MAX_BYTES + 1)]},
     {"mqtt_connection_topic_filters_valid", "mqtt_connection_topics_at_most_65536_bytes"}, "longer than 65535"),
    ("levels of a filter", {"topics": ["a/" * (TOPIC_MAX_LEVELS - 1) + "a"]},
     {"topics": ["a/" * TOPIC_MAX_LEVELS + "a"]},
     {"mqtt_connection_topic_filters_valid"}, "levels"),
    ("CA path bytes", {"use_tls": True, "tls_ca_path": "/" + "a" * (CA_PATH_MAX_BYTES - 1)},
     {"use_tls": True, "tls_ca_path": "/" + "a" * CA_PATH_MAX_BYTES},
     {"mqtt_connection_tls_ca_path_at_most_4096_bytes"}, "not a usable path"),
    ("host characters", {"broker_host": ".".join(["a" * 63] * 3 + ["b" * 61])},
     {"broker_host": ".".join(["a" * 63] * 3 + ["b" * 62])},
     {"mqtt_connection_broker_host_check", "mqtt_connection_broker_host_is_a_host_name_or_ip"}, "not a host name"),
    ("host label", {"broker_host": "a" * 63 + ".example"}, {"broker_host": "a" * 64 + ".example"},
     {"mqtt_connection_broker_host_is_a_host_name_or_ip"}, "not a host name"),
    ("keepalive", {"keepalive": KEEPALIVE_RANGE[1]}, {"keepalive": KEEPALIVE_RANGE[1] + 1},
     {"mqtt_connection_keepalive_check"}, "keepalive must be between"),
    ("ping timeout", {"ping_timeout": PING_TIMEOUT_RANGE[1]}, {"ping_timeout": PING_TIMEOUT_RANGE[1] + 1},
     {"mqtt_connection_ping_timeout_check"}, "ping_timeout must be between"),
    ("parser name", {"parser_name": "p" * PARSER_NAME_MAX_CHARS}, {"parser_name": "p" * (PARSER_NAME_MAX_CHARS + 1)},
     {"mqtt_connection_parser_name_at_most_64_chars"}, None),
]


def refused_by(conn: psycopg.Connection, site_id: int, columns: dict) -> str | None:
    """The constraint that refuses this row, or None if PostgreSQL stores it."""
    cols = {"site_id": site_id, "broker_host": "broker.example.net", **columns}
    try:
        with conn.transaction(force_rollback=True):
            conn.execute(f"INSERT INTO mqtt_connection ({', '.join(cols)}) VALUES ({', '.join(['%s'] * len(cols))})",
                         list(cols.values()))
    except psycopg.errors.CheckViolation as exc:
        return exc.diag.constraint_name
    return None


@pytest.mark.parametrize("rule, at_limit, past_limit, constraints, reason", LIMITS, ids=[r[0] for r in LIMITS])
def test_the_schema_and_the_rules_share_each_limit(database_url, rule, at_limit, past_limit, constraints, reason):
    with psycopg.connect(database_url, autocommit=True) as conn:
        site = conn.execute("INSERT INTO site (name) VALUES ('limits') RETURNING id").fetchone()[0]
        assert refused_by(conn, site, at_limit) is None
        assert refused_by(conn, site, past_limit) in constraints
    if reason is not None:
        def problems(columns):
            values = {k: tuple(v) if k == "topics" else v for k, v in columns.items()}
            return "; ".join(settings(**values).problems())
        assert reason not in problems(at_limit) and reason in problems(past_limit)


def test_a_refused_row_never_carries_its_password_into_our_errors(database_url):
    """PostgreSQL's DETAIL of a check violation quotes the whole row; what we
    store and log of a DataRejected never does."""
    database = db.Database(database_url, "sitelink-test")
    try:
        with pytest.raises(db.DataRejected) as refused, database.transaction() as s:
            s.sql("INSERT INTO site (name) VALUES ('leak')")
            s.sql("INSERT INTO mqtt_connection (site_id, broker_host, username, password) "
                  "SELECT id, 'tcp://x', 'gw', 'hunter2-secret' FROM site")
    finally:
        database.close()
    assert "mqtt_connection_broker_host_is_a_host_name_or_ip" in str(refused.value)
    assert "hunter2" not in str(refused.value)


# --- the zygote: a request it cannot use is refused, and it keeps serving -----------------------

@pytest.fixture
def zygote():
    z = Zygote(request_timeout=30)
    z.start()
    yield z
    pid = z.pid
    z.close()  # it exits when its control socket closes
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def test_the_zygote_refuses_what_it_cannot_use_and_keeps_serving(zygote):
    pid = zygote.pid
    with pytest.raises(SpawnRefused, match="unknown parser 'nope'"):
        zygote.spawn(settings(parser_name="nope"))
    with pytest.raises(SpawnRefused, match=r"a start request holds at most 1048576"):
        zygote.spawn(settings(username="u", password="p" * (2 * MAX_REQUEST)))  # refused before sending
    with pytest.raises(SpawnRefused, match="cannot be encoded"):
        zygote.spawn(settings(username="u", password="pw\ud800"))
    for raw, reason in [(b"garbage", b"not valid settings"), (b"\x81\xa1v\x01", b"not valid settings")]:
        zygote.control.send(raw)
        answer = zygote.control.recv(PID.size + 8192)
        assert PID.unpack_from(answer)[0] == REFUSED and reason in answer[PID.size:]
    try:
        zygote.control.send(b"x" * (MAX_REQUEST + 1))  # larger than the zygote reads
    except OSError:
        pass  # this host's socket limit refused it first (spawn() makes that a refusal too)
    else:
        answer = zygote.control.recv(PID.size + 8192)
        assert PID.unpack_from(answer)[0] == REFUSED and b"larger than" in answer[PID.size:]
    # The largest settings the rules admit reach the zygote whole (and are
    # refused there only because this CA file does not exist).
    largest = settings(username="u" * MQTT_STRING_MAX_BYTES, password="p" * MQTT_STRING_MAX_BYTES,
                       topics=tuple(f"{i:03d}/" + "t" * 252 for i in range(TOPICS_MAX_COUNT)),
                       use_tls=True, tls_ca_path="/nonexistent/" + "c" * 4000)
    with pytest.raises(SpawnRefused, match="does not exist"):
        zygote.spawn(largest)
    assert zygote.pid == pid and alive(pid)


# --- the child: whatever its set-up raises becomes status error and exit code CONFIG ---------------

@pytest.fixture
def logger_socket():
    """A ROUTER where the child's events arrive, standing in for the logger."""
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    yield f"tcp://127.0.0.1:{port}", router
    router.close(linger=0)
    context.term()


def statuses(router) -> list[protocol.StatusChange]:
    found = []
    while router.poll(500):
        frames = router.recv_multipart()
        message = protocol.decode(frames[-1])
        for envelope in getattr(message, "envelopes", ()) or [message]:
            if isinstance(getattr(envelope, "event", None), protocol.StatusChange):
                found.append(envelope.event)
    return found


def test_a_set_up_failure_the_rules_missed_is_status_error_and_exit_config(logger_socket, broker, monkeypatch):
    endpoint, router = logger_socket
    service = dataclasses.replace(config.load({}), events_endpoint=endpoint, ack_linger=0.2,
                                  connect_timeout=5)
    # As if problems() had missed the 100 KB password: paho's own struct.error
    # when it builds the CONNECT, from a real connect to a real broker.
    monkeypatch.setattr(ConnectionSettings, "problems", lambda self: [])
    conn = settings(broker_host="127.0.0.1", broker_port=broker.port, username="gw", password=SECRET,
                    client_id=f"bad-rows-{os.getpid()}")
    child = connection.ConnectionChild(service, conn)
    assert child.run() == exitcodes.CONFIG
    [*_, last] = statuses(router)
    assert last.status == "error" and "cannot connect with these settings: struct.error:" in last.message
    assert "65535" in last.message and "pppp" not in last.message + last.traceback
    assert last.exception_type == "error"  # struct.error


def test_a_client_that_cannot_be_made_is_status_error_and_exit_config(logger_socket, monkeypatch):
    endpoint, router = logger_socket
    service = dataclasses.replace(config.load({}), events_endpoint=endpoint, ack_linger=0.2)

    def broken(*args, **kwargs):
        raise struct.error(f"cannot pack {SECRET[:30]}")  # any exception, quoting the password
    monkeypatch.setattr(connection, "new_client", broken)
    child = connection.ConnectionChild(service, settings(username="gw", password=SECRET[:30]))
    assert child.run() == exitcodes.CONFIG
    [status] = statuses(router)
    assert status.status == "error" and status.message == "cannot set up the MQTT client: struct.error: cannot pack ***"


def test_a_child_started_alone_with_bad_settings_says_why_and_exits_config(tmp_path):
    frame = protocol.encode_settings(settings(topics=("a/#/b",)))
    env = {"PATH": "/usr/bin:/bin", "SITELINK_HOME": str(tmp_path), "SITELINK_ACK_LINGER": "0.1",
           "SITELINK_EVENTS_ENDPOINT": f"tcp://127.0.0.1:{free_port()}", "SITELINK_LOG_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "services.connection", "--settings-stdin"], input=frame,
                          cwd=ROOT, env=env, capture_output=True, timeout=60)
    assert done.returncode == exitcodes.CONFIG
    assert b"'#' must be the last level" in done.stdout + done.stderr


# --- one real stack: a row of every kind of mistake, old and new, beside a good site ---------------

#: Rows written before migration 0004, which its rules now refuse: (site, columns, reason, fix)
OLD_ROWS = [
    ("long-password", {"username": "gw", "password": SECRET}, "password is longer than 65535 bytes",
     {"password": "secret"}),
    ("long-username", {"username": USERNAME_SECRET + "u" * 70_000}, "username is longer than 65535 bytes",
     {"username": "gw"}),
    ("password-alone", {"password": "secret"}, "a password is set without a username", {"username": "gw"}),
    ("newline-username", {"username": USERNAME_SECRET + "\n"}, "username holds the control character U+000A",
     {"username": "gw"}),
    ("control-client-id", {"client_id": "bad\x07"}, "holds the control character U+0007", {"client_id": None}),
    ("nonchar-client-id", {"client_id": "bad\ufffe"}, "non-character U+FFFE", {"client_id": None}),
    ("many-topics", {"topics": [f"t/{i}" for i in range(300)]}, "topics must hold 1 to 256", "topics"),
    ("huge-topics", {"topics": [f"{i:03d}/" + "x" * 400 for i in range(200)]}, "at most 65536", "topics"),
    ("long-filter", {"topics": ["x" * 70_000]}, "is longer than 65535 bytes", "topics"),
    ("deep-filter", {"topics": ["a/" * 250 + "b"]}, "has 251 levels", "topics"),
    ("hash-misused", {"topics": ["a/#/b", "a#", "#/x"]}, "'#' must be the last level", "topics"),
    ("plus-misused", {"topics": ["+a", "a/+b"]}, "'+' must be a whole level", "topics"),
    ("empty-filter", {"topics": ["ok/#", ""]}, "topic filter '' is empty", "topics"),
    ("duplicate-filters", {"topics": ["a/b", "a/b"]}, "more than once", "topics"),
    ("relative-ca", {"use_tls": True, "tls_ca_path": "ca.pem"}, "is not an absolute path",
     {"use_tls": False, "tls_ca_path": None}),
    ("ca-without-tls", {"tls_ca_path": "/etc/ssl/certs/ca-certificates.crt"}, "use_tls is false",
     {"tls_ca_path": None}),
    ("url-host", {"broker_host": "tcp://127.0.0.1"}, "is not a host name or an IP address",
     {"broker_host": "127.0.0.1"}),
    ("host-with-port", {"broker_host": "127.0.0.1:1883"}, "is not a host name", {"broker_host": "127.0.0.1"}),
    ("spaced-host", {"broker_host": " 127.0.0.1"}, "is not a host name", {"broker_host": "127.0.0.1"}),
    ("long-parser", {"parser_name": "j" * 100}, "unknown parser 'jjjj", {"parser_name": "json"}),
]


def new_rows(ca: dict[str, Path], ca_dir: Path) -> list:
    """Rows the schema takes that still cannot run: (site, columns, reason, fix)."""
    plain = {"use_tls": False, "tls_ca_path": None}
    rows = [
        ("unknown-parser", {"parser_name": "nope"}, "unknown parser 'nope'", {"parser_name": "json"}),
        ("ca-directory", {"use_tls": True, "tls_ca_path": str(ca_dir)}, "is a directory", plain),
        ("ca-missing", {"use_tls": True, "tls_ca_path": "/nonexistent/ca.pem"}, "does not exist", plain),
        ("ca-private-key", {"use_tls": True, "tls_ca_path": str(ca["key"])}, "holds no PEM certificate", plain),
        ("ca-der", {"use_tls": True, "tls_ca_path": str(ca["der"])}, "holds no PEM certificate", plain),
        ("ca-garbage", {"use_tls": True, "tls_ca_path": str(ca["garbage"])}, "holds no PEM certificate", plain),
    ]
    if os.geteuid() != 0:  # root reads every file (see test_a_ca_file_the_service_user_cannot_read_is_named)
        unreadable = ca_dir / "unreadable.pem"
        unreadable.write_bytes(ca["cert"].read_bytes())
        unreadable.chmod(0)
        rows.append(("ca-unreadable", {"use_tls": True, "tls_ca_path": str(unreadable)}, "cannot be read", plain))
    return rows


def insert_row(conn: psycopg.Connection, dbname: str, name: str, port: int, columns: dict) -> int:
    site = conn.execute("INSERT INTO site (name) VALUES (%s) RETURNING id", (name,)).fetchone()[0]
    cols = {"site_id": site, "broker_host": "127.0.0.1", "broker_port": port, "keepalive": 10,
            "client_id": f"{dbname}-{name}", "topics": [f"sites/{name}/#"], **columns}
    return conn.execute(f"INSERT INTO mqtt_connection ({', '.join(cols)}) VALUES ({', '.join(['%s'] * len(cols))}) "
                        f"RETURNING id", list(cols.values())).fetchone()[0]


class TestEveryBadRowInOneStack:
    @pytest.fixture
    def database_url(self, pg_server, broker):
        """The database of the release before 0004, holding rows its rules now
        refuse, then migrated as `make migrate` would (which must not fail)."""
        name = f"sitelink_bad_rows_{os.getpid()}"
        pg_server.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        pg_server.execute(f"CREATE DATABASE {name}")
        url = pg_server.url(name)
        database = db.Database(url, "sitelink-test-migrate")
        try:
            db.migrate(database, upto=3)
            with psycopg.connect(url, autocommit=True) as conn:
                for site, columns, _, _ in OLD_ROWS:
                    insert_row(conn, name, site, broker.port, columns)
            assert [m.version for m in db.migrate(database)][0] == 4
        finally:
            database.close()
        yield url
        pg_server.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def test_each_becomes_error_with_its_reason_quietly_and_connects_once_fixed(self, stack, broker, tmp_path):
        ca_dir = world_traversable_tmpdir("sitelink-test-bad-ca-")
        publisher = Publisher(broker.port)
        try:
            self._run(stack, broker, publisher, make_ca(ca_dir), ca_dir)
        finally:
            publisher.close()
            remove_tree(ca_dir)

    def _run(self, stack, broker, publisher, ca, ca_dir):
        sql = stack.sql
        dbname = sql.url.rsplit("/", 1)[1]
        ids = {r["name"]: r["id"] for r in sql.rows("SELECT s.name, c.id FROM site s JOIN mqtt_connection c "
                                                   "ON c.site_id = s.id")}
        bad = {site: (reason, fix) for site, _, reason, fix in OLD_ROWS}
        with psycopg.connect(sql.url, autocommit=True) as conn:
            for site, columns, reason, fix in new_rows(ca, ca_dir):
                ids[site] = insert_row(conn, dbname, site, broker.port, columns)
                bad[site] = (reason, fix)
            good = insert_row(conn, dbname, "good", broker.port, {})
            # The largest row the rules admit runs like any other.
            largest = insert_row(conn, dbname, "largest", broker.port, {
                "username": "u" * MQTT_STRING_MAX_BYTES, "password": "p" * MQTT_STRING_MAX_BYTES,
                "client_id": "c" * CLIENT_ID_MAX_CHARS,
                "topics": [f"sites/largest/{i:03d}/" + "t" * 238 for i in range(TOPICS_MAX_COUNT)]})
        assert sql.value("SELECT count(*) FROM mqtt_connection WHERE config_predates_checks") == len(OLD_ROWS)

        stack.start("logger")
        feed = stack.feed("monitor_cycle")
        stack.start("monitor")
        readings = 0

        def store_a_reading():
            nonlocal readings
            readings += 1
            publisher.publish("sites/good/GW-1", reading(gateway="GW-1", datalogger=None,
                                                         ts=f"2026-11-28T10:00:{readings:02d}Z", **{"S-1": {"t": 1}}))
            wait_for(lambda: sql.value("SELECT count(*) FROM reading") == readings, what=f"good reading {readings}")

        # Within one monitor cycle every bad row says what is wrong with it.
        feed.wait_for(lambda t, b: True, what="a monitor cycle")
        rows = {site: sql.one("SELECT * FROM mqtt_connection WHERE id = %s", ids[site]) for site in bad}
        wrong = {site: (r["status"], r["error_message"][:200]) for site, r in rows.items()
                 if r["status"] != "error" or bad[site][0] not in r["error_message"]}
        assert wrong == {}
        assert all(r["error_message"].startswith("cannot start: ") for r in rows.values())
        sql.wait_status(good, "connected")
        sql.wait_status(largest, "connected", timeout=30)
        store_a_reading()
        monitor = stack.pid("monitor")
        [zygote] = [pid for pid in children_of(monitor) if comm(pid) == "sitelink-zygote"]

        # ... and then stays quiet: nothing restarts, nothing more is logged.
        def quiet_state():
            return sql.rows("SELECT c.id, c.status, c.connection_errors, c.error_message, "
                            "(SELECT count(*) FROM mqtt_connection_log l WHERE l.connection_id = c.id) AS logged "
                            "FROM mqtt_connection c WHERE c.id = ANY(%s) ORDER BY c.id", [ids[s] for s in bad])
        before = quiet_state()
        for _ in range(3):
            seen = len(feed.poll())
            feed.wait_for(lambda t, b: len(feed.messages) > seen, what="another monitor cycle")
        assert quiet_state() == before
        running = {comm(pid) for pid in monitor_children(stack)}
        assert running == {f"sitelink-c{good}", f"sitelink-c{largest}"}
        store_a_reading()

        # A change that leaves an old row broken is refused by the schema, by name.
        with pytest.raises(psycopg.errors.CheckViolation) as refused:
            sql.rows("UPDATE mqtt_connection SET keepalive = 30 WHERE id = %s", ids["long-password"])
        assert refused.value.diag.constraint_name == "mqtt_connection_password_at_most_65535_bytes"

        # Fixed, each connects at once.
        for site, (_, fix) in bad.items():
            fix = {"topics": [f"sites/{site}/#"]} if fix == "topics" else fix
            sets = ", ".join(f"{column} = %s" for column in fix)
            sql.rows(f"UPDATE mqtt_connection SET {sets} WHERE id = %s", *fix.values(), ids[site])
        for site in bad:
            sql.wait_status(ids[site], "connected", timeout=30)
        store_a_reading()
        assert sql.value("SELECT count(*) FROM mqtt_connection WHERE config_predates_checks") == 0

        # One monitor and one zygote throughout; no credential anywhere.
        assert stack.procs["monitor"].poll() is None and stack.pid("monitor") == monitor
        assert alive(zygote) and zygote in children_of(monitor)
        assert not sql.rows("SELECT 1 FROM mqtt_connection_log WHERE message LIKE '%%pppppppppp%%' "
                            "OR exception_traceback LIKE '%%pppppppppp%%' OR message LIKE %s",
                            f"%{USERNAME_SECRET}%")
        outputs = [stack.output("monitor"), stack.output("logger")]
        outputs += [p.read_text(errors="replace") for p in stack.log_dir.glob("*.log")]
        assert not [text for text in outputs if "pppppppppp" in text or USERNAME_SECRET in text]

