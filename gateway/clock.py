"""UTC timestamps in the one format the gateway uses everywhere (Jupyter's, with microseconds)."""

from __future__ import annotations

from datetime import datetime, timezone

ISO_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def iso(moment: datetime) -> str:
    """``YYYY-MM-DDTHH:MM:SS.ffffffZ``, microseconds always present."""
    return moment.astimezone(timezone.utc).strftime(ISO_FORMAT)


def now_iso() -> str:
    return iso(utcnow())
