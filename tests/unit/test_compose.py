"""docker-compose.yml and the Dockerfile, checked without a Docker engine: what they name
must exist in the code (subcommands, settings, queues, modules), and the deployment must
keep the properties the design asks for (health checks, a Redis that never drops a message)."""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from comfy_cancel import cli, worker
from comfy_cancel.config import ENV_PREFIX, Settings

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
LONG_RUNNING = {"redis", "postgres", "api", "worker", "runner", "beat", "comfyui-sim"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return dict(compose["services"])


def argv(command: str | list[str]) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else [str(a) for a in command]


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # the "KEY=value" form
        return dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def healthcheck_argv(service: dict[str, Any]) -> list[str]:
    test = service["healthcheck"]["test"]
    if isinstance(test, str):
        return shlex.split(test)
    kind, *rest = test
    return shlex.split(rest[0]) if kind == "CMD-SHELL" else rest


def comfy_cancel_commands(services: dict[str, dict[str, Any]]) -> list[tuple[str, list[str]]]:
    found = []
    for name, service in services.items():
        for command in (service.get("command"), service.get("entrypoint")):
            if command and argv(command)[0] == "comfy-cancel":
                found.append((name, argv(command)))
        if "healthcheck" in service and healthcheck_argv(service)[:1] == ["comfy-cancel"]:
            found.append((name, healthcheck_argv(service)))
    return found


def test_the_deployment_has_every_part_of_the_system(services: dict[str, Any]) -> None:
    started = {name for name, service in services.items() if not service.get("profiles")}
    assert started == LONG_RUNNING | {"migrate"}


def test_flower_is_opt_in_on_the_compose_redis_and_on_loopback_only(
    services: dict[str, Any],
) -> None:
    flower = services["flower"]
    assert flower["profiles"] == ["flower"]
    broker = environment(flower)["CELERY_BROKER_URL"]
    assert broker.startswith("redis://:${REDIS_PASSWORD:?") and broker.endswith("@redis:6379/0")
    assert all(str(p).startswith("127.0.0.1:") for p in flower["ports"])


def test_each_worker_serves_its_metrics_to_the_compose_network(
    services: dict[str, Any],
) -> None:
    for name in ("worker", "runner"):
        env = environment(services[name])
        assert env[f"{ENV_PREFIX}METRICS_HOST"] == "0.0.0.0", name
        assert [str(p) for p in services[name]["expose"]] == [env[f"{ENV_PREFIX}METRICS_PORT"]]


def parse(command: list[str]) -> tuple[click.Command, dict[str, Any]]:
    """The command a ``comfy-cancel ...`` line names and its options, parsed by the real
    CLI without running it; click.UsageError when the CLI refuses the line."""
    command_group: click.Command = cli.root
    args, parent = command[1:], None
    while isinstance(command_group, click.Group):
        parent = click.Context(command_group, info_name=command[0], parent=parent)
        name, found, args = command_group.resolve_command(parent, args)
        assert name is not None and found is not None
        command_group = found
    return command_group, command_group.make_context(name, args, parent=parent).params


def test_every_service_has_a_healthcheck(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        check = service.get("healthcheck")
        assert check and not check.get("disable"), f"{name} has no healthcheck"
        assert healthcheck_argv(service), f"{name}'s healthcheck runs nothing"


def test_every_comfy_cancel_command_parses_with_the_real_cli(
    services: dict[str, dict[str, Any]],
) -> None:
    commands = comfy_cancel_commands(services)
    assert {name for name, _ in commands} >= LONG_RUNNING - {"redis", "postgres"} | {"migrate"}
    for name, command in commands:
        try:
            parse(command)
        except click.UsageError as exc:
            pytest.fail(f"{name}: `{shlex.join(command)}` is refused by the CLI: {exc}")


def test_the_workers_consume_every_queue_and_only_real_ones(
    services: dict[str, dict[str, Any]],
) -> None:
    consumed: set[str] = set()
    for _name, command in comfy_cancel_commands(services):
        parsed, options = parse(command)
        if parsed is cli.cmd_worker:
            queues = {q.strip() for q in options["queues"].split(",")}
            assert queues <= set(worker.ALL_QUEUES), queues
            consumed |= queues
    assert consumed == set(worker.ALL_QUEUES)
    # Customers' cancels never wait behind a workflow: the runner queue has its own service.
    runner_queues = {q for q in argv(services["runner"]["command"]) if "runner" in q}
    assert runner_queues == {"runner"}


def test_every_setting_variable_is_a_real_setting(compose: dict[str, Any]) -> None:
    fields = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    named = set(re.findall(rf"{ENV_PREFIX}[A-Z0-9_]+", COMPOSE.read_text()))
    assert named, "the compose file configures nothing through settings"
    assert named <= fields, f"not settings: {sorted(named - fields)}"
    for name, service in compose["services"].items():
        for key in environment(service):
            if key.startswith(ENV_PREFIX):
                assert key in fields, f"{name}: {key} is not a setting"


def test_the_app_talks_to_the_compose_redis_and_postgres(
    services: dict[str, dict[str, Any]],
) -> None:
    for name in ("migrate", "api", "worker", "runner", "beat"):
        env = environment(services[name])
        assert env[f"{ENV_PREFIX}DATABASE_URL"].startswith("postgresql+psycopg://"), name
        assert "@postgres:5432/" in env[f"{ENV_PREFIX}DATABASE_URL"], name
        assert env[f"{ENV_PREFIX}REDIS_URL"].startswith(
            "redis://:${REDIS_PASSWORD:?"), name
        assert env[f"{ENV_PREFIX}REDIS_URL"].endswith("@redis:6379/0"), name
    assert environment(services["api"])[f"{ENV_PREFIX}API_HOST"] == "0.0.0.0"


def test_redis_keeps_every_message(services: dict[str, dict[str, Any]]) -> None:
    redis = services["redis"]
    assert str(redis["image"]).startswith("redis:7")
    command = " ".join(argv(redis["command"]))
    assert "--appendonly yes" in command
    assert "--maxmemory-policy noeviction" in command
    assert redis.get("volumes"), "the append-only file must outlive the container"


def test_services_start_in_order(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        for dependency, rule in (service.get("depends_on") or {}).items():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            condition = rule["condition"]
            if dependency == "migrate":
                assert condition == "service_completed_successfully", name
            else:
                assert condition == "service_healthy", f"{name} -> {dependency}"
    for name in ("api", "worker", "runner", "beat"):
        assert set(services[name]["depends_on"]) == {"redis", "postgres", "migrate"}, name
    assert set(services["migrate"]["depends_on"]) == {"postgres"}
    assert services["migrate"]["restart"] == "no"


def test_healthchecks_use_modules_and_routes_that_exist(
    services: dict[str, dict[str, Any]],
) -> None:
    for name in ("worker", "runner"):
        check = healthcheck_argv(services[name])
        assert check[:2] == ["celery", "-A"], name
        assert importlib.util.find_spec(check[2]) is not None, check[2]
        assert "ping" in check
    from comfy_cancel.api import create_app

    paths = set(create_app(Settings()).openapi()["paths"])
    api_check = " ".join(healthcheck_argv(services["api"]))
    checked = re.findall(r"127\.0\.0\.1:\d+(/[a-z_]+)", api_check)
    assert checked and set(checked) <= paths, (checked, sorted(paths))
    assert "/system_stats" in " ".join(healthcheck_argv(services["comfyui-sim"]))


def test_the_image_is_python_3_11_or_newer_and_not_root() -> None:
    lines = [ln.strip() for ln in DOCKERFILE.read_text().splitlines()
             if ln.strip() and not ln.strip().startswith("#")]
    base = next(ln for ln in lines if ln.upper().startswith("FROM "))
    match = re.match(r"FROM\s+(?:--platform=\S+\s+)?python:(\d+)\.(\d+)", base, re.IGNORECASE)
    assert match, f"not a python base image: {base}"
    assert (int(match[1]), int(match[2])) >= (3, 11), base
    users = [ln.split(None, 1)[1] for ln in lines if ln.upper().startswith("USER ")]
    assert users and users[-1] not in ("root", "0"), "the image must not run as root"
    assert any(re.search(r"pip install\b.*\s\.(\s|$)", ln) for ln in lines), "installs the package"


def test_no_password_has_a_default_and_redis_requires_one(
    services: dict[str, dict[str, Any]],
) -> None:
    text = COMPOSE.read_text()
    # ${VAR:?message} refuses to start without VAR; ${VAR:-word} would be a default password.
    for variable in ("POSTGRES_PASSWORD", "REDIS_PASSWORD"):
        assert f"${{{variable}:?" in text, variable
        assert not re.search(rf"\$\{{{variable}(:?-|-)", text), f"{variable} has a default"
    assert environment(services["postgres"])["POSTGRES_PASSWORD"].startswith(
        "${POSTGRES_PASSWORD:?")
    redis = services["redis"]
    assert environment(redis)["REDISCLI_AUTH"].startswith("${REDIS_PASSWORD:?")
    command = " ".join(argv(redis["command"]))
    assert '--requirepass "$$REDISCLI_AUTH"' in command  # $$: compose's escape for $
    # The health check authenticates through REDISCLI_AUTH, not an argument.
    assert healthcheck_argv(redis) == ["redis-cli", "ping"]


def test_the_cancel_worker_service_is_what_the_cli_default_starts(
    services: dict[str, dict[str, Any]],
) -> None:
    _, options = parse(argv(services["worker"]["command"]))
    _, default = parse(["comfy-cancel", "worker"])
    assert options["queues"] == default["queues"] == ",".join(worker.CANCEL_QUEUES)


def test_the_api_is_published_on_loopback_only(services: dict[str, dict[str, Any]]) -> None:
    """Plain HTTP: reachable from the host, not from the network, until a proxy fronts it."""
    ports = services["api"]["ports"]
    assert ports and all(str(p).startswith("127.0.0.1:") for p in ports), ports


def test_the_api_runs_a_process_per_core_unless_told_otherwise(
    services: dict[str, dict[str, Any]],
) -> None:
    parsed, options = parse(argv(services["api"]["command"]))
    assert parsed is cli.cmd_api and options["workers"] is None  # COMFY_CANCEL_API_WORKERS
    # No value: compose passes the operator's variable through, or leaves it unset.
    env = services["api"]["environment"]
    assert f"{ENV_PREFIX}API_WORKERS" in env and env[f"{ENV_PREFIX}API_WORKERS"] is None
