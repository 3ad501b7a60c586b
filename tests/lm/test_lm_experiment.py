"""`dvemb experiment lm-self` end to end on a tiny setting, and its text helpers."""

from __future__ import annotations

import argparse
import io
import json
import tarfile

import numpy as np
import pytest

from dvemb.studies import lm
from dvemb.studies.text import highlight, load_corpus, read_tar_texts, words

TINY = ["--n-train", "48", "--n-test", "6", "--seq-len", "16", "--vocab-size", "300", "--batch-size", "8",
        "--pretrain-steps", "10", "--projection-dim", "32", "--n-shown", "2", "--no-progress"]


def write_tar(path, members: dict[str, bytes]) -> None:
    """A .tar.gz holding ``members`` (name -> content)."""
    with tarfile.open(path, "w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def test_lm_self_runs_end_to_end(tmp_path, capsys):
    pytest.importorskip("transformers")
    topics = [d.text for d in load_corpus(None)[:15]]  # about 40 kB of CPython's pydoc topics, in three files
    write_tar(tmp_path / "corpus.tar.gz", {f"part{k}.txt": "\n".join(topics[k::3]).encode() for k in range(3)})
    parser = argparse.ArgumentParser()
    lm.add_arguments(parser)
    args = parser.parse_args(TINY + ["--data", str(tmp_path / "corpus.tar.gz"), "--out", str(tmp_path / "out"),
                                     "--store", str(tmp_path / "store")])
    assert lm.main(args) == 0
    assert "dvemb_record" in capsys.readouterr().out

    result = json.loads((tmp_path / "out" / "lm_self.json").read_text())
    assert result["training"]["steps"] == 3 * 6
    assert set(result["methods"]) == set(lm.METHODS)
    for method in result["methods"].values():
        assert len(method["fraction_ranked_first"]) == 3
        assert all(0 <= f <= 1 for f in method["fraction_ranked_first"])
    assert len(result["test_points"]) == 6
    page = (tmp_path / "out" / "lm_self.html").read_text()
    assert page.count("<h2>Test point") == 2 and "<mark>" in page and "after epoch 3" in page
    assert sorted(p.name for p in (tmp_path / "store" / "checkpoints").iterdir()) == [
        "step_00000006.safetensors", "step_00000012.safetensors", "step_00000018.safetensors"]


def test_rank_counts_strictly_higher_scores():
    scores = np.array([[0.5, 0.9, 0.5, 0.1], [3.0, 1.0, 2.0, 0.0]])
    np.testing.assert_array_equal(lm.rank_of(scores, np.array([0, 0])), [2, 1])  # a tie does not push it down


def test_tar_corpus_and_highlighting(tmp_path):
    path = tmp_path / "plays.tar.gz"
    write_tar(path, {"b.txt": b"Who's there?", "a.txt": "caf\xe9".encode("latin-1"), "notes.md": b"skipped"})
    docs = read_tar_texts(path)
    assert [(d.name, d.text) for d in docs] == [("a.txt", "caf\xe9"), ("b.txt", "Who's there?")]
    assert len(load_corpus(None)) > 10  # CPython's pydoc topics
    assert words("Who's there? THERE") == {"who's", "there"}
    marked = highlight("Who's <there> & you", {"who's", "you"})
    assert marked == "<mark>Who&#x27;s</mark> &lt;there&gt; &amp; <mark>you</mark>"
