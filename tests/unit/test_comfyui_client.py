"""The runner's ComfyUI client against the simulated server."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from websockets.sync.server import ServerConnection, serve

from comfy_cancel.comfyui import (
    ComfyUIClient,
    ComfyUIError,
    Event,
    EventStream,
    PromptRejected,
    QueueState,
    error_from_history,
    outputs_from_history,
    was_interrupted,
)
from comfy_cancel.config import get_settings
from comfy_cancel.embedded.comfyui_sim import RunningSim, blur_workflow
from comfy_cancel.redact import redact_url

FAST = 0.05
SLOW = 0.1  # for prompts that must still run while the test acts on them


@pytest.fixture(autouse=True)
def loopback_allowed(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The simulated servers listen on 127.0.0.1, which runners may reach only when the
    operator allows it (tests/unit/test_egress.py covers the refusal)."""
    monkeypatch.setenv("COMFY_CANCEL_RUNNER_ALLOWED_NETWORKS", "127.0.0.0/8")
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@pytest.fixture
def client(sim: RunningSim) -> Iterator[ComfyUIClient]:
    with ComfyUIClient(sim.url, timeout=5) as comfy:
        yield comfy


def tiny(prefix: str = "t") -> dict[str, Any]:
    return blur_workflow(64, 1, filename_prefix=prefix, output_size=32)


def long() -> dict[str, Any]:
    return blur_workflow(768, 8, filename_prefix="long")


def until_done(stream: EventStream, prompt_id: str, timeout: float = 10.0) -> list[Event]:
    deadline = time.monotonic() + timeout
    events = []
    while time.monotonic() < deadline:
        event = stream.next_event(timeout=max(0.01, deadline - time.monotonic()))
        if event is None:
            continue
        events.append(event)
        if (
            event.type == "executing"
            and event.data["node"] is None
            and event.prompt_id == prompt_id
        ):
            return events
    raise AssertionError(f"{prompt_id} did not finish; saw {[e.type for e in events]}")


def until(stream: EventStream, kind: str, prompt_id: str) -> Event:
    while True:
        event = stream.next_event(timeout=5)
        assert event is not None, f"no {kind} for {prompt_id}"
        if event.type == kind and event.prompt_id == prompt_id:
            return event


def running_and_pending(client: ComfyUIClient, stream: EventStream, pending: int = 1) -> list[str]:
    running = client.submit(long(), "c1").prompt_id
    until(stream, "execution_start", running)
    return [running] + [client.submit(tiny(f"p{i}"), "c1").prompt_id for i in range(pending)]


def sim_log(sim: RunningSim) -> dict[str, list[dict[str, Any]]]:
    answer = httpx.get(sim.url + "/sim/calls").json()
    assert isinstance(answer, dict)
    return answer


# ---------------------------------------------------------------------- the happy path


def test_submit_follow_and_read_the_result(sim: RunningSim, client: ComfyUIClient) -> None:
    assert client.system_stats()["system"]["comfyui_version"] == "0.3.64-sim"
    with client.watch("c1") as stream:
        first = stream.next_event(timeout=2)
        assert first is not None and first.type == "status" and first.data["sid"] == "c1"
        submitted = client.submit(tiny("ok"), "c1", prompt_id="fixed-id")
        assert submitted.prompt_id == "fixed-id" and isinstance(submitted.number, int)
        events = until_done(stream, "fixed-id")
        entry = client.history("fixed-id")
    kinds = [e.type for e in events if e.type != "status"]
    assert kinds[:2] == ["execution_start", "execution_cached"]
    assert kinds[-2:] == ["execution_success", "executing"]
    assert entry is not None
    assert outputs_from_history(entry) == {
        "4": {"images": [{"filename": "ok_00001_.png", "subfolder": "", "type": "output"}]}
    }
    assert error_from_history(entry) is None
    assert was_interrupted(entry) is False


def test_history_is_none_while_unknown(client: ComfyUIClient) -> None:
    assert client.history("not-submitted") is None


