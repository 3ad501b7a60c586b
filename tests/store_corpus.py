"""A corpus of malformed stores: a small valid store, and named ways to damage a copy of it.

Each corruption edits a copy of a store recorded from a tiny MLP (``record``) in place. Those of
``STORE_CORRUPTIONS`` damage the store itself: opening it must fail with a StoreError. Those of
``EMBEDDINGS_CORRUPTIONS`` damage computed embeddings: the store opens, queries must refuse them.
``ATTACKS`` name files outside the store through names read from a manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import dvemb
from dvemb.store import HEADER_BYTES

STEPS, BATCH = 3, 4
OUTSIDE = "outside_dir"  # a sibling of the store that attacks aim at


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(STEPS * BATCH, 5, generator=g), torch.randint(0, 3, (STEPS * BATCH,), generator=g)


def record(path: Path, projection_dim: int | None = None) -> nn.Module:
    """Record STEPS SGD steps of BATCH samples into ``path``; the trained model. ``projection_dim`` set:
    fitted projections (a projections.safetensors file)."""
    model = make_model()
    x, y = data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with dvemb.Recorder(model, path, projection_dim=projection_dim, curvature="gradient_outer",
                        optimizer=opt) as rec:
        for t in range(STEPS):
            ids = torch.arange(BATCH * t, BATCH * t + BATCH)
            with rec.step(ids):
                F.cross_entropy(model(x[ids]), y[ids]).backward()
            opt.step()
            opt.zero_grad()
    return model


def loss_fn(model: nn.Module) -> Callable[[], torch.Tensor]:
    """Per-example test losses of two points at ``model``."""
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(2, 5, generator=g), torch.randint(0, 3, (2,), generator=g)
    return lambda: F.cross_entropy(model(x), y, reduction="none")


# -- editing helpers ---------------------------------------------------------------------------
def manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def edit_manifest(path: Path, change: Callable[[dict], None], name: str = "manifest.json") -> None:
    data = json.loads((path / name).read_text())
    change(data)
    (path / name).write_text(json.dumps(data))


def truncate(file: Path, keep_bytes: int) -> None:
    with open(file, "r+b") as f:
        f.truncate(keep_bytes)


def first_grads(path: Path) -> Path:
    return path / "grads" / f"{manifest(path)['layers'][0]['name']}.npy"


def first_embeddings(path: Path) -> Path:
    return path / "embeddings" / f"{manifest(path)['layers'][0]['name']}.npy"


def _set(key: str, value: object) -> Callable[[Path], None]:
    return lambda p: edit_manifest(p, lambda m: m.__setitem__(key, value))


def _unsorted_steps(path: Path) -> None:
    records = np.load(path / "records.npy", mmap_mode="r+")
    records["step"][:BATCH] = 1  # step 1, then step 1, then ... step 0's records moved behind
    records["step"][BATCH: 2 * BATCH] = 0
    records.flush()


def _pickle_in_place(path: Path) -> None:
    rows = np.empty(STEPS * BATCH, dtype=object)
    rows[:] = [{"x": i} for i in range(len(rows))]
    with open(first_grads(path), "wb") as f:
        np.save(f, rows, allow_pickle=True)


def _raw_pickle(path: Path) -> None:
    first_grads(path).write_bytes(pickle.dumps(np.zeros((STEPS * BATCH, 3))))


def _random_manifest(path: Path) -> None:
    (path / "manifest.json").write_bytes(random.Random(0).randbytes(300))


def _corrupt_projections(path: Path) -> None:
    file = path / "projections.safetensors"
    assert file.exists(), "the corruption needs a store with fitted projections"
    data = bytearray(file.read_bytes())
    data[:8] = (10 ** 9).to_bytes(8, "little")  # a header length past the end of the file
    file.write_bytes(bytes(data))


def _changed_projection_values(path: Path) -> None:
    from safetensors.torch import load_file, save_file

    values = load_file(str(path / "projections.safetensors"))
    key = sorted(values)[0]
    values[key] = values[key] * 2  # no longer the fitted basis its fingerprint names
    save_file(values, str(path / "projections.safetensors"))


STORE_CORRUPTIONS: dict[str, Callable[[Path], None]] = {
    "manifest_random_bytes": _random_manifest,
    "manifest_json_list": lambda p: (p / "manifest.json").write_text("[1, 2, 3]"),
    "manifest_empty": lambda p: (p / "manifest.json").write_text(""),
    "manifest_deep_nesting": lambda p: (p / "manifest.json").write_text("[" * 100000 + "]" * 100000),
    "manifest_huge_integer": lambda p: (p / "manifest.json").write_text('{"format_version": ' + "9" * 5000 + "}"),
    "format_version_string": _set("format_version", "3"),
    "committed_steps_string": _set("committed_steps", "3"),
    "committed_steps_negative": _set("committed_steps", -1),
    "committed_steps_bool": _set("committed_steps", True),
    "committed_steps_float": _set("committed_steps", 3.0),
    "committed_records_null": _set("committed_records", None),
    "dtype_int8": _set("dtype", "int8"),
    "dtype_list": _set("dtype", ["float32"]),
    "layers_not_a_list": _set("layers", {"name": "0"}),
    "layers_empty": _set("layers", []),
    "layer_not_an_object": lambda p: edit_manifest(p, lambda m: m["layers"].__setitem__(0, "0")),
    "layer_missing_d_in": lambda p: edit_manifest(p, lambda m: m["layers"][0].pop("d_in")),
    "layer_d_in_string": lambda p: edit_manifest(p, lambda m: m["layers"][0].__setitem__("d_in", "5")),
    "layer_sizes_disagree": lambda p: edit_manifest(p, lambda m: m["layers"][0].__setitem__("d_in", 7)),
    "layer_projection_k_too_large": lambda p: edit_manifest(
        p, lambda m: m["layers"][0]["proj_in"].__setitem__("k", 99)),
    "layer_names_twice": lambda p: edit_manifest(
        p, lambda m: m["layers"][1].__setitem__("name", m["layers"][0]["name"])),
    "update_rule_unknown": _set("update", {"kind": "lion"}),
    "update_rule_bad_field": _set("update", {"kind": "sgd", "momentum": "lots"}),
    "whitening_without_files": _set("whitening", True),
    "curvature_passes_without_files": _set("curvature_passes", 2),
    "committed_records_too_large": lambda p: edit_manifest(p, lambda m: m.__setitem__(
        "committed_records", m["committed_records"] + 100)),
    "committed_steps_too_large": lambda p: edit_manifest(p, lambda m: m.__setitem__(
        "committed_steps", m["committed_steps"] + 2)),
    "records_truncated": lambda p: truncate(p / "records.npy", HEADER_BYTES + 40),
    "records_header_only": lambda p: truncate(p / "records.npy", 100),
    "records_steps_unsorted": _unsorted_steps,
    "records_lr_nan": lambda p: _records_column(p, "lr", np.nan),
    "grads_truncated": lambda p: truncate(first_grads(p), os.path.getsize(first_grads(p)) - 3),
    "grads_deleted": lambda p: first_grads(p).unlink(),
    "grads_pickled_object_array": _pickle_in_place,
    "grads_raw_pickle": _raw_pickle,
    "grads_wrong_dtype": lambda p: _rewrite_grads(p, np.float64),
    "grads_wrong_row_shape": lambda p: _rewrite_grads(p, np.float32, extra_column=True),
    "grads_is_a_directory": lambda p: (first_grads(p).unlink(), first_grads(p).mkdir()),
}


def _records_column(path: Path, column: str, value: float) -> None:
    records = np.load(path / "records.npy", mmap_mode="r+")
    records[column][1] = value
    records.flush()


def _rewrite_grads(path: Path, dtype: type, extra_column: bool = False) -> None:
    """A valid .npy with the store's fixed header, but of another dtype or row shape."""
    from dvemb.store import AppendableArray

    rows = np.load(first_grads(path))
    if extra_column:
        rows = np.concatenate([rows, rows[:, :1]], 1)
    first_grads(path).unlink()
    arr = AppendableArray(first_grads(path), np.dtype(dtype), rows.shape[1:])
    arr.open_for_append(0)
    arr.append(rows.astype(dtype))
    arr.close(len(rows))


