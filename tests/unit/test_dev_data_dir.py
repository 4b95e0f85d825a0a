"""The embedded stack's data dir: owner-only, and the key that seals runner headers."""

from __future__ import annotations

import stat
from pathlib import Path

from comfy_cancel import encryption
from comfy_cancel.embedded.data_dir import private_dir, stack_secret_key, write_private
from comfy_cancel.embedded.stack import with_network


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_data_dir_is_owner_only_even_when_it_existed(tmp_path: Path) -> None:
    existing = tmp_path / "old"
    existing.mkdir(mode=0o755)
    existing.chmod(0o755)
    private_dir(existing)
    private_dir(tmp_path / "new")
    private_dir(tmp_path / "new" / "logs")
    assert mode(existing) == mode(tmp_path / "new") == mode(tmp_path / "new" / "logs") == 0o700


def test_private_files_are_0600_even_when_they_existed(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("old")
    path.chmod(0o644)
    write_private(path, "new\n")
    assert (mode(path), path.read_text()) == (0o600, "new\n")


def test_the_secret_key_is_made_once_and_kept(tmp_path: Path) -> None:
    key = stack_secret_key(tmp_path, None)
    assert encryption.unseal(encryption.seal({"a": "b"}, key), key) == {"a": "b"}
    assert mode(tmp_path / "secret.key") == 0o600
    assert stack_secret_key(tmp_path, None) == key
    assert stack_secret_key(tmp_path, "given") == "given"


def test_loopback_is_added_once() -> None:
    assert with_network("", "127.0.0.0/8") == "127.0.0.0/8"
    assert with_network("10.0.0.0/8", "127.0.0.0/8") == "10.0.0.0/8,127.0.0.0/8"
    assert with_network("127.0.0.0/8, 10.0.0.0/8", "127.0.0.0/8") == "127.0.0.0/8,10.0.0.0/8"
