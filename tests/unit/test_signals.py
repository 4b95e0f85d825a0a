"""Cancel signals on fakeredis: pushed to the registered run, found late by the key."""

from __future__ import annotations

import threading

import fakeredis

from comfy_cancel.signals import SignalKind, SignalListener, pending, send


def test_a_signal_reaches_only_the_registered_run_and_a_late_runner_finds_its_key() -> None:
    server = fakeredis.FakeServer()
    client = fakeredis.FakeRedis(server=server)
    listener = SignalListener(client)
    got: dict[str, list[SignalKind]] = {"a": [], "b": []}
    arrived = threading.Event()

    def on_a(kind: SignalKind) -> None:
        got["a"].append(kind)
        arrived.set()

    listener.register("a", on_a)
    listener.register("b", got["b"].append)
    try:
        assert send(client, ["a"], SignalKind.CANCEL, ttl_seconds=60) == 1
        assert arrived.wait(5)
        # At least once (a repeat is harmless: handlers are idempotent), and only to "a".
        assert set(got["a"]) == {SignalKind.CANCEL} and got["b"] == []
        # A run that registers after the signal was sent still gets it, from the key (and
        # perhaps once more from the channel, if the listener was slow: handlers are
        # idempotent, so a repeat is harmless).
        send(client, ["c"], SignalKind.STOP, ttl_seconds=60)
        late: list[SignalKind] = []
        listener.register("c", late.append)
        assert late[:1] == [SignalKind.STOP] and set(late) == {SignalKind.STOP}
        assert pending(client, "c") is SignalKind.STOP and pending(client, "d") is None
    finally:
        listener.stop()


def test_a_malformed_message_or_a_failing_handler_does_not_stop_the_listener() -> None:
    client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    listener = SignalListener(client)
    arrived = threading.Event()

    def broken(kind: SignalKind) -> None:
        raise RuntimeError("handler bug")

    listener.register("x", broken)
    listener.register("y", lambda kind: arrived.set())
    try:
        client.publish("comfy_cancel:signals", b"not json")
        send(client, ["x"], SignalKind.CANCEL, ttl_seconds=60)
        send(client, ["y"], SignalKind.CANCEL, ttl_seconds=60)
        assert arrived.wait(5)
    finally:
        listener.stop()