def test_a_base_url_with_a_path_works(sim: RunningSim) -> None:
    with ComfyUIClient(sim.url + "/api/", timeout=5) as client, client.watch("c1") as stream:
        prompt_id = client.submit(tiny(), "c1").prompt_id
        until_done(stream, prompt_id)
        assert client.history(prompt_id) is not None
    requests = sim_log(sim)["requests"]
    assert {r["path"] for r in requests} >= {"/api/prompt", "/api/ws", f"/api/history/{prompt_id}"}


def test_rejected_prompt_carries_comfyui_errors(client: ComfyUIClient) -> None:
    bad = tiny()
    bad["10"]["inputs"]["blur_radius"] = 40
    with pytest.raises(PromptRejected) as rejected:
        client.submit(bad, "c1")
    assert rejected.value.status == 400
    assert rejected.value.error["type"] == "prompt_outputs_failed_validation"
    errors = rejected.value.node_errors["10"]["errors"]
    assert errors[0]["type"] == "value_bigger_than_max"
    message = str(rejected.value)
    assert "rejected the prompt" in message and "node 10 (ImageBlur)" in message
    assert "blur_radius" in message and "/prompt" in message


def test_queue_state_in_run_order(make_sim: Callable[..., RunningSim]) -> None:
    sim = make_sim(time_scale=SLOW)
    with ComfyUIClient(sim.url) as client, client.watch("c1") as stream:
        running, second, third = running_and_pending(client, stream, pending=2)
        state = client.queue()
        assert state == QueueState(running=[running], pending=[second, third])
        assert state.is_running(running) and state.contains(third)
        assert state.position(second) == 0 and state.position(third) == 1
        assert state.position(running) is None and not state.contains("other")
        client.delete_pending([second])
        assert client.queue().pending == [third]


# ---------------------------------------------------------------------- cancelling


def test_interrupt_is_always_targeted(make_sim: Callable[..., RunningSim]) -> None:
    sim = make_sim(time_scale=SLOW)
    with ComfyUIClient(sim.url) as client, client.watch("c1") as stream:
        running, pending = running_and_pending(client, stream)
        client.interrupt(pending)
        until_done(stream, pending)
        assert was_interrupted(client.history(running) or {}) is False
        with pytest.raises(ValueError):
            client.interrupt("")
    [call] = sim_log(sim)["calls"]
    assert call["kind"] == "interrupt" and call["prompt_id"] == pending
    assert call["effective"] is False


def test_cancel_prefers_the_jobs_api(make_sim: Callable[..., RunningSim]) -> None:
    sim = make_sim(time_scale=SLOW)
    with ComfyUIClient(sim.url) as client, client.watch("c1") as stream:
        running, pending = running_and_pending(client, stream)
        assert client.jobs_api_supported is None
        client.cancel(pending)
        assert client.jobs_api_supported is True
        assert client.queue().pending == []
        client.cancel(running)
        until_done(stream, running)
        assert was_interrupted(client.history(running) or {}) is True
        client.cancel(running)  # idempotent
        assert client.history(pending) is None
    calls = sim_log(sim)["calls"]
    assert [(c["kind"], c["prompt_id"]) for c in calls] == [
        ("jobs_cancel", pending),
        ("jobs_cancel", running),
        ("jobs_cancel", running),
    ]


def test_cancel_falls_back_without_the_jobs_api(make_sim: Callable[..., RunningSim]) -> None:
    sim = make_sim(time_scale=SLOW, jobs_api=False)
    with ComfyUIClient(sim.url) as client, client.watch("c1") as stream:
        running, pending = running_and_pending(client, stream)
        client.cancel(pending)
        assert client.jobs_api_supported is False
        assert client.queue() == QueueState(running=[running], pending=[])
        client.cancel(running)
        until_done(stream, running)
        entry = client.history(running)
        assert entry is not None and was_interrupted(entry)
        assert client.history(pending) is None
    log = sim_log(sim)
    # Detected once: the second cancel went straight to the fallback.
    jobs_calls = [r for r in log["requests"] if r["path"].startswith("/api/jobs/")]
    assert [r["status"] for r in jobs_calls] == [404]
    # An interrupt goes only to a prompt /queue shows running: a ComfyUI older than
    # v0.3.56 would take any interrupt as "stop whatever runs".
    assert [(c["kind"], c["prompt_id"], c["effective"]) for c in log["calls"]] == [
        ("queue_delete", pending, True),
        ("queue_delete", running, False),
        ("interrupt", running, True),
    ]


