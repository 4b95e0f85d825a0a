"""Structured logs (logs.py): one JSON object per line, the cancel-path fields bound for a
stretch of work or given with a call, and the API's logging configuration in JSON."""

from __future__ import annotations

import io
import json
import logging
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from comfy_cancel import cli, logs


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A logger writing JSON lines into a buffer, as a worker's handlers do with json on."""
    out = io.StringIO()
    logger = logging.getLogger("test.logs")
    handler = logging.StreamHandler(out)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logs.use_json(logger)
    yield logger, out
    logger.removeHandler(handler)


def lines(out: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_one_json_object_per_line_with_the_bound_fields(
    captured: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, out = captured
    logger.info("before")
    with logs.bound(workflow_id="w-1", cancel_source="api"):
        logger.info("cancel of workflow %s", "w-1", extra={"outcome": "cancelled"})
        logger.info("given wins", extra={"cancel_source": "bulk"})
    logger.warning("after\nwith a newline")

    before, during, given, after = lines(out)
    assert set(before) >= {"time", "level", "logger", "message"}
    assert not set(logs.FIELDS) & set(before)
    assert during["message"] == "cancel of workflow w-1"
    assert {k: during[k] for k in logs.FIELDS} == {
        "workflow_id": "w-1", "cancel_source": "api", "outcome": "cancelled"}
    assert given["cancel_source"] == "bulk" and given["workflow_id"] == "w-1"
    assert (after["level"], after["message"]) == ("WARNING", "after\nwith a newline")
    assert "workflow_id" not in after


def test_bound_fields_stay_in_their_thread(captured: tuple[logging.Logger, io.StringIO]) -> None:
    logger, out = captured
    with logs.bound(workflow_id="mine"):
        thread = threading.Thread(target=logger.info, args=("another thread",))
        thread.start()
        thread.join()
    (line,) = lines(out)
    assert "workflow_id" not in line


def test_a_traceback_is_a_field_of_its_line(captured: tuple[logging.Logger, io.StringIO]) -> None:
    logger, out = captured
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("failed")
    (line,) = lines(out)
    assert "ValueError: boom" in line["exc_info"]


def test_the_api_logs_json_through_every_handler_only_when_asked() -> None:
    text = cli._api_log_config("INFO")
    assert all(f.get("()") != "comfy_cancel.logs.json_formatter"
               for f in text["formatters"].values())

    config = cli._api_log_config("INFO", "json")

    assert set(config["formatters"]) == set(text["formatters"])
    for handler in config["handlers"].values():
        assert "context" in handler["filters"]
    # uvicorn's access line, formatted by the factory the config names.
    factory = config["formatters"]["access"]["()"]
    assert factory == "comfy_cancel.logs.json_formatter"
    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1,
                               '%s - "%s %s HTTP/%s" %d',
                               ("127.0.0.1:5000", "POST", "/v1/workflow/w-1/cancel", "1.1", 200),
                               None)
    line = json.loads(logs.json_formatter().format(record))
    assert line["message"] == '127.0.0.1:5000 - "POST /v1/workflow/w-1/cancel HTTP/1.1" 200'
    assert line["logger"] == "uvicorn.access"
