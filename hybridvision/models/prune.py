"""Pruned architectures: record the layer shapes structured pruning changed, and rebuild them on load.

A structurally pruned model (``distill/prune.py``, Torch-Pruning) keeps its modules but with fewer
channels: it no longer matches what ``create_segmenter(**build_kwargs)`` builds. The change is
recorded as data, per module, and re-applied after the factory builds the unpruned model::

    {"encoder.layer1.0.conv1": {"attributes": {"out_channels": 8},
                                "tensors": {"weight": [8, 16, 3, 3]}},
     "encoder": {"attributes": {"out_channels": [8, 16, 32, 64]}, "tensors": {}}, ...}

``attributes`` are the integer attributes pruning changed (``out_channels``, ``num_features``,
``normalized_shape``, ``groups``, the encoder contract's ``out_channels``, ...); ``tensors`` the new
shapes of the module's own parameters and buffers. :func:`save_pretrained` writes the record into
``config.json`` (``hybridvision.pruned``); :func:`from_pretrained` builds the model, calls
:func:`apply_pruned_shapes` and then loads the weights, which fill the re-shaped tensors exactly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = [
    "PRUNED_ATTRIBUTE",
    "ModuleShapes",
    "module_shapes",
    "pruned_shapes",
    "record_pruning",
    "apply_pruned_shapes",
]

#: attribute of a pruned model holding its record (written to ``config.json`` by ``save_pretrained``)
PRUNED_ATTRIBUTE = "pruned_shapes"

#: per module path: ``{"attributes": {name: int | list[int]}, "tensors": {name: shape}}``
ModuleShapes = dict[str, dict[str, dict[str, Any]]]


def _integer_attributes(module: nn.Module) -> dict[str, int | list[int]]:
    """The module's public integer (or integer tuple / list) attributes: its structural sizes."""
    found: dict[str, int | list[int]] = {}
    for name, value in vars(module).items():
        if name.startswith("_") or isinstance(value, bool):
            continue
        if isinstance(value, int):
            found[name] = value
        elif (
            isinstance(value, (tuple, list))
            and value
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        ):
            found[name] = list(value)
    return found


def _tensor_shapes(module: nn.Module) -> dict[str, list[int]]:
    """Shapes of the module's own (not its children's) parameters and buffers."""
    tensors = {**module._parameters, **module._buffers}
    return {name: list(t.shape) for name, t in tensors.items() if t is not None}


def module_shapes(model: nn.Module) -> ModuleShapes:
    """Integer attributes and tensor shapes of every module of ``model``, keyed by module path."""
    return {
        name: {"attributes": _integer_attributes(m), "tensors": _tensor_shapes(m)}
        for name, m in model.named_modules()
    }


def pruned_shapes(before: ModuleShapes, model: nn.Module) -> ModuleShapes:
    """What changed between ``before`` (:func:`module_shapes` of the unpruned model) and ``model``.

    Raises:
        ValueError: modules were added or removed (structured pruning only changes sizes).
    """
    after = module_shapes(model)
    if set(after) != set(before):
        added, removed = sorted(set(after) - set(before)), sorted(set(before) - set(after))
        raise ValueError(f"pruning changed the module tree: added {added[:5]}, removed {removed[:5]}")
    record: ModuleShapes = {}
    for name, now in after.items():
        was = before[name]
        attributes = {k: v for k, v in now["attributes"].items() if was["attributes"].get(k) != v}
        tensors = {k: v for k, v in now["tensors"].items() if was["tensors"].get(k) != v}
        if attributes or tensors:
            record[name] = {"attributes": attributes, "tensors": tensors}
    return record


def record_pruning(model: nn.Module, before: ModuleShapes) -> ModuleShapes:
    """Store on ``model`` (``model.pruned_shapes``) what pruning changed since ``before``; return it.

    A model pruned twice keeps one record relative to the factory's build: earlier entries are
    merged with the new changes.
    """
    record = {
        name: {"attributes": dict(entry["attributes"]), "tensors": dict(entry["tensors"])}
        for name, entry in (getattr(model, PRUNED_ATTRIBUTE, None) or {}).items()
    }
    for name, entry in pruned_shapes(before, model).items():
        merged = record.setdefault(name, {"attributes": {}, "tensors": {}})
        merged["attributes"].update(entry["attributes"])
        merged["tensors"].update(entry["tensors"])
    setattr(model, PRUNED_ATTRIBUTE, record)
    return record


def apply_pruned_shapes(model: nn.Module, record: ModuleShapes) -> nn.Module:
    """Re-shape the modules of a freshly built ``model`` as ``record`` says, in place.

    Parameters and buffers are replaced by zero tensors of the recorded shapes (same dtype, device and
    ``requires_grad``): load the pruned weights into them afterwards. The record is kept on the model,
    so saving it again writes the same architecture.

    Args:
        model: the unpruned model, as the factory builds it from ``build_kwargs``.
        record: :func:`pruned_shapes` of the pruned model (``config.json``'s ``hybridvision.pruned``).

    Raises:
        ValueError: the record names a module, attribute or tensor ``model`` does not have.
    """
    modules = dict(model.named_modules())
    for name, entry in record.items():
        if name not in modules:
            raise ValueError(f"pruned shapes name module {name!r}, which {type(model).__name__} lacks")
        module = modules[name]
        for attribute, value in entry.get("attributes", {}).items():
            if not hasattr(module, attribute):
                raise ValueError(f"pruned shapes: module {name!r} has no attribute {attribute!r}")
            current = getattr(module, attribute)
            setattr(module, attribute, tuple(value) if isinstance(current, tuple) else value)
        for tensor, shape in entry.get("tensors", {}).items():
            if tensor in module._parameters and module._parameters[tensor] is not None:
                old = module._parameters[tensor]
                new = torch.zeros(shape, dtype=old.dtype, device=old.device)
                module._parameters[tensor] = nn.Parameter(new, requires_grad=old.requires_grad)
            elif tensor in module._buffers and module._buffers[tensor] is not None:
                old = module._buffers[tensor]
                module._buffers[tensor] = torch.zeros(shape, dtype=old.dtype, device=old.device)
            else:
                raise ValueError(f"pruned shapes: module {name!r} has no parameter or buffer {tensor!r}")
    setattr(model, PRUNED_ATTRIBUTE, {k: dict(v) for k, v in record.items()})
    return model
