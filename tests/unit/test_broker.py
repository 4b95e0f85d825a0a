"""The broker side without worker processes: worker kinds and their transport options, the
revoke-noise filter, the CLI's default queues, and the transport's repairs on a real Redis."""

from __future__ import annotations

import base64
import contextlib
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from kombu import Connection, Consumer, Exchange, Producer, Queue

from comfy_cancel import broker, cli, tasks, worker
from comfy_cancel.config import Settings
from comfy_cancel.worker import WorkerKind, kind_of, transport_options


@pytest.mark.parametrize(
    ("queues", "kind"),
    [
        (["cancel"], WorkerKind.CANCEL),
        (["cancel", "cancel.bulk", "cancel.sweep"], WorkerKind.CANCEL),
        (["cancel.sweep"], WorkerKind.CANCEL),
        (["runner"], WorkerKind.RUNNER),
        (["cancel", "runner"], WorkerKind.RUNNER),  # one worker for everything: the long one
        (None, WorkerKind.RUNNER),  # no -Q: Celery consumes every queue
        ([], WorkerKind.RUNNER),
    ],
)
def test_a_worker_is_a_cancel_worker_only_when_it_consumes_only_cancel_queues(
    queues: list[str] | None, kind: WorkerKind
) -> None:
    assert kind_of(queues) is kind


def test_each_kind_has_its_own_unacked_keys_and_timeout() -> None:
    settings = Settings(cancel_grace_seconds=10, max_run_seconds=3600)
    cancel = transport_options(settings, WorkerKind.CANCEL)
    runner = transport_options(settings, WorkerKind.RUNNER)
    keys = ("unacked_key", "unacked_index_key", "unacked_mutex_key")
    assert not {cancel[k] for k in keys} & {runner[k] for k in keys}
    assert cancel["visibility_timeout"] == 30  # grace + 20: outlasts a retry's ETA
    assert cancel["unacked_restore_throttle"] == 1
    assert cancel["unacked_restore_interval"] <= 2
    assert runner["visibility_timeout"] == 3600 + 3600
    explicit = Settings(cancel_visibility_timeout_seconds=45)
    assert transport_options(explicit, WorkerKind.CANCEL)["visibility_timeout"] == 45


def test_the_app_publishes_with_the_runner_options_and_our_transport() -> None:
    config = worker.celery_config(Settings())
    assert config["broker_transport_options"] == transport_options(Settings(),
                                                                   WorkerKind.RUNNER)
    for url in ("redis://127.0.0.1:1/0", "rediss://127.0.0.1:1/0"):
        assert worker.app.connection_for_write(url).transport_cls is not None
        assert type(worker.app.connection_for_write(url).transport) is broker.Transport
    assert Connection("memory://").transport_cls == "memory"


@pytest.mark.parametrize(
    ("queues", "kind"), [("cancel,cancel.bulk", WorkerKind.CANCEL), (["runner"], WorkerKind.RUNNER),
                         (None, WorkerKind.RUNNER)],
)
def test_a_starting_worker_takes_the_options_of_its_kind(
    queues: Any, kind: WorkerKind
) -> None:
    conf = worker.create_app(Settings()).conf
    worker.on_worker_init(conf=conf, options={"queues": queues})
    assert conf.broker_transport_options == transport_options(worker.get_settings(), kind)


def _revoke_record(error: Exception) -> logging.LogRecord:
    return logging.LogRecord(worker.REVOKE_LOGGER, logging.WARNING, __file__, 1,
                             worker.RevokeWithoutBackendFilter.MESSAGE, ("abc", error), None)


def test_the_revoke_filter_drops_only_the_no_backend_warning() -> None:
    from celery.backends.base import DisabledBackend

    try:
        DisabledBackend(worker.app).get_state("abc")
    except NotImplementedError as exc:
        no_backend = exc
    keep = worker.RevokeWithoutBackendFilter()
    assert not keep.filter(_revoke_record(no_backend))
    assert keep.filter(_revoke_record(ConnectionError("backend down")))
    other = logging.LogRecord(worker.REVOKE_LOGGER, logging.WARNING, __file__, 1,
                              "something else: %s", (no_backend,), None)
    assert keep.filter(other)


def test_a_worker_without_a_backend_installs_the_filter() -> None:
    logger = logging.getLogger(worker.REVOKE_LOGGER)
    logger.removeFilter(worker._revoke_filter)
    worker.on_worker_init(conf=worker.create_app(Settings()).conf, options={})
    assert worker._revoke_filter in logger.filters


