"""The store's schema: what a store holds and how it is described (layers, settings, dtypes, steps, errors).

A store is a directory::

    manifest.json          format, tracked layers (sizes, projections), dtype, update rule, committed counts
    projections.safetensors   fitted projection bases (stores recorded with projection="fitted")
    records.npy            one row per record: step, sample_id, weight, lr, rank
    grads/<layer>.npy      per-layer projected per-sample gradients, rows = records
    curv/<layer>.npy       curvature rows (passes x dim per record) for curvature='fisher'/'ggn'
    whitening/<layer>.npy  per step, the log row and column factors rows were whitened with (projected Adam)
    embeddings/            see embeddings.py
    checkpoints/           model checkpoints (safetensors), for checkpoint queries
    shards/rank-NNNNN/     under torch.distributed: each rank's records as a store of its own

No Python objects are serialised: arrays are plain .npy (bfloat16 as its raw 16 bits), metadata
is JSON, fitted bases are safetensors. Format 1 (dvemb 0.1) stored the update rule as ``sgd`` and
``adam`` and named GPT-2's Conv1D ``conv1d`` and nn.Conv1d ``torch_conv1d``; both still open.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .._version import __version__
from ..projection import FactorProjection
from ..projection import from_dict as projection_from_dict
from ..update import SGD, UpdateRule  # noqa: F401  (SGD: StoreConfig's default rule)

FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)  # 1: update rule as 'sgd' and 'adam'; 1-2: old layer kind names
LEGACY_KINDS = {"conv1d": "hf_conv1d", "torch_conv1d": "conv1d"}  # kinds of format 1 and 2 -> today's
MANIFEST = "manifest.json"
PROJECTIONS = "projections.safetensors"  # fitted projection bases (see capture/fitting.py)

RECORD_DTYPE = np.dtype([("step", "<i8"), ("sample_id", "<i8"), ("weight", "<f8"), ("lr", "<f8"), ("rank", "<i4")])

# Storage dtypes. numpy has no bfloat16: it is stored as its raw 16 bits.
_STORAGE = {
    "float16": (np.dtype("<f2"), torch.float16),
    "bfloat16": (np.dtype("<u2"), torch.bfloat16),
    "float32": (np.dtype("<f4"), torch.float32),
    "float64": (np.dtype("<f8"), torch.float64),
}


_REQUIRED_KEYS = ("library_version", "dtype", "reduction", "curvature", "projection", "seed", "layers",
                  "committed_steps", "committed_records")


_VOLATILE = ("committed_steps", "committed_records", "updated")  # manifest keys that change per commit


class StoreError(RuntimeError):
    """The store is missing, corrupt, or does not fit the request."""


def dtype_name(dtype: torch.dtype | str) -> str:
    """Canonical storage dtype name ('float32', ...) for a torch dtype or name."""
    name = str(dtype).removeprefix("torch.")
    if name not in _STORAGE:
        raise ValueError(f"unsupported storage dtype {dtype}; use one of {sorted(_STORAGE)}")
    return name


def to_torch(array: np.ndarray, dtype: str) -> torch.Tensor:
    """View stored rows as a torch tensor of the store's dtype (no copy where possible)."""
    if not isinstance(array, np.ndarray):  # a distributed store's rows, gathered from the shards
        array = np.asarray(array)
    if not array.flags.writeable:  # torch tensors cannot be read-only
        array = np.array(array)
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor.view(torch.bfloat16) if dtype == "bfloat16" else tensor


def to_numpy(tensor: torch.Tensor, dtype: str) -> np.ndarray:
    """Convert rows to the store's numpy storage dtype."""
    tensor = tensor.detach().to(device="cpu", dtype=_STORAGE[dtype][1]).contiguous()
    return (tensor.view(torch.int16).numpy().view(np.uint16) if dtype == "bfloat16" else tensor.numpy())


def all_finite(rows: np.ndarray, dtype: str) -> bool:
    """Whether stored rows hold no NaN or infinity (bfloat16: exponent bits not all set)."""
    if dtype == "bfloat16":
        return not ((rows & 0x7F80) == 0x7F80).any()
    return bool(np.isfinite(rows).all())


@dataclass(frozen=True)
class LayerSpec:
    """A tracked layer as recorded in the manifest: sizes and projections."""

    name: str
    kind: str
    d_in: int
    d_out: int
    bias: bool
    proj_in: FactorProjection
    proj_out: FactorProjection

    @property
    def dim(self) -> int:
        """Projected size of this layer's per-sample gradient (k_out * k_in)."""
        return self.proj_in.k * self.proj_out.k

    def to_dict(self) -> dict:
        """JSON form for the manifest."""
        return {
            "name": self.name, "kind": self.kind, "d_in": self.d_in, "d_out": self.d_out, "bias": self.bias,
            "proj_in": self.proj_in.to_dict(), "proj_out": self.proj_out.to_dict(), "dim": self.dim,
        }

    @classmethod
    def from_dict(cls, d: dict, values: dict[str, torch.Tensor] | None = None) -> "LayerSpec":
        """Inverse of :meth:`to_dict`; fitted bases come from ``values`` (see :meth:`fitted_values`)."""
        values = values or {}
        return cls(d["name"], d["kind"], d["d_in"], d["d_out"], d["bias"],
                   projection_from_dict(d["proj_in"], values.get(f"{d['name']}.in")),
                   projection_from_dict(d["proj_out"], values.get(f"{d['name']}.out")))

    def fitted_values(self) -> dict[str, torch.Tensor]:
        """The fitted bases' rows by key (``<name>.in``, ``<name>.out``), stored beside the manifest."""
        sides = {"in": self.proj_in, "out": self.proj_out}
        return {f"{self.name}.{k}": p.values for k, p in sides.items() if p.kind == "fitted" and p.values is not None}

    def describe(self) -> str:
        """Shape summary used in error messages."""
        return f"{self.kind} {self.d_in}->{self.d_out}{' +bias' if self.bias else ''}"


