"""The embedded stack's data dir: owner-only, used by one stack at a time, and the home of
what must outlive a run (the token, the key that seals runner headers, the database, the
Redis append-only file, the logs)."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO

from comfy_cancel.embedded.errors import StackError

DEFAULT_DATA_DIR = Path(".comfy-cancel")
TOKEN_FILE = "token"
REDIS_PASSWORD_FILE = "redis-password"
SECRET_KEY_FILE = "secret.key"
LOCK_FILE = "stack.lock"
EXAMPLE_WORKFLOW_FILE = "example-workflow.json"


class DataDir:
    """``path`` and what the stack keeps in it; :meth:`open` before use, :meth:`close`
    after."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path).expanduser().resolve()
        self.log_dir = self.path / "logs"
        self._lock: IO[str] | None = None

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    @property
    def token_path(self) -> Path:
        return self.path / TOKEN_FILE

    @property
    def redis_password_path(self) -> Path:
        return self.path / REDIS_PASSWORD_FILE

    @property
    def secret_key_path(self) -> Path:
        return self.path / SECRET_KEY_FILE

    @property
    def example_workflow_path(self) -> Path:
        return self.path / EXAMPLE_WORKFLOW_FILE

    def open(self) -> None:
        """Create the dir and its logs dir owner-only (they hold the token, the secret key
        and the database), and lock it for this stack."""
        try:
            private_dir(self.path)
            private_dir(self.log_dir)
        except OSError as exc:
            raise StackError(
                f"cannot create {self.log_dir} ({exc.strerror or exc}): pass --data-dir with "
                "a directory you can write to"
            ) from exc
        self._take_lock()

    def _take_lock(self) -> None:
        """One stack per data dir: two would share the Redis append-only file and the
        SQLite file."""
        lock = (self.path / LOCK_FILE).open("a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            lock.seek(0)
            owner = lock.read().strip() or "?"
            lock.close()
            raise StackError(
                f"another comfy-cancel stack (pid {owner}) is using {self.path}: stop it, "
                "or pass --data-dir with another directory"
            ) from exc
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        self._lock = lock

    def close(self) -> None:
        """Release the lock (closing the file releases it). Idempotent."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None


def private_dir(path: Path) -> None:
    """``path`` created readable by its owner only; an existing one is tightened, since it
    holds what an earlier, looser version left there."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.chmod(0o700)


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to a file only its owner can read (0600 from its creation on)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_CREAT
    with os.fdopen(fd, "w") as file:
        file.write(text)


def stack_secret_key(data_dir: Path, given: str | None) -> str:
    """The key that seals runner headers: the one given (COMFY_CANCEL_SECRET_KEY), else the
    one an earlier run kept in the data dir, else a new one kept there (0600): losing it
    would lose the headers of the runners in the stack's database."""
    if given:
        return given
    path = data_dir / SECRET_KEY_FILE
    if path.is_file():
        path.chmod(0o600)
        return path.read_text().strip()
    from comfy_cancel.encryption import new_key

    key = new_key()
    write_private(path, key + "\n")
    return key
