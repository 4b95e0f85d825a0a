"""The embedded wing: everything ``comfy-cancel dev`` and ``demo`` run on one machine.

:mod:`.processes` supervises child processes and local servers (also for the tests and
the benchmark), :mod:`.redis_server` is the embedded Redis, :mod:`.comfyui_sim` the
simulated ComfyUI runner, :mod:`.dev` the whole stack, :mod:`.demo` its one-minute tour.
The core (``comfy_cancel``) never imports from here.
"""
