"""The store's schema: what a store holds and how it is described (layers, settings, dtypes, steps, errors).

A store is a directory::

    manifest.json          format, tracked layers (sizes, projections), dtype, update rule, committed counts
    projections.safetensors   fitted projection bases (stores recorded with projection="fitted")
    adam_state.safetensors    Adam's moments of the layers it follows elementwise before the first recorded
                              step (stores whose optimizer had state: the rule's ``initial_step`` > 0)
    records.npy            one row per record: step, sample_id, weight, lr, rank
    grads/<layer>.npy      per-layer projected per-sample gradients, rows = records
    curv/<layer>.npy       curvature rows (passes x dim per record) for curvature='fisher'/'ggn'
    whitening/<layer>.npy  per step, the log row and column factors rows were whitened with (projected Adam),
                           then (``second_factors``) the second moment's row and column factors and sign
    embeddings/            see embeddings.py
    checkpoints/           model checkpoints (safetensors), for checkpoint queries
    shards/rank-NNNNN/     under torch.distributed: each rank's records as a store of its own

No Python objects are serialised: arrays are plain .npy (bfloat16 as its raw 16 bits), metadata
is JSON, fitted bases are safetensors. Nothing read from a store is trusted: a manifest is checked
field by field when the store opens (:func:`validate_manifest`, :func:`read_layers`), every name that
becomes a file name must pass :func:`check_name` (no separator, no '..': nothing outside the store), and
each array's header and size are checked against the committed counts (``arrays.check_array``). Format 1 (dvemb 0.1) stored the update rule as ``sgd`` and
``adam`` and named GPT-2's Conv1D ``conv1d`` and nn.Conv1d ``torch_conv1d``; both still open.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .._version import __version__
from ..projection import FactorProjection
from ..projection import from_dict as projection_from_dict
from ..update import SGD, Adam, UpdateRule  # noqa: F401  (SGD: StoreConfig's default rule)

FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)  # 1: update rule as 'sgd' and 'adam'; 1-2: old layer kind names
LEGACY_KINDS = {"conv1d": "hf_conv1d", "torch_conv1d": "conv1d"}  # kinds of format 1 and 2 -> today's
MANIFEST = "manifest.json"
PROJECTIONS = "projections.safetensors"  # fitted projection bases (see capture/fitting.py)
ADAM_STATE = "adam_state.safetensors"  # Adam's moments before the first recorded step (Store.initial_moments)
EMBEDDINGS_DIR = "embeddings"  # its layout: embed/layout.py
EMBEDDINGS_LAYOUT = 3  # version of that layout (3: plans of parts and blocks)

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


# -- names that become file paths --------------------------------------------------------------
NAME_CHARS = re.compile(r"[A-Za-z0-9._-]+")  # what safe_name writes
UNSAFE_CHARS = re.compile(r"[/\\\x00-\x1f\x7f]")  # what no name may hold: separators, NUL, control characters
MAX_NAME = 200  # characters of a layer's file stem: room for suffixes (".coarse-global.exp_avg_sq.npy") under 255
MAX_PART_NAME = MAX_NAME + 20  # an embeddings part: a layer's name and a suffix (".coarse-global")


def _name_problem(name: object, max_length: int = MAX_NAME) -> str | None:
    """Why ``name`` cannot be a file stem inside the store, or None when it can: one path component, not
    hidden. Any other character is read (stores written before :func:`safe_name` kept module names as they
    were, spaces and non-ASCII letters included); new names are written in :data:`NAME_CHARS`."""
    if not isinstance(name, str):
        return f"a name must be a string, got {type(name).__name__}"
    if not name:
        return "a name cannot be empty"
    if len(name) > max_length:
        return f"a name is at most {max_length} characters, got {len(name)}"
    if UNSAFE_CHARS.search(name) is not None:
        return "a name cannot hold a path separator or a control character"
    if name.startswith("."):
        return "a name cannot start with '.' (no '.', '..' or hidden file)"
    return None


def check_name(name: object, source: str | os.PathLike | None = None, max_length: int = MAX_NAME) -> str:
    """``name`` when it can be a file stem inside the store (a layer, a part of an embeddings plan); else a
    StoreError naming ``source`` (the file it was read from) and the name.

    Accepted: one path component of at most ``max_length`` characters, not starting with '.'; so no
    separator, no absolute path, no '..', nothing hidden.
    """
    problem = _name_problem(name, max_length)
    if problem is not None:
        where = f"{source}: " if source is not None else ""
        raise StoreError(f"{where}invalid name {name!r}: {problem}")
    return name


def safe_name(module_name: str) -> str:
    """A portable file stem for any module name: the name itself when it is in :data:`NAME_CHARS`
    (``transformer.h.0.mlp.c_fc``), else its characters outside the set replaced by '_', leading dots dropped,
    cut to length, and a hash of the whole name appended (distinct names stay distinct). Deterministic."""
    if NAME_CHARS.fullmatch(module_name) and _name_problem(module_name) is None:
        return module_name
    digest = hashlib.sha256(str(module_name).encode("utf-8", "surrogatepass")).hexdigest()[:12]
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", str(module_name)).lstrip(".")[: MAX_NAME - len(digest) - 1]
    return f"{stem}-{digest}" if stem else f"layer-{digest}"


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


def storage_tensor(tensor: torch.Tensor, dtype: str) -> torch.Tensor:
    """Rows in the storage dtype on their own device, contiguous (bfloat16 as its int16 bits)."""
    tensor = tensor.detach().to(dtype=_STORAGE[dtype][1]).contiguous()
    return tensor.view(torch.int16) if dtype == "bfloat16" else tensor


def storage_numpy(host: torch.Tensor, dtype: str) -> np.ndarray:
    """A host tensor from :func:`storage_tensor` as the store's numpy rows (no copy)."""
    return host.numpy().view(np.uint16) if dtype == "bfloat16" else host.numpy()


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

    @property
    def exact(self) -> bool:
        """Whether the rows are the exact per-sample gradients (no projection on either side)."""
        return self.proj_in.is_identity and self.proj_out.is_identity

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
    whitening: bool = False  # projected rows whitened by Adam's factored preconditioner; a factor row per layer and step
    whitened_exact: bool = False  # exact layers' rows whitened too (stores recorded before this flag existed)
    second_factors: bool = False  # whitening rows carry the second moment's factors too (see second_moment_factors)

    def elementwise(self, layer: int) -> bool:
        """Whether a layer follows Adam's per-parameter linearisation: Adam, exact rows, not whitened. Exact
        layers of a whitened store keep identity factor rows (zeros) and follow it too."""
        return isinstance(self.update, Adam) and self.layers[layer].exact and not (
            self.whitening and self.whitened_exact)


