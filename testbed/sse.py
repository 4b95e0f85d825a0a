"""A server-sent events reader for the tests and the benchmark (what a browser's
EventSource does with the stream of ``GET /v1/workflow/{id}/subscribe``)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Event:
    event: str
    data: str
    id: str | None

    @property
    def json(self) -> Any:
        return json.loads(self.data)


def events(lines: Iterable[str]) -> Iterator[Event]:
    """The events of a stream's lines (comments, such as pings, are skipped)."""
    name, event_id = "message", None
    data: list[str] = []
    for line in lines:
        line = line.rstrip("\r\n")
        if not line:
            if data:
                yield Event(name, "\n".join(data), event_id)
            name, data, event_id = "message", [], None
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            name = value
        elif field == "data":
            data.append(value)
        elif field == "id":
            event_id = value
    if data:
        yield Event(name, "\n".join(data), event_id)


def parse(text: str) -> list[Event]:
    return list(events(text.splitlines()))