FITTED_CORRUPTIONS: dict[str, Callable[[Path], None]] = {  # need a store with fitted projections
    "projections_corrupt": _corrupt_projections,
    "projections_deleted": lambda p: (p / "projections.safetensors").unlink(),
    "projections_values_changed": _changed_projection_values,
}


def _nan_row(path: Path) -> None:
    rows = np.load(first_embeddings(path), mmap_mode="r+")
    rows[2, 0] = np.nan
    rows.flush()


EMBEDDINGS_CORRUPTIONS: dict[str, Callable[[Path], None]] = {  # need computed embeddings
    "embeddings_truncated": lambda p: truncate(first_embeddings(p), os.path.getsize(first_embeddings(p)) - 5),
    "embeddings_deleted": lambda p: first_embeddings(p).unlink(),
    "embeddings_manifest_random": lambda p: (p / "embeddings" / "manifest.json").write_bytes(
        random.Random(1).randbytes(200)),
    "embeddings_manifest_list": lambda p: (p / "embeddings" / "manifest.json").write_text("[]"),
    "embeddings_precision_unknown": lambda p: edit_manifest(
        p, lambda m: m.__setitem__("precision", "float8"), "embeddings/manifest.json"),
    "embeddings_boundaries_bad": lambda p: edit_manifest(
        p, lambda m: m.__setitem__("boundaries", [0, 2, 1, 3]), "embeddings/manifest.json"),
    "embeddings_part_out_of_range": lambda p: edit_manifest(
        p, lambda m: m["plan"]["parts"][0].__setitem__("layer", 7), "embeddings/manifest.json"),
}

