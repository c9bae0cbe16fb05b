# sitelink: make setup | up | status | watch | logs | psql | down | test | clean
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
.NOTPARALLEL:

ROOT := $(patsubst %/,%,$(dir $(abspath $(lastword $(MAKEFILE_LIST)))))
VENV := $(ROOT)/.venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONF := $(ROOT)/supervisor_conf/supervisord.conf
BIN := $(ROOT)/supervisor_conf/bin
SUPERVISORD := $(VENV)/bin/supervisord -c $(CONF)
SUPERVISORCTL := $(VENV)/bin/supervisorctl -c $(CONF)
VAR := $(ROOT)/var
PIDFILE := $(VAR)/run/supervisord.pid
# libpq's password file of the embedded PostgreSQL (written by bin/postgres).
PGPASS := $(VAR)/secrets/pgpass
PROGRAMS := postgres mosquitto logger monitor web demo

export SITELINK_EMBEDDED_PG_PORT ?= 55432
export SITELINK_EMBEDDED_MQTT_PORT ?= 18830

PYTEST_ARGS ?=

# True while the supervisord of this checkout runs (pid file + live process).
supervisord_running = { pid=$$(cat "$(PIDFILE)" 2>/dev/null || true); [[ -n $$pid ]] && kill -0 "$$pid" 2>/dev/null && grep -qa supervisord "/proc/$$pid/cmdline" 2>/dev/null; }

.PHONY: help setup system-deps browser-deps venv venv-usable up down status watch migrate logs psql test bench clean

help:
	@echo "sitelink targets:"
	@echo "  make setup    install system packages (as root; chromium for the tests) and the .venv"
	@echo "  make up       start the embedded stack (PostgreSQL, Mosquitto, logger, monitor, status page, demo),"
	@echo "                as user sitelink when run by root"
	@echo "  make status   sites and their connections"
	@echo "  make watch    the live status feed"
	@echo "  make logs     follow the log files"
	@echo "  make psql     a psql shell on the database"
	@echo "  make down     stop everything"
	@echo "  make test     run the test suite (PYTEST_ARGS='-k name' to select)"
	@echo "  make clean    remove var/ and logs/ (stack must be down)"

# ---------------------------------------------------------------- setup

setup: system-deps browser-deps venv

