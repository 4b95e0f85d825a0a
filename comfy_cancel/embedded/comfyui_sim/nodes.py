"""The simulated ComfyUI's node catalogue: the no-model node types, their inputs as
ComfyUI declares them (``/object_info``), and what each costs in simulated time."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

MAX_RESOLUTION = 16384
BLUR_STEPS = 10

UPSCALE_METHODS = ("nearest-exact", "bilinear", "area", "bicubic", "lanczos")
LATENT_UPSCALE_METHODS = ("nearest-exact", "bilinear", "area", "bicubic", "bislerp")
CROP_METHODS = ("disabled", "center")


@dataclass(frozen=True)
class Input:
    """One input of a node type: a value type (INT, FLOAT, STRING), a link type
    (IMAGE, LATENT) or a combo (a tuple of allowed strings)."""

    type: str | tuple[str, ...]
    default: Any = None
    min: float | None = None
    max: float | None = None

    @property
    def is_link(self) -> bool:
        return self.type in ("IMAGE", "LATENT")

    def config(self) -> list[Any]:
        """ComfyUI's ``input_config``: ``[type, options]``."""
        options: dict[str, Any] = {}
        if self.default is not None:
            options["default"] = self.default
        if self.min is not None:
            options["min"] = self.min
        if self.max is not None:
            options["max"] = self.max
        kind: Any = list(self.type) if isinstance(self.type, tuple) else self.type
        return [kind, options]


@dataclass(frozen=True)
class NodeType:
    inputs: dict[str, Input]
    return_types: tuple[str, ...]
    output_node: bool = False


def _size_inputs(minimum: int, default: int = 512) -> dict[str, Input]:
    return {
        "width": Input("INT", default, minimum, MAX_RESOLUTION),
        "height": Input("INT", default, minimum, MAX_RESOLUTION),
    }


NODE_TYPES: dict[str, NodeType] = {
    "EmptyImage": NodeType(
        {
            **_size_inputs(1),
            "batch_size": Input("INT", 1, 1, 4096),
            "color": Input("INT", 0, 0, 0xFFFFFF),
        },
        ("IMAGE",),
    ),
    "ImageScale": NodeType(
        {
            "image": Input("IMAGE"),
            "upscale_method": Input(UPSCALE_METHODS),
            **_size_inputs(0),
            "crop": Input(CROP_METHODS),
        },
        ("IMAGE",),
    ),
    "ImageScaleBy": NodeType(
        {
            "image": Input("IMAGE"),
            "upscale_method": Input(UPSCALE_METHODS),
            "scale_by": Input("FLOAT", 1.0, 0.01, 8.0),
        },
        ("IMAGE",),
    ),
    "ImageInvert": NodeType({"image": Input("IMAGE")}, ("IMAGE",)),
    "ImageBlur": NodeType(
        {
            "image": Input("IMAGE"),
            "blur_radius": Input("INT", 1, 1, 31),
            "sigma": Input("FLOAT", 1.0, 0.1, 10.0),
        },
        ("IMAGE",),
    ),
    "SaveImage": NodeType(
        {"images": Input("IMAGE"), "filename_prefix": Input("STRING", "ComfyUI")},
        (),
        output_node=True,
    ),
    "PreviewImage": NodeType({"images": Input("IMAGE")}, (), output_node=True),
    "EmptyLatentImage": NodeType(
        {**_size_inputs(16), "batch_size": Input("INT", 1, 1, 4096)}, ("LATENT",)
    ),
    "LatentUpscale": NodeType(
        {
            "samples": Input("LATENT"),
            "upscale_method": Input(LATENT_UPSCALE_METHODS),
            **_size_inputs(0),
            "crop": Input(CROP_METHODS),
        },
        ("LATENT",),
    ),
}


@dataclass(frozen=True)
class Tensor:
    """What flows along a link: only the shape matters to the simulation."""

    width: int
    height: int
    batch: int

    @property
    def pixels(self) -> int:
        return self.width * self.height * self.batch

    def resized(self, width: int, height: int) -> Tensor:
        # ComfyUI's 0 means "keep the aspect ratio from the other side".
        if width == 0 and height == 0:
            return self
        if width == 0:
            width = max(1, round(self.width * height / self.height))
        if height == 0:
            height = max(1, round(self.height * width / self.width))
        return Tensor(width, height, self.batch)


@dataclass(frozen=True)
class Work:
    """How long a node takes (before ``time_scale``), in how many interruptible
    progress steps (1: no progress bar), and what it returns."""

    seconds: float
    steps: int
    outputs: tuple[Tensor, ...]


def plan(class_type: str, args: Mapping[str, Any]) -> Work:
    """The simulated cost of one node, calibrated on a 2-core CPU."""
    if class_type == "EmptyImage":
        out = Tensor(args["width"], args["height"], args["batch_size"])
        return Work(0.005 + 1.5e-8 * out.pixels, 1, (out,))
    if class_type == "EmptyLatentImage":
        return Work(0.005, 1, (Tensor(args["width"], args["height"], args["batch_size"]),))
    if class_type in ("ImageScale", "LatentUpscale"):
        src = args["image"] if class_type == "ImageScale" else args["samples"]
        out = src.resized(args["width"], args["height"])
        return Work(0.01 + 4e-8 * max(src.pixels, out.pixels), 1, (out,))
    if class_type == "ImageScaleBy":
        src = args["image"]
        scale = args["scale_by"]
        out = Tensor(
            max(1, round(src.width * scale)), max(1, round(src.height * scale)), src.batch
        )
        return Work(0.01 + 4e-8 * max(src.pixels, out.pixels), 1, (out,))
    if class_type == "ImageInvert":
        return Work(0.005 + 2e-8 * args["image"].pixels, 1, (args["image"],))
    if class_type == "ImageBlur":
        # Cost grows with pixels and kernel width: 0.35 s at 512x512, 0.8 s at 768x768, r=31.
        kernel = (2 * args["blur_radius"] + 1) / 63
        src = args["image"]
        return Work(0.01 + 1.32e-6 * src.pixels * kernel, BLUR_STEPS, (src,))
    if class_type == "SaveImage":
        return Work(0.02 + 5e-8 * args["images"].pixels, 1, ())
    if class_type == "PreviewImage":
        return Work(0.01 + 3e-8 * args["images"].pixels, 1, ())
    raise RuntimeError(f"node type {class_type} has no simulation")
