"""Databases for the tests and the benchmark: migrated fast, and the egress setting their
local runners need."""

from __future__ import annotations

import shutil
import tempfile
from functools import cache
from pathlib import Path

from sqlalchemy.engine import make_url

from comfy_cancel.config import Settings
from comfy_cancel.db import Database, make_engine
from comfy_cancel.migrations import upgrade

# Test runners point at 127.0.0.1 (a simulated ComfyUI, or a closed port): allowed only
# because the operator says so (comfy_cancel.egress).
LOOPBACK = "127.0.0.0/8"
LOOPBACK_ALLOWED = Settings(runner_allowed_networks=LOOPBACK)



def migrate(url: str) -> None:
    """Bring the database at ``url`` to the latest schema.

    A SQLite file that does not exist yet becomes a copy of one migrated once per process:
    alembic takes about 0.2 s a run, the copy under a millisecond, and hundreds of tests
    start from an empty database. Anything else (an existing file, PostgreSQL) is migrated
    in place, as ``comfy-cancel migrate`` does."""
    path = _new_sqlite_file(url)
    if path is None:
        upgrade(url)
    else:
        shutil.copyfile(Path(_schema_template().name) / "template.db", path)


def migrated(url: str) -> Database:
    migrate(url)
    return Database(make_engine(url))


def _new_sqlite_file(url: str) -> Path | None:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    path = Path(parsed.database)
    return None if path.exists() else path


@cache
def _schema_template() -> tempfile.TemporaryDirectory[str]:
    """A directory with ``template.db``, migrated to head; the cache keeps it for the
    process, and its finaliser removes it at exit."""
    directory = tempfile.TemporaryDirectory(prefix="comfy-cancel-schema-")
    path = Path(directory.name) / "template.db"
    upgrade(f"sqlite:///{path}")
    # Alembic's engine is disposed, so SQLite has folded its write-ahead log into the file:
    # the file alone is the whole schema.
    assert not path.with_name("template.db-wal").exists()
    return directory
