"""A fixed-capacity FIFO of embeddings and their label sets, to use as extra columns (`keys=`,
`key_labels=`) of the contrastive loss: MoCo-style memory (MulSupCon trains with a 2048-entry
queue of embeddings and label vectors), pytorch-metric-learning's CrossBatchMemory, a memory bank.

Labels are stored as padded indices ([capacity, max_labels], -1 padding), so a label space of
10^6 costs O(capacity x max_labels), not O(capacity x L). The buffers live on the device; where
the next rows go is computed on the host from shapes alone (every enqueue adds a known number of
rows), so enqueueing and reading never wait for the device. With `gather=True` (under DDP) every
rank enqueues the rows of all ranks, in rank order, so the queues of all ranks stay identical.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .distributed import _all_gather_same, require_process_group
from .labels import LabelSets, as_label_sets


class LabelQueue(nn.Module):
    """queue = LabelQueue(capacity=2048, dim=128, num_labels=L, max_labels=K)
    queue.enqueue(key_embeddings, labels)        # detached, any label format of the API
    loss(features, labels, keys=queue.keys(), key_labels=queue.key_labels())

    `keys()` / `key_labels()` hold the filled entries (oldest first after a wrap: the order does
    not change the loss), None while the queue is empty. The state (buffers, write position and
    fill) is in `state_dict`."""

    def __init__(self, capacity: int, dim: int, num_labels: int, max_labels: int, dtype=torch.float32,
                 device=None):
        super().__init__()
        for name, value in (("capacity", capacity), ("dim", dim), ("num_labels", num_labels),
                            ("max_labels", max_labels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype: expected a floating-point torch.dtype, got {dtype!r}")
        self.capacity, self.dim, self.num_labels, self.max_labels = capacity, dim, num_labels, max_labels
        self.register_buffer("embeddings", torch.zeros(capacity, dim, dtype=dtype, device=device))
        self.register_buffer("labels", torch.full((capacity, max_labels), -1, dtype=torch.int64, device=device))
        self.register_buffer("counts", torch.zeros(capacity, dtype=torch.int64, device=device))
        self.position = 0  # the next slot written
        self.filled = 0    # slots holding an entry

    def __len__(self) -> int:
        return self.filled

    @torch.no_grad()
    def enqueue(self, embeddings: Tensor, labels, gather: bool = False, group=None, label_format: str = "auto",
                check_values: bool = True) -> None:
        """Add rows (detached): embeddings [n, dim] or [n, V, dim] (each view a row, with its
        sample's labels), labels for the n samples in any format multilabel_contrastive_loss takes.
        More rows than the capacity keep the newest. `gather`: the rows of every rank of `group`
        (default: the world), in rank order; every rank must enqueue the same number of rows.
        `label_format`, `check_values`: as in multilabel_contrastive_loss (check_values=False:
        padded indices with label_format="indices", checked by device-side assertions)."""
        if not isinstance(embeddings, Tensor) or embeddings.dim() not in (2, 3) or embeddings.shape[-1] != self.dim:
            shape = tuple(embeddings.shape) if isinstance(embeddings, Tensor) else type(embeddings).__name__
            raise ValueError(f"embeddings: expected [n, {self.dim}] or [n, V, {self.dim}], got {shape}")
        if not embeddings.dtype.is_floating_point:
            raise TypeError(f"embeddings: expected a floating-point tensor, got {embeddings.dtype}")
        if embeddings.device != self.embeddings.device:
            raise ValueError(f"embeddings: on {embeddings.device}, but the queue is on {self.embeddings.device}")
        n = embeddings.shape[0]
        sets = as_label_sets(labels, n, self.num_labels, label_format, device=embeddings.device,
                             check_values=check_values)
        if sets.width > self.max_labels:
            # the width is the largest label count (check_values=True) or the padded input's K
            raise ValueError(f"labels: up to {sets.width} labels per sample, more than max_labels={self.max_labels}")
        views = embeddings.shape[1] if embeddings.dim() == 3 else 1
        rows = embeddings.detach().reshape(n * views, self.dim).to(self.embeddings.dtype)
        sets = sets.repeat_views(views)
        index = torch.nn.functional.pad(sets.index, (0, self.max_labels - sets.width), value=-1)
        count = sets.count.to(torch.int64)
        if gather:  # every rank's rows, in rank order (the loss's gather uses the same exchange)
            require_process_group(group)
            rows, index, count = (_all_gather_same(t, group).flatten(0, 1) for t in (rows, index, count))
        rows, index, count = rows[-self.capacity:], index[-self.capacity:], count[-self.capacity:]
        m = rows.shape[0]
        slots = (self.position + torch.arange(m, device=rows.device)) % self.capacity
        self.embeddings.index_copy_(0, slots, rows)
        self.labels.index_copy_(0, slots, index)
        self.counts.index_copy_(0, slots, count)
        self.position = (self.position + m) % self.capacity
        self.filled = min(self.capacity, self.filled + m)

    def keys(self) -> Optional[Tensor]:
        """The filled embeddings [len, dim], or None when empty."""
        return self.embeddings[:self.filled] if self.filled else None

    def key_labels(self) -> Optional[LabelSets]:
        """Their label sets (a LabelSets of padded indices), or None when empty."""
        if not self.filled:
            return None
        return LabelSets(self.labels[:self.filled], self.counts[:self.filled], self.num_labels)

    def reset(self) -> None:
        self.position = self.filled = 0

    def get_extra_state(self) -> dict:
        return {"position": self.position, "filled": self.filled}

    def set_extra_state(self, state: dict) -> None:
        position, filled = int(state["position"]), int(state["filled"])
        if not (0 <= position < self.capacity and 0 <= filled <= self.capacity):
            raise ValueError(f"state_dict: queue position {position} / fill {filled} do not fit capacity "
                             f"{self.capacity}")
        self.position, self.filled = position, filled

    def extra_repr(self) -> str:
        return (f"capacity={self.capacity}, dim={self.dim}, num_labels={self.num_labels}, "
                f"max_labels={self.max_labels}, filled={self.filled}")

