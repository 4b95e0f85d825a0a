"""Run ``comfy-cancel ARGS...`` in this process and report its peak memory.

``python -m bench.measure OUT.json -- bulk-cancel --account a --yes`` runs the CLI's
``main`` exactly as the ``comfy-cancel`` script would, then writes the exit code, the
command's standard output, and the process's peak resident set size
(``getrusage(RUSAGE_SELF).ru_maxrss``) to ``OUT.json``. The benchmark times the process
from outside, so interpreter start and imports count, as they would for an operator.
"""

from __future__ import annotations

import contextlib
import io
import json
import resource
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2 or args[1] != "--":
        print("usage: python -m bench.measure OUT.json -- COMFY_CANCEL_ARGS...", file=sys.stderr)
        return 2
    out, command = Path(args[0]), args[2:]
    from comfy_cancel import cli

    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        code = cli.main(command)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    out.write_text(json.dumps({
        "exit_code": code, "stdout": captured.getvalue(), "peak_rss_bytes": peak_kib * 1024,
    }))
    return code


if __name__ == "__main__":
    sys.exit(main())
