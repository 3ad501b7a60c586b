"""Reliability of reading stores: no path outside the store, a clear error for every damaged file, embeddings
tied to the store state they were computed from, finite scores, and a command line that never shows a traceback.

The command line runs in subprocesses: a few real ``python -m dvemb.cli`` processes, and, for the corpus and
the byte flips, one process that runs ``dvemb.cli`` as ``__main__`` once per command line (as ``-m`` does),
each with its own captured stdout and stderr, so a hundred command lines cost one interpreter start.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import dvemb
from dvemb.cli import main
from dvemb.store import Store, StoreError
from dvemb.store.schema import MAX_NAME, check_name, safe_name
import store_corpus as corpus

DRIVER = r"""
import contextlib, io, json, runpy, sys, traceback, warnings
warnings.filterwarnings("ignore", message=".*found in sys.modules.*")  # runpy, from the second run on
results = []
for argv in json.loads(sys.argv[1]):
    out, err, code = io.StringIO(), io.StringIO(), None
    sys.argv = ["dvemb.cli", *argv]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_module("dvemb.cli", run_name="__main__")
        except SystemExit as exc:
            code = exc.code
        except BaseException:
            code = "escaped"
            err.write(traceback.format_exc())
    results.append({"argv": argv, "code": code, "out": out.getvalue(), "err": err.getvalue()})
