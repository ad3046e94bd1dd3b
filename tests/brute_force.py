"""Independent float64 oracle for SPEC.md, written with plain loops over anchors, columns and labels.

Nothing here imports mlcl_fast: the preset table and every formula are transcribed from the
specification, so an error in the library's presets, label handling or reference backend shows up
as a disagreement. Speed is irrelevant; keep it obviously correct.

Usage:
    out = evaluate(features, label_sets, prototypes, preset="reg", temperature=0.1, alpha=0.5)
    out.loss, out.anchor_losses, out.valid
    grad_features, grad_prototypes = out.grads()            # of the reduced ("mean") loss
    grad_features, grad_prototypes = out.grads(coeffs)      # of sum_i coeffs[i] * l_i

    # extra columns ("keys", never anchors), SPEC "Keys":
    out = evaluate(features, label_sets, prototypes, keys=keys, key_label_sets=key_sets)
    grad_features, grad_prototypes, grad_keys = out.all_grads(coeffs)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

# SPEC "Presets" table, verbatim.
SPEC_PRESETS = {
    "supcon_any": dict(weighting="any", prototype_mode="none", beta=1.0, reg=False, anchor_weight="uniform"),
    "supcon_all": dict(weighting="all", prototype_mode="none", beta=1.0, reg=False, anchor_weight="uniform"),
    "jaccard": dict(weighting="jaccard", prototype_mode="none", beta=1.0, reg=False, anchor_weight="uniform"),
    "mulsupcon": dict(weighting="label", f="one", prototype_mode="none", beta=1.0, reg=False,
                      anchor_weight="labels"),
    "msc": dict(weighting="label", f="union", prototype_mode="columns", beta=0.1, reg=False,
                anchor_weight="uniform"),
    "proto": dict(weighting="label", f="one", prototype_mode="columns", beta=0.0, reg=False,
                  anchor_weight="uniform"),
    "reg_noreg": dict(weighting="label", f="overlap", alpha=0.0, prototype_mode="rows", beta=1.0, reg=False,
                      anchor_weight="uniform"),
    "reg": dict(weighting="label", f="overlap", alpha=0.0, prototype_mode="rows", beta=1.0, reg=True,
                anchor_weight="uniform"),
}
# SPEC: "Defaults outside presets".
SPEC_DEFAULTS = dict(f="one", alpha=0.0, prototype_mode="none", beta=1.0, reg=False, anchor_weight="uniform")
NORM_EPS = 1e-12


def spec_config(preset: str = "reg", **overrides) -> dict:
    cfg = dict(SPEC_DEFAULTS)
    cfg.update(SPEC_PRESETS[preset])
    cfg.update(overrides)
    return cfg


@dataclass
class BruteForceResult:
    anchor_losses: torch.Tensor        # [|A|] float64, 0 for invalid anchors
    valid: list                        # [|A|] bool
    coeffs: list                       # d loss / d l_i of the reduced loss
    loss: float                        # the reduced ("mean") loss
    dl_ds: list                        # dl_ds[a][c] = d l_a / d s_{a,c} (SPEC gradient incl. regulariser)
    dl_ds_terms: list                  # W_a p_ac + w_ac + r_ac: the size of the terms that dl_ds sums
    # what grads() needs to push dl/ds through the normalisation
    _features: torch.Tensor = field(repr=False, default=None)
    _prototypes: Optional[torch.Tensor] = field(repr=False, default=None)
    _keys: Optional[torch.Tensor] = field(repr=False, default=None)
    _anchors: list = field(repr=False, default=None)
    _columns: list = field(repr=False, default=None)
    _temperature: float = 0.1

    def condition(self, coeffs=None) -> float:
        """How much dl/ds cancels: sum of |terms| over |sum of terms| (1 = none; inf when the
        gradient vanishes). Rounding to precision eps perturbs the gradient by about
        condition * eps / tau relative to its size, so fp32 comparisons need a moderate value."""
        coeffs = self.coeffs if coeffs is None else [float(c) for c in coeffs]
        terms = sum(abs(c) * sum(row) for c, row in zip(coeffs, self.dl_ds_terms))
        net = sum(abs(c) * sum(abs(g) for g in row) for c, row in zip(coeffs, self.dl_ds))
        return terms / net if net > 0 else (1.0 if terms == 0 else math.inf)

    def grads(self, coeffs=None):
        """(grad of features, grad of prototypes or None) of sum_a coeffs[a] * l_a, in float64.

        Default coeffs: those of the reduced loss. The SPEC gradient G[a][c] = dl_a/ds_{a,c} is
        chained through s = <x_a, x_c>/tau and the L2 normalisation by autograd on the
        surrogate sum(G * s), where G is a constant.
        """
        return self.all_grads(coeffs)[:2]

    def all_grads(self, coeffs=None):
        """(grad of features, grad of prototypes or None, grad of keys or None), as grads()."""
        coeffs = self.coeffs if coeffs is None else [float(c) for c in coeffs]
        leaf = lambda t: None if t is None else t.detach().clone().requires_grad_(True)
        feats, protos, keys = leaf(self._features), leaf(self._prototypes), leaf(self._keys)
        emb = _normalised_embeddings(feats, protos, keys)
        g = self._weighted(self.dl_ds, coeffs)
        s = emb[self._anchors] @ emb[self._columns].T / self._temperature
        inputs = [t for t in (feats, protos, keys) if t is not None]
        out = list(torch.autograd.grad((g * s).sum(), inputs, allow_unused=True))
        grads = []
        for t in (feats, protos, keys):
            grads.append(None if t is None else (lambda o: torch.zeros_like(t) if o is None else o)(out.pop(0)))
        return tuple(grads)


    def _scale_norms(self, coeffs=None) -> tuple[float, float, float]:
        """(features, keys, prototypes) norms of the size of what the gradient sums: the terms'
        sizes |c_a| (W p + w + r) chained to the normalised embeddings, divided by each raw
        row's norm, without the normalisation's projection (which can cancel everything, e.g.
        at d = 1). Rounding errors of a gradient are relative to this, not to the gradient."""
        coeffs = self.coeffs if coeffs is None else [float(c) for c in coeffs]
        with torch.no_grad():
            emb = _normalised_embeddings(self._features, self._prototypes, self._keys)
        emb.requires_grad_(True)
        g = self._weighted(self.dl_ds_terms, [abs(c) for c in coeffs])
        s = emb[self._anchors] @ emb[self._columns].T / self._temperature
        (grad,) = torch.autograd.grad((g * s).sum(), emb)
        dim = self._features.shape[-1]
        parts = [self._features.reshape(-1, dim)] + ([self._keys.reshape(-1, dim)] if self._keys is not None else []) \
            + ([self._prototypes] if self._prototypes is not None else [])
        raw = torch.cat(parts)
        grad = grad / raw.norm(dim=1, keepdim=True).clamp(min=NORM_EPS)
        n = parts[0].shape[0]
        m = n + (parts[1].shape[0] if self._keys is not None else 0)
        return float(grad[:n].norm()), float(grad[n:m].norm()), float(grad[m:].norm())

    def grad_scale(self, coeffs=None):
        """(features, prototypes) gradient scales (_scale_norms)."""
        scale_f, _, scale_p = self._scale_norms(coeffs)
        return scale_f, scale_p

    def key_grad_scale(self, coeffs=None) -> float:
        """The keys' gradient scale (_scale_norms; 0 without keys)."""
        return self._scale_norms(coeffs)[1]

    def _weighted(self, dl_ds, coeffs) -> torch.Tensor:
        return torch.tensor([[coeffs[a] * dl_ds[a][c] for c in range(len(self._columns))]
                             for a in range(len(self._anchors))], dtype=torch.float64).reshape(
            len(self._anchors), len(self._columns))


