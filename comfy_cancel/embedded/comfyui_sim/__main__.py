"""``python -m comfy_cancel.embedded.comfyui_sim``: the simulated ComfyUI on its own."""

import sys

from comfy_cancel.embedded.comfyui_sim.server import main

sys.exit(main())