ATTACK_NAMES = (f"../../{OUTSIDE}/important", "/abs", "a/b", "..", ".", "", ".hidden", "a\\b", "a\x00b",
                "x" * 300, 7)


def name_layer(path: Path, name: object) -> None:
    """Give the store's first layer a crafted name (the attack)."""
    edit_manifest(path, lambda m: m["layers"][0].__setitem__("name", name))


def name_part(path: Path, name: object) -> None:
    """Give the first part of the embeddings' plan a crafted name (the attack)."""
    edit_manifest(path, lambda m: m["plan"]["parts"][0].__setitem__("name", name), "embeddings/manifest.json")


def build(base: Path, dst: Path, corrupt: Callable[[Path], None]) -> Path:
    """A copy of the store ``base`` at ``dst``, damaged by ``corrupt``."""
    shutil.copytree(base, dst)
    corrupt(dst)
    return dst


def flip_bytes(file: Path, seed: int, count: int = 3) -> None:
    """Flip ``count`` random bits of ``file`` (seeded), one per random byte."""
    data = bytearray(file.read_bytes())
    if not data:
        return
    rng = random.Random(seed)
    for _ in range(count):
        i = rng.randrange(len(data))
        data[i] ^= 1 << rng.randrange(8)
    file.write_bytes(bytes(data))


def snapshot(root: Path, skip: Path | None = None) -> dict[str, tuple[str, int, str]]:
    """Every entry under ``root`` (but ``skip``'s subtree): kind, size and content hash."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if skip is not None and (here == skip or skip in here.parents):
            dirnames[:] = []
            continue
        for name in dirnames:
            out[str(here / name)] = ("dir", 0, "")
        for name in filenames:
            file = here / name
            if file.is_symlink():
                out[str(file)] = ("link", 0, os.readlink(file))
            else:
                out[str(file)] = ("file", file.stat().st_size, hashlib.sha256(file.read_bytes()).hexdigest())
    return out
