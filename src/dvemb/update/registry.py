"""Which update rule a store follows: read from a torch optimizer, or from a manifest.

Adding an optimizer means one new :class:`~dvemb.update.rule.UpdateRule` subclass, registered in
``RULES`` and recognised by :func:`rule_of`.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import torch
from torch import nn

from .adam import Adam
from .rule import UpdateRule
from .sgd import SGD

RULES: dict[str, type[UpdateRule]] = {SGD.kind: SGD, Adam.kind: Adam}


def rule_from_dict(data: dict | None) -> UpdateRule:
    """The rule stored in a manifest (``{"kind": ..., fields}``); None is plain SGD."""
    if not data:
        return SGD()
    data = dict(data)
    kind = data.pop("kind", None)
    if kind not in RULES:
        raise ValueError(f"unknown update rule {kind!r}; known: {sorted(RULES)}")
    return RULES[kind](**data)


def legacy_rule(manifest: dict) -> UpdateRule:
    """The rule of a manifest written before ``update`` existed (fields ``sgd`` and ``adam``)."""
    adam = manifest.get("adam")
    if adam:  # these stores linearised Adam with frozen second moments
        return Adam(**adam, decoupled=True, second_moment="frozen")
    return SGD(**manifest["sgd"]) if manifest.get("sgd") else SGD()


def rule_of(optimizer: torch.optim.Optimizer | None, modules: Sequence[nn.Module]) -> UpdateRule:
    """The update rule of the optimizer groups holding the tracked layers (plain SGD without an optimizer).

    Optimizers and settings that cannot be followed are linearised as plain SGD with a warning:
    their scores are then an approximation.
    """
    if optimizer is None:
        return SGD()
    params = {id(p) for m in modules for p in m.parameters(recurse=False)}
    groups = [g for g in optimizer.param_groups if any(id(p) in params for p in g["params"])]
    if isinstance(optimizer, torch.optim.Adam):  # AdamW is a subclass
        rule, why = _adam(optimizer, groups, params)
    elif isinstance(optimizer, torch.optim.SGD):
        rule, why = _sgd(optimizer, groups, params)
    else:
        rule, why = None, ("is not SGD, Adam or AdamW; data value embeddings linearise theta <- theta - lr * grad "
                           "instead")
    if rule is None:
        warnings.warn(f"{type(optimizer).__name__} {why}, so scores are an approximation for this run", stacklevel=3)
        return SGD()
    return rule


def _one_setting(groups: list[dict], keys: Sequence[str]) -> tuple | None:
    """The groups' common values of ``keys``; None without groups; ValueError when they differ."""
    found = {tuple(_plain(g.get(k)) for k in keys) for g in groups}
    if len(found) > 1:
        raise ValueError(f"tracked layers are in optimizer groups with different {', '.join(keys)}: {sorted(found)}; "
                         "dvemb needs one setting for all tracked layers")
    return found.pop() if found else None


def _weight_decay(groups: list[dict], params: set[int]) -> float:
    """The tracked layers' weight decay. Where groups differ (the usual no-decay group for biases and norm
    weights), the value of the group holding most of the tracked elements, with a warning: the embeddings
    then decay the other parameters too, a relative error of at most 1 - prod(1 - lr * decay) over the run."""
    elements: dict[float, int] = {}
    for g in groups:
        decay = float(_plain(g.get("weight_decay", 0.0)))  # type: ignore[arg-type]
        elements[decay] = elements.get(decay, 0) + sum(p.numel() for p in g["params"] if id(p) in params)
    chosen = max(elements, key=lambda d: elements[d])
    if len(elements) > 1:
        warnings.warn(f"tracked layers are in optimizer groups with weight decays {sorted(elements)}; the embeddings "
                      f"apply weight_decay={chosen} (the group holding most of their elements) to all of them",
                      stacklevel=4)
    return chosen


def _plain(value: object) -> object:
    """Group values as hashable Python numbers (betas tuples, tensor lrs)."""
    if isinstance(value, torch.Tensor):
        return value.item()
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    return value


def _sgd(optimizer: torch.optim.SGD, groups: list[dict], params: set[int]) -> tuple[SGD | None, str]:
    found = _one_setting(groups, ("momentum", "dampening", "nesterov", "maximize"))
    if found is None:
        return SGD(), ""
    momentum, dampening, nesterov, maximize = found
    if maximize:
        raise ValueError("SGD(maximize=True) is not supported: the embeddings assume descent")
    fresh = not any(optimizer.state.get(p, {}).get("momentum_buffer") is not None
                    for g in groups for p in g["params"] if id(p) in params)
    return SGD(float(momentum), float(dampening) if momentum else 0.0, bool(nesterov), _weight_decay(groups, params),
               fresh), ""


def _adam(optimizer: torch.optim.Adam, groups: list[dict], params: set[int]) -> tuple[Adam | None, str]:
    found = _one_setting(groups, ("betas", "eps", "decoupled_weight_decay", "amsgrad", "maximize"))
    if found is None:
        return None, "holds none of the tracked layers"
    (beta1, beta2), eps, decoupled, amsgrad, maximize = found
    weight_decay = _weight_decay(groups, params)
    if amsgrad or maximize:
        return None, "with amsgrad or maximize is not modelled"
    counts = {_plain(optimizer.state[p].get("step", 0)) if p in optimizer.state else 0
              for g in groups for p in g["params"] if id(p) in params}
    if len(counts) > 1:
        return None, f"has taken different numbers of steps ({sorted(counts)}) on the tracked layers"
    decoupled = bool(decoupled) or isinstance(optimizer, torch.optim.AdamW)
    if weight_decay and not decoupled:
        return None, "with L2 weight decay needs theta_t in its moments, which the store does not keep (use AdamW)"
    return Adam(float(beta1), float(beta2), float(eps), float(weight_decay), decoupled,
                initial_step=int(counts.pop())), ""


def make_optimizer(rule: UpdateRule, params, lr: float) -> torch.optim.Optimizer:
    """A fresh torch optimizer that steps as ``rule`` describes (single-tensor implementation)."""
    if isinstance(rule, SGD):
        return torch.optim.SGD(params, lr=lr, momentum=rule.momentum, dampening=rule.dampening,
                               nesterov=rule.nesterov, weight_decay=rule.weight_decay, foreach=False)
    if isinstance(rule, Adam):
        kind = torch.optim.AdamW if rule.decoupled else torch.optim.Adam
        return kind(params, lr=lr, betas=(rule.beta1, rule.beta2), eps=rule.eps, weight_decay=rule.weight_decay,
                    foreach=False)
    raise TypeError(f"no torch optimizer for {type(rule).__name__}")
