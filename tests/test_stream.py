"""``data.storage=stream``: shards that hold exactly the memory mode's splits, are readable
as WebDataset tars, refuse bad data and changed shards, and train like memory does."""

from __future__ import annotations

import os
import tarfile

import numpy as np
import pytest
import torch

from pipelines.config.data import DataConfig
from pipelines.config.errors import ConfigError
from pipelines.config.loader import load_config
from pipelines.data.errors import DataError, DataLayoutError
from pipelines.data.prepare import prepare, storage_for
from pipelines.data.shards import ShardError, ShardImages

SPLITS = ("train", "quiz", "val", "test", "transfer")


def _pixels(prepared, split: str) -> torch.Tensor:
    """A split's images back in [0, 1]."""
    x = prepared.x(split)
    x = x[:] if isinstance(x, ShardImages) else x
    shape = (1, -1, 1, 1)
    return x * torch.tensor(prepared.std).view(shape) + torch.tensor(prepared.mean).view(shape)


def _assert_same_splits(memory, stream):
    """The two storage modes hold the same prepared data, bit for bit: the same rows in
    each split, the same statistics (float64 sums per image in both), the same normalised
    pixels (float32(x / 255), then minus the mean, over the deviation, in both)."""
    assert isinstance(stream.x("train"), ShardImages) and isinstance(memory.x("train"), torch.Tensor)
    assert stream.counts == memory.counts and stream.input_shape == memory.input_shape
    assert stream.class_names == memory.class_names and stream.key != memory.key
    assert stream.mean == memory.mean and stream.std == memory.std
    pixels = _pixels(memory, "train").double()
    np.testing.assert_allclose(stream.mean, pixels.mean((0, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(stream.std, pixels.std((0, 2, 3), correction=0) + 1e-6, rtol=1e-5)
    for split in SPLITS:
        if split != "transfer":
            assert torch.equal(stream.y(split), memory.y(split)), split
        assert torch.equal(stream.x(split)[:], memory.x(split)), split


def _image_folder(root, sizes=((32, 32), (40, 36), (20, 50)), per_class=24, test=True):
    """Class folders of noise images in PNG and JPEG, of several sizes."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test") if test else ("",):
        for c in ("cat", "dog", "owl"):
            (root / split / c).mkdir(parents=True)
            for i in range(per_class if split != "test" else 8):
                w, h = sizes[i % len(sizes)]
                pixels = (rng.random((h, w, 3)) * 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.{'png' if i % 2 else 'jpg'}")
    return root


def test_stream_splits_equal_memory_splits_for_arrays_with_transfer_root(home, tmp_path):
    from PIL import Image

    (tmp_path / "extra").mkdir()
    for i in range(5):
        Image.fromarray(np.full((20, 20), 50 * i, dtype=np.uint8)).save(tmp_path / "extra" / f"{i}.png")
    settings = dict(name="digits", label_budget=300, transfer_limit=900, transfer_root=tmp_path / "extra")
    memory = prepare(DataConfig(storage="memory", **settings))
    stream = prepare(DataConfig(storage="stream", **settings))
    _assert_same_splits(memory, stream)
    assert stream.counts["transfer"] == 900 and not stream.cached
    again = prepare(DataConfig(storage="stream", **settings))
    assert again.cached and again.key == stream.key


@pytest.mark.parametrize("size", [24, 32])
def test_stream_splits_equal_memory_splits_for_image_files_resized(home, tmp_path, size):
    """Images of three sizes (one of them 32x32), PNG and JPEG: stored as they are or as
    lossless PNGs of the resized image, they decode to the memory mode's pixels."""
    root = _image_folder(tmp_path / "imgs")
    settings = dict(name="imagefolder", root=root, image_size=size, label_budget=48)
    _assert_same_splits(prepare(DataConfig(storage="memory", **settings)),
                        prepare(DataConfig(storage="stream", **settings)))


def test_cifar_jpeg_zip_streams_its_own_bytes(home, shared_data, tmp_path):
    import shutil

    (tmp_path / "cifar10").mkdir()  # the test zip alone (10,000 images): the carved-split setting
    shutil.copy(shared_data / "cifar10" / "cifar10_test_jpg.zip", tmp_path / "cifar10")
    settings = dict(name="cifar10", root=tmp_path, label_budget=500, transfer_limit=1000)
    memory = prepare(DataConfig(storage="memory", **settings))
    stream = prepare(DataConfig(storage="stream", **settings))
    _assert_same_splits(memory, stream)
    # The test zip's JPEGs are stored byte for byte, named and labelled as WebDataset expects.
    folder = stream.x("test").folder
    with tarfile.open(folder / "test-000000.tar") as tar:
        members = tar.getmembers()[:4]
        assert [m.name for m in members] == ["test00000000.jpg", "test00000000.cls",
                                             "test00000001.jpg", "test00000001.cls"]
        assert int(tar.extractfile(members[1]).read()) == int(stream.y("test")[0])
        assert tar.extractfile(members[0]).read()[:2] == b"\xff\xd8"  # a JPEG


def test_storage_auto_streams_only_what_does_not_fit(tmp_path):
    root = _image_folder(tmp_path / "imgs", per_class=4, test=False)
    assert storage_for(DataConfig(name="imagefolder", root=root)) == "memory"
    assert storage_for(DataConfig(name="imagefolder", root=root, memory_limit_gb=1e-6)) == "stream"
    assert storage_for(DataConfig(name="digits", memory_limit_gb=1e-6)) == "memory"  # read as arrays anyway


def test_bad_image_under_stream_fails_naming_it_or_is_skipped_like_memory(home, tmp_path):
    from tests.test_data import _folder_with_a_truncated_image

    bad = _folder_with_a_truncated_image(tmp_path / "imgs")
    settings = dict(name="imagefolder", root=tmp_path / "imgs", test_fraction=0.25)
    with pytest.raises(DataError, match=f"{bad}: not a readable image"):
        prepare(DataConfig(storage="stream", **settings))
    stream = prepare(DataConfig(storage="stream", on_bad_image="skip", **settings))
    assert stream.counts["skipped_images"] == 1
    _assert_same_splits(prepare(DataConfig(storage="memory", on_bad_image="skip", **settings)), stream)


@pytest.mark.parametrize("layout,message", [("empty class", "class folder\\(s\\) owl hold no images"),
                                            ("test-only class", "class\\(es\\) bird appear only here")])
def test_class_layout_problems_under_stream_name_the_class(tmp_path, home, layout, message):
    from PIL import Image

    root = _image_folder(tmp_path / "imgs", per_class=4)
    if layout == "empty class":
        for p in (root / "train" / "owl").iterdir():
            p.unlink()
    else:
        (root / "test" / "bird").mkdir()
        Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(root / "test" / "bird" / "0.png")
    with pytest.raises(DataLayoutError, match=message):
        prepare(DataConfig(name="imagefolder", root=root, storage="stream"))


def test_a_shard_changed_under_the_cache_is_refused_naming_it(home, tmp_path):
    root = _image_folder(tmp_path / "imgs", per_class=6)
    cfg = DataConfig(name="imagefolder", root=root, storage="stream")
    folder = prepare(cfg).x("train").folder
    shard = folder / "train-000000.tar"
    stat = shard.stat()
    data = bytearray(shard.read_bytes())
    data[600] ^= 0xFF  # same size; the time is put back too, so only the content tells
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    with pytest.raises(ShardError, match=f"{shard}: shard changed since it was written"):
        prepare(cfg)
    shard.unlink()
    with pytest.raises(ShardError, match=f"{shard}: shard missing"):
        prepare(cfg)


def test_lazy_split_indexes_like_a_tensor(home):
    memory = prepare(DataConfig(name="digits", storage="memory"))
    stream = prepare(DataConfig(name="digits", storage="stream"))
    lazy, dense = stream.x("val"), _pixels(memory, "val")
    back = lambda x: x * torch.tensor(stream.std).view(-1, 1, 1) + torch.tensor(stream.mean).view(-1, 1, 1)  # noqa: E731
    assert lazy.shape == tuple(dense.shape) and len(lazy) == len(dense)
    assert torch.allclose(back(lazy[3]), dense[3], atol=2e-6)
    assert torch.allclose(back(lazy[torch.tensor([5, 1])]), dense[[5, 1]], atol=2e-6)
    mask = stream.y("val") == 2
    assert torch.allclose(back(lazy[mask]), dense[mask], atol=2e-6)
    assert torch.allclose(back(lazy.subset(slice(4, 9))[:]), dense[4:9], atol=2e-6)
    for workers in (1, 0):  # through a DataLoader worker, and in this process
        lazy.workers = workers
        chunks = list(lazy.chunks(7, torch.device("cpu")))
        assert [len(c) for c in chunks][:2] == [7, 7] and torch.allclose(back(torch.cat(chunks)), dense, atol=2e-6)


def test_training_on_stream_equals_training_on_the_same_tensors(home):
    """The loop's DataLoader stream and an in-memory copy of the same normalised split give
    the same model: the reader feeds exactly the plan's batches, transfer included."""
    from models.registry import build_model
    from pipelines.engine.batches import Transfer
    from pipelines.engine.loop import train_classifier

    def loss(logits, x, y, index):  # the transfer rows count too
        labelled = y >= 0
        return (torch.nn.functional.cross_entropy(logits[labelled], y[labelled])
                + 0.01 * logits[~labelled].pow(2).mean() + 1e-3 * x.mean())

    cfg = load_config(overrides=["data.storage=stream", "data.label_budget=300", "student.train.steps=25",
                                 "student.train.batch_size=32"])
    stream = prepare(cfg.data)
    dense = {split: stream.x(split)[:] for split in ("train", "transfer")}
    models = []
    for train_x, transfer_x in ((stream.x("train"), stream.x("transfer")), (dense["train"], dense["transfer"])):
        torch.manual_seed(0)
        model = build_model("mlp", stream.input_shape, stream.num_classes, hidden=[32])
        train_classifier(model, train_x, stream.y("train"), cfg.student.train, loss, seed=3,
                         transfer=Transfer(transfer_x, 16))
        models.append(model)
    assert all(torch.equal(p, q) for p, q in zip(models[0].parameters(), models[1].parameters()))


def test_fewshot_refuses_stream_storage():
    from pipelines.orchestrate.fewshot import run_fewshot

    with pytest.raises(ConfigError, match="data.storage=stream applies to `metadistill run`"):
        run_fewshot(load_config(overrides=["data.storage=stream"]))


def test_flow_trains_every_stage_from_streamed_jpegs(home, tmp_path, prefect_server):
    """The whole flow on a folder of JPEGs with one unreadable file, streamed: the data
    child run says so and counts the skipped file, every student learned (MAML's tasks
    drawn from lazy per-class rows), one is registered."""
    from mlflow.tracking import MlflowClient
    from PIL import Image

    from pipelines.orchestrate.flow import metadistill_flow

    rng = np.random.default_rng(0)
    colours = np.array([[220, 40, 40], [40, 220, 40], [40, 40, 220]])
    for c, colour in enumerate(colours):
        (tmp_path / "imgs" / f"class{c}").mkdir(parents=True)
        for i in range(60):
            pixels = np.clip(colour + rng.normal(0, 60, (12, 12, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / "imgs" / f"class{c}" / f"{i}.jpg", quality=90)
    (tmp_path / "imgs" / "class0" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    cfg = load_config(overrides=[
        "data.name=imagefolder", f"data.root={tmp_path / 'imgs'}", "data.image_size=12", "data.storage=stream",
        "data.on_bad_image=skip", "data.label_budget=60", "teacher.model.arch=mlp", "teacher.model.kwargs={hidden: [32]}",
        "teacher.train.steps=60", "teacher.train.batch_size=16", "student.train.steps=40",
        "student.train.batch_size=16", "student.seeds=[0]", "student.methods=[scratch, kd, maml_init, meta_distill]",
        "meta_distill.reference=kd",
        "student.model.arch=mlp", "student.model.kwargs={hidden: [16]}",  # not the imagefolder preset's resnet8
        "maml.meta_steps=4", "teacher.improve.steps=30", "teacher.improve.batch_size=16",
        "tracking.experiment=stream-jpegs"])
    summary = metadistill_flow(config=cfg)
    assert all(m["test_acc"] > 0.6 for m in summary["methods"].values()), summary["methods"]  # chance: 1/3
    assert summary["registered_model"]["alias"] == "champion"
    uri = f"sqlite:///{home / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.get_experiment_by_name("stream-jpegs")
    data_run = client.search_runs([exp.experiment_id], "attributes.run_name = 'data'")[0]
    assert data_run.data.tags["data.storage"] == "stream"
    assert data_run.data.metrics["n_skipped_images"] == 1 and data_run.data.metrics["n_transfer"] > 0


def test_a_truncated_shard_is_refused_naming_it(home, tmp_path):
    root = _image_folder(tmp_path / "imgs", per_class=6)
    prepared = prepare(DataConfig(name="imagefolder", root=root, storage="stream"))
    train = prepared.x("train")
    shard = train.folder / "train-000000.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # cut after it was verified
    with pytest.raises(ShardError, match=f"{shard}: truncated at byte"):
        train[torch.arange(len(prepared.y("train")))]


def test_transfer_shards_carry_no_labels(home, tmp_path):
    """Stream storage drops the transfer split's labels before anything is written, as memory does."""
    settings = dict(name="digits", label_budget=300, transfer_limit=200, storage="stream")
    prepared = prepare(DataConfig(**settings))
    folder = prepared.x("transfer").folder
    shards = sorted(folder.glob("transfer-*.tar"))
    assert shards and prepared.counts["transfer"] == 200
    for shard in shards:
        with tarfile.open(shard) as tar:
            names = tar.getnames()
        assert names and not [n for n in names if n.endswith((".cls", ".txt", ".json"))], names[:6]
    assert "transfer_y" not in prepared.tensors
