"""Live updates (comfy_cancel/live.py) on fakeredis: published after the commit only, one
message per transaction, a Redis outage never fails a write, and the API's hub splits each
message by workflow and fans it out to its streams."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fakeredis
import pytest
import redis

from comfy_cancel import live, manager, status
from comfy_cancel.db import Database
from comfy_cancel.models import EventKind, WorkflowStatus
from testbed.database import migrated
from tests.helpers import make_account_and_runner, seed_workflow

S = WorkflowStatus
API = status.Actor("api", "alice", "changed my mind")


class CountingRedis(fakeredis.FakeRedis):
    """A fakeredis that counts the round trips a publisher makes."""

    round_trips = 0

    def publish(self, *args: Any, **kwargs: Any) -> Any:
        CountingRedis.round_trips += 1
        return super().publish(*args, **kwargs)

    def pipeline(self, *args: Any, **kwargs: Any) -> Any:
        pipe = super().pipeline(*args, **kwargs)
        execute = pipe.execute

        def counted(*a: Any, **k: Any) -> Any:
            CountingRedis.round_trips += 1
            return execute(*a, **k)

        pipe.execute = counted  # type: ignore[method-assign]
        return pipe


@pytest.fixture
def fake() -> Iterator[CountingRedis]:
    client = CountingRedis(server=fakeredis.FakeServer())
    CountingRedis.round_trips = 0
    with live.publishing_to(client):
        yield client


@pytest.fixture
def db(tmp_path: Path) -> Database:
    return migrated(f"sqlite:///{tmp_path / 'live.db'}")


def listen(client: redis.Redis) -> Any:
    pubsub = client.pubsub()
    pubsub.subscribe(live.CHANNEL, live.RESYNC_CHANNEL)
    while pubsub.get_message(timeout=0.1) is not None:
        pass  # the confirmations
    return pubsub


def received(pubsub: Any) -> list[tuple[str, Any]]:
    """(channel, payload) of every message waiting."""
    out = []
    while (message := pubsub.get_message(timeout=0.05)) is not None:
        if message["type"] == "message":
            data = message["data"].decode()
            out.append((message["channel"].decode(),
                        data if message["channel"] == live.RESYNC_CHANNEL.encode()
                        else json.loads(data)))
    return out


def test_a_committed_status_change_is_published_with_its_audit_id(
    fake: CountingRedis, db: Database
) -> None:
    account_id, runner_id = make_account_and_runner(db)
    workflow_id = seed_workflow(db, account_id, runner_id, S.RUNNING)
    pubsub = listen(fake)

    with db.transaction() as session:
        status.acknowledge_cancel(session, workflow_id, API)
        status.cancel_if_active(session, workflow_id, API)
        assert received(pubsub) == []  # nothing before the commit

    ((channel, updates),) = received(pubsub)  # one message for the transaction
    assert channel == live.CHANNEL
    assert [(u["kind"], u["to_status"]) for u in updates] == [
        (EventKind.CANCEL_ACKNOWLEDGED.value, None), (EventKind.TRANSITION.value, "cancelled")]
    with db.reading() as session:
        rows = manager.events_of(session, workflow_id)
    assert [u["id"] for u in updates] == [r.id for r in rows[-2:]]
    assert updates == [live.update_of_row(r) for r in rows[-2:]]  # live is what replay says


def test_a_rolled_back_transaction_publishes_nothing(fake: CountingRedis, db: Database) -> None:
    account_id, runner_id = make_account_and_runner(db)
    workflow_id = seed_workflow(db, account_id, runner_id, S.RUNNING)
    pubsub = listen(fake)

    with pytest.raises(RuntimeError), db.transaction() as session:
        assert status.cancel_if_active(session, workflow_id, API).changed
        raise RuntimeError("the rest of the unit of work failed")
    with db.transaction() as session:  # the next transaction of a session starts clean
        status.record_outcome(session, workflow_id, status.CancelOutcome.TOO_LATE, API,
                              only_if_requested=True)

    assert received(pubsub) == []


def test_a_thousand_cancels_in_one_transaction_are_one_message(
    fake: CountingRedis, db: Database
) -> None:
    account_id, runner_id = make_account_and_runner(db)
    ids = [seed_workflow(db, account_id, runner_id, S.QUEUED) for _ in range(3)]
    # A thousand rows cost the same round trips as three: count them on three real rows
    # plus the same updates for 997 more workflows in the same publish.
    pubsub = listen(fake)
    CountingRedis.round_trips = 0
    with db.transaction() as session:
        status.cancel_queued_many(session, ids, API)
        extra = [live.progress_update(f"w{i}", "3", i, 1000) for i in range(997)]
        live.publish_after_commit(session, extra)

    assert CountingRedis.round_trips == 1
    ((channel, updates),) = received(pubsub)
    assert channel == live.CHANNEL
    with db.reading() as session:  # live is what replay says, to the key order
        rows = [live.update_of_row(manager.events_of(session, w)[-1]) for w in ids]
    assert sorted(json.dumps(u) for u in updates[:3]) == sorted(json.dumps(u) for u in rows)
    assert all(u["to_status"] == "cancelled" for u in updates[:3])
    assert updates[3:] == extra


def test_the_api_cancel_publishes_its_request_after_its_statement(
    fake: CountingRedis, db: Database
) -> None:
    account_id, runner_id = make_account_and_runner(db)
    workflow_id = seed_workflow(db, account_id, runner_id, S.RUNNING)
    with db.transaction() as session:
        account = manager.get_or_create_account(session, "acme")
        principal = manager.authenticate(session, manager.create_token(session, account))
        assert principal is not None
        token_id = principal.token_id
    pubsub = listen(fake)

    assert status.request_cancel_as_caller(db, workflow_id, account_id=account_id,
                                           token_id=token_id, by=API)
    assert not status.request_cancel_as_caller(db, workflow_id, account_id=account_id + 1,
                                               token_id=token_id, by=API)

    ((_, (update,)),) = received(pubsub)
    assert (update["kind"], update["actor"], update["reason"]) == (
        "cancel_requested", "alice", "changed my mind")


def test_a_redis_outage_never_fails_a_write_and_subscribers_are_told_to_catch_up(
    db: Database, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    account_id, runner_id = make_account_and_runner(db)
    workflow_id = seed_workflow(db, account_id, runner_id, S.RUNNING)
    down = live.Publisher(redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2))
    monkeypatch.setattr(live, "_override", down)

    with db.transaction() as session:
        assert status.cancel_if_active(session, workflow_id, API).changed
    assert "live updates not published" in caplog.text
    with db.reading() as session:
        assert manager.workflow_status(session, workflow_id, account_id) == "cancelled"

    # Redis is back: the first publish after the pause also says "catch up".
    back = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    down.client = back
    down._paused_until = 0.0
    pubsub = listen(back)
    down.publish([live.progress_update("other", "3", 1, 2)])
    assert [channel for channel, _ in received(pubsub)] == [live.CHANNEL, live.RESYNC_CHANNEL]


# --- the hub ------------------------------------------------------------------------------


async def nodes(subscription: live.Subscription) -> list[str]:
    item = await asyncio.wait_for(subscription.get(), 10)
    assert isinstance(item, list), item
    return [u["node"] for u in item]


def test_the_hub_fans_one_subscription_out_by_workflow() -> None:
    async def scenario() -> None:
        server = fakeredis.FakeServer()
        hub = live.Hub(fakeredis.aioredis.FakeRedis(server=server))
        publisher = live.Publisher(fakeredis.FakeRedis(server=server))
        a1, a2, b = hub.open("a"), hub.open("a"), hub.open("b")
        await asyncio.wait_for(hub.connected.wait(), 10)
        for sub in (a1, a2, b):  # connecting tells every stream to catch up
            assert await asyncio.wait_for(sub.get(), 10) == live.RESYNC
        publisher.publish([live.progress_update("a", "3", 1, 4),
                           live.progress_update("b", "5", 2, 4)])
        assert await nodes(a1) == await nodes(a2) == ["3"]
        assert await nodes(b) == ["5"]
        a2.close()
        b.close()
        assert hub.stream_count == 1
        publisher._missed = True  # as after an outage: every stream is told to catch up
        publisher.publish([live.progress_update("b", "5", 3, 4)])
        assert await asyncio.wait_for(a1.get(), 10) == live.RESYNC
        await hub.close()

    asyncio.run(scenario())


def test_the_hub_splits_one_message_by_workflow_in_the_order_published() -> None:
    async def scenario() -> None:
        server = fakeredis.FakeServer()
        hub = live.Hub(fakeredis.aioredis.FakeRedis(server=server))
        publisher = live.Publisher(fakeredis.FakeRedis(server=server))
        a, b = hub.open("a"), hub.open("b")
        await asyncio.wait_for(hub.connected.wait(), 10)
        for sub in (a, b):
            assert await asyncio.wait_for(sub.get(), 10) == live.RESYNC
        publisher.client.publish(live.CHANNEL, b"not json")  # ignored; the hub goes on
        publisher.client.publish(live.CHANNEL, b'[{"no": "workflow id"}]')
        publisher.publish([live.progress_update(w, node, 1, 4) for w, node in
                           [("a", "1"), ("unwatched", "9"), ("b", "2"), ("a", "3")]])
        assert await nodes(a) == ["1", "3"]  # one delivery per message, in order
        assert await nodes(b) == ["2"]
        assert a.queue.empty() and b.queue.empty()
        await hub.close()

    asyncio.run(scenario())


def test_a_stream_that_falls_behind_is_told_to_catch_up_instead_of_growing() -> None:
    async def scenario() -> None:
        hub = live.Hub(fakeredis.aioredis.FakeRedis(server=fakeredis.FakeServer()))
        sub = live.Subscription("a", hub)
        for i in range(live.QUEUE_SIZE + 5):
            sub.deliver([live.progress_update("a", "3", i, 10_000)])
        # What it had waiting is dropped for one "catch up"; later updates follow it.
        assert sub.queue.qsize() == 1 + 4
        assert await sub.get() == live.RESYNC

    asyncio.run(scenario())


def test_the_hub_reconnects_after_losing_redis_and_tells_its_streams_to_catch_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(live, "SILENCE_SECONDS", 0.3)

    async def scenario() -> None:
        server = fakeredis.FakeServer()
        hub = live.Hub(fakeredis.aioredis.FakeRedis(server=server))
        sub = hub.open("a")
        await asyncio.wait_for(hub.connected.wait(), 10)
        assert await asyncio.wait_for(sub.get(), 10) == live.RESYNC
        server.connected = False  # Redis goes away
        while hub.connected.is_set():
            await asyncio.sleep(0.05)
        server.connected = True
        assert await asyncio.wait_for(sub.get(), 10) == live.RESYNC  # back: catch up
        live.Publisher(fakeredis.FakeRedis(server=server)).publish(
            [live.progress_update("a", "7", 1, 2)])
        assert await nodes(sub) == ["7"]
        await hub.close()

    asyncio.run(scenario())
