"""The ``comfy-cancel`` command: set up the database, tokens and runners; run each process.

Built on click: typed options, ``-`` for stdin, its progress bar and confirmation prompt.
Every failure a user can fix is one line on stderr, ``comfy-cancel: error: ...``, saying
what to do next, and exit code 1 (2 for a command line click refuses). Heavy imports
(Celery, FastAPI, uvicorn) happen inside the commands that need them.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import textwrap
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import click
from pydantic import ValidationError
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session

from comfy_cancel import manager
from comfy_cancel.config import ENV_PREFIX, Settings, get_settings
from comfy_cancel.db import Database
from comfy_cancel.egress import EgressDenied
from comfy_cancel.encryption import SecretKeyError
from comfy_cancel.models import CancelSource, WorkflowStatus, utcnow
from comfy_cancel.redact import redact_setting, redact_url
from comfy_cancel.schemas import RunnerCreate, RunnerView, error_message

if TYPE_CHECKING:
    from celery import Celery

PROG = "comfy-cancel"
# prometheus_client's multiprocess directory (comfy_cancel.metrics), named here so that
# setting it imports nothing.
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
INT32_MAX = 2**31 - 1  # the database's integer columns


class CliError(click.ClickException):
    """A failure the user can fix; printed as one line, exit code 1."""

    exit_code = 1


def _settings() -> Settings:
    try:
        return get_settings()
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        name = ENV_PREFIX + "_".join(str(p) for p in first["loc"]).upper()
        raise CliError(f"invalid setting {name}: {first['msg']}; fix the variable") from exc


# --- option types --------------------------------------------------------------------------


class AccountName(click.ParamType):
    name = "NAME"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> str:
        name = str(value).strip()
        if not 1 <= len(name) <= 200:
            self.fail("an account name has 1 to 200 characters", param, ctx)
        return name


class Header(click.ParamType):
    name = "'NAME: VALUE'"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> tuple[str, str]:
        if isinstance(value, tuple):
            return value
        name, sep, header_value = str(value).partition(":")
        if not sep or not name.strip():
            self.fail(f"{value!r} is not 'Name: value'", param, ctx)
        return name.strip(), header_value.strip()


class Duration(click.ParamType):
    """``90s``, ``30m``, ``2h``, ``1d`` or plain seconds, as seconds."""

    name = "duration"
    UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> float:
        if isinstance(value, int | float):
            seconds = float(value)
        else:
            text = str(value).strip().lower()
            unit = self.UNITS.get(text[-1:])
            try:
                seconds = float(text[:-1] if unit else text) * (unit or 1)
            except ValueError:
                self.fail(f"{value!r} is not a duration; use e.g. 90s, 30m, 2h or 1d",
                          param, ctx)
        if seconds < 0:
            self.fail("a duration cannot be negative", param, ctx)
        return seconds


ACCOUNT = AccountName()
DURATION = Duration()
PORT = click.IntRange(1, 65535)
PORT_OR_FREE = click.IntRange(0, 65535)  # 0: the OS picks a free one
POSITIVE = click.IntRange(min=1)
TIME_SCALE = click.FloatRange(min=0, min_open=True)


def _first_paragraph(command: click.Command) -> str:
    # The list of commands shows each one's whole first paragraph, not a truncated one.
    return command.short_help or (command.help or "").split("\n\n")[0]


class _Command(click.Command):
    def get_short_help_str(self, limit: int = 45) -> str:
        return _first_paragraph(self)


class _Group(click.Group):
    """Lists its commands whole and in the order they were added (related ones together)."""

    command_class = _Command
    group_class = type  # subgroups are of this class too

    def get_short_help_str(self, limit: int = 45) -> str:
        return _first_paragraph(self)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)


@click.group(
    name=PROG, cls=_Group, no_args_is_help=False,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    help="Cancellation for ComfyUI workflows: API, workers, runners and tools. "
    f"Settings come from {ENV_PREFIX}* variables (`{PROG} settings` lists them).",
)
@click.option("--debug", is_flag=True, help="show the traceback of an unexpected error")
def root(debug: bool) -> None:
    # main() reads --debug from the context to decide how an unexpected error is shown.
    pass


# --- migrate -------------------------------------------------------------------------------


@root.command("migrate", help="create or upgrade the database schema")
def cmd_migrate() -> None:
    from comfy_cancel.migrations import upgrade

    settings = _settings()
    upgrade(settings.database_url)
    click.echo(f"migrated {redact_url(settings.database_url)} to the latest schema")


# --- tokens --------------------------------------------------------------------------------


@root.group("token", no_args_is_help=False, help="API tokens")
def token() -> None:
    pass


@token.command("create", help="create a token (creating the account if needed)")
@click.option("--account", required=True, type=ACCOUNT)
@click.option("--operator", is_flag=True, help="may call operator routes")
@click.option("--expires-in-days", type=POSITIVE, metavar="N",
              help="default: COMFY_CANCEL_TOKEN_DEFAULT_TTL_DAYS (unset: never)")
@click.option("--rate-limit", type=click.IntRange(0, INT32_MAX), metavar="N",
              help="requests per rate-limit window for this token, 0 for none "
              "(default: COMFY_CANCEL_RATE_LIMIT_REQUESTS)")
def cmd_token_create(
    account: str, operator: bool, expires_in_days: int | None, rate_limit: int | None
) -> None:
    settings = _settings()
    days = expires_in_days or settings.token_default_ttl_days
    expires_at = utcnow() + timedelta(days=days) if days else None
    with Database.from_url(settings.database_url).transaction() as session:
        owner = manager.get_or_create_account(session, account)
        secret = manager.create_token(
            session, owner, operator=operator, expires_at=expires_at, rate_limit=rate_limit
        )
    click.echo(secret)
    kind = "operator token" if operator else "token"
    expiry = f"expires {expires_at:%Y-%m-%d %H:%M} UTC" if expires_at else "never expires"
    if rate_limit is None:
        limit = f"default rate limit, {settings.rate_limit_requests}"
    elif rate_limit == 0:
        limit = "no rate limit"
    else:
        limit = f"rate limit {rate_limit}"
    if rate_limit != 0:
        limit += f" requests per {settings.rate_limit_window_seconds} s"
    click.echo(
        f"{kind} for account {account!r} ({expiry}, {limit}); it is shown only once: "
        "store it now",
        err=True,
    )


# --- runners -------------------------------------------------------------------------------


@root.group("runner", no_args_is_help=False, help="ComfyUI runners")
def runner() -> None:
    pass


def _account_id(session: Session, name: str) -> int:
    account = manager.get_account(session, name)
    if account is None:
        raise CliError(
            f"no account {name!r}; create it (and a token) with "
            f"`{PROG} token create --account {name}`"
        )
    return account.id


@runner.command("add", help="add a runner to an account; prints its id")
@click.option("--account", required=True, type=ACCOUNT)
@click.argument("runner_name", metavar="RUNNER_NAME")
@click.argument("url", metavar="URL")
@click.option("--tag", multiple=True, help="repeat for several tags")
@click.option("--header", multiple=True, type=Header(),
              help="sent on every call; repeat for several")
def cmd_runner_add(
    account: str, runner_name: str, url: str, tag: tuple[str, ...],
    header: tuple[tuple[str, str], ...],
) -> None:
    try:
        new = RunnerCreate.model_validate(
            {"name": runner_name, "endpoint_url": url, "headers": dict(header), "tags": tag}
        )
    except ValidationError as exc:
        raise CliError(f"invalid runner {error_message(exc)}") from exc
    try:
        with Database.from_url(_settings().database_url).transaction() as session:
            added = manager.add_runner(
                session,
                _account_id(session, account),
                name=new.name,
                endpoint_url=new.endpoint_url,
                headers=new.headers,
                tags=new.tags,
                status=new.status.value,
            )
    except EgressDenied as exc:
        raise CliError(f"invalid runner endpoint_url: {exc}") from exc
    click.echo(added.id)


@runner.command("list", help="list an account's runners")
@click.option("--account", required=True, type=ACCOUNT)
def cmd_runner_list(account: str) -> None:
    with Database.from_url(_settings().database_url).transaction() as session:
        runners = manager.list_runners(session, _account_id(session, account))
        views = [RunnerView.of(r) for r in runners]
    if not views:
        click.echo(f"account {account!r} has no runners; add one with `{PROG} runner add`",
                   err=True)
        return
    click.echo("id\tstatus\tname\tendpoint_url\ttags\theaders")
    for view in views:
        click.echo("\t".join([view.id, view.status.value, view.name, view.endpoint_url,
                              ",".join(view.tags), ",".join(view.headers)]))


@runner.command(
    "new-key", help="print a new key for COMFY_CANCEL_SECRET_KEY (runner header encryption)"
)
def cmd_runner_new_key() -> None:
    from comfy_cancel.encryption import SECRET_KEY_SETTING, new_key

    click.echo(new_key())
    click.echo(f"a new key for {SECRET_KEY_SETTING}: keep it secret, and keep it (headers "
               "encrypted with it are lost without it); to rotate, put it first and the old "
               f"one after it, then run `{PROG} runner reseal`", err=True)


@runner.command(
    "reseal", help="encrypt every runner's headers again with the newest key (rotation)"
)
def cmd_runner_reseal() -> None:
    with Database.from_url(_settings().database_url).transaction() as session:
        resealed, unreadable = manager.reseal_runner_headers(session)
    click.echo(f"resealed the headers of {resealed} runners with the newest key")
    if unreadable:
        raise CliError(
            f"{len(unreadable)} runners' headers open with no configured key "
            f"({', '.join(unreadable[:5])}); add the key they were encrypted with and rerun"
        )


# --- settings ------------------------------------------------------------------------------


@root.command("settings", help="print every setting, its variable and meaning")
def cmd_settings() -> None:
    settings = _settings()
    for name, field in Settings.model_fields.items():
        shown = redact_setting(name, getattr(settings, name))
        click.echo(f"{ENV_PREFIX}{name.upper()}={shown}")
        click.echo(textwrap.fill(field.description or "", width=96, initial_indent="    ",
                                 subsequent_indent="    "))


# --- processes -----------------------------------------------------------------------------


@root.command("api", help="run the HTTP API")
@click.option("--host", help="default: COMFY_CANCEL_API_HOST")
@click.option("--port", type=PORT, metavar="PORT", help="default: COMFY_CANCEL_API_PORT")
@click.option("--workers", type=POSITIVE, metavar="N",
              help="processes serving the API (default: COMFY_CANCEL_API_WORKERS, the cores)")
def cmd_api(host: str | None, port: int | None, workers: int | None) -> None:
    import uvicorn

    settings = _settings()
    processes = workers or settings.api_workers
    if processes > 1 and settings.api_metrics:
        _multiprocess_metrics()
    # Each process builds the app from the environment's settings, the ones checked above.
    uvicorn.run(
        "comfy_cancel.api:create_app",
        factory=True,
        workers=processes,
        host=host or settings.api_host,
        port=port or settings.api_port,
        log_level=settings.log_level.lower(),
        log_config=_api_log_config(settings.log_level.upper(), settings.log_format),
    )


def _multiprocess_metrics() -> None:
    """Several API processes: each keeps its metrics in files of one directory, and any of
    them answers /metrics with the sum (prometheus_client's multiprocess mode). The
    operator's PROMETHEUS_MULTIPROC_DIR, emptied, or a new temporary one, removed at exit.
    Set before any API process imports prometheus_client (it chooses its store then)."""
    import atexit
    import shutil

    path = os.environ.get(MULTIPROCESS_ENV)
    if not path:
        path = os.environ[MULTIPROCESS_ENV] = tempfile.mkdtemp(prefix=f"{PROG}-metrics-")
        atexit.register(shutil.rmtree, path, True)
    from comfy_cancel.metrics import clear_multiprocess_dir  # with the variable set

    os.makedirs(path, exist_ok=True)
    clear_multiprocess_dir(path)


def _api_log_config(level: str, log_format: str = "text") -> dict[str, Any]:
    """uvicorn's logging, and the API's own warnings beside it, in every API process
    (uvicorn applies this in each process it starts); JSON lines for every logger with
    ``log_format`` json."""
    from uvicorn.config import LOGGING_CONFIG

    from comfy_cancel.logs import json_log_config

    config: dict[str, Any] = copy.deepcopy(LOGGING_CONFIG)
    config["formatters"]["app"] = {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}
    config["handlers"]["app"] = {"class": "logging.StreamHandler", "formatter": "app",
                                 "stream": "ext://sys.stderr"}
    config["root"] = {"handlers": ["app"], "level": level}
    return json_log_config(config) if log_format == "json" else config


def _celery_app() -> Celery:
    # Importing tasks first registers them and sidesteps the cycle worker -> tasks -> worker
    # that importing comfy_cancel.worker on its own runs into.
    from comfy_cancel import tasks

    return tasks.app


CANCEL_QUEUES = "cancel,cancel.bulk,cancel.sweep"


@root.command("worker", help="run a Celery worker (cancel or runner tasks)")
# The cancel queues only: an operator starting "a cancel worker" must not get a runner.
@click.option("--queues", default=CANCEL_QUEUES, show_default=False,
              help=f"comma-separated (default: {CANCEL_QUEUES}, a cancel worker; "
              "'runner' for a runner worker)")
@click.option("--concurrency", type=POSITIVE, metavar="N",
              help="threads (default: COMFY_CANCEL_RUNNER_CONCURRENCY)")
@click.option("--loglevel", help="default: COMFY_CANCEL_LOG_LEVEL")
@click.option("--metrics-port", type=PORT, metavar="PORT",
              help="serve Prometheus metrics on http://COMFY_CANCEL_METRICS_HOST:PORT/metrics "
              "(default: COMFY_CANCEL_METRICS_PORT; unset: none)")
def cmd_worker(
    queues: str, concurrency: int | None, loglevel: str | None, metrics_port: int | None
) -> None:
    if metrics_port is not None:
        # The worker reads its settings when it starts (comfy_cancel.worker.on_worker_init).
        os.environ[f"{ENV_PREFIX}METRICS_PORT"] = str(metrics_port)
        get_settings.cache_clear()
    app = _celery_app()
    from comfy_cancel.worker import ALL_QUEUES

    chosen = [q.strip() for q in queues.split(",") if q.strip()]
    unknown = sorted(set(chosen) - set(ALL_QUEUES))
    if not chosen or unknown:
        raise CliError(
            f"unknown queue {','.join(unknown) or '(none)'}; choose from {','.join(ALL_QUEUES)}"
        )
    argv = ["worker", f"--queues={','.join(chosen)}",
            f"--loglevel={loglevel or _settings().log_level}"]
    if concurrency:
        argv.append(f"--concurrency={concurrency}")
    app.worker_main(argv)


@root.command("beat", help="run Celery beat (the periodic sweeps)")
@click.option("--schedule", type=click.Path(dir_okay=False, path_type=Path),
              help="beat's state file (default: under the temp dir)")
@click.option("--loglevel", help="default: COMFY_CANCEL_LOG_LEVEL")
def cmd_beat(schedule: Path | None, loglevel: str | None) -> int:
    app = _celery_app()
    # Beat keeps its last-run times in a file; the working directory may not be writable.
    state = schedule or Path(tempfile.gettempdir(), PROG, "celerybeat-schedule")
    state.parent.mkdir(parents=True, exist_ok=True)
    return int(app.start(["beat", f"--schedule={state}",
                          f"--loglevel={loglevel or _settings().log_level}"]) or 0)


@root.command("sim-comfyui", help="run the simulated ComfyUI server")
@click.option("--host", help="default: 127.0.0.1")
@click.option("--port", type=PORT, metavar="PORT", help="default: 8188")
@click.option("--time-scale", type=TIME_SCALE, metavar="F",
              help="multiplies every node's simulated time")
@click.option("--no-jobs-api", is_flag=True,
              help="behave like a ComfyUI without /api/jobs (the older cancel forms)")
def cmd_sim_comfyui(
    host: str | None, port: int | None, time_scale: float | None, no_jobs_api: bool
) -> int:
    from comfy_cancel.embedded import comfyui_sim

    argv: list[str] = []
    if host is not None:
        argv += ["--host", host]
    if port is not None:
        argv += ["--port", str(port)]
    if time_scale is not None:
        argv += ["--time-scale", str(time_scale)]
    if no_jobs_api:
        argv.append("--no-jobs-api")
    return int(comfyui_sim.main(argv) or 0)


# --- the embedded stack --------------------------------------------------------------------


def _run_embedded(run: Callable[[argparse.Namespace, Settings], int], **options: Any) -> int:
    from comfy_cancel.embedded.errors import StackError

    settings = _settings()
    try:
        # dev.main and demo.main read their options as attributes of a namespace.
        return run(argparse.Namespace(**options), settings)
    except StackError as exc:
        raise CliError(str(exc)) from exc


@root.command(
    "dev",
    short_help="run the whole stack on this machine: Redis, SQLite, API, workers, beat "
    "and a simulated ComfyUI (Ctrl-C stops it)",
    help="Run the whole stack on this machine: Redis, SQLite, API, workers, beat and a "
    "simulated ComfyUI (Ctrl-C stops it).\n\n"
    "Redis: COMFY_CANCEL_REDIS_URL when set, else an embedded redis-server "
    "(AOF in DIR/redis). Database: COMFY_CANCEL_DATABASE_URL when set, else DIR/"
    "comfy_cancel.db. The simulated ComfyUI is runner 'sim' of account 'demo'; the token "
    "printed (kept in DIR/token) is that account's. Logs: DIR/logs/NAME.log.",
)
@click.option("--port", type=PORT_OR_FREE, metavar="PORT",
              help="API port (default: COMFY_CANCEL_API_PORT; 0 picks a free one)")
@click.option("--comfyui-port", type=PORT_OR_FREE, default=0, metavar="PORT",
              help="port of the simulated ComfyUI (default: a free one)")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path(".comfy-cancel"), metavar="DIR", show_default=True,
              help="Redis data, SQLite database, token and logs")
@click.option("--time-scale", type=TIME_SCALE, default=1.0, metavar="F", show_default=True,
              help="multiplies the simulated ComfyUI's node times")
def cmd_dev(port: int | None, comfyui_port: int, data_dir: Path, time_scale: float) -> int:
    from comfy_cancel.embedded import dev

    return _run_embedded(dev.main, port=port, comfyui_port=comfyui_port, data_dir=data_dir,
                         time_scale=time_scale)


@root.command(
    "demo", help="start the stack, show each way a cancel can end, stop (about a minute)"
)
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), metavar="DIR",
              help="where the stack keeps its data (default: a temporary dir, "
              "deleted afterwards)")
@click.option("--port", type=PORT_OR_FREE, default=0, metavar="PORT",
              help="API port (default: a free one)")
@click.option("--time-scale", type=TIME_SCALE, default=1.0, metavar="F", show_default=True,
              help="multiplies the simulated ComfyUI's node times")
@click.option("--keep-running", is_flag=True,
              help="leave the stack up afterwards, until Ctrl-C")
def cmd_demo(data_dir: Path | None, port: int, time_scale: float, keep_running: bool) -> int:
    from comfy_cancel.embedded import demo

    return _run_embedded(demo.main, data_dir=data_dir, port=port, time_scale=time_scale,
                         keep_running=keep_running)


# --- operations: bulk cancels and sweeps ------------------------------------------------


def _read_ids(lines: IO[str]) -> list[str]:
    ids = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    return list(dict.fromkeys(ids))


@contextmanager
def _terminal_input() -> Iterator[None]:
    """Point stdin at the terminal while click asks: the ids may have come through stdin
    (``--ids-file -``), and the answer must come from the person, not from the pipe."""
    try:
        tty = open("/dev/tty", encoding="utf-8")  # noqa: SIM115
    except OSError:
        if not sys.stdin.isatty():
            raise CliError("no terminal to confirm on; pass --yes to go ahead") from None
        yield
        return
    stdin, sys.stdin = sys.stdin, tty
    try:
        yield
    finally:
        sys.stdin = stdin
        tty.close()


def _confirm(question: str) -> bool:
    with _terminal_input():
        try:
            return click.confirm(question, default=False, err=True)
        except click.Abort:  # Ctrl-C or end of input at the prompt: not a yes
            click.echo(err=True)
            return False


def _print_summary(summary: dict[str, Any], as_json: bool) -> None:
    if as_json:
        import json

        click.echo(json.dumps(summary, indent=2, sort_keys=True))
        return
    by_status = ", ".join(f"{k} {v}" for k, v in sorted(summary["by_status"].items())) or "none"
    click.echo(f"matched: {summary['matched']} ({by_status})")
    if summary["dry_run"]:
        click.echo("dry run: nothing was changed")
        if summary["sample"]:
            click.echo("sample: " + ", ".join(summary["sample"]))
        return
    for key in ("cancelled", "too_late", "already_terminal", "not_cancellable", "not_found",
                "failed_to_signal", "pending"):
        click.echo(f"{key.replace('_', ' ')}: {summary[key]}")
    click.echo(f"took {summary['seconds']} s")


@root.command(
    "bulk-cancel", help="cancel many workflows by filter or by a list of ids (operators)"
)
@click.option("--account", type=ACCOUNT, help="only this account's")
@click.option("--status", help="comma-separated (default queued,running)")
@click.option("--older-than", type=DURATION, metavar="AGE",
              help="created longer ago than AGE (90s, 30m, 2h, 1d)")
@click.option("--runner", help="only on this runner (id or name)")
@click.option("--tag", help="only workflows carrying this tag")
@click.option("--ids-file", type=click.File("r", encoding="utf-8"), metavar="FILE",
              help="one workflow id a line; - reads stdin")
@click.option("--reason", help="recorded with every cancel")
@click.option("--dry-run", is_flag=True, help="count by status and show a sample; change nothing")
@click.option("--yes", is_flag=True, help="do not ask for confirmation")
@click.option("--json", "as_json", is_flag=True, help="print the summary as JSON")
@click.option("--wait", type=DURATION, default="30s", metavar="SECONDS",
              help="how long to wait for running ones' outcomes (default 30s)")
def cmd_bulk_cancel(
    account: str | None, status: str | None, older_than: float | None, runner: str | None,
    tag: str | None, ids_file: IO[str] | None, reason: str | None, dry_run: bool, yes: bool,
    as_json: bool, wait: float,
) -> None:
    from comfy_cancel import bulk, context
    from comfy_cancel.manager import WorkflowFilter
    from comfy_cancel.status import Actor

    has_filter = any(v is not None for v in (account, status, older_than, runner, tag))
    if ids_file is None and not has_filter:
        raise CliError("name what to cancel: a filter (--account, --status, --older-than, "
                       "--runner, --tag) or --ids-file; refusing to cancel everything")
    statuses = tuple(s.strip() for s in (status or "queued,running").split(",") if s)
    unknown = [s for s in statuses if s not in {w.value for w in WorkflowStatus}]
    if unknown:
        raise CliError(f"unknown status {', '.join(unknown)}; use queued and/or running")
    flt = WorkflowFilter(account, statuses, older_than, runner, tag)
    ids = _read_ids(ids_file) if ids_file is not None else None
    ctx = context.current()
    planned = bulk.plan(ctx, flt, ids)
    if dry_run:
        _print_summary(planned.to_dict(), as_json)
        return
    if planned.matched == 0:
        _print_summary(planned.to_dict() | {"dry_run": False}, as_json)
        return
    # Sorted: the database groups statuses in no particular order.
    counts = dict(sorted(planned.by_status.items()))
    if not yes and not _confirm(f"cancel {planned.matched} workflows ({counts})?"):
        raise CliError("not confirmed; nothing was changed")
    operator = f"operator:{os.environ.get('USER') or os.getuid()}@cli"
    by = Actor(CancelSource.BULK.value, operator, reason)
    with click.progressbar(
        length=planned.matched + planned.not_found, label="cancelling", show_pos=True,
        file=sys.stderr, hidden=as_json or not sys.stderr.isatty(),
    ) as bar:
        summary = bulk.execute(ctx, flt, by, ids, progress=bar.update, wait_seconds=wait)
    _print_summary(summary.to_dict(), as_json)


@root.command("sweep", help="run the stuck-work sweeps by hand")
@click.option("--once", is_flag=True, help="run one pass now")
@click.option("--dry-run", is_flag=True, help="report; change nothing")
def cmd_sweep(once: bool, dry_run: bool) -> None:
    from comfy_cancel import context, sweeps

    if not once:
        raise CliError("sweeps run periodically under `comfy-cancel beat`; "
                       "pass --once to run one pass now")
    report = sweeps.sweep(context.current(), dry_run=dry_run)
    for name, count in report.counts().items():
        click.echo(f"{name.replace('_', ' ')}: {count}")
    if dry_run:
        click.echo("dry run: nothing was changed")


# --- benchmarks ---------------------------------------------------------------------------


@root.command(
    "bench", add_help_option=False, context_settings={"ignore_unknown_options": True},
    help="run the benchmark suite from a source checkout (`bench --help` lists its options)",
)
# Every argument goes to the suite's own parser: `comfy-cancel bench --quick`.
@click.argument("bench_args", nargs=-1, type=click.UNPROCESSED)
def cmd_bench(bench_args: tuple[str, ...]) -> int:
    """Hand over to the suite in ``bench/`` of the source checkout (not part of the package)."""
    import importlib

    import comfy_cancel

    checkout = Path(comfy_cancel.__file__).resolve().parent.parent
    if not (checkout / "bench" / "suite.py").is_file():
        raise CliError("the benchmark suite lives in a source checkout (bench/ beside "
                       "comfy_cancel/); run `comfy-cancel bench` from a clone installed with "
                       "pip install -e '.[dev]'")
    if str(checkout) not in sys.path:
        sys.path.insert(0, str(checkout))
    return int(importlib.import_module("bench.suite").main(list(bench_args)))


# --- running a command line ----------------------------------------------------------------


def _fail(message: str) -> None:
    click.echo(f"{PROG}: error: {message}", err=True)


def _usage_problem(exc: click.UsageError) -> str:
    # click's own form is a usage block and several lines; one line says it better.
    message = " ".join(line.strip() for line in exc.format_message().splitlines() if line)
    where = exc.ctx.command_path if exc.ctx is not None else PROG
    return f"{message.rstrip('.')} (see `{where} --help`)"


def _database_problem(exc: sa_exc.DBAPIError) -> str:
    detail = str(exc.orig).strip().splitlines()[0] if exc.orig else type(exc).__name__
    try:
        where = redact_url(get_settings().database_url)
    except ValidationError:
        where = "the database"
    return (
        f"{where}: {detail}; is the database reachable and migrated? "
        f"run `{PROG} migrate` (and check {ENV_PREFIX}DATABASE_URL)"
    )


def main(argv: list[str] | None = None) -> int:
    """Run one command line; returns the exit code. Errors are one line on stderr."""
    args = sys.argv[1:] if argv is None else list(argv)
    debug = False
    try:
        with root.make_context(PROG, args) as ctx:
            debug = bool(ctx.params["debug"])
            return int(root.invoke(ctx) or 0)
    except click.exceptions.Exit as exc:  # --help
        return exc.exit_code
    except click.UsageError as exc:
        _fail(_usage_problem(exc))
        return exc.exit_code
    except click.ClickException as exc:
        _fail(exc.format_message())
        return exc.exit_code
    except SecretKeyError as exc:
        _fail(str(exc))
        return 1
    except (sa_exc.OperationalError, sa_exc.ProgrammingError, sa_exc.InterfaceError) as exc:
        if debug:
            raise
        _fail(_database_problem(exc))
        return 1
    except (KeyboardInterrupt, click.Abort):
        return 130
    except BrokenPipeError:
        # The reader went away (`comfy-cancel settings | head`): not an error. Point stdout
        # at /dev/null so the interpreter's final flush does not complain either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:
        if debug:
            raise
        _fail(f"unexpected {type(exc).__name__}: {exc} (rerun with --debug for the traceback)")
        return 1


if __name__ == "__main__":
    sys.exit(main())
