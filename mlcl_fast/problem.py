"""What the public API hands to a backend: normalised embeddings, canonical labels, config."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import Tensor

from .labels import LabelSets
from .presets import LossConfig


@dataclass
class Problem:
    """One loss evaluation.

    samples     [N, d] L2-normalised rows (views flattened: row b*V + v is view v of sample b)
    prototypes  [L, d] L2-normalised label prototypes, or None when config.prototype_mode == "none"
    labels      label sets of the N rows (already repeated over views)
    Anchors are the N rows, then the L prototypes when prototype_mode == "rows";
    columns are the N rows, then the L prototypes when prototypes are used.
    """

    samples: Tensor
    prototypes: Optional[Tensor]
    labels: LabelSets
    config: LossConfig
    temperature: float

    @property
    def num_samples(self) -> int:
        return self.samples.shape[0]

    @property
    def num_anchors(self) -> int:
        n = self.num_samples
        return n + self.prototypes.shape[0] if self.config.prototype_mode == "rows" else n

    @property
    def num_columns(self) -> int:
        n = self.num_samples
        return n + self.prototypes.shape[0] if self.config.uses_prototypes else n
