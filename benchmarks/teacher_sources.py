"""Students of a teacher trained here against students of a pretrained network brought in
and fine-tuned (``teacher.source=torchvision`` + ``teacher.finetune``), on one split, in
one run: every teacher's test accuracy and compute seconds, and per teacher the same
student methods over paired seeds.

    python -m benchmarks.teacher_sources [--preset cifar10] [--set k=v ...] [--seeds 10] \
        [--methods kd] [--pretrain-steps 1500] [--finetune-steps 1500] [--no-scratch] --json PATH
    python -m benchmarks.teacher_sources --smoke --json PATH  # seconds: digits with a transfer split, 2 steps each

No ImageNet weights reach this machine, so the "pretrained" resnet18 is made here without a
single label: rotation prediction (RotNet: which of 0/90/180/270 degrees was the image
turned by) on the unlabeled transfer split, saved as safetensors and brought in through
``teacher.weights`` like any downloaded file.  Three teachers:

- ``trained``: the preset's teacher, trained on the labelled split (``teacher.source=train``);
- ``resnet18_random``: torchvision resnet18 from a random initialisation, fine-tuned with
  the same budget (separates the architecture from the pretraining);
- ``resnet18_rotation``: the rotation-pretrained resnet18, fine-tuned with that budget.

Paired differences (``kd`` of each brought teacher minus ``kd`` of the trained one) come with
a 95% t-interval and p-values.  Run it in a fresh ``METADISTILL_HOME``: a cached teacher
reports its loading time, not its training time (``cached`` in the JSON says which).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

# --smoke: digits (a transfer split for the pretraining), every stage a few steps, 2 seeds.
SMOKE = ["--preset", "digits", "--seeds", "2", "--pretrain-steps", "2", "--finetune-steps", "2", "--image-size", "8",
         *[x for item in (
    "data.train_fraction=0.3", "data.label_budget=100", "teacher.train.steps=5", "teacher.train.batch_size=16",
    "student.train.steps=4")
    for x in ("--set", item)]]


def rotation_pretrain(x, data_mean, data_std, steps: int, out: Path, seed: int = 0) -> float:
    """torchvision resnet18 trained to tell the rotation of unlabeled images; its weights
    (1000-class ImageNet-shaped head kept, as a downloaded file would have) go to ``out``."""
    import torch
    import torchvision
    from safetensors.torch import save_file

    from models.external import IMAGENET_MEAN, IMAGENET_STD
    from pipelines.common.progress import progress_bar

    torch.manual_seed(seed)
    net = torchvision.models.resnet18(num_classes=1000)
    head = torch.nn.Linear(net.fc.in_features, 4)
    body_fc, net.fc = net.fc, head
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    dm, ds = (torch.tensor(v).view(1, -1, 1, 1) for v in (data_mean, data_std))
    im, istd = (torch.tensor(v).view(1, -1, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    net.train()
    with progress_bar("rotation pretraining", total=steps) as advance:
        for _ in range(steps):
            idx = torch.randint(0, len(x), (32,), generator=gen)
            images = ((x[idx] * ds + dm) - im) / istd  # the ImageNet normalisation the file will declare
            flips = torch.rand(len(idx), generator=gen) < 0.5
            images = torch.where(flips.view(-1, 1, 1, 1), images.flip(-1), images)
            batch = torch.cat([torch.rot90(images, k, (2, 3)) for k in range(4)])
            labels = torch.arange(4).repeat_interleave(len(idx))
            loss = torch.nn.functional.cross_entropy(net(batch), labels)
            if not torch.isfinite(loss):
                raise RuntimeError("rotation pretraining diverged")
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            advance()
    net.fc = body_fc  # a 1000-class head like ImageNet weights; teacher.finetune replaces it
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out))
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    import torch
    import torchvision
    from safetensors.torch import save_file

    from benchmarks.common import paired_stats, parse_args, write_json
    from pipelines import data as data_stage
    from pipelines.common.home import cache_dir
    from pipelines.config.errors import ConfigError
    from pipelines.config.loader import load_config
    from pipelines.evaluate.metrics import evaluate
    from pipelines.students.fit import run_student
    from pipelines.teacher import sources
    from pipelines.teacher.context import TeacherContext
    from pipelines.teacher.fit import obtain_teacher, teacher_spec

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cifar10")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--methods", default="kd")
    parser.add_argument("--pretrain-steps", type=int, default=1500)
    parser.add_argument("--finetune-steps", type=int, default=1500)
    parser.add_argument("--image-size", type=int, default=32, help="the resolution the brought resnet18 sees")
    parser.add_argument("--no-scratch", dest="scratch", action="store_false",
                        help="skip the scratch reference (students without a teacher)")
    parser.add_argument("--json", required=True)
    args = parse_args(parser, argv, SMOKE)
    methods = args.methods.split(",")
    common = [*args.overrides, f"student.methods={json.dumps(methods)}", f"student.seeds={list(range(args.seeds))}"]
    start = time.perf_counter()
    try:
        trained_cfg = load_config(args.preset, overrides=common)
    except ConfigError as exc:
        print(f"teacher_sources: {exc}", file=sys.stderr)
        return 2
    prepared = data_stage.prepare(trained_cfg.data)
    weights = cache_dir("bench") / f"resnet18_rotation_{prepared.key}_{args.pretrain_steps}.safetensors"
    pretrain_seconds = rotation_pretrain(prepared.transfer(), prepared.mean, prepared.std, args.pretrain_steps, weights)
    random = cache_dir("bench") / "resnet18_random.safetensors"
    torch.manual_seed(0)
    save_file(torchvision.models.resnet18(num_classes=1000).state_dict(), str(random))
    brought = ["teacher.source=torchvision", "teacher.model.arch=resnet18", f"teacher.image_size={args.image_size}",
               "teacher.finetune.mode=all", f"teacher.finetune.steps={args.finetune_steps}",
               f"teacher.finetune.optimizer.lr={trained_cfg.teacher.train.optimizer.lr}",
               f"teacher.finetune.batch_size={trained_cfg.teacher.train.batch_size}"]
    configs = {"trained": trained_cfg,
               "resnet18_random": load_config(args.preset, overrides=[*common, *brought, f"teacher.weights={random}"]),
               "resnet18_rotation": load_config(args.preset, overrides=[*common, *brought, f"teacher.weights={weights}"])}
    result = {"dataset": trained_cfg.data.name, "preset": args.preset, "overrides": args.overrides,
              "splits": prepared.counts, "units": "accuracies as fractions; seconds of compute on this machine",
              "pretrain": {"method": "rotation prediction on the unlabeled transfer split", "steps": args.pretrain_steps,
                           "seconds": pretrain_seconds},
              "teachers": {}, "students": {}}
    accs: dict[str, dict[str, np.ndarray]] = {}
    for name, cfg in configs.items():
        sources.preflight(cfg)
        ctx = TeacherContext.from_config(cfg, prepared)
        teacher = obtain_teacher(ctx)
        acc = evaluate(teacher.model, prepared.x("test"), prepared.y("test"), prepared.num_classes).accuracy
        spec = teacher_spec(ctx)
        result["teachers"][name] = {"test_acc": acc, "seconds": teacher.seconds, "cached": teacher.cached,
                                    "arch": spec["arch"], "source": cfg.teacher.source,
                                    "steps": cfg.teacher.finetune.steps if cfg.teacher.brought() else cfg.teacher.train.steps}
        print(f"teacher {name} ({spec['arch']}): {100 * acc:.2f} in {teacher.seconds:.0f} s", flush=True)
        accs[name] = {}
        for method in methods:
            outcomes = [run_student(method, cfg, prepared, teacher.model, seed) for seed in cfg.student.seeds]
            accs[name][method] = np.array([o.evaluation.accuracy for o in outcomes])
            a = accs[name][method]
            result["students"].setdefault(name, {})[method] = {
                "mean": float(a.mean()), "std": float(a.std(ddof=1)), "per_seed": a.tolist(),
                "compute_seconds": float(np.mean([o.result.seconds for o in outcomes]))}
            print(f"  {method}: {100 * a.mean():.2f} ± {100 * a.std(ddof=1):.2f}", flush=True)
    if args.scratch:  # the no-teacher reference, once (it does not depend on the teacher)
        outcomes = [run_student("scratch", trained_cfg, prepared, teacher.model, seed)
                    for seed in trained_cfg.student.seeds]
        a = np.array([o.evaluation.accuracy for o in outcomes])
        result["scratch"] = {"mean": float(a.mean()), "std": float(a.std(ddof=1)), "per_seed": a.tolist()}
        print(f"scratch: {100 * a.mean():.2f} ± {100 * a.std(ddof=1):.2f}", flush=True)
    result["vs_trained"] = {name: {m: paired_stats(accs[name][m] - accs["trained"][m]) for m in methods}
                            for name in configs if name != "trained"}
    result["wall_seconds"] = time.perf_counter() - start
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
