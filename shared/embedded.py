"""The broker credentials the embedded stack generates, read where they are needed.

``supervisor_conf/bin/mosquitto`` generates them on its first start and keeps
them in ``Settings.secrets_dir / MQTT_USERS`` (``var/secrets/mqtt-users``,
mode 0600, the service user's), one ``username:password`` per line:
``SITE_USER`` for the demo sites' connections (``services.admin seed-demo``
stores it in their rows) and ``PUBLISHER_USER`` for the demo gateways
(``services.demo``). Nothing here ever puts a password in an error message.
"""

from __future__ import annotations

from pathlib import Path

MQTT_USERS = "mqtt-users"
SITE_USER = "sitelink"
PUBLISHER_USER = "demo-publisher"


class CredentialsUnavailable(Exception):
    """The embedded broker's credentials cannot be read (says why, never what they are)."""


def mqtt_password(secrets_dir: Path, username: str) -> str:
    """The embedded broker's password of ``username``."""
    path = secrets_dir / MQTT_USERS
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CredentialsUnavailable(f"{path} does not exist: the embedded broker writes it "
                                     "on its first start (make up)") from None
    except PermissionError:
        raise CredentialsUnavailable(f"cannot read {path}: run this as the user that runs the "
                                     "embedded stack, or as root") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CredentialsUnavailable(f"cannot read {path}: {type(exc).__name__}") from None
    for line in text.splitlines():
        user, colon, password = line.partition(":")
        if colon and user == username and password:
            return password
    raise CredentialsUnavailable(f"{path} has no password for {username!r}")
