"""Names vulture reports as unused that a framework uses (pyproject.toml, [tool.vulture]).

Only true positives of that kind belong here: each says who uses the name.
"""

# ruff: noqa: F821, B018
# fmt: off

# kombu calls these overrides of its Redis channel (comfy_cancel/broker.py).
_._get_pool
_._brpop_read
_._in_poll
# Read through dataclasses.asdict (BulkSummary.to_dict, SweepReport.counts).
_.too_late
_.already_terminal
_.not_cancellable
_.failed_to_signal
# SQLAlchemy: a TypeDecorator's hooks, and the DB-API connection's attribute it sets.
_.impl
_.cache_ok
_.process_bind_param
_.process_result_value
_.isolation_level
# A stored value of runners.status, set by operators in the database.
_.DISABLED
# pydantic: fields of response models, serialised to JSON.
_.requested_at
_.finished_at
_.age_seconds
_.user_id
# Celery calls a task's Strategy for the handler of its messages, and reads a bootstep's
# requires (comfy_cancel/batching.py).
_.Strategy
_.requires
# Celery and httpx caches dropped on purpose, and celery -A finding the app by this name.
_._pool
_._producer_pool
_.celery
# uvicorn calls these on its Server (testbed/stack.py), Celery reads these settings.
_.install_signal_handlers
_.should_exit
_.broker_url
_.broker_connection_retry
_.broker_connection_max_retries
# Module __getattr__ (PEP 562): `comfy_cancel.api:app` for uvicorn.
__getattr__
# Test-only: a route registered by its decorator, pytest fixtures taken for their effect,
# and hypothesis' state machine hooks.
whoami
broker_down
_.teardown
TestStatusWriter
# click calls these on the CLI's own Command and Group classes (cli.py).
_.get_short_help_str
_.command_class
_.group_class
_.list_commands
# kombu's ConsumerMixin reads these of a Celery event receiver (the Flower test).
_.on_consume_ready
_.should_stop
