"""Workflows the simulated ComfyUI runs without models: the demo's, the tests' and the
benchmark's (all no-model nodes, so a real ComfyUI runs them too)."""

from __future__ import annotations

from typing import Any

# EmptyImage -> ImageInvert -> SaveImage at 64x64: a few milliseconds.
TINY_PROMPT: dict[str, Any] = {
    "1": {"class_type": "EmptyImage",
          "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
    "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
    "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "tiny"}},
}


def blur_workflow(
    size: int = 768,
    blurs: int = 8,
    *,
    blur_radius: int = 31,
    output_size: int = 256,
    filename_prefix: str = "comfy-cancel",
) -> dict[str, Any]:
    """A no-model workflow: EmptyImage -> ``blurs`` x ImageBlur -> ImageInvert ->
    ImageScale -> SaveImage. With the defaults it runs about 6 s at ``time_scale`` 1."""
    prompt: dict[str, Any] = {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": size, "height": size, "batch_size": 1, "color": 0x808080},
        }
    }
    last = "1"
    for index in range(blurs):
        node_id = str(10 + index)
        prompt[node_id] = {
            "class_type": "ImageBlur",
            "inputs": {"image": [last, 0], "blur_radius": blur_radius, "sigma": 5.0},
        }
        last = node_id
    prompt["2"] = {"class_type": "ImageInvert", "inputs": {"image": [last, 0]}}
    prompt["3"] = {
        "class_type": "ImageScale",
        "inputs": {
            "image": ["2", 0],
            "upscale_method": "bilinear",
            "width": output_size,
            "height": output_size,
            "crop": "disabled",
        },
    }
    prompt["4"] = {
        "class_type": "SaveImage",
        "inputs": {"images": ["3", 0], "filename_prefix": filename_prefix},
    }
    return prompt


def blur_chain(
    blurs: int, size: int = 768, prefix: str = "out", *, early_save: int | None = None
) -> dict[str, Any]:
    """EmptyImage -> N x ImageBlur(radius 31) -> SaveImage: about 0.8 s a blur at 768² on
    the simulated ComfyUI at time_scale 1, interruptible at each progress step.

    ``early_save=k`` adds a second SaveImage (node ``early``, prefix ``<prefix>-early``)
    after the k-th blur: ComfyUI runs an output node as soon as its inputs are done, so a
    cancel later in the chain leaves that image saved (a partial output)."""
    prompt: dict[str, Any] = {
        "1": {"class_type": "EmptyImage",
              "inputs": {"width": size, "height": size, "batch_size": 1, "color": 0}},
    }
    previous = "1"
    for n in range(blurs):
        node = str(n + 2)
        prompt[node] = {"class_type": "ImageBlur",
                        "inputs": {"image": [previous, 0], "blur_radius": 31, "sigma": 5.0}}
        previous = node
        if early_save == n + 1:
            prompt["early"] = {"class_type": "SaveImage",
                               "inputs": {"images": [node, 0],
                                          "filename_prefix": f"{prefix}-early"}}
    prompt["save"] = {"class_type": "SaveImage",
                      "inputs": {"images": [previous, 0], "filename_prefix": prefix}}
    return prompt
