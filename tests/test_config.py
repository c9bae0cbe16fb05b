"""Settings from the environment: defaults, types, and errors naming the variable."""

import pytest

from shared import config


def test_defaults():
    s = config.load({})
    assert s.monitor_interval == 30
    assert s.status_feed == "tcp://127.0.0.1:5556"
    assert s.log_dir == config.PROJECT_ROOT / "logs"
    assert str(config.PROJECT_ROOT / "var" / "run") in s.database_url


def test_values_are_typed():
    s = config.load({"SITELINK_MONITOR_INTERVAL": "0.5", "SITELINK_MAX_RETRIES": "4",
                     "SITELINK_LOG_DIR": "/tmp/x"})
    assert s.monitor_interval == 0.5 and s.max_retries == 4 and str(s.log_dir) == "/tmp/x"


@pytest.mark.parametrize("name, value", [
    ("SITELINK_MONITOR_INTERVAL", "soon"),
    ("SITELINK_MONITOR_INTERVAL", "-1"),
    ("SITELINK_MAX_RETRIES", "0"),
    ("SITELINK_STATUS_FEED", "localhost:5556"),
    ("SITELINK_EMBEDDED_PG_PORT", "70000"),
    ("SITELINK_LOG_LEVEL", "chatty"),
    ("SITELINK_KEEP_READINGS_DAYS", "0"),
    ("SITELINK_KEEP_QUARANTINE_DAYS", "a month"),
])
def test_bad_value_names_the_variable(name, value):
    with pytest.raises(config.ConfigError, match=name):
        config.load({name: value})


def test_retention_is_in_days_or_forever_and_readings_are_kept_by_default():
    s = config.load({})
    assert (s.keep_connection_log_days, s.keep_status_history_days, s.keep_parsing_log_days,
            s.keep_quarantine_days, s.keep_readings_days) == (30, 90, 30, 30, None)
    s = config.load({"SITELINK_KEEP_READINGS_DAYS": "400", "SITELINK_KEEP_CONNECTION_LOG_DAYS": "Forever",
                     "SITELINK_KEEP_QUARANTINE_DAYS": "0.5"})
    assert (s.keep_readings_days, s.keep_connection_log_days, s.keep_quarantine_days) == (400, None, 0.5)


def test_settings_are_frozen():
    with pytest.raises(Exception):
        config.load({}).monitor_interval = 1


def test_every_setting_is_documented_in_the_readme():
    readme = (config.PROJECT_ROOT / "README.md").read_text()
    missing = [name for name, _, _ in config.documentation() if name not in readme]
    assert not missing, f"settings missing from README.md: {missing}"
