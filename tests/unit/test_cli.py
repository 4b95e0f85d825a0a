"""The ``comfy-cancel`` command, run in-process against a SQLite file."""

from __future__ import annotations

import fcntl
import io
import json
import os
import pty
import select as io_select
import subprocess
import sys
import termios
import time
import types
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

import comfy_cancel.embedded
from comfy_cancel import cli, context, encryption, manager, tasks
from comfy_cancel.config import Settings, available_cores, get_settings
from comfy_cancel.db import Database, engine_for
from comfy_cancel.models import ApiToken, WorkflowStatus, utcnow
from testbed.database import migrate
from tests.helpers import make_account_and_runner, seed_workflow

REPO = Path(__file__).resolve().parents[2]


def _forget_process_state() -> None:
    get_settings.cache_clear()
    context.reset()
    engine_for.cache_clear()


@pytest.fixture
def database_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    monkeypatch.setenv("COMFY_CANCEL_DATABASE_URL", url)
    monkeypatch.setenv("COMFY_CANCEL_REDIS_URL", "redis://:hunter2@127.0.0.1:6390/0")
    _forget_process_state()
    yield url
    _forget_process_state()


@pytest.fixture
def migrated(database_url: str) -> str:
    # The schema `comfy-cancel migrate` leaves (the command has its own test below), copied
    # from a database migrated once: a migration costs about 0.2 s, and most tests need one.
    migrate(database_url)
    return database_url


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err: str, *words: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("comfy-cancel: error: ")
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0]


# --- migrate and tokens ---------------------------------------------------------------------


def test_commands_on_an_unmigrated_database_say_to_migrate(
    database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "token", "create", "--account", "acme")
    assert (code, out) == (1, "")
    assert_one_line_error(err, "comfy-cancel migrate")
    code, out, _ = run(capsys, "migrate")
    assert code == 0 and "migrated" in out
    assert run(capsys, "token", "create", "--account", "acme")[0] == 0


def test_token_create_prints_a_token_that_authenticates(
    migrated: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "token", "create", "--account", "acme")
    assert code == 0
    token = out.strip()
    assert out == token + "\n" and token.startswith("cfc_")
    assert "shown only once" in err and token not in err
    with Database.from_url(migrated).transaction() as session:
        principal = manager.authenticate(session, token)
    assert principal is not None
    assert (principal.account_name, principal.is_operator) == ("acme", False)


def test_token_create_for_an_operator_with_an_expiry(
    migrated: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "token", "create", "--account", "ops", "--operator",
                       "--expires-in-days", "2")
    assert code == 0
    with Database.from_url(migrated).transaction() as session:
        principal = manager.authenticate(session, out.strip())
        assert principal is not None and principal.is_operator
        [stored] = session.execute(select(ApiToken)).scalars().all()
    assert stored.expires_at is not None
    assert abs(stored.expires_at - (utcnow() + timedelta(days=2))) < timedelta(minutes=1)


@pytest.mark.parametrize("days", ["0", "-1", "soon"])
def test_token_create_refuses_a_bad_expiry(
    migrated: str, capsys: pytest.CaptureFixture[str], days: str
) -> None:
    code, out, err = run(capsys, "token", "create", "--account", "a", "--expires-in-days", days)
    assert (code, out) == (2, "")
    assert_one_line_error(err, "--expires-in-days")


@pytest.mark.parametrize(("given", "stored", "said"), [
    (None, None, "default rate limit, 40 requests per 10 s"),
    ("500", 500, "rate limit 500 requests per 10 s"),
    ("0", 0, "no rate limit"),
])
def test_token_create_with_a_rate_limit(
    migrated: str, capsys: pytest.CaptureFixture[str], given: str | None, stored: int | None,
    said: str,
) -> None:
    extra = ["--rate-limit", given] if given is not None else []
    code, out, err = run(capsys, "token", "create", "--account", "bench", *extra)
    assert code == 0 and said in err
    with Database.from_url(migrated).transaction() as session:
        principal = manager.authenticate(session, out.strip())
    assert principal is not None and principal.rate_limit == stored


