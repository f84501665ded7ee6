"""salign_kernels: fused dense feature-matching losses for self-supervised alignment learning.

The local alignment loss matches every pixel of one slice's feature map (or every voxel of a
sub-volume's) to its most similar pixel in a nearby slice, without building the (N x N) similarity
matrix; the global positional loss predicts the slices' relative position. ``(B, N, C)`` tokens (ViT,
DenseCL) go through :mod:`salign_kernels.tokens`. See the README for the definitions.
"""

from ._backend import BackendStatus, BackendUnavailableError, backends, resolve_backend
from ._config import get_float32_precision, set_float32_precision
from .functional import dense_match, global_positional_loss, local_alignment_loss, window_match
from .masks import feature_mask
from .losses import GlobalPositionalHead, LocalAlignmentLoss, SALoss, SALossOutput
from .tokens import most_similar_index, select_most_similar, token_alignment_loss, token_match
from .model import SALModel
from .engines import SALPrepareBatch, sal_total

__version__ = "0.1.0"

__all__ = [
    "dense_match",
    "window_match",
    "local_alignment_loss",
    "global_positional_loss",
    "token_match",
    "token_alignment_loss",
    "most_similar_index",
    "select_most_similar",
    "feature_mask",
    "LocalAlignmentLoss",
    "GlobalPositionalHead",
    "SALoss",
    "SALossOutput",
    "SALModel",
    "SALPrepareBatch",
    "sal_total",
    "backends",
    "resolve_backend",
    "BackendStatus",
    "BackendUnavailableError",
    "set_float32_precision",
    "get_float32_precision",
]
