"""What the status page shows: one row per site, made from the status feed.

``Board`` takes the bodies a ``shared.feed.FeedClient`` hands out (the
current state, then each change) and keeps, per site, the row the page
draws: its connection's state, when it last sent data and how many of its
devices are online. ``take`` returns the ids of the sites whose row changed,
so the web process sends browsers only those. Pure logic: no sockets, no
threads, tested on its own.

The feed is trusted for its format, not for its values: a body without the
ids it needs is skipped, and every text is passed on as it is, for the page
to show as text.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

#: Device kinds, in the order the page lists them.
DEVICE_KINDS = ("gateway", "datalogger", "sensor")
#: What the page gets of a connection (``mqtt_status``): the fields it shows.
CONNECTION_FIELDS = ("connection_id", "status", "is_active", "paused", "message", "last_connected_at",
                     "connection_errors", "retry_attempt", "next_retry_at", "gave_up")
#: Most devices one answer of ``devices`` lists.
MAX_DEVICES_LISTED = 2000


def _id(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class Board:
    """The page's rows, by site id."""

    def __init__(self) -> None:
        #: site id -> connection id -> its latest ``mqtt_status`` body
        self._connections: dict[int, dict[int, dict]] = {}
        #: site id -> (kind, device id) -> its latest ``device_status`` body
        self._devices: dict[int, dict[tuple[str, int], dict]] = {}
        self._device_site: dict[tuple[str, int], int] = {}
        #: site id -> its latest ``site_data`` body
        self._data: dict[int, dict] = {}
        self._names: dict[int, str] = {}

    # -- taking the feed

    def take(self, bodies: Iterable[dict]) -> set[int]:
        """Apply bodies in order (as FeedClient gives them); the sites whose row changed."""
        changed: set[int] = set()
        for body in bodies:
            site_id = self._take_one(body)
            if site_id is not None:
                changed.add(site_id)
        return changed

    def _take_one(self, body: dict) -> int | None:
        kind = body.get("type")
        site_id = _id(body.get("site_id"))
        if site_id is None:
            return None
        if body.get("removed") is True:  # gone from PostgreSQL (FeedClient saw it in a snapshot)
            return self._remove(kind, site_id, body)
        if kind == "mqtt_status":
            connection_id = _id(body.get("connection_id"))
            if connection_id is None:
                return None
            self._connections.setdefault(site_id, {})[connection_id] = body
        elif kind == "device_status":
            device_id, device_kind = _id(body.get("id")), body.get("kind")
            if device_id is None or device_kind not in DEVICE_KINDS:
                return None
            key = (device_kind, device_id)
            self._devices.setdefault(site_id, {})[key] = body
            before = self._device_site.get(key)
            self._device_site[key] = site_id
            if before is not None and before != site_id:  # cannot happen in sitelink's schema; stay right anyway
                self._devices[before].pop(key, None)
        elif kind == "site_data":
            self._data[site_id] = body
        else:
            return None
        name = body.get("site")
        if isinstance(name, str):
            self._names[site_id] = name
        return site_id

    def _remove(self, kind: Any, site_id: int, body: dict) -> int | None:
        if kind == "mqtt_status":
            self._connections.get(site_id, {}).pop(_id(body.get("connection_id")), None)
        elif kind == "device_status":
            key = (body.get("kind"), _id(body.get("id")))
            self._devices.get(site_id, {}).pop(key, None)
            self._device_site.pop(key, None)
        elif kind == "site_data":
            self._data.pop(site_id, None)
        else:
            return None
        for table in (self._connections, self._devices):
            if table.get(site_id) == {}:
                del table[site_id]
        if not self.knows(site_id):
            self._names.pop(site_id, None)
        return site_id

    # -- what the page gets

    def site_ids(self) -> list[int]:
        return sorted(self._connections.keys() | self._devices.keys() | self._data.keys())

    def row(self, site_id: int) -> dict:
        """The row of one site: its connection's state, its last data, its device counts."""
        row: dict[str, Any] = {"site_id": site_id, "site": self._names.get(site_id, f"site {site_id}")}
        connections = self._connections.get(site_id)
        if connections:
            # One connection per site (a unique site_id); a site whose connection
            # was deleted and made anew has a newer one with a higher id.
            newest = connections[max(connections)]
            row.update({f: newest.get(f) for f in CONNECTION_FIELDS})
            row["changed_at"] = newest.get("timestamp")
        else:
            row.update({f: None for f in CONNECTION_FIELDS})
            row["changed_at"] = None
        row["last_data_at"] = (self._data.get(site_id) or {}).get("last_data_at")
        counts = {kind: {"online": 0, "offline": 0} for kind in DEVICE_KINDS}
        for (kind, _), body in self._devices.get(site_id, {}).items():
            counts[kind]["online" if body.get("is_online") else "offline"] += 1
        row["devices"] = counts
        return row

    def rows(self, site_ids: Iterable[int] | None = None) -> list[dict]:
        return [self.row(s) for s in (self.site_ids() if site_ids is None else sorted(site_ids))]

    def knows(self, site_id: int) -> bool:
        return site_id in self._connections or site_id in self._devices or site_id in self._data

    def devices(self, site_id: int, limit: int = MAX_DEVICES_LISTED) -> tuple[list[dict], bool]:
        """The devices of a site (kind, then name), at most ``limit``; and whether there were more."""
        found = sorted(self._devices.get(site_id, {}).values(),
                       key=lambda b: (DEVICE_KINDS.index(b["kind"]), str(b.get("name")), b["id"]))
        # A snapshot says when each device was last seen; a change only when it
        # happened (``changed_at``: when it went offline or came back).
        listed = [{"kind": b["kind"], "id": b["id"], "name": b.get("name"), "is_online": bool(b.get("is_online")),
                   "last_seen_at": b.get("last_seen_at"), "changed_at": b.get("timestamp")} for b in found[:limit]]
        return listed, len(found) > limit
