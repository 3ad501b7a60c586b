"""Smoke runs of the benchmark scripts at tiny sizes: each still runs end to end against the current API.

Timings at these sizes mean nothing; what is checked is that a script exits cleanly and writes its
JSON (to a temporary folder, through $DVEMB_BENCHMARK_RESULTS, never over benchmarks/results).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CASES = {
    "scoring_efficiency": ["--steps", "2", "--dim", "16", "--n-test", "1"],
    "recursion_efficiency": ["--steps", "2", "--dim", "16"],
    "curvature_cost": ["--steps", "2"],
    "curvature_cost_adamw": ["--steps", "2", "--optimizer", "adamw"],
    "adam_recursion": ["--steps", "3", "--dim", "16"],
    "capture_overhead": ["--steps", "2", "--dims", "16"],
    "embedding_scale": ["--steps", "2", "--layers", "2"],
}
SLOW = {"embedding_scale"}  # ten fresh processes
SCRIPTS = {"curvature_cost_adamw": "curvature_cost"}  # cases of a script with other options


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in CASES])
def test_benchmark_runs_and_writes_its_results(tmp_path, name):
    env = {**os.environ, "DVEMB_BENCHMARK_RESULTS": str(tmp_path), "OPENBLAS_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{SCRIPTS.get(name, name)}.py"), "--runs", "5", *CASES[name]],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    written = list(tmp_path.glob("*.json"))
    assert written, done.stdout[-2000:]
    assert all(json.loads(p.read_text())["benchmark"] for p in written)