@pytest.mark.parametrize("jobs_api", [True, False])
def test_wait_released_sees_a_cancelled_prompt_let_go_and_reads_its_history(
    make_sim: Callable[..., RunningSim], jobs_api: bool
) -> None:
    sim = make_sim(time_scale=SLOW, jobs_api=jobs_api)
    with ComfyUIClient(sim.url) as client, client.watch("c1") as stream:
        running, pending = running_and_pending(client, stream)
        # Still held: not released within the bound (the running one, and the pending one
        # behind it), and nothing is claimed for them.
        assert client.wait_released([running, pending], 0.1) == {}
        client.cancel_many([running, pending])
        released = client.wait_released([running, pending], 10)
        assert client.queue() == QueueState(running=[], pending=[])
    assert set(released) == {running, pending}
    entry = released[running]
    assert entry is not None and was_interrupted(entry)  # the interrupted prompt's history
    assert released[pending] is None  # removed while pending: ComfyUI keeps no history
    with ComfyUIClient(sim.url) as other:
        assert other.wait_released([running], 1, history=False) == {running: None}


def test_wait_released_confirms_nothing_when_the_server_is_gone(
    make_sim: Callable[..., RunningSim],
) -> None:
    sim = make_sim()
    with ComfyUIClient(sim.url, timeout=1) as client:
        sim.stop()
        assert client.wait_released(["any-prompt"], 0.3) == {}  # never raises


@pytest.mark.parametrize("jobs_api", [True, False])
def test_cancel_many_leaves_other_prompts_alone(
    make_sim: Callable[..., RunningSim], jobs_api: bool
) -> None:
    sim = make_sim(time_scale=SLOW, jobs_api=jobs_api)
    with ComfyUIClient(sim.url) as client, client.watch("c1") as stream:
        running, first, second, bystander = running_and_pending(client, stream, pending=3)
        client.cancel_many([running, first, second])
        # The bystander may already run (the interrupt frees the queue): judge by results.
        until_done(stream, bystander)
        assert was_interrupted(client.history(running) or {}) is True
        finished = client.history(bystander)
        assert finished is not None and finished["status"]["status_str"] == "success"
        assert client.history(first) is None and client.history(second) is None
        client.cancel_many([])
    assert all(c["prompt_id"] is not None for c in sim_log(sim)["calls"])


# ---------------------------------------------------------------------- failures


def test_error_from_history_names_the_failed_node(sim: RunningSim, client: ComfyUIClient) -> None:
    with client.watch("c1") as stream:
        prompt_id = client.submit(tiny("fail-please"), "c1").prompt_id
        events = until_done(stream, prompt_id)
        entry = client.history(prompt_id)
    [error_event] = [e for e in events if e.type == "execution_error"]
    assert error_event.prompt_id == prompt_id
    assert entry is not None and entry["status"]["status_str"] == "error"
    error = error_from_history(entry)
    assert error is not None
    assert error["error_node"] == "4" and error["node_type"] == "SaveImage"
    assert error["exception_type"] == "RuntimeError"
    assert error["exception_message"].startswith("Simulated failure")
    assert not error["exception_message"].endswith("\n")
    assert was_interrupted(entry) is False


