"""nn.Embedding: a token is a looked-up id, a_tok its one-hot vector; tracked only when named (``modules=``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .registry import LayerRule, add_rule, last_dim_outputs


def _embedding_inputs(module: nn.Embedding, ids: torch.Tensor, in_t: torch.Tensor | None,
                      in_bias: torch.Tensor | None, bias: bool, dtype: torch.dtype) -> torch.Tensor:
    """One-hot rows of the looked-up ids (projected: the ids' rows of P_in^T); padding_idx gets no gradient."""
    ids = ids.reshape(ids.shape[0], -1)
    rows = in_t[ids] if in_t is not None else F.one_hot(ids, module.num_embeddings).to(dtype)
    if module.padding_idx is not None:
        rows = rows * (ids != module.padding_idx).unsqueeze(-1).to(rows.dtype)
    return rows


EMBEDDING = add_rule(LayerRule("embedding", "nn.Embedding", lambda m: isinstance(m, nn.Embedding),
                               lambda m: (m.num_embeddings, m.embedding_dim), lambda w: w.t(), _embedding_inputs,
                               last_dim_outputs, default=False))
