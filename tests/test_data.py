import gzip
import subprocess
import sys

import numpy as np
import pytest
import torch

from pipelines.config.data import DataConfig
from pipelines.config.errors import ConfigError
from pipelines.config.loader import load_config
from pipelines.data.errors import DataError
from pipelines.data.prepare import prepare
from pipelines.data.readers import read_idx


def test_digits_splits_are_deterministic_disjoint_and_cached(home):
    cfg = DataConfig(name="digits")
    first = prepare(cfg)
    assert not first.cached and first.input_shape == (1, 8, 8) and first.num_classes == 10
    counts = first.counts
    assert sum(counts.values()) == 1797
    assert counts["quiz"] == round(0.1 * (1797 - counts["test"]))
    # Disjoint: no source row appears in two splits, and every row is in one.
    from itertools import combinations

    from sklearn.datasets import load_digits

    from pipelines.data.splits import split_indices

    rows = {s: set(r.tolist()) for s, r in split_indices(load_digits().target, False, cfg).items() if r is not None}
    assert all(not (rows[a] & rows[b]) for a, b in combinations(rows, 2))
    assert set().union(*rows.values()) == set(range(1797))
    # ... and the prepared splits are those rows (compared through their labels, in order).
    assert torch.equal(first.y("test"), torch.from_numpy(load_digits().target[sorted(rows["test"])]))
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
    truncated = (shared_data / "mnist/MNIST/raw/train-images-idx3-ubyte.gz").read_bytes()[:5000]
    (raw / "train-images-idx3-ubyte.gz").write_bytes(truncated)
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz"):
        prepare(DataConfig(name="mnist", root=tmp_path))
    cache = home / "cache" / "data"
    assert not cache.exists() or not any(cache.iterdir())


def test_omniglot_npz_and_zip_readers(shared_data):
    from pipelines.data.omniglot import load_characters

    x, names, _ = load_characters(shared_data, "evaluation")
    assert x.shape == (659, 20, 1, 28, 28) and len(names) == 659
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.mean() < 0.3  # strokes are 1, background 0
    z, znames, files = load_characters(shared_data / "omniglot" / "omniglot-py", "background_small1")
    assert z.shape[0] == 136 and z.shape[1] == 20 and len(files) == 1 and "/" in znames[0]


def test_label_budget_leaves_an_unlabeled_transfer_split(home):
    data = prepare(DataConfig(name="digits", label_budget=300))
    labelled = data.counts["train"] + data.counts["quiz"] + data.counts["val"]
    assert labelled == 300 and data.counts["transfer"] == 1797 - data.counts["test"] - 300
    assert data.transfer().shape == (data.counts["transfer"], 1, 8, 8)
    assert "transfer_y" not in data.tensors  # labels dropped at preparation, not cached
    assert "transfer_y" not in prepare(DataConfig(name="digits", label_budget=300)).tensors  # the cached copy
    off = prepare(DataConfig(name="digits", label_budget=300, transfer=False))
    assert off.counts["transfer"] == 0 and off.transfer() is None and off.key != data.key
    assert torch.equal(off.y("train"), data.y("train"))  # the same labelled splits either way
    limited = prepare(DataConfig(name="digits", label_budget=300, transfer_limit=100))
    assert limited.counts["transfer"] == 100


def test_no_transfer_label_can_reach_training(home):
    """The transfer split's true labels can be anything: the prepared data (and so every
    training step) is bit-for-bit the same."""
    from pipelines.data.readers import RawData
    from pipelines.data.splits import make_splits

    rng = np.random.default_rng(0)
    x = rng.random((400, 1, 4, 4), dtype=np.float32)
    y = rng.integers(0, 5, 400)
    test = (rng.random((50, 1, 4, 4), dtype=np.float32), rng.integers(0, 5, 50))
    cfg = DataConfig(name="digits", label_budget=100)
    first = make_splits(RawData((x, y), test, list("abcde"), "synthetic"), cfg)
    labelled_rows = {tuple(r) for s in ("train", "quiz", "val") for r in first[s][0].reshape(len(first[s][0]), -1)}
    others = np.array([tuple(r) not in labelled_rows for r in x.reshape(400, -1)])
    assert others.sum() == 300 and first["transfer"][1] is None
    relabelled = y.copy()
    relabelled[others] = (relabelled[others] + 1 + rng.integers(0, 4, others.sum())) % 5  # every one changed
    second = make_splits(RawData((x, relabelled), test, list("abcde"), "synthetic"), cfg)
    for split in ("train", "quiz", "val", "test", "transfer"):
        for a, b in zip(first[split], second[split]):
            assert (a is None and b is None) or np.array_equal(a, b), split


