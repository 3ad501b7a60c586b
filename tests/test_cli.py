"""The `dvemb` command line: info, embed, --version and error handling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dvemb
from dvemb.cli import main


@pytest.fixture
def run(tmp_path: Path) -> tuple[Path, nn.Module, torch.Tensor, torch.Tensor]:
    """A store recorded from 4 SGD steps of a tiny MLP, with the trained model and its data."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "run"
    with dvemb.Recorder(model, path, optimizer=opt) as rec:
        for b in range(4):
            ids = torch.arange(4 * b, 4 * b + 4)
            with rec.step(ids):
                F.cross_entropy(model(x[ids]), y[ids]).backward()
            opt.step()
            opt.zero_grad()
    return path, model, x, y


@pytest.fixture
def store(run: tuple[Path, nn.Module, torch.Tensor, torch.Tensor]) -> Path:
    """The recorded store's directory."""
    return run[0]


def test_info_prints_summary(store: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["info", str(store)]) == 0
    out = capsys.readouterr().out
    assert out.strip() == dvemb.Store(store).summary()
    assert "steps      4" in out and "records    16" in out
    assert "embeddings not computed" in out


@pytest.mark.parametrize("kind", ["missing", "file", "corrupt", "incomplete"])
def test_info_on_bad_store_exits_2_with_one_line(tmp_path: Path, kind: str, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "bad"
    if kind == "file":
        path.write_text("not a store")
    elif kind in ("corrupt", "incomplete"):
        path.mkdir()
        (path / "manifest.json").write_text("{oops" if kind == "corrupt" else '{"format_version": 1}')
    assert main(["info", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.strip()
    assert err.startswith("dvemb info: error: ") and "\n" not in err and "Traceback" not in err


def test_embed_writes_embeddings(store: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["embed", str(store), "--precision", "float64", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "16 records over 4 steps (float64)" in out and out.rstrip().endswith(" s")
    assert "embeddings up to date (float64 recursion)" in dvemb.Store(store).summary()


def test_embed_with_checkpoints_gives_the_same_scores(run: tuple[Path, nn.Module, torch.Tensor, torch.Tensor]) -> None:
    path, model, x, y = run

    def scores() -> np.ndarray:
        return dvemb.influence(path, model, lambda: F.cross_entropy(model(x[:3]), y[:3], reduction="none")).scores

    assert main(["embed", str(path), "--precision", "float64", "--no-progress"]) == 0
    single = scores()
    assert main(["embed", str(path), "--precision", "float64", "--checkpoints", "2", "--no-progress"]) == 0
    np.testing.assert_allclose(scores(), single, rtol=1e-9, atol=1e-12)


def test_embed_on_missing_store_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["embed", str(tmp_path / "nope")]) == 2
    assert "not a dvemb store" in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"dvemb {dvemb.__version__}"


def test_no_command_prints_help_and_fails(capsys: pytest.CaptureFixture) -> None:
    assert main([]) == 2
    assert "usage: dvemb" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["0", "-3", "abc"])
def test_bad_projection_dim_is_a_usage_error(value: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--projection-dim", value])
    assert exc.value.code == 2
    assert "--projection-dim" in capsys.readouterr().err


@pytest.mark.parametrize("group,study", [("evaluate", "fidelity"), ("experiment", "dynamics"),
                                         ("experiment", "selection"), ("experiment", "lm-self")])
def test_study_commands_are_wired(group, study, capsys):
    with pytest.raises(SystemExit) as exc:
        main([group, study, "--help"])
    assert exc.value.code == 0
    assert "--out" in capsys.readouterr().out
