"""The learned augmentation policy (meta/augment.py): its ops, its hypergradient against
finite differences (float64), its JSON round trip and the refusals of a bad policy."""

import json

import pytest
import torch
from torch import nn

from meta.augment import (
    OPS,
    SPACES,
    STRAIGHT_THROUGH,
    AugmentPolicy,
    Noise,
    PolicyError,
    apply_op,
    draw_noise,
    policy_hypergrad,
)
from meta.functional import params_of
from tests.helpers import worst_relative_error


def _images(n=6, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g, dtype=dtype)


_MAGNITUDE_FREE = ("autocontrast", "equalize")  # no magnitude: not the identity at 0
_SPACE_OPS = [(space, op) for space, ranges in SPACES.items() for op in ranges
              if op not in (*_MAGNITUDE_FREE, "identity")]


@pytest.mark.parametrize("space,op", _SPACE_OPS)
def test_each_op_is_the_identity_at_zero_and_changes_the_image_otherwise(space, op):
    x = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.allclose(apply_op(op, x, torch.zeros(len(x), dtype=x.dtype)), x, atol=1e-6)
    moved = apply_op(op, x, torch.full((len(x),), 0.8 * SPACES[space][op], dtype=x.dtype))
    assert (moved - x).abs().max() > 0.05 and moved.min() >= 0 and moved.max() <= 1


_DIFFERENTIABLE = [op for op in SPACES["narrow"] | SPACES["wide"] if op not in (*STRAIGHT_THROUGH, "identity")]


@pytest.mark.parametrize("op", _DIFFERENTIABLE)
def test_each_differentiable_op_matches_finite_differences(op):
    """In the magnitude, and in the pixels (autocontrast has no magnitude)."""
    g = torch.Generator().manual_seed(1)
    x = (0.1 + 0.8 * torch.rand(3, 3, 6, 6, generator=g, dtype=torch.float64)).requires_grad_()
    v = torch.tensor([0.21, -0.13, 0.32], dtype=torch.float64) * (SPACES["wide"] | SPACES["narrow"])[op]
    v.requires_grad_(op != "autocontrast")
    assert torch.autograd.gradcheck(lambda x, v: apply_op(op, x, v), (x, v), eps=1e-6, atol=1e-5)


def test_the_step_ops_are_torchvisions_on_8_bit_images():
    from torchvision.transforms.v2 import functional as TF

    g = torch.Generator().manual_seed(2)
    x8 = ((torch.rand(4, 3, 32, 32, generator=g) ** 2) * 180 + 20).round().to(torch.uint8)
    x8[0, 0] = 7  # a flat channel: equalize and autocontrast leave it alone
    x = x8.double() / 255

    def level(op, magnitude):
        return apply_op(op, x, torch.full((4,), float(magnitude), dtype=x.dtype)) * 255

    assert torch.equal(level("equalize", 0).round().to(torch.uint8), TF.equalize(x8))
    assert (level("autocontrast", 0) - TF.autocontrast(x8).double()).abs().max() <= 1  # torchvision truncates
    for bits in (2, 5, 7):
        assert torch.allclose(level("posterize", 8 - bits), TF.posterize(x8, bits).double(), atol=1e-6)
    # solarize inverts above 1 - |v| (torchvision: at or above its threshold, here between levels)
    assert torch.allclose(level("solarize", 0.3 + 0.5 / 255), TF.solarize(x8, 255 * 0.7).double(), atol=1e-6)


def test_the_step_ops_pass_a_gradient_straight_through():
    x = (0.1 + 0.8 * torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))).requires_grad_()
    apply_op("equalize", x, torch.zeros(2)).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # the identity in the pixels
    v = torch.tensor([2.0, 3.0], requires_grad=True)
    apply_op("posterize", x.detach(), v).mean().backward()
    assert (v.grad < 0).all()  # dropping more bits darkens, as posterize does on average
    v = torch.tensor([0.3, 0.6], requires_grad=True)
    dark = torch.full((2, 1, 8, 8), 0.9)  # bright pixels: a lower threshold inverts more of them
    apply_op("solarize", dark, v).mean().backward()
    assert (v.grad < 0).all()


