"""ComfyUI's prompt validation, with its error shapes: what ``POST /prompt`` answers 400
with (unknown ``class_type``, missing or out-of-range inputs, bad or dangling links, no
output node), and the order in which a valid prompt's nodes run."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from comfy_cancel.embedded.comfyui_sim.nodes import NODE_TYPES, Input


def comfy_error(kind: str, message: str, details: str = "", **extra: Any) -> dict[str, Any]:
    return {"type": kind, "message": message, "details": details, "extra_info": extra}


@dataclass
class Validation:
    error: dict[str, Any] | None
    outputs: list[str] = field(default_factory=list)
    node_errors: dict[str, Any] = field(default_factory=dict)


def validate_prompt(prompt: Any) -> Validation:
    """ComfyUI's validation, with its error shapes. Converts values in place."""
    if not isinstance(prompt, dict) or not prompt:
        return Validation(comfy_error("no_prompt", "No prompt provided", "No prompt provided"))
    outputs: list[str] = []
    for node_id, node in prompt.items():
        if not isinstance(node, dict) or "class_type" not in node:
            return Validation(
                comfy_error(
                    "invalid_prompt",
                    "Cannot execute because a node is missing the class_type property.",
                    f"Node ID '#{node_id}'",
                )
            )
        class_type = node["class_type"]
        node_type = NODE_TYPES.get(class_type) if isinstance(class_type, str) else None
        if node_type is None:
            return Validation(
                comfy_error(
                    "invalid_prompt",
                    f"Cannot execute because node {class_type} does not exist.",
                    f"Node ID '#{node_id}'",
                )
            )
        if not isinstance(node.get("inputs"), dict):
            node["inputs"] = {}
        if node_type.output_node:
            outputs.append(node_id)
    if not outputs:
        return Validation(comfy_error("prompt_no_outputs", "Prompt has no outputs"))

    validated: dict[str, tuple[bool, list[dict[str, Any]]]] = {}
    good: list[str] = []
    node_errors: dict[str, Any] = {}
    messages: list[str] = []
    for output_id in sorted(outputs):
        if _validate_node(prompt, output_id, validated, set()):
            good.append(output_id)
            continue
        for node_id, (ok, reasons) in validated.items():
            # Nodes downstream of a bad node are invalid without reasons: not reported.
            if ok or not reasons:
                continue
            entry = node_errors.setdefault(
                node_id,
                {
                    "errors": reasons,
                    "dependent_outputs": [],
                    "class_type": prompt[node_id]["class_type"],
                },
            )
            if output_id not in entry["dependent_outputs"]:
                entry["dependent_outputs"].append(output_id)
        messages += [f"{r['message']}: {r['details']}" for r in validated[output_id][1]]
    if not good:
        error = comfy_error(
            "prompt_outputs_failed_validation",
            "Prompt outputs failed validation",
            "\n".join(messages),
        )
        return Validation(error, [], node_errors)
    return Validation(None, good, node_errors)


def _validate_node(
    prompt: dict[str, Any],
    node_id: str,
    validated: dict[str, tuple[bool, list[dict[str, Any]]]],
    visiting: set[str],
) -> bool:
    if node_id in validated:
        return validated[node_id][0]
    visiting.add(node_id)
    node = prompt[node_id]
    inputs: dict[str, Any] = node["inputs"]
    node_type = NODE_TYPES[node["class_type"]]
    errors: list[dict[str, Any]] = []
    valid = True
    for name, spec in node_type.inputs.items():
        if name not in inputs:
            errors.append(
                comfy_error(
                    "required_input_missing", "Required input is missing", name, input_name=name
                )
            )
            continue
        value = inputs[name]
        if isinstance(value, list):
            link_error = _check_link(prompt, name, spec, value)
            if link_error is not None:
                errors.append(link_error)
                continue
            source = value[0]
            if source in visiting:
                errors.append(
                    comfy_error(
                        "exception_during_validation",
                        "Exception when validating node",
                        f"Dependency cycle detected through node {source}",
                        exception_type="DependencyCycleError",
                        traceback=[],
                    )
                )
                continue
            if not _validate_node(prompt, source, validated, visiting):
                valid = False
            continue
        if spec.is_link:
            errors.append(
                comfy_error(
                    "return_type_mismatch",
                    "Return type mismatch between linked nodes",
                    f"{name}, received a value where a link to {spec.type} is required",
                    input_name=name,
                    input_config=spec.config(),
                    received_value=value,
                )
            )
            continue
        value_error = _check_value(inputs, name, spec)
        if value_error is not None:
            errors.append(value_error)
    visiting.discard(node_id)
    validated[node_id] = (valid and not errors, errors)
    return validated[node_id][0]


