"""The training loop: transfer examples, divergence, resuming."""

import pytest
import torch
import torch.nn.functional as F

from meta.distill import UNLABELED
from models.registry import build_model
from pipelines.config.training import TrainConfig
from pipelines.engine.batches import Transfer
from pipelines.engine.checkpoint import Checkpointer
from pipelines.engine.loop import train_classifier
from pipelines.engine.metrics import TrainingDiverged


def _data(n=96, transfer=50):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g),
            torch.randn(transfer, 1, 8, 8, generator=g))


def _model():
    torch.manual_seed(0)
    return build_model("mlp", (1, 8, 8), 10, hidden=[16])


def _spy(log):
    def loss(logits, x, y, index):
        log.append((x.clone(), y.clone(), index.clone()))
        labelled = y >= 0
        return F.cross_entropy(logits[labelled], y[labelled]) + 0.01 * logits[~labelled].pow(2).mean().nan_to_num()
    return loss


def test_transfer_examples_arrive_unlabeled_beside_the_same_labelled_batches():
    x, y, tx = _data()
    cfg = TrainConfig(steps=12, batch_size=16, log_every=4)
    plain, mixed = [], []
    train_classifier(_model(), x, y, cfg, _spy(plain), seed=5)
    train_classifier(_model(), x, y, cfg, _spy(mixed), seed=5, transfer=Transfer(tx, 8))
    for (px, py, pi), (mx, my, mi) in zip(plain, mixed):
        assert torch.equal(mx[:16], px) and torch.equal(my[:16], py) and torch.equal(mi[:16], pi)
        assert torch.equal(my[16:], torch.full((8,), UNLABELED))  # no label travels with a transfer example
        assert torch.equal(mx[16:], tx[mi[16:] - len(y)])  # the index names the transfer row
    assert len({int(i) for _, _, idx in mixed for i in idx[16:]}) == 50  # the whole transfer set is used


def test_a_nan_loss_fails_the_stage_naming_it_and_the_step():
    x, y, _ = _data()

    def poisoned(logits, x, y, index, calls=[0]):  # noqa: B006 - a counter shared across calls
        calls[0] += 1
        return F.cross_entropy(logits, y) * (float("nan") if calls[0] == 3 else 1.0)

    with pytest.raises(TrainingDiverged, match=r"student kd seed 4: the training loss is nan at step 3"):
        train_classifier(_model(), x, y, TrainConfig(steps=10, batch_size=16), poisoned, seed=0,
                         desc="student kd seed 4")


def test_resume_with_transfer_repeats_the_uninterrupted_run(tmp_path):
    x, y, tx = _data()
    cfg = TrainConfig(steps=20, batch_size=16, log_every=5)
    whole = _model()
    train_classifier(whole, x, y, cfg, _spy([]), seed=2, transfer=Transfer(tx, 8))

    def dies_at_13(logits, x, y, index, calls=[0]):  # noqa: B006 - a counter shared across calls
        calls[0] += 1
        if calls[0] == 13:
            raise RuntimeError("killed")
        return _spy([])(logits, x, y, index)

    checkpoint = Checkpointer(tmp_path, every=10)
    with pytest.raises(RuntimeError, match="killed"):
        train_classifier(_model(), x, y, cfg, dies_at_13, seed=2, transfer=Transfer(tx, 8), checkpoint=checkpoint)
    resumed = _model()
    train_classifier(resumed, x, y, cfg, _spy([]), seed=2, transfer=Transfer(tx, 8), checkpoint=checkpoint)
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_gradient_clipping_bounds_the_step():
    x, y, _ = _data()

    def huge(logits, x, y, index):
        return 1e6 * F.cross_entropy(logits, y)

    model, before = _model(), None
    before = [p.detach().clone() for p in model.parameters()]
    cfg = TrainConfig(steps=1, batch_size=16, grad_clip=1.0,
                      optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.0, "weight_decay": 0.0,
                                 "schedule": "constant"})
    train_classifier(model, x, y, cfg, huge, seed=0)
    moved = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)]).norm()
    assert moved == pytest.approx(0.1, rel=1e-4)  # lr x the clipped norm of 1


def test_bf16_autocast_covers_forward_and_loss_only_so_clipped_training_learns(monkeypatch):
    """CPU stand-in for CUDA's bf16 autocast: with clipping on, the model must learn as in
    float32 (under autocast the clip norm overflowed and zeroed every step)."""
    import contextlib

    from pipelines.engine import loop as training

    monkeypatch.setattr(training, "autocast", lambda device, mode: torch.autocast("cpu", dtype=torch.bfloat16)
                        if mode == "bf16" else contextlib.nullcontext())
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g) * 2
    y = torch.randint(0, 4, (512,), generator=g)
    x = centres[y] + torch.randn(512, 16, generator=g)
    losses = {}
    for mode in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
        cfg = TrainConfig(steps=100, batch_size=64, log_every=100, grad_clip=1.0, precision=mode)
        losses[mode] = train_classifier(model, x, y, cfg, training.supervised_loss, seed=0).curve["train_loss"][-1][1]
    assert losses["fp32"] < 0.5 and abs(losses["bf16"] - losses["fp32"]) < 0.1, losses
