"""The embedded wing: everything ``comfy-cancel dev`` and ``demo`` run on one machine.

:mod:`.processes` supervises child processes and local servers (also for the tests and
the benchmark), :mod:`.celery_workers` starts Celery workers and pings them,
:mod:`.redis_server` is the embedded Redis, :mod:`.comfyui_sim` the simulated ComfyUI
runner. :mod:`.stack` composes the whole stack from its parts (:mod:`.data_dir`,
:mod:`.database`, :mod:`.children`); :mod:`.dev` runs it until Ctrl-C, :mod:`.demo` gives
its one-minute tour. The core (``comfy_cancel``) never imports from here.
"""
