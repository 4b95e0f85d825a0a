"""The operator page: ``GET /ops``, one static page (``ops.html``), and ``GET /ops/state``,
the JSON it asks for every two seconds.

How the operator signs in: the page is a public shell with no data in it; it asks for an
operator token, keeps it in the tab's ``sessionStorage`` (gone when the tab closes) and
sends it as ``Authorization: Bearer`` on every call, to ``/ops/state`` and to the bulk
cancel API (``POST /v1/admin/workflow/cancel``) alike. The gate refuses ``/ops/...``
without a token (401) or with a customer's (403), as it does ``/v1/admin``. No cookie, so
no cross-site request can act with the operator's rights; no token in a URL or a log.

What the state shows is read, never written: the stuck work is the sweeps' own dry run
(:func:`comfy_cancel.sweeps.stuck_now`), the rest a few indexed reads in :mod:`manager`.
"""

from __future__ import annotations

import base64
import hashlib
import math
import re
from collections import defaultdict
from dataclasses import asdict
from datetime import datetime, timedelta
from functools import cache
from importlib import resources
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from comfy_cancel import manager, sweeps
from comfy_cancel.context import Context
from comfy_cancel.gate import operator_required, principal_of
from comfy_cancel.manager import FinishedCancel, Principal
from comfy_cancel.models import Workflow, utcnow

# The window of "recent" cancels and of the latency histogram.
WINDOW = timedelta(hours=1)
# At most this many of the window's cancels are read per refresh: the page stays cheap
# however busy the hour was (the totals then say "at least").
MAX_RECENT = 10_000
SAMPLE = 5  # stuck workflows shown per kind, the oldest first
LATEST = 15  # the last cancels listed one by one
# Upper bounds (seconds) of the histogram's bars of request -> outcome; one more bar past
# the last.
BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

# What each kind of stuck work is, and what the next pass does about it.
STUCK_KINDS = {
    "republished": "cancel requests no cancel worker took: handed on again",
    "past_grace": "cancels whose runner did not stop within the grace period: forced",
    "runner_lost": "running with no heartbeat from the runner: cancelled (runner_lost)",
    "overdue": "running longer than the maximum run time: cancel requested",
    "queued_cancelled": "queued too long: cancelled",
    "redispatched": "queued too long, never submitted: re-dispatched",
    "orphans_redispatched": "runner task lost: re-dispatched (an accepted one only once "
                            "the runner queue is empty: it may be waiting in a backlog)",
    "timed_out": "queued or running past its own timeout_seconds: cancel requested",
}

router = APIRouter(prefix="/ops", include_in_schema=False)


async def _operator(request: Request) -> Principal:
    """The gate admits only operators to ``/ops/...``; this keeps the rule beside the route."""
    principal = principal_of(request.state)
    if principal is None or not principal.is_operator:
        raise operator_required()
    return principal


