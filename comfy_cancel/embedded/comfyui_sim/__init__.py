"""A simulated ComfyUI server: ComfyUI's HTTP and WebSocket API, no GPU, no models.

The embedded default runner, the demo's and the tests' runner. By concern:
:mod:`.nodes` (the node catalogue and simulated costs), :mod:`.validation` (ComfyUI's
prompt validation), :mod:`.server` (queue, execution, interrupts, events, routes),
:mod:`.workflows` (no-model workflows to run on it).
"""

from comfy_cancel.embedded.comfyui_sim.server import RunningSim, SimComfyUI, main, start_in_thread
from comfy_cancel.embedded.comfyui_sim.workflows import TINY_PROMPT, blur_chain, blur_workflow

__all__ = [
    "TINY_PROMPT",
    "RunningSim",
    "SimComfyUI",
    "blur_chain",
    "blur_workflow",
    "main",
    "start_in_thread",
]
