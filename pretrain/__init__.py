"""Self-supervised pretraining: objectives (SimCLR NT-Xent, SimMIM/SparK masked image modelling),
their heads, masking, views and health monitors. ``pretrain/run.py`` is the entry point."""

from .heads import MultiScaleDecoder, PixelShuffleDecoder, build_mim_decoder, build_projection_head
from .masking import BlockMaskGenerator
from .monitors import (
    alignment,
    contrastive_stats,
    cosine_similarities,
    embedding_std,
    make_mim_grid,
    uniformity,
)
from .objectives import (
    OBJECTIVES,
    CombinedObjective,
    ContrastiveObjective,
    MIMObjective,
    PretrainModel,
    PretrainOutput,
    build_objective,
    masked_reconstruction_loss,
    scaled_lr,
)
from .views import PretrainTransform, build_pretrain_transform

__all__ = [
    "OBJECTIVES",
    "BlockMaskGenerator",
    "CombinedObjective",
    "ContrastiveObjective",
    "MIMObjective",
    "MultiScaleDecoder",
    "PixelShuffleDecoder",
    "PretrainModel",
    "PretrainOutput",
    "PretrainTransform",
    "alignment",
    "build_mim_decoder",
    "build_objective",
    "build_pretrain_transform",
    "build_projection_head",
    "contrastive_stats",
    "cosine_similarities",
    "embedding_std",
    "make_mim_grid",
    "masked_reconstruction_loss",
    "scaled_lr",
    "uniformity",
]
