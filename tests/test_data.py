import gzip

import numpy as np
import pytest
import torch

from pipelines.config import DataConfig
from pipelines.data import DataError, prepare, read_idx


def test_digits_splits_are_deterministic_disjoint_and_cached(home):
    cfg = DataConfig(name="digits")
    first = prepare(cfg)
    assert not first.cached and first.input_shape == (1, 8, 8) and first.num_classes == 10
    counts = first.counts
    assert sum(counts.values()) == 1797
    assert counts["quiz"] == round(0.1 * (1797 - counts["test"]))
    # Disjoint: no image appears in two splits.
    rows = {s: {tuple(r) for r in first.x(s).flatten(1).numpy().round(5)} for s in ("train", "quiz", "val", "test")}
    assert not (rows["train"] & rows["test"]) or len(rows["train"] & rows["test"]) < 5  # digits has near-duplicates
    second = prepare(cfg)
    assert second.cached and second.key == first.key
    assert all(torch.equal(first.tensors[k], second.tensors[k]) for k in first.tensors)
    # A different split seed is a different cache entry with a different split.
    other = prepare(DataConfig(name="digits", split_seed=1))
    assert other.key != first.key and not torch.equal(other.y("train"), first.y("train"))


def test_train_is_normalised_and_label_budget_applies(home):
    data = prepare(DataConfig(name="digits", label_budget=300))
    total = data.counts["train"] + data.counts["quiz"] + data.counts["val"]
    assert total == 300
    x = data.x("train")
    assert abs(float(x.mean())) < 0.2 and abs(float(x.std()) - 1) < 0.3


def test_mnist_from_shared_gz_idx(home, shared_data):
    data = prepare(DataConfig(name="mnist", root=shared_data / "mnist", label_budget=1000))
    assert data.input_shape == (1, 28, 28) and data.counts["test"] == 10000
    assert data.counts["train"] + data.counts["quiz"] + data.counts["val"] == 1000
    # Also found from the data root itself (root/mnist/MNIST/raw) via METADISTILL_DATA.
    assert prepare(DataConfig(name="fashion-mnist", root=shared_data, label_budget=200)).class_names[0] == "T-shirt/top"


def test_missing_root_names_layout(home, monkeypatch):
    monkeypatch.delenv("METADISTILL_DATA", raising=False)
    with pytest.raises(DataError, match="needs a data folder.*MNIST/raw"):
        prepare(DataConfig(name="mnist"))
    with pytest.raises(DataError, match="train-images-idx3-ubyte.*not found.*expected layout"):
        prepare(DataConfig(name="mnist", root=home.parent))


def test_corrupt_idx_names_file(tmp_path):
    bad = tmp_path / "train-images-idx3-ubyte.gz"
    bad.write_bytes(gzip.compress(b"\x00\x00\x08\x03" + (5).to_bytes(4, "big") + b"\x00" * 20))
    with pytest.raises(DataError, match=f"{bad}.*truncated or corrupt"):
        read_idx(bad, 3, "images")
    bad.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="corrupt or truncated"):
        read_idx(bad, 3, "images")
    plain = tmp_path / "labels"
    plain.write_bytes(b"\x00\x00\x08\x01" + (3).to_bytes(4, "big") + bytes([1, 2, 3]))
    assert np.array_equal(read_idx(plain, 1, "labels"), [1, 2, 3])
    with pytest.raises(DataError, match="too short for an IDX images file"):
        read_idx(plain, 3, "images")


def test_corrupt_mnist_in_tree_fails_without_fallback(home, tmp_path, shared_data):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        (raw / name).write_bytes((shared_data / "mnist/MNIST/raw" / name).read_bytes())
    (raw / "train-images-idx3-ubyte.gz").write_bytes((shared_data / "mnist/MNIST/raw/train-images-idx3-ubyte.gz").read_bytes()[:5000])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz"):
        prepare(DataConfig(name="mnist", root=tmp_path))
    cache = home / "cache" / "data"
    assert not cache.exists() or not any(cache.iterdir())


def test_omniglot_npz_and_zip_readers(shared_data):
    from pipelines.omniglot import load_characters

    x, names, _ = load_characters(shared_data, "evaluation")
    assert x.shape == (659, 20, 1, 28, 28) and len(names) == 659
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.mean() < 0.3  # strokes are 1, background 0
    z, znames, files = load_characters(shared_data / "omniglot" / "omniglot-py", "background_small1")
    assert z.shape[0] == 136 and z.shape[1] == 20 and len(files) == 1 and "/" in znames[0]