system-deps:
	@need=(); \
	if { [[ ! -x /usr/sbin/mosquitto ]] && ! command -v mosquitto >/dev/null 2>&1; } \
	    || ! command -v mosquitto_passwd >/dev/null 2>&1; then need+=(mosquitto); fi; \
	if [[ -z "$${SITELINK_PG_BIN:-}" ]] && ! compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null; then need+=(postgresql); fi; \
	if ! command -v psql >/dev/null 2>&1 || ! command -v pg_isready >/dev/null 2>&1; then need+=(postgresql-client); fi; \
	if [[ ! -x $(PYTHON) ]] && ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then need+=(python3-venv); fi; \
	if [[ $${#need[@]} -eq 0 ]]; then exit 0; fi; \
	if [[ $$(id -u) -ne 0 ]]; then \
	    echo "sitelink needs these Debian packages: $${need[*]}" >&2; \
	    echo "install them as root: apt-get install -y $${need[*]}   (or run 'make setup' as root)" >&2; \
	    exit 1; \
	fi; \
	echo "installing $${need[*]} ..."; \
	policy=/usr/sbin/policy-rc.d; \
	if [[ ! -e $$policy ]]; then \
	    printf '#!/bin/sh\n# written by sitelink make setup: start no services during the install\nexit 101\n' >"$$policy"; \
	    chmod 0755 "$$policy"; \
	    trap 'rm -f "$$policy"' EXIT; \
	fi; \
	apt-get update; \
	DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$${need[@]}"
	@newest=$$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true); \
	if [[ -z "$${SITELINK_PG_BIN:-}" && -n $$newest ]]; then \
	    major=$$(basename "$$(dirname "$$newest")"); \
	    if [[ ! $$major =~ ^[0-9]+$$ || $$major -lt 15 ]]; then \
	        echo "sitelink needs PostgreSQL 15 or newer; found $$major in $$newest (set SITELINK_PG_BIN to a newer bin/)" >&2; \
	        exit 1; \
	    fi; \
	fi

# The browser test of the status page (tests/test_status_page.py) drives
# Debian's chromium through chromedriver. Only the tests need them, so make up
# does not install them; make setup and make test do, as root. An ordinary
# user is told what to install, and the browser tests skip without them.
browser-deps:
	@need=(); \
	command -v chromium >/dev/null 2>&1 || need+=(chromium); \
	command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver); \
	if [[ $${#need[@]} -eq 0 ]]; then exit 0; fi; \
	if [[ $$(id -u) -ne 0 ]]; then \
	    echo "note: the status page's browser tests need the Debian packages $${need[*]}; without them they are skipped" >&2; \
	    echo "      install them as root: apt-get install -y $${need[*]}   (or run 'make setup' as root)" >&2; \
	    exit 0; \
	fi; \
	echo "installing $${need[*]} (for the status page's browser tests) ..."; \
	apt-get update; \
	DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$${need[@]}"

venv: venv-usable $(STAMP)

# As root, .venv must hold a Python the unprivileged service user can run too,
# not one under /root (pyenv's, say): true if other users can run $(1).
others_can_run = setpriv --reuid=nobody --regid=nogroup --clear-groups test -x "$$(realpath "$(1)")"

# A .venv made by root with such a Python (an older sitelink did) is made anew.
venv-usable:
	@if [[ $$(id -u) -eq 0 && -e "$(PYTHON)" ]] && ! $(call others_can_run,$(PYTHON)); then \
	    if $(supervisord_running); then \
	        echo ".venv uses a Python the service user cannot run: make down, then make up again" >&2; exit 1; \
	    fi; \
	    echo ".venv uses $$(realpath "$(PYTHON)"), which the service user cannot run: making .venv anew"; \
	    rm -rf "$(VENV)"; \
	fi

$(PYTHON):
	@py=$$(command -v python3); \
	if [[ $$(id -u) -eq 0 ]] && ! $(call others_can_run,$$py); then \
	    echo "$$py is out of reach of unprivileged users: making .venv with /usr/bin/python3"; \
	    py=/usr/bin/python3; \
	fi; \
	echo "$$py -m venv $(VENV)"; \
	"$$py" -m venv "$(VENV)"

$(STAMP): $(ROOT)/pyproject.toml | $(PYTHON)
	"$(PYTHON)" -m pip install --disable-pip-version-check -e "$(ROOT)[test]"
	touch "$@"

# ---------------------------------------------------------------- the stack

up: system-deps venv
	@cd "$(ROOT)"; \
	if $(supervisord_running); then \
	    pid=$$(cat "$(PIDFILE)"); \
	    echo "supervisord is running (pid $$pid)"; \
	    if [[ $$(stat -c %u "/proc/$$pid") -eq 0 ]]; then \
	        echo "warning: it runs as root (started by an older sitelink): make down, then make up" >&2; \
	    fi; \
	else \
	    echo "starting supervisord (PostgreSQL on 127.0.0.1:$$SITELINK_EMBEDDED_PG_PORT, Mosquitto on 127.0.0.1:$$SITELINK_EMBEDDED_MQTT_PORT)"; \
	    mkdir -p "$(VAR)/run" "$(VAR)/log"; \
	    "$(BIN)/run-as-service" --own "$(VAR)" --own "$(ROOT)/logs" -- $(SUPERVISORD); \
	fi; \
	$(SUPERVISORCTL) start postgres mosquitto >/dev/null 2>&1 || true; \
	echo "waiting for PostgreSQL ..."; \
	deadline=$$((SECONDS + 60)); \
	until pg_isready -q -h "$(VAR)/run" -p "$$SITELINK_EMBEDDED_PG_PORT" -U sitelink -d postgres; do \
	    state=$$($(SUPERVISORCTL) status postgres 2>/dev/null | awk '{print $$2}' || true); \
	    if [[ $$state == FATAL || $$SECONDS -ge $$deadline ]]; then \
	        echo "PostgreSQL did not start (state: $${state:-unknown}); end of var/log/postgres.log:" >&2; \
	        tail -n 30 "$(VAR)/log/postgres.log" >&2 || true; \
	        echo "(make down stops what did start)" >&2; \
	        exit 1; \
	    fi; \
	    sleep 0.5; \
	done; \
	psql_="env PGPASSFILE=$(PGPASS) psql -X -q -w -h $(VAR)/run -p $$SITELINK_EMBEDDED_PG_PORT -U sitelink"; \
	if [[ -z $$($$psql_ -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = 'sitelink'") ]]; then \
	    echo "creating database sitelink"; \
	    $$psql_ -d postgres -c 'CREATE DATABASE sitelink'; \
	fi; \
	"$(PYTHON)" -m services.admin migrate; \
	"$(PYTHON)" -m services.admin seed-demo; \
	if [[ $$($(SUPERVISORCTL) status web 2>&1 || true) == *"no such process"* ]]; then \
	    echo "adding the status page (program web) to the running supervisord"; \
	    $(SUPERVISORCTL) reread >/dev/null && $(SUPERVISORCTL) add web || true; \
	fi; \
	for p in logger monitor web demo; do \
	    case "$$($(SUPERVISORCTL) status $$p 2>/dev/null | awk '{print $$2}' || true)" in \
	        RUNNING|STARTING) ;; \
	        *) $(SUPERVISORCTL) start $$p || true ;; \
	    esac; \
	done; \
	echo "waiting for every program to be RUNNING ..."; \
	deadline=$$((SECONDS + 60)); \
	while :; do \
	    status=$$($(SUPERVISORCTL) status 2>/dev/null || true); \
	    running=$$(awk '$$2 == "RUNNING"' <<<"$$status" | wc -l); \
	    if [[ $$running -eq $(words $(PROGRAMS)) ]]; then break; fi; \
	    if [[ $$SECONDS -ge $$deadline ]]; then \
	        echo "$$status" >&2; \
	        echo "not every program is RUNNING after 60 s; see var/log/<program>.log (make down stops them)" >&2; \
	        exit 1; \
	    fi; \
	    sleep 0.5; \
	done; \
	echo "$$status"; \
	echo; \
	echo "sitelink is up, as user $$(stat -c %U "$(PIDFILE)"): PostgreSQL 127.0.0.1:$$SITELINK_EMBEDDED_PG_PORT (socket var/run)," \
	     "Mosquitto 127.0.0.1:$$SITELINK_EMBEDDED_MQTT_PORT; passwords in var/secrets/"; \
	echo "  status page   $$("$(PYTHON)" -m services.web --url)   (live, in a browser on this machine)"; \
	echo "  make status   sites and their connections"; \
	echo "  make watch    the live status feed"; \
	echo "  make logs     follow the log files (logs/, var/log/)"; \
	echo "  make psql     a psql shell on the database"; \
	echo "  make down     stop everything"

down:
	@if ! $(supervisord_running); then echo "supervisord is not running"; exit 0; fi; \
	pid=$$(cat "$(PIDFILE)"); \
	echo "stopping supervisord (pid $$pid) and its programs ..."; \
	$(SUPERVISORCTL) shutdown >/dev/null || kill -TERM "$$pid" 2>/dev/null || true; \
	deadline=$$((SECONDS + 60)); \
	while kill -0 "$$pid" 2>/dev/null; do \
	    if [[ $$SECONDS -ge $$deadline ]]; then \
	        echo "supervisord (pid $$pid) is still running after 60 s; see var/log/supervisord.log" >&2; \
	        exit 1; \
	    fi; \
	    sleep 0.2; \
	done; \
	echo "stopped"

status: venv
	@"$(PYTHON)" -m services.admin status

watch: venv
	@"$(PYTHON)" -m services.admin watch

migrate: venv
	@"$(PYTHON)" -m services.admin migrate

# No mkdir here: logs/ is the service user's, made by make up.
logs:
	@cd "$(ROOT)" && tail -F logs/mqtt_connections.log logs/mqtt_parsing.log var/log/*.log

# The password stays in a file or psql's environment, never in its argv.
psql: venv
	@exec "$(PYTHON)" -m services.admin psql

# ---------------------------------------------------------------- tests

test: setup
	cd "$(ROOT)" && "$(PYTHON)" -m pytest $(PYTEST_ARGS)

# Benchmarks: tests/bench/bench_*.py, collected only when tests/bench is named
# (tests/bench/conftest.py), so `make test` never runs them. Each prints its
# figures and rewrites its section of tests/bench/RESULTS.md. Durations:
# SITELINK_BENCH_SECONDS, SITELINK_BENCH_CHILDREN, SITELINK_BENCH_FLIPS,
# SITELINK_BENCH_FLEET_SITES, ... (see tests/bench/harness.py and each bench_*.py)
# (see tests/bench/harness.py); PYTEST_ARGS='-k children' runs one.
bench: setup
	cd "$(ROOT)" && "$(PYTHON)" -m pytest tests/bench -p no:cacheprovider -s $(PYTEST_ARGS)

clean:
	@if $(supervisord_running); then echo "the stack is running: make down first" >&2; exit 1; fi; \
	rm -rf "$(VAR)" "$(ROOT)/logs"; \
	echo "removed var/ and logs/"
