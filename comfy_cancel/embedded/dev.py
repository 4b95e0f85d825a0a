"""``comfy-cancel dev``: the whole system on one machine until Ctrl-C, and what a person
needs to use it (URLs, the token, curl to try it).

The stack itself is :class:`~comfy_cancel.embedded.stack.EmbeddedStack`; ``comfy-cancel
demo`` runs the same one.
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import signal
from collections.abc import Iterator
from types import FrameType
from urllib.parse import urlsplit

from comfy_cancel.config import ENV_PREFIX, Settings
from comfy_cancel.embedded.database import SIM_RUNNER
from comfy_cancel.embedded.errors import StackError
from comfy_cancel.embedded.stack import EmbeddedStack
from comfy_cancel.redact import redact_url


def banner(stack: EmbeddedStack, heading: str) -> str:
    """What a person needs to use the running stack: URLs, the token, curl to try it."""
    auth = '-H "Authorization: Bearer $TOKEN"'
    workflow = shlex.quote(str(stack.example_workflow_path))
    redis_kind = (f"embedded; password: cat {shlex.quote(str(stack.redis_password_path))}"
                  if stack.embedded_redis else f"from {ENV_PREFIX}REDIS_URL")
    key_source = (f"from {ENV_PREFIX}SECRET_KEY" if stack.base_settings.secret_key
                  else str(stack.secret_key_path))
    return "\n".join([
        "",
        heading,
        "",
        f"  API          {stack.api_url}",
        f"  API docs     {stack.docs_url}",
        f"  ComfyUI      {stack.comfyui_url} (simulated; runner {SIM_RUNNER!r} of account "
        f"{stack.account!r})",
        f"  token        {stack.token}",
        f"  Redis        {redact_url(stack.redis_url)} ({redis_kind})",
        f"  database     {redact_url(stack.database_url)}",
        f"  secret key   {key_source} (seals runner headers)",
        f"  logs         {stack.log_dir}/",
        f"  metrics      {stack.api_url}/metrics (API), "
        + ", ".join(f"{url} ({name})" for name, url in stack.worker_metrics_urls.items()),
        "",
        "Flower (Celery's monitor; pip install flower), against this stack's Redis:",
        "",
        f"  {flower_command(stack)}",
        "",
        "Try it (WORKFLOW_ID is the id the first call prints):",
        "",
        f"  export API={stack.api_url} TOKEN={stack.token}",
        f"  curl -s {auth} -F name=blur -F workflow_json=@{workflow} $API/v1/workflow",
        f"  curl -s {auth} $API/v1/workflow/WORKFLOW_ID",
        f"  curl -sN {auth} $API/v1/workflow/WORKFLOW_ID/subscribe   # live, until it ends",
        f"  curl -s -X POST {auth} $API/v1/workflow/WORKFLOW_ID/cancel",
        "",
    ])


def flower_command(stack: EmbeddedStack) -> str:
    """The command line that starts Flower on this stack's broker (the Celery app reads
    COMFY_CANCEL_REDIS_URL): the embedded Redis's password is read from its file, so the
    line shows no secret."""
    flower = "celery -A comfy_cancel.worker flower --port=5555"
    if not stack.embedded_redis:
        return f"{flower}   # on {ENV_PREFIX}REDIS_URL"
    parts = urlsplit(stack.redis_url)
    where = f"{parts.hostname}:{parts.port}{parts.path}"
    password = shlex.quote(str(stack.redis_password_path))
    return f'{ENV_PREFIX}REDIS_URL="redis://:$(cat {password})@{where}" {flower}'


def _raise_keyboard_interrupt(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM stops the stack the way Ctrl-C does (in order, nothing left behind); so does
    SIGINT even when it was ignored at start-up (a background job of a script inherits
    SIGINT ignored, and Python then installs no KeyboardInterrupt for it)."""
    previous = {
        signal.SIGTERM: signal.signal(signal.SIGTERM, _raise_keyboard_interrupt),
        signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler),
    }
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def say(line: str) -> None:
    print(line, flush=True)


def main(args: argparse.Namespace, settings: Settings) -> int:
    """``comfy-cancel dev``: run the stack until Ctrl-C or SIGTERM."""
    port = settings.api_port if args.port is None else args.port
    stack = EmbeddedStack.from_environment(
        args.data_dir, settings, api_port=port, comfyui_port=args.comfyui_port,
        time_scale=args.time_scale, echo=say,
    )
    say(f"starting the stack in {stack.data_dir}")
    ready = False
    with sigterm_as_interrupt():
        try:
            with stack:
                ready = True
                say(banner(stack, "comfy-cancel dev is running; Ctrl-C stops it."))
                stack.wait()
        except KeyboardInterrupt:
            say("stopped")
            return 0 if ready else 130
        except StackError as exc:
            if not ready:
                raise
            raise StackError(f"{exc}; the rest of the stack was stopped") from exc
    return 0