@dataclass(frozen=True)
class StepRecord:
    """One optimizer step as the writer appends it: records, and per layer its rows in the storage dtype.

    ``whitening`` (stores with whitening): per layer one row, the log row and column factors
    [d_out + d_in (+1)] its rows were whitened with, followed in stores with ``second_factors`` by the
    second moment's row and column factors and sign (:func:`second_moment_factors`).
    """

    sample_ids: np.ndarray
    weights: np.ndarray
    lr: float
    grads: Sequence[np.ndarray]
    curvature: Sequence[np.ndarray] | None = None
    rank: int = 0
    whitening: Sequence[np.ndarray] | None = None


WHITENING_DTYPE = np.dtype("<f8")


def whitening_width(spec: LayerSpec, second_factors: bool) -> int:
    """Values in a layer's whitening row: its two log factors, and with ``second_factors`` two factors and a sign."""
    side = spec.d_out + spec.d_in + spec.bias
    return 2 * side + 1 if second_factors else side


def whitening_factors(row: np.ndarray, spec: LayerSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """A whitening row's (log row factor [d_out], log column factor [d_in (+1)])."""
    row = torch.from_numpy(np.array(row, dtype=np.float64))
    return row[: spec.d_out], row[spec.d_out: spec.d_out + spec.d_in + spec.bias]


def second_moment_factors(row: np.ndarray, spec: LayerSpec) -> tuple[torch.Tensor, torch.Tensor, float]:
    """A whitening row's second-moment part: (row factor x [d_out], column factor y [d_in (+1)], sign), where
    sign * x y^T approximates Adam's coupling between a gradient and the update through v (capture/whitening.py)."""
    row = torch.from_numpy(np.array(row, dtype=np.float64))
    x = row[spec.d_out + spec.d_in + spec.bias:]
    return x[: spec.d_out], x[spec.d_out: -1], float(x[-1])


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
    whitening = bool(m.get("whitening", False))
    return StoreConfig(tuple(layers), m["dtype"], m["reduction"], m["curvature"], m["projection"], m["seed"], update,
                       whitening, bool(m.get("whitened_exact", whitening)),  # older stores whitened every layer
                       bool(m.get("second_factors", False)))


MAX_SIZE = 1 << 40  # largest layer size or count a manifest may state
MAX_SEED = (1 << 64) - 1


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class Fields:
    """Typed access to a JSON object read from a store file: a wrong type or range is a StoreError naming
    the file, the field and the value."""

    def __init__(self, data: object, source: str | os.PathLike, where: str = "") -> None:
        self.source, self.where = source, where
        if not isinstance(data, dict):
            self.fail(f"{where.rstrip('.') or 'the file'} must be a JSON object, got {type(data).__name__}")
        self.data: dict = data

    def fail(self, problem: str) -> None:
        """Raise the StoreError for ``problem``."""
        raise StoreError(f"{self.source} is invalid: {problem}")

    def _get(self, key: str, optional: bool) -> object:
        if key not in self.data:
            if optional:
                return None
            self.fail(f"{self.where}{key!r} is missing")
        return self.data[key]

    def integer(self, key: str, lo: int = 0, hi: int = MAX_SIZE, optional: bool = False) -> int | None:
        """An integer in [lo, hi] (a bool is not one)."""
        value = self._get(key, optional)
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            wanted = f"an integer >= {lo}" if hi == MAX_SIZE else f"an integer in [{lo}, {hi}]"
            self.fail(f"{self.where}{key!r} must be {wanted}, got {_show(value)}")
        return value

    def number(self, key: str, optional: bool = False) -> float | None:
        """A finite number."""
        value = self._get(key, optional)
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float)
                                                                            and not math.isfinite(value)):
            self.fail(f"{self.where}{key!r} must be a finite number, got {_show(value)}")
        return value

    def text(self, key: str, choices: Sequence[str] | None = None, optional: bool = False) -> str | None:
        """A non-empty string (one of ``choices`` when given)."""
        value = self._get(key, optional)
        if value is None and optional:
            return None
        if not isinstance(value, str) or not value or (choices is not None and value not in choices):
            wanted = f"one of {list(choices)}" if choices is not None else "a non-empty string"
            self.fail(f"{self.where}{key!r} must be {wanted}, got {_show(value)}")
        return value

    def flag(self, key: str, optional: bool = False) -> bool | None:
        """true or false."""
        value = self._get(key, optional)
        if value is None and optional:
            return None
        if not isinstance(value, bool):
            self.fail(f"{self.where}{key!r} must be true or false, got {_show(value)}")
        return value

    def array(self, key: str, optional: bool = False) -> list | None:
        """A JSON array."""
        value = self._get(key, optional)
        if value is None and optional:
            return None
        if not isinstance(value, list):
            self.fail(f"{self.where}{key!r} must be a list, got {_show(value)}")
        return value

    def child(self, key: str, optional: bool = False) -> "Fields | None":
        """A nested JSON object (None when optional and absent or null)."""
        value = self._get(key, optional)
        if value is None and optional:
            return None
        return Fields(value, self.source, f"{self.where}{key}.")


