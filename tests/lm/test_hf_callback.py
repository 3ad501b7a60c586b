"""The Trainer integration records the same store as the equivalent plain PyTorch loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("transformers")
from transformers import Trainer, TrainingArguments  # noqa: E402

import dvemb  # noqa: E402
from dvemb.studies.lm import GPT2Size, build_gpt2  # noqa: E402
from dvemb.integrations.hf import DVEmbCallback, DVEmbTrainer  # noqa: E402
from dvemb.store import Store, to_torch  # noqa: E402
from reference import final_embeddings, rel_err  # noqa: E402

VOCAB, MAX_LEN, N_SAMPLES = 100, 16, 14
MICRO, ACCUMULATE, EPOCHS, LR = 3, 2, 2, 0.2
LAYERS = "transformer.h.*"  # lm_head shares its weight with the token embedding
PROJECTION = 48


class Sequences(torch.utils.data.Dataset):
    """Token sequences of random lengths with a ``sample_id``; remembers the order they are read in."""

    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(1)
        lengths = torch.randint(4, MAX_LEN + 1, (N_SAMPLES,), generator=gen)
        self.rows = [torch.randint(1, VOCAB, (int(n),), generator=gen) for n in lengths]
        self.reads: list[int] = []

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        self.reads.append(i)
        return {"input_ids": self.rows[i], "sample_id": i}


def collate(features: list[dict]) -> dict[str, torch.Tensor]:
    """Right-pad; padded positions get attention_mask 0 and label -100."""
    ids = nn.utils.rnn.pad_sequence([f["input_ids"] for f in features], batch_first=True)
    lengths = torch.tensor([len(f["input_ids"]) for f in features])
    mask = (torch.arange(ids.shape[1])[None] < lengths[:, None]).long()
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100),
            "sample_id": torch.tensor([f["sample_id"] for f in features])}


def arguments(tmp_path, **overrides) -> TrainingArguments:
    settings = dict(per_device_train_batch_size=MICRO, gradient_accumulation_steps=ACCUMULATE,
                    num_train_epochs=EPOCHS, learning_rate=LR, lr_scheduler_type="linear", warmup_steps=0,
                    optim="sgd", weight_decay=0.0, max_grad_norm=0.0, remove_unused_columns=False, report_to="none",
                    save_strategy="no", logging_strategy="no", disable_tqdm=True, use_cpu=True,
                    dataloader_pin_memory=False, seed=0)
    return TrainingArguments(output_dir=str(tmp_path / "trainer"), **{**settings, **overrides})


def model() -> nn.Module:
    return build_gpt2(VOCAB, MAX_LEN, GPT2Size(2, 32, 2), seed=0)


def expected_steps(reads: list[int]) -> list[list[int]]:
    """Optimizer steps as the Trainer forms them: micro-batches of each epoch's reads, ACCUMULATE at a time."""
    steps = []
    for epoch in range(EPOCHS):
        order = reads[epoch * N_SAMPLES:(epoch + 1) * N_SAMPLES]
        micro = [order[k:k + MICRO] for k in range(0, N_SAMPLES, MICRO)]
        steps += [sum(micro[k:k + ACCUMULATE], []) for k in range(0, len(micro), ACCUMULATE)]
    return steps


