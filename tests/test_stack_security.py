"""The embedded stack on a shared machine: other local users get nothing.

PostgreSQL and Mosquitto, started by the embedded stack's own scripts, let
in only who has the password; `make up` runs everything as an unprivileged
user, keeps var/ and logs/ private, and no process shows a secret in its
argv, nor hands the database's to the connection children. Some checks need
root (to be another local user, or to see the service user made); they are
skipped, saying so, when the suite runs as an ordinary user.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import stat
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import psycopg
import pytest

from shared import config, embedded
from tests.support import (ROOT, Mosquitto, PostgresServer, cmdline, comm, descendants, environ, free_port,
                           python_service, remove_tree, uids, wait_for, world_traversable_tmpdir)

BIN = ROOT / "supervisor_conf" / "bin"
IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="being another local user (nobody) takes root; "
                                                    "the suite runs as an ordinary user")
switches_user = pytest.mark.skipif(not IS_ROOT, reason="only root runs the stack as another user (sitelink); "
                                                       "the suite runs as an ordinary user")


def service_uid() -> int:
    """Who `make up` runs the stack as: under root, the system user it made; else ourselves."""
    return pwd.getpwnam("sitelink").pw_uid if IS_ROOT else os.getuid()


def pg_password(passfile: Path) -> str:
    line = [ln for ln in passfile.read_text().splitlines() if ln and not ln.startswith("#")][0]
    return line.rsplit(":", 1)[1]


def as_nobody(*command: str, **env: str) -> subprocess.CompletedProcess:
    """``command`` run as user nobody: another local user, with no secret of ours."""
    return subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--", *command],
                          env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", **env},
                          capture_output=True, text=True, timeout=30)


def psql_args(host: str | Path, port: int) -> list[str]:
    return ["psql", "-X", "-w", "-h", str(host), "-p", str(port), "-U", "sitelink", "-d", "postgres",
            "-c", "SELECT 1"]


# --- PostgreSQL --------------------------------------------------------------------------

def test_postgres_refuses_tcp_without_the_password(pg_server):
    bare = f"postgresql://sitelink@127.0.0.1:{pg_server.port}/postgres?passfile=/dev/null"
    with pytest.raises(psycopg.OperationalError, match="no password supplied"):
        psycopg.connect(bare, connect_timeout=5)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(bare, password="guess", connect_timeout=5)
    # A role made without a password cannot log in at all.
    pg_server.execute("DROP ROLE IF EXISTS no_password; CREATE ROLE no_password LOGIN")
    with pytest.raises(psycopg.OperationalError, match="no password supplied|password authentication failed"):
        psycopg.connect(f"postgresql://no_password@127.0.0.1:{pg_server.port}/postgres?passfile=/dev/null",
                        connect_timeout=5)
    with psycopg.connect(pg_server.url(), connect_timeout=5) as conn:  # the password file lets us in
        assert conn.execute("SELECT current_user").fetchone() == ("sitelink",)
    mode = stat.S_IMODE(pg_server.passfile.stat().st_mode)
    assert mode == 0o600, oct(mode)


@needs_root
def test_postgres_refuses_another_local_user(pg_server):
    socket_try = as_nobody(*psql_args(pg_server.socketdir, pg_server.port))
    assert socket_try.returncode != 0 and "Permission denied" in socket_try.stderr, socket_try.stderr
    tcp_try = as_nobody(*psql_args("127.0.0.1", pg_server.port), PGPASSFILE=str(pg_server.passfile))
    assert tcp_try.returncode != 0 and "no password supplied" in tcp_try.stderr, tcp_try.stderr
    guess = as_nobody(*psql_args("127.0.0.1", pg_server.port), PGPASSWORD="sitelink")
    assert guess.returncode != 0 and "password authentication failed" in guess.stderr, guess.stderr
    assert as_nobody("cat", str(pg_server.passfile)).returncode != 0


def test_a_cluster_made_with_trust_by_an_older_sitelink_is_upgraded():
    base = world_traversable_tmpdir("sitelink-test-pg-trust-")
    server = PostgresServer(base)
    bindir = Path(os.environ.get("SITELINK_PG_BIN") or sorted(Path("/usr/lib/postgresql").glob("*/bin"),
                                                               key=lambda p: int(p.parent.name))[-1])
    # What the old script did on first start (as the user the server runs as),
    # and a database made in it since.
    as_service = [str(BIN / "run-as-service"), "--own", str(server.datadir), "--"]
    subprocess.run([*as_service, str(bindir / "initdb"), "-D", str(server.datadir), "-U", "sitelink",
                    "-A", "trust", "--no-sync"], check=True, capture_output=True, cwd="/")
    subprocess.run([*as_service, str(bindir / "postgres"), "--single", "-D", str(server.datadir), "postgres"],
                   input=b"CREATE DATABASE kept;\n", check=True, capture_output=True, cwd="/")
    try:
        server.start()
        assert "made by an older sitelink" in server.log.read_text()
        with pytest.raises(psycopg.OperationalError, match="no password supplied"):
            psycopg.connect(f"postgresql://sitelink@127.0.0.1:{server.port}/kept?passfile=/dev/null",
                            connect_timeout=5)
        with psycopg.connect(server.url("kept"), connect_timeout=5) as conn:
            assert conn.execute("SELECT current_database()").fetchone() == ("kept",)
        assert "trust" not in re.sub(r"#.*", "", (server.datadir / "pg_hba.conf").read_text())
    finally:
        server.stop()
        remove_tree(base)


def test_admin_psql_moves_a_password_in_the_url_out_of_psqls_argv(pg_server, tmp_path):
    """`make psql` used to run psql "$url": a password in SITELINK_DATABASE_URL was in its argv."""
    password = pg_password(pg_server.passfile)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("SITELINK_", "PG"))},
           "SITELINK_HOME": str(tmp_path),
           "SITELINK_DATABASE_URL": f"postgresql://sitelink:{password}@127.0.0.1:{pg_server.port}/postgres"}
    done = subprocess.run([sys.executable, "-m", "services.admin", "psql"], cwd=ROOT, env=env, text=True,
                          input="SELECT 'in' AS logged;\n\\! tr '\\0' ' ' < /proc/$PPID/cmdline; echo\n",
                          capture_output=True, timeout=30)
    assert done.returncode == 0 and " in\n" in done.stdout, done.stdout + done.stderr
    argv_line = next(line for line in done.stdout.splitlines() if "bin/psql " in line)
    assert "host=127.0.0.1" in argv_line and password not in argv_line, argv_line



def test_admin_dburl_leaves_a_password_in_the_url_out_unless_asked(tmp_path):
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("SITELINK_", "PG"))},
           "SITELINK_HOME": str(tmp_path)}

    def dburl(url: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "services.admin", "dburl", *args], cwd=ROOT,
                              env={**env, "SITELINK_DATABASE_URL": url}, text=True, capture_output=True, timeout=30)
    secret = "s3cret-pw"
    for url in (f"postgresql://gw:{secret}@db.example.net:5433/sitelink",
                f"postgresql://gw@db.example.net:5433/sitelink?password={secret}",
                f"host=db.example.net port=5433 dbname=sitelink user=gw password={secret}"):
        shown = dburl(url)
        assert shown.returncode == 0, shown.stderr
        assert secret not in shown.stdout + shown.stderr, url
        assert "db.example.net" in shown.stdout and "5433" in shown.stdout and "password" in shown.stderr
        assert dburl(url, "--with-password").stdout.strip() == url
    plain = "postgresql://gw@db.example.net:5433/sitelink?passfile=/srv/pgpass"
    assert dburl(plain).stdout.strip() == plain
    broken = dburl(f"postgresql://gw:{secret}@db.example.net:5433/x?bogus=1")  # psycopg quotes it in its error
    assert broken.returncode == 2 and secret not in broken.stdout + broken.stderr

# --- Mosquitto ---------------------------------------------------------------------------

def connack(port: int, username: str | None = None, password: str | None = None) -> str:
    """The broker's answer to a CONNECT, as paho names it ("Success", "Not authorized")."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-connack-{os.getpid()}")
    if username is not None:
        client.username_pw_set(username, password)
    answers: list[str] = []
    client.on_connect = lambda c, u, flags, reason, props: answers.append(str(reason))
    client.connect("127.0.0.1", port)
    try:
        return wait_for(lambda: client.loop(0.05) is not None and answers and answers[0], 10, "a CONNACK")
    finally:
        client.disconnect()


