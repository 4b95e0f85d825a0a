"""One workflow's updates as server-sent events (``GET /v1/workflow/{id}/subscribe``).

A stream subscribes first (:meth:`live.Hub.open`), then reads the database, then goes on
live: whatever commits after the read arrives on the subscription, and what the read saw
already is dropped by its audit id (a workflow's audit rows are numbered in the order they
commit: every writer locks the workflow's row before its audit row). So there is no gap
and no duplicate. When updates may have been lost (Redis was away), the stream catches up
from the database by the same ids. The read and each catch-up are short reads on a thread;
an idle stream holds no database connection.

Events: ``state`` first (the workflow as ``GET /v1/workflow/{id}`` shows it), then
``status``, ``cancel_requested``, ``cancel_signalled``, ``cancel_acknowledged`` and
``cancel_outcome`` (audit rows, each with its id), and ``progress`` (no id). The stream ends
after the terminal status. ``Last-Event-ID`` resumes after that id, from the database.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import anyio
from sqlalchemy.orm import Session
from sse_starlette import ServerSentEvent

from comfy_cancel import live, manager
from comfy_cancel.db import Database
from comfy_cancel.models import TERMINAL, EventKind
from comfy_cancel.schemas import WorkflowView

STATE = "state"
STATUS = "status"  # the event of an audit row of kind ``transition``
PING = ServerSentEvent(comment="ping")


@dataclass
class Snapshot:
    """What a new stream sends before it goes live."""

    last_id: int  # the highest audit id it covers: later ones come live
    terminal: bool  # the workflow had ended when it was read
    state: bytes | None = None  # the first event; None when resuming
    replay: list[live.Update] = field(default_factory=list)  # resumed: the missed rows

    @property
    def nothing_to_send(self) -> bool:
        """A resumed stream of an ended workflow that has nothing newer: answered 204, which
        also tells a browser's EventSource to stop reconnecting."""
        return self.terminal and self.state is None and not self.replay


def snapshot(db: Database, workflow_id: str, account_id: int,
             after_id: int | None) -> Snapshot | None:
    """The stream's start, read from the database; None when the workflow is not the
    account's. Blocks: call it on a thread."""
    with db.reading() as session:
        if after_id is None:
            # The id first: an update committed between the two reads is then sent live
            # too (shown twice, never lost).
            last = manager.last_event_id(session, workflow_id)
            workflow = manager.get_workflow(session, workflow_id, account_id)
            if workflow is None:
                return None
            return Snapshot(last, workflow.status in TERMINAL,
                            state=WorkflowView.of(workflow).to_json())
        # The status first: if it is terminal, the terminal row is among the rows read next
        # or was sent before ``after_id``.
        current = manager.workflow_status(session, workflow_id, account_id)
        if current is None:
            return None
        return Snapshot(after_id, current in TERMINAL,
                        replay=_updates_after(session, workflow_id, after_id))


def catch_up(db: Database, workflow_id: str, after_id: int) -> list[live.Update]:
    """The workflow's audit rows after ``after_id``, as updates. Blocks."""
    with db.reading() as session:
        return _updates_after(session, workflow_id, after_id)


def _updates_after(session: Session, workflow_id: str, after_id: int) -> list[live.Update]:
    return [live.update_of_row(row) for row in manager.events_of(session, workflow_id, after_id)]


def event_of(update: live.Update) -> ServerSentEvent:
    kind = update["kind"]
    event_id = update.get("id")
    return ServerSentEvent(
        json.dumps(update, separators=(",", ":")),
        event=STATUS if kind == EventKind.TRANSITION.value else kind,
        id=None if event_id is None else str(event_id),
    )


def ends_stream(update: live.Update) -> bool:
    return update["kind"] == EventKind.TRANSITION.value and update.get("to_status") in TERMINAL


async def events(
    subscription: live.Subscription, start: Snapshot, db: Database
) -> AsyncIterator[ServerSentEvent]:
    """The stream's events, from ``start`` on; closes the subscription when it ends."""
    try:
        last = start.last_id
        if start.state is not None:
            yield ServerSentEvent(start.state.decode(), event=STATE, id=str(last))
        pending: Sequence[live.Update] = start.replay
        while True:
            for update in pending:
                event_id = update.get("id")
                if event_id is not None:
                    if event_id <= last:
                        continue  # the snapshot or an earlier catch-up had it
                    last = event_id
                yield event_of(update)
                if ends_stream(update):
                    return
            if start.terminal:
                return  # ended before the stream began: what it had is sent
            item = await subscription.get()
            if item == live.RESYNC:
                pending = await anyio.to_thread.run_sync(catch_up, db, subscription.workflow_id,
                                                         last)
            else:
                assert not isinstance(item, str)
                pending = item
    finally:
        subscription.close()
