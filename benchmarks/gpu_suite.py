"""GPU suite: capture overhead, records per second, recursion TFLOP/s, scoring GB/s and peak memory on one device.

One run of a few minutes on one GPU (``--device cuda``, the default); ``--device cpu --tiny`` runs
the same code on a tiny model in seconds (the smoke test). Every timing is a median over
``--runs`` runs, with the device synchronised before and after each timed call.

- **capture**: a GPT-2-small-sized model (124M parameters, random init: Hugging Face's
  ``GPT2LMHeadModel(GPT2Config())`` when transformers is installed, else the same shape in
  ``SmallGPT`` below), batch 8 x 1024 tokens, forward under ``torch.autocast(bfloat16)``,
  AdamW. The Recorder tracks the 48 projections of the 12 blocks at 1024 values per layer in
  the paper's configuration (``common.PAPER``). Runs alternate ``--steps`` plain and recorded
  steps after ``--warmup`` of each; reported: recorded / plain step time (median of the runs'
  ratios) and records stored per second while recording (batch / recorded step time), beside
  the paper's Table 1 (A100: DVEmb 667.5 training points/s, LoGRA 41.6, 0.84 GB peak).
- **recursion**: ``compute_embeddings(path, device=..., blocking="layer")`` end to end (reading
  the store, writing the embeddings) on a synthetic store of random float32 rows shaped like
  ``embedding_scale.py``'s (``--embed-layers`` layers of 1024 values, batch 32,
  ``--embed-steps`` steps, SGD, the gradients as curvature), with float32 and with TF32
  allowed. FLOPs are counted from the plan the embeddings manifest records: per step of B
  records and per block of width d (the sum of its parts' widths), E = G K^T costs 2 B d^2
  and K -= E^T G another 2 B d^2, so the run costs 4 N sum_b d_b^2 for N records (plus
  2 N dim q per sketched part; elementwise terms left out). TFLOP/s is compared with the
  device's measured float32 (and TF32) matmul rate on an n x n product (2 n^3 FLOPs).
- **scoring**: ``Scorer(path, device=...)`` on the same store, then ``influence`` and
  ``top_k`` (k = 10) for each ``--n-test``; bytes read per query are the embeddings' bytes
  (records x values per record x 4). GB/s is compared with the device's measured copy
  bandwidth: a device-to-device copy of ``--copy-mib`` MiB, counting bytes read plus bytes
  written (the STREAM convention).
- **peak memory** per phase: ``torch.cuda.max_memory_allocated`` (reset before each phase);
  on the CPU the process's peak RSS so far (monotonic, so only an upper bound per phase).

    python benchmarks/gpu_suite.py [--device cuda] [--runs 5] [--steps 5] [--embed-steps 200]
    python benchmarks/gpu_suite.py --device cpu --tiny
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import tempfile
import time
from pathlib import Path
from typing import Callable

import common
from common import PAPER, alternate, base_parser, configure, median, peak_rss_mib, print_table, ratios, write_results
from embedding_scale import write_store

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import dvemb
from dvemb import devices
from dvemb.embed.layout import embedding_info, embedding_plan, final_arrays

PAPER_TABLE1 = {"dvemb_points_per_s": 667.5, "logra_points_per_s": 41.6, "peak_gb": 0.84, "device": "A100"}
TRACKED = "transformer.h.*"  # the 48 projections of GPT-2's blocks (the head is tied to the embedding)
TOP_K = 10


class Device:
    """Synchronised timing and peak memory on one device (CUDA: allocator peaks; CPU: peak RSS)."""

    def __init__(self, name: str) -> None:
        self.device = torch.device(name)
        self.cuda = self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def seconds(self, fn: Callable[[], object]) -> float:
        """Wall-clock seconds of one call, the device synchronised before and after."""
        self.sync()
        start = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - start

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_mib(self) -> float:
        """Peak memory since the last reset_peak: allocated on the GPU, or this process's peak RSS on the CPU."""
        return torch.cuda.max_memory_allocated(self.device) / 2**20 if self.cuda else peak_rss_mib()

    def describe(self) -> dict:
        name = torch.cuda.get_device_name(self.device) if self.cuda else platform.processor() or "cpu"
        return {"device": str(self.device), "device_name": name, "torch": torch.__version__,
                "cuda": torch.version.cuda, "peak_memory_kind": "max_memory_allocated" if self.cuda else "peak RSS"}