def test_the_embedded_broker_refuses_anonymous_clients_and_admits_the_demo_publisher(tmp_path):
    home = world_traversable_tmpdir("sitelink-test-mqtt-auth-")
    secrets = home / "var" / "secrets"
    broker = Mosquitto(home / "var" / "mosquitto", anonymous=False, secrets_dir=secrets)
    broker.start()
    subscriber = None
    try:
        assert connack(broker.port) == "Not authorized"
        assert connack(broker.port, embedded.SITE_USER, "guess") == "Not authorized"
        site_password = embedded.mqtt_password(secrets, embedded.SITE_USER)
        received: list[str] = []
        subscriber = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-sub-{os.getpid()}")
        subscriber.username_pw_set(embedded.SITE_USER, site_password)
        subscriber.on_connect = lambda c, u, f, reason, p: c.subscribe("sites/#", qos=1)
        subscriber.on_message = lambda c, u, message: received.append(message.topic)
        subscriber.connect("127.0.0.1", broker.port)
        subscriber.loop_start()
        wait_for(lambda: connack(broker.port, embedded.SITE_USER, site_password) == "Success")

        env = {**{k: v for k, v in os.environ.items() if not k.startswith("SITELINK_")},
               "SITELINK_HOME": str(home)}
        demo = python_service("demo", env, tmp_path / "demo.out", "--port", str(broker.port), "--rounds", "1")
        assert demo.wait(30) == 0
        wait_for(lambda: any(t.startswith("sites/alpine-hut/GW-ALP-01/") for t in received),
                 what="the demo publisher's readings")
        out = (tmp_path / "demo.out").read_text()
        assert "anonymously" not in out and "refused" not in out, out

        for path in (secrets / embedded.MQTT_USERS, broker.base / "passwd", broker.base / "mosquitto.conf"):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        assert site_password not in (broker.base / "passwd").read_text()  # hashes only
    finally:
        if subscriber is not None:
            subscriber.loop_stop()
            subscriber.disconnect()
        broker.stop()
        remove_tree(home)


