"""Model checkpoints saved by the Recorder at chosen steps, as safetensors files.

``checkpoints/step_00000100.safetensors`` holds theta_100: the parameters before
step 100's update (after step 99's). Names are canonical (no ``module.`` prefix), so a
checkpoint saved through a DDP wrapper loads into the bare model and the reverse.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from torch import nn

from .distributed import full_tensor
from .selection import canonical_name

CHECKPOINT_DIR = "checkpoints"
_PATTERN = re.compile(r"step_(\d+)\.safetensors$")


def checkpoint_file(store_path: str | os.PathLike, step: int) -> Path:
    """Path of the checkpoint of theta at ``step``."""
    return Path(store_path) / CHECKPOINT_DIR / f"step_{step:08d}.safetensors"


def save_checkpoint(store_path: str | os.PathLike, model: nn.Module, step: int, write: bool = True) -> Path:
    """Write the model's state at ``step`` (atomically: temp file + rename).

    FSDP-sharded (DTensor) entries are gathered whole first, a collective: every rank calls this, and only
    the one with ``write`` writes the file.
    """
    from safetensors.torch import save_file

    path = checkpoint_file(store_path, step)
    state, aliases, seen = {}, {}, {}
    for name, tensor in model.state_dict(keep_vars=False).items():
        name = canonical_name(name)
        key = (_storage_key(tensor), tensor.shape, tensor.stride())
        if key in seen:  # tied weights (e.g. GPT-2's lm_head and wte): stored once
            aliases[name] = seen[key]
        else:
            seen[key] = name
            state[name] = full_tensor(tensor.detach()).cpu().contiguous()
    if not write:
        return path
    path.parent.mkdir(exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata={"step": str(step), "aliases": json.dumps(aliases)})
    os.replace(tmp, path)
    return path


def _storage_key(tensor: object) -> int:
    """Where a tensor's data lives (a DTensor: its local shard's), to find tied entries."""
    local = getattr(tensor, "to_local", None)
    return (tensor if local is None else local()).data_ptr()


def saved_checkpoints(store_path: str | os.PathLike) -> list[int]:
    """Steps with a saved model checkpoint, ascending."""
    folder = Path(store_path) / CHECKPOINT_DIR
    if not folder.exists():
        return []
    return sorted(int(m.group(1)) for f in folder.iterdir() if (m := _PATTERN.match(f.name)))


def load_checkpoint(store_path: str | os.PathLike, model: nn.Module, step: int) -> nn.Module:
    """Load theta at ``step`` into ``model`` (in place) and return it; never executes code."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = checkpoint_file(store_path, step)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at step {step}; saved steps: {saved_checkpoints(store_path)}")
    state = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    state.update({alias: state[original] for alias, original in aliases.items()})
    own = {canonical_name(k): k for k in model.state_dict()}
    missing = sorted(set(own) - set(state))
    if missing:
        raise ValueError(f"checkpoint at step {step} lacks {missing[:5]}")
    model.load_state_dict({own[k]: v for k, v in state.items() if k in own})
    return model
