"""Which MAML recipe learns Omniglot 5-way 1-shot fastest per meta-step?  One config per
process (start several side by side on a GPU); the accuracy on 200 of the 600 fixed
evaluation tasks is logged every 500 steps, all 600 at the end (3 and 10 test steps).

    python -m benchmarks.fewshot_configs --name C --channels 32 --norm batch --queries 1 \
        --steps 5000 --device cuda --json results/fewshot_C.json
    python -m benchmarks.fewshot_configs --smoke --json PATH  # seconds: 2 steps, 50 characters, 4 test tasks

Step counts carry over between machines, so a GPU can rank recipes for the step budget
that 30 minutes buy on the 2-core CPU (see docs/fewshot.md).  Meta-training is exact
second-order MAML, one inner step (lr 0.4), Adam, rotations as extra classes.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from meta.functional import forward, params_of  # noqa: E402
from meta.maml import InnerLoop, adapt, meta_batch_loss  # noqa: E402
from meta.tasks import TaskSampler  # noqa: E402
from models import build_model  # noqa: E402

SMOKE = ["--name", "smoke", "--channels", "8", "--meta-batch", "2", "--steps", "2", "--characters", "50",
         "--eval-tasks", "4"]


def load(folder: Path, split: str, characters: int | None = None) -> torch.Tensor:
    """The npz form read as pipelines.omniglot reads it (strokes 1.0, area-resized to 28);
    the first ``characters`` characters (default: all)."""
    with np.load(folder / f"images_{split}.npz") as data:
        images = data["images"][:characters]
    strokes = torch.from_numpy((~images.reshape(-1, 105, 105).astype(bool)).astype(np.float32))[:, None]
    return F.interpolate(strokes, size=(28, 28), mode="area").reshape(images.shape[0], 20, 1, 28, 28)


def evaluate(model, tasks, steps: int, lr: float, device) -> tuple[float, float]:
    accs = []
    base = {k: v.detach().requires_grad_() for k, v in params_of(model).items()}
    for task in zip(*tasks):
        xs, ys, xq, yq = (t.to(device) for t in task)
        with torch.enable_grad():
            adapted = adapt(model, base, xs, ys, InnerLoop(steps, lr, first_order=True))
        with torch.no_grad():
            accs.append((forward(model, adapted, xq).argmax(-1) == yq).float().mean().item())
    t = torch.tensor(accs)
    return t.mean().item(), 1.96 * t.std().item() / math.sqrt(len(accs))


def main(argv: list[str] | None = None) -> int:
    from benchmarks.common import parse_args

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True)
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--norm", default="batch", choices=["batch", "group"])
    parser.add_argument("--queries", type=int, default=1, help="query examples per class in meta-training")
    parser.add_argument("--meta-batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--outer-lr", type=float, default=1e-3)
    parser.add_argument("--seconds", type=float, default=None, help="stop meta-training after this long")
    parser.add_argument("--device", type=torch.device, default=torch.device("cpu"))
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/omniglot_npz")
    parser.add_argument("--characters", type=int, default=None, help="read the first N characters of each split")
    parser.add_argument("--eval-tasks", type=int, default=600, help="fixed evaluation tasks (the log scores 200)")
    parser.add_argument("--json", required=True)
    args = parse_args(parser, argv, SMOKE)

    torch.manual_seed(0)
    background, evaluation = load(args.data, "background", args.characters), load(args.data, "evaluation",
                                                                                  args.characters)
    model = build_model("conv4", (1, 28, 28), 5, channels=args.channels, norm=args.norm).to(args.device)
    sampler = TaskSampler(background, 5, 1, args.queries, rotations=True)
    test = TaskSampler(evaluation, 5, 1, 15).fixed(args.eval_tasks, seed=1001)
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.outer_lr)
    inner, log, start = InnerLoop(1, 0.4), [], time.time()
    for step in range(1, args.steps + 1):
        tasks = tuple(t.to(args.device) for t in sampler.sample(args.meta_batch, generator))
        loss, acc = meta_batch_loss(model, params_of(model), tasks, inner, vectorize=True)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        out_of_time = args.seconds is not None and time.time() - start > args.seconds
        if step % 500 == 0 or step == args.steps or out_of_time:
            acc200, _ = evaluate(model, tuple(t[:200] for t in test), 3, 0.4, args.device)
            log.append({"step": step, "train_acc": acc.item(), "eval200_3steps": acc200, "t": time.time() - start})
            print(args.name, log[-1], flush=True)
        if out_of_time:
            break
    acc3, ci3 = evaluate(model, test, 3, 0.4, args.device)
    acc10, ci10 = evaluate(model, test, 10, 0.4, args.device)
    result = {k: v for k, v in vars(args).items() if k not in ("device", "data", "json", "smoke")} | {
        "device": str(args.device), "steps_done": step, "acc3": acc3, "ci3": ci3, "acc10": acc10, "ci10": ci10, "log": log,
        "seconds": time.time() - start}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
