"""Settings: one object, read from the environment with the prefix ``COMFY_CANCEL_``.

Every field has a default that runs the embedded stack on one machine; the
description of each field is its documentation (``comfy-cancel settings`` prints
them all).
"""

from __future__ import annotations

import math
import os
from functools import lru_cache
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from comfy_cancel.egress import parse_networks
from comfy_cancel.encryption import SecretKeyError, check_keys

ENV_PREFIX = "COMFY_CANCEL_"
CGROUP = Path("/sys/fs/cgroup")


def available_cores(cgroup: Path = CGROUP) -> int:
    """The cores this process may use: the CPUs it may run on, bounded by the CPU quota of
    its container (cgroup v2 ``cpu.max``, or v1's CFS quota), which ``os.cpu_count()``
    does not see."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    quota = _cpu_quota(cgroup)
    return max(1, min(cores, math.ceil(quota))) if quota else cores


def _cpu_quota(cgroup: Path) -> float | None:
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()[:2]  # "max 100000", v2
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((cgroup / "cpu" / "cpu.cfs_quota_us").read_text())  # -1: none, v1
        period_us = int((cgroup / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    database_url: str = Field(
        "sqlite:///comfy_cancel.db",
        description="SQLAlchemy URL of the database; PostgreSQL in production "
        "(postgresql+psycopg://user:pass@host/db), a local SQLite file by default.",
    )
    db_pool_size: int = Field(
        60,
        description="Database connections a process keeps open; at least its concurrency "
        "(worker threads, API threads), or connections are opened and closed per use.",
    )
    db_max_overflow: int = Field(
        20, description="Extra database connections a process may open at a peak."
    )
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        description="Redis used as the Celery broker and for cancel signals.",
    )
    result_backend: str | None = Field(
        None,
        description="Celery result backend; unset keeps no results (the database is the truth).",
    )
    api_host: str = Field("127.0.0.1", description="Address the HTTP API binds to.")
    api_port: int = Field(8000, description="Port of the HTTP API.")
    api_workers: int = Field(
        default_factory=available_cores,
        ge=1,
        description="HTTP API processes `comfy-cancel api` starts: its Python code is bound "
        "by one core per process (the GIL). Default: the cores this machine or container may "
        "use.",
    )

    cancel_grace_seconds: float = Field(
        10.0,
        description="How long a running workflow's runner has to acknowledge a cancel "
        "before the cancel worker escalates and writes outcome 'forced'.",
    )
    cancel_visibility_timeout_seconds: float | None = Field(
        None,
        description="Seconds a message on the cancel queues may stay unacknowledged before "
        "Redis hands it to another cancel worker (a killed worker's cancels land after about "
        "this long). It must outlast the longest cancel-side task, retries and the deadline "
        "checks of earlier versions included (held until their ETA): unset means "
        "COMFY_CANCEL_CANCEL_GRACE_SECONDS + 20.",
        gt=0,
    )
    cancel_batch_size: int = Field(
        1000,
        ge=1,
        description="Most workflow ids one batch of the cancel worker handles: cancel "
        "messages waiting together are handled in one database transaction (one "
        "compare-and-set for all, one revoke broadcast, one signal pipeline), and "
        "acknowledged after its commit. A message with more ids is a batch of its own.",
    )
    cancel_batches_in_flight: int = Field(
        2,
        ge=1,
        description="Batches one cancel worker process runs at once. A cancel is handed to a "
        "batch at once while fewer are running (a lone cancel never waits); otherwise it "
        "joins the next one, which starts when a running one ends.",
    )
    timeout_check_interval_seconds: float = Field(
        1.0,
        gt=0,
        description="How often each cancel worker looks for queued or running workflows past "
        "their own deadline (timeout_seconds at submission) and requests their cancel (source "
        "deadline): a timeout is honoured within about this long.",
    )
    deadline_check_interval_seconds: float = Field(
        1.0,
        gt=0,
        description="How often each cancel worker escalates the running cancels whose grace "
        "period is over (taken + cancel_grace_seconds), all of them in one batch: a runner "
        "that does not acknowledge is ended within the grace period plus about this long.",
    )
    heartbeat_interval_seconds: float = Field(
        2.0, description="How often a runner task writes its heartbeat while it drives a workflow."
    )
    progress_interval_seconds: float = Field(
        0.5,
        ge=0,
        description="Least time between two live progress updates of one run on "
        "GET /v1/workflow/{id}/subscribe (a node starting or finishing is sent at once); "
        "progress is published to Redis only, never written per event.",
    )
    stream_ping_seconds: float = Field(
        15.0,
        gt=0,
        description="How often GET /v1/workflow/{id}/subscribe sends a heartbeat (an SSE "
        "comment) on a quiet stream, so that proxies keep it open.",
    )
    heartbeat_timeout_seconds: float = Field(
        30.0,
        description="A running workflow whose heartbeat is older than this has lost its "
        "runner: a cancel ends it at once (outcome 'runner_lost') and the sweep cancels it.",
    )
    signal_ttl_seconds: int = Field(
        3600,
        description="Lifetime of the Redis key that carries a cancel signal to a runner "
        "that subscribes late.",
    )
    comfyui_timeout_seconds: float = Field(
        10.0, description="Timeout of one HTTP call to a ComfyUI server."
    )
    runner_allowed_networks: str = Field(
        "",
        description="Networks (comma-separated CIDRs, e.g. '10.20.0.0/16,fd00:1::/64') that "
        "runners may reach besides public addresses. Empty by default: a customer's runner URL "
        "may not reach loopback, private, link-local (cloud metadata), CGNAT, multicast or "
        "reserved addresses, because the workers connect from inside the operator's network. "
        "`dev` and `demo` allow 127.0.0.0/8 for their simulated ComfyUI.",
    )
    secret_key: str | None = Field(
        None,
        description="Fernet key(s) that encrypt runner header values at rest, comma-separated, "
        "newest first (older ones still decrypt: rotation). Without one, runners with headers "
        "are refused. Make one with `comfy-cancel runner new-key`; `dev` keeps one in its "
        "data dir.",
    )
    comfyui_retry_attempts: int = Field(
        4,
        description="Attempts a runner makes to deliver its cancel to an unreachable "
        "ComfyUI server (exponential backoff) before it leaves the rest to escalation.",
    )
    freed_confirm_timeout_seconds: float = Field(
        30.0,
        ge=0,
        description="After a cancel, how long a runner (and the cancel worker's direct cancel "
        "on escalation) watches ComfyUI's /queue, polling with backoff, for the prompt to be "
        "neither running nor pending before it records `freed_at` (GPU freed). Past it "
        "`freed_at` stays null: not confirmed. 0: one look, no waiting.",
    )
    max_run_seconds: float = Field(
        3600.0,
        description="A workflow running longer than this is cancelled by the sweep.",
    )
    queued_timeout_seconds: float = Field(
        1800.0, description="A workflow queued longer than this is handled by the queued sweep."
    )
    queued_timeout_policy: str = Field(
        "cancel",
        description="What the queued sweep does with a workflow queued too long: "
        "'cancel' or 'redispatch'.",
        pattern="^(cancel|redispatch)$",
    )
    sweep_interval_seconds: float = Field(
        15.0, description="How often Celery beat runs the sweeps."
    )
    redrive_interval_seconds: float = Field(
        2.0,
        description="How often Celery beat runs the re-drive pass: open cancels nobody took, "
        "and orphaned runner work, handed on again (cheap: it reads only through indexes).",
    )
    redrive_after_seconds: float = Field(
        3.0,
        description="A cancel request no cancel worker took this long after it was published "
        "is published again (one taken is the deadline check's: see "
        "deadline_check_interval_seconds).",
    )
    orphan_timeout_seconds: float = Field(
        15.0,
        description="A queued workflow whose runner task wrote no heartbeat for this long, or "
        "an accepted one no runner task claimed for this long (with the runner queue empty), "
        "is re-dispatched under a new runner task. Longer than one ComfyUI call "
        "(comfyui_timeout_seconds) plus a heartbeat interval; counted only while the "
        "database has been reachable (a database outage does not make runners orphans).",
    )
    max_redispatches: int = Field(
        3,
        description="Re-dispatches of one workflow whose runner task was lost before it is "
        "failed (exception_type 'RunnerTaskLost') instead.",
    )
    sweep_batch_size: int = Field(
        500, description="The most rows one sweep pass handles per kind of stuck work."
    )
    bulk_chunk_size: int = Field(
        1000, description="Rows per set statement and per pipelined batch in a bulk cancel."
    )
    runner_concurrency: int = Field(
        200,
        description="Workflows one runner worker process drives at once (threads that "
        "mostly wait on I/O).",
    )
    token_default_ttl_days: int | None = Field(
        None, description="Default lifetime of new API tokens in days; unset means no expiry."
    )
    max_workflow_bytes: int = Field(
        20 * 1024 * 1024,
        description="Largest workflow JSON the API accepts, in bytes; a bigger one gets 413.",
    )
    max_body_bytes: int = Field(
        64 * 1024,
        ge=1024,
        description="Largest request body of the API's other routes (runners, cancels), in "
        "bytes; a bigger one gets 413 before it is read.",
    )
    max_admin_body_bytes: int = Field(
        8 * 1024 * 1024,
        ge=1024,
        description="Largest request body of the operators' routes (a bulk cancel's id list), "
        "in bytes.",
    )
    max_json_depth: int = Field(
        64,
        ge=4,
        le=500,
        description="Deepest nesting of objects and lists the API accepts in a JSON body "
        "(a workflow included); a deeper one gets 400 before anything is stored.",
    )
    body_read_timeout_seconds: float = Field(
        60.0,
        gt=0,
        description="A request body must arrive whole within this; a slower one gets 408.",
    )
    rate_limit_requests: int = Field(
        40,
        ge=0,
        description="Requests one API token may make per rate-limit window (429 beyond); "
        "0 turns rate limiting off. A token's own limit (token create --rate-limit) wins.",
    )
    rate_limit_window_seconds: int = Field(
        10, ge=1, description="Length of the rate-limit window, in seconds."
    )
    log_level: str = Field("INFO", description="Log level of the API and the workers.")
    log_format: str = Field(
        "text",
        pattern="^(text|json)$",
        description="'text' (lines for a terminal) or 'json' (one JSON object per line, for "
        "a log collector; cancel-path lines carry workflow_id, cancel_source and outcome).",
    )
    api_metrics: bool = Field(
        True,
        description="Whether the API serves Prometheus metrics on /metrics, without a token "
        "(they hold counts, latencies, queue depths and runner ids, nothing secret); keep the "
        "path off the public internet at the proxy, or turn it off here.",
    )
    metrics_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="Port on which a worker process serves its Prometheus metrics "
        "(http://HOST:PORT/metrics); unset: none. Each worker process on a machine needs its "
        "own (`comfy-cancel worker --metrics-port`).",
    )
    metrics_host: str = Field(
        "127.0.0.1", description="Address a worker's metrics port binds to (0.0.0.0: all)."
    )
    task_events: bool = Field(
        True,
        description="Celery task events of the workers (worker_send_task_events), which "
        "Flower shows; off saves the cancel worker their publishes. Producers never send "
        "task-sent events (one more publish per API cancel).",
    )

    @field_validator("runner_allowed_networks")
    @classmethod
    def _networks(cls, value: str) -> str:
        parse_networks(value)  # a bad entry fails at startup, not at a runner's first run
        return value

    @field_validator("secret_key")
    @classmethod
    def _keys(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                check_keys(value)
            except SecretKeyError as exc:
                raise ValueError(str(exc)) from None
        return value


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings; tests call ``get_settings.cache_clear()`` after changing env."""
    return Settings()


def settings_environment(settings: Settings) -> dict[str, str]:
    """``settings`` as the ``COMFY_CANCEL_*`` variables that read back as them."""
    return {ENV_PREFIX + name.upper(): str(value)
            for name, value in settings.model_dump().items() if value is not None}


def child_environment(settings: Settings) -> dict[str, str]:
    """This process's environment with ``settings`` in place of its ``COMFY_CANCEL_*``
    variables: what a child process needs to run on the same settings."""
    inherited = {k: v for k, v in os.environ.items() if not k.upper().startswith(ENV_PREFIX)}
    return inherited | settings_environment(settings)


def secret_keys() -> str:
    """The configured keys of runner headers at rest ('' when none): the default of the
    callers of comfy_cancel.encryption, which reads no settings itself."""
    return get_settings().secret_key or ""
