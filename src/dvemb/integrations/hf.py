"""Record data value embeddings during Hugging Face ``Trainer.train()`` (needs the hf extra).

Sample ids travel as a column of the training dataset through the data collator into the
batches. :class:`DVEmbTrainer` takes them out of each optimizer step's micro-batches before
the model sees them, and :class:`DVEmbCallback` records the step with a :class:`dvemb.Recorder`::

    train_ds = train_ds.map(lambda ex, i: {"sample_id": i}, with_indices=True)  # unique int ids
    args = TrainingArguments("out", remove_unused_columns=False, optim="sgd", max_grad_norm=0)
    trainer = DVEmbTrainer(model=model, args=args, train_dataset=train_ds, data_collator=collator,
                           callbacks=[DVEmbCallback("runs/lm", projection_dim=1024)])
    trainer.train()
    inf = dvemb.influence("runs/lm", model, lambda: per_example_test_losses(model))

- ``remove_unused_columns=False`` keeps the id column (the model's signature does not name
  it); the collator must pass it through as integers (``default_data_collator`` and a
  collator that pads token lists per key do).
- One record set per optimizer step: with gradient accumulation the step's micro-batches are
  one batch, in order. The learning rate is the optimizer's when the step ends, i.e. the one
  the scheduler set for that step.
- Loss convention: when the Trainer divides the optimizer step's summed token losses by their
  count N (``num_items_in_batch``: models that take loss kwargs, transformers >= 5), each sample
  is recorded with weight w_i = n_i / N (n_i its label tokens, counted as the Trainer counts N),
  so its stored gradient is that of its own mean token loss. Otherwise the Recorder's 1/B is
  used and a sample's stored gradient is that of ``(B / N) * (sum of its token losses)``.
- fp16 with loss scaling: :class:`DVEmbTrainer` hands the Trainer's ``GradScaler`` (its Accelerator's
  ``scaler``) to the Recorder, which divides the rows by the scale each step used and drops the steps
  the scaler skips (inf/NaN gradients). The Trainer still counts a skipped step in ``global_step``, so
  such a run's store holds fewer steps than ``global_step`` (a resumed run is then refused). bf16 needs
  no scaler.
- Multi-process runs (torchrun, one process per device) are recorded as under DDP: each rank
  writes its shard of the store. DataParallel (several GPUs in one process) is refused.
- The Recorder linearises torch's SGD (momentum, Nesterov, dampening and weight decay are read
  from the optimizer), and Adam / AdamW (the Trainer's default; elementwise with exact per-sample
  gradients, one preconditioner per layer and step when projected); other optimizers are warned
  about, and
  gradient clipping (the Trainer clips at ``max_grad_norm=1.0`` by default) rescales steps
  without being recorded.

Why a Trainer subclass and not only a callback: the Recorder needs a step's ids when the step
begins, and callbacks never see the batches. ``get_batch_samples`` fetches all micro-batches
of an optimizer step before the step begins, so :class:`DVEmbTrainerMixin` reads them there;
mix it into another Trainer class (``class MyTrainer(DVEmbTrainerMixin, SFTTrainer)``) as needed.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, MutableMapping, Sequence

import numpy as np

try:
    from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
except ImportError:
    raise ImportError("dvemb.integrations.hf needs transformers: pip install 'dvemb[hf]'") from None

from ..capture.recorder import Recorder, as_ids
from ..projection import DEFAULT_PROJECTION_DIM

if not hasattr(Trainer, "get_batch_samples"):
    raise ImportError("dvemb.integrations.hf needs transformers>=4.46 (Trainer.get_batch_samples)")



class DVEmbCallback(TrainerCallback):
    """Records every optimizer step of ``Trainer.train()`` into the dvemb store at ``path``.

    ``recorder_kwargs`` go to :class:`dvemb.Recorder` (``modules=``, ``seed=``, ``dtype=``,
    ``save_checkpoints=`` ...). Use it with :class:`DVEmbTrainer`, which hands it the ids.
    """

    def __init__(self, path: str | os.PathLike, id_column: str = "sample_id",
                 projection_dim: int | None = DEFAULT_PROJECTION_DIM, **recorder_kwargs: Any) -> None:
        self.path = path
        self.id_column = id_column
        self.projection_dim = projection_dim
        self.recorder_kwargs = recorder_kwargs
        self.recorder: Recorder | None = None
        self._next_ids: np.ndarray | None = None
        self._next_weights: np.ndarray | None = None
        self._open_step = False  # a step begun on the recorder and not yet committed
        self._scaler: Any = None  # the Trainer's GradScaler (set_scaler), passed to the Recorder
        self._scaler_given = False

    def set_scaler(self, scaler: Any) -> None:
        """The Trainer's loss scaler (``accelerator.scaler``; None without fp16 loss scaling): given by
        :class:`DVEmbTrainerMixin` before training, passed to the Recorder with the optimizer it steps."""
        self._scaler, self._scaler_given = scaler, True

    def take_ids(self, batches: Sequence[MutableMapping[str, Any]], weights: np.ndarray | None = None) -> None:
        """Remove the id column from one optimizer step's micro-batches; their ids, in order, make the step.

        ``weights``: each sample's weight in the step's loss when it is not 1/B (see DVEmbTrainerMixin).
        """
        if any(self.id_column not in batch for batch in batches):
            raise KeyError(f"training batches have no {self.id_column!r} column: keep it with TrainingArguments("
                           "remove_unused_columns=False) and a data collator that passes it through")
        self._next_ids = np.concatenate([as_ids(batch.pop(self.id_column)) for batch in batches])
        self._next_weights = weights

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: Any = None, optimizer: Any = None, **kwargs: Any) -> None:
        """Open the store; the lr is read from the optimizer the Trainer built."""
        _check_arguments(args)
        if args.fp16 and not self._scaler_given:
            raise ValueError("fp16 training scales the loss, and DVEmbCallback needs the Trainer's GradScaler to "
                             "divide the captured rows by it: train with DVEmbTrainer (or mix DVEmbTrainerMixin into "
                             "your Trainer class), which hands it over; or train in float32 or bf16")
        mode = "resume" if state.global_step else "new"  # resume_from_checkpoint continues the store
        extra = {} if self._scaler is None else {"scaler": self._scaler}
        self.recorder = Recorder(model, self.path, self.projection_dim,
                                 optimizer=getattr(optimizer, "optimizer", optimizer),  # Accelerate's wrapper
                                 **{"mode": mode, **extra, **self.recorder_kwargs})
        if self.recorder.steps != state.global_step:
            steps = self.recorder.steps
            self.close()
            raise ValueError(f"{self.path} holds {steps} recorded steps but training starts at step "
                             f"{state.global_step}: record into a new path, or resume from step {steps}")

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                      **kwargs: Any) -> None:
        """Start capturing the optimizer step whose micro-batches were just fetched."""
        if self._next_ids is None:
            raise RuntimeError("DVEmbCallback received no sample ids for this step: train with DVEmbTrainer, or "
                               "mix DVEmbTrainerMixin into your Trainer class")
        self.recorder.begin_step(self._next_ids, weights=self._next_weights)
        self._open_step, self._next_ids, self._next_weights = True, None, None

    def on_pre_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                              **kwargs: Any) -> None:
        """Commit the step: every micro-batch has run backward and the optimizer has not yet stepped."""
        self._open_step = False
        self.recorder.commit_step()

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        """Close the store and remove the hooks."""
        self.close()

    def close(self) -> None:
        """Drop a step left open by an interrupted run (nothing of it is committed), then close the recorder."""
        if self._open_step:
            self._open_step = False
            self.recorder.abort_step()
        self._next_ids = None
        if self.recorder is not None:
            self.recorder.close()


def _check_arguments(args: TrainingArguments) -> None:
    """Refuse settings that break recording; warn about those that make it approximate."""
    if args.remove_unused_columns:
        raise ValueError("DVEmbCallback needs TrainingArguments(remove_unused_columns=False): otherwise the Trainer "
                         "drops the sample id column before batching")
    if args.n_gpu > 1:
        raise ValueError("DVEmbCallback does not record DataParallel (several GPUs in one process): launch one "
                         "process per GPU (torchrun), which it records like DDP")
    if args.max_grad_norm and args.max_grad_norm > 0:
        warnings.warn(f"gradient clipping (max_grad_norm={args.max_grad_norm}) rescales some steps and dvemb does "
                      "not record it; set max_grad_norm=0 for exact data value embeddings", stacklevel=3)


class DVEmbTrainerMixin:
    """Hands each optimizer step's sample ids from its micro-batches to the trainer's :class:`DVEmbCallback`."""

    def get_batch_samples(self, *args: Any, **kwargs: Any):
        """The Trainer's micro-batches of one optimizer step, with the id column taken out."""
        batches, num_items_in_batch = super().get_batch_samples(*args, **kwargs)
        found = self._dvemb_callbacks()
        if len(found) != 1:
            raise ValueError(f"{type(self).__name__} needs exactly one DVEmbCallback in callbacks=, found {len(found)}")
        if batches:
            found[0].take_ids(batches, self._sample_weights(batches, num_items_in_batch))
        return batches, num_items_in_batch

    def _sample_weights(self, batches: Sequence[MutableMapping[str, Any]], num_items_in_batch: Any) -> np.ndarray | None:
        """w_i = n_i / N when the Trainer divides the step's summed token losses by its label-token count N.

        n_i counts sample i's tokens the way the Trainer counts N (``labels[..., 1:]`` for losses that shift
        labels, ``shift_labels`` when given). Otherwise (no count, or a transformers without that rule) None:
        the reduction's 1/B, as documented in this module. In a multi-process run the weights are relative
        to this process's loss, as the Recorder expects under DDP: the Trainer multiplies that loss by the
        number of processes when N counts every process's tokens (``average_tokens_across_devices``).
        """
        shifts = getattr(self, "_loss_shifts_labels", None)
        if num_items_in_batch is None or shifts is None or any("labels" not in b for b in batches):
            return None
        counts = []
        for batch in batches:
            labels = batch["shift_labels"] if "shift_labels" in batch else (
                batch["labels"][..., 1:] if shifts else batch["labels"])
            counts.append(labels.ne(-100).reshape(labels.shape[0], -1).sum(1).cpu().numpy())
        weights = np.concatenate(counts).astype(np.float64) / float(num_items_in_batch)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            weights *= self.accelerator.num_processes  # the Trainer's loss scale (no tensor parallelism here)
        return weights

    def train(self, *args: Any, **kwargs: Any):
        """``Trainer.train``; on an error the store keeps exactly the committed steps and the hooks are removed."""
        for callback in self._dvemb_callbacks():  # fp16: the Accelerator's GradScaler (None otherwise)
            callback.set_scaler(getattr(getattr(self, "accelerator", None), "scaler", None))
        try:
            return super().train(*args, **kwargs)
        except BaseException:
            for callback in self._dvemb_callbacks():
                callback.close()
            raise

    def _dvemb_callbacks(self) -> list[DVEmbCallback]:
        return [c for c in self.callback_handler.callbacks if isinstance(c, DVEmbCallback)]


class DVEmbTrainer(DVEmbTrainerMixin, Trainer):
    """A ``transformers.Trainer`` whose :class:`DVEmbCallback` records every optimizer step."""