def _check_link(
    prompt: dict[str, Any], name: str, spec: Input, link: list[Any]
) -> dict[str, Any] | None:
    if len(link) != 2:
        return comfy_error(
            "bad_linked_input",
            "Bad linked input, must be a length-2 list of [node_id, slot_index]",
            name,
            input_name=name,
            input_config=spec.config(),
            received_value=link,
        )
    source, slot = link
    source_node = prompt.get(source) if isinstance(source, str) else None
    if source_node is None:
        # ComfyUI fails on the lookup (KeyError) and reports the exception.
        return comfy_error(
            "exception_during_validation",
            "Exception when validating node",
            repr(str(source)),
            exception_type="KeyError",
            traceback=[],
            input_name=name,
            linked_node=link,
        )
    return_types = NODE_TYPES[source_node["class_type"]].return_types
    if not isinstance(slot, int) or isinstance(slot, bool) or not 0 <= slot < len(return_types):
        return comfy_error(
            "exception_during_validation",
            "Exception when validating node",
            "tuple index out of range",
            exception_type="IndexError",
            traceback=[],
            input_name=name,
            linked_node=link,
        )
    received = return_types[slot]
    if received != spec.type:
        return comfy_error(
            "return_type_mismatch",
            "Return type mismatch between linked nodes",
            f"{name}, {received} != {spec.type}",
            input_name=name,
            input_config=spec.config(),
            received_type=received,
            linked_node=link,
        )
    return None


def _check_value(inputs: dict[str, Any], name: str, spec: Input) -> dict[str, Any] | None:
    value = inputs[name]
    if isinstance(value, dict) and "__value__" in value:
        value = value["__value__"]
    if spec.type in ("INT", "FLOAT", "STRING"):
        convert: Callable[[Any], Any] = {"INT": int, "FLOAT": float, "STRING": str}[spec.type]
        try:
            value = convert(value)
        except (TypeError, ValueError) as exc:
            return comfy_error(
                "invalid_input_type",
                f"Failed to convert an input value to a {spec.type} value",
                f"{name}, {value}, {exc}",
                input_name=name,
                input_config=spec.config(),
                received_value=value,
                exception_message=str(exc),
            )
        inputs[name] = value
    extra = {"input_name": name, "input_config": spec.config(), "received_value": value}
    if spec.min is not None and value < spec.min:
        return comfy_error(
            "value_smaller_than_min", f"Value {value} smaller than min of {spec.min}", name, **extra
        )
    if spec.max is not None and value > spec.max:
        return comfy_error(
            "value_bigger_than_max", f"Value {value} bigger than max of {spec.max}", name, **extra
        )
    if isinstance(spec.type, tuple) and value not in spec.type:
        return comfy_error(
            "value_not_in_list",
            "Value not in list",
            f"{name}: '{value}' not in {list(spec.type)}",
            **extra,
        )
    return None


def execution_order(prompt: Mapping[str, Any], outputs: Sequence[str]) -> list[str]:
    """Every node the outputs depend on, each after its inputs; an output node as soon as
    its inputs are done, like ComfyUI's scheduler (``ux_friendly_pick_node``), so an early
    SaveImage saves before the rest of the prompt runs (and an interrupt later keeps it)."""
    order: list[str] = []
    seen: set[str] = set()
    inputs_of: dict[str, set[str]] = {}

    def visit(node_id: str) -> None:
        if node_id in seen:
            return
        seen.add(node_id)
        linked = [value[0] for value in prompt[node_id]["inputs"].values()
                  if isinstance(value, list)]
        inputs_of[node_id] = set(linked)
        for input_id in linked:
            visit(input_id)
        order.append(node_id)

    for output_id in outputs:
        visit(output_id)
    # ``order`` is topological: its first node not yet run is always ready. Before it, any
    # output node whose inputs are all done goes first.
    done: set[str] = set()
    output_ids = set(outputs)
    waiting_outputs = [node_id for node_id in order if node_id in output_ids]
    scheduled: list[str] = []
    for node_id in order:
        ready = [o for o in waiting_outputs if o not in done and inputs_of[o] <= done]
        for output_id in ready:
            scheduled.append(output_id)
            done.add(output_id)
        if node_id not in done:
            scheduled.append(node_id)
            done.add(node_id)
    return scheduled