def test_seed_demo_gives_the_demo_sites_the_brokers_credentials_and_never_prints_them(stack):
    secrets = stack.tmp / "var" / "secrets"
    secrets.mkdir(parents=True)
    (secrets / embedded.MQTT_USERS).write_text("sitelink:first-Vq3\ndemo-publisher:other\n")
    port = free_port()
    sql = stack.sql
    # A demo row from before the broker wanted a login, and one an operator pointed elsewhere.
    old = sql.add_site("alpine-hut", port=port, client_id=None)
    theirs = sql.add_site("harbour-pump", host="broker.example.net", port=1883, username="op", password="keep")
    env = {**stack.env, "SITELINK_EMBEDDED_MQTT_PORT": str(port)}

    def seed() -> str:
        proc = python_service("admin", env, stack.tmp / "seed.out", "seed-demo")
        assert proc.wait(30) == 0, stack.output("seed")
        return stack.output("seed")

    def login(site: str) -> tuple:
        row = sql.one("SELECT c.username, c.password FROM mqtt_connection c JOIN site s ON s.id = c.site_id "
                      "WHERE s.name = %s", site)
        return row["username"], row["password"]

    assert "first-Vq3" not in seed()
    assert login("alpine-hut") == login("vineyard-north") == ("sitelink", "first-Vq3")
    assert login("harbour-pump") == ("op", "keep")
    assert login("offshore-buoy") == (None, None)  # whatever listens on its port gets nothing of ours
    # The broker's credentials made anew (mqtt-users deleted): the rows follow.
    (secrets / embedded.MQTT_USERS).write_text("sitelink:second-Wx7\ndemo-publisher:other\n")
    assert "second-Wx7" not in seed()
    assert login("alpine-hut") == ("sitelink", "second-Wx7")
    assert sql.value("SELECT count(*) FROM mqtt_connection WHERE id IN (%s, %s)", old, theirs) == 2


# --- the connection children's environment ----------------------------------------------------

def test_connection_children_inherit_no_database_secret(stack, broker, pg_server):
    password = pg_password(pg_server.passfile)
    cid = stack.sql.add_site("sigma-env", port=broker.port)
    stack.start("logger", "monitor", PGPASSWORD=password, PGPASSFILE=str(pg_server.passfile))
    stack.sql.wait_status(cid, "connected")
    monitor = stack.pid("monitor")
    # What there is to leak: the monitor's environment has it (its /proc/<pid>/environ
    # holds its process title now: setproctitle writes there).
    assert {"SITELINK_DATABASE_URL", "PGPASSWORD"} <= stack.env.keys()
    below = descendants(monitor)
    assert {"sitelink-zygote", f"sitelink-c{cid}"} <= {comm(pid) for pid in below}
    url = stack.env["SITELINK_DATABASE_URL"]
    for pid in below:
        env = environ(pid)
        leaked = [k for k in env if k == "SITELINK_DATABASE_URL" or k.startswith("PG")]
        assert not leaked, f"{comm(pid)} (pid {pid}) inherited {leaked}"
        raw = "\0".join(f"{k}={v}" for k, v in env.items())
        assert password not in raw and url not in raw and str(pg_server.passfile) not in raw, comm(pid)
        assert password not in cmdline(pid)


