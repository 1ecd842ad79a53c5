"""The named presets: each a partial config tree merged over the defaults."""

from __future__ import annotations

from typing import Any


def _cnn_teacher(arch: str, steps: int, lr: float = 0.05) -> dict:
    return {"model": {"arch": arch}, "train": {"steps": steps, "batch_size": 64,
                                               "optimizer": {"name": "sgd", "lr": lr}}}


_SMALL_SHIFTS = [{"name": "random_affine", "degrees": 10, "translate": 0.1}]


PRESETS: dict[str, dict[str, Any]] = {
    "digits": {
        # The teacher (resnet8, augmented: ~99% test accuracy) is far stronger than the
        # 64-16-10 MLP student (~95-96% alone); augmentation is for the teacher only.
        "data": {"name": "digits", "augment": _SMALL_SHIFTS},
        "teacher": _cnn_teacher("resnet8", 4000),
        "student": {"model": {"arch": "mlp", "kwargs": {"hidden": [16]}},
                    "train": {"steps": 1500, "batch_size": 64, "augment": False},
                    "seeds": [0, 1, 2]},
    },
    "mnist": {
        # 1,000 labels; the other 59,000 training images are the unlabeled transfer split.
        # A fifth of the labels is the quiz split: with the validation tenth, 300 held-out
        # images steer kd_tuned's choice and meta_distill's teacher (at least 256 per look).
        "data": {"name": "mnist", "quiz_fraction": 0.2, "label_budget": 1000},
        "teacher": _cnn_teacher("resnet8", 2000),
        "student": {"model": {"arch": "mlp", "kwargs": {"hidden": [32]}}, "train": {"steps": 1500}},
    },
    "hinton2015": {
        # Hinton, Vinyals and Dean 2015, section 3: all of MNIST's labels (a 1% quiz and a 5%
        # validation split held out), a 784-1200-1200-10 teacher under dropout (a fifth of the
        # pixels, half of the hidden units) on images jittered by up to two pixels, and
        # 784-800-800-10 students with no regulariser at all (no weight decay, no augmentation)
        # but, for kd, the teacher's soft targets at temperature 20.  benchmarks/hinton2015.py
        # says where the recipe differs from the paper's (no max-norm constraint; a cosine
        # schedule of a few dozen epochs instead of thousands).
        "data": {"name": "mnist", "quiz_fraction": 0.01, "val_fraction": 0.05,
                 "augment": [{"name": "random_crop", "padding": 2}]},
        "teacher": {"model": {"arch": "mlp", "kwargs": {"hidden": [1200, 1200], "dropout": 0.5,
                                                        "input_dropout": 0.2}},
                    "train": {"steps": 20000, "batch_size": 128,
                              "optimizer": {"name": "sgd", "lr": 0.05, "weight_decay": 1e-5}},
                    "improve": {"method": "none"}},
        "student": {"model": {"arch": "mlp", "kwargs": {"hidden": [800, 800]}},
                    "train": {"steps": 8000, "batch_size": 128, "augment": False,
                              "optimizer": {"name": "sgd", "lr": 0.05, "weight_decay": 0.0}},
                    "methods": ["scratch", "kd"], "seeds": [0, 1, 2]},
        "kd": {"temperature": 20.0, "alpha": 0.9},
    },
    "fashion-mnist": {
        # Without augmentation the resnet8 teacher (79.6%) fell below the MLP student from
        # scratch (79.9%): it had nothing to teach.  Crops and flips lift it to ~82%;
        # RandAugment to 84.5%, and every KD student by 1.1-1.8 points (10 paired seeds,
        # docs/benchmarks/distillation.md).  The students do not augment.
        "data": {"name": "fashion-mnist", "quiz_fraction": 0.2, "label_budget": 1000,
                 "augment": [{"name": "random_crop", "padding": 2}, {"name": "horizontal_flip"}],
                 "augment_policy": "randaugment"},
        "teacher": _cnn_teacher("resnet8", 3000),
        "student": {"model": {"arch": "mlp", "kwargs": {"hidden": [64]}},
                    "train": {"steps": 2000, "augment": False}},
    },
    "cifar10": {
        # The 50,000-image train zip with 2,000 labels (the rest is transfer data), reported
        # on the 10,000 test images.  The teacher trains on augmented crops and flips; the
        # students do not augment (the 48,000 transfer images are their regulariser), which
        # lets the teacher's outputs be computed once instead of every step.
        "data": {"name": "cifar10", "quiz_fraction": 0.2, "label_budget": 2000,
                 "augment": [{"name": "random_crop", "padding": 4}, {"name": "horizontal_flip"}]},
        "teacher": _cnn_teacher("resnet20", 4000, lr=0.1),
        "student": {"model": {"arch": "resnet8", "kwargs": {"base_width": 8}},
                    "train": {"steps": 2000, "augment": False}},
    },
    "cifar100": {
        "data": {"name": "cifar100", "augment": [{"name": "random_crop", "padding": 4},
                                                 {"name": "horizontal_flip"}]},
        "teacher": _cnn_teacher("resnet56", 60000, lr=0.1),
        "student": {"model": {"arch": "resnet20"}, "train": {"steps": 60000}},
    },
    "imagefolder": {
        # Your own RGB images (32x32 unless data.image_size says otherwise), chosen when
        # data.name=imagefolder and no preset is named: a convolutional student (resnet8 at
        # width 8, ~20k parameters) under a resnet8 teacher (~78k) trained on crops and flips.
        # maml_init is left out of its methods: second-order MAML through a convolutional
        # student took 491 s of a 9-minute run on 2 cores (add it with student.methods).
        # No tracking.experiment here: the experiment name follows the data.
        "data": {"name": "imagefolder", "augment": [{"name": "random_crop", "padding": 4},
                                                    {"name": "horizontal_flip"}]},
        "teacher": _cnn_teacher("resnet8", 2000),
        "student": {"model": {"arch": "resnet8", "kwargs": {"base_width": 8}},
                    "train": {"steps": 1500, "augment": False}, "methods": ["scratch", "kd", "meta_distill"]},
    },
    "omniglot": {
        "data": {"name": "omniglot"},
        "teacher": _cnn_teacher("conv4", 3000),
        "student": {"model": {"arch": "conv4", "kwargs": {"channels": 32}}, "train": {"steps": 3000}},
    },
}