class _Block(nn.Module):
    """A GPT-2 block with GPT-2's module names (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj), as nn.Linear."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads, self.ln_1, self.ln_2 = heads, nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.ModuleDict({"c_attn": nn.Linear(width, 3 * width), "c_proj": nn.Linear(width, width)})
        self.mlp = nn.ModuleDict({"c_fc": nn.Linear(width, 4 * width), "c_proj": nn.Linear(4 * width, width)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, s, w = x.shape
        q, k, v = (t.view(n, s, self.heads, -1).transpose(1, 2) for t in self.attn.c_attn(self.ln_1(x)).split(w, 2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(n, s, w)
        x = x + self.attn.c_proj(y)
        return x + self.mlp.c_proj(F.gelu(self.mlp.c_fc(self.ln_2(x)), approximate="tanh"))


class SmallGPT(nn.Module):
    """GPT-2's shape without transformers: token and position embeddings, blocks, final norm, tied head."""

    def __init__(self, vocab: int, positions: int, layers: int, width: int, heads: int) -> None:
        super().__init__()
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(vocab, width), "wpe": nn.Embedding(positions, width),
            "h": nn.ModuleList(_Block(width, heads) for _ in range(layers)), "ln_f": nn.LayerNorm(width)})

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        t = self.transformer
        x = t.wte(input_ids) + t.wpe(torch.arange(input_ids.shape[1], device=input_ids.device))
        for block in t.h:
            x = block(x)
        return F.linear(t.ln_f(x), t.wte.weight)


def build_lm(args: argparse.Namespace) -> tuple[nn.Module, str]:
    """The language model on the device (the project's GPT-2 builder when transformers is installed, else
    SmallGPT), and which it is."""
    try:
        from dvemb.studies.lm import GPT2Size, build_gpt2
        model = build_gpt2(args.vocab, args.seq_len, GPT2Size(args.layers, args.width, args.heads), seed=0)
        kind = "transformers.GPT2LMHeadModel"
    except ImportError:
        torch.manual_seed(0)
        model, kind = SmallGPT(args.vocab, args.seq_len, args.layers, args.width, args.heads), "SmallGPT"
    return model.to(args.device), kind


