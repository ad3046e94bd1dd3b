"""Public API: the functional loss and the nn.Module that owns label prototypes."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .backends import resolve_backend
from .distributed import check_gather, gathered_loss
from .inputs import check_reduction, check_temperature, prepare
from .presets import DEFAULT_PRESET, resolve_config
from .reduction import reduce_anchor_losses


def multilabel_contrastive_loss(features: Tensor, labels, prototypes: Optional[Tensor] = None, *,
                                preset: str = DEFAULT_PRESET, temperature: float = 0.1,
                                reduction: str = "mean", backend: str = "auto",
                                num_labels: Optional[int] = None, label_format: str = "auto",
                                gather: Optional[str] = None, group=None, check_values: bool = True,
                                keys: Optional[Tensor] = None, key_labels=None, **overrides) -> Tensor:
    """Multi-label supervised contrastive loss of SPEC.

    features   [B, d] or [B, V, d] (V views of each sample), fp16/bf16/fp32/fp64
    labels     dense multi-hot [B, L], padded indices [B, K] (-1 = padding), sparse CSR/COO [B, L],
               or a LabelSets
    prototypes [L, d] label embeddings, required when the preset uses prototypes
    temperature a number >= 1e-6, or a one-element float tensor; one that requires grad is learnt
               (CLIP-style): its gradient comes from the backends' embedding gradients
               (inputs.temperature_scale), on every backend, with the SPEC's gradient convention
               (reg's r_ij a constant, as for the embeddings)
    reduction  "mean" (SPEC's anchor weighting: Σ_i c_i l_i / M with c_i = 1 on valid anchors and
               M = the number of valid anchors for anchor_weight="uniform", c_i = a_i and
               M = Σ_i a_i for "labels"), "sum" (Σ_i c_i l_i with the same c_i: the mean times M,
               0 when no anchor is valid) or "none" (l_i per anchor: the B*V rows in b-major
               order, then the L prototypes when they are anchors; 0 for invalid anchors)
    gather     None, or "all": the loss over the batches of every rank of `group` (default: the
               world), each rank anchoring its own rows; see docs/DISTRIBUTED.md for the value and
               gradient convention under DDP. "mean" and "sum" then return the global value (the
               same on every rank) with world_size times this rank's share as gradient;
               reduction="none" gives this rank's anchors.
    check_values  False: no check reads a tensor's values on the host (no NaN/Inf check of the
               features and prototypes; label values checked on the device, see
               labels.as_label_sets), for labels as padded indices (label_format="indices",
               num_labels given) or a LabelSets; with the closed-form Triton regime the call then
               makes no host synchronisation (except the regulariser's list of rare-label pairs:
               mlcl_fast/triton/README.md)
    keys       [M, d] or [M, V, d] extra columns (views flattened like the features'), e.g. a second
               encoder's embeddings (they may require grad) or a queue of detached ones; never
               anchors, in every anchor's softmax and positives by the SPEC weights of sample
               columns (beta_j = beta), L2-normalised like the features (docs/SPEC.md "Keys")
    key_labels the M keys' label sets, in any label format, in the label space of `labels`
               (required with keys)
    overrides  any LossConfig field: weighting, f, alpha, prototype_mode, beta, reg, anchor_weight

    Half-precision features are computed in fp32 and the loss is returned in fp32; gradients
    come back in the features' own dtype.
    """
    cfg = resolve_config(preset, **overrides)
    reduction = check_reduction(reduction)
    check_temperature(temperature)
    device = features.device if isinstance(features, Tensor) else torch.device("cpu")
    _, impl = resolve_backend(backend, device)
    if check_gather(gather, group) is not None:
        if keys is not None or key_labels is not None:
            raise ValueError("keys: not supported with gather='all' (gather the keys yourself, or pass them "
                             "without gather)")
        return gathered_loss(features, labels, prototypes, cfg, temperature, reduction, impl, num_labels,
                             label_format, group)
    problem = prepare(features, labels, prototypes, cfg, temperature, num_labels, label_format,
                      native_half=getattr(impl, "NATIVE_HALF", False), check_values=check_values,
                      keys=keys, key_labels=key_labels, unit_rows=getattr(impl, "unit_rows", None),
                      canonical_indices=getattr(impl, "canonical_indices", None),
                      prologue=getattr(impl, "prologue", None))
    losses, valid = impl.anchor_losses(problem)
    return reduce_anchor_losses(problem, losses, valid, reduction)


class MultiLabelContrastiveLoss(nn.Module):
    """Drop-in loss module. Owns learnable label prototypes ([num_labels, dim], Xavier-uniform)
    when the preset uses them; then `num_labels` and `dim` are required. `reduction`: "mean",
    "sum" or "none", as in multilabel_contrastive_loss."""

    def __init__(self, preset: str = DEFAULT_PRESET, num_labels: Optional[int] = None, dim: Optional[int] = None,
                 temperature: float = 0.1, backend: str = "auto", reduction: str = "mean",
                 gather: Optional[str] = None, group=None, check_values: bool = True, **overrides):
        super().__init__()
        self.check_values = check_values
        self.gather = check_gather(gather, group)
        self.group = group
        self.config = resolve_config(preset, **overrides)
        check_temperature(temperature)
        if isinstance(temperature, nn.Parameter):  # learnable: registered, so optimisers and DDP see it
            self.temperature = temperature
        elif isinstance(temperature, Tensor) and temperature.requires_grad:
            raise ValueError("temperature: a tensor that requires grad must be an nn.Parameter here (the module "
                             "keeps it across steps); or pass the tensor to multilabel_contrastive_loss each step")
        else:
            self.temperature = check_temperature(temperature)
        self.reduction = check_reduction(reduction)
        self.backend = backend
        self.num_labels = num_labels
        if self.config.uses_prototypes:
            for name, value in (("num_labels", num_labels), ("dim", dim)):
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ValueError(f"{name}: a positive integer is required when the preset uses prototypes, got {value!r}")
            self.prototypes = nn.Parameter(torch.empty(num_labels, dim))
            nn.init.xavier_uniform_(self.prototypes)
        else:
            self.register_parameter("prototypes", None)

    def forward(self, features: Tensor, labels, keys: Optional[Tensor] = None, key_labels=None) -> Tensor:
        """The loss of `features` with `labels`; `keys`/`key_labels`: extra columns, as in
        multilabel_contrastive_loss."""
        return multilabel_contrastive_loss(features, labels, self.prototypes, preset=self.config, temperature=self.temperature,
                                           reduction=self.reduction, backend=self.backend, num_labels=self.num_labels,
                                           gather=self.gather, group=self.group, check_values=self.check_values,
                                           keys=keys, key_labels=key_labels)

    def extra_repr(self) -> str:
        c = self.config
        return (f"weighting={c.weighting}, f={c.f}, alpha={c.alpha}, prototype_mode={c.prototype_mode}, "
                f"beta={c.beta}, reg={c.reg}, anchor_weight={c.anchor_weight}, temperature={self.temperature}, "
                f"backend={self.backend}" + (f", gather={self.gather!r}" if self.gather else ""))
