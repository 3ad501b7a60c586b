"""Ground-truth trajectory-specific leave-one-out (TSLOO) by replaying training.

Training is mini-batch SGD over steps ``t = 0..T-1``::

    theta_{t+1} = theta_t - eta_t * grad L_t(theta_t)
    L_t(theta)  = sum_{i in B_t} w_ti * loss(theta, z_i)

or, with ``TrainingSpec(update=...)``, any :class:`~dvemb.update.UpdateRule`: torch.optim.SGD with
momentum, dampening, Nesterov and weight decay, or Adam / AdamW (the optimizer's buffers are
replayed with the parameters, with the same tensor operations as torch's single-tensor step).

with ``w_ti = 1/|B_t|`` for ``reduction="mean"`` and ``1`` for ``"sum"``. A *record* is one
use of one sample, ``(step t, sample id i)``. Removing a set of records sets their weights to
zero at their own steps only; every other weight keeps its value (the divisor stays ``|B_t|``).
If a sample id occurs more than once in the same batch, removing ``(t, i)`` removes every use of
``i`` at step ``t``.

``TSLOO(removal; target) = target(theta'_T) - target(theta_T)``, where ``theta'_T`` ends the same
run replayed with the removal: same initial parameters, batches, order and learning rates.
Positive means the removed records helped: removing them raised the target loss.

The replay is exact (float64 by default). Removals are sorted by their earliest removed step and
replayed in chunks with :func:`torch.func.vmap` over stacked parameter copies, each copy with its
own per-step weight vector. A chunk starts from the latest kept checkpoint at or before its
earliest removed step with a single base replica that replays the unmodified run; each removal
joins as a copy of the base replica at its own earliest removed step, so the steps before it are
never recomputed per removal. The base replica is also the chunk's reference ``theta_T``, so the
round-off of batching cancels in the difference.

The model runs in eval mode (dropout off) and nothing in a replay draws random numbers.
Parameters with ``requires_grad=False`` and buffers stay fixed at their initial values; models
whose forward updates buffers (batch norm in training mode) are not supported.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from ..progress import ProgressBar
from ..update import SGD, UpdateRule

Record = tuple[int, int]
"""One use of one sample: ``(step, sample_id)``."""

Params = dict[str, torch.Tensor]
"""Tensors of a model by qualified name (``model.named_parameters()`` naming)."""

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``loss(outputs, targets) -> [B]`` per-example losses, unweighted."""

StepFn = Callable[[Params, torch.Tensor, torch.Tensor, torch.Tensor, float, int], Params]
"""``step(state, x, y, w, lr, t) -> state`` after step t on the weighted batch loss (state: parameters by
name, and the optimizer's buffers as ``"<buffer>:<name>"``)."""


def per_example_cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross entropy of each example (``reduction="none"``): the default training loss."""
    return F.cross_entropy(outputs, targets, reduction="none")


@dataclass(frozen=True, eq=False)
class TrainingSpec:
    """A deterministic SGD run: everything needed to replay it exactly.

    The run lives on the device of ``inputs``; floating inputs, targets and the model are cast to
    ``dtype``. ``model_factory`` is called once per :func:`train` (its result gives theta_0).
    """

    model_factory: Callable[[], nn.Module]
    inputs: torch.Tensor
    targets: torch.Tensor
    batches: Sequence[Sequence[int]]
    lrs: Sequence[float] | float
    loss: LossFn = per_example_cross_entropy
    reduction: Literal["mean", "sum"] = "mean"
    dtype: torch.dtype = torch.float64
    update: UpdateRule = SGD()

    def __post_init__(self) -> None:
        """Checks that the run is well formed."""
        n = self.inputs.shape[0]
        if self.targets.shape[0] != n:
            raise ValueError(f"inputs have {n} rows but targets have {self.targets.shape[0]}")
        if self.reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {self.reduction!r}")
        if not isinstance(self.lrs, (int, float)) and len(self.lrs) != len(self.batches):
            raise ValueError(f"{len(self.lrs)} learning rates for {len(self.batches)} steps")
        for t, batch in enumerate(self.batches):
            ids = [int(i) for i in batch]
            if not ids:
                raise ValueError(f"batch of step {t} is empty")
            if min(ids) < 0 or max(ids) >= n:
                raise ValueError(f"batch of step {t} has a sample id outside [0, {n})")

    @property
    def num_steps(self) -> int:
        """Number of SGD steps T."""
        return len(self.batches)

    def batch(self, step: int) -> list[int]:
        """Sample ids used at ``step``, in batch order."""
        return [int(i) for i in self.batches[step]]

    def lr(self, step: int) -> float:
        """Learning rate eta_t of ``step``."""
        return float(self.lrs) if isinstance(self.lrs, (int, float)) else float(self.lrs[step])

    def weights(self, step: int) -> torch.Tensor:
        """Unmodified per-example weights w_t of ``step``: ``[B_t]``."""
        size = len(self.batches[step])
        value = 1.0 / size if self.reduction == "mean" else 1.0
        return torch.full((size,), value, dtype=self.dtype, device=self.inputs.device)

    def step_data(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets of the batch of ``step``."""
        index = torch.as_tensor(self.batch(step), device=self.inputs.device)
        return self._cast(self.inputs[index]), self._cast(self.targets[index])

    def build_model(self) -> nn.Module:
        """A new model from ``model_factory``, cast to ``dtype``, on the run's device, in eval mode.

        Eval mode turns dropout off, so nothing in training or a replay is random.
        """
        return self.model_factory().to(device=self.inputs.device, dtype=self.dtype).eval()

    def _cast(self, tensor: torch.Tensor) -> torch.Tensor:
        """Casts floating tensors to the run's dtype; leaves integer labels alone."""
        return tensor.to(self.dtype) if tensor.is_floating_point() else tensor


