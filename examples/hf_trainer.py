"""Record a Hugging Face ``Trainer`` run: a tiny GPT-2 (random init) trained with AdamW on CPython's pydoc text.

The dataset carries a ``sample_id`` column; ``DVEmbTrainer`` takes it out of every micro-batch of
an optimizer step and ``DVEmbCallback`` records the step (the lr comes from the Trainer's
scheduler, gradient accumulation is one step, the AdamW state is followed). Afterwards the
training windows that most helped and most hurt a held-out window's loss are printed.

    python examples/hf_trainer.py           # 2 layers x 64, 512 windows, 3 epochs
    python examples/hf_trainer.py --tiny    # a few seconds
    python examples/hf_trainer.py --out runs/lm

Needs transformers (pip install "dvemb[hf]"). The text is CPython's bundled pydoc topics and
the tokenizer is plain bytes: nothing is downloaded.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from pydoc_data.topics import topics
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments, default_data_collator

import dvemb
from dvemb.integrations.hf import DVEmbCallback, DVEmbTrainer


def byte_windows(length: int, count: int) -> torch.Tensor:
    """``count`` consecutive windows of ``length`` bytes of the pydoc topics, as token ids [count, length]."""
    text = "\n".join(topics[k] for k in sorted(topics)).encode("utf-8")
    data = torch.frombuffer(bytearray(text[: length * count]), dtype=torch.uint8).long()
    return data.view(count, length)


class Windows(torch.utils.data.Dataset):
    """Token windows with their ``sample_id`` (the index), ready for ``default_data_collator``."""

    def __init__(self, tokens: torch.Tensor) -> None:
        self.tokens = tokens

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.tokens[i], "labels": self.tokens[i], "sample_id": i}


def window_losses(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Each window's mean next-token cross-entropy, [n]: the per-example test losses dvemb scores."""
    logits = model(input_ids=tokens).logits[:, :-1]
    per_token = F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")
    return per_token.mean(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a few seconds on a CPU")
    parser.add_argument("--out", metavar="DIR", default=None, help="where to keep the store (default: a temp folder)")
    args = parser.parse_args()
    length, n_train, n_embd, epochs = (16, 24, 16, 2) if args.tiny else (64, 512, 64, 3)
    tokens = byte_windows(length, n_train + 4)
    train, test = Windows(tokens[:n_train]), tokens[n_train:]
    config = GPT2Config(vocab_size=256, n_positions=length, n_layer=2, n_embd=n_embd, n_head=2, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                        tie_word_embeddings=False)  # untied: the head is tracked too
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    model.loss_type = "ForCausalLM"  # transformers cannot tell the loss from this small config

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        training = TrainingArguments(
            output_dir=str(out / "trainer"), per_device_train_batch_size=4, gradient_accumulation_steps=2,
            num_train_epochs=epochs, learning_rate=3e-3, optim="adamw_torch",
            weight_decay=0.0,              # > 0 puts biases in a no-decay group: see docs/guide.md
            max_grad_norm=0.0,             # clipping would rescale steps without being recorded
            remove_unused_columns=False,   # keep the sample_id column
            report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True, use_cpu=True, seed=0)
        trainer = DVEmbTrainer(model=model, args=training, train_dataset=train, data_collator=default_data_collator,
                               callbacks=[DVEmbCallback(out / "store")])  # Recorder kwargs go here too
        trainer.train()
        store = dvemb.Store(out / "store")
        print(f"recorded {store.n_steps} optimizer steps, {store.n_records} records; "
              f"update rule: {store.config.update.describe()}")

        model.eval()
        inf = dvemb.influence(out / "store", model, lambda: window_losses(model, test))
        top = inf.top_k(3)
        print(f"test window: {bytes(test[0].tolist())!r}")
        for kind, ranking in (("helpful (highest scores)", top.helpful), ("harmful (lowest scores)", top.harmful)):
            print(f"most {kind} training windows:")
            for step, sample, score in zip(ranking.step[0], ranking.sample_id[0], ranking.score[0]):
                print(f"  step {step:3d} window {sample:4d} {score:+.2e} {bytes(tokens[sample].tolist())!r}")


if __name__ == "__main__":
    main()