@pytest.mark.parametrize("limit", ["-1", "many", str(2**31)])
def test_token_create_refuses_a_bad_rate_limit(
    migrated: str, capsys: pytest.CaptureFixture[str], limit: str
) -> None:
    code, out, err = run(capsys, "token", "create", "--account", "a", "--rate-limit", limit)
    assert (code, out) == (2, "")
    assert_one_line_error(err, "--rate-limit")


# --- runners --------------------------------------------------------------------------------


KEY = encryption.new_key()


@pytest.fixture
def keyed(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A secret key for runner headers, and the operator's private network allowed."""
    monkeypatch.setenv("COMFY_CANCEL_SECRET_KEY", KEY)
    monkeypatch.setenv("COMFY_CANCEL_RUNNER_ALLOWED_NETWORKS", "10.0.0.0/8")
    _forget_process_state()
    yield KEY
    _forget_process_state()


def test_runner_add_and_list(
    migrated: str, keyed: str, capsys: pytest.CaptureFixture[str]
) -> None:
    run(capsys, "token", "create", "--account", "acme")
    code, out, err = run(capsys, "runner", "add", "--account", "acme", "gpu-1",
                         "http://10.0.0.5:8188/", "--tag", "gpu", "--tag", "sdxl",
                         "--header", "X-Api-Key: s3cret")
    assert code == 0, err
    runner_id = out.strip()
    with Database.from_url(migrated).transaction() as session:
        runner = manager.get_runner(session, runner_id)
        assert runner is not None
        assert (runner.name, runner.endpoint_url, runner.tags, runner.headers) == (
            "gpu-1", "http://10.0.0.5:8188", ["gpu", "sdxl"], {"X-Api-Key": "s3cret"}
        )
        assert runner.sealed_headers is not None and "s3cret" not in runner.sealed_headers
    code, out, _ = run(capsys, "runner", "list", "--account", "acme")
    assert code == 0
    assert runner_id in out and "X-Api-Key" in out and "s3cret" not in out


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:6379", "http://169.254.169.254/latest", "http://metadata.google.internal",
     "http://[::1]:8188", "http://0.0.0.0:8188", "http://2130706433:6379", "http://localhost",
     "http://192.168.1.10:8188"],
)
def test_runner_add_refuses_internal_addresses(
    migrated: str, capsys: pytest.CaptureFixture[str], url: str
) -> None:
    run(capsys, "token", "create", "--account", "acme")
    code, out, err = run(capsys, "runner", "add", "--account", "acme", "r", url)
    assert (code, out) == (1, "")
    assert_one_line_error(err, "endpoint_url", "COMFY_CANCEL_RUNNER_ALLOWED_NETWORKS")


