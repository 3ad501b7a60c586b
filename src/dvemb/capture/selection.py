"""Choosing the tracked layers of a model and describing them for the manifest."""

from __future__ import annotations

import fnmatch
import warnings
from typing import Sequence

from torch import nn

from ..projection import ProjectionKind, layer_projections
from ..store import LayerSpec, safe_name
from .layers import has_bias, rule_for, supported_layers

ModuleSelection = None | str | Sequence[str]

# Wrapper prefixes that do not belong to a layer's identity (DDP, torch.compile).
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def canonical_name(name: str) -> str:
    """Layer name without wrapper prefixes such as DDP's ``module.``."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, stripped = name[len(prefix):], True
    return name


ROOT_NAME = "root"  # name of the model itself when it is a single supported layer


def named_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(canonical name, module) pairs, the root included as ``root``."""
    return [(canonical_name(n) if n else ROOT_NAME, m) for n, m in model.named_modules()]


def select_modules(model: nn.Module, modules: ModuleSelection = None) -> list[tuple[str, nn.Module]]:
    """Tracked (canonical name, module) pairs in model order.

    ``None`` tracks every trainable module of a supported type (:func:`~dvemb.supported_layers`;
    embeddings only when chosen); a string is a glob pattern over names; a sequence lists names
    exactly (each must exist and be supported).
    """
    named = named_modules(model)
    functional = _functional_layers(model)
    supported = [(n, m) for n, m in named if rule_for(m) is not None and id(m) not in functional]
    if modules is None:
        chosen = [(n, m) for n, m in supported if m.weight.requires_grad and rule_for(m).default]
        skipped = [n for n, m in named if id(m) in functional]
        if skipped:
            warnings.warn(f"{len(skipped)} layer(s) inside nn.MultiheadAttention ({skipped[0]}, ...) are applied "
                          "functionally (the module itself is never called), so their per-sample gradients cannot "
                          "be captured; they are not tracked, the other layers are", stacklevel=3)
    elif isinstance(modules, str):
        chosen = [(n, m) for n, m in supported if fnmatch.fnmatchcase(n, modules)]
        if not chosen:
            raise ValueError(f"no supported layer ({', '.join(supported_layers())}) matches {modules!r}; "
                             f"supported layers: {[n for n, _ in supported]}")
    else:
        by_name = dict(named)
        chosen = []
        for n in modules:
            n = canonical_name(n)
            if n not in by_name:
                raise ValueError(f"model has no module named {n!r}")
            if rule_for(by_name[n]) is None:
                raise ValueError(f"module {n!r} ({type(by_name[n]).__name__}) is not a supported layer type")
            if id(by_name[n]) in functional:
                raise ValueError(f"module {n!r} is applied functionally by its nn.MultiheadAttention (never called "
                                 "as a module), so its per-sample gradients cannot be captured")
            chosen.append((n, by_name[n]))
    for n, m in chosen:
        if not m.weight.requires_grad:
            raise ValueError(f"layer {n!r} is frozen (weight.requires_grad is False) and cannot be tracked")
    tied = _tied_weights(model)
    for n, m in list(chosen):
        owners = tied.get(id(m.weight), [n])
        if len(owners) > 1:
            message = (f"layer {n!r} shares its weight with {[o for o in owners if o != n]} (tied weights): its "
                       "per-sample gradient would miss the other uses")
            if modules is not None and not isinstance(modules, str):
                raise ValueError(message + "; leave it out of modules=")
            warnings.warn(message + "; it is not tracked", stacklevel=3)
            chosen.remove((n, m))
    if not chosen:
        raise ValueError(f"model has no trainable layer to track (supported: {', '.join(supported_layers())}; "
                         "dvemb.register_layer adds others)")
    return chosen


def _functional_layers(model: nn.Module) -> set[int]:
    """Ids of supported modules whose weights their parent uses directly: nn.MultiheadAttention's out_proj
    (its forward passes ``out_proj.weight`` to ``F.multi_head_attention_forward``; hooks never fire)."""
    return {id(child) for m in model.modules() if isinstance(m, nn.MultiheadAttention) for child in m.children()}


def _tied_weights(model: nn.Module) -> dict[int, list[str]]:
    """Parameter id -> names of the modules that hold it, for parameters held by several."""
    owners: dict[int, list[str]] = {}
    for name, module in named_modules(model):
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), []).append(name)
    return {k: v for k, v in owners.items() if len(v) > 1}


def layer_spec(name: str, module: nn.Module, budget: int | None, seed: int, kind: ProjectionKind) -> LayerSpec:
    """Describe one tracked module, with projections seeded per layer and side. Its name in the store is
    ``safe_name(name)``: the module's name unless that holds characters a file name should not."""
    rule = rule_for(module)
    assert rule is not None
    d_in, d_out = rule.sizes(module)
    bias = has_bias(module)
    stem = safe_name(name)
    proj_in, proj_out = layer_projections(stem, d_in + int(bias), d_out, budget, seed, kind)
    return LayerSpec(stem, rule.kind, d_in, d_out, bias, proj_in, proj_out)


def match_specs(model: nn.Module, specs: Sequence[LayerSpec]) -> list[nn.Module]:
    """Modules of ``model`` for recorded layer specs; a clear error names any mismatch."""
    modules = named_modules(model)
    named = dict(modules)  # a store names a layer by its module name, or by safe_name of it
    for name, module in modules:
        named.setdefault(safe_name(name), module)
    found = []
    for spec in specs:
        module = named.get(spec.name)
        if module is None:
            raise ValueError(f"store tracks layer {spec.name!r} ({spec.describe()}) but the model has no such module")
        rule = rule_for(module)
        actual = None
        if rule is not None:
            d_in, d_out = rule.sizes(module)
            actual = (rule.kind, d_in, d_out, has_bias(module))
        if actual != (spec.kind, spec.d_in, spec.d_out, spec.bias):
            got = type(module).__name__ if actual is None else f"{actual[0]} {actual[1]}->{actual[2]}{' +bias' if actual[3] else ''}"
            raise ValueError(f"layer {spec.name!r} does not match the store: recorded {spec.describe()}, model has {got}")
        found.append(module)
    return found