def lm_loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of the batch (logits as a tensor or a transformers output)."""
    out = model(input_ids=tokens)
    logits = getattr(out, "logits", out)[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def train_steps(model: nn.Module, opt: torch.optim.Optimizer, batches: list[torch.Tensor],
                rec: dvemb.Recorder | None) -> None:
    """Training steps under bf16 autocast (forward and loss), AdamW updates; recorded when ``rec`` is given."""
    device_type = batches[0].device.type
    for tokens in batches:
        with rec.step(range(len(tokens))) if rec is not None else contextlib.nullcontext():
            with torch.autocast(device_type, dtype=torch.bfloat16):
                loss = lm_loss(model, tokens)
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if rec is not None:
        rec.flush()  # the steps' rows are stored, not only queued


def measure_capture(args: argparse.Namespace, dev: Device, tmp: Path) -> dict:
    """Recorded / plain step time on the language model, records per second while recording, peak memory."""
    model, kind = build_lm(args)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, args.vocab, (args.batch, args.seq_len), generator=gen).to(dev.device)
               for _ in range(max(args.steps, args.warmup))]
    timed_batches = batches[:args.steps]
    peaks = {"plain": 0.0, "recorded": 0.0}
    with dvemb.Recorder(model, tmp / "lm", projection_dim=1024, optimizer=opt, modules=TRACKED, **PAPER) as rec:
        for r in (None, rec):
            train_steps(model, opt, batches[:args.warmup], r)

        def run(name: str, r: dvemb.Recorder | None) -> Callable[[], float]:
            def timed() -> float:
                dev.reset_peak()
                s = dev.seconds(lambda: train_steps(model, opt, timed_batches, r))
                peaks[name] = max(peaks[name], dev.peak_mib())
                return s / len(timed_batches)
            return timed

        times = alternate({"plain": run("plain", None), "recorded": run("recorded", rec)}, args.runs)
        layers = rec.layers
    params = sum(p.numel() for p in model.parameters())
    recorded = median(times["recorded"])
    return {"model": kind, "parameters": params, "tracked_layers": len(layers), "projection_dim": 1024,
            "batch": args.batch, "seq_len": args.seq_len, "autocast": "bfloat16", "optimizer": "AdamW",
            "plain_step_s": median(times["plain"]), "recorded_step_s": recorded,
            "ratio": median(ratios(times["recorded"], times["plain"])), "records_per_s": args.batch / recorded,
            "peak_mib": peaks, "runs": times}


def matmul_tflops(dev: Device, n: int, runs: int, tf32: bool) -> float:
    """Measured rate of an n x n float32 product (2 n^3 FLOPs), TF32 allowed or not, median of ``runs``."""
    a, b = (torch.randn(n, n, device=dev.device) for _ in range(2))
    with devices.tf32(tf32):  # the switch compute_embeddings(allow_tf32=) uses
        a @ b  # warm-up
        seconds = median([dev.seconds(lambda: a @ b) for _ in range(runs)])
    return 2 * n ** 3 / seconds / 1e12


def copy_gb_per_s(dev: Device, mib: int, runs: int) -> float:
    """Device-to-device copy bandwidth: (bytes read + bytes written) per second, median of ``runs``."""
    src = torch.ones(mib << 18, device=dev.device)  # float32: 4 bytes each
    dst = torch.empty_like(src)
    dst.copy_(src)
    seconds = median([dev.seconds(lambda: dst.copy_(src)) for _ in range(runs)])
    return 2 * src.numel() * src.element_size() / seconds / 1e9


def recursion_flops(path: Path) -> float:
    """FLOPs of the recursion the embeddings manifest records: 4 N sum_b d_b^2 (+ 2 N dim q per sketched part)."""
    store = dvemb.Store(path)
    if store.curvature_passes or store.config.update.parts != 1:
        raise ValueError("the FLOP count covers SGD stores whose curvature is the gradients themselves")
    plan = embedding_plan(embedding_info(store))
    widths = [sum(plan.parts[i].width(store) for i in block) for block in plan.blocks]
    sketches = sum(p.sketch * store.layers[p.layer].dim for p in plan.parts if p.sketch is not None)
    return float(store.n_records) * (4 * sum(d * d for d in widths) + 2 * sketches)


def measure_recursion(args: argparse.Namespace, dev: Device, path: Path) -> dict:
    """compute_embeddings end to end with float32 and with TF32 allowed: seconds, TFLOP/s, against matmul peaks."""
    peaks = {"float32": 0.0, "tf32": 0.0}

    def run(name: str) -> Callable[[], float]:
        def timed() -> float:
            dev.reset_peak()
            s = dev.seconds(lambda: dvemb.compute_embeddings(path, device=dev.device, allow_tf32=name == "tf32",
                                                             blocking="layer", show_progress=False))
            peaks[name] = max(peaks[name], dev.peak_mib())
            return s
        return timed

    times = alternate({"float32": run("float32"), "tf32": run("tf32")}, args.runs)
    flops = recursion_flops(path)
    out = {"flops": flops, "blocking": "layer", "seconds": {k: median(v) for k, v in times.items()}, "runs": times,
           "peak_mib": peaks}
    out["tflops"] = {k: flops / s / 1e12 for k, s in out["seconds"].items()}
    out["matmul_tflops"] = {k: matmul_tflops(dev, args.matmul_n, args.runs, k == "tf32") for k in times}
    out["vs_matmul"] = {k: out["tflops"][k] / out["matmul_tflops"][k] for k in times}
    return out


def final_rows(path: Path, layers: int = 4) -> np.ndarray:
    """The first ``layers`` layers' final embeddings, in float64."""
    store = dvemb.Store(path)
    arrays = final_arrays(store, embedding_info(store)["precision"])[:layers]
    return np.concatenate([np.asarray(a.read(store.n_records), dtype=np.float64) for a in arrays], 1)


