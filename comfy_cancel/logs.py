"""How the processes log: text lines for a terminal (the default), or one JSON object per
line (``COMFY_CANCEL_LOG_FORMAT=json``) for a log collector.

A cancel-path line carries ``workflow_id``, ``cancel_source`` and ``outcome`` where they
are known: given with the call (``extra=``), or bound for a stretch of work by
:func:`bound` (a runner task binds its workflow's id for the whole run, so the ComfyUI
client's lines carry it too) and added to each record by :class:`ContextFilter`. In JSON
they are fields of their own; a text line says them in its words.

Nothing secret is logged: tokens are never passed to a logger, runner headers never leave
the ComfyUI client, URLs go through :func:`comfy_cancel.redact.redact_url`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from types import MappingProxyType
from typing import Any

from pythonjsonlogger.json import JsonFormatter

# What a cancel-path line may carry.
FIELDS = ("workflow_id", "cancel_source", "outcome")

_NONE: Mapping[str, Any] = MappingProxyType({})
_bound: ContextVar[Mapping[str, Any]] = ContextVar("comfy_cancel_log_fields", default=_NONE)


@contextmanager
def bound(**fields: Any) -> Iterator[None]:
    """Add ``fields`` to every record logged in this context (this thread, this task)
    until the block ends; a field given with the call wins."""
    token = _bound.set({**_bound.get(), **fields})
    try:
        yield
    finally:
        _bound.reset(token)


class ContextFilter(logging.Filter):
    """Puts the fields bound by :func:`bound` on each record that lacks them."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in _bound.get().items():
            if not hasattr(record, name):
                setattr(record, name, value)
        return True


def json_formatter() -> logging.Formatter:
    """One JSON object per record: time, level, logger, message, the extra fields, and the
    traceback (``exc_info``) when there is one."""
    return JsonFormatter(
        "%(asctime)s %(levelname)s %(name)s %(message)s",
        rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
        datefmt="%Y-%m-%dT%H:%M:%S%z",
    )


_FACTORY = f"{__name__}.json_formatter"
_FILTER = f"{__name__}.ContextFilter"


def json_log_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A :func:`logging.config.dictConfig` dict with every formatter made the JSON one and
    the context filter on every handler (uvicorn's config, for the API's processes)."""
    result = dict(config)
    result["formatters"] = {name: {"()": _FACTORY} for name in config.get("formatters", {})}
    result["filters"] = {**config.get("filters", {}), "context": {"()": _FILTER}}
    result["handlers"] = {
        name: {**handler, "filters": [*handler.get("filters", []), "context"]}
        for name, handler in config.get("handlers", {}).items()
    }
    return result


def use_json(logger: logging.Logger) -> None:
    """Make ``logger``'s handlers write JSON lines with the bound fields (Celery's worker
    and beat loggers, once Celery has set them up)."""
    for handler in logger.handlers:
        handler.setFormatter(json_formatter())
        if not any(isinstance(f, ContextFilter) for f in handler.filters):
            handler.addFilter(ContextFilter())
