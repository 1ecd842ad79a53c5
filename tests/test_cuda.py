"""The CUDA path: second-order gradients in float64 and under bf16, device-placed data and
training, device-independent checkpoints, augmentation equal across devices, serving.

Marked ``cuda``: they skip (with the reason) on a machine without a GPU, and run in
``benchmarks/gpu_check.sh``.  What the CPU can check about the same code runs elsewhere."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from meta.functional import params_of
from meta.maml import InnerLoop, meta_batch_loss
from meta.metadistill import Pilot
from tests.helpers import worst_relative_error
from tests.test_metadistill import pilot_quiz_loss, teacher_meta_grad

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on a GPU "
                                                                       "machine: benchmarks/gpu_check.sh)")]
CUDA = torch.device("cuda")


def _mlp(sizes, seed, dtype=torch.float64):
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1]).to(CUDA, dtype)


@pytest.mark.parametrize("steps", [1, 3])
def test_second_order_maml_matches_finite_differences_on_cuda(steps):
    from tests.test_meta_maml import make_tasks

    model = _mlp([4, 5, 3], 0)
    tasks = tuple(t.to(CUDA) for t in make_tasks())
    inner = InnerLoop(steps=steps, lr=0.3)
    params = {k: v.detach().clone().requires_grad_() for k, v in params_of(model).items()}
    for vectorize in (False, True):
        loss, _ = meta_batch_loss(model, params, tasks, inner, vectorize=vectorize)
        analytic = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))

        def loss_at(p, vectorize=vectorize):
            q = {k: v.clone().requires_grad_() for k, v in p.items()}
            return meta_batch_loss(model, q, tasks, inner, vectorize=vectorize)[0].item()

        assert worst_relative_error(analytic, {k: v.detach() for k, v in params.items()}, loss_at) < 1e-4


def test_second_order_teacher_gradient_under_bf16_tracks_float32():
    """The pilot's meta-gradient under bf16 autocast points where float32's does."""
    from pipelines.engine.device import autocast, precision

    student, teacher = _mlp([32, 64, 10], 0, torch.float32), _mlp([32, 128, 10], 1, torch.float32)
    g = torch.Generator().manual_seed(2)
    batch = (torch.randn(256, 32, generator=g).to(CUDA), torch.randint(0, 10, (256,), generator=g).to(CUDA))
    quiz = (torch.randn(256, 32, generator=g).to(CUDA), torch.randint(0, 10, (256,), generator=g).to(CUDA))
    pilot = Pilot(steps=1, lr=0.5, temperature=4.0, alpha=0.5)

    def grads(mode):
        t_params = {k: v.detach().clone().requires_grad_() for k, v in params_of(teacher).items()}
        with precision(CUDA, mode), autocast(CUDA, mode):
            out, loss = teacher_meta_grad(student, params_of(student), teacher, t_params, batch, quiz, pilot)
        return torch.cat([v.float().flatten() for v in out.values()]), loss

    full, loss32 = grads("fp32")
    half, loss16 = grads("bf16")
    cosine = torch.nn.functional.cosine_similarity(full, half, dim=0).item()
    assert cosine > 0.99, cosine
    assert abs(loss16 - loss32) / loss32 < 0.02
    assert ((half - full).norm() / full.norm()).item() < 0.15


def test_pilot_quiz_loss_finite_differences_on_cuda():
    from tests.test_metadistill import batches, nets

    student, teacher = (m.to(CUDA) for m in nets())
    batch, quiz = (tuple(t.to(CUDA) for t in b) for b in batches())
    pilot = Pilot(steps=2, lr=0.5, temperature=2.0, alpha=0.7)
    t_params = {k: v.detach().clone().requires_grad_() for k, v in params_of(teacher).items()}
    analytic, _ = teacher_meta_grad(student, params_of(student), teacher, t_params, batch, quiz, pilot)

    def loss_at(p):
        return pilot_quiz_loss(student, params_of(student), teacher, p, batch, quiz, pilot).item()

    assert worst_relative_error(analytic, {k: v.detach() for k, v in t_params.items()}, loss_at) < 1e-4


def test_fixed_augmentation_is_the_same_numbers_on_cuda_and_cpu():
    from pipelines.augment.policies import FixedOps
    from pipelines.config.data import AugmentConfig

    ops = FixedOps([AugmentConfig(name="random_crop", padding=4), AugmentConfig(name="horizontal_flip"),
                    AugmentConfig(name="color_jitter")], [0.5, 0.4, 0.3], [0.25, 0.2, 0.2])
    x, seeds = torch.randn(64, 3, 32, 32), torch.arange(64) * 7919 + 3
    assert torch.allclose(ops(x, seeds), ops(x.to(CUDA), seeds).cpu(), atol=1e-5)


def _digits(device):
    from pipelines import data as data_stage
    from pipelines.config.loader import load_config

    cfg = load_config(overrides=["teacher.model.arch=mlp", "teacher.model.kwargs={hidden: [64]}",
                                 "teacher.train.steps=200", "teacher.train.precision=bf16"])
    return cfg, data_stage.place(data_stage.prepare(cfg.data), device)


@pytest.mark.parametrize("share", [0.5, 0.0])  # 0.0: the data stays in pinned host memory
def test_teacher_trains_on_cuda_from_device_or_pinned_data(home, share):
    from pipelines import data as data_stage
    from pipelines.evaluate.metrics import evaluate
    from pipelines.teacher.context import TeacherContext
    from pipelines.teacher.fit import obtain_teacher

    cfg, _ = _digits(torch.device("cpu"))
    data = data_stage.place(data_stage.prepare(cfg.data), CUDA, share=share)
    assert data.x("train").is_cuda == (share > 0) and (share > 0 or data.x("train").is_pinned())
    outcome = obtain_teacher(TeacherContext.from_config(cfg, data))
    assert next(outcome.model.parameters()).is_cuda
    assert evaluate(outcome.model, data.x("test"), data.y("test"), 10).accuracy > 0.85


def test_checkpoint_written_on_cuda_resumes_on_the_cpu(tmp_path):
    from pipelines.config.training import OptimConfig, TrainConfig
    from pipelines.engine.checkpoint import Checkpointer
    from pipelines.engine.loop import supervised_loss, train_classifier

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(256, 8, generator=g), torch.randint(0, 3, (256,), generator=g)
    cfg = TrainConfig(steps=20, batch_size=32, log_every=5, optimizer=OptimConfig(schedule="constant"))
    on_gpu = _mlp([8, 16, 3], 0, torch.float32)
    train_classifier(on_gpu, x.to(CUDA), y.to(CUDA), cfg.model_copy(update={"steps": 10}), supervised_loss, seed=0,
                     checkpoint=Checkpointer(tmp_path, 10))
    state = torch.load(tmp_path / "train.pt", weights_only=True)
    assert all(not v.is_cuda for v in state["model"].values())
    on_cpu = _mlp([8, 16, 3], 5, torch.float32).cpu()  # other weights: the checkpoint must replace them
    resumed = train_classifier(on_cpu, x, y, cfg, supervised_loss, seed=0, checkpoint=Checkpointer(tmp_path, 10))
    assert [s for s, _ in resumed.curve["train_loss"]] == [5, 10, 15, 20]  # 11-20 ran here, on the CPU
    straight = _mlp([8, 16, 3], 0, torch.float32).cpu()
    train_classifier(straight, x, y, cfg, supervised_loss, seed=0)
    for a, b in zip(on_cpu.parameters(), straight.parameters()):
        assert torch.allclose(a, b, atol=1e-4)


def test_serving_forward_on_cuda_matches_the_cpu():
    import numpy as np

    from models.forward import forward  # what deploy/serve.py runs for each micro-batch

    model = _mlp([12, 16, 4], 0, torch.float32)
    x = np.random.default_rng(0).random((5, 12), dtype=np.float32)
    assert np.allclose(forward(model, x), forward(model.cpu(), x), atol=1e-5)