def plain_loop(net: nn.Module, data: Sequences, steps: list[list[int]], path) -> None:
    """The same training by hand: the loss of a step is the sum over its label tokens / their count (HF's),
    sample i weighing n_i / N."""
    with dvemb.Recorder(net, path, projection_dim=PROJECTION, modules=LAYERS) as rec:
        for t, ids in enumerate(steps):
            lr = LR * (len(steps) - t) / len(steps)  # linear decay to 0, no warm-up
            batches = [collate([{"input_ids": data.rows[i], "sample_id": i} for i in ids[k:k + MICRO]])
                       for k in range(0, len(ids), MICRO)]
            counts = torch.cat([(b["labels"][:, 1:] != -100).sum(1) for b in batches]).double()
            n_tokens = int(counts.sum())
            with rec.step(ids, lr=lr, weights=counts / n_tokens):  # each sample's own mean token loss
                for b in batches:
                    logits = net(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
                    loss = F.cross_entropy(logits.flatten(0, 1), b["labels"][:, 1:].flatten(), reduction="sum")
                    (loss / n_tokens).backward()
            with torch.no_grad():
                for p in net.parameters():
                    p.add_(p.grad, alpha=-lr)
                    p.grad = None


def test_trainer_with_accumulation_records_the_plain_loop_store(tmp_path):
    data, trained = Sequences(), model()
    trainer = DVEmbTrainer(model=trained, args=arguments(tmp_path), train_dataset=data, data_collator=collate,
                           callbacks=[DVEmbCallback(tmp_path / "hf", projection_dim=PROJECTION, modules=LAYERS)])
    trainer.train()
    steps = expected_steps(data.reads)
    assert len(data.reads) == EPOCHS * N_SAMPLES and [len(s) for s in steps] == [6, 6, 2] * EPOCHS

    plain = model()
    plain_loop(plain, data, steps, tmp_path / "plain")
    got, want = Store(tmp_path / "hf"), Store(tmp_path / "plain")
    assert got.n_steps == want.n_steps == len(steps)
    for field in ("step", "sample_id", "weight"):
        np.testing.assert_array_equal(got.records[field], want.records[field])
    np.testing.assert_allclose(got.records["lr"], want.records["lr"], rtol=1e-12)
    for layer in range(len(got.layers)):
        a, b = (to_torch(s.grads(layer), s.dtype).double() for s in (got, want))
        assert rel_err(a, b) < 1e-5, got.layers[layer].name
    for p, q in zip(trained.parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert not any(m._forward_hooks for m in trained.modules())  # closed at the end of training


def test_refuses_settings_that_lose_the_ids(tmp_path):
    trainer = DVEmbTrainer(model=model(), args=arguments(tmp_path, remove_unused_columns=True),
                           train_dataset=Sequences(), data_collator=collate,
                           callbacks=[DVEmbCallback(tmp_path / "s", modules=LAYERS)])
    with pytest.raises(ValueError, match="remove_unused_columns=False"):
        trainer.train()


def test_plain_trainer_is_told_to_use_dvemb_trainer(tmp_path):
    callback = DVEmbCallback(tmp_path / "s", projection_dim=PROJECTION, modules=LAYERS)
    trainer = Trainer(model=model(), args=arguments(tmp_path, max_grad_norm=1.0), train_dataset=Sequences(),
                      data_collator=collate, callbacks=[callback])
    with pytest.warns(UserWarning, match="max_grad_norm=0"), pytest.raises(RuntimeError, match="DVEmbTrainer"):
        trainer.train()
    callback.close()
    assert Store(tmp_path / "s").n_steps == 0


def test_error_inside_a_step_keeps_the_committed_steps(tmp_path):
    net, calls = model(), []

    def fail_on_third_forward(module, inputs):
        calls.append(1)
        if len(calls) == 3:  # the first micro-batch of the second optimizer step
            raise KeyboardInterrupt

    net.register_forward_pre_hook(fail_on_third_forward)
    trainer = DVEmbTrainer(model=net, args=arguments(tmp_path), train_dataset=Sequences(), data_collator=collate,
                           callbacks=[DVEmbCallback(tmp_path / "s", projection_dim=PROJECTION, modules=LAYERS)])
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert Store(tmp_path / "s").n_steps == 1
    assert not any(m._forward_hooks for m in net.modules())


def test_adamw_training_resumed_from_a_checkpoint_continues_the_store(tmp_path):
    """AdamW, checkpointed after the first epoch (3 steps), then resumed with ``resume_from_checkpoint``: the
    Trainer restores the optimizer's state, and the store continues it; records, rows and embeddings equal those
    of the run trained in one go."""
    common = dict(optim="adamw_torch", learning_rate=1e-3, lr_scheduler_type="constant", save_strategy="steps",
                  save_steps=3)

    def train(path, run: str, max_steps: int, resume: str | None = None) -> None:
        trainer = DVEmbTrainer(model=model(), args=arguments(tmp_path / run, max_steps=max_steps, **common),
                               train_dataset=Sequences(), data_collator=collate,
                               callbacks=[DVEmbCallback(path, projection_dim=PROJECTION, modules=LAYERS,
                                                        fit_steps=1,  # both fit the bases on step 0
                                                        curvature="gradient_outer")])  # no sampled passes
        trainer.train(resume_from_checkpoint=resume)

    train(tmp_path / "whole", "one-go", 6)
    train(tmp_path / "resumed", "split", 3)
    train(tmp_path / "resumed", "split", 6, resume=str(tmp_path / "split" / "trainer" / "checkpoint-3"))
    got, want = Store(tmp_path / "resumed"), Store(tmp_path / "whole")
    assert got.n_steps == want.n_steps == 6 and got.config.update == want.config.update
    assert want.config.update.kind == "adam" and want.config.update.initial_step == 0
    for field in ("step", "sample_id", "weight", "lr"):
        np.testing.assert_array_equal(got.records[field], want.records[field])
    embeddings = []
    for store in (got, want):
        dvemb.compute_embeddings(store.path, show_progress=False)
        embeddings.append(final_embeddings(store.path))
    np.testing.assert_array_equal(embeddings[0], embeddings[1])  # the same operations on the same values
