"""The simulated ComfyUI server, spoken to over raw HTTP and WebSocket as ComfyUI would be."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection, connect

from comfy_cancel.embedded.comfyui_sim import RunningSim, blur_chain, blur_workflow

FAST = 0.05  # time scale of most tests: the 6 s workflow takes 0.3 s
SLOW = 0.1  # for prompts that must still run while the test acts on them


@pytest.fixture
def http(sim: RunningSim) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sim.url, timeout=5) as client:
        yield client


def ws_url(sim: RunningSim, client_id: str) -> str:
    return sim.url.replace("http://", "ws://") + f"/ws?clientId={client_id}"


def tiny(prefix: str = "t") -> dict[str, Any]:
    return blur_workflow(64, 1, filename_prefix=prefix, output_size=32)


def long(prefix: str = "long") -> dict[str, Any]:
    return blur_workflow(768, 8, filename_prefix=prefix)


def recv(ws: ClientConnection, timeout: float = 5.0) -> dict[str, Any]:
    message = ws.recv(timeout=timeout)
    assert isinstance(message, str)
    decoded = json.loads(message)
    assert isinstance(decoded, dict)
    return decoded


def events_until_done(
    ws: ClientConnection, prompt_id: str, timeout: float = 10.0
) -> list[dict[str, Any]]:
    """Every event up to and including ``executing`` with ``node: null`` for the prompt."""
    deadline = time.monotonic() + timeout
    events = []
    while True:
        event = recv(ws, max(0.01, deadline - time.monotonic()))
        events.append(event)
        data = event["data"]
        if event["type"] == "executing" and data["node"] is None and data["prompt_id"] == prompt_id:
            return events


def wait_for(ws: ClientConnection, kind: str, prompt_id: str) -> dict[str, Any]:
    while True:
        event = recv(ws)
        if event["type"] == kind and event["data"].get("prompt_id") == prompt_id:
            return event


def submit(http: httpx.Client, prompt: dict[str, Any], client_id: str = "c1", **extra: Any) -> str:
    response = http.post("/prompt", json={"prompt": prompt, "client_id": client_id, **extra})
    assert response.status_code == 200, response.text
    prompt_id = response.json()["prompt_id"]
    assert isinstance(prompt_id, str)
    return prompt_id


def history(http: httpx.Client, prompt_id: str) -> dict[str, Any] | None:
    answer = http.get(f"/history/{prompt_id}").json()
    return answer.get(prompt_id)


def finished(http: httpx.Client, prompt_id: str) -> dict[str, Any]:
    entry = history(http, prompt_id)
    assert entry is not None, f"no history entry for {prompt_id}"
    return entry


def calls(http: httpx.Client) -> list[dict[str, Any]]:
    answer = http.get("/sim/calls").json()
    return answer["calls"]


# ---------------------------------------------------------------------- submitting


def test_submit_answers_prompt_id_and_advancing_number(http: httpx.Client) -> None:
    first = http.post("/prompt", json={"prompt": tiny(), "client_id": "c1"})
    chosen = http.post("/prompt", json={"prompt": tiny(), "prompt_id": "my-id"})
    assert first.status_code == 200 and chosen.status_code == 200
    assert first.json()["node_errors"] == {}
    assert chosen.json() == {
        "prompt_id": "my-id",
        "number": first.json()["number"] + 1,
        "node_errors": {},
    }


def test_number_advances_when_validation_fails(http: httpx.Client) -> None:
    first = http.post("/prompt", json={"prompt": tiny()}).json()["number"]
    bad = blur_workflow(64, 1)
    bad["10"]["inputs"]["blur_radius"] = 40
    assert http.post("/prompt", json={"prompt": bad}).status_code == 400
    assert http.post("/prompt", json={"prompt": tiny()}).json()["number"] == first + 2


def _broken(change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    prompt = blur_workflow(64, 1)
    change(prompt)
    return prompt


@pytest.mark.parametrize(
    ("prompt", "error_type", "node_id", "node_error_type"),
    [
        (
            _broken(lambda p: p["10"]["inputs"].update(blur_radius=32)),
            "prompt_outputs_failed_validation",
            "10",
            "value_bigger_than_max",
        ),
        (
            _broken(lambda p: p["10"]["inputs"].update(blur_radius=0)),
            "prompt_outputs_failed_validation",
            "10",
            "value_smaller_than_min",
        ),
        (
            _broken(lambda p: p["10"]["inputs"].update(sigma=10.5)),
            "prompt_outputs_failed_validation",
            "10",
            "value_bigger_than_max",
        ),
        (
            _broken(lambda p: p["10"]["inputs"].pop("sigma")),
            "prompt_outputs_failed_validation",
            "10",
            "required_input_missing",
        ),
        (
            _broken(lambda p: p["3"]["inputs"].update(upscale_method="magic")),
            "prompt_outputs_failed_validation",
            "3",
            "value_not_in_list",
        ),
        (
            _broken(lambda p: p["1"]["inputs"].update(width="wide")),
            "prompt_outputs_failed_validation",
            "1",
            "invalid_input_type",
        ),
        (
            _broken(lambda p: p["2"]["inputs"].update(image=["99", 0])),
            "prompt_outputs_failed_validation",
            "2",
            "exception_during_validation",
        ),
        (
            _broken(
                lambda p: (
                    p.update(
                        {
                            "9": {
                                "class_type": "EmptyLatentImage",
                                "inputs": {"width": 64, "height": 64, "batch_size": 1},
                            }
                        }
                    )
                    or p["2"]["inputs"].update(image=["9", 0])
                )
            ),
            "prompt_outputs_failed_validation",
            "2",
            "return_type_mismatch",
        ),
        (
            _broken(lambda p: p["3"].update(class_type="NoSuchNode")),
            "invalid_prompt",
            None,
            None,
        ),
        (_broken(lambda p: p.pop("4")), "prompt_no_outputs", None, None),
        ({}, "no_prompt", None, None),
        (None, "no_prompt", None, None),
    ],
)
def test_validation_errors_have_comfyui_shape(
    http: httpx.Client,
    prompt: dict[str, Any] | None,
    error_type: str,
    node_id: str | None,
    node_error_type: str | None,
) -> None:
    body = {} if prompt is None else {"prompt": prompt}
    response = http.post("/prompt", json=body)
    assert response.status_code == 400
    answer = response.json()
    assert set(answer) == {"error", "node_errors"}
    assert set(answer["error"]) == {"type", "message", "details", "extra_info"}
    assert answer["error"]["type"] == error_type
    if node_id is None:
        assert answer["node_errors"] == {}
        return
    assert list(answer["node_errors"]) == [node_id]
    node_error = answer["node_errors"][node_id]
    assert prompt is not None
    assert node_error["class_type"] == prompt[node_id]["class_type"]
    assert node_error["dependent_outputs"] == ["4"]
    assert [e["type"] for e in node_error["errors"]] == [node_error_type]


def test_nothing_runs_after_a_rejected_prompt(http: httpx.Client) -> None:
    bad = blur_workflow(64, 1)
    bad["10"]["inputs"]["blur_radius"] = 99
    assert http.post("/prompt", json={"prompt": bad}).status_code == 400
    queue = http.get("/queue").json()
    assert queue == {"queue_running": [], "queue_pending": []}


# ---------------------------------------------------------------------- events and history


def test_events_of_one_prompt_in_comfyui_order(sim: RunningSim, http: httpx.Client) -> None:
    with connect(ws_url(sim, "c1")) as ws, connect(ws_url(sim, "bystander")) as other:
        hello = recv(ws)
        assert hello == {
            "type": "status",
            "data": {"status": {"exec_info": {"queue_remaining": 0}}, "sid": "c1"},
        }
        recv(other)
        prompt_id = submit(http, tiny("seq"))
        events = events_until_done(ws, prompt_id)
        # The done signal comes after the history entry is written: it is readable now.
        entry = history(http, prompt_id)

    names = []
    for event in events:
        if event["type"] == "status":
            continue
        if event["type"] in ("executing", "executed"):
            names.append(f"{event['type']}:{event['data']['node']}")
        else:
            names.append(event["type"])
        if event["type"] not in ("status",):
            assert event["data"]["prompt_id"] == prompt_id
    assert names == [
        "execution_start",
        "execution_cached",
        "executing:1",
        "executing:10",
        *["progress"] * 10,
        "executing:2",
        "executing:3",
        "executing:4",
        "executed:4",
        "execution_success",
        "executing:None",
    ]
    progress = [e["data"] for e in events if e["type"] == "progress"]
    assert [p["value"] for p in progress] == list(range(1, 11))
    assert {p["max"] for p in progress} == {10} and {p["node"] for p in progress} == {"10"}
    executed = next(e for e in events if e["type"] == "executed")["data"]
    image = {"filename": "seq_00001_.png", "subfolder": "", "type": "output"}
    assert executed["output"] == {"images": [image]}

    assert entry is not None
    assert entry["outputs"] == {"4": {"images": [image]}}
    assert entry["status"]["status_str"] == "success"
    assert entry["status"]["completed"] is True
    assert [m[0] for m in entry["status"]["messages"]] == [
        "execution_start",
        "execution_cached",
        "execution_success",
    ]
    assert entry["prompt"][1] == prompt_id and entry["prompt"][4] == ["4"]
    assert entry["prompt"][3] == {"client_id": "c1"}
    assert entry["meta"]["4"]["node_id"] == "4"


def test_events_go_to_the_submitting_client_only(sim: RunningSim, http: httpx.Client) -> None:
    with connect(ws_url(sim, "owner")) as owner, connect(ws_url(sim, "bystander")) as other:
        recv(owner)
        recv(other)
        prompt_id = submit(http, tiny(), client_id="owner")
        events_until_done(owner, prompt_id)
        seen = []
        while True:
            try:
                seen.append(recv(other, timeout=0.2)["type"])
            except TimeoutError:
                break
    assert seen and set(seen) == {"status"}


def test_history_is_empty_until_done_and_saved_names_count_up(
    sim: RunningSim, http: httpx.Client
) -> None:
    with connect(ws_url(sim, "c1")) as ws:
        first = submit(http, tiny("same"))
        assert http.get(f"/history/{first}").json() == {}
        second = submit(http, tiny("same"))
        events_until_done(ws, second)
    names = [
        finished(http, pid)["outputs"]["4"]["images"][0]["filename"] for pid in (first, second)
    ]
    assert names == ["same_00001_.png", "same_00002_.png"]
    assert set(http.get("/history").json()) == {first, second}
    assert list(http.get("/history", params={"max_items": 1}).json()) == [second]


def test_history_keeps_at_most_the_limit(sim: RunningSim, http: httpx.Client) -> None:
    sim.sim.history_limit = 2
    with connect(ws_url(sim, "c1")) as ws:
        ids = [submit(http, tiny()) for _ in range(3)]
        events_until_done(ws, ids[-1])
    assert list(http.get("/history").json()) == ids[1:]


def test_blur_takes_realistic_time_at_time_scale_one(
    make_sim: Callable[..., RunningSim],
) -> None:
    sim = make_sim(time_scale=1.0)
    prompt = blur_workflow(512, 1, output_size=512)
    with httpx.Client(base_url=sim.url) as http, connect(ws_url(sim, "c1")) as ws:
        prompt_id = submit(http, prompt)
        events = events_until_done(ws, prompt_id)
    stamped = {e["type"]: e["data"]["timestamp"] for e in events if "timestamp" in e["data"]}
    elapsed = (stamped["execution_success"] - stamped["execution_start"]) / 1000
    # ImageBlur r=31 at 512x512 is about 0.35 s on a 2-core CPU; the other nodes are small.
    assert 0.3 <= elapsed <= 0.8, elapsed


# ---------------------------------------------------------------------- the queue and cancelling


def _running_and_pending(
    sim: RunningSim, http: httpx.Client, ws: ClientConnection, pending: int = 1
) -> list[str]:
    """Submit a long prompt, wait until it runs, then queue ``pending`` tiny ones."""
    recv(ws)
    running = submit(http, long())
    wait_for(ws, "execution_start", running)
    return [running] + [submit(http, tiny(f"p{i}")) for i in range(pending)]


def test_queue_lists_running_and_pending_items(
    make_sim: Callable[..., RunningSim],
) -> None:
    sim = make_sim(time_scale=SLOW)
    with httpx.Client(base_url=sim.url) as http, connect(ws_url(sim, "c1")) as ws:
        running, pending = _running_and_pending(sim, http, ws)
        queue = http.get("/queue").json()
    assert [item[1] for item in queue["queue_running"]] == [running]
    assert [item[1] for item in queue["queue_pending"]] == [pending]
    number, _prompt_id, prompt, extra_data, outputs = queue["queue_pending"][0]
    assert isinstance(number, int) and prompt["4"]["class_type"] == "SaveImage"
    assert extra_data == {"client_id": "c1"} and outputs == ["4"]


def test_targeted_interrupt_of_a_pending_prompt_touches_nothing(
    make_sim: Callable[..., RunningSim],
) -> None:
    sim = make_sim(time_scale=SLOW)
    with httpx.Client(base_url=sim.url) as http, connect(ws_url(sim, "c1")) as ws:
        running, pending = _running_and_pending(sim, http, ws)
        assert http.post("/interrupt", json={"prompt_id": pending}).status_code == 200
        events_until_done(ws, pending)
        assert finished(http, running)["status"]["status_str"] == "success"
        assert finished(http, pending)["status"]["status_str"] == "success"
        [call] = calls(http)
    assert call["kind"] == "interrupt" and call["prompt_id"] == pending
    assert call["running"] == running and call["effective"] is False
    assert call["at"] > 0 and call["monotonic"] > 0


def test_targeted_interrupt_of_the_running_prompt(make_sim: Callable[..., RunningSim]) -> None:
    sim = make_sim(time_scale=SLOW)
    with httpx.Client(base_url=sim.url) as http, connect(ws_url(sim, "c1")) as ws:
        running, pending = _running_and_pending(sim, http, ws)
        wait_for(ws, "progress", running)
        http.post("/interrupt", json={"prompt_id": running})
        events = events_until_done(ws, running)
        entry = history(http, running)
        # The flag was reset when the next prompt started: it runs to the end.
        events_until_done(ws, pending)
        assert finished(http, pending)["status"]["status_str"] == "success"
    kinds = [e["type"] for e in events if e["type"] != "status"]
    assert kinds[-2:] == ["execution_interrupted", "executing"]
    interrupted = next(e for e in events if e["type"] == "execution_interrupted")["data"]
    assert interrupted["prompt_id"] == running and interrupted["node_type"] == "ImageBlur"
    assert interrupted["executed"][0] == "1" and "4" not in interrupted["executed"]
    assert interrupted["node_id"] not in interrupted["executed"]
    assert entry is not None
    assert entry["status"]["status_str"] == "error" and entry["status"]["completed"] is False
    assert entry["status"]["messages"][-1][0] == "execution_interrupted"
    assert entry["outputs"] == {}


def test_an_interrupted_prompt_keeps_the_outputs_saved_before_it_stopped(
    make_sim: Callable[..., RunningSim],
) -> None:
    # Like ComfyUI: each output node reports `executed` as it finishes, and the history
    # entry of an interrupted prompt still lists the outputs of the nodes that finished.
    sim = make_sim(time_scale=SLOW)
    with httpx.Client(base_url=sim.url) as http, connect(ws_url(sim, "c1")) as ws:
        recv(ws)
        prompt_id = submit(http, blur_chain(8, 256, "part", early_save=1))
        saved = wait_for(ws, "executed", prompt_id)["data"]
        http.post("/interrupt", json={"prompt_id": prompt_id})
        events = events_until_done(ws, prompt_id)
        entry = finished(http, prompt_id)
        queue = http.get("/queue").json()
    assert saved["node"] == "early"
    assert saved["output"] == {"images": [
        {"filename": "part-early_00001_.png", "subfolder": "", "type": "output"}]}
    assert [e["type"] for e in events].count("executed") == 0  # nothing more was saved
    assert entry["status"]["messages"][-1][0] == "execution_interrupted"
    assert entry["outputs"] == {"early": saved["output"]}  # "save" never ran
    assert queue == {"queue_running": [], "queue_pending": []}  # let go of it


def test_an_output_node_runs_as_soon_as_its_inputs_are_done(
    sim: RunningSim, http: httpx.Client
) -> None:
    # The early SaveImage is the last output node by id, and still runs right after its
    # blur, as ComfyUI's scheduler prefers an output node that is ready.
    prompt = blur_chain(3, 64, "order", early_save=1)
    prompt["z-early"] = prompt.pop("early")
    with connect(ws_url(sim, "c1")) as ws:
        recv(ws)
        prompt_id = submit(http, prompt)
        events = events_until_done(ws, prompt_id)
    ran = [e["data"]["node"] for e in events if e["type"] == "executing"][:-1]
    assert ran == ["1", "2", "z-early", "3", "4", "save"]
    assert set(finished(http, prompt_id)["outputs"]) == {"z-early", "save"}


def test_interrupt_lands_at_the_next_progress_step(make_sim: Callable[..., RunningSim]) -> None:
    sim = make_sim(time_scale=0.5)  # one blur takes 0.4 s, one step 40 ms
    with httpx.Client(base_url=sim.url) as http, connect(ws_url(sim, "c1")) as ws:
        recv(ws)
        prompt_id = submit(http, long())
        first_step = wait_for(ws, "progress", prompt_id)
        assert first_step["data"]["node"] == "10"
        asked = time.monotonic()
        http.post("/interrupt", json={"prompt_id": prompt_id})
        interrupted = wait_for(ws, "execution_interrupted", prompt_id)
        latency = time.monotonic() - asked
    # Inside the blur, not at the next node: checked at each step, like ComfyUI's progress bar.
    assert interrupted["data"]["node_id"] == "10" and interrupted["data"]["executed"] == ["1"]
    assert latency < 0.25, latency


def test_a_reconnecting_client_is_told_the_running_node(
    make_sim: Callable[..., RunningSim],
) -> None:
    sim = make_sim(time_scale=SLOW)
    with httpx.Client(base_url=sim.url) as http:
        with connect(ws_url(sim, "c1")) as ws:
            recv(ws)
            prompt_id = submit(http, long())
            wait_for(ws, "progress", prompt_id)
        with connect(ws_url(sim, "c1")) as again:
            assert recv(again)["type"] == "status"
            current = recv(again)
    assert current["type"] == "executing" and current["data"]["prompt_id"] == prompt_id
    assert current["data"]["node"] in {str(n) for n in range(10, 18)}


def test_bare_interrupt_stops_whatever_runs(make_sim: Callable[..., RunningSim]) -> None:
    sim = make_sim(time_scale=SLOW)
    with httpx.Client(base_url=sim.url) as http, connect(ws_url(sim, "c1")) as ws:
        running, _pending = _running_and_pending(sim, http, ws)
        http.post("/interrupt")
        events_until_done(ws, running)
        assert finished(http, running)["status"]["completed"] is False
        assert calls(http)[0]["prompt_id"] is None


def test_queue_delete_removes_pending_only(make_sim: Callable[..., RunningSim]) -> None:
    sim = make_sim(time_scale=SLOW)
    with httpx.Client(base_url=sim.url) as http, connect(ws_url(sim, "c1")) as ws:
        running, deleted, kept = _running_and_pending(sim, http, ws, pending=2)
        response = http.post("/queue", json={"delete": [deleted, running]})
        assert response.status_code == 200 and response.content == b""
        queue = http.get("/queue").json()
        assert [i[1] for i in queue["queue_running"]] == [running]
        assert [i[1] for i in queue["queue_pending"]] == [kept]
        events_until_done(ws, kept)
        assert finished(http, running)["status"]["status_str"] == "success"
        assert history(http, deleted) is None
        effective = {c["prompt_id"]: c["effective"] for c in calls(http)}
    assert effective == {deleted: True, running: False}


def test_queue_clear_empties_pending(make_sim: Callable[..., RunningSim]) -> None:
    sim = make_sim(time_scale=SLOW)
    with httpx.Client(base_url=sim.url) as http, connect(ws_url(sim, "c1")) as ws:
        running, *_pending = _running_and_pending(sim, http, ws, pending=2)
        http.post("/queue", json={"clear": True})
        queue = http.get("/queue").json()
    assert [i[1] for i in queue["queue_running"]] == [running]
    assert queue["queue_pending"] == []


def test_jobs_cancel_running_and_pending_is_idempotent(
    make_sim: Callable[..., RunningSim],
) -> None:
    sim = make_sim(time_scale=SLOW)
    with httpx.Client(base_url=sim.url) as http, connect(ws_url(sim, "c1")) as ws:
        running, pending = _running_and_pending(sim, http, ws)

        def cancel(prompt_id: str) -> bool:
            response = http.post(f"/api/jobs/{prompt_id}/cancel")
            assert response.status_code == 200
            cancelled = response.json()["cancelled"]
            assert isinstance(cancelled, bool)
            return cancelled

        assert cancel(pending) is True
        assert http.get("/queue").json()["queue_pending"] == []
        assert cancel(running) is True
        events_until_done(ws, running)
        assert finished(http, running)["status"]["messages"][-1][0] == "execution_interrupted"
        assert cancel(running) is True
        assert cancel(pending) is True
        assert cancel("no-such-prompt") is False
        done = submit(http, tiny())
        events_until_done(ws, done)
        assert cancel(done) is False
        assert history(http, pending) is None
        kinds = {c["kind"] for c in calls(http)}
    assert kinds == {"jobs_cancel"}


def test_jobs_cancel_many(make_sim: Callable[..., RunningSim]) -> None:
    sim = make_sim(time_scale=SLOW)
    with httpx.Client(base_url=sim.url) as http, connect(ws_url(sim, "c1")) as ws:
        running, first, second = _running_and_pending(sim, http, ws, pending=2)
        response = http.post("/api/jobs/cancel", json={"job_ids": [running, first, "nope"]})
        assert response.json() == {"cancelled": {running: True, first: True, "nope": False}}
        events_until_done(ws, second)
        assert finished(http, running)["status"]["completed"] is False
        assert finished(http, second)["status"]["completed"] is True


def test_jobs_api_can_be_switched_off(make_sim: Callable[..., RunningSim]) -> None:
    sim = make_sim(jobs_api=False)
    with httpx.Client(base_url=sim.url) as http:
        assert http.post("/api/jobs/x/cancel").status_code == 404
        assert http.post("/api/jobs/cancel", json={"job_ids": ["x"]}).status_code == 404
        assert http.post("/api/no/such/route").status_code == 404


# ---------------------------------------------------------------------- failures and headers


def test_error_injection_makes_a_real_execution_error(sim: RunningSim, http: httpx.Client) -> None:
    with connect(ws_url(sim, "c1")) as ws:
        prompt_id = submit(http, tiny("fail-on-purpose"))
        events = events_until_done(ws, prompt_id)
    kinds = [e["type"] for e in events if e["type"] != "status"]
    assert "execution_success" not in kinds and kinds[-2:] == ["execution_error", "executing"]
    error = next(e for e in events if e["type"] == "execution_error")["data"]
    assert error["prompt_id"] == prompt_id
    assert error["node_id"] == "4" and error["node_type"] == "SaveImage"
    assert error["exception_type"] == "RuntimeError"
    assert "fail-on-purpose" in error["exception_message"]
    assert isinstance(error["traceback"], list) and error["traceback"]
    assert error["executed"] == ["1", "10", "2", "3"]
    assert "filename_prefix" in error["current_inputs"]
    assert isinstance(error["current_outputs"], list) and isinstance(error["timestamp"], int)
    entry = history(http, prompt_id)
    assert entry is not None
    assert entry["status"]["status_str"] == "error" and entry["status"]["completed"] is False
    assert entry["status"]["messages"][-1][0] == "execution_error"


def test_required_headers_are_enforced_everywhere(make_sim: Callable[..., RunningSim]) -> None:
    sim = make_sim(required_headers={"X-Runner-Token": "s3cret"})
    with httpx.Client(base_url=sim.url) as anonymous:
        assert anonymous.get("/system_stats").status_code == 401
        assert anonymous.post("/prompt", json={"prompt": tiny()}).status_code == 401
        assert anonymous.post("/interrupt").status_code == 401
        # The observation routes stay open: they are not part of ComfyUI's API.
        assert anonymous.get("/sim/calls").status_code == 200
    with pytest.raises(InvalidStatus) as refused, connect(ws_url(sim, "c1")):
        pass
    assert refused.value.response.status_code == 401

    headers = {"X-Runner-Token": "s3cret"}
    with (
        httpx.Client(base_url=sim.url, headers=headers) as http,
        connect(ws_url(sim, "c1"), additional_headers=headers) as ws,
    ):
        assert recv(ws)["type"] == "status"
        prompt_id = submit(http, tiny())
        events_until_done(ws, prompt_id)
        requests = http.get("/sim/calls").json()["requests"]
    statuses = {(r["method"], r["path"]): r["status"] for r in requests}
    assert statuses[("GET", "/system_stats")] == 401
    assert statuses[("POST", "/prompt")] == 200


def test_routes_are_served_under_api_too(sim: RunningSim, http: httpx.Client) -> None:
    stats = http.get("/api/system_stats").json()
    assert stats["system"]["comfyui_version"] == "0.3.64-sim"
    device = stats["devices"][0]
    assert device["name"] == "cpu" and device["type"] == "cpu"
    assert device["vram_total"] == 0 and device["vram_free"] == 0
    prompt_id = http.post("/api/prompt", json={"prompt": tiny()}).json()["prompt_id"]
    with connect(sim.url.replace("http://", "ws://") + "/api/ws?clientId=c9") as ws:
        assert recv(ws)["data"]["sid"] == "c9"
    for _ in range(100):
        if http.get(f"/api/history/{prompt_id}").json():
            break
        time.sleep(0.05)
    assert http.get(f"/api/history/{prompt_id}").json()[prompt_id]["status"]["completed"]
    assert http.get("/api/queue").json() == {"queue_running": [], "queue_pending": []}


def test_sim_reset_and_drop_websockets(sim: RunningSim, http: httpx.Client) -> None:
    http.post("/interrupt", json={"prompt_id": "x"})
    assert len(calls(http)) == 1
    http.post("/sim/reset")
    assert http.get("/sim/calls").json() == {"calls": [], "requests": []}
    with connect(ws_url(sim, "c1")) as ws:
        recv(ws)
        assert http.post("/sim/drop_websockets").json() == {"dropped": 1}
        with pytest.raises(Exception) as dropped:
            recv(ws, timeout=2)
        assert "1001" in str(dropped.value)