def measure_accuracy(dev: Device, path: Path) -> dict:
    """Relative (Frobenius) error of the float32 and TF32 embeddings against float64 ones, on the device."""
    dvemb.compute_embeddings(path, device=dev.device, precision="float64", blocking="layer", show_progress=False)
    reference = final_rows(path)
    out = {}
    for name in ("float32", "tf32"):
        dvemb.compute_embeddings(path, device=dev.device, allow_tf32=name == "tf32", blocking="layer",
                                 show_progress=False)
        out[name] = float(np.linalg.norm(final_rows(path) - reference) / np.linalg.norm(reference))
    return out


def scoring_model(layers: int, dev: Device) -> nn.Module:
    """A chain of ``layers`` 256 x 256 linear layers named like embedding_scale's store (orthogonal init)."""
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(256, 256) for _ in range(layers)))
    for m in model:
        nn.init.orthogonal_(m.weight)
    return model.to(dev.device)


def measure_scoring(args: argparse.Namespace, dev: Device, path: Path) -> dict:
    """Scorer(device=...).influence and .top_k per number of test points: seconds, GB/s of embeddings read."""
    model = scoring_model(args.embed_layers, dev)
    store = dvemb.Store(path)
    nbytes = store.n_records * sum(s.dim for s in store.layers) * 4  # float32 embeddings
    cases = []
    dev.reset_peak()
    with dvemb.Scorer(path, device=dev.device) as scorer:
        for n_test in args.n_test:
            x = torch.randn(n_test, 256, generator=torch.Generator().manual_seed(n_test)).to(dev.device)

            def loss() -> torch.Tensor:
                return model(x).pow(2).mean(1)

            queries = {"influence": lambda: scorer.influence(model, loss),
                       "top_k": lambda: scorer.top_k(model, loss, min(TOP_K, store.n_records))}
            for q in queries.values():
                q()  # warm-up: the first query loads the embeddings
            times = alternate({k: (lambda q=q: dev.seconds(q)) for k, q in queries.items()}, args.runs)
            cases.append({"n_test": n_test, "seconds": {k: median(v) for k, v in times.items()},
                          "gb_per_s": {k: nbytes / median(v) / 1e9 for k, v in times.items()}, "runs": times})
    return {"bytes_per_query": nbytes, "top_k": TOP_K, "peak_mib": dev.peak_mib(), "cases": cases}


def parse_args() -> argparse.Namespace:
    """Options; ``--tiny`` shrinks every size for a CPU smoke run."""
    parser = base_parser(__doc__.splitlines()[0], runs=5)
    parser.add_argument("--device", default="cuda", help="torch device: cuda, cuda:N or cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny model and store: a smoke run of seconds")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps of each kind per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps of each kind first")
    parser.add_argument("--embed-steps", type=int, default=200, help="steps of the synthetic store (batch 32)")
    parser.add_argument("--embed-layers", type=int, default=48, help="layers of 1024 values in the synthetic store")
    parser.add_argument("--n-test", type=int, nargs="+", default=[1, 64], help="test points per scoring query")
    parser.add_argument("--results-dir", default=None, help="where the JSON goes (benchmarks/results)")
    args = parser.parse_args()
    lm = dict(vocab=50257, seq_len=1024, batch=8, layers=12, width=768, heads=12)
    sizes = dict(matmul_n=8192, copy_mib=1024)
    if args.tiny:
        lm = dict(vocab=128, seq_len=32, batch=4, layers=2, width=64, heads=4)
        sizes = dict(matmul_n=256, copy_mib=16)
        args.steps, args.warmup, args.embed_steps, args.embed_layers = 2, 1, 6, 3
    for k, v in {**lm, **sizes}.items():
        setattr(args, k, v)
    return args