def validate_manifest(manifest: object, source: str | os.PathLike) -> dict:
    """Check a store manifest's fields (types, ranges, required keys), as read; the layers are checked by
    :func:`read_layers`. Returns the manifest."""
    f = Fields(manifest, source)
    missing = [k for k in _REQUIRED_KEYS if k not in f.data]
    if missing:
        f.fail(f"missing {', '.join(missing)}")
    f.text("library_version")
    f.text("dtype", tuple(_STORAGE))
    f.text("reduction")
    f.text("curvature")
    f.text("projection")
    f.integer("seed", 0, MAX_SEED)
    if not f.array("layers"):
        f.fail("'layers' lists no tracked layer")
    steps, records = f.integer("committed_steps"), f.integer("committed_records")
    if records < steps:
        f.fail(f"committed_records ({records}) is smaller than committed_steps ({steps}): every step has a record")
    f.number("created", optional=True)
    f.number("updated", optional=True)
    f.flag("whitening", optional=True)
    f.flag("whitened_exact", optional=True)
    f.flag("second_factors", optional=True)
    f.integer("curvature_passes", 0, 1 << 20, optional=True)
    f.integer("world_size", 1, 1 << 20, optional=True)
    for key in ("update", "sgd", "adam"):  # the update rule (format 1: 'sgd' and 'adam')
        f.child(key, optional=True)
    return f.data


