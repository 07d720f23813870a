"""Command-line lists of KEY=VALUE items (--set, --reward, --task-option, --eval-data): one parser whose errors name
the flag and the item."""

from __future__ import annotations

from collections.abc import Iterable


def key_values(items: Iterable[str] | None, flag: str, form: str = "KEY=VALUE") -> dict[str, str]:
    """{key: value text} of the items, in order; ValueError naming a malformed or repeated item."""
    out: dict[str, str] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key or not value.strip():
            raise ValueError(f"{flag} {item!r}: expected {form}")
        if key in out:
            raise ValueError(f"{flag} {key}: given twice")
        out[key] = value.strip()
    return out