@cache
def _page() -> tuple[str, str]:
    """The page, and its Content-Security-Policy: only its own inline script and style
    run (by hash), it talks to this origin only, and no other site may frame it."""
    html = resources.files("comfy_cancel").joinpath("ops.html").read_text(encoding="utf-8")

    def hashes(tag: str) -> str:
        bodies = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.S)
        return " ".join(
            f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'"
            for b in bodies
        )

    policy = (
        f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; "
        "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    )
    return html, policy


@router.get("")
@router.get("/")
def page() -> Response:
    html, policy = _page()
    return Response(html, media_type="text/html; charset=utf-8", headers={
        "Content-Security-Policy": policy,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-store",
    })


@router.get("/state")
def state(request: Request, _operator: Annotated[Principal, Depends(_operator)]) -> Response:
    ctx: Context = request.app.state.context
    now = utcnow()
    body = {
        "now": now.isoformat(),
        "window_seconds": WINDOW.total_seconds(),
        "stuck": _stuck(ctx, now),
        **_cancels(ctx, now),
    }
    return JSONResponse(body, headers={"Cache-Control": "no-store"})


def _age(since: datetime | None, now: datetime) -> float | None:
    return None if since is None else round((now - since).total_seconds(), 3)


def _stuck(ctx: Context, now: datetime) -> list[dict[str, Any]]:
    """Per kind of stuck work: how many (capped at a sweep's batch), the oldest, a sample."""
    settings = ctx.settings
    report = sweeps.stuck_now(ctx)
    found: dict[str, list[str]] = {
        kind: ids for kind, ids in asdict(report).items() if kind in STUCK_KINDS
    }
    with ctx.db.reading() as session:
        found["past_grace"] = manager.overdue_cancel_ids(
            session, settings.cancel_grace_seconds, settings.sweep_batch_size
        )
        sampled = {w.id: w for w in manager.workflows_by_ids(
            session, [i for ids in found.values() for i in ids[:SAMPLE]]
        )}
    kinds = []
    for kind, label in STUCK_KINDS.items():
        ids = found.get(kind, [])
        sample = []
        for workflow in (sampled[i] for i in ids[:SAMPLE] if i in sampled):
            since = workflow.cancel_taken_at if kind == "past_grace" \
                else sweeps.stuck_since(kind, workflow)
            sample.append({"id": workflow.id, "status": workflow.status,
                           "age_seconds": _age(since, now)})
        sample.sort(key=lambda s: s["age_seconds"] or 0.0, reverse=True)
        kinds.append({
            "kind": kind,
            "label": label,
            "count": len(ids),
            "capped": len(ids) >= settings.sweep_batch_size,
            "oldest_seconds": sample[0]["age_seconds"] if sample else None,
            "sample": sample,
        })
    return kinds


def _cancels(ctx: Context, now: datetime) -> dict[str, Any]:
    with ctx.db.reading() as session:
        open_ = manager.open_cancels(session, SAMPLE)
        finished = manager.cancels_finished_since(session, now - WINDOW, MAX_RECENT)
    return {
        "open_cancels": {
            "count": open_.count,
            "oldest_seconds": _age(open_.oldest[0].cancel_requested_at, now)
            if open_.oldest else None,
            "oldest": [_open_view(w, now) for w in open_.oldest],
        },
        "recent": {
            "total": len(finished),
            "capped": len(finished) >= MAX_RECENT,
            "by_source_outcome": _by_source_outcome(finished),
            "latest": [_finished_view(c, now) for c in finished[:LATEST]],
        },
        "histogram": _histogram(finished),
    }


def _open_view(workflow: Workflow, now: datetime) -> dict[str, Any]:
    return {
        "id": workflow.id,
        "status": workflow.status,
        "source": workflow.cancel_source,
        "age_seconds": _age(workflow.cancel_requested_at, now),
        "taken": workflow.cancel_taken_at is not None,
    }


def _latency(cancel: FinishedCancel) -> float | None:
    if cancel.requested_at is None or cancel.finished_at is None:
        return None
    return _age(cancel.requested_at, cancel.finished_at)


def _finished_view(cancel: FinishedCancel, now: datetime) -> dict[str, Any]:
    return {
        "id": cancel.id,
        "source": cancel.source,
        "outcome": cancel.outcome,
        "actor": cancel.actor,
        "latency_seconds": _latency(cancel),
        "finished_seconds_ago": _age(cancel.finished_at, now),
    }


def _by_source_outcome(finished: list[FinishedCancel]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str], list[FinishedCancel]] = defaultdict(list)
    for cancel in finished:
        groups[(cancel.source or "unknown", cancel.outcome or "unknown")].append(cancel)
    rows = []
    for (source, outcome), cancels in sorted(groups.items()):
        latencies = [x for x in map(_latency, cancels) if x is not None]
        rows.append({
            "source": source, "outcome": outcome, "count": len(cancels),
            "p50_seconds": _quantile(latencies, 0.5), "p95_seconds": _quantile(latencies, 0.95),
            "max_seconds": max(latencies, default=None),
        })
    return rows


def _quantile(values: list[float], q: float) -> float | None:
    """The nearest-rank quantile: a latency that one of these cancels actually had."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def _histogram(finished: list[FinishedCancel]) -> dict[str, Any]:
    """Cancels by latency bar and outcome: ``counts[outcome][bar]``, the last bar past the
    last bound."""
    counts: dict[str, list[int]] = {}
    for cancel in finished:
        latency = _latency(cancel)
        if latency is None:
            continue
        bar = next((i for i, bound in enumerate(BUCKETS) if latency <= bound), len(BUCKETS))
        counts.setdefault(cancel.outcome or "unknown", [0] * (len(BUCKETS) + 1))[bar] += 1
    return {"bounds_seconds": list(BUCKETS), "counts": counts}
