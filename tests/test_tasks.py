import pytest
import torch

from meta.tasks import TaskSampler


def toy_classes(n_classes=6, per_class=8):
    # Image of class c, example i: constant c*100+i, so provenance is readable from pixels.
    return [torch.stack([torch.full((1, 4, 4), float(c * 100 + i)) for i in range(per_class)])
            for c in range(n_classes)]


def test_shapes_labels_and_disjoint_support_query():
    sampler = TaskSampler(toy_classes(), ways=3, shots=2, queries=3)
    xs, ys, xq, yq = sampler.sample(4, torch.Generator().manual_seed(0))
    assert xs.shape == (4, 6, 1, 4, 4) and xq.shape == (4, 9, 1, 4, 4)
    assert ys[0].tolist() == [0, 0, 1, 1, 2, 2] and yq[0].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for t in range(4):
        s_ids = set(xs[t, :, 0, 0, 0].tolist())
        q_ids = set(xq[t, :, 0, 0, 0].tolist())
        assert not s_ids & q_ids
        # every label maps to one source class, the same in support and query
        for label in range(3):
            src = {int(v) // 100 for v in xs[t][ys[t] == label][:, 0, 0, 0]}
            assert src == {int(v) // 100 for v in xq[t][yq[t] == label][:, 0, 0, 0]} and len(src) == 1


def test_seeded_and_fixed_tasks_repeat():
    sampler = TaskSampler(toy_classes(), ways=3, shots=1, queries=2)
    a, b = sampler.fixed(5, seed=3), sampler.fixed(5, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    c = sampler.fixed(5, seed=4)
    assert not torch.equal(a[0], c[0])


def test_rotations_add_rotated_classes():
    classes = [torch.arange(16.0).reshape(1, 1, 4, 4).repeat(3, 1, 1, 1)]
    sampler = TaskSampler(classes, ways=4, shots=1, queries=1, rotations=True)
    assert sampler.num_classes == 4
    xs, *_ = sampler.sample(1, torch.Generator().manual_seed(0))
    corners = sorted(xs[0, :, 0, 0, 0].tolist())
    assert corners == sorted(torch.rot90(classes[0][0], k, dims=(-2, -1))[0, 0, 0].item() for k in range(4))


def test_bad_requests_are_named():
    with pytest.raises(ValueError, match="10-way tasks need at least 10 classes"):
        TaskSampler(toy_classes(), ways=10, shots=1, queries=1)
    with pytest.raises(ValueError, match="fewer than shots \\+ queries = 9"):
        TaskSampler(toy_classes(), ways=2, shots=4, queries=5)
    x, y = torch.randn(20, 1, 2, 2), torch.tensor([0] * 10 + [1] * 8 + [2] * 2)
    assert TaskSampler.from_labels(x, y, ways=2, shots=3, queries=3).num_classes == 2
