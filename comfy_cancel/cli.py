"""The ``comfy-cancel`` command: set up the database, tokens and runners; run each process.

Every failure a user can fix is one line on stderr, ``comfy-cancel: error: ...``, saying
what to do next, and exit code 1 (2 for a command line argparse refuses). Heavy imports
(Celery, FastAPI, uvicorn) happen inside the commands that need them.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import textwrap
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from pydantic import ValidationError
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session

from comfy_cancel import manager
from comfy_cancel.config import ENV_PREFIX, Settings, get_settings
from comfy_cancel.db import Database
from comfy_cancel.models import utcnow
from comfy_cancel.schemas import RunnerCreate, RunnerView, error_message, mask_password

if TYPE_CHECKING:
    from celery import Celery

PROG = "comfy-cancel"


class CliError(Exception):
    """A failure the user can fix; printed as one line, exit code 1."""

    code = 1


class UsageError(CliError):
    """A command line argparse refuses; exit code 2."""

    code = 2


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse would print the whole usage block; one line says it better.
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _settings() -> Settings:
    try:
        return get_settings()
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        name = ENV_PREFIX + "_".join(str(p) for p in first["loc"]).upper()
        raise CliError(f"invalid setting {name}: {first['msg']}; fix the variable") from exc


# --- migrate -------------------------------------------------------------------------------


def cmd_migrate(args: argparse.Namespace) -> int:
    from comfy_cancel.migrations import upgrade

    settings = _settings()
    upgrade(settings.database_url)
    print(f"migrated {mask_password(settings.database_url)} to the latest schema")
    return 0


# --- tokens --------------------------------------------------------------------------------


def cmd_token_create(args: argparse.Namespace) -> int:
    settings = _settings()
    days = args.expires_in_days or settings.token_default_ttl_days
    expires_at = utcnow() + timedelta(days=days) if days else None
    with Database.from_url(settings.database_url).transaction() as session:
        account = manager.get_or_create_account(session, args.account)
        token = manager.create_token(
            session, account, operator=args.operator, expires_at=expires_at
        )
    print(token)
    kind = "operator token" if args.operator else "token"
    expiry = f"expires {expires_at:%Y-%m-%d %H:%M} UTC" if expires_at else "never expires"
    print(
        f"{kind} for account {args.account!r} ({expiry}); it is shown only once: store it now",
        file=sys.stderr,
    )
    return 0


# --- runners -------------------------------------------------------------------------------


def _header(value: str) -> tuple[str, str]:
    name, sep, header_value = value.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"{value!r} is not 'Name: value'")
    return name.strip(), header_value.strip()


def _account_id(session: Session, name: str) -> int:
    account = manager.get_account(session, name)
    if account is None:
        raise CliError(
            f"no account {name!r}; create it (and a token) with "
            f"`{PROG} token create --account {name}`"
        )
    return account.id


def cmd_runner_add(args: argparse.Namespace) -> int:
    try:
        runner = RunnerCreate.model_validate(
            {
                "name": args.runner_name,
                "endpoint_url": args.url,
                "headers": dict(args.header),
                "tags": args.tag,
            }
        )
    except ValidationError as exc:
        raise CliError(f"invalid runner {error_message(exc)}") from exc
    with Database.from_url(_settings().database_url).transaction() as session:
        added = manager.add_runner(
            session,
            _account_id(session, args.account),
            name=runner.name,
            endpoint_url=runner.endpoint_url,
            headers=runner.headers,
            tags=runner.tags,
            status=runner.status.value,
        )
    print(added.id)
    return 0


def cmd_runner_list(args: argparse.Namespace) -> int:
    with Database.from_url(_settings().database_url).transaction() as session:
        runners = manager.list_runners(session, _account_id(session, args.account))
        views = [RunnerView.of(r) for r in runners]
    if not views:
        print(f"account {args.account!r} has no runners; add one with `{PROG} runner add`",
              file=sys.stderr)
        return 0
    print("id\tstatus\tname\tendpoint_url\ttags\theaders")
    for view in views:
        print("\t".join([view.id, view.status.value, view.name, view.endpoint_url,
                         ",".join(view.tags), ",".join(view.headers)]))
    return 0


# --- processes -----------------------------------------------------------------------------


def cmd_sim_comfyui(args: argparse.Namespace) -> int:
    from comfy_cancel import sim_comfyui

    argv: list[str] = []
    if args.host is not None:
        argv += ["--host", args.host]
    if args.port is not None:
        argv += ["--port", str(args.port)]
    if args.time_scale is not None:
        argv += ["--time-scale", str(args.time_scale)]
    if args.no_jobs_api:
        argv.append("--no-jobs-api")
    return int(sim_comfyui.main(argv) or 0)


def cmd_api(args: argparse.Namespace) -> int:
    import uvicorn

    from comfy_cancel.api import create_app

    settings = _settings()
    # uvicorn configures only its own loggers; this shows the API's warnings beside them.
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(
        create_app(settings),
        host=args.host or settings.api_host,
        port=args.port or settings.api_port,
        log_level=settings.log_level.lower(),
    )
    return 0


def _celery_app() -> Celery:
    # Importing tasks first registers them and sidesteps the cycle worker -> tasks -> worker
    # that importing comfy_cancel.worker on its own runs into.
    from comfy_cancel import tasks

    return tasks.app


def cmd_worker(args: argparse.Namespace) -> int:
    app = _celery_app()
    from comfy_cancel.worker import ALL_QUEUES

    queues = [q.strip() for q in args.queues.split(",") if q.strip()]
    unknown = sorted(set(queues) - set(ALL_QUEUES))
    if not queues or unknown:
        raise CliError(
            f"unknown queue {','.join(unknown) or '(none)'}; choose from {','.join(ALL_QUEUES)}"
        )
    argv = ["worker", f"--queues={','.join(queues)}",
            f"--loglevel={args.loglevel or _settings().log_level}"]
    if args.concurrency:
        argv.append(f"--concurrency={args.concurrency}")
    app.worker_main(argv)
    return 0


def cmd_beat(args: argparse.Namespace) -> int:
    app = _celery_app()
    # Beat keeps its last-run times in a file; the working directory may not be writable.
    schedule = Path(args.schedule or Path(tempfile.gettempdir(), PROG, "celerybeat-schedule"))
    schedule.parent.mkdir(parents=True, exist_ok=True)
    return int(app.start(["beat", f"--schedule={schedule}",
                          f"--loglevel={args.loglevel or _settings().log_level}"]) or 0)


# --- the embedded stack --------------------------------------------------------------------


def cmd_dev(args: argparse.Namespace) -> int:
    from comfy_cancel import dev

    return _run_embedded(dev.main, args)


def cmd_demo(args: argparse.Namespace) -> int:
    from comfy_cancel import demo

    return _run_embedded(demo.main, args)


def _run_embedded(
    run: Callable[[argparse.Namespace, Settings], int], args: argparse.Namespace
) -> int:
    from comfy_cancel.dev import StackError

    settings = _settings()
    try:
        return run(args, settings)
    except StackError as exc:
        raise CliError(str(exc)) from exc


# --- settings ------------------------------------------------------------------------------


def cmd_settings(args: argparse.Namespace) -> int:
    settings = _settings()
    for name, field in Settings.model_fields.items():
        value = getattr(settings, name)
        shown = "(unset)" if value is None else mask_password(str(value))
        print(f"{ENV_PREFIX}{name.upper()}={shown}")
        print(textwrap.fill(field.description or "", width=96, initial_indent="    ",
                            subsequent_indent="    "))
    return 0


# --- the parser ----------------------------------------------------------------------------


def _positive_int(value: str) -> int:
    number = int(value) if value.isdigit() else 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive whole number")
    return number


def _positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = 0.0
    if not number > 0:
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive number")
    return number


def _account_name(value: str) -> str:
    name = value.strip()
    if not 1 <= len(name) <= 200:
        raise argparse.ArgumentTypeError("an account name has 1 to 200 characters")
    return name


Commands = Any  # argparse's private _SubParsersAction


def _add_setup_commands(commands: Commands) -> None:
    migrate = commands.add_parser("migrate", help="create or upgrade the database schema")
    migrate.set_defaults(run=cmd_migrate)

    token = commands.add_parser("token", help="API tokens").add_subparsers(
        title="token commands", required=True, metavar="COMMAND"
    )
    create = token.add_parser("create", help="create a token (creating the account if needed)")
    create.add_argument("--account", required=True, type=_account_name)
    create.add_argument("--operator", action="store_true", help="may call operator routes")
    create.add_argument("--expires-in-days", type=_positive_int, metavar="N",
                        help="default: COMFY_CANCEL_TOKEN_DEFAULT_TTL_DAYS (unset: never)")
    create.set_defaults(run=cmd_token_create)

    runner = commands.add_parser("runner", help="ComfyUI runners").add_subparsers(
        title="runner commands", required=True, metavar="COMMAND"
    )
    add = runner.add_parser("add", help="add a runner to an account; prints its id")
    add.add_argument("--account", required=True, type=_account_name)
    add.add_argument("runner_name", metavar="RUNNER_NAME")
    add.add_argument("url", metavar="URL", help="the ComfyUI server, e.g. http://127.0.0.1:8188")
    add.add_argument("--tag", action="append", default=[], help="repeat for several tags")
    add.add_argument("--header", action="append", default=[], type=_header,
                     metavar="'NAME: VALUE'", help="sent on every call; repeat for several")
    add.set_defaults(run=cmd_runner_add)
    listing = runner.add_parser("list", help="list an account's runners")
    listing.add_argument("--account", required=True, type=_account_name)
    listing.set_defaults(run=cmd_runner_list)

    show = commands.add_parser("settings", help="print every setting, its variable and meaning")
    show.set_defaults(run=cmd_settings)


def _add_process_commands(commands: Commands) -> None:
    api = commands.add_parser("api", help="run the HTTP API")
    api.add_argument("--host", help="default: COMFY_CANCEL_API_HOST")
    api.add_argument("--port", type=_positive_int, help="default: COMFY_CANCEL_API_PORT")
    api.set_defaults(run=cmd_api)

    worker = commands.add_parser("worker", help="run a Celery worker (cancel or runner tasks)")
    # The cancel queues only: an operator starting "a cancel worker" must not get a runner.
    worker.add_argument("--queues", default="cancel,cancel.bulk,cancel.sweep",
                        help="comma-separated (default: %(default)s, a cancel worker; "
                        "'runner' for a runner worker)")
    worker.add_argument("--concurrency", type=_positive_int, metavar="N",
                        help="threads (default: COMFY_CANCEL_RUNNER_CONCURRENCY)")
    worker.add_argument("--loglevel", help="default: COMFY_CANCEL_LOG_LEVEL")
    worker.set_defaults(run=cmd_worker)

    beat = commands.add_parser("beat", help="run Celery beat (the periodic sweeps)")
    beat.add_argument("--schedule", help="beat's state file (default: under the temp dir)")
    beat.add_argument("--loglevel", help="default: COMFY_CANCEL_LOG_LEVEL")
    beat.set_defaults(run=cmd_beat)

    sim = commands.add_parser("sim-comfyui", help="run the simulated ComfyUI server")
    sim.add_argument("--host", help="default: 127.0.0.1")
    sim.add_argument("--port", type=_positive_int, help="default: 8188")
    sim.add_argument("--time-scale", type=_positive_float, metavar="F",
                     help="multiplies every node's simulated time")
    sim.add_argument("--no-jobs-api", action="store_true",
                     help="behave like a ComfyUI without /api/jobs (the older cancel forms)")
    sim.set_defaults(run=cmd_sim_comfyui)


def _port(value: str) -> int:
    number = int(value) if value.isdigit() else -1
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port (0 to 65535)")
    return number


def _add_embedded_commands(commands: Commands) -> None:
    dev = commands.add_parser(
        "dev", help="run the whole stack on this machine: Redis, SQLite, API, workers, beat "
        "and a simulated ComfyUI (Ctrl-C stops it)",
        description="Redis: COMFY_CANCEL_REDIS_URL when set, else an embedded redis-server "
        "(AOF in DIR/redis). Database: COMFY_CANCEL_DATABASE_URL when set, else DIR/"
        "comfy_cancel.db. The simulated ComfyUI is runner 'sim' of account 'demo'; the token "
        "printed (kept in DIR/token) is that account's. Logs: DIR/logs/NAME.log.")
    dev.add_argument("--port", type=_port,
                     help="API port (default: COMFY_CANCEL_API_PORT; 0 picks a free one)")
    dev.add_argument("--comfyui-port", type=_port, default=0, metavar="PORT",
                     help="port of the simulated ComfyUI (default: a free one)")
    dev.add_argument("--data-dir", type=Path, default=Path(".comfy-cancel"), metavar="DIR",
                     help="Redis data, SQLite database, token and logs (default: %(default)s)")
    dev.add_argument("--time-scale", type=_positive_float, default=1.0, metavar="F",
                     help="multiplies the simulated ComfyUI's node times (default: 1.0)")
    dev.set_defaults(run=cmd_dev)

    demo = commands.add_parser(
        "demo", help="start the stack, show each way a cancel can end, stop (about a minute)")
    demo.add_argument("--data-dir", type=Path, metavar="DIR",
                      help="where the stack keeps its data (default: a temporary dir, "
                      "deleted afterwards)")
    demo.add_argument("--port", type=_port, default=0,
                      help="API port (default: a free one)")
    demo.add_argument("--time-scale", type=_positive_float, default=1.0, metavar="F",
                      help="multiplies the simulated ComfyUI's node times (default: 1.0)")
    demo.add_argument("--keep-running", action="store_true",
                      help="leave the stack up afterwards, until Ctrl-C")
    demo.set_defaults(run=cmd_demo)


# --- operations: bulk cancels and sweeps ------------------------------------------------

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration(value: str) -> float:
    """``90s``, ``30m``, ``2h``, ``1d`` or plain seconds."""
    text = value.strip().lower()
    unit = _UNITS.get(text[-1:])
    number = text[:-1] if unit else text
    try:
        seconds = float(number) * (unit or 1)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a duration; use e.g. 90s, 30m, 2h or 1d"
        ) from None
    if seconds < 0:
        raise argparse.ArgumentTypeError("a duration cannot be negative")
    return seconds


def _read_ids(path: str) -> list[str]:
    try:
        handle = sys.stdin if path == "-" else open(path, encoding="utf-8")  # noqa: SIM115
    except OSError as exc:
        raise CliError(f"cannot read ids from {path}: {exc.strerror}") from exc
    with handle:
        ids = [line.strip() for line in handle if line.strip() and not line.startswith("#")]
    return list(dict.fromkeys(ids))


def _confirm(question: str, ids_from_stdin: bool) -> bool:
    try:
        tty = open("/dev/tty", "r+", encoding="utf-8")  # noqa: SIM115
    except OSError:
        if ids_from_stdin or not sys.stdin.isatty():
            raise CliError("no terminal to confirm on; pass --yes to go ahead") from None
        tty = None
    stream = tty or sys.stdin
    print(f"{question} [y/N] ", end="", file=sys.stderr, flush=True)
    answer = stream.readline().strip().lower()
    if tty is not None:
        tty.close()
    return answer in {"y", "yes"}


class _ProgressBar:
    """A one-line progress bar on stderr (only when stderr is a terminal or forced)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.done, self.enabled = max(total, 1), 0, enabled

    def __call__(self, handled: int) -> None:
        self.done += handled
        if self.enabled:
            width = 30
            filled = min(width, width * self.done // self.total)
            print(f"\r[{'#' * filled}{' ' * (width - filled)}] {self.done}/{self.total}",
                  end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled:
            print(file=sys.stderr)


def _print_summary(summary: dict[str, Any], as_json: bool) -> None:
    if as_json:
        import json

        print(json.dumps(summary, indent=2, sort_keys=True))
        return
    by_status = ", ".join(f"{k} {v}" for k, v in sorted(summary["by_status"].items())) or "none"
    print(f"matched: {summary['matched']} ({by_status})")
    if summary["dry_run"]:
        print("dry run: nothing was changed")
        if summary["sample"]:
            print("sample: " + ", ".join(summary["sample"]))
        return
    for key in ("cancelled", "too_late", "already_terminal", "not_cancellable", "not_found",
                "failed_to_signal", "pending"):
        print(f"{key.replace('_', ' ')}: {summary[key]}")
    print(f"took {summary['seconds']} s")


def cmd_bulk_cancel(args: argparse.Namespace) -> int:
    from comfy_cancel import bulk, context
    from comfy_cancel.manager import WorkflowFilter
    from comfy_cancel.status import Actor

    has_filter = any(v is not None for v in (args.account, args.older_than, args.runner,
                                               args.tag)) or args.status is not None
    if args.ids_file is None and not has_filter:
        raise CliError("name what to cancel: a filter (--account, --status, --older-than, "
                       "--runner, --tag) or --ids-file; refusing to cancel everything")
    statuses = tuple(s.strip() for s in (args.status or "queued,running").split(",") if s)
    known = {"accepted", "uploaded", "queued", "running", "completed", "failed", "cancelled"}
    unknown = [s for s in statuses if s not in known]
    if unknown:
        raise CliError(f"unknown status {', '.join(unknown)}; use queued and/or running")
    flt = WorkflowFilter(args.account, statuses, args.older_than, args.runner, args.tag)
    ids = _read_ids(args.ids_file) if args.ids_file is not None else None
    ctx = context.current()
    planned = bulk.plan(ctx, flt, ids)
    if args.dry_run:
        _print_summary(planned.to_dict(), args.json)
        return 0
    if planned.matched == 0:
        _print_summary(planned.to_dict() | {"dry_run": False}, args.json)
        return 0
    if not args.yes and not _confirm(
        f"cancel {planned.matched} workflows ({planned.by_status})?", args.ids_file == "-"
    ):
        raise CliError("not confirmed; nothing was changed")
    actor = f"operator:{os.environ.get('USER') or os.getuid()}@cli"
    by = Actor("bulk", actor, args.reason)
    bar = _ProgressBar(planned.matched + planned.not_found,
                       enabled=sys.stderr.isatty() and not args.json)
    try:
        summary = bulk.execute(ctx, flt, by, ids, progress=bar, wait_seconds=args.wait)
    finally:
        bar.close()
    _print_summary(summary.to_dict(), args.json)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from comfy_cancel import context, sweeps

    if not args.once:
        raise CliError("sweeps run periodically under `comfy-cancel beat`; "
                       "pass --once to run one pass now")
    report = sweeps.sweep(context.current(), dry_run=args.dry_run)
    for name, count in report.counts().items():
        print(f"{name.replace('_', ' ')}: {count}")
    if args.dry_run:
        print("dry run: nothing was changed")
    return 0


def _add_operations_commands(commands: Commands) -> None:
    bulk_cancel = commands.add_parser(
        "bulk-cancel", help="cancel many workflows by filter or by a list of ids (operators)"
    )
    bulk_cancel.add_argument("--account", type=_account_name, help="only this account's")
    bulk_cancel.add_argument("--status", help="comma-separated (default queued,running)")
    bulk_cancel.add_argument("--older-than", type=_duration, metavar="AGE",
                             help="created longer ago than AGE (90s, 30m, 2h, 1d)")
    bulk_cancel.add_argument("--runner", help="only on this runner (id or name)")
    bulk_cancel.add_argument("--tag", help="only workflows carrying this tag")
    bulk_cancel.add_argument("--ids-file", metavar="FILE",
                             help="one workflow id a line; - reads stdin")
    bulk_cancel.add_argument("--reason", help="recorded with every cancel")
    bulk_cancel.add_argument("--dry-run", action="store_true",
                             help="count by status and show a sample; change nothing")
    bulk_cancel.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    bulk_cancel.add_argument("--json", action="store_true", help="print the summary as JSON")
    bulk_cancel.add_argument("--wait", type=_duration, default=30.0, metavar="SECONDS",
                             help="how long to wait for running ones' outcomes (default 30s)")
    bulk_cancel.set_defaults(run=cmd_bulk_cancel)
    sweep = commands.add_parser("sweep", help="run the stuck-work sweeps by hand")
    sweep.add_argument("--once", action="store_true", help="run one pass now")
    sweep.add_argument("--dry-run", action="store_true", help="report; change nothing")
    sweep.set_defaults(run=cmd_sweep)


# --- benchmarks ---------------------------------------------------------------------------


def cmd_bench(args: argparse.Namespace) -> int:
    """Hand over to the suite in ``bench/`` of the source checkout (not part of the package)."""
    import importlib

    import comfy_cancel

    root = Path(comfy_cancel.__file__).resolve().parent.parent
    if not (root / "bench" / "suite.py").is_file():
        raise CliError("the benchmark suite lives in a source checkout (bench/ beside "
                       "comfy_cancel/); run `comfy-cancel bench` from a clone installed with "
                       "pip install -e '.[dev]'")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return int(importlib.import_module("bench.suite").main(args.bench_args))


def _add_bench_command(commands: Commands) -> None:
    # Every argument goes to the suite's own parser: `comfy-cancel bench --quick`.
    bench = commands.add_parser(
        "bench", add_help=False, prefix_chars="\0",
        help="run the benchmark suite from a source checkout (`bench --help` lists its options)")
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    bench.set_defaults(run=cmd_bench)


# Each group registers its subcommands.
COMMAND_GROUPS: Sequence[Callable[[Commands], None]] = (
    _add_setup_commands,
    _add_process_commands,
    _add_embedded_commands,
    _add_operations_commands,
    _add_bench_command,
)


def build_parser() -> Parser:
    parser = Parser(
        prog=PROG,
        description="Cancellation for ComfyUI workflows: API, workers, runners and tools. "
        f"Settings come from {ENV_PREFIX}* variables (`{PROG} settings` lists them).",
    )
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an unexpected error")
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")
    for add_group in COMMAND_GROUPS:
        add_group(commands)
    return parser


def _fail(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)


def _database_problem(exc: sa_exc.DBAPIError) -> str:
    detail = str(exc.orig).strip().splitlines()[0] if exc.orig else type(exc).__name__
    try:
        where = mask_password(get_settings().database_url)
    except ValidationError:
        where = "the database"
    return (
        f"{where}: {detail}; is the database reachable and migrated? "
        f"run `{PROG} migrate` (and check {ENV_PREFIX}DATABASE_URL)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    except CliError as exc:
        _fail(str(exc))
        return exc.code
    try:
        return int(args.run(args))
    except CliError as exc:
        _fail(str(exc))
        return exc.code
    except (sa_exc.OperationalError, sa_exc.ProgrammingError, sa_exc.InterfaceError) as exc:
        if args.debug:
            raise
        _fail(_database_problem(exc))
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`comfy-cancel settings | head`): not an error. Point stdout
        # at /dev/null so the interpreter's final flush does not complain either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:
        if args.debug:
            raise
        _fail(f"unexpected {type(exc).__name__}: {exc} (rerun with --debug for the traceback)")
        return 1


if __name__ == "__main__":
    sys.exit(main())