def test_translate_moves_by_the_fraction_of_the_width():
    x = torch.zeros(1, 1, 8, 8, dtype=torch.float64)
    x[0, 0, :, 2] = 1.0
    moved = apply_op("translate_x", x, torch.tensor([0.25], dtype=torch.float64))  # 2 of 8 pixels
    assert moved[0, 0, 4].argmax().item() == 4


@pytest.mark.parametrize("depth,sampling,steps", [(1, "exact", 1), (2, "uniform", 1), (2, "uniform", 2)])
def test_hypergradient_matches_finite_differences(depth, sampling, steps):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    ops = ("rotate", "translate_y", "contrast", "sharpness")
    policy = AugmentPolicy(ops, depth=depth, sampling=sampling).double()
    with torch.no_grad():
        policy.logits.copy_(torch.tensor([0.3, -0.2, 0.1, 0.0]))
    x, xq = _images(8, 1), _images(10, 2)
    y, yq = torch.arange(8) % 3, torch.arange(10) % 3
    noise = draw_noise(policy, 8, torch.Generator().manual_seed(3), torch.device("cpu"), torch.float64)
    grads, loss = policy_hypergrad(model, params_of(model), policy, x, y, (xq, yq), noise, lr=0.5, steps=steps)
    assert set(grads) == {"logits", "raw_magnitude"} and all(g.abs().sum() > 0 for g in grads.values())
    base = {k: v.detach().clone() for k, v in policy.named_parameters()}

    def loss_at(p):
        probe = AugmentPolicy(ops, depth=depth, sampling=sampling).double()
        with torch.no_grad():
            for k, v in probe.named_parameters():
                v.copy_(p[k])
        return policy_hypergrad(model, params_of(model), probe, x, y, (xq, yq), noise, lr=0.5, steps=steps)[1]

    assert loss_at(base) == pytest.approx(loss)
    assert worst_relative_error(grads, base, loss_at) < 1e-4