def test_comfy_cancel_worker_consumes_the_cancel_queues_by_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[list[str]] = []
    monkeypatch.setattr(tasks.app, "worker_main", calls.append)
    assert cli.main(["worker"]) == 0
    assert calls[0][1] == "--queues=" + ",".join(worker.CANCEL_QUEUES)
    assert "runner" not in calls[0][1]


# --- the transport on a real Redis -----------------------------------------------------------


@pytest.fixture
def connection(redis_db_url: str) -> Iterator[Connection]:
    conn = Connection(redis_db_url, transport=broker.TRANSPORT)
    try:
        yield conn
    finally:
        conn.release()


def test_garbage_on_a_queue_goes_to_the_dead_letter_list_and_good_messages_still_flow(
    connection: Connection, redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    queue = Queue("cancel", Exchange("cancel"), routing_key="cancel")
    received: list[Any] = []
    channel = connection.channel()
    def on_message(body: Any, message: Any) -> None:
        received.append(body)
        message.ack()

    consumer = Consumer(channel, [queue], callbacks=[on_message])
    consumer.consume()
    secret = b"garbage-not-json password=hunter2"
    redis_client.lpush("cancel", secret)
    redis_client.lpush("cancel", json.dumps({"not": "an envelope"}))
    redis_client.lpush("cancel", json.dumps([1, 2, 3]))
    Producer(connection.channel()).publish({"good": 1}, exchange=queue.exchange,
                                           routing_key="cancel", declare=[queue])
    with caplog.at_level(logging.ERROR, logger=broker.__name__):
        for _ in range(10):
            with contextlib.suppress(TimeoutError):
                connection.drain_events(timeout=0.5)
            if received:
                break
    assert received == [{"good": 1}]
    records = [json.loads(r) for r in redis_client.lrange(broker.DEAD_LETTER_KEY, 0, -1)]
    assert len(records) == 3
    assert {r["queue"] for r in records} == {"cancel"}
    assert base64.b64decode(records[-1]["raw_b64"]) == secret  # oldest last
    assert "hunter2" not in caplog.text and "moved to the Redis list" in caplog.text


def test_a_channel_sends_its_commands_through_one_client_per_pool(
    connection: Connection
) -> None:
    channel = connection.channel()
    with channel.conn_or_acquire() as first, channel.conn_or_acquire() as again:
        assert first is again and first.ping()
    given = redis.Redis.from_url("redis://127.0.0.1:1/0")
    with channel.conn_or_acquire(given) as client:
        assert client is given
    channel._disconnect_pools()  # what a lost connection does
    with channel.conn_or_acquire() as after:
        assert after is not first and after.connection_pool is channel.pool and after.ping()


def _two_unacked(connection: Connection) -> tuple[Any, list[Any]]:
    queue = Queue("runner", Exchange("runner"), routing_key="runner")
    channel = connection.channel()
    messages: list[Any] = []
    Consumer(channel, [queue], callbacks=[lambda _b, msg: messages.append(msg)]).consume()
    producer = Producer(connection.channel())
    for n in (1, 2):
        producer.publish({"n": n}, exchange=queue.exchange, routing_key="runner",
                         declare=[queue])
    while len(messages) < 2:
        connection.drain_events(timeout=5)
    return channel, messages


def test_a_detached_channel_still_acks_and_restores(
    connection: Connection, redis_client: redis.Redis
) -> None:
    """The crash: on a lost connection Celery 5.7 detaches the transport from the connection
    (collect: ``transport.client = None``), then closes the channel, whose unacked messages
    are restored through a new pool built from the detached transport."""
    channel, messages = _two_unacked(connection)
    assert redis_client.hlen("unacked") == 2
    connection._do_close_transport()  # how collect() ends
    messages[0].ack()  # a pool thread finishing its task after the reconnect
    assert redis_client.hlen("unacked") == 1
    channel.close()  # what Celery does next: restores the rest
    assert redis_client.hlen("unacked") == 0
    assert redis_client.llen("runner") == 1


def test_kombus_own_channel_still_has_the_bug(redis_db_url: str) -> None:
    """When this fails, kombu fixed it upstream, and broker.Channel's saved connection
    parameters can go."""
    connection = Connection(redis_db_url, transport="kombu.transport.redis:Transport")
    try:
        channel, _messages = _two_unacked(connection)
        connection._do_close_transport()
        with pytest.raises(AttributeError, match="hostname"):
            channel.close()
    finally:
        redis.Redis.from_url(redis_db_url).flushdb()
