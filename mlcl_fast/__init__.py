"""mlcl_fast: fast, exact multi-label supervised contrastive losses for large label spaces."""
from .backends import available_backends, backend_status
from .baselines import asl_loss, bce_loss, zlpr_loss
from .labels import LabelSets, as_label_sets
from .loss import MultiLabelContrastiveLoss, multilabel_contrastive_loss
from .presets import PRESETS, LossConfig, resolve_config
from .queue import LabelQueue

bce_with_logits_loss = bce_loss

__all__ = [
    "MultiLabelContrastiveLoss", "multilabel_contrastive_loss", "zlpr_loss", "bce_loss", "asl_loss", "bce_with_logits_loss",
    "LabelSets", "as_label_sets", "LossConfig", "PRESETS", "resolve_config", "available_backends",
    "backend_status", "LabelQueue",
]
__version__ = "0.1.0"