def _normalised_embeddings(feats: torch.Tensor, protos: Optional[torch.Tensor],
                           keys: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Embeddings in column order: rows (b-major), keys (m-major over their views), prototypes."""
    dim = feats.shape[-1]
    parts = [feats.reshape(-1, dim)] + ([keys.reshape(-1, dim)] if keys is not None else []) \
        + ([protos] if protos is not None else [])
    emb = torch.cat(parts)
    return emb / emb.norm(dim=1, keepdim=True).clamp(min=NORM_EPS)


def evaluate(features: torch.Tensor, label_sets, prototypes: Optional[torch.Tensor] = None, *,
             preset: str = "reg", temperature: float = 0.1, num_labels: Optional[int] = None,
             keys: Optional[torch.Tensor] = None, key_label_sets=None, **overrides) -> BruteForceResult:
    """SPEC, evaluated in float64.

    features    [B, d] or [B, V, d] (any float dtype; its values are used in float64)
    label_sets  B python iterables of label ids (one per sample)
    prototypes  [L, d] or None
    keys        [M, d] or [M, V', d] extra columns (SPEC "Keys"): never anchors, sample columns
                (beta_j = beta, f as for samples) after the rows and before the prototypes
    key_label_sets  M python iterables of label ids (one per key)
    """
    cfg = spec_config(preset, **overrides)
    feats = features.detach().to("cpu", torch.float64)
    protos = None if prototypes is None else prototypes.detach().to("cpu", torch.float64)
    use_protos = cfg["prototype_mode"] != "none"
    if not use_protos:
        protos = None
    batch = feats.shape[0]
    views = feats.shape[1] if feats.dim() == 3 else 1
    n = batch * views
    keys = None if keys is None else keys.detach().to("cpu", torch.float64)
    key_views = 1 if keys is None or keys.dim() == 2 else keys.shape[1]
    num_keys = 0 if keys is None else keys.shape[0] * key_views
    num_protos = protos.shape[0] if protos is not None else 0
    if num_labels is None:
        num_labels = num_protos

    # Embedding e: rows in b-major order (row b*V + v is view v of sample b), then keys (key m's
    # view v at m*V' + v), then prototypes. Keys are columns only.
    sets = [frozenset(int(k) for k in label_sets[r // views]) for r in range(n)]
    sets += [frozenset(int(k) for k in key_label_sets[m // key_views]) for m in range(num_keys)]
    sets += [frozenset([k]) for k in range(num_protos)]
    is_proto = [False] * (n + num_keys) + [True] * num_protos
    columns = list(range(n + num_keys + num_protos))
    first_proto = n + num_keys
    anchors = list(range(n)) + (list(range(first_proto, first_proto + num_protos))
                                if cfg["prototype_mode"] == "rows" else [])

    with torch.no_grad():
        emb = _normalised_embeddings(feats, protos, keys)
        s_all = (emb @ emb.T / temperature).tolist()

    beta = float(cfg["beta"])
    col_beta = [1.0 if is_proto[j] else beta for j in columns]

    losses, valid, dl_ds, dl_ds_terms, counts = [], [], [], [], []
    for i in anchors:
        y_i = sets[i]
        counts.append(len(y_i))
        grad_row = [0.0] * len(columns)
        dl_ds_terms.append([0.0] * len(columns))
        active = [j for j in columns if j != i and col_beta[j] > 0]
        if not active:
            losses.append(0.0), valid.append(False), dl_ds.append(grad_row)
            continue
        s = {j: s_all[i][j] for j in active}
        top = max(s.values())
        log_d = top + math.log(sum(col_beta[j] * math.exp(s[j] - top) for j in active))
        log_p = {j: s[j] - log_d for j in active}
        p = {j: col_beta[j] * math.exp(log_p[j]) for j in active}
        w = _positive_weights(cfg, i, active, sets, is_proto)
        total_w = sum(w.values())
        if not total_w > 0:
            losses.append(0.0), valid.append(False), dl_ds.append(grad_row)
            continue
        loss_i = -sum(w[j] * log_p[j] for j in active)
        r = {j: 0.0 for j in active}
        if cfg["reg"]:
            for j in active:
                if w[j] > 0:
                    r[j] = max(p[j] - w[j], 0.0)
            loss_i -= sum(r[j] * s[j] for j in active)
        for j in active:
            grad_row[j] = total_w * p[j] - w[j] - r[j]
            dl_ds_terms[-1][j] = total_w * p[j] + w[j] + r[j]
        losses.append(loss_i), valid.append(True), dl_ds.append(grad_row)

    if cfg["anchor_weight"] == "uniform":
        n_valid = sum(valid)
        coeffs = [(1.0 / n_valid if v else 0.0) for v in valid] if n_valid else [0.0] * len(valid)
    else:
        total = sum(counts)
        coeffs = [(c / total if v else 0.0) for c, v in zip(counts, valid)] if total else [0.0] * len(valid)
    loss = sum(c * l for c, l in zip(coeffs, losses))
    return BruteForceResult(torch.tensor(losses, dtype=torch.float64), valid, coeffs, loss, dl_ds, dl_ds_terms,
                            feats, protos, keys, anchors, columns, float(temperature))


def _positive_weights(cfg: dict, i: int, active: list, sets: list, is_proto: list) -> dict:
    y_i = sets[i]
    w = {j: 0.0 for j in active}
    if cfg["weighting"] in ("any", "all", "jaccard"):
        omega = {}
        for j in active:
            y_j = sets[j]
            c = len(y_i & y_j)
            if cfg["weighting"] == "any":
                omega[j] = 1.0 if c > 0 else 0.0
            elif cfg["weighting"] == "all":
                omega[j] = 1.0 if (c > 0 and y_i == y_j) else 0.0
            else:
                omega[j] = c / len(y_i | y_j) if c > 0 else 0.0
        total = sum(omega.values())
        if total > 0:
            w = {j: omega[j] / total for j in active}
        return w
    if cfg["weighting"] != "label":
        raise ValueError(cfg["weighting"])
    for k in y_i:
        carriers = [m for m in active if k in sets[m]]
        factors = {m: _pair_factor(cfg, y_i, sets[m], is_proto[m]) for m in carriers}
        z = sum(factors.values())
        if z == 0:
            continue
        for m in carriers:
            w[m] += factors[m] / z
    return {j: w[j] / len(y_i) for j in active} if y_i else w


def _pair_factor(cfg: dict, y_i: frozenset, y_j: frozenset, proto_column: bool) -> float:
    """f_ij for a column j that shares at least one label with anchor i."""
    if cfg["f"] == "one":
        return 1.0
    if cfg["f"] == "union":
        return 1.0 if proto_column else 1.0 / len(y_i | y_j)
    if cfg["f"] != "overlap":
        raise ValueError(cfg["f"])
    alpha = float(cfg["alpha"])
    if alpha < 0:
        return 1.0 if y_j <= y_i else 0.0
    return (len(y_i & y_j) / len(y_j)) ** alpha
