"""The scripts in examples/ run end to end (``--tiny``) and print what they promise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TIMEOUT = 120
TORCH_OWN = ("torchinductor_", "torchelastic_")  # torch's own caches and torchrun's work folders in TMPDIR


def run(args: list[str], tmp_path: Path, clean: bool = True) -> str:
    """Run a command in ``tmp_path`` (also its temp dir) with one torch thread per process; return its stdout.

    ``clean``: the command (run without --out) must leave nothing behind, in the working directory or
    the temp dir.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path), "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, f"{args} exited {done.returncode}\n{done.stdout}\n{done.stderr}"
    if clean:
        left = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(TORCH_OWN))
        assert not left, f"{args} left {left}"
    return done.stdout


def test_plain_loop(tmp_path):
    out = run([sys.executable, str(EXAMPLES / "plain_loop.py"), "--tiny"], tmp_path)
    assert "recorded 12 steps" in out
    assert out.count("most helpful: step") == 5 and out.count("most harmful: step") == 5


def test_plain_loop_keeps_the_store_in_out(tmp_path):
    run([sys.executable, str(EXAMPLES / "plain_loop.py"), "--tiny", "--out", str(tmp_path / "kept")], tmp_path,
        clean=False)
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(TORCH_OWN)] == ["kept"]
    assert (tmp_path / "kept" / "store" / "manifest.json").exists()
    assert (tmp_path / "kept" / "store" / "embeddings" / "manifest.json").exists()


def test_cnn_dataloader(tmp_path):
    out = run([sys.executable, str(EXAMPLES / "cnn_dataloader.py"), "--tiny"], tmp_path)
    assert "update     SGD, momentum 0.9" in out
    assert out.count("most helpful step") == 4
    assert "score matrix (4, 320)" in out


def test_hf_trainer(tmp_path):
    pytest.importorskip("transformers")
    out = run([sys.executable, str(EXAMPLES / "hf_trainer.py"), "--tiny"], tmp_path)
    assert "recorded 6 optimizer steps, 48 records; update rule: Adam" in out
    assert "most helpful (highest scores) training windows:" in out


def test_ddp_torchrun(tmp_path):
    pytest.importorskip("torch.distributed")
    out = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(EXAMPLES / "ddp_torchrun.py"), "--tiny"], tmp_path)
    assert "rank 0: recorded 16 steps" in out and "rank 1: recorded 16 steps" in out
    assert "store: 16 steps, 256 records from 2 ranks" in out
    assert out.count("most helpful records") == 2  # and rank 0 removed its temporary store (run checks)


def test_checkpoint_queries(tmp_path):
    out = run([sys.executable, str(EXAMPLES / "checkpoint_queries.py"), "--tiny"], tmp_path)
    assert "checkpoints available to influence(checkpoint=l): [4, 8, 12]" in out
    for l, records in enumerate((128, 256, 384)):
        assert f"checkpoint {l} (step {4 * (l + 1)}): {records} records scored" in out

