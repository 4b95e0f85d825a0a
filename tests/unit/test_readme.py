"""The README documents what the code has: every setting, every CLI command."""

from __future__ import annotations

from pathlib import Path

from comfy_cancel.cli import root
from comfy_cancel.config import ENV_PREFIX, Settings

README = (Path(__file__).parents[2] / "README.md").read_text()


def test_every_setting_is_documented() -> None:
    missing = [ENV_PREFIX + name.upper() for name in Settings.model_fields
               if f"`{ENV_PREFIX}{name.upper()}`" not in README]
    assert missing == []


def test_every_cli_command_is_documented() -> None:
    missing = [name for name in root.commands if f"comfy-cancel {name}" not in README]
    assert missing == []