@dataclass(frozen=True, eq=False)
class Trajectory:
    """Parameters of a base run of ``spec``: theta_t at the kept steps and theta_T.

    ``checkpoints[t]`` holds the trainable parameters *before* step ``t``; step 0 is always kept.
    ``fixed`` holds the frozen parameters and buffers, which training never changes.
    ``buffers[t]`` holds the optimizer's buffers before step ``t`` (``"<buffer>:<name>"``; empty before
    the first step and for plain SGD).
    """

    spec: TrainingSpec
    checkpoints: Mapping[int, Params]
    final_params: Params
    fixed: Params
    buffers: Mapping[int, Params] = field(default_factory=dict)

    def params_at(self, step: int) -> Params:
        """theta_step: the kept parameters before ``step``; ``step == T`` gives the final ones."""
        if step == self.spec.num_steps:
            return self.final_params
        if step not in self.checkpoints:
            raise KeyError(f"step {step} was not kept; kept steps: {sorted(self.checkpoints)}")
        return self.checkpoints[step]

    def state_at(self, step: int) -> Params:
        """Parameters and optimizer buffers before a kept ``step``: where a replay starts."""
        return {**self.params_at(step), **self.buffers.get(step, {})}

    def latest_kept(self, step: int) -> int:
        """The latest step ``<= step`` whose parameters are available (T counts as kept)."""
        if step == self.spec.num_steps:
            return step
        return max(k for k in self.checkpoints if k <= step)

    def model(self, params: Params | None = None) -> nn.Module:
        """A model of the run holding ``params`` (default: the final parameters)."""
        model = self.spec.build_model()
        _load(model, {**self.fixed, **(self.final_params if params is None else params)})
        return model


@dataclass(frozen=True)
class _Plan:
    """One removal, resolved to batch positions: ``positions[t]`` are zeroed at step ``t``."""

    start: int
    positions: Mapping[int, list[int]]


def records_of(spec: TrainingSpec) -> list[Record]:
    """Every record ``(step, sample_id)`` in run order; a repeat within one batch is listed once."""
    return [(t, i) for t in range(spec.num_steps) for i in dict.fromkeys(spec.batch(t))]


def single_records(records: Iterable[Record]) -> list[list[Record]]:
    """One removal per record: the input of :func:`tsloo` for single-record TSLOO."""
    return [[(int(t), int(i))] for t, i in records]


def all_epoch_removal(spec: TrainingSpec, sample_ids: Iterable[int]) -> list[list[Record]]:
    """One removal per sample id, holding every record of that sample across the whole run.

    An id the run never uses gives an empty removal.
    """
    by_id: dict[int, list[Record]] = {}
    for t, i in records_of(spec):
        by_id.setdefault(i, []).append((t, i))
    return [list(by_id.get(int(i), [])) for i in sample_ids]


