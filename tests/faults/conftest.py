"""Fixtures of the fault suite: one harness for all faults, and the table at the end.

``COMFY_CANCEL_FAULTS=full`` puts more work in flight per fault; ``-m "not faults"`` leaves
the suite out. The table is printed at the end of the session and written to
``.pytest_cache/d/faults/table.md`` (and ``table.json``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import pytest

from comfy_cancel.embedded import processes
from tests.conftest import _unavailable
from tests.faults.harness import COUNTS, FULL, RESULTS, Harness, table


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    h = Harness(tmp_path_factory.mktemp("faults"))
    try:
        h.start()
    except processes.ServiceError as exc:
        h.stop()
        _unavailable("Redis or PostgreSQL", str(exc))
    try:
        yield h
    finally:
        h.stop()


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config
) -> None:
    if not RESULTS:
        return
    mode = "full (COMFY_CANCEL_FAULTS=full)" if FULL else "short (CI)"
    text = (f"fault suite, {mode}: {COUNTS.sims} simulated ComfyUI servers x "
            f"{COUNTS.per_sim} workflows, {COUNTS.cancels} cancels per fault\n\n"
            + table(RESULTS) + "\n")
    terminalreporter.write_sep("=", "fault suite")
    terminalreporter.write_line(text)
    cache = getattr(config, "cache", None)  # None under -p no:cacheprovider
    if cache is not None:
        directory = Path(cache.mkdir("faults"))
        (directory / "table.md").write_text(text)
        (directory / "table.json").write_text(
            json.dumps([asdict(r) for r in RESULTS], indent=2) + "\n"
        )
        terminalreporter.write_line(f"written to {directory / 'table.md'}")