# What identifies a recording: its creation time and the settings its rows depend on (not the counts, nor
# metadata added later, such as the final parameters' digest).
_IDENTITY_KEYS = ("format_version", "created", "dtype", "reduction", "curvature", "projection", "seed", "update",
                  "whitening", "whitened_exact", "second_factors", "layers", "curvature_passes", "world_size", "sgd",
                  "adam")


def store_fingerprint(manifest: dict) -> str:
    """Identity of a store's recording: a hash of its creation time and settings (layers and projections
    included; not the committed counts). Embeddings carry it: those of another store, or of a store
    recorded again at the same path, are not current."""
    identity = {k: manifest[k] for k in _IDENTITY_KEYS if k in manifest}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:32]


def _check_layer(d: object, source: str | os.PathLike, index: int) -> dict:
    """One layer description of the manifest, checked field by field."""
    f = Fields(d, source, f"layers[{index}].")
    check_name(f.data.get("name"), f"{source} (layers[{index}])")
    f.text("kind")
    d_in, d_out, bias = f.integer("d_in", 1), f.integer("d_out", 1), f.flag("bias")
    sides = {}
    for side, dim in (("proj_in", d_in + bias), ("proj_out", d_out)):
        p = f.child(side)
        got = p.integer("dim", 1)
        if got != dim:
            p.fail(f"{p.where}'dim' is {got}, the layer's sizes give {dim}")
        sides[side] = p.integer("k", 1, got)
        p.integer("seed", 0, MAX_SEED)
        p.text("kind")
        if not isinstance(p.data.get("fingerprint", ""), str):
            p.fail(f"{p.where}'fingerprint' must be a string, got {_show(p.data['fingerprint'])}")
    dim = f.integer("dim", 1, optional=True)
    if dim is not None and dim != sides["proj_in"] * sides["proj_out"]:
        f.fail(f"layers[{index}].'dim' is {dim}, its projections give {sides['proj_in'] * sides['proj_out']}")
    return f.data


def _load_projections(path: Path) -> dict[str, torch.Tensor]:
    return load_tensors(path / PROJECTIONS, "fitted projections")


def load_tensors(file: Path, what: str) -> dict[str, torch.Tensor]:
    """The tensors of a store's safetensors file (never executes code); a StoreError names ``what`` failed."""
    from safetensors.torch import load_file

    try:
        return load_file(str(file))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # safetensors' own errors (and a Rust panic) on a corrupt file
        text = " ".join(str(exc).split()) or type(exc).__name__
        raise StoreError(f"{file}: the store's {what} cannot be read ({text})") from None


def read_layers(path: Path, layers: list[dict], version: int = FORMAT_VERSION) -> list[LayerSpec]:
    """The manifest's layer specs, with fitted bases from ``projections.safetensors`` (never executes code);
    layer kinds of formats before 3 are renamed to today's. Every field is checked, and every name must be a
    file stem inside the store (:func:`check_name`): a StoreError names what is wrong."""
    source = path / MANIFEST
    if not isinstance(layers, list):
        raise StoreError(f"{source} is invalid: 'layers' must be a list, got {_show(layers)}")
    layers = [_check_layer(d, source, i) for i, d in enumerate(layers)]
    names = [d["name"] for d in layers]
    if len(set(names)) != len(names):
        raise StoreError(f"{source} is invalid: a layer name is listed twice ({sorted(names)})")
    if version < 3:
        layers = [{**d, "kind": LEGACY_KINDS.get(d["kind"], d["kind"])} for d in layers]
    fitted = any(d[side].get("kind") == "fitted" and d[side].get("fingerprint") for d in layers
                 for side in ("proj_in", "proj_out"))
    values = _load_projections(path) if fitted else {}
    try:
        return [LayerSpec.from_dict(d, values) for d in layers]
    except (KeyError, TypeError, ValueError) as exc:
        if "fitted projection" in str(exc):
            raise StoreError(f"{path / PROJECTIONS}: {exc}") from None
        raise StoreError(f"{source}: invalid layer description ({exc})") from None