def test_transfer_root_adds_the_users_images(home, tmp_path):
    from PIL import Image

    folder = tmp_path / "unlabeled" / "nested"
    folder.mkdir(parents=True)
    for i in range(6):
        Image.fromarray(np.full((20, 20), 40 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    (folder / "notes.txt").write_text("not an image")
    data = prepare(DataConfig(name="digits", label_budget=300, transfer_root=tmp_path / "unlabeled"))
    plain = prepare(DataConfig(name="digits", label_budget=300))
    assert data.counts["transfer"] == plain.counts["transfer"] + 6
    assert data.transfer().shape[1:] == (1, 8, 8)
    # A changed image is a changed cache entry.
    Image.fromarray(np.zeros((20, 20), dtype=np.uint8)).save(folder / "5.png")
    assert prepare(DataConfig(name="digits", label_budget=300, transfer_root=tmp_path / "unlabeled")).key != data.key
    with pytest.raises(DataError, match="transfer_root .*not a folder"):
        prepare(DataConfig(name="digits", transfer_root=tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="transfer_root .*no images found"):
        prepare(DataConfig(name="digits", transfer_root=tmp_path / "empty"))


def test_image_size_resizes_the_shorter_side_and_crops_the_centre(tmp_path, home):
    """``data.image_size`` for an image folder of 40x20 photos and for an array source
    (digits 8x8): shorter side to the size, centre crop; the models see that shape."""
    from PIL import Image

    from pipelines.data.prepare import prepare

    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(40):
            pixels = np.zeros((20, 40, 3), dtype=np.uint8)
            pixels[:, 10:30] = 255 if c == "a" else 0  # the centre square: white for a, black for b
            pixels[:, :10] = rng.integers(0, 255, (20, 10, 3))
            Image.fromarray(pixels).save(tmp_path / c / f"{i}.png")
    cfg = load_config(overrides=["data.name=imagefolder", f"data.root={tmp_path}", "data.image_size=12",
                                 "data.test_fraction=0.25", "student.train.batch_size=16",
                                 "teacher.train.batch_size=16"])
    prepared = prepare(cfg.data)
    assert prepared.input_shape == (3, 12, 12)
    raw = prepared.x("train") * torch.tensor(prepared.std).view(1, 3, 1, 1) + torch.tensor(prepared.mean).view(1, 3, 1, 1)
    # Only the centre square was kept (its border blends with the resize filter's neighbours).
    white, black = raw[prepared.y("train") == 0][..., 2:-2], raw[prepared.y("train") == 1][..., 2:-2]
    assert torch.allclose(white, torch.ones_like(white), atol=1e-3)
    assert torch.allclose(black, torch.zeros_like(black), atol=1e-3)
    digits = prepare(load_config(overrides=["data.image_size=16"]).data)
    assert digits.input_shape == (1, 16, 16) and digits.key != prepare(load_config().data).key


def test_image_size_a_model_cannot_take_is_refused_with_both_sizes():
    with pytest.raises(ConfigError, match="conv4 needs inputs of at least 16x16.*1x8x8|1x8x8.*16x16"):
        load_config(overrides=["student.model.arch=conv4", "student.must_be_smaller=false"])
    assert load_config(overrides=["data.image_size=16", "student.model.arch=conv4",
                                  "student.must_be_smaller=false"]).student.model.arch == "conv4"


def _folder_with_a_truncated_image(root):
    from PIL import Image

    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(20):
            Image.fromarray(np.full((8, 8, 3), 40 * i % 255, dtype=np.uint8)).save(root / c / f"{i}.png")
    good = (root / "dog" / "0.png").read_bytes()
    (root / "dog" / "0.png").write_bytes(good[: len(good) // 2])  # truncated
    return root / "dog" / "0.png"


def test_bad_image_fails_naming_it_or_is_skipped_and_counted(tmp_path, home):
    from pipelines.data.prepare import prepare

    bad = _folder_with_a_truncated_image(tmp_path / "imgs")
    settings = ["data.name=imagefolder", f"data.root={tmp_path / 'imgs'}", "data.test_fraction=0.25",
                "student.train.batch_size=8", "teacher.train.batch_size=8"]
    with pytest.raises(DataError, match=f"{bad}: not a readable image") as failed:
        prepare(load_config(overrides=settings).data)
    assert "BytesIO" not in str(failed.value)
    prepared = prepare(load_config(overrides=[*settings, "data.on_bad_image=skip"]).data)
    assert prepared.counts["skipped_images"] == 1
    assert sum(v for k, v in prepared.counts.items() if k in ("train", "quiz", "val", "test")) == 39
    assert prepare(load_config(overrides=[*settings, "data.on_bad_image=skip"]).data).counts["skipped_images"] == 1


@pytest.mark.parametrize("layout,message", [("empty class", "class folder\\(s\\) bird hold no images"),
                                            ("test-only class", "class\\(es\\) bird appear only here")])
def test_class_layout_problems_exit_2_naming_the_class(tmp_path, home, layout, message):
    from PIL import Image

    for split in ("train", "test"):
        for c in ("cat", "dog"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(12):
                Image.fromarray(np.full((8, 8, 3), i, dtype=np.uint8)).save(tmp_path / split / c / f"{i}.png")
    (tmp_path / ("train" if layout == "empty class" else "test") / "bird").mkdir()
    if layout == "test-only class":
        Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "test" / "bird" / "0.png")
    from pipelines.data.errors import DataLayoutError
    from pipelines.data.prepare import prepare

    cfg = load_config(overrides=["data.name=imagefolder", f"data.root={tmp_path}", "student.train.batch_size=8",
                                 "teacher.train.batch_size=8"])
    with pytest.raises(DataLayoutError, match=message):
        prepare(cfg.data)
    assert isinstance(DataLayoutError("x"), ConfigError)
    if layout == "empty class":  # and through the command: exit 2, one line naming the class
        proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", "--set", "data.name=imagefolder",
                               "--set", f"data.root={tmp_path}", "--set", "student.train.batch_size=8",
                               "--set", "teacher.train.batch_size=8"], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-2000:]
        assert "bird" in proc.stderr


def _class_folders(root, counts: dict[str, int]):
    from PIL import Image

    for c, n in counts.items():
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((8, 8, 3), 10 * i % 255, dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def test_one_class_folder_exits_2_before_work(tmp_path, home):
    """Situation 2 of issue 36: it trained for 53 s, then failed with "every student is at chance"."""
    import os
    import time

    from pipelines.data.errors import DataLayoutError

    root = _class_folders(tmp_path / "imgs", {"cat": 30})
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", "--set", "data.name=imagefolder",
                           "--set", f"data.root={root}"], capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")})
    elapsed = time.perf_counter() - start
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "one class folder (cat)" in lines[0], proc.stderr[-2000:]
    assert elapsed < 30 and not (home / "mlflow.db").exists() and not (home / "prefect").exists()
    with pytest.raises(DataLayoutError, match="one class folder"):
        prepare(DataConfig(name="imagefolder", root=root))


def test_a_class_with_one_image_is_refused_and_imbalance_is_warned(tmp_path, home):
    from pipelines.data.errors import DataLayoutError
    from pipelines.data.readers import class_counts, imbalance_note, source_size

    lone = _class_folders(tmp_path / "lone", {"cat": 12, "dog": 1})
    with pytest.raises(DataLayoutError, match="class dog has 1 image: a class needs at least 2 training images"):
        source_size(DataConfig(name="imagefolder", root=lone))  # what the pre-flight check reads
    with pytest.raises(DataLayoutError, match="class dog has 1 image"):
        prepare(DataConfig(name="imagefolder", root=lone))
    skewed = DataConfig(name="imagefolder", root=_class_folders(tmp_path / "skewed", {"bird": 4, "cat": 40, "dog": 9}))
    assert class_counts(skewed) == {"bird": 4, "cat": 40, "dog": 9}
    assert imbalance_note(skewed) == ("classes are imbalanced: cat 40 images, bird 4 (10x): accuracy mostly reflects "
                                      "the large classes; add images to the small ones for a model that serves every class")
    balanced = DataConfig(name="imagefolder", root=_class_folders(tmp_path / "balanced", {"cat": 39, "dog": 4}))
    assert imbalance_note(balanced) is None  # under 10x
    assert class_counts(DataConfig(name="digits")) is None and imbalance_note(DataConfig(name="digits")) is None


def _idx(path, dims: tuple[int, ...], body: bytes, dtype: int = 0x08) -> None:
    header = bytes([0, 0, dtype, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims)
    path.write_bytes(gzip.compress(header + body))


def test_idx_header_and_count_errors_name_the_file(tmp_path, home):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    _idx(raw / "train-images-idx3-ubyte.gz", (4, 28, 28), bytes(4 * 784))
    _idx(raw / "train-labels-idx1-ubyte.gz", (3,), bytes(3))  # one label short
    _idx(raw / "t10k-images-idx3-ubyte.gz", (2, 28, 28), bytes(2 * 784))
    _idx(raw / "t10k-labels-idx1-ubyte.gz", (2,), bytes(2))
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz: 4 images but 3 labels.*MD5"):
        prepare(DataConfig(name="mnist", root=tmp_path))
    _idx(raw / "train-labels-idx1-ubyte.gz", (4,), bytes(4), dtype=0x0D)  # floats, not unsigned bytes
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz: not an IDX labels file.*header 00000d01"):
        prepare(DataConfig(name="mnist", root=tmp_path))


def test_a_cifar_zip_that_is_not_a_zip_is_named(tmp_path, home):
    (tmp_path / "cifar10").mkdir()
    (tmp_path / "cifar10" / "cifar10_test_jpg.zip").write_bytes(b"PK but not really a zip")
    with pytest.raises(DataError, match="cifar10_test_jpg.zip: not a readable zip"):
        prepare(DataConfig(name="cifar10", root=tmp_path, storage="memory"))


def test_an_unreadable_image_is_named_without_pil_internals():
    from pipelines.data.decode import UNREADABLE, decode_image, left_out

    with pytest.raises(UNREADABLE) as bad:
        decode_image(b"not an image at all", "RGB", None)
    with pytest.raises(DataError) as failed:
        left_out("photos/cat/1.jpg", bad.value, "fail", [])
    assert str(failed.value).startswith("photos/cat/1.jpg: not a readable image (cannot identify image file)")
    assert "BytesIO" not in str(failed.value)