def train(
    spec: TrainingSpec, keep_steps: Iterable[int] = (), *, show_progress: bool = False
) -> Trajectory:
    """Runs the base training of ``spec``, keeping theta_t (before step t) at 0 and keep_steps."""
    keep = {int(t) for t in keep_steps} | {0}
    if min(keep) < 0 or max(keep) > spec.num_steps:
        raise ValueError(f"keep_steps must lie in [0, {spec.num_steps}]")
    model = spec.build_model()
    params, fixed = _split_state(model)
    step = _make_step(model, spec.loss, fixed, spec.update)
    state: Params = dict(params)
    checkpoints: dict[int, Params] = {}
    buffers: dict[int, Params] = {}
    with _deterministic():
        for t in ProgressBar(range(spec.num_steps), desc="train", unit="step", disable=not show_progress):
            if t in keep:
                checkpoints[t], buffers[t] = _split_buffers(state)
            state = step(state, *spec.step_data(t), spec.weights(t), spec.lr(t), t)
    return Trajectory(spec, checkpoints, _split_buffers(state)[0], fixed, buffers)


def tsloo(
    spec: TrainingSpec,
    removals: Sequence[Sequence[Record]],
    target: Callable[[nn.Module], torch.Tensor],
    *,
    trajectory: Trajectory | None = None,
    chunk_size: int = 64,
    show_progress: bool = True,
) -> np.ndarray:
    """Exact TSLOO of each removal by replaying training: ``[n_target, n_removals]`` float64.

    Each removal is a set of records ``(step, sample_id)``; an empty one scores 0.
    ``target(model)`` returns a 1-D tensor of per-test-point losses (a scalar counts as one
    target); it runs under ``torch.no_grad`` on a model in eval mode holding the replayed weights.
    ``trajectory`` is a base run of this very ``spec`` (trained here when omitted); a removal
    replays from the latest kept step at or before the earliest step of its chunk.
    ``chunk_size`` removals are replayed at once with ``vmap``, bounding memory.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    plans = [_plan(spec, removal) for removal in removals]
    order = sorted(range(len(plans)), key=lambda r: plans[r].start)
    chunks = [order[k : k + chunk_size] for k in range(0, len(order), chunk_size)]
    if trajectory is None:
        starts = [plans[chunk[0]].start for chunk in chunks]
        trajectory = train(spec, keep_steps=[s for s in starts if s < spec.num_steps])
    elif trajectory.spec is not spec:
        raise ValueError("trajectory was trained from a different TrainingSpec")
    model = trajectory.model()
    n_target = _evaluate(target, model, trajectory.final_params).shape[0]
    scores = np.zeros((n_target, len(plans)))
    begins = [trajectory.latest_kept(plans[chunk[0]].start) for chunk in chunks]
    step = vmap(_make_step(model, spec.loss, trajectory.fixed, spec.update), in_dims=(0, None, None, 0, None, None))
    total = sum(spec.num_steps - b for b in begins)
    with _deterministic(), ProgressBar(
        total=total, desc="TSLOO replay", unit="step", disable=not show_progress
    ) as bar:
        for chunk, begin in zip(chunks, begins):
            chunk_plans = [plans[r] for r in chunk]
            stacked = _replay(spec, step, trajectory.state_at(begin), begin, chunk_plans, bar)
            values = [_evaluate(target, model, _split_buffers(_row(stacked, k))[0]) for k in range(len(chunk) + 1)]
            for k, r in enumerate(chunk):
                scores[:, r] = values[k + 1] - values[0]
    return scores


def record_weight(spec: TrainingSpec, record: Record) -> float:
    """``w_ti`` of a record: the summed weight of every use of the sample in its step's batch."""
    t, i = int(record[0]), int(record[1])
    if not 0 <= t < spec.num_steps:
        raise ValueError(f"record {(t, i)}: step outside [0, {spec.num_steps})")
    hits = [p for p, j in enumerate(spec.batch(t)) if j == i]
    if not hits:
        raise ValueError(f"record {(t, i)}: sample {i} is not in the batch of step {t}")
    return float(spec.weights(t)[hits].sum())


def _plan(spec: TrainingSpec, removal: Sequence[Record]) -> _Plan:
    """Resolves a removal to the batch positions it zeroes, checking each record exists."""
    positions: dict[int, list[int]] = {}
    for t, i in removal:
        t, i = int(t), int(i)
        if not 0 <= t < spec.num_steps:
            raise ValueError(f"record {(t, i)}: step outside [0, {spec.num_steps})")
        hits = [p for p, j in enumerate(spec.batch(t)) if j == i]
        if not hits:
            raise ValueError(f"record {(t, i)}: sample {i} is not in the batch of step {t}")
        positions.setdefault(t, []).extend(hits)
    return _Plan(min(positions, default=spec.num_steps), positions)