def check_embeddings_manifest(info: object, source: str | os.PathLike, layout_version: int) -> dict:
    """Check an embeddings manifest's fields. Those of an older layout (``layout_version`` differs) are
    only checked for what tells them apart (they are recomputed); today's in full, every part name
    included (:func:`check_name`)."""
    f = Fields(info, source)
    f.integer("committed_steps")
    if f.integer("layout_version", 1, optional=True) != layout_version:
        return f.data
    f.integer("committed_records")
    boundaries = f.array("boundaries")
    if (len(boundaries) < 2 or any(isinstance(b, bool) or not isinstance(b, int) for b in boundaries)
            or boundaries[0] != 0 or boundaries[-1] != f.data["committed_steps"]
            or any(a >= b for a, b in zip(boundaries, boundaries[1:]))):
        f.fail(f"'boundaries' must rise from 0 to committed_steps, got {_show(boundaries)}")
    f.text("precision", ("float32", "float64"))
    f.text("blocking")
    f.integer("memory", 0, 1 << 62)
    f.text("store_fingerprint", optional=True)
    plan = f.child("plan")
    plan.text("kind")
    step_rank = plan.data.get("step_rank")
    if step_rank is not None:
        plan.number("step_rank")
        if not 0 < step_rank <= 1:
            plan.fail(f"plan.'step_rank' must lie in (0, 1], got {_show(step_rank)}")
    plan.text("second_moment", ("followed", "frozen"), optional=True)
    parts = plan.array("parts")
    if not parts:
        plan.fail("plan.'parts' is empty")
    for i, part in enumerate(parts):
        p = Fields(part, source, f"plan.parts[{i}].")
        check_name(p.data.get("name"), f"{source} (plan.parts[{i}])", MAX_PART_NAME)
        p.integer("layer", 0, MAX_SIZE)
        if "sketch" not in p.data:
            p.fail(f"{p.where}'sketch' is missing")
        p.integer("sketch", 1, optional=True)  # null: the whole layer
        p.integer("seed", 0, MAX_SEED)
        if p.number("sign") not in (1.0, -1.0):
            p.fail(f"plan.parts[{i}].'sign' must be 1 or -1, got {_show(p.data['sign'])}")
    flat: list = []
    for block in plan.array("blocks"):
        if not isinstance(block, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in block):
            plan.fail(f"plan.'blocks' must be lists of part indices, got {_show(block)}")
        flat += block
    if sorted(flat) != list(range(len(parts))):
        plan.fail(f"plan.'blocks' must hold each part's index once, got {_show(plan.data['blocks'])}")
    names = [p["name"] for p in parts]
    if len(set(names)) != len(names):
        plan.fail("plan.'parts' name a file twice")
    return f.data


def write_projections(path: Path, layers: Sequence[LayerSpec], fsync: bool = False) -> None:
    """Store the layers' fitted bases, atomically (temp file + rename); nothing when none is fitted."""
    values = {k: v.detach().to("cpu", torch.float64).contiguous() for s in layers for k, v in s.fitted_values().items()}
    if values:
        save_tensors(path / PROJECTIONS, values, fsync)


def save_tensors(file: Path, values: dict[str, torch.Tensor], fsync: bool = False) -> None:
    """Write tensors as safetensors, atomically (temp file + rename)."""
    from safetensors.torch import save_file

    tmp = file.with_name(file.name + ".tmp")
    save_file(values, str(tmp))
    if fsync:
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    os.replace(tmp, file)


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
        "whitened_exact": config.whitened_exact,
        "layers": [s.to_dict() for s in config.layers],
        "committed_steps": 0,
        "committed_records": 0,
        **({"second_factors": True} if config.second_factors else {}),  # absent: the stores recorded without it
    }