def test_runner_add_refuses_headers_without_a_key(
    migrated: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("COMFY_CANCEL_SECRET_KEY", raising=False)
    _forget_process_state()
    run(capsys, "token", "create", "--account", "acme")
    code, out, err = run(capsys, "runner", "add", "--account", "acme", "r", "http://h:1",
                         "--header", "Authorization: Bearer s3cret")
    assert (code, out) == (1, "")
    assert_one_line_error(err, "COMFY_CANCEL_SECRET_KEY", "without headers")
    code, out, err = run(capsys, "runner", "add", "--account", "acme", "r", "http://h:1")
    assert code == 0, err


def test_key_rotation_with_new_key_and_reseal(
    migrated: str, keyed: str, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run(capsys, "token", "create", "--account", "acme")
    _, out, _ = run(capsys, "runner", "add", "--account", "acme", "r", "http://10.0.0.5:1",
                    "--header", "X-Api-Key: s3cret")
    runner_id = out.strip()
    code, new_key, _ = run(capsys, "runner", "new-key")
    assert code == 0
    monkeypatch.setenv("COMFY_CANCEL_SECRET_KEY", f"{new_key.strip()},{keyed}")
    _forget_process_state()
    code, out, err = run(capsys, "runner", "reseal")
    assert (code, out.strip()) == (0, "resealed the headers of 1 runners with the newest key")
    monkeypatch.setenv("COMFY_CANCEL_SECRET_KEY", new_key.strip())  # the old key is gone
    _forget_process_state()
    with Database.from_url(migrated).transaction() as session:
        runner = manager.get_runner(session, runner_id)
        assert runner is not None and runner.headers == {"X-Api-Key": "s3cret"}
    monkeypatch.setenv("COMFY_CANCEL_SECRET_KEY", keyed)  # a key that opens nothing
    _forget_process_state()
    code, out, err = run(capsys, "runner", "reseal")
    assert code == 1
    assert_one_line_error(err, "open with no configured key", runner_id)


@pytest.mark.parametrize(
    ("argv", "code", "words"),
    [
        (["--account", "nobody", "r", "http://h:1"], 1, "no account 'nobody'"),
        (["--account", "acme", "r", "ftp://h"], 1, "endpoint_url"),
        (["--account", "acme", "r", "http://h:1", "--header", "NoColon"], 2, "--header"),
        (["--account", "acme", "r", "http://h:1", *["--tag=t"] * 11], 1, "tags"),
    ],
)
def test_runner_add_refuses_bad_input_in_one_line(
    migrated: str, capsys: pytest.CaptureFixture[str], argv: list[str], code: int, words: str
) -> None:
    run(capsys, "token", "create", "--account", "acme")
    got, out, err = run(capsys, "runner", "add", *argv)
    assert (got, out) == (code, "")
    assert_one_line_error(err, words)


def test_runner_list_of_an_unknown_account(
    migrated: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "runner", "list", "--account", "ghost")
    assert code == 1
    assert_one_line_error(err, "no account 'ghost'", "token create --account ghost")


# --- settings -------------------------------------------------------------------------------


def test_settings_lists_every_setting_and_masks_passwords(
    database_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = encryption.new_key()
    monkeypatch.setenv("COMFY_CANCEL_SECRET_KEY", secret)
    monkeypatch.setenv("COMFY_CANCEL_RESULT_BACKEND",
                       "redis://backend:6379/1?password=hunter3&db=1")
    get_settings.cache_clear()
    code, out, _ = run(capsys, "settings")
    assert code == 0
    assert "COMFY_CANCEL_REDIS_URL=redis://:***@127.0.0.1:6390/0" in out
    assert "COMFY_CANCEL_RESULT_BACKEND=redis://backend:6379/1?password=***&db=***" in out
    assert "COMFY_CANCEL_SECRET_KEY=***" in out
    assert "hunter2" not in out and "hunter3" not in out and secret not in out
    assert f"COMFY_CANCEL_DATABASE_URL={database_url}" in out
    for name, field in Settings.model_fields.items():
        assert f"COMFY_CANCEL_{name.upper()}=" in out
        assert (field.description or "").split()[0] in out


def test_an_invalid_setting_is_one_line_naming_the_variable(
    database_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COMFY_CANCEL_API_PORT", "eighty")
    get_settings.cache_clear()
    code, _, err = run(capsys, "settings")
    assert code == 1
    assert_one_line_error(err, "COMFY_CANCEL_API_PORT")


# --- command-line errors --------------------------------------------------------------------


@pytest.mark.parametrize("argv", [["bogus"], [], ["token"], ["token", "create"]])
def test_a_bad_command_line_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    code, out, err = run(capsys, *argv)
    assert (code, out) == (2, "")
    assert_one_line_error(err, "--help")


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "migrate" in out and "sim-comfyui" in out


def test_the_console_script_prints_no_traceback(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO),
           "COMFY_CANCEL_DATABASE_URL": f"sqlite:///{tmp_path / 'fresh.db'}"}
    result = subprocess.run(
        [sys.executable, "-m", "comfy_cancel.cli", "runner", "list", "--account", "acme"],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )
    assert result.returncode == 1
    assert_one_line_error(result.stderr, "comfy-cancel migrate")


# --- the process commands (their servers are not started) -----------------------------------


def test_worker_starts_celery_with_the_chosen_queues(
    database_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[list[str]] = []
    monkeypatch.setattr(tasks.app, "worker_main", calls.append)
    assert run(capsys, "worker", "--queues", "cancel, runner", "--concurrency", "8")[0] == 0
    assert calls == [["worker", "--queues=cancel,runner", "--loglevel=INFO", "--concurrency=8"]]
    code, _, err = run(capsys, "worker", "--queues", "cancel,nope")
    assert code == 1
    assert_one_line_error(err, "unknown queue nope")
    assert len(calls) == 1


def test_beat_runs_with_a_schedule_file_in_a_writable_dir(
    database_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    calls: list[list[str]] = []

    def start(argv: list[str]) -> None:
        calls.append(argv)

    monkeypatch.setattr(tasks.app, "start", start)
    schedule = tmp_path / "beat" / "schedule"
    assert run(capsys, "beat", "--schedule", str(schedule))[0] == 0
    assert calls == [["beat", f"--schedule={schedule}", "--loglevel=INFO"]]
    assert schedule.parent.is_dir()


def test_api_serves_the_app_on_the_given_address_in_its_processes(
    database_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import uvicorn
    from uvicorn.importer import import_from_string

    from comfy_cancel import api

    served: list[tuple[str, dict[str, Any]]] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: served.append((app, kwargs)))
    monkeypatch.setenv("COMFY_CANCEL_API_WORKERS", "3")
    assert run(capsys, "api", "--port", "9001")[0] == 0
    assert run(capsys, "api", "--workers", "1")[0] == 0
    (app, first), (_, second) = served
    # Each process builds the app itself, from the factory uvicorn imports.
    assert import_from_string(app) is api.create_app and first["factory"] is True
    options = ("host", "port", "workers", "log_level")
    assert [first[k] for k in options] == ["127.0.0.1", 9001, 3, "info"]
    assert [second[k] for k in options] == ["127.0.0.1", 8000, 1, "info"]
    assert first["log_config"]["root"]["level"] == "INFO"


def test_the_api_runs_a_process_per_core_by_default() -> None:
    assert Settings().api_workers == available_cores() == len(os.sched_getaffinity(0))


@pytest.mark.parametrize(("files", "limit"), [
    ({}, None),
    ({"cpu.max": "max 100000\n"}, None),
    ({"cpu.max": "150000 100000\n"}, 2),  # 1.5 cores of quota: 2 processes
    ({"cpu.max": "20000 100000\n"}, 1),
    ({"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1),
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
])
def test_a_containers_cpu_quota_bounds_the_cores(
    tmp_path: Path, files: dict[str, str], limit: int | None
) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    cores = len(os.sched_getaffinity(0))
    assert available_cores(tmp_path) == (cores if limit is None else min(cores, limit))


def test_sim_comfyui_delegates_its_options(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    received: list[list[str]] = []
    fake = types.ModuleType("comfy_cancel.embedded.comfyui_sim")
    def fake_main(argv: list[str]) -> int:
        received.append(argv)
        return 0

    fake.main = fake_main  # type: ignore[attr-defined]
    # Both places an import looks, in case the real module was imported earlier.
    monkeypatch.setitem(sys.modules, "comfy_cancel.embedded.comfyui_sim", fake)
    monkeypatch.setattr(comfy_cancel.embedded, "comfyui_sim", fake, raising=False)
    assert run(capsys, "sim-comfyui", "--port", "8190", "--time-scale", "0.5",
               "--no-jobs-api")[0] == 0
    assert received == [["--port", "8190", "--time-scale", "0.5", "--no-jobs-api"]]


# --- typed options --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        (["api", "--port", "0"], "--port"),
        (["api", "--port", "65536"], "--port"),
        (["sim-comfyui", "--time-scale", "0"], "--time-scale"),
        (["sim-comfyui", "--time-scale", "fast"], "--time-scale"),
        (["dev", "--port", "-1"], "--port"),
        (["demo", "--time-scale", "-2"], "--time-scale"),
        (["worker", "--concurrency", "0"], "--concurrency"),
        (["token", "create", "--account", "   "], "--account"),
        (["token", "create", "--account", "a" * 201], "--account"),
        (["bulk-cancel", "--older-than", "3x"], "--older-than"),
        (["bulk-cancel", "--account", "a", "--wait", "-5s"], "--wait"),
        (["bulk-cancel", "--ids-file", "/no/such/ids.txt"], "--ids-file"),
        (["runner", "add", "--account", "a", "r"], "URL"),
        (["bulk-cancel", "--dry"], "--dry-run"),  # click suggests the close match
    ],
)
def test_a_refused_option_value_is_one_line_naming_the_option_and_exit_2(
    capsys: pytest.CaptureFixture[str], argv: list[str], option: str
) -> None:
    code, out, err = run(capsys, *argv)
    assert (code, out) == (2, "")
    assert_one_line_error(err, option, f"`comfy-cancel {argv[0]}")


def test_every_command_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    commands = [[name] for name in cli.root.commands if name != "bench"] + [
        ["token", "create"], ["runner", "add"], ["runner", "list"], ["runner", "new-key"],
        ["runner", "reseal"]]
    for argv in commands:
        code, out, err = run(capsys, *argv, "--help")
        assert (code, err) == (0, ""), argv
        assert out.startswith(f"Usage: comfy-cancel {' '.join(argv)} "), out
    code, out, _ = run(capsys, "-h")
    assert code == 0 and out.startswith("Usage: comfy-cancel ")


def test_the_dev_options_reach_the_stack_typed(
    database_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    from comfy_cancel.embedded import dev

    seen: list[Any] = []

    def fake_main(args: Any, settings: Settings) -> int:
        seen.append(vars(args))
        return 0

    monkeypatch.setattr(dev, "main", fake_main)
    assert run(capsys, "dev", "--data-dir", str(tmp_path), "--time-scale", "0.5")[0] == 0
    assert run(capsys, "dev")[0] == 0
    assert seen == [
        {"port": None, "comfyui_port": 0, "data_dir": tmp_path, "time_scale": 0.5},
        {"port": None, "comfyui_port": 0, "data_dir": Path(".comfy-cancel"), "time_scale": 1.0},
    ]


def test_bench_hands_every_argument_to_the_suite(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import bench.suite

    received: list[list[str]] = []

    def fake_main(argv: list[str]) -> int:
        received.append(argv)
        return 0

    monkeypatch.setattr(bench.suite, "main", fake_main)
    assert run(capsys, "bench", "--quick", "--help", "x")[0] == 0
    assert received == [["--quick", "--help", "x"]]


def test_an_unexpected_error_is_one_line_and_debug_shows_the_traceback(
    database_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(url: str) -> None:
        raise RuntimeError("disk on fire")

    import comfy_cancel.migrations

    monkeypatch.setattr(comfy_cancel.migrations, "upgrade", broken)
    code, _, err = run(capsys, "migrate")
    assert code == 1
    assert_one_line_error(err, "unexpected RuntimeError: disk on fire", "--debug")
    with pytest.raises(RuntimeError, match="disk on fire"):
        cli.main(["--debug", "migrate"])


# --- bulk-cancel: ids from stdin, the confirmation, the progress bar --------------------------


@pytest.fixture
def seeded(migrated: str) -> dict[str, str]:
    """Two workflows a bulk cancel matches without a broker: one not yet queued, one done."""
    db = Database.from_url(migrated)
    account_id, runner_id = make_account_and_runner(db)
    return {
        "accepted": seed_workflow(db, account_id, runner_id, WorkflowStatus.ACCEPTED),
        "completed": seed_workflow(db, account_id, runner_id, WorkflowStatus.COMPLETED),
    }


def test_bulk_cancel_reads_ids_from_stdin(
    seeded: dict[str, str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    lines = ["# from a report", seeded["accepted"], "", seeded["completed"],
             seeded["accepted"], "wf-nope"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))
    code, out, err = run(capsys, "bulk-cancel", "--ids-file", "-", "--dry-run", "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert (summary["matched"], summary["not_found"]) == (2, 1)
    assert summary["by_status"] == {"accepted": 1, "completed": 1}
    assert sorted(summary["sample"]) == sorted(seeded.values())


def test_bulk_cancel_names_what_to_cancel_and_known_statuses(
    migrated: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "bulk-cancel", "--yes")
    assert code == 1
    assert_one_line_error(err, "refusing to cancel everything")
    code, _, err = run(capsys, "bulk-cancel", "--status", "queued,lost", "--yes")
    assert code == 1
    assert_one_line_error(err, "unknown status lost")


def cli_env(database_url: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "COMFY_CANCEL_DATABASE_URL": database_url,
            "PYTHONUNBUFFERED": "1"}


def test_bulk_cancel_without_a_terminal_asks_for_yes(
    seeded: dict[str, str], migrated: str
) -> None:
    # A new session has no controlling terminal: nobody to ask.
    result = subprocess.run(
        [sys.executable, "-m", "comfy_cancel.cli", "bulk-cancel", "--ids-file", "-"],
        input="\n".join(seeded.values()), capture_output=True, text=True,
        env=cli_env(migrated), timeout=60, check=False, start_new_session=True,
    )
    assert (result.returncode, result.stdout) == (1, "")
    assert_one_line_error(result.stderr, "no terminal to confirm on", "--yes")


def on_a_terminal(argv: list[str], stdin: str, answer: str, env: dict[str, str]
                  ) -> tuple[int, str, str]:
    """Run the CLI with stdin from a pipe and a pseudo-terminal as its controlling terminal
    and stderr, as an operator piping ids in does; type ``answer`` at the prompt. Returns
    the exit code, stdout, and what the terminal showed."""
    leader, follower = pty.openpty()

    def own_the_terminal() -> None:  # in the child, after setsid: stderr becomes its tty
        fcntl.ioctl(2, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen(
        [sys.executable, "-m", "comfy_cancel.cli", *argv], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=follower, env=env, start_new_session=True,
        preexec_fn=own_the_terminal,
    )
    os.close(follower)
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(stdin.encode())
    proc.stdin.close()
    shown, answered = b"", False
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if not answered and b"[y/N]" in shown:
            os.write(leader, answer.encode() + b"\n")
            answered = True
        if io_select.select([leader], [], [], 0.2)[0]:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            shown += chunk
        elif proc.poll() is not None:
            break
    os.close(leader)
    code = proc.wait(30)
    return code, proc.stdout.read().decode(), shown.decode(errors="replace")


def test_bulk_cancel_confirms_on_the_terminal_while_ids_come_through_stdin(
    seeded: dict[str, str], migrated: str
) -> None:
    argv = ["bulk-cancel", "--ids-file", "-"]
    ids = "\n".join(seeded.values())
    code, out, shown = on_a_terminal(argv, ids, "n", cli_env(migrated))
    assert (code, out) == (1, ""), shown
    assert "cancel 2 workflows ({'accepted': 1, 'completed': 1})? [y/N]:" in shown
    assert "comfy-cancel: error: not confirmed; nothing was changed" in shown

    code, out, shown = on_a_terminal(argv, ids, "y", cli_env(migrated))
    assert code == 0, shown
    assert "not cancellable: 1\nnot found: 0" in out and "already terminal: 1" in out
    # click's progress bar, drawn on the terminal only.
    assert "cancelling" in shown and "2/2" in shown
    assert "cancelling" not in out
