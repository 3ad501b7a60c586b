"""benchmarks/gpu_suite.py stays runnable without a GPU: ``--device cpu --tiny`` end to end, and its fallback model."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SUITE = BENCHMARKS / "gpu_suite.py"
TIMEOUT = 120


def run_suite(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path), "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, str(SUITE), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT)


def positive(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def test_tiny_cpu_run_writes_every_figure(tmp_path):
    out_dir = tmp_path / "results"
    done = run_suite(["--device", "cpu", "--tiny", "--results-dir", str(out_dir)], tmp_path)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    for heading in ("recorded/plain", "paper, Table 1 (A100): DVEmb 667.5 points/s, LoGRA 41.6, peak 0.84 GB",
                    "TFLOP/s", "influence GB/s", "copy bandwidth"):
        assert heading in done.stdout
    result = json.loads((out_dir / "gpu_suite_tiny.json").read_text())
    assert result["device"]["device"] == "cpu" and result["device"]["device_name"]
    assert result["device"]["torch"] == torch.__version__
    capture, recursion, scoring = result["capture"], result["recursion"], result["scoring"]
    assert capture["tracked_layers"] == 8 and capture["projection_dim"] == 1024 and capture["autocast"] == "bfloat16"
    figures = [capture[k] for k in ("plain_step_s", "recorded_step_s", "ratio", "records_per_s", "parameters")]
    figures += [recursion["flops"], result["copy_gb_per_s"], result["seconds"], scoring["bytes_per_query"]]
    for kind in ("float32", "tf32"):
        figures += [recursion[k][kind] for k in ("seconds", "tflops", "matmul_tflops", "vs_matmul")]
    assert [c["n_test"] for c in scoring["cases"]] == [1, 64]
    for case in scoring["cases"]:
        figures += [case[k][q] for k in ("seconds", "gb_per_s") for q in ("influence", "top_k")]
    assert set(result["peak_mib"]) == {"plain_training", "recorded_training", "recursion_float32", "recursion_tf32",
                                       "scoring"}
    figures += list(result["peak_mib"].values())
    assert all(positive(v) for v in figures), figures
    # 3 layers x 1024 values, 6 steps of 32 records, one propagator per layer: 4 N sum d^2
    assert recursion["flops"] == 4 * 6 * 32 * 3 * 1024 ** 2
    assert result["paper_table1"] == {"dvemb_points_per_s": 667.5, "logra_points_per_s": 41.6, "peak_gb": 0.84,
                                      "device": "A100"}
    left = [p.name for p in tmp_path.iterdir() if not p.name.startswith("torchinductor_")]  # torch's own cache
    assert left == ["results"]  # the stores lived in the temp dir, now removed


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
def test_cuda_without_a_gpu_is_one_line(tmp_path):
    done = run_suite(["--device", "cuda", "--tiny", "--results-dir", str(tmp_path)], tmp_path)
    assert done.returncode == 1
    assert done.stdout == "" and done.stderr.count("\n") == 1 and "no CUDA device" in done.stderr


def test_fallback_model_records_under_autocast(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import dvemb
    from gpu_suite import TRACKED, SmallGPT, lm_loss

    torch.manual_seed(0)
    model = SmallGPT(vocab=50, positions=16, layers=2, width=32, heads=4)
    tokens = torch.randint(0, 50, (3, 16))
    with dvemb.Recorder(model, tmp_path / "s", projection_dim=64, modules=TRACKED,
                        curvature="gradient_outer", projection="gaussian") as rec:
        with rec.step(range(3), lr=0.1):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = lm_loss(model, tokens)
            loss.backward()
    assert rec.layers == [f"transformer.h.{i}.{m}" for i in range(2)
                          for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    assert dvemb.Store(tmp_path / "s").n_records == 3
