"""nn.Linear and Hugging Face GPT-2's Conv1D: maps on the last dimension, every leading position a token."""

from __future__ import annotations

from torch import nn

from .registry import LayerRule, add_rule, affine_inputs, last_dim_outputs


def _is_hf_conv1d(module: nn.Module) -> bool:
    # Hugging Face's GPT-2 Conv1D (transformers.pytorch_utils.Conv1D): weight is (d_in, d_out).
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


LINEAR = add_rule(LayerRule("linear", "nn.Linear", lambda m: isinstance(m, nn.Linear),
                            lambda m: (m.in_features, m.out_features), lambda w: w, affine_inputs, last_dim_outputs))
HF_CONV1D = add_rule(LayerRule("hf_conv1d", "GPT-2 Conv1D (transformers)", _is_hf_conv1d,
                               lambda m: (m.weight.shape[0], m.weight.shape[1]), lambda w: w.t(), affine_inputs,
                               last_dim_outputs))
