"""mlcl_fast.LabelQueue: a FIFO of embeddings and label sets used as the loss's keys."""
from __future__ import annotations

import collections

import pytest
import torch

import mlcl_fast
from cases import fresh_seed, random_labels, to_padded
from mlcl_fast import LabelQueue, multilabel_contrastive_loss

pytestmark = pytest.mark.usefixtures("single_thread")


def _batches(seed, count, n=5, d=4, L=9):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, d, generator=gen), random_labels(gen, n, L, 0.3, empty_rows=1)) for _ in range(count)]


def _contents(queue):
    """(embedding row, sorted label tuple) of every filled slot, as a multiset."""
    sets = queue.key_labels()
    return collections.Counter((tuple(e.tolist()), tuple(i for i in row.tolist() if i >= 0))
                               for e, row in zip(queue.keys(), sets.index))


def test_fifo_keeps_the_newest_rows():
    queue = LabelQueue(capacity=12, dim=4, num_labels=9, max_labels=9)
    assert queue.keys() is None and queue.key_labels() is None and len(queue) == 0
    model = collections.deque(maxlen=12)
    for i, (x, y) in enumerate(_batches(fresh_seed("queue-fifo"), 7)):
        labels = to_padded(y, i) if i % 2 else y  # any label format of the API
        queue.enqueue(x, labels)
        for row, lab in zip(x, y):
            model.append((tuple(row.tolist()), tuple(torch.nonzero(lab).flatten().tolist())))
        assert len(queue) == len(model)
        assert _contents(queue) == collections.Counter(model)
        assert torch.equal(queue.key_labels().count, (queue.key_labels().index >= 0).sum(1))


def test_views_and_more_rows_than_capacity():
    queue = LabelQueue(capacity=4, dim=3, num_labels=5, max_labels=3)
    x = torch.arange(2 * 3 * 3, dtype=torch.float32).reshape(3, 2, 3)  # 3 samples, 2 views: 6 rows
    y = torch.tensor([[1, 0, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 0, 0, 1]], dtype=torch.bool)
    queue.enqueue(x, y)
    assert len(queue) == 4  # the newest 4 of 6 rows: sample 1's two views, sample 2's two views
    assert _contents(queue) == collections.Counter({(tuple(x[1, 0].tolist()), (1, 2)): 1,
                                                    (tuple(x[1, 1].tolist()), (1, 2)): 1,
                                                    (tuple(x[2, 0].tolist()), (4,)): 1,
                                                    (tuple(x[2, 1].tolist()), (4,)): 1})


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_the_loss_with_the_queue_equals_explicit_keys(backend):
    if backend not in mlcl_fast.available_backends("cpu"):
        pytest.skip(f"{backend} unavailable")
    queue = LabelQueue(capacity=10, dim=4, num_labels=9, max_labels=9, dtype=torch.float64)
    batches = _batches(fresh_seed("queue-loss"), 4)
    keys, key_labels = [], []
    for x, y in batches[:3]:
        queue.enqueue(x.double(), y)
        keys.append(x.double())
        key_labels.append(y)
    keys, key_labels = torch.cat(keys)[-10:], torch.cat(key_labels)[-10:]
    x, y = batches[3]
    x = x.double().requires_grad_(True)
    kw = dict(preset="jaccard", backend=backend)
    got = multilabel_contrastive_loss(x, y, keys=queue.keys(), key_labels=queue.key_labels(), **kw)
    (g_got,) = torch.autograd.grad(got, x)
    want = multilabel_contrastive_loss(x, y, keys=keys, key_labels=key_labels, **kw)
    (g_want,) = torch.autograd.grad(want, x)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)  # same columns, another order
    torch.testing.assert_close(g_got, g_want, rtol=1e-6, atol=1e-9)
    assert not torch.equal(got, multilabel_contrastive_loss(x, y, **kw)), "the keys must change the loss"


def test_state_dict_round_trip():
    queue = LabelQueue(capacity=7, dim=4, num_labels=9, max_labels=9)
    batches = _batches(fresh_seed("queue-state"), 4)
    for x, y in batches[:3]:
        queue.enqueue(x, y)
    copy = LabelQueue(capacity=7, dim=4, num_labels=9, max_labels=9)
    copy.load_state_dict(queue.state_dict())
    assert (copy.position, copy.filled) == (queue.position, queue.filled)
    for q in (queue, copy):
        q.enqueue(*batches[3])
    assert torch.equal(copy.keys(), queue.keys()) and torch.equal(copy.key_labels().index, queue.key_labels().index)
    bad = queue.state_dict()
    bad["_extra_state"] = {"position": 9, "filled": 3}
    with pytest.raises(ValueError, match="^state_dict"):
        copy.load_state_dict(bad)


def test_large_label_space_costs_capacity_times_max_labels():
    queue = LabelQueue(capacity=64, dim=8, num_labels=10**6, max_labels=5)
    assert queue.labels.shape == (64, 5) and queue.embeddings.shape == (64, 8)
    idx = torch.tensor([[999_999, 3, -1], [17, -1, -1]])
    queue.enqueue(torch.randn(2, 8), idx, label_format="indices", check_values=False)  # padded indices: no host read of values
    assert queue.key_labels().num_labels == 10**6 and len(queue) == 2


def test_errors_name_the_argument():
    queue = LabelQueue(capacity=4, dim=3, num_labels=5, max_labels=2)
    with pytest.raises(ValueError, match="^embeddings"):
        queue.enqueue(torch.randn(2, 4), torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="^embeddings"):
        queue.enqueue(torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="^labels"):
        queue.enqueue(torch.randn(2, 3), torch.ones(2, 5, dtype=torch.bool))  # 5 labels > max_labels
    with pytest.raises(ValueError, match="^labels"):
        queue.enqueue(torch.randn(2, 3), torch.tensor([[0, 7], [1, -1]]))  # out of the label space
    for name, kw in (("capacity", dict(capacity=0)), ("dim", dict(dim=-1)), ("num_labels", dict(num_labels=True)),
                     ("max_labels", dict(max_labels=1.5))):
        args = {**dict(capacity=4, dim=3, num_labels=5, max_labels=2), **kw}
        with pytest.raises(ValueError, match=f"^{name}"):
            LabelQueue(**args)
    assert len(queue) == 0, "a refused enqueue leaves the queue as it was"
