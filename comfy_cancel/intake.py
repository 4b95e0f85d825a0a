"""The API's cancel requests, taken in together (issue #10's hot path).

Each API process gathers the cancel requests that arrive while its previous groups are
being written, and writes and hands on each group at once: one thread hop, one
transaction (one statement per caller on PostgreSQL), one message per requester on the
cancel queue and one live-update publish, however many requests the group holds. A
request that finds no group being written starts one at once, so under light load each
request is a group of one (it waits for nothing but its own write), and under heavy load
the groups grow with it and the cost per request falls.

Every guarantee of a single request holds for each request of a group: its request is
committed before the 200 (the answer waits for the group's commit and publish), a failed
publish answers 500 to the requests it left unpublished (they stay recorded: the re-drive
pass hands them on), and a request that was not recorded is answered on its own
(:func:`api._explain_refusal`).
"""

from __future__ import annotations

import asyncio
import enum
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import anyio.to_thread

from comfy_cancel import publish, status
from comfy_cancel.db import Database
from comfy_cancel.status import Actor, CallersCancel


class Taken(enum.Enum):
    """What became of one request of a group."""

    HANDED_ON = "handed_on"  # recorded and on the cancel queue
    UNPUBLISHED = "unpublished"  # recorded; the broker was down (re-drive hands it on)
    REFUSED = "refused"  # not recorded: not the caller's, not cancellable, or a stale token


@dataclass
class Intake:
    """One API process's gatherer of cancel requests (see the module)."""

    db: Database
    # Groups written at once. One: the requests that arrive while a group is written all
    # join the next, so groups are as large as the load makes them. Measured on the
    # benchmark's endpoint load (32 clients, two API processes, two cores): 1,005-1,011
    # cancels/s and 1.5-1.6 ms of CPU per cancel over all processes with one, 885-938/s and
    # 1.8-1.9 ms with two (smaller groups), less with more.
    in_flight: int = 1
    most: int = 500  # requests in one group
    _waiting: list[tuple[CallersCancel, asyncio.Future[Taken]]] = field(default_factory=list)
    _running: int = 0
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def cancel(self, request: CallersCancel) -> Taken:
        """Record and hand on one request with whatever group it falls into."""
        future: asyncio.Future[Taken] = asyncio.get_running_loop().create_future()
        # Its error is read here, or by nobody once the client hung up: mark it read, so
        # asyncio does not log it as lost.
        future.add_done_callback(lambda done: done.cancelled() or done.exception())
        self._waiting.append((request, future))
        self._start()
        # A client that hangs up does not undo its request: the group goes on without it.
        return await asyncio.shield(future)

    def _start(self) -> None:
        while self._waiting and self._running < self.in_flight:
            group, self._waiting = self._waiting[:self.most], self._waiting[self.most:]
            self._running += 1
            task = asyncio.get_running_loop().create_task(self._take(group))
            self._tasks.add(task)  # the loop keeps only a weak reference
            task.add_done_callback(self._tasks.discard)

    async def _take(self, group: list[tuple[CallersCancel, asyncio.Future[Taken]]]) -> None:
        try:
            taken = await anyio.to_thread.run_sync(take, self.db, [r for r, _ in group])
        except BaseException as exc:  # the database is down: each request answers 500
            for _, future in group:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
        else:
            for (_, future), result in zip(group, taken, strict=True):
                if not future.done():
                    future.set_result(result)
        finally:
            self._running -= 1
            self._start()


def take(db: Database, requests: Sequence[CallersCancel]) -> list[Taken]:
    """Record ``requests`` in one go, then hand the recorded ones on, one message per
    requester; what became of each."""
    recorded = status.request_cancels_as_callers(db, requests)
    by_requester: dict[Actor, list[str]] = defaultdict(list)
    for request, was_recorded in zip(requests, recorded, strict=True):
        if was_recorded:
            by_requester[request.by].append(request.workflow_id)
    published = {by: publish.hand_on(list(dict.fromkeys(ids)), by)
                 for by, ids in by_requester.items()}
    return [Taken.REFUSED if not was_recorded
            else Taken.HANDED_ON if published[request.by] else Taken.UNPUBLISHED
            for request, was_recorded in zip(requests, recorded, strict=True)]