def test_two_unrolled_steps_take_the_two_halves_of_the_batch_in_turn():
    """By hand: SGD on the first half, then on the second, then the quiz loss."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 3)).double()
    policy = AugmentPolicy(("brightness", "translate_x")).double()
    x, xq = _images(6, 7), _images(5, 8)
    y, yq = torch.tensor([0, 1, 2, 2, 1, 0]), torch.arange(5) % 3
    noise = draw_noise(policy, 6, torch.Generator().manual_seed(9), torch.device("cpu"), torch.float64)
    _, loss = policy_hypergrad(model, params_of(model), policy, x, y, (xq, yq), noise, lr=0.7, steps=2)
    with torch.no_grad():
        augmented = policy(x, noise)
    w, b = (p.detach().clone().requires_grad_() for p in model[1].parameters())
    for half in (slice(0, 3), slice(3, 6)):
        step_loss = torch.nn.functional.cross_entropy(augmented[half].flatten(1) @ w.T + b, y[half])
        gw, gb = torch.autograd.grad(step_loss, (w, b))
        w, b = (w - 0.7 * gw).detach().requires_grad_(), (b - 0.7 * gb).detach().requires_grad_()
    by_hand = torch.nn.functional.cross_entropy(xq.flatten(1) @ w.T + b, yq)
    assert loss == pytest.approx(by_hand.item(), rel=1e-10)
    with pytest.raises(ValueError, match="does not split into 4 equal steps"):
        policy_hypergrad(model, params_of(model), policy, x, y, (xq, yq), noise, lr=0.7, steps=4)


def test_a_hypergradient_step_lowers_the_quiz_loss():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 3)).double()
    policy = AugmentPolicy().double()
    x, xq = _images(16, 4), _images(16, 5)
    y, yq = torch.arange(16) % 3, torch.arange(16) % 3
    noise = draw_noise(policy, 16, torch.Generator().manual_seed(6), torch.device("cpu"), torch.float64)
    grads, before = policy_hypergrad(model, params_of(model), policy, x, y, (xq, yq), noise, lr=1.0)
    with torch.no_grad():
        for k, p in policy.named_parameters():
            p -= 0.05 * grads[k]
    _, after = policy_hypergrad(model, params_of(model), policy, x, y, (xq, yq), noise, lr=1.0)
    assert after < before


def test_hard_choice_applies_exactly_one_op_per_image():
    policy = AugmentPolicy(("brightness", "translate_x"))
    x = _images(4, dtype=torch.float32)
    gumbel = torch.tensor([[[5.0, 0.0], [0.0, 5.0], [5.0, 0.0], [0.0, 5.0]]])
    out = policy(x, Noise(gumbel, torch.ones(1, 4, 2), torch.ones(1, 4, 2)), hard=True)
    m = policy.magnitudes().detach()
    assert torch.allclose(out[0], apply_op("brightness", x[:1], m[:1])[0], atol=1e-6)
    assert torch.allclose(out[1], apply_op("translate_x", x[1:2], m[1:])[0], atol=1e-6)


def test_two_layers_at_drawn_strengths_compose_two_ops():
    """Depth 2, uniform: image 0 is brightened at a quarter of the magnitude, then shifted
    left at half of it; image 1 is shifted twice."""
    policy = AugmentPolicy(("brightness", "translate_x"), depth=2, sampling="uniform")
    x = _images(2, dtype=torch.float32)
    gumbel = torch.tensor([[[5.0, 0.0], [0.0, 5.0]], [[0.0, 5.0], [0.0, 5.0]]])
    signs = torch.tensor([[[1.0, 1.0], [1.0, 1.0]], [[1.0, -1.0], [1.0, 1.0]]])
    strength = torch.tensor([[[0.25, 1.0], [1.0, 0.5]], [[1.0, 0.5], [1.0, 1.0]]])
    out = policy(x, Noise(gumbel, signs, strength), hard=True)
    m = policy.magnitudes().detach()
    first = apply_op("brightness", x[:1], 0.25 * m[:1])
    assert torch.allclose(out[0], apply_op("translate_x", first, -0.5 * m[1:])[0], atol=1e-6)
    shifted = apply_op("translate_x", x[1:], 0.5 * m[1:])
    assert torch.allclose(out[1], apply_op("translate_x", shifted, m[1:])[0], atol=1e-6)


@pytest.mark.parametrize("space,ops", [("narrow", ("rotate", "brightness", "scale")),
                                       ("wide", ("rotate", "posterize", "equalize"))])
def test_json_round_trip(space, ops):
    policy = AugmentPolicy(ops, depth=2, sampling="uniform", space=space)
    with torch.no_grad():
        policy.logits.copy_(torch.tensor([1.0, 0.0, -1.0]))
        policy.raw_magnitude.copy_(torch.tensor([0.5, -1.0, 2.0]))
    spec = json.loads(json.dumps(policy.to_json()))
    again = AugmentPolicy.from_json(spec)
    assert (again.ops, again.depth, again.sampling, again.space) == (policy.ops, 2, "uniform", space)
    assert torch.allclose(again.probabilities(), policy.probabilities(), atol=1e-6)
    assert torch.allclose(again.magnitudes(), policy.magnitudes(), atol=1e-6)


@pytest.mark.parametrize("spec,field", [
    ({"version": 1, "ops": [{"name": "solarize", "probability": 1.0, "magnitude": 0.1}]}, "ops[0].name"),
    ({"version": 1, "ops": [{"name": "rotate", "probability": 1.0, "magnitude": 45.0}]}, "ops[0].magnitude"),
    ({"version": 1, "ops": [{"name": "rotate", "probability": 0.5, "magnitude": 5.0},
                            {"name": "scale", "probability": 1.5, "magnitude": 0.1}]}, "ops[1].probability"),
    ({"version": 1, "ops": [{"name": "rotate", "probability": 0.5, "magnitude": 5.0},
                            {"name": "scale", "probability": 0.2, "magnitude": 0.1}]}, "sum to"),
    ({"ops": []}, "an augmentation policy is"),
    ({"version": 2, "depth": 4, "sampling": "exact",
      "ops": [{"name": "rotate", "probability": 1.0, "magnitude": 5.0}]}, "depth: 4 is not an integer in"),
    ({"version": 2, "depth": 1, "sampling": "gaussian",
      "ops": [{"name": "rotate", "probability": 1.0, "magnitude": 5.0}]}, "sampling: 'gaussian'"),
    ({"version": 3, "space": "huge", "ops": [{"name": "rotate", "probability": 1.0, "magnitude": 5.0}]},
     "space: 'huge'"),
    ({"version": 3, "space": "wide", "ops": [{"name": "scale", "probability": 1.0, "magnitude": 0.1}]},
     "ops[0].name: unknown augmentation op 'scale' in the wide space"),
    ({"version": 3, "space": "wide", "ops": [{"name": "rotate", "probability": 1.0, "magnitude": 140.0}]},
     "ops[0].magnitude"),
])
def test_bad_policy_is_refused_naming_the_field(spec, field):
    with pytest.raises(PolicyError, match=field.replace("[", r"\[").replace("]", r"\]")):
        AugmentPolicy.from_json(spec)


@pytest.mark.parametrize("depth,sampling", [(1, "exact"), (2, "uniform")])
def test_learned_ops_are_seeded_per_example(depth, sampling):
    from pipelines.augment.policies import LearnedOps

    policy = AugmentPolicy(("rotate", "brightness", "translate_x"), depth=depth, sampling=sampling)
    ops = LearnedOps(policy.to_json(), [0.3], [0.4])
    x, seeds = (_images(16, dtype=torch.float32) - 0.3) / 0.4, torch.arange(16) * 7919
    out = ops(x, seeds)
    assert torch.equal(out, ops(x, seeds)) and torch.equal(out[5:9], ops(x[5:9], seeds[5:9]))
    assert not torch.equal(out, ops(x, seeds + 1))
    assert ((out - x).flatten(1).abs().amax(1) > 1e-3).float().mean() > 0.8  # every op moves the image


def test_a_base_runs_under_the_searched_ops_on_draws_of_its_own():
    from pipelines.augment.policies import FixedOps, LearnedOps
    from pipelines.config.data import AugmentConfig

    base = [{"name": "horizontal_flip"}]
    spec = {**AugmentPolicy(("identity",), space="wide").to_json(), "base": base}
    x, seeds = _images(64, dtype=torch.float32), torch.arange(64) * 7919
    out = LearnedOps(spec, [0.0], [1.0])(x, seeds)
    flipped = (out == x.flip(-1)).flatten(1).all(1)
    assert 16 < int(flipped.sum()) < 48 and torch.equal(out[~flipped], x[~flipped])
    # the base's draws are not the searched ops' (which start at draw 0)
    at_zero = FixedOps([AugmentConfig(**base[0])], [0.0], [1.0])(x, seeds)
    assert not torch.equal(out, at_zero)
    with pytest.raises(PolicyError, match=r"base\[0\]"):
        LearnedOps({**spec, "base": [{"name": "mixup"}]}, [0.0], [1.0])


@pytest.mark.parametrize("depth", [1, 2])
def test_torchvision_export_runs(depth):
    from torchvision.transforms import v2

    from pipelines.augment.policies import to_torchvision

    transform = to_torchvision(AugmentPolicy(depth=depth, sampling="uniform").to_json())
    assert isinstance(transform, v2.Compose if depth == 2 else v2.RandomChoice)
    torch.manual_seed(0)
    x = torch.rand(3, 16, 16)
    outs = [transform(x) for _ in range(5)]  # one draw may be a shift that rounds to 0 pixels
    assert all(out.shape == (3, 16, 16) for out in outs) and not all(torch.equal(out, x) for out in outs)


def test_torchvision_export_of_the_wide_space_with_a_base_runs():
    from pipelines.augment.policies import to_torchvision

    spec = {**AugmentPolicy(SPACES["wide"], init_magnitude=0.9, space="wide").to_json(),
            "base": [{"name": "random_crop", "padding": 4}, {"name": "horizontal_flip"}]}
    transform = to_torchvision(spec)
    torch.manual_seed(0)
    x = torch.rand(3, 16, 16)
    outs = [transform(x) for _ in range(40)]  # every op drawn, most likely
    assert all(out.shape == (3, 16, 16) and out.dtype == x.dtype for out in outs)
    assert sum(not torch.equal(out, x) for out in outs) > 30


def _search_cfg(*extra):
    from pipelines.config.loader import load_config

    return load_config(overrides=["data.augment_policy=learned", "data.augment_search.steps=40",
                                  "data.augment_search.batch_size=32", *extra])


def test_search_writes_a_valid_policy_once_and_keys_the_teacher_by_it(home):
    from pipelines import data as data_stage
    from pipelines.augment import search as augment_search
    from pipelines.teacher.context import TeacherContext

    cfg = _search_cfg()
    prepared = data_stage.prepare(cfg.data)
    ctx = augment_search.AugmentContext.from_config(cfg, prepared)
    first = augment_search.learned_policy(ctx)
    assert not first.cached and first.seconds > 0 and first.history["step"][-1] == 40
    learned = AugmentPolicy.from_json(first.spec)  # valid: every field in range
    assert not torch.allclose(learned.probabilities(), torch.full((len(OPS),), 1 / len(OPS)))  # it moved
    again = augment_search.learned_policy(ctx)
    assert again.cached and again.spec == first.spec
    other = _search_cfg("data.augment_search.seed=1")
    assert augment_search.learned_policy(augment_search.AugmentContext.from_config(other, prepared)).spec != first.spec
    assert (TeacherContext.from_config(cfg, prepared).teacher_key
            != TeacherContext.from_config(other, prepared).teacher_key)
    augment = augment_search.augmenter_for(ctx)
    x = prepared.x("train")[:8]
    assert augment(x, torch.arange(8)).shape == x.shape


def test_a_wide_search_with_a_base_writes_both_into_its_policy(home):
    from pipelines import data as data_stage
    from pipelines.augment import search as augment_search

    cfg = _search_cfg("data.augment_search.space=wide", "data.augment_search.base=fixed",
                      "data.augment_search.depth=1")
    prepared = data_stage.prepare(cfg.data)
    ctx = augment_search.AugmentContext.from_config(cfg, prepared)
    spec = augment_search.learned_policy(ctx).spec
    assert spec["space"] == "wide" and [op["name"] for op in spec["ops"]] == list(SPACES["wide"])
    assert spec["base"] == [op.model_dump(mode="json") for op in cfg.data.augment] != []
    assert AugmentPolicy.from_json(spec).magnitudes()[1] > SPACES["narrow"]["rotate"]  # wide ranges
    x = prepared.x("train")[:8]
    assert augment_search.augmenter_for(ctx)(x, torch.arange(8)).shape == x.shape


def test_a_population_search_keeps_the_candidate_whose_proxy_scores_best_on_held_out_data(home):
    from pipelines import data as data_stage
    from pipelines.augment import search as augment_search

    cfg = _search_cfg("data.augment_search.method=population", "data.augment_search.space=wide",
                      "data.augment_search.population_magnitudes=[0.2, 0.95]", "data.augment_search.population_depths=[1]",
                      "data.augment_search.population_steps=60")
    prepared = data_stage.prepare(cfg.data)
    ctx = augment_search.AugmentContext.from_config(cfg, prepared)
    result = augment_search.learned_policy(ctx)
    scores, candidates = result.history["quiz_accuracy"], result.history["candidates"]
    assert len(scores) == 2 and all(0 < a <= 1 for a in scores)
    best = result.history["chosen"]
    assert scores[best] == max(scores) and result.spec == candidates[best]
    shares = [c["ops"][1]["magnitude"] / SPACES["wide"]["rotate"] for c in candidates]
    assert shares[0] == pytest.approx(0.2, abs=1e-4) and shares[1] == pytest.approx(0.95, abs=1e-4)
    # each score is a proxy trained under that candidate alone: scoring it again gives the same
    again = augment_search._candidate_score(ctx, candidates[0], "again")
    assert again.accuracy == scores[0]


@pytest.mark.parametrize("sets,message", [
    (["data.augment_search.population_magnitudes=[1.5]"], "population_magnitudes must be shares"),
    (["data.augment_search.ops=[solarize]"], "out of the narrow space's"),
    (["data.augment_search.space=wide", "data.augment_search.ops=[scale]"], "out of the wide space's"),
    (["data.augment=[]", "data.augment_search.base=fixed"], "data.augment is empty"),
])
def test_a_search_config_out_of_its_space_is_refused(sets, message):
    from pipelines.config.loader import ConfigError

    with pytest.raises(ConfigError, match=message):
        _search_cfg(*sets)


def test_bad_policy_file_exits_2_naming_the_field(tmp_path, capsys):
    from pipelines.cli import main

    def exit_code(*sets):
        try:
            return main(["config", *[a for s in sets for a in ("--set", s)]])
        except SystemExit as exc:
            return exc.code

    bad = tmp_path / "policy.json"
    bad.write_text(json.dumps({"version": 1, "ops": [{"name": "rotate", "probability": 1.0, "magnitude": 99}]}))
    assert exit_code("data.augment_policy=learned", f"data.augment_policy_file={bad}") == 2
    assert "ops[0].magnitude (rotate): 99 is not in (0, 30.0)" in capsys.readouterr().err
    assert exit_code(f"data.augment_policy_file={bad}") == 2  # the policy must be learned
    assert "set data.augment_policy=learned" in capsys.readouterr().err
    good = tmp_path / "good.json"
    good.write_text(json.dumps(AugmentPolicy(("rotate", "scale")).to_json()))
    assert exit_code("data.augment_policy=learned", f"data.augment_policy_file={good}") == 0
    bad.write_text(json.dumps({**AugmentPolicy(("rotate",)).to_json(), "base": [{"name": "random_crop",
                                                                                  "padding": -1}]}))
    assert exit_code("data.augment_policy=learned", f"data.augment_policy_file={bad}") == 2
    assert "base[0]" in capsys.readouterr().err


def test_the_flow_logs_the_search_the_policy_and_the_examples(home, prefect_server):
    from mlflow.tracking import MlflowClient

    from pipelines.orchestrate.flow import metadistill_flow

    cfg = _search_cfg("teacher.model.arch=mlp", "teacher.model.kwargs={hidden: [64]}", "teacher.train.steps=100",
                      "student.train.steps=40", "student.methods=[scratch]", "student.seeds=[0]",
                      "tracking.register_best=false", "tracking.experiment=it-augment")
    summary = metadistill_flow(config=cfg)
    uri = f"sqlite:///{home / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    run = next(r for r in client.search_runs([client.get_experiment_by_name("it-augment").experiment_id])
               if r.info.run_name == "augmentation")
    assert run.data.tags["mlflow.parentRunId"] == summary["mlflow_run_id"]
    assert {"augment_policy.json", "augment_policy_search.png", "augmented_examples.png"} <= {
        a.path for a in client.list_artifacts(run.info.run_id)}
    assert "augment_p_rotate" in run.data.metrics and summary["timings"]["augmentation"] > 0


def test_a_teacher_proxy_needs_a_teacher_trained_here(tmp_path):
    from pipelines.config.errors import ConfigError
    from pipelines.config.loader import load_config

    assert load_config(overrides=["data.augment_policy=learned", "data.augment_search.proxy=teacher"])
    with pytest.raises(ConfigError, match="proxy=teacher trains teacher.model from scratch"):
        load_config(overrides=["data.augment_policy=learned", "data.augment_search.proxy=teacher",
                               "teacher.source=file", f"teacher.uri={tmp_path}"])
