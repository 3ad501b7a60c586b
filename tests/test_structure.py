"""The package's structure: layering of its modules, what `import dvemb` loads, layers added by users, old stores."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import dvemb
from dvemb.store import Store
from reference import per_sample_gradients, project

SRC = Path(dvemb.__file__).parent
# Each package or module may import only from its own level or below.
LEVELS = {
    "_version": 0, "projection": 0, "update": 0, "gemm": 0, "cpus": 0, "progress": 0, "resources": 0, "devices": 0,
    "store": 1,
    "capture": 2, "embed": 2,
    "query": 3,
    "evaluate": 4,
    "integrations": 5,
    "cli": 6, "__main__": 6, "__init__": 6,
    "studies": 7,
}


def imported_units(path: Path) -> set[str]:
    """The top-level units of dvemb (``store``, ``capture``, ...) a source file imports when it loads (imports
    inside functions load on demand: the command line's studies)."""
    tree = ast.parse(path.read_text())
    package = path.relative_to(SRC.parent).with_suffix("").parts[:-1]  # ("dvemb", "capture", ...)
    units = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package[: len(package) - node.level + 1])
                parts = base + (node.module.split(".") if node.module else [])
            else:
                parts = (node.module or "").split(".")
            if parts[0] == "dvemb" and len(parts) > 1:
                units.add(parts[1])
            elif parts[0] == "dvemb" and not node.level:
                units.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            units.update(a.name.split(".")[1] for a in node.names if a.name.startswith("dvemb.") and "." in a.name)
    return units


def unit_of(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return parts[0]


def test_no_module_imports_from_a_layer_above_it():
    offences = []
    for path in SRC.rglob("*.py"):
        unit = unit_of(path)
        for imported in imported_units(path) - {unit}:
            if LEVELS.get(imported, 99) > LEVELS.get(unit, -1):
                offences.append(f"{path.relative_to(SRC)} imports dvemb.{imported}")
    assert not offences, offences


def test_no_function_is_over_60_lines():
    long = [f"{path.relative_to(SRC)}:{node.name} ({node.end_lineno - node.lineno + 1})"
            for path in SRC.rglob("*.py") for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60]
    assert not long, long


def test_the_store_imports_nothing_from_capture_embed_query_or_studies():
    for path in (SRC / "store").rglob("*.py"):
        assert not imported_units(path) & {"capture", "embed", "query", "studies", "evaluate"}, path


def test_import_dvemb_loads_no_study():
    code = "import sys, dvemb; print(sorted(m for m in sys.modules if m.startswith('dvemb.studies')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


class ScaledLinear(nn.Module):
    """A layer dvemb does not know: y = W (s x) + b."""

    def __init__(self, d_in: int, d_out: int, scale: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in, dtype=torch.float64) / d_in ** 0.5)
        self.bias = nn.Parameter(torch.zeros(d_out, dtype=torch.float64))
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x * self.scale, self.weight, self.bias)


def test_a_registered_layer_is_captured_like_a_built_in_one(tmp_path):
    @dvemb.register_layer(ScaledLinear, sizes=lambda m: (m.weight.shape[1], m.weight.shape[0]))
    def scaled_inputs(module: ScaledLinear, x: torch.Tensor) -> torch.Tensor:
        return (x * module.scale).reshape(x.shape[0], -1, module.weight.shape[1])

    assert "ScaledLinear" in dvemb.supported_layers()
    torch.manual_seed(0)
    model = nn.Sequential(ScaledLinear(5, 4, 0.5), nn.Tanh(), nn.Linear(4, 3).double())
    x, y = torch.randn(6, 2, 5, dtype=torch.float64), torch.randint(0, 3, (6, 2))
    loss = lambda out, target: F.cross_entropy(out.transpose(-1, -2), target)  # noqa: E731  token mean
    with dvemb.Recorder(model, tmp_path / "s", projection_dim=6, dtype=torch.float64, projection="gaussian",
                        curvature="gradient_outer") as rec:
        with rec.step(range(6), lr=0.1):
            loss(model(x), y).backward()
    store = Store(tmp_path / "s")
    assert [s.kind for s in store.layers] == ["ScaledLinear", "linear"]
    want = per_sample_gradients(model, loss, x, y, ["0", "2"])  # torch.func, each sample alone
    for i, spec in enumerate(store.layers):
        got = torch.from_numpy(store.grads(i).copy())
        # float64 on both sides: sums in different orders
        torch.testing.assert_close(got, project(spec, want[spec.name]), rtol=1e-10, atol=1e-12)


def test_stores_of_format_1_still_open(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 3, 2), nn.Flatten(), nn.Linear(9, 2))
    with dvemb.Recorder(model, tmp_path / "s", projection_dim=None, curvature="gradient_outer",
                        optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)) as rec:
        with rec.step([0, 1], lr=0.1):
            F.cross_entropy(model(torch.randn(2, 2, 4)), torch.tensor([0, 1])).backward()
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    update = manifest.pop("update")
    manifest.pop("whitening")
    manifest["format_version"] = 1
    manifest["sgd"] = {k: v for k, v in update.items() if k != "kind"}
    manifest["adam"] = None
    manifest["layers"][0]["kind"] = "torch_conv1d"  # format 1's name for nn.Conv1d
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(manifest))
    store = Store(tmp_path / "s")
    assert [s.kind for s in store.layers] == ["conv1d", "linear"]
    assert store.config.update.momentum == 0.9 and store.n_steps == 1
