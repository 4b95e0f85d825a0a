"""Operators' bulk cancels: by filter or by a list of ids, set-based, in chunks.

Per chunk of matches (keyset paging, so memory stays flat whatever the count):

1. one compare-and-set statement cancels the queued ones (recording their request) and
   returns exactly those; one broadcast revokes their runner tasks, and those with a
   prompt pending in ComfyUI are removed with one call per server and their runners told
   to stop (``cancel.cancel_queued``, the same code the cancel worker runs);
2. one statement records the cancel intents of the rest (running, or just started);
3. those go to the ``cancel.bulk`` queue as one message, whose handler signals their
   runners in one pipeline; customers' cancels on ``cancel`` never wait behind it.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from itertools import islice
from typing import Any

from comfy_cancel import cancel, manager, publish
from comfy_cancel.context import Context
from comfy_cancel.manager import Target, WorkflowFilter
from comfy_cancel.models import CANCELLABLE, TERMINAL, CancelOutcome, WorkflowStatus
from comfy_cancel.status import Actor

log = logging.getLogger(__name__)
S = WorkflowStatus
STOPPED = {CancelOutcome.CANCELLED.value, CancelOutcome.FORCED.value,
           CancelOutcome.RUNNER_LOST.value}

Progress = Callable[[int], None]  # called with the number of matches just handled


@dataclass
class BulkSummary:
    """What a bulk cancel matched and what became of it."""

    dry_run: bool
    matched: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    sample: list[str] = field(default_factory=list)
    cancelled: int = 0  # stopped: queued ones at once, running ones once acknowledged
    too_late: int = 0  # completed or failed before the cancel reached them
    already_terminal: int = 0  # terminal when matched, or cancelled by someone else
    not_cancellable: int = 0  # accepted/uploaded: not queued yet
    not_found: int = 0  # ids with no such workflow (of this account)
    failed_to_signal: int = 0  # could not be handed on now; the sweep re-publishes them
    pending: int = 0  # running ones whose outcome had not arrived when we stopped waiting
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan(
    ctx: Context, flt: WorkflowFilter, ids: Iterable[str] | None = None, sample_size: int = 10
) -> BulkSummary:
    """The dry run: what a bulk cancel would match, counted by status; changes nothing."""
    summary = BulkSummary(dry_run=True)
    started = time.monotonic()
    if ids is None:  # a filter is counted by the database, grouped, in one statement
        with ctx.db.transaction() as session:
            summary.by_status = manager.count_by_status(session, flt)
            summary.sample = manager.sample_ids(session, flt, sample_size)
        summary.matched = sum(summary.by_status.values())
        summary.seconds = round(time.monotonic() - started, 3)
        return summary
    for chunk, missing in _chunks(ctx, flt, ids):
        summary.not_found += missing
        summary.matched += len(chunk)
        for target in chunk:
            summary.by_status[target.status] = summary.by_status.get(target.status, 0) + 1
            if len(summary.sample) < sample_size:
                summary.sample.append(target.id)
    summary.seconds = round(time.monotonic() - started, 3)
    return summary


def execute(
    ctx: Context,
    flt: WorkflowFilter,
    by: Actor,
    ids: Iterable[str] | None = None,
    *,
    progress: Progress | None = None,
    wait_seconds: float = 0.0,
) -> BulkSummary:
    """Cancel every match; wait up to ``wait_seconds`` for the running ones' outcomes."""
    summary = BulkSummary(dry_run=False)
    started = time.monotonic()
    signalled: list[str] = []
    for chunk, missing in _chunks(ctx, flt, ids):
        summary.not_found += missing
        summary.matched += len(chunk)
        for target in chunk:
            summary.by_status[target.status] = summary.by_status.get(target.status, 0) + 1
        signalled.extend(_cancel_chunk(ctx, chunk, by, summary))
        if progress is not None:
            progress(len(chunk) + missing)
    _collect_outcomes(ctx, signalled, summary, wait_seconds)
    summary.seconds = round(time.monotonic() - started, 3)
    return summary


def _chunks(
    ctx: Context, flt: WorkflowFilter, ids: Iterable[str] | None
) -> Iterator[tuple[list[Target], int]]:
    """Matches in chunks, with how many ids of the chunk were not found."""
    size = ctx.settings.bulk_chunk_size
    if ids is None:
        after: str | None = None
        while True:
            with ctx.db.transaction() as session:
                chunk = manager.targets_after(session, flt, after, size)
            if not chunk:
                return
            yield chunk, 0
            after = chunk[-1].id
    iterator = iter(ids)
    while batch := list(dict.fromkeys(islice(iterator, size))):
        with ctx.db.transaction() as session:
            chunk = manager.targets_by_ids(session, batch, flt.account)
        yield chunk, len(batch) - len(chunk)


def _cancel_chunk(
    ctx: Context, chunk: list[Target], by: Actor, summary: BulkSummary
) -> list[str]:
    """Cancel one chunk; returns the ids of the running ones handed to the bulk queue."""
    active = [t.id for t in chunk if t.status in CANCELLABLE]
    queued = [t.id for t in chunk if t.status == S.QUEUED]
    summary.already_terminal += sum(t.status in TERMINAL for t in chunk)
    summary.not_cancellable += sum(t.status not in CANCELLABLE | TERMINAL for t in chunk)
    # The CAS records the request of what it cancels; only the rest needs a request.
    cancelled = cancel.cancel_queued(ctx, queued, by)
    # Running ones, and queued ones that started running meanwhile: one message.
    rest = [wid for wid in active if wid not in cancelled]
    handed = publish.request_cancels(ctx.db, rest, by, chunk_size=max(1, len(rest)))
    summary.cancelled += len(cancelled)
    # Matched as queued or running, ended before the request was written.
    summary.too_late += len(active) - len(cancelled) - len(handed.recorded)
    if not handed.published:
        summary.failed_to_signal += len(handed.recorded)
        return []
    return handed.recorded


def _collect_outcomes(
    ctx: Context, signalled: list[str], summary: BulkSummary, wait_seconds: float
) -> None:
    """Fold the outcomes of the running ones into the summary, waiting a bounded time."""
    deadline = time.monotonic() + wait_seconds
    counts: dict[str, int] = {}
    while signalled:
        counts = defaultdict(int)
        for start in range(0, len(signalled), ctx.settings.bulk_chunk_size):
            with ctx.db.transaction() as session:
                part = manager.outcomes_of(
                    session, signalled[start : start + ctx.settings.bulk_chunk_size]
                )
            for outcome, count in part.items():
                counts[outcome] += count
        if not counts.get("pending") or time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    summary.cancelled += sum(n for outcome, n in counts.items() if outcome in STOPPED)
    summary.too_late += counts.get(CancelOutcome.TOO_LATE.value, 0)
    summary.already_terminal += counts.get(CancelOutcome.ALREADY_CANCELLED.value, 0)
    summary.pending += counts.get("pending", 0)
