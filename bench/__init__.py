"""The benchmark suite: ``python -m bench`` (or ``comfy-cancel bench``) from a checkout.

Every figure is measured on the whole system started by the suite itself: a real Redis and a
real PostgreSQL (from their PyPI wheels, :mod:`comfy_cancel.embedded.redis_server` and
:mod:`testbed.postgres`), real Celery worker processes, the simulated ComfyUI server and the
HTTP API on a socket (:func:`testbed.stack.running_stack`). Figures that matter are ratios
or distributions measured beside a named baseline in the same run, because the machines are
shared and noisy. See ``docs/BENCHMARKS.md`` for what each figure means."""