def _replay(
    spec: TrainingSpec, step: StepFn, params: Params, begin: int, plans: list[_Plan], bar: ProgressBar
) -> Params:
    """Replays steps ``begin..T-1``: row 0 is the base run, row ``k+1`` drops ``plans[k]``.

    ``plans`` are sorted by start; replica ``k`` joins as a copy of row 0 at its start step.
    """
    stacked = {name: p.unsqueeze(0) for name, p in params.items()}
    for t in range(begin, spec.num_steps):
        stacked = _join(stacked, sum(plan.start <= t for plan in plans))
        x, y = spec.step_data(t)
        stacked = step(stacked, x, y, _weights(spec, t, plans[: _rows(stacked) - 1]), spec.lr(t), t)
        bar.update()
    return _join(stacked, len(plans))


def _join(stacked: Params, replicas: int) -> Params:
    """Grows the stack to ``1 + replicas`` rows, new rows copying row 0 (the unmodified run)."""
    new = 1 + replicas - _rows(stacked)
    if new == 0:
        return stacked
    return {n: torch.cat([p, p[:1].expand(new, *p.shape[1:])]) for n, p in stacked.items()}


def _weights(spec: TrainingSpec, step: int, plans: list[_Plan]) -> torch.Tensor:
    """Per-replica weights of ``step``: ``[1 + len(plans), B_t]``, row 0 unmodified."""
    w = spec.weights(step).repeat(1 + len(plans), 1)
    for k, plan in enumerate(plans):
        if step in plan.positions:
            w[k + 1, plan.positions[step]] = 0.0
    return w


def _rows(stacked: Params) -> int:
    """Number of replicas in a stack."""
    return next(iter(stacked.values())).shape[0]


def _row(stacked: Params, k: int) -> Params:
    """Parameters of replica ``k`` of a stack."""
    return {name: p[k] for name, p in stacked.items()}


def _make_step(model: nn.Module, loss: LossFn, fixed: Params, rule: UpdateRule = SGD()) -> StepFn:
    """One step of the optimizer ``rule`` describes on ``sum_i w_i loss_i``, run functionally through ``model``."""

    def batch_loss(
        params: Params, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor
    ) -> torch.Tensor:
        losses = loss(functional_call(model, (params, fixed), (x,)), y)
        if losses.shape != w.shape:
            raise ValueError(
                f"loss must return per-example losses {tuple(w.shape)}, got {tuple(losses.shape)}"
            )
        return (w * losses).sum()

    gradient = grad(batch_loss)

    def step(state: Params, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, lr: float, t: int) -> Params:
        params, buffers = _split_buffers(state)
        new_params, new_buffers = rule.step(params, gradient(params, x, y, w), buffers, lr, t)
        return {**new_params, **new_buffers}

    return step


def _split_buffers(state: Params) -> tuple[Params, Params]:
    """(parameters, optimizer buffers) of a replay state: buffer keys are ``"<buffer>:<name>"``."""
    return ({n: t for n, t in state.items() if ":" not in n}, {n: t for n, t in state.items() if ":" in n})


def _split_state(model: nn.Module) -> tuple[Params, Params]:
    """Detached copies of (trainable parameters, frozen parameters and buffers)."""
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    fixed = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    fixed.update({n: b.detach().clone() for n, b in model.named_buffers()})
    return trainable, fixed


def _load(model: nn.Module, tensors: Params) -> None:
    """Copies ``tensors`` into the parameters and buffers of ``model`` with the same names."""
    slots = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    with torch.no_grad():
        for name, tensor in tensors.items():
            slots[name].copy_(tensor)


def _evaluate(
    target: Callable[[nn.Module], torch.Tensor], model: nn.Module, params: Params
) -> np.ndarray:
    """``target(model)`` at ``params`` as a float64 vector."""
    _load(model, params)
    with torch.no_grad():
        value = torch.as_tensor(target(model))
    if value.ndim > 1:
        raise ValueError(f"target must return a scalar or 1-D tensor, got {tuple(value.shape)}")
    return value.detach().reshape(-1).to(device="cpu", dtype=torch.float64).numpy()


@contextlib.contextmanager
def _deterministic() -> Iterator[None]:
    """Asks for deterministic kernels during a replay (warning on ops without one), then restores.

    A setting the caller already enabled (strict or warn-only) is left as it is.
    """
    if torch.are_deterministic_algorithms_enabled():
        yield
        return
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False)
