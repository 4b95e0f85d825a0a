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


class _Sent:
    """Which audit rows a stream has sent. Every row up to ``floor`` is accounted for (the
    snapshot, or a read of the database: a workflow's rows are numbered in the order they
    commit, so none committed later can number lower); above it, the ids sent live.

    Live updates of one workflow can arrive out of order: each writer publishes after its
    own commit, and two processes race (a cancel worker's ``cancel_signalled`` behind the
    runner's acknowledgement and ``cancelled``). So a live update above the floor is sent
    if it is new, and the terminal one makes the stream read the database first, to send
    in order whatever it has not seen yet: nothing is missing when the stream closes."""

    def __init__(self, floor: int) -> None:
        self.floor = floor
        self.ids: set[int] = set()

    def new(self, update: live.Update) -> bool:
        event_id = update.get("id")
        if event_id is None:
            return True  # progress: never stored, always sent
        if event_id <= self.floor or event_id in self.ids:
            return False
        self.ids.add(event_id)
        return True

    def read_up_to(self, updates: Sequence[live.Update]) -> None:
        """``updates`` were read from the database after ``floor``: raise it past them."""
        if updates:
            self.floor = max(self.floor, max(u["id"] for u in updates))
            self.ids = {i for i in self.ids if i > self.floor}


async def events(
    subscription: live.Subscription, start: Snapshot, db: Database
) -> AsyncIterator[ServerSentEvent]:
    """The stream's events, from ``start`` on; closes the subscription when it ends."""
    workflow_id = subscription.workflow_id

    async def read_after(floor: int) -> list[live.Update]:
        return await anyio.to_thread.run_sync(catch_up, db, workflow_id, floor)

    try:
        sent = _Sent(start.last_id)
        if start.state is not None:
            yield ServerSentEvent(start.state.decode(), event=STATE, id=str(start.last_id))
        # A batch read from the database is complete and in order; a live one may not be.
        batch: Sequence[live.Update] = start.replay
        read = True
        while True:
            ending = None if read else next(filter(ends_stream, batch), None)
            if ending is not None:
                # The end came live: read what may still be on its way, and end in order.
                batch, read = await read_after(sent.floor), True
            for update in batch:
                if sent.new(update):
                    yield event_of(update)
                if ends_stream(update):
                    return
            if ending is not None:  # not read back (cannot happen): end with it
                yield event_of(ending)
                return
            if read:
                sent.read_up_to(batch)
            if start.terminal:
                return  # ended before the stream began: what it had is sent
            item = await subscription.get()
            if item == live.RESYNC:
                batch, read = await read_after(sent.floor), True
            else:
                assert not isinstance(item, str)
                batch, read = item, False
    finally:
        subscription.close()
