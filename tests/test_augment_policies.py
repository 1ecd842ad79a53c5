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


@pytest.mark.parametrize("policy", ["trivialaugment", "randaugment"])
def test_a_search_free_policy_runs_over_the_fixed_list_when_asked(policy):
    sets = ["data.augment=[{name: horizontal_flip}]", f"data.augment_policy={policy}"]
    plain = make_augmenter(load_config(overrides=sets).data, _data())
    based = make_augmenter(load_config(overrides=[*sets, "data.augment_policy_base=fixed"]).data, _data())
    x, seeds = _images(64), torch.arange(64) * 7919
    out, as_is, flipped = based(x, seeds), plain(x, seeds), plain(x.flip(-1), seeds)
    # each image is the policy's on the image or on its mirror image (same seed, same op)
    was_flipped = (out == flipped).flatten(1).all(1)
    assert torch.equal(out[~was_flipped], as_is[~was_flipped])
    assert 16 < int(was_flipped.sum()) < 48  # the flip's own coin, about half the images
    assert torch.equal(out, based(x, seeds))


@pytest.mark.parametrize("sets,message", [
    (["data.augment_policy=learned"], "a learned policy takes its base from data.augment_search.base"),
    (["data.augment_policy=fixed"], "data.augment_policy is 'fixed'"),
    (["data.augment_policy=trivialaugment", "data.augment=[]"], "data.augment is empty"),
])
def test_a_base_under_anything_but_a_search_free_policy_is_refused(sets, message):
    from pipelines.config.loader import ConfigError

    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[*sets, "data.augment_policy_base=fixed"])


def test_fixed_and_none():
    fixed = load_config(overrides=["data.augment=[{name: horizontal_flip}]"]).data
    assert make_augmenter(fixed, _data()) is not None
    assert make_augmenter(fixed.model_copy(update={"augment_policy": "none"}), _data()) is None
    assert make_augmenter(load_config(overrides=["data.augment=[]"]).data, _data()) is None


def test_teacher_cache_key_follows_the_policy(home):
    from pipelines import data as data_stage
    from pipelines.evaluate.metrics import evaluate
    from pipelines.teacher.context import TeacherContext
    from pipelines.teacher.fit import obtain_teacher

    cfg = load_config()
    prepared = data_stage.prepare(cfg.data)
    keys = {TeacherContext.from_config(load_config(overrides=[f"data.augment_policy={p}"]), prepared).teacher_key
            for p in ("fixed", "none", "trivialaugment", "randaugment")}
    crop = ["data.augment_policy=trivialaugment", "data.augment=[{name: random_crop}]"]
    keys |= {TeacherContext.from_config(load_config(overrides=[*crop, f"data.augment_policy_base={b}"]), prepared).teacher_key
             for b in ("none", "fixed")}
    assert len(keys) == 6
    trained = load_config(overrides=["data.augment_policy=trivialaugment", "teacher.model.arch=mlp",
                                     "teacher.model.kwargs={hidden: [64]}", "teacher.train.steps=150"])
    outcome = obtain_teacher(TeacherContext.from_config(trained, data_stage.prepare(trained.data)))
    acc = evaluate(outcome.model, prepared.x("test"), prepared.y("test"), 10).accuracy
    assert acc > 0.6  # trained through TrivialAugmentWide's per-sample ops, and it learned
