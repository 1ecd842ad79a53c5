"""``data.augment_policy``: the fixed list, none, and torchvision's search-free policies
(TrivialAugmentWide, RandAugment) applied per sample on 8-bit pixels, seeded per example."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from pipelines.augment.policies import make_augmenter
from pipelines.config.loader import load_config

MEAN, STD = [0.3], [0.4]


def _data():
    return SimpleNamespace(input_shape=(1, 16, 16), mean=MEAN, std=STD)


def _images(n=16):
    torch.manual_seed(0)
    pixels = (torch.rand(n, 1, 16, 16) * 255).round() / 255  # exact 8-bit values
    return (pixels - MEAN[0]) / STD[0]


@pytest.mark.parametrize("policy", ["trivialaugment", "randaugment"])
def test_search_free_policies_are_seeded_per_example_and_stay_in_pixel_range(policy):
    augment = make_augmenter(load_config(overrides=[f"data.augment_policy={policy}"]).data, _data())
    x, seeds = _images(), torch.arange(16) * 7919
    out = augment(x, seeds)
    assert out.shape == x.shape
    assert torch.equal(out, augment(x, seeds))  # same seeds, same images
    assert torch.equal(out[3:5], augment(x[3:5], seeds[3:5]))  # a rank's shard: the same per-example result
    assert not torch.equal(out, augment(x, seeds + 1))
    changed = (out - x).abs().flatten(1).amax(1) > 1e-4
    assert changed.sum() >= 4  # most ops change the image (identity is one of TrivialAugment's choices)
    pixels = out * STD[0] + MEAN[0]
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    assert torch.allclose(pixels * 255, (pixels * 255).round(), atol=1e-3)  # 8-bit pixels, renormalised


def test_fixed_and_none():
    fixed = load_config(overrides=["data.augment=[{name: horizontal_flip}]"]).data
    assert make_augmenter(fixed, _data()) is not None
    assert make_augmenter(fixed.model_copy(update={"augment_policy": "none"}), _data()) is None
    assert make_augmenter(load_config(overrides=["data.augment=[]"]).data, _data()) is None


def test_teacher_cache_key_follows_the_policy(home):
    from pipelines import data as data_stage
    from pipelines.evaluate.metrics import evaluate
    from pipelines.teacher.fit import obtain_teacher, teacher_key

    cfg = load_config()
    prepared = data_stage.prepare(cfg.data)
    keys = {teacher_key(load_config(overrides=[f"data.augment_policy={p}"]), prepared)
            for p in ("fixed", "none", "trivialaugment", "randaugment")}
    assert len(keys) == 4
    trained = load_config(overrides=["data.augment_policy=trivialaugment", "teacher.model.arch=mlp",
                                     "teacher.model.kwargs={hidden: [64]}", "teacher.train.steps=150"])
    outcome = obtain_teacher(trained, data_stage.prepare(trained.data))
    acc = evaluate(outcome.model, prepared.x("test"), prepared.y("test"), 10).accuracy
    assert acc > 0.6  # trained through TrivialAugmentWide's per-sample ops, and it learned