def check_device(args: argparse.Namespace) -> Device:
    """The device, or exit with one line when CUDA is asked for and missing."""
    dev = Device(args.device)
    if dev.cuda and not torch.cuda.is_available():
        raise SystemExit(f"gpu_suite: no CUDA device (torch {torch.__version__}, "
                         f"CUDA build {torch.version.cuda}); run it on a GPU, or use --device cpu --tiny")
    if dev.cuda and dev.device.index is not None:
        torch.cuda.set_device(dev.device)
    return dev


def report(result: dict) -> None:
    """Print the tables."""
    c, r, env = result["capture"], result["recursion"], result["device"]
    print(f"{env['device_name']} ({env['device']}), torch {env['torch']}; {c['model']} {c['parameters'] / 1e6:.1f}M, "
          f"batch {c['batch']} x {c['seq_len']}, bf16 autocast, {c['tracked_layers']} layers x 1024")
    print_table(["", "plain ms", "recorded ms", "recorded/plain", "records/s", "peak MiB plain", "peak MiB recorded"],
                [["capture", 1e3 * c["plain_step_s"], 1e3 * c["recorded_step_s"], c["ratio"], c["records_per_s"],
                  c["peak_mib"]["plain"], c["peak_mib"]["recorded"]]])
    p = PAPER_TABLE1
    print(f"paper, Table 1 ({p['device']}): DVEmb {p['dvemb_points_per_s']} points/s, LoGRA "
          f"{p['logra_points_per_s']}, peak {p['peak_gb']} GB; here {c['records_per_s']:.1f} records/s")
    print_table(["recursion", "seconds", "TFLOP/s", "matmul TFLOP/s", "of matmul", "peak MiB"],
                [[k, r["seconds"][k], r["tflops"][k], r["matmul_tflops"][k], r["vs_matmul"][k], r["peak_mib"][k]]
                 for k in r["seconds"]])
    err = r["relative_error_vs_float64"]
    print(f"embeddings against float64 (relative Frobenius error): float32 {err['float32']:.2e}, "
          f"TF32 {err['tf32']:.2e}")
    bw = result["copy_gb_per_s"]
    print_table(["scoring n_test", "influence ms", "top_k ms", "influence GB/s", "top_k GB/s", "of copy", "peak MiB"],
                [[s["n_test"], 1e3 * s["seconds"]["influence"], 1e3 * s["seconds"]["top_k"],
                  s["gb_per_s"]["influence"], s["gb_per_s"]["top_k"], s["gb_per_s"]["influence"] / bw, result["scoring"]["peak_mib"]]
                 for s in result["scoring"]["cases"]])
    print(f"copy bandwidth {bw:.1f} GB/s (read + write); recursion {r['flops'] / 1e12:.3g} TFLOP; "
          f"whole suite {result['seconds']:.0f} s")


def main() -> None:
    """Run every phase, print and write JSON."""
    args = parse_args()
    configure(args)
    dev = check_device(args)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        capture = measure_capture(args, dev, Path(tmp))
        path = Path(tmp) / "synthetic"
        write_store(path, args.embed_layers, args.embed_steps, 0, "gradient_outer")
        recursion = measure_recursion(args, dev, path)
        recursion["relative_error_vs_float64"] = measure_accuracy(dev, path)
        scoring = measure_scoring(args, dev, path)
    peaks = {"plain_training": capture["peak_mib"]["plain"], "recorded_training": capture["peak_mib"]["recorded"],
             "recursion_float32": recursion["peak_mib"]["float32"], "recursion_tf32": recursion["peak_mib"]["tf32"],
             "scoring": scoring["peak_mib"]}
    result = {"device": dev.describe(), "paper_table1": PAPER_TABLE1, "capture": capture, "recursion": recursion,
              "scoring": scoring, "copy_gb_per_s": copy_gb_per_s(dev, args.copy_mib, args.runs), "peak_mib": peaks,
              "embed_store": {"layers": args.embed_layers, "dim": 1024, "batch": 32, "steps": args.embed_steps}}
    result["seconds"] = time.perf_counter() - start
    report(result)
    if args.results_dir is not None:
        common.RESULTS_DIR = Path(args.results_dir)
    write_results("gpu_suite_tiny" if args.tiny else "gpu_suite", args, result)


if __name__ == "__main__":
    main()
