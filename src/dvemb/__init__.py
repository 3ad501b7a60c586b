"""dvemb: training-data attribution that respects when each data point was used.

Data value embeddings (Wang et al., 2024) estimate the trajectory-specific
leave-one-out effect of every (step, sample) record on a test loss.
"""

from ._version import __version__
from .capture.recorder import NonFiniteGradientError, Recorder
from .embed.recursion import EmbeddingInfo, compute_embeddings
from .query import Influence, Ranking, TopK, influence
from .store import Store, StoreError

__all__ = [
    "__version__", "Recorder", "NonFiniteGradientError", "compute_embeddings", "EmbeddingInfo",
    "influence", "Influence", "Ranking", "TopK", "Store", "StoreError",
]
