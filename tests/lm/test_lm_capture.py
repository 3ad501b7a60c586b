"""Per-sample gradients of causal language models with padding, against torch.func.

Convention under test. The user's loss is Hugging Face's causal-LM loss: the mean token
cross-entropy over the N label tokens of the batch that are not ignored (label -100 on
padding; the first token of a sequence predicts nothing). Sample i (n_i label tokens) enters
it as (1/N) * sum_{t in i} loss_t. Under reduction="mean" the Recorder gives every sample the
weight w = 1/B and stores hook gradient / w, so the stored gradient is that of the sample's
own loss

    L_i = (B / N) * sum_{t in i} loss_t,

which equals the sample's mean token loss only when every sample has N/B label tokens. The
reference evaluates L_i on each sequence alone, without padding, so the check also shows
that padded positions contribute nothing.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad

pytest.importorskip("transformers")

import dvemb  # noqa: E402
from dvemb.capture.layers import rule_for  # noqa: E402
from dvemb.studies.lm import GPT2Size, build_gpt2  # noqa: E402
from dvemb.store import Store, to_torch  # noqa: E402
from reference import project, rel_err  # noqa: E402

VOCAB, MAX_LEN = 100, 32
LENGTHS = [12, 7, 3, 12, 9]  # right-padded to 12 (or longer)
TOL = 1e-4  # acceptance bound; float32 capture against a float64 reference lands near 1e-7


def tiny_llama() -> nn.Module:
    """A Llama-style model built from nn.Linear (untied head, RMSNorm, rotary positions)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=MAX_LEN))


MODELS = {  # builder, tracked layers (GPT-2's lm_head is tied to the token embedding)
    "gpt2": (lambda: build_gpt2(VOCAB, MAX_LEN, GPT2Size(2, 32, 2), seed=0), "transformer.h.*"),
    "llama": (tiny_llama, None),
}


def padded_batch(width: int, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Sequences of LENGTHS right-padded to ``width``: attention_mask 0 and label -100 on padding."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCAB, (len(LENGTHS), MAX_LEN), generator=gen)[:, :width]
    mask = (torch.arange(width)[None] < torch.tensor(LENGTHS)[:, None]).long()
    ids = ids.masked_fill(mask == 0, pad_id)
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def record(model: nn.Module, path, batch: dict, **kwargs) -> Store:
    """One recorded step of the model's own (Hugging Face) loss on the batch."""
    with dvemb.Recorder(model, path, **kwargs) as rec, rec.step(range(len(batch["input_ids"])), lr=0.1):
        model(**batch).loss.backward()
    return Store(path)


def own_loss_gradients(model: nn.Module, batch: dict, names: list[str]) -> dict[str, torch.Tensor]:
    """torch.func gradients of L_i = (B / N) sum_{t in i} loss_t, each sequence alone and unpadded, float64."""
    ref = copy.deepcopy(model).double()
    params = {k: v.detach() for k, v in ref.named_parameters()}
    n_tokens = int((batch["labels"][:, 1:] != -100).sum())
    scale = len(LENGTHS) / n_tokens

    def own(p: dict, seq: torch.Tensor) -> torch.Tensor:
        logits = functional_call(ref, p, (seq[None],)).logits[0]
        return F.cross_entropy(logits[:-1], seq[1:], reduction="sum") * scale

    per_sample = [grad(own)(params, batch["input_ids"][i, :n]) for i, n in enumerate(LENGTHS)]
    modules = dict(ref.named_modules())
    out = {}
    for name in names:
        rule = rule_for(modules[name])
        rows = []
        for g in per_sample:
            w = rule.as_matrix(g[f"{name}.weight"])
            rows.append(torch.cat([w, g[f"{name}.bias"][:, None]], 1) if f"{name}.bias" in g else w)
        out[name] = torch.stack(rows)
    return out


@pytest.mark.parametrize("projection_dim", [None, 64])
@pytest.mark.parametrize("arch", sorted(MODELS))
def test_per_sample_gradients_with_padding(tmp_path, arch, projection_dim):
    build, modules = MODELS[arch]
    model = build()
    batch = padded_batch(max(LENGTHS))
    store = record(model, tmp_path / "s", batch, projection_dim=projection_dim, modules=modules)
    assert (store.records["weight"] == 1 / len(LENGTHS)).all()
    want = own_loss_gradients(model, batch, [s.name for s in store.layers])
    for i, spec in enumerate(store.layers):
        got = to_torch(store.grads(i), store.dtype).double()
        assert rel_err(got, project(spec, want[spec.name])) < TOL, spec.name


def test_padding_content_and_width_change_nothing(tmp_path):
    model = MODELS["gpt2"][0]()
    stores = [record(model, tmp_path / f"s{k}", padded_batch(width, pad), projection_dim=64, modules="transformer.h.*",
                     projection="gaussian")  # fitted bases are equal up to round-off, which rotates close eigenvectors
              for k, (width, pad) in enumerate([(12, 0), (20, 0), (20, 57)])]
    for i in range(len(stores[0].layers)):
        base = to_torch(stores[0].grads(i), "float32")
        for other in stores[1:]:
            torch.testing.assert_close(to_torch(other.grads(i), "float32"), base, rtol=1e-5, atol=1e-7)


def test_layer_selection_and_tied_head(tmp_path):
    model = MODELS["gpt2"][0]()
    mlp = dvemb.Recorder(model, tmp_path / "mlp", modules="transformer.h.*.mlp.*")
    assert mlp.layers == [f"transformer.h.{b}.mlp.{n}" for b in (0, 1) for n in ("c_fc", "c_proj")]
    assert {s.kind for s in Store(tmp_path / "mlp").layers} == {"hf_conv1d"}
    mlp.close()
    with pytest.warns(UserWarning, match="tied"):
        default = dvemb.Recorder(model, tmp_path / "all")
    assert "lm_head" not in default.layers and len(default.layers) == 8
    default.close()
    with pytest.raises(ValueError, match="tied"):
        dvemb.Recorder(model, tmp_path / "head", modules=["lm_head"])
