"""dvemb: training-data attribution that respects when each data point was used.

Data value embeddings (Wang et al., 2024) estimate the trajectory-specific
leave-one-out effect of every (step, sample) record on a test loss.
"""

from ._version import __version__
from .capture.checkpoints import load_checkpoint, saved_checkpoints
from .capture.layers import register_layer, supported_layers
from .capture.recorder import NonFiniteGradientError, Recorder
from .embed.compute import EmbeddingInfo, compute_embeddings
from .query import Influence, Ranking, Scorer, TopK, checkpoint_steps, influence, top_k
from .store import Store, StoreError

__all__ = [
    "__version__", "Recorder", "register_layer", "supported_layers", "load_checkpoint", "saved_checkpoints", "NonFiniteGradientError", "compute_embeddings", "EmbeddingInfo",
    "influence", "top_k", "Scorer", "checkpoint_steps", "Influence", "Ranking", "TopK", "Store", "StoreError",
]