print(json.dumps(results))
"""


def run_cli_many(argvs: list[list[str]], timeout: float = 300) -> list[dict]:
    """Run each command line through ``dvemb.cli`` as ``__main__`` in one fresh interpreter."""
    done = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(argvs)], capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def assert_one_line_error(result: dict) -> None:
    """Exit 2, exactly one line on stderr, no traceback, no internal error."""
    where = f"{result['argv']}: exit {result['code']}, stderr {result['err']!r}"
    assert result["code"] == 2, where
    assert len(result["err"].strip().splitlines()) == 1, where
    assert "Traceback" not in result["err"] and "internal error" not in result["err"], where


def assert_no_traceback(result: dict) -> None:
    """Exit 0 or 2, never a traceback or an internal error."""
    where = f"{result['argv']}: exit {result['code']}, stderr {result['err'][-2000:]!r}"
    assert result["code"] in (0, 2, None), where
    assert "Traceback" not in result["err"] and "internal error" not in result["err"], where
    if result["code"] == 2:
        assert len(result["err"].strip().splitlines()) == 1, where


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """A valid store (exact gradients) with its embeddings, and the trained model."""
    path = tmp_path_factory.mktemp("base") / "store"
    model = corpus.record(path)
    dvemb.compute_embeddings(path, show_progress=False)
    return path, model


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """A valid store with fitted projections (projections.safetensors) and its embeddings."""
    path = tmp_path_factory.mktemp("fitted") / "store"
    model = corpus.record(path, projection_dim=6)
    assert (path / "projections.safetensors").exists()
    dvemb.compute_embeddings(path, show_progress=False)
    return path, model


def query(path: Path, model: torch.nn.Module) -> dvemb.Influence:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dvemb.influence(path, model, corpus.loss_fn(model))


# -- names ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["0", "transformer.h.0.mlp.c_fc", "root", "a-b_c.D9", "x" * MAX_NAME, "a..b"])
def test_safe_names_are_accepted_and_kept(name: str) -> None:
    assert check_name(name) == name
    assert safe_name(name) == name


@pytest.mark.parametrize("name", corpus.ATTACK_NAMES)
def test_unsafe_names_are_refused_and_mapped_to_safe_stems(name: object) -> None:
    with pytest.raises(StoreError, match=r"manifest\.json: invalid name"):
        check_name(name, "s/manifest.json")
    if isinstance(name, str):
        stem = safe_name(name)
        assert check_name(stem) == stem and safe_name(name) == stem  # accepted, deterministic
        assert "/" not in stem and not stem.startswith(".")


def test_safe_names_keep_distinct_names_distinct() -> None:
    names = ["a/b", "a b", "a_b", "a:b", "../a/b", "層", "", "root", "encoder.layers.0 ", "x" * 400, "x" * 401]
    assert len({safe_name(n) for n in names}) == len(names)


def test_the_longest_layer_name_works_in_every_embeddings_file(tmp_path):
    import torch.nn.functional as F

    torch.manual_seed(0)
    long = "l" * MAX_NAME
    model = torch.nn.Sequential()
    model.add_module(long, torch.nn.Linear(5, 4))
    model.add_module("act", torch.nn.Tanh())
    model.add_module("out", torch.nn.Linear(4, 3))
    x, y = corpus.data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)  # segments with a buffer suffix
    with dvemb.Recorder(model, tmp_path / "s", projection_dim=None, curvature="gradient_outer", optimizer=opt) as rec:
        for t in range(corpus.STEPS):
            with rec.step(range(corpus.BATCH * t, corpus.BATCH * (t + 1))):
                F.cross_entropy(model(x[corpus.BATCH * t: corpus.BATCH * (t + 1)]),
                                y[corpus.BATCH * t: corpus.BATCH * (t + 1)]).backward()
            opt.step()
            opt.zero_grad()
    dvemb.compute_embeddings(tmp_path / "s", blocking="hierarchical", checkpoints=2, show_progress=False)
    names = {p.name for p in (tmp_path / "s" / "embeddings").rglob("*.npy")}
    assert f"{long}.coarse-global.momentum_buffer.npy" in names
    closure = lambda: F.cross_entropy(model(x[:2]), y[:2], reduction="none")  # noqa: E731
    assert dvemb.influence(tmp_path / "s", model, closure, checkpoint=0).scores.shape == (2, corpus.BATCH * 2)


# -- a crafted manifest never reaches outside the store -------------------------------------------
def _attack_case(tmp_path: Path, base: Path, name: str, change) -> tuple[Path, Path, dict]:
    """A store under ``tmp_path/name/store`` damaged by ``change``, a file beside it that the attack aims
    at, and a snapshot of everything around the store."""
    case = tmp_path / name
    outside = case / corpus.OUTSIDE
    outside.mkdir(parents=True)
    np.save(outside / "important.npy", np.arange(12 * 20, dtype=np.float32).reshape(12, 20))
    path = corpus.build(base, case / "store", change)
    return case, path, corpus.snapshot(case, skip=path)


@pytest.mark.parametrize("name", corpus.ATTACK_NAMES)
def test_a_crafted_layer_name_is_refused_everywhere_and_nothing_outside_changes(tmp_path, base, name):
    path0, model = base
    case, path, before = _attack_case(tmp_path, path0, "case", lambda p: corpus.name_layer(p, name))
    for call in (lambda: Store(path), lambda: query(path, model),
                 lambda: dvemb.compute_embeddings(path, show_progress=False),
                 lambda: dvemb.Scorer(path), lambda: dvemb.Recorder(model, path)):
        with pytest.raises(StoreError, match="invalid name"):
            call()
    assert corpus.snapshot(case, skip=path) == before


def test_the_command_line_refuses_crafted_names_and_writes_nothing_outside(tmp_path, base):
    cases = [_attack_case(tmp_path, base[0], f"case{i}", lambda p, n=n: corpus.name_layer(p, n))
             for i, n in enumerate(corpus.ATTACK_NAMES)]
    results = run_cli_many([[command, str(path)] for _, path, _ in cases for command in ("info", "embed")])
    for result in results:
        assert_one_line_error(result)
        assert "invalid name" in result["err"]
    for case, path, before in cases:
        assert corpus.snapshot(case, skip=path) == before


@pytest.mark.parametrize("name", corpus.ATTACK_NAMES)
def test_a_crafted_part_name_in_the_embeddings_manifest_is_refused(tmp_path, base, name):
    path0, model = base
    case, path, before = _attack_case(tmp_path, path0, "case", lambda p: corpus.name_part(p, name))
    with pytest.raises(StoreError, match="invalid name"):
        dvemb.influence(path, model, corpus.loss_fn(model))
    with pytest.raises(StoreError, match="invalid name"):
        dvemb.Scorer(path)
    assert "embeddings unusable" in Store(path).summary()
    assert corpus.snapshot(case, skip=path) == before
    dvemb.compute_embeddings(path, show_progress=False)  # recomputing replaces them
    assert query(path, model).scores.shape == (2, corpus.STEPS * corpus.BATCH)
    assert corpus.snapshot(case, skip=path) == before


# -- every damaged store is a StoreError naming the file ------------------------------------------
@pytest.mark.parametrize("kind", sorted(corpus.STORE_CORRUPTIONS) + sorted(corpus.FITTED_CORRUPTIONS))
def test_every_damaged_store_is_a_store_error_naming_its_file(tmp_path, base, fitted, kind):
    source, model = fitted if kind in corpus.FITTED_CORRUPTIONS else base
    change = {**corpus.STORE_CORRUPTIONS, **corpus.FITTED_CORRUPTIONS}[kind]
    path = corpus.build(source, tmp_path / "store", change)
    for call in (lambda: Store(path), lambda: query(path, model),
                 lambda: dvemb.compute_embeddings(path, show_progress=False), lambda: dvemb.Scorer(path)):
        with pytest.raises(StoreError) as error:
            call()
        assert str(path) in str(error.value) and "\n" not in str(error.value)


@pytest.fixture(scope="module")
def corpus_stores(tmp_path_factory, base, fitted) -> list[Path]:
    root = tmp_path_factory.mktemp("corpus")
    stores = []
    for kind, change in sorted(corpus.STORE_CORRUPTIONS.items()) + sorted(corpus.FITTED_CORRUPTIONS.items()):
        source = fitted[0] if kind in corpus.FITTED_CORRUPTIONS else base[0]
        stores.append(corpus.build(source, root / kind, change))
    return stores


def test_the_command_line_gives_one_line_and_exit_2_for_every_damaged_store(corpus_stores):
    results = run_cli_many([[command, str(path)] for path in corpus_stores for command in ("info", "embed")])
    for result in results:
        assert_one_line_error(result)
        assert result["argv"][1] in result["err"]  # names the store's file


@pytest.mark.parametrize("kind", ["manifest_random_bytes", "grads_truncated", "grads_pickled_object_array"])
def test_python_m_dvemb_cli_on_a_damaged_store(tmp_path, base, kind):
    path = corpus.build(base[0], tmp_path / "store", corpus.STORE_CORRUPTIONS[kind])
    command = "embed" if kind == "grads_truncated" else "info"
    done = subprocess.run([sys.executable, "-m", "dvemb.cli", command, str(path)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith(f"dvemb {command}: error: {path}")


def test_python_m_dvemb_cli_and_python_m_dvemb_run_the_command_line(base):
    for module in ("dvemb.cli", "dvemb"):
        done = subprocess.run([sys.executable, "-m", module, "info", str(base[0])], capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == Store(base[0]).summary()


def test_an_unforeseen_failure_of_info_or_embed_is_one_line_unless_debugging(base, monkeypatch, capsys):
    monkeypatch.setattr(Store, "summary", lambda self, check=None: {}["boom"])
    assert main(["info", str(base[0])]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dvemb info: internal error: KeyError") and "DVEMB_DEBUG" in err
    monkeypatch.setenv("DVEMB_DEBUG", "1")
    with pytest.raises(KeyError):
        main(["info", str(base[0])])


# -- embeddings -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(corpus.EMBEDDINGS_CORRUPTIONS))
def test_damaged_embeddings_are_refused_by_queries_and_recomputed_by_embed(tmp_path, base, kind, capsys):
    path0, model = base
    path = corpus.build(path0, tmp_path / "store", corpus.EMBEDDINGS_CORRUPTIONS[kind])
    Store(path)  # the store itself is fine, and `dvemb info` says what is wrong with its embeddings
    assert main(["info", str(path)]) == 0
    assert f"embeddings unusable: {path / 'embeddings'}" in capsys.readouterr().out
    for call in (lambda: dvemb.influence(path, model, corpus.loss_fn(model)),
                 lambda: dvemb.top_k(path, model, corpus.loss_fn(model), 2),
                 lambda: dvemb.Scorer(path).influence(model, corpus.loss_fn(model))):
        with pytest.raises(StoreError, match="embeddings") as error:
            call()
        assert str(path / "embeddings") in str(error.value)
    dvemb.compute_embeddings(path, show_progress=False)
    np.testing.assert_allclose(query(path, model).scores, query(path0, model).scores, rtol=1e-5, atol=1e-7)


def test_a_scorer_refuses_embeddings_truncated_after_it_opened(tmp_path, base):
    path0, model = base
    path = corpus.build(path0, tmp_path / "store", lambda p: None)
    with dvemb.Scorer(path) as scorer:
        corpus.truncate(corpus.first_embeddings(path), 300)
        with pytest.raises(StoreError, match="truncated"):
            scorer.influence(model, corpus.loss_fn(model))


def test_embeddings_of_another_store_are_recomputed_not_used(tmp_path, base):
    path0, model = base
    other = tmp_path / "other"
    _record_permuted(other)  # the same layers and counts, another batch order: its embeddings would fit
    path = corpus.build(path0, tmp_path / "store", lambda p: None)
    shutil.rmtree(path / "embeddings")
    shutil.copytree(other / "embeddings", path / "embeddings")
    assert "stale: computed from another store" in Store(path).summary()
    with pytest.warns(UserWarning, match="computed from another store"):
        got = dvemb.influence(path, model, corpus.loss_fn(model))
    np.testing.assert_allclose(got.scores, query(path0, model).scores, rtol=1e-5, atol=1e-7)


def _record_permuted(path: Path) -> None:
    """A store of the same model and counts whose batches come in another order; with its embeddings."""
    import torch.nn.functional as F

    model = corpus.make_model()
    x, y = corpus.data()
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with dvemb.Recorder(model, path, projection_dim=None, curvature="gradient_outer", optimizer=opt) as rec:
        for t in range(corpus.STEPS):
            ids = order[corpus.BATCH * t: corpus.BATCH * (t + 1)]
            with rec.step(ids):
                F.cross_entropy(model(x[ids]), y[ids]).backward()
            opt.step()
            opt.zero_grad()
    dvemb.compute_embeddings(path, show_progress=False)


def test_embeddings_of_a_replaced_store_are_stale(tmp_path, base):
    path0, model = base
    path = corpus.build(path0, tmp_path / "store", lambda p: corpus.edit_manifest(
        p, lambda m: m.__setitem__("created", m["created"] + 1)))  # recorded again at the same path
    assert dvemb.embed.layout.embeddings_are_current(Store(path0))
    assert not dvemb.embed.layout.embeddings_are_current(Store(path))
    with pytest.warns(UserWarning, match="stale"):
        dvemb.influence(path, model, corpus.loss_fn(model))
    assert dvemb.embed.layout.embeddings_are_current(Store(path))
    info = json.loads((path / "embeddings" / "manifest.json").read_text())
    assert info["store_fingerprint"] != json.loads((path0 / "embeddings" / "manifest.json").read_text())[
        "store_fingerprint"]


def test_embeddings_that_do_not_name_their_store_state_are_recomputed(tmp_path, base):
    path0, model = base
    path = corpus.build(path0, tmp_path / "store", lambda p: corpus.edit_manifest(
        p, lambda m: m.pop("store_fingerprint"), "embeddings/manifest.json"))  # written before dvemb noted it
    assert "stale: computed by an older dvemb" in Store(path).summary()
    with pytest.warns(UserWarning, match="older dvemb"):
        dvemb.influence(path, model, corpus.loss_fn(model))
    assert dvemb.embed.layout.embeddings_are_current(Store(path))


# -- finite scores --------------------------------------------------------------------------------
def test_non_finite_embeddings_are_an_error_naming_the_file_and_row(tmp_path, base):
    path0, model = base
    path = corpus.build(path0, tmp_path / "store", lambda p: None)
    rows = np.load(corpus.first_embeddings(path), mmap_mode="r+")
    rows[5, 1] = np.inf
    rows.flush()
    del rows
    pattern = f"{corpus.first_embeddings(path)}: row 5 of the embeddings is not finite"
    with pytest.raises(StoreError, match=pattern.replace(".", r"\.")):
        dvemb.influence(path, model, corpus.loss_fn(model))
    with pytest.raises(StoreError, match="not finite"):
        dvemb.top_k(path, model, corpus.loss_fn(model), 3, chunk_rows=4)
    with dvemb.Scorer(path) as scorer, pytest.raises(StoreError, match="not finite"):
        scorer.top_k(model, corpus.loss_fn(model), 3)


def test_non_finite_propagators_are_an_error(tmp_path, base):
    path0, model = base
    path = corpus.build(path0, tmp_path / "store", lambda p: None)
    dvemb.compute_embeddings(path, checkpoints=3, show_progress=False)
    stack = np.load(path / "embeddings" / "segments" / "block-0.propagators.npy", mmap_mode="r+")
    stack[1, 0, 0] = np.nan  # K_1 carries test gradients at checkpoint 1 back to segment 0
    stack.flush()
    del stack
    with pytest.raises(StoreError, match="propagators hold non-finite values"):
        dvemb.influence(path, model, corpus.loss_fn(model), checkpoint=1)


def test_a_non_finite_test_loss_is_an_error_of_the_test_loss(base):
    path, model = base
    closure = corpus.loss_fn(model)
    with pytest.raises(ValueError, match="the test loss has non-finite gradients"):
        dvemb.influence(path, model, lambda: closure() * float("nan"))
    with pytest.raises(ValueError, match="the test loss has non-finite gradients"):
        dvemb.top_k(path, model, lambda: closure() * float("inf"), 2)


def test_a_test_loss_that_reaches_no_tracked_layer_speaks_of_the_query(base):
    path, model = base
    x = torch.randn(2, 5)

    def under_no_grad():
        with torch.no_grad():
            return model(x).sum(1)

    untracked = torch.nn.Parameter(torch.ones(2))
    cases = {
        "no_grad": under_no_grad,
        "no_layer": lambda: untracked * 2.0,  # depends on a parameter, through no tracked layer
        "first_layer_only": lambda: model[0](x).sum(1),  # never reaches layer '2'
    }
    for name, closure in cases.items():
        with pytest.raises(ValueError, match="test loss") as error:
            dvemb.influence(path, model, closure)
        assert "step" not in str(error.value), (name, error.value)
    with pytest.raises(ValueError, match="tracked layer '2'"):
        dvemb.influence(path, model, cases["first_layer_only"])


# -- random byte flips ----------------------------------------------------------------------------
def _flip_campaign(root: Path, source: tuple[Path, torch.nn.Module], copies: int, count: int) -> None:
    """Flip ``count`` random bits of each file of the store in ``copies`` copies; the command line and the
    queries never fail in another way than a clear error, and nothing outside the stores changes."""
    path0, model = source
    files = sorted(p.relative_to(path0) for p in path0.rglob("*") if p.is_file() and p.name != ".lock")
    root.mkdir()
    np.save(root / "important.npy", np.zeros(3))
    stores = []
    for i, rel in enumerate(files):
        for c in range(copies):
            stores.append(corpus.build(path0, root / f"{i}-{c}", lambda p, r=rel, s=1000 * i + c:
                                       corpus.flip_bytes(p / r, s, count)))
    before = corpus.snapshot(root, skip=None)
    before = {k: v for k, v in before.items() if not any(k.startswith(str(s)) for s in stores)}
    for path in stores:
        try:
            query(path, model)
        except (StoreError, ValueError) as exc:
            assert "\n" not in str(exc)
    results = run_cli_many([[command, str(path), *(["--no-progress"] if command == "embed" else [])]
                            for path in stores for command in ("info", "embed")])
    for result in results:
        assert_no_traceback(result)
    after = corpus.snapshot(root, skip=None)
    assert {k: v for k, v in after.items() if not any(k.startswith(str(s)) for s in stores)} == before


def test_random_byte_flips_never_give_a_traceback_or_write_outside(tmp_path, fitted):
    _flip_campaign(tmp_path / "flips", fitted, copies=3, count=3)


@pytest.mark.slow
@pytest.mark.parametrize("count", [1, 4, 32])
def test_many_random_byte_flips(tmp_path, base, fitted, count):
    _flip_campaign(tmp_path / "fitted", fitted, copies=25, count=count)
    _flip_campaign(tmp_path / "exact", base, copies=25, count=count)


@pytest.mark.slow
def test_python_m_dvemb_cli_on_every_damaged_store(corpus_stores):
    for path in corpus_stores:
        for command in ("info", "embed"):
            done = subprocess.run([sys.executable, "-m", "dvemb.cli", command, str(path)], capture_output=True,
                                  text=True, timeout=120)
            assert_one_line_error({"argv": [command, str(path)], "code": done.returncode, "err": done.stderr})
