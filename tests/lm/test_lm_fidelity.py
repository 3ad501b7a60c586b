"""`dvemb evaluate lm-fidelity` end to end on its quick setting, with an extra configuration."""

from __future__ import annotations

import json

import pytest

from dvemb.cli import main
from dvemb.studies.lm_fidelity import LMFidelityOptions, run_study


def test_quick_run_scores_every_method_against_replay(tmp_path, capsys):
    pytest.importorskip("transformers")
    code = main(["evaluate", "lm-fidelity", "--quick", "--no-progress", "--out", str(tmp_path),
                 "--config", 'k32={"projection_dim": 32, "dtype": "float64"}'])
    assert code == 0
    result = json.loads((tmp_path / "lm-fidelity.json").read_text())
    assert result["options"]["extra_configs"] == {"k32": {"projection_dim": 32, "dtype": "float64"}}
    for setting, methods in result["summary"].items():
        names = [m["method"] for m in methods]
        assert names[:3] == ["dvemb", "dvemb-paper", "k32"], (setting, names)
        assert "exact-first-order" in names and "tracin-cp" in names
        # the ceiling tracks the replayed removals on this tiny run (measured 0.86 / 0.86 Spearman)
        exact = next(m for m in methods if m["method"] == "exact-first-order")
        assert exact["spearman"]["value"] > 0.5
    assert "| k32 |" in (tmp_path / "lm-fidelity.md").read_text()
    assert "k32" in capsys.readouterr().out


def test_an_extra_configuration_may_not_reuse_a_study_name():
    with pytest.raises(ValueError, match="already used"):
        run_study(LMFidelityOptions(extra_configs={"dvemb-paper": {}}, seeds=1))
