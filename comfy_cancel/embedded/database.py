"""The embedded stack's database: migrated to the latest schema, with the simulated ComfyUI
registered as a runner and a token to use it, and an example workflow to submit."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from comfy_cancel.config import ENV_PREFIX, Settings
from comfy_cancel.embedded.data_dir import DataDir, write_private
from comfy_cancel.embedded.errors import StackError
from comfy_cancel.redact import redact_url

SIM_RUNNER = "sim"


def absolute_database_url(url: str) -> str:
    """The URL with a relative SQLite path made absolute: the children run in the data dir."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise StackError(
            f"{ENV_PREFIX}DATABASE_URL {url!r} is not a database URL; fix or unset it"
        ) from exc
    if not parsed.drivername.startswith("sqlite"):
        return url
    if parsed.database in (None, "", ":memory:"):
        raise StackError(
            "an in-memory SQLite database cannot be shared by the stack's processes; "
            f"point {ENV_PREFIX}DATABASE_URL at a file, or unset it"
        )
    path = Path(parsed.database or "").expanduser().resolve()
    return parsed.set(database=str(path)).render_as_string(hide_password=False)


def migrate(given: str | None, data_dir: DataDir) -> str:
    """The database's URL once it is at the latest schema: ``given`` (the user's
    ``COMFY_CANCEL_DATABASE_URL``), else a SQLite file in the data dir."""
    from sqlalchemy import exc as sa_exc

    from comfy_cancel.migrations import upgrade

    url = absolute_database_url(given or f"sqlite:///{data_dir.path / 'comfy_cancel.db'}")
    try:
        upgrade(url)
    except sa_exc.SQLAlchemyError as exc:
        detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        where = f" ({ENV_PREFIX}DATABASE_URL)" if given else ""
        raise StackError(
            f"cannot migrate the database {redact_url(url)}{where}: {detail}; "
            "check that it is reachable and writable"
        ) from exc
    return url


@dataclass(frozen=True)
class SimRunner:
    runner_id: str
    token: str  # an API token of the account that owns the runner


def register_sim(
    settings: Settings, data_dir: DataDir, account_name: str, comfyui_url: str
) -> SimRunner:
    """The sim as runner ``sim`` of the account, reused across restarts with its new URL;
    the token of an earlier run is reused while it is valid (it is stored only hashed)."""
    from comfy_cancel import manager
    from comfy_cancel.db import Database, make_engine
    from comfy_cancel.models import RunnerStatus

    token_path = data_dir.token_path
    saved = token_path.read_text().strip() if token_path.is_file() else None
    db = Database(make_engine(settings.database_url))
    try:
        with db.transaction() as session:
            account = manager.get_or_create_account(session, account_name)
            runner = next(
                (r for r in manager.list_runners(session, account.id) if r.name == SIM_RUNNER),
                None,
            )
            if runner is None:
                runner = manager.add_runner(
                    session, account.id, name=SIM_RUNNER, endpoint_url=comfyui_url,
                    settings=settings,
                )
            else:
                manager.update_runner(
                    session, runner,
                    {"endpoint_url": comfyui_url, "status": RunnerStatus.ACTIVE.value},
                    settings=settings,
                )
            principal = manager.authenticate(session, saved) if saved else None
            if saved is not None and principal is not None \
                    and principal.account_id == account.id:
                token = saved
            else:
                token = manager.create_token(session, account)
            sim = SimRunner(runner.id, token)
    finally:
        db.engine.dispose()
    if sim.token != saved:
        write_private(token_path, sim.token + "\n")  # a bearer credential
    return sim


def write_example_workflow(data_dir: DataDir) -> None:
    from comfy_cancel.embedded.comfyui_sim import blur_workflow

    # About 10 s at time scale 1: long enough to cancel by hand.
    prompt = blur_workflow(768, 12, filename_prefix="example")
    data_dir.example_workflow_path.write_text(json.dumps(prompt, indent=2) + "\n")