# --- run-as-service ---------------------------------------------------------------------------

@switches_user
def test_run_as_service_names_the_directory_the_service_user_cannot_reach():
    base = world_traversable_tmpdir("sitelink-test-unreachable-")
    locked = base / "locked"
    locked.mkdir(mode=0o700)
    try:
        run = subprocess.run([str(BIN / "run-as-service"), "--own", str(locked / "checkout" / "var"), "--",
                              "/bin/true"], capture_output=True, text=True, timeout=30)
        assert run.returncode != 0
        assert f"{locked} is not traversable" in run.stderr and "chmod o+x" in run.stderr, run.stderr
        assert not (locked / "checkout").exists()
    finally:
        remove_tree(base)


# --- make up ----------------------------------------------------------------------------------

@dataclass
class MadeUp:
    checkout: Path
    env: dict[str, str]
    make: list[str]
    up_output: str = ""

    def run(self, target: str, stdin: str = "") -> str:
        done = subprocess.run([*self.make, target], env=self.env, input=stdin, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, f"make {target} failed:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    def supervisord(self) -> int:
        return int((self.checkout / "var" / "run" / "supervisord.pid").read_text())

    def secrets(self) -> list[str]:
        var = self.checkout / "var" / "secrets"
        return [pg_password(var / "pgpass"),
                *(line.split(":", 1)[1] for line in (var / embedded.MQTT_USERS).read_text().split())]


@pytest.fixture(scope="module")
def made_up() -> Iterator[MadeUp]:
    """`make up` in a copy of this checkout (its own var/ and logs/, free ports,
    this checkout's .venv), exactly as a user runs it; `make down` after.
    As root, that makes the system user "sitelink" if the machine has none."""
    base = world_traversable_tmpdir("sitelink-test-make-up-")
    checkout = base / "sitelink"
    shutil.copytree(ROOT, checkout, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "var", "logs", "__pycache__", ".pytest_cache", "*.egg-info"))
    (checkout / ".venv").symlink_to(ROOT / ".venv")
    pg_port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SITELINK_", "PG", "MAKE", "MFLAGS"))}
    env.update({
        "SITELINK_HOME": str(checkout),  # whichever copy of the code Python imports
        "SITELINK_EMBEDDED_PG_PORT": str(pg_port),
        "SITELINK_EMBEDDED_MQTT_PORT": str(free_port()),
        "SITELINK_EVENTS_ENDPOINT": f"tcp://127.0.0.1:{free_port()}",
        "SITELINK_STATUS_FEED": f"tcp://127.0.0.1:{free_port()}",
        "SITELINK_SNAPSHOT_ENDPOINT": f"tcp://127.0.0.1:{free_port()}",
        "SITELINK_WEB_PORT": str(free_port()),
        "SITELINK_PG_FAST": "1",
        # An operator may well set these: the connection children must not get them.
        "SITELINK_DATABASE_URL": config.load({"SITELINK_HOME": str(checkout),
                                              "SITELINK_EMBEDDED_PG_PORT": str(pg_port)}).database_url,
        "PGPASSFILE": str(checkout / "var" / "secrets" / "pgpass"),
    })
    # The .venv is this checkout's and already set up: never remake it from the copy.
    venv = checkout / ".venv"
    made = MadeUp(checkout, env, ["make", "--no-print-directory", "-C", str(checkout),
                                  "-o", str(venv / ".installed"), "-o", str(venv / "bin" / "python")])
    try:
        made.up_output = made.run("up")
        yield made
    finally:
        subprocess.run([*made.make, "down"], env=env, capture_output=True, timeout=120)
        remove_tree(base)


def stack_processes(made: MadeUp) -> dict[int, str]:
    """supervisord and everything below it, by PID: its programs, PostgreSQL's
    backends, the zygote and the connection children."""
    top = made.supervisord()
    return {pid: comm(pid) for pid in [top, *descendants(top)]}