@dataclass(frozen=True)
class StoreConfig:
    """Settings fixed when a store is created."""

    layers: tuple[LayerSpec, ...]
    dtype: str
    reduction: str
    curvature: str = "gradient_outer"
    projection: str = "gaussian"
    seed: int = 0
    update: UpdateRule = SGD()
    whitening: bool = False  # rows whitened by Adam's factored preconditioner; one factor row per layer and step


@dataclass(frozen=True)
class StepRecord:
    """One optimizer step as the writer appends it: records, and per layer its rows in the storage dtype.

    ``whitening`` (stores with whitening): per layer one row, the log row and column factors
    [d_out + d_in (+1)] its rows were whitened with.
    """

    sample_ids: np.ndarray
    weights: np.ndarray
    lr: float
    grads: Sequence[np.ndarray]
    curvature: Sequence[np.ndarray] | None = None
    rank: int = 0
    whitening: Sequence[np.ndarray] | None = None


WHITENING_DTYPE = np.dtype("<f8")


def whitening_factors(row: np.ndarray, spec: LayerSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """A whitening row's (log row factor [d_out], log column factor [d_in (+1)])."""
    row = torch.from_numpy(np.array(row, dtype=np.float64))
    return row[: spec.d_out], row[spec.d_out:]


def whitening_level(row: np.ndarray, spec: LayerSpec) -> float:
    """The mean log whitening of a layer at a step (its log row plus column factors, averaged)."""
    r, c = whitening_factors(row, spec)
    return float(r.mean() + c.mean())


def _spec_difference(found: LayerSpec, wanted: LayerSpec) -> str:
    """The first field that differs between a stored layer and a requested one, in words."""
    if (found.name, found.kind, found.d_in, found.d_out, found.bias) != (wanted.name, wanted.kind, wanted.d_in,
                                                                        wanted.d_out, wanted.bias):
        return f"the store has {found.describe()}, the model {wanted.describe()}"
    for side in ("proj_in", "proj_out"):
        a, b = getattr(found, side), getattr(wanted, side)
        for key in ("k", "kind", "seed", "fingerprint"):
            if getattr(a, key) != getattr(b, key):
                what = {"proj_in": "input", "proj_out": "output"}[side]
                return (f"its {what} projection's {key} is {getattr(a, key)!r} in the store and {getattr(b, key)!r} "
                        "in the recorder (record with the store's projection_dim, projection and seed)")
    return "its description differs"


def read_config(manifest: dict, layers: Sequence[LayerSpec]) -> StoreConfig:
    """A manifest's creation settings (format 1's update rule from ``sgd`` / ``adam``)."""
    from ..update import legacy_rule, rule_from_dict

    m = manifest
    update = rule_from_dict(m["update"]) if "update" in m else legacy_rule(m)
    return StoreConfig(tuple(layers), m["dtype"], m["reduction"], m["curvature"], m["projection"], m["seed"], update,
                       bool(m.get("whitening", False)))


def read_layers(path: Path, layers: list[dict], version: int = FORMAT_VERSION) -> list[LayerSpec]:
    """The manifest's layer specs, with fitted bases from ``projections.safetensors`` (never executes code);
    layer kinds of formats before 3 are renamed to today's."""
    if version < 3:
        layers = [{**d, "kind": LEGACY_KINDS.get(d["kind"], d["kind"])} for d in layers]
    fitted = any(d[side].get("kind") == "fitted" and d[side].get("fingerprint") for d in layers
                 for side in ("proj_in", "proj_out"))
    values = {}
    if fitted:
        from safetensors.torch import load_file

        try:
            values = load_file(str(path / PROJECTIONS))
        except (OSError, ValueError) as exc:
            raise StoreError(f"{path / PROJECTIONS}: the store's fitted projections cannot be read ({exc})") from None
    try:
        return [LayerSpec.from_dict(d, values) for d in layers]
    except (KeyError, TypeError, ValueError) as exc:
        raise StoreError(f"{path / MANIFEST}: invalid layer description ({exc})") from None


def write_projections(path: Path, layers: Sequence[LayerSpec], fsync: bool = False) -> None:
    """Store the layers' fitted bases, atomically (temp file + rename); nothing when none is fitted."""
    values = {k: v.detach().to("cpu", torch.float64).contiguous() for s in layers for k, v in s.fitted_values().items()}
    if not values:
        return
    from safetensors.torch import save_file

    tmp = path / (PROJECTIONS + ".tmp")
    save_file(values, str(tmp))
    if fsync:
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    os.replace(tmp, path / PROJECTIONS)


def new_manifest(config: StoreConfig) -> dict:
    """The manifest of an empty store."""
    return {
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "created": time.time(),
        "dtype": config.dtype,
        "reduction": config.reduction,
        "curvature": config.curvature,
        "projection": config.projection,
        "seed": config.seed,
        "update": config.update.to_dict(),
        "whitening": config.whitening,
        "layers": [s.to_dict() for s in config.layers],
        "committed_steps": 0,
        "committed_records": 0,
    }