def test_unreachable_server_says_which_url() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with ComfyUIClient(url, timeout=2) as client:
        with pytest.raises(ComfyUIError) as failed:
            client.queue()
        assert f"{url}/queue" in str(failed.value) and "unreachable" in str(failed.value)
        with pytest.raises(ComfyUIError) as no_socket:
            client.watch("c1")
        assert f"127.0.0.1:{port}/ws" in str(no_socket.value)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://gpu-7:8188", "http://gpu-7:8188"),
        ("https://ops:hunter2@gpu-7:8188/comfy", "https://ops:***@gpu-7:8188/comfy"),
        ("https://tok3n@gpu-7/x?key=abc&flag", "https://***@gpu-7/x?key=***&flag"),
        ("ws://gpu-7/ws?clientId=c1&token=abc", "ws://gpu-7/ws?clientId=c1&token=***"),
    ],
)
def test_urls_are_shown_without_credentials(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_errors_never_show_the_runner_credentials(make_sim: Callable[..., RunningSim]) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with ComfyUIClient(f"http://ops:hunter2@127.0.0.1:{port}?token=abc", timeout=2) as client:
        with pytest.raises(ComfyUIError) as unreachable:
            client.queue()
        with pytest.raises(ComfyUIError) as no_socket:
            client.watch("c1")
    sim = make_sim(time_scale=SLOW, required_headers={"X-Runner-Token": "s3cret"})
    host = sim.url.split("://", 1)[1]
    with ComfyUIClient(f"http://ops:hunter2@{host}", timeout=2) as client:
        with pytest.raises(ComfyUIError) as refused:
            client.system_stats()
        with pytest.raises(ComfyUIError) as refused_ws:
            client.watch("c1")
    for failure in (unreachable, no_socket, refused, refused_ws):
        message = str(failure.value)
        assert "ops:***@" in message, message
        assert "hunter2" not in message and "hunter2" not in (failure.value.url or "")
        assert "abc" not in message


def test_extra_headers_go_on_every_call(make_sim: Callable[..., RunningSim]) -> None:
    headers = {"X-Runner-Token": "s3cret"}
    sim = make_sim(time_scale=SLOW, required_headers=headers, jobs_api=False)
    with ComfyUIClient(sim.url) as anonymous:
        with pytest.raises(ComfyUIError) as refused:
            anonymous.system_stats()
        assert refused.value.status == 401 and "headers" in str(refused.value)
        with pytest.raises(ComfyUIError) as refused_ws:
            anonymous.watch("c1")
        assert refused_ws.value.status == 401
    httpx.post(sim.url + "/sim/reset")

    with ComfyUIClient(sim.url, headers=headers) as client, client.watch("c1") as stream:
        client.system_stats()
        running, pending = running_and_pending(client, stream)
        client.queue()
        client.cancel(pending)
        client.cancel_many([running])
        until_done(stream, running)
        client.history(running)
    requests = sim_log(sim)["requests"]
    assert requests and all(r["status"] != 401 for r in requests)
    seen = {r["path"] for r in requests}
    assert {"/ws", "/system_stats", "/prompt", "/queue", "/interrupt"} <= seen
    assert f"/history/{running}" in seen


# ---------------------------------------------------------------------- the event stream


def test_stream_reconnects_after_the_server_drops_it(
    sim: RunningSim, client: ComfyUIClient
) -> None:
    with client.watch("c1", reconnect_timeout=5) as stream:
        hello = stream.next_event(timeout=2)
        assert hello is not None and hello.type == "status"
        assert sim.drop_websockets() == 1
        assert stream.next_event(timeout=2) == Event("reconnected", {})
        again = stream.next_event(timeout=2)
        assert again is not None and again.type == "status" and again.data["sid"] == "c1"
        # Still live: events of a new prompt arrive on the new socket.
        prompt_id = client.submit(tiny(), "c1").prompt_id
        until_done(stream, prompt_id)


def test_stream_reconnects_after_a_restart(make_sim: Callable[..., RunningSim]) -> None:
    sim = make_sim()
    client = ComfyUIClient(sim.url)
    with client, client.watch("c1", reconnect_timeout=10) as stream:
        assert stream.next_event(timeout=2) is not None
        sim.stop()
        restarted: list[RunningSim] = []

        def restart() -> None:
            time.sleep(0.5)
            restarted.append(make_sim(port=sim.port))

        threading.Thread(target=restart).start()
        assert stream.next_event(timeout=2) == Event("reconnected", {})
        assert restarted and client.system_stats()


def test_stream_gives_up_after_the_reconnect_timeout(make_sim: Callable[..., RunningSim]) -> None:
    sim = make_sim()
    with ComfyUIClient(sim.url) as client, client.watch("c1", reconnect_timeout=1) as stream:
        assert stream.next_event(timeout=2) is not None
        sim.stop()
        started = time.monotonic()
        with pytest.raises(ComfyUIError) as lost:
            stream.next_event(timeout=5)
        assert time.monotonic() - started < 3
        assert "could not reconnect" in str(lost.value) and "/ws?clientId=c1" in str(lost.value)


def test_next_event_times_out_with_none(client: ComfyUIClient) -> None:
    with client.watch("c1") as stream:
        assert stream.next_event(timeout=2) is not None  # the status greeting
        started = time.monotonic()
        assert stream.next_event(timeout=0.2) is None
        assert 0.15 < time.monotonic() - started < 1.5


def test_binary_and_garbled_frames_are_skipped() -> None:
    def handler(connection: ServerConnection) -> None:
        connection.send(b"\x89PNG preview bytes")
        connection.send("not json")
        connection.send('{"no": "type"}')
        connection.send('{"type": "progress", "data": {"value": 1, "max": 2, "prompt_id": "p"}}')
        connection.recv()  # hold the socket open until the client closes it

    with serve(handler, "127.0.0.1", 0) as server:
        thread = threading.Thread(target=server.serve_forever)
        thread.start()
        port = server.socket.getsockname()[1]
        try:
            with ComfyUIClient(f"http://127.0.0.1:{port}") as client, client.watch("c1") as stream:
                event = stream.next_event(timeout=2)
        finally:
            server.shutdown()
            thread.join()
    assert event == Event("progress", {"value": 1, "max": 2, "prompt_id": "p"})


def _next_event_in_thread(stream: EventStream, timeout: float) -> tuple[threading.Thread, list]:
    result: list[Any] = []

    def read() -> None:
        started = time.monotonic()
        try:
            result.append(stream.next_event(timeout=timeout))
        except Exception as exc:  # the assertion below shows it
            result.append(exc)
        result.append(time.monotonic() - started)

    thread = threading.Thread(target=read)
    thread.start()
    return thread, result


def test_close_from_another_thread_unblocks_a_reader(client: ComfyUIClient) -> None:
    stream = client.watch("c1")
    assert stream.next_event(timeout=2) is not None
    thread, result = _next_event_in_thread(stream, timeout=30)
    time.sleep(0.2)
    stream.close()
    thread.join(timeout=5)
    assert not thread.is_alive()
    assert result[0] == Event("closed", {}) and result[1] < 3
    assert stream.closed and stream.next_event(timeout=1) == Event("closed", {})


def test_close_cuts_a_reconnect_short(make_sim: Callable[..., RunningSim]) -> None:
    sim = make_sim()
    with ComfyUIClient(sim.url) as client:
        stream = client.watch("c1", reconnect_timeout=30)
        assert stream.next_event(timeout=2) is not None
        sim.stop()
        thread, result = _next_event_in_thread(stream, timeout=30)
        time.sleep(0.5)
        stream.close()
        thread.join(timeout=5)
    assert result[0] == Event("closed", {}) and result[1] < 3


# ---------------------------------------------------------------------- helpers on entries


def test_history_helpers_on_odd_entries() -> None:
    assert outputs_from_history({}) == {}
    assert error_from_history({"status": None}) is None
    assert was_interrupted({"status": {"messages": []}}) is False
    interrupted = {
        "status": {
            "status_str": "error",
            "completed": False,
            "messages": [
                ["execution_start", {"prompt_id": "p"}],
                ["execution_interrupted", {"prompt_id": "p", "node_id": "5"}],
            ],
        }
    }
    assert was_interrupted(interrupted) is True
    assert error_from_history(interrupted) is None
    assert Event("executing", {"node": None, "prompt_id": "p"}).prompt_id == "p"
    assert Event("status", {"status": {}}).prompt_id is None