def test_make_up_runs_supervisord_and_every_program_as_the_service_user(made_up):
    wait_for(lambda: sum(c.startswith("sitelink-c") for c in stack_processes(made_up).values()) >= 3,
             what="the demo sites' connection children")
    processes = stack_processes(made_up)
    names = set(processes.values())
    assert {"postgres", "mosquitto", "sitelink-zygote"} <= names, names
    titles = [cmdline(pid).strip() for pid in processes]
    assert "sitelink: logger" in titles and "sitelink: demo publisher" in titles
    assert any(t.startswith("sitelink: web ") for t in titles), titles
    assert sum(t.startswith("sitelink: monitor ") for t in titles) == 1
    for pid, name in processes.items():
        assert set(uids(pid)) == {service_uid()}, f"{name} (pid {pid}) runs as {uids(pid)}"
    assert service_uid() != 0


def test_make_up_keeps_var_and_logs_from_other_users(made_up):
    logs = made_up.checkout / "logs"
    wait_for(lambda: (logs / "mqtt_connections.log").exists(), what="the logger's files")
    seen = 0
    for top in (made_up.checkout / "var", logs):
        for path in [top, *top.rglob("*")]:
            info = path.lstat()
            if stat.S_ISLNK(info.st_mode):
                continue
            mode = stat.S_IMODE(info.st_mode)
            assert mode & 0o027 == 0, f"{path} is {oct(mode)}: others may read it, or the group write it"
            assert info.st_uid == service_uid(), f"{path} belongs to uid {info.st_uid}"
            seen += 1
    assert seen > 20  # the cluster, the logs, the secrets, not an empty tree


def test_no_process_shows_a_secret_and_the_children_hold_none(made_up):
    secrets = made_up.secrets()
    assert len(secrets) == 3 and all(len(s) >= 32 for s in secrets)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            shown = cmdline(int(entry.name))
            assert not any(s in shown for s in secrets), f"pid {entry.name} shows a secret in its argv"
    processes = stack_processes(made_up)
    for pid, name in processes.items():
        try:
            env = environ(pid)
        except (FileNotFoundError, ProcessLookupError):
            continue  # a PostgreSQL backend that just ended
        raw = "\0".join(f"{k}={v}" for k, v in env.items())
        assert not any(s in raw for s in secrets), f"{name} (pid {pid}) has a secret in its environment"
        if name == "sitelink-zygote" or name.startswith("sitelink-c"):
            leaked = [k for k in env if k == "SITELINK_DATABASE_URL" or k.startswith("PG")]
            assert not leaked, f"{name} (pid {pid}) inherited {leaked}"


def test_make_status_psql_and_supervisorctl_work_for_who_ran_make_up(made_up):
    status: list[str] = []

    def three_connected() -> bool:
        status[:] = [made_up.run("status")]
        return [line.split()[2] for line in status[0].splitlines()[2:]].count("connected") == 3
    try:
        wait_for(three_connected, 30, "three demo sites connected in make status", interval=0.5)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; make status printed:\n{status[0]}") from None
    # psql's own argv, printed from inside it: the URL names the password file, holds no password.
    out = made_up.run("psql", "SELECT current_user, count(*) FROM site;\n"
                              "\\! tr '\\0' ' ' < /proc/$PPID/cmdline; echo\n")
    assert re.search(r"sitelink\s*\|\s*4", out), out
    argv_line = next(line for line in out.splitlines() if "bin/psql " in line)
    assert "passfile=" in argv_line and not any(s in argv_line for s in made_up.secrets()), argv_line
    ctl = subprocess.run([str(made_up.checkout / ".venv" / "bin" / "supervisorctl"), "-c",
                          str(made_up.checkout / "supervisor_conf" / "supervisord.conf"), "status"],
                         env=made_up.env, capture_output=True, text=True, timeout=30)
    assert ctl.stdout.count("RUNNING") == 6, ctl.stdout + ctl.stderr


def test_make_up_serves_the_status_page_and_says_where(made_up):
    url = f"http://127.0.0.1:{made_up.env['SITELINK_WEB_PORT']}/"
    assert url in made_up.up_output, made_up.up_output

    def demo_sites() -> set[str]:
        with urllib.request.urlopen(url + "api/state", timeout=10) as response:
            return {site["site"] for site in json.load(response)["sites"]}
    wait_for(lambda: demo_sites() == {"alpine-hut", "harbour-pump", "vineyard-north", "offshore-buoy"}, 30,
             "the demo sites on the status page", interval=0.5)
