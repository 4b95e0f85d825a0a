"""``comfy-cancel dev`` and ``comfy-cancel demo`` as a person runs them: real subprocesses,
an embedded Redis, SQLite, Celery workers, beat, the API and the simulated ComfyUI, and
nothing left running afterwards, however the command ends."""

from __future__ import annotations

import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil
import pytest

from comfy_cancel import manager
from comfy_cancel.config import ENV_PREFIX, Settings
from comfy_cancel.db import Database, make_engine
from comfy_cancel.embedded.comfyui_sim import blur_workflow
from comfy_cancel.embedded.database import SIM_RUNNER
from comfy_cancel.embedded.errors import StackError
from comfy_cancel.embedded.stack import EmbeddedStack

pytestmark = pytest.mark.acceptance

REPO = Path(__file__).resolve().parents[2]
BANNER = "Ctrl-C stops it"
TERMINAL = {"completed", "failed", "cancelled"}


def command_env() -> dict[str, str]:
    """The caller's environment without any setting: the commands must need none."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(ENV_PREFIX)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def comfy_cancel(*args: str, output: Path, env: dict[str, str] | None = None
                 ) -> subprocess.Popen[bytes]:
    with output.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "comfy_cancel.cli", *args],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env or command_env(), cwd=REPO,
        )


def descendants(proc: subprocess.Popen[bytes]) -> list[psutil.Process]:
    try:
        return list(psutil.Process(proc.pid).children(recursive=True))
    except psutil.NoSuchProcess:
        return []


def alive(process: psutil.Process) -> bool:
    # is_running() also checks the start time, so a reused pid is not mistaken for ours;
    # a zombie has exited and only waits for its new parent to reap it.
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def processes_using(data_dir: Path) -> list[str]:
    """Any process whose command line or working directory is in ``data_dir``."""
    found = []
    marker = str(data_dir)
    for process in psutil.process_iter(["pid", "cmdline", "cwd", "status"]):
        info = process.info
        if info["status"] == psutil.STATUS_ZOMBIE:
            continue
        cmdline = " ".join(info["cmdline"] or [])
        if marker in cmdline or (info["cwd"] or "").startswith(marker):
            found.append(f"{info['pid']}: {cmdline}")
    return found


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def assert_nothing_left(started: list[psutil.Process], data_dir: Path, ports: list[int],
                        within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        left = [p for p in started if alive(p)]
        if not left and not processes_using(data_dir):
            break
        time.sleep(0.2)
    left = [p for p in started if alive(p)]
    assert not left, f"left running: {[(p.pid, p.cmdline()) for p in left]}"
    assert not processes_using(data_dir)
    assert not [p for p in ports if port_open(p)], ports


def wait_for_output(proc: subprocess.Popen[bytes], output: Path, text: str,
                    timeout: float = 120.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen = output.read_text(errors="replace")
        if text in seen:
            return seen
        if proc.poll() is not None:
            pytest.fail(f"exited with {proc.returncode} before printing {text!r}:\n{seen}")
        time.sleep(0.1)
    proc.kill()
    pytest.fail(f"no {text!r} within {timeout}s:\n{output.read_text(errors='replace')}")


def ports_in(text: str) -> list[int]:
    return [int(p) for p in re.findall(r"127\.0\.0\.1:(\d+)", text)] + [
        int(p) for p in re.findall(r"on port (\d+)", text)]


@contextmanager
def running_dev(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path, str]]:
    output = tmp_path / "dev.out"
    data_dir = tmp_path / "dev-data"
    proc = comfy_cancel("dev", "--data-dir", str(data_dir), "--port", "0", "--time-scale",
                        "0.5", output=output)
    try:
        yield proc, data_dir, wait_for_output(proc, output, BANNER)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_demo_shows_every_ending_stops_by_itself_and_leaves_nothing(tmp_path: Path) -> None:
    output = tmp_path / "demo.out"
    data_dir = tmp_path / "demo-data"
    started = time.monotonic()
    proc = comfy_cancel("demo", "--data-dir", str(data_dir), output=output)
    seen: dict[int, psutil.Process] = {}
    while proc.poll() is None and time.monotonic() - started < 180:
        seen.update((p.pid, p) for p in descendants(proc))
        time.sleep(0.2)
    if proc.poll() is None:
        proc.kill()
        pytest.fail(f"the demo did not stop by itself:\n{output.read_text()}")
    text = output.read_text(errors="replace")
    assert proc.returncode == 0, text
    assert time.monotonic() - started < 120, text
    assert "Traceback" not in text

    rows = {}
    for line in text.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if cells[0] in ("completes", "cancel-queued", "cancel-running", "race"):
            rows[cells[0]] = cells
    assert rows["completes"][2:4] == ["completed", "-"], text
    assert rows["cancel-queued"][2:4] == ["cancelled", "cancelled"], text
    assert rows["cancel-running"][2:4] == ["cancelled", "cancelled"], text
    assert rows["race"][2:4] in (["cancelled", "cancelled"], ["completed", "too_late"],
                                 ["completed", "refused (400)"]), text
    for name in ("cancel-queued", "cancel-running"):
        assert re.fullmatch(r"\d+\.\d\d s", rows[name][4]), rows[name]
    for name in rows:
        assert re.search(rf"^{name}: (completed|cancelled)", text, re.MULTILINE), name

    # Six processes: Redis, the sim, the API, two workers and beat.
    assert len(seen) >= 6, [p.info for p in seen.values()]
    assert_nothing_left(list(seen.values()), data_dir, ports_in(text))


def test_dev_serves_the_api_and_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    with running_dev(tmp_path) as (proc, data_dir, text):
        api = re.search(r"export API=(\S+) TOKEN=(\S+)", text)
        assert api, text
        api_url, token = api[1], api[2]
        started = descendants(proc)
        names = " ".join(" ".join(p.cmdline()) for p in started)
        for part in ("redis-server", "sim-comfyui", " api ", "-Q cancel,cancel.bulk,cancel.sweep",
                     "-Q runner", " beat "):
            assert part in names, (part, names)
        assert {p.pid for p in started} == {p.pid for p in descendants(proc)}

        # The banner's token and runner work: submit, see it run, cancel it.
        headers = {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=api_url, headers=headers, timeout=10) as client:
            assert client.get("/docs").status_code == 200
            submitted = client.post("/v1/workflow", json={
                "name": "by-hand", "workflow_json": blur_workflow(768, 30)})
            assert submitted.status_code == 200, submitted.text
            workflow_id = submitted.json()["id"]
            deadline = time.monotonic() + 30
            # Polled as a person's script would, within the token's default rate limit
            # (40 requests per 10 s).
            while client.get(f"/v1/workflow/{workflow_id}").json()["status"] != "running":
                assert time.monotonic() < deadline, "never ran"
                time.sleep(0.5)
            cancelled = client.post(f"/v1/workflow/{workflow_id}/cancel")
            assert cancelled.status_code == 200 and cancelled.content == b""
            while (wf := client.get(f"/v1/workflow/{workflow_id}").json())["status"] not in \
                    TERMINAL:
                assert time.monotonic() < deadline + 30, wf
                time.sleep(0.5)
            assert wf["status"] == "cancelled" and wf["cancel"]["outcome"] == "cancelled"

        # Watching it: the banner's metrics URLs (API and each worker) and Flower's command.
        metrics_urls = re.findall(r"(http://127\.0\.0\.1:\d+/metrics)", text)
        assert metrics_urls[0] == f"{api_url}/metrics" and len(metrics_urls) == 3, text
        pages = [httpx.get(url, timeout=10).text for url in metrics_urls]
        assert 'comfy_cancel_cancel_requests_total{source="api"} 1.0' in pages[0]
        assert any('comfy_cancel_cancel_outcomes_total{outcome="cancelled",source="api"} 1.0'
                   in page for page in pages[1:])
        assert re.search(r'COMFY_CANCEL_REDIS_URL="redis://:\$\(cat \S+\)@127\.0\.0\.1:\d+/\d+" '
                         r'celery -A comfy_cancel\.worker flower', text), text

        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
        text = (tmp_path / "dev.out").read_text()
        assert "stopping: beat, worker-cancel, worker-runner, api, sim-comfyui, redis" in text
        assert text.rstrip().endswith("stopped")
        assert_nothing_left(started, data_dir, ports_in(text))
        for name in ("sim-comfyui", "api", "worker-cancel", "worker-runner", "beat"):
            assert (data_dir / "logs" / f"{name}.log").stat().st_size > 0


def test_a_killed_dev_leaves_no_orphans(tmp_path: Path) -> None:
    with running_dev(tmp_path) as (proc, data_dir, text):
        started = descendants(proc)
        assert len(started) >= 6
        proc.kill()  # no atexit, no signal handler: only the kernel's parent-death signal
        proc.wait(10)
        assert_nothing_left(started, data_dir, ports_in(text), within=30)


def test_sigterm_stops_dev_like_ctrl_c(tmp_path: Path) -> None:
    with running_dev(tmp_path) as (proc, data_dir, text):
        started = descendants(proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert_nothing_left(started, data_dir, ports_in(text))


def test_restarts_reuse_the_sim_runner_and_the_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key in [k for k in os.environ if k.upper().startswith(ENV_PREFIX)]:
        monkeypatch.delenv(key)
    data_dir = tmp_path / "stack"
    with EmbeddedStack(data_dir, settings=Settings()) as first:
        token, runner_id, first_sim = first.token, first.runner_id, first.comfyui_url
        assert httpx.get(f"{first.api_url}/readyz", timeout=5).status_code == 200
        database_url = first.database_url
        # One stack per data dir: a second would share the Redis AOF and the SQLite file.
        with pytest.raises(StackError, match=f"pid {os.getpid()}.*--data-dir"):
            EmbeddedStack(data_dir, settings=Settings()).start()
        assert httpx.get(f"{first.api_url}/readyz", timeout=5).status_code == 200
    # Owner-only: the token, the key that seals runner headers, the database.
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    for name in ("token", "secret.key"):
        assert stat.S_IMODE((data_dir / name).stat().st_mode) == 0o600, name
    key = (data_dir / "secret.key").read_text()
    with EmbeddedStack(data_dir, settings=Settings()) as second:
        assert (data_dir / "secret.key").read_text() == key == f"{second.settings.secret_key}\n"
        assert (second.token, second.runner_id) == (token, runner_id)
        runners = httpx.get(f"{second.api_url}/v1/runner", timeout=5,
                            headers={"Authorization": f"Bearer {second.token}"}).json()
        assert [(r["id"], r["name"]) for r in runners] == [(runner_id, SIM_RUNNER)]
        assert runners[0]["endpoint_url"] == second.comfyui_url != first_sim
    db = Database(make_engine(database_url))
    try:
        with db.transaction() as session:
            account = manager.get_account(session, "demo")
            assert account is not None
            assert len(manager.list_runners(session, account.id)) == 1
    finally:
        db.engine.dispose()
    assert (data_dir / "redis" / "appendonly.aof").exists() or list(
        (data_dir / "redis").glob("appendonly*"))


def test_an_unreachable_redis_named_by_the_user_is_one_clear_line(tmp_path: Path) -> None:
    env = command_env() | {f"{ENV_PREFIX}REDIS_URL": "redis://127.0.0.1:1/0"}
    output = tmp_path / "dev.out"
    proc = comfy_cancel("dev", "--data-dir", str(tmp_path / "d"), "--port", "0",
                        output=output, env=env)
    assert proc.wait(60) == 1
    lines = output.read_text().strip().splitlines()
    assert lines[-1].startswith("comfy-cancel: error: Redis at redis://127.0.0.1:1/0"), lines
    assert f"unset {ENV_PREFIX}REDIS_URL" in lines[-1]
    assert "Traceback" not in output.read_text()


def test_a_busy_port_is_one_clear_line(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        output = tmp_path / "dev.out"
        proc = comfy_cancel("dev", "--data-dir", str(tmp_path / "d"), "--port", str(port),
                            output=output)
        assert proc.wait(60) == 1
    last = output.read_text().strip().splitlines()[-1]
    assert last.startswith(f"comfy-cancel: error: port {port} for the API is not free"), last
    assert "--port" in last
