"""The losses of the study as presets over one resolved configuration (see SPEC)."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

WEIGHTINGS = ("any", "all", "jaccard", "label")
PAIR_FACTORS = ("one", "union", "overlap")
PROTOTYPE_MODES = ("none", "columns", "rows")
ANCHOR_WEIGHTS = ("uniform", "labels")
# The integer codes the kernels use for these choices: the position in the tuples above. The
# C++/CUDA sources declare the same order (csrc/cpu/options.h, csrc/cuda/kernels.h); a test
# reads both and checks that they agree.
WEIGHTING_CODES = {name: code for code, name in enumerate(WEIGHTINGS)}
FACTOR_CODES = {name: code for code, name in enumerate(PAIR_FACTORS)}


@dataclass(frozen=True)
class LossConfig:
    """A fully resolved loss configuration: what every backend receives."""

    weighting: str = "any"
    f: str = "one"
    alpha: float = 0.0
    prototype_mode: str = "none"
    beta: float = 1.0
    reg: bool = False
    anchor_weight: str = "uniform"

    @property
    def uses_prototypes(self) -> bool:
        return self.prototype_mode != "none"

    @property
    def label_centric(self) -> bool:
        return self.weighting == "label"


PRESETS: dict[str, LossConfig] = {
    "supcon_any": LossConfig(weighting="any"),
    "supcon_all": LossConfig(weighting="all"),
    "jaccard": LossConfig(weighting="jaccard"),
    "mulsupcon": LossConfig(weighting="label", f="one", anchor_weight="labels"),
    "msc": LossConfig(weighting="label", f="union", prototype_mode="columns", beta=0.1),
    "proto": LossConfig(weighting="label", f="one", prototype_mode="columns", beta=0.0),
    "reg_noreg": LossConfig(weighting="label", f="overlap", alpha=0.0, prototype_mode="rows"),
    "reg": LossConfig(weighting="label", f="overlap", alpha=0.0, prototype_mode="rows", reg=True),
}

PRESET_ORIGINS = {
    "supcon_any": "SupCon, positives share at least one label",
    "supcon_all": "SupCon, positives have identical label sets",
    "jaccard": "arXiv 2404.08720 baseline: Jaccard-weighted positives",
    "mulsupcon": "MulSupCon (AAAI 2024), label-centric, anchors weighted by label count",
    "msc": "ABALONE / L_MSC of arXiv 2404.08720: label prototypes as columns, beta=0.1",
    "proto": "softmax over label prototypes only",
    "reg_noreg": "arXiv 2412.00101 loss with prototypes as anchors, without the regulariser",
    "reg": "arXiv 2412.00101 proposed loss (REG): prototypes as anchors, gradient regulariser",
}

DEFAULT_PRESET = "reg"
OVERRIDABLE = tuple(f.name for f in fields(LossConfig))


def resolve_config(preset: str | LossConfig = DEFAULT_PRESET, **overrides) -> LossConfig:
    """Preset name (or a LossConfig) plus field overrides -> validated LossConfig."""
    if isinstance(preset, LossConfig):
        base = preset
    elif isinstance(preset, str) and preset in PRESETS:
        base = PRESETS[preset]
    else:
        raise ValueError(f"preset: unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
    unknown = sorted(set(overrides) - set(OVERRIDABLE))
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown loss option; the overridable fields are {list(OVERRIDABLE)}")
    cfg = replace(base, **overrides)
    _check_choice("weighting", cfg.weighting, WEIGHTINGS)
    _check_choice("f", cfg.f, PAIR_FACTORS)
    _check_choice("prototype_mode", cfg.prototype_mode, PROTOTYPE_MODES)
    _check_choice("anchor_weight", cfg.anchor_weight, ANCHOR_WEIGHTS)
    if isinstance(cfg.alpha, bool) or not isinstance(cfg.alpha, (int, float)) or not math.isfinite(cfg.alpha):
        raise ValueError(f"alpha: expected a finite number, got {cfg.alpha!r}")
    if isinstance(cfg.beta, bool) or not isinstance(cfg.beta, (int, float)) or not math.isfinite(cfg.beta) or cfg.beta < 0:
        raise ValueError(f"beta: expected a finite number >= 0, got {cfg.beta!r}")
    if not isinstance(cfg.reg, bool):
        raise ValueError(f"reg: expected True or False, got {cfg.reg!r}")
    if cfg.beta == 0 and not cfg.uses_prototypes:
        raise ValueError("beta: beta=0 removes every sample column, so it needs prototypes "
                         "(prototype_mode 'columns' or 'rows')")
    return replace(cfg, alpha=float(cfg.alpha), beta=float(cfg.beta))


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {list(choices)}, got {value!r}")
