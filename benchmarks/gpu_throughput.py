"""Images/s of the pipeline's training loop against a minimal hand-written PyTorch loop,
side by side in one run: resnet20 on 32x32x3 inputs, batch 512, the same precision,
memory layout and compile setting for both.

    python -m benchmarks.gpu_throughput --json PATH [--device cuda] [--steps 300] [--compile]
        [--settings fp32,tf32,bf16,bf16+cl,bf16+cl+compile]
    python -m benchmarks.gpu_throughput --smoke --json PATH  # seconds, on the CPU too: 2 steps of batch 8

On a machine without CUDA it runs on the CPU (``--device cpu``); the FLOP fractions are then null.

The pipeline side is ``pipelines.training.train_classifier`` as every stage calls it
(seeded batch order, per-step lr, metrics accumulated on the device, read at log steps);
the reference indexes a device-resident tensor with ``randint`` and steps.  Both train
50,000 random images already on the device (data loading is not measured), with no
augmentation and no gradient clipping.  The FLOPs of one training step are counted with
``torch.utils.flop_counter``; the fraction of the card's dense bf16 peak uses the
datasheet peak (H100/H200 SXM: 989.4 TFLOP/s) and the measured 8192^3 matmul rate.

``--settings`` also times the pipeline's loop alone under each listed setting (precision,
``+cl`` channels-last, ``+compile``), the measurements behind the defaults of
``train.precision``, ``train.channels_last`` and ``train.compile``.

Target: ratio = pipeline / reference >= 0.9 (the pipeline costs under 10%).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

DATASHEET_BF16_DENSE = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}
CLASSES = 10
SMOKE = ["--steps", "2", "--warmup", "1", "--rounds", "1", "--batch", "8", "--images", "64", "--precision", "fp32",
         "--settings", "bf16+cl"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _model(device: torch.device, channels_last: bool):
    from models.registry import build_model

    torch.manual_seed(0)
    model = build_model("resnet20", (3, 32, 32), CLASSES).to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def _data(device: torch.device, images: int):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(images, 3, 32, 32, generator=g)
    return x.to(device), torch.randint(0, CLASSES, (images,), generator=g).to(device)


def _cfg(args, steps: int):
    from pipelines.config.training import OptimConfig, TrainConfig

    return TrainConfig(steps=steps, batch_size=args.batch, log_every=max(steps, 1), augment=False, grad_clip=None,
                       precision=args.precision, compile=args.compile, channels_last=args.channels_last,
                       optimizer=OptimConfig(name="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4))


def pipeline_seconds(args, x, y, steps: int) -> float:
    """Wall seconds of ``steps`` steps of the pipeline's loop (after a warm-up run)."""
    from pipelines.engine.loop import supervised_loss, train_classifier

    model = _model(args.device, args.channels_last)
    train_classifier(model, x, y, _cfg(args, args.warmup), supervised_loss, seed=0, device=args.device)
    model = _model(args.device, args.channels_last)
    _sync(args.device)
    result = train_classifier(model, x, y, _cfg(args, steps), supervised_loss, seed=1, device=args.device)
    return result.seconds


def reference_seconds(args, x, y, steps: int) -> float:
    """The same work in the plainest loop: randint batch, autocast forward, backward, step."""
    from pipelines.engine.device import autocast, precision

    model = _model(args.device, args.channels_last)
    net = torch.compile(model) if args.compile else model
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
    g = torch.Generator(device=args.device).manual_seed(0)
    with precision(args.device, args.precision):
        for warm in (True, False):
            _sync(args.device)
            start = time.perf_counter()
            for _ in range(args.warmup if warm else steps):
                idx = torch.randint(0, len(y), (args.batch,), device=args.device, generator=g)
                xb = x[idx]
                if args.channels_last:
                    xb = xb.contiguous(memory_format=torch.channels_last)
                with autocast(args.device, args.precision):
                    loss = F.cross_entropy(net(xb), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            _sync(args.device)
    return time.perf_counter() - start


def step_flops(args, x, y) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    model = _model(args.device, args.channels_last)
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x[:args.batch]), y[:args.batch]).backward()
    return float(counter.get_total_flops())


def matmul_tflops(device: torch.device, n: int = 8192, reps: int = 10) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    from benchmarks.common import parse_args, write_json

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", required=True)
    parser.add_argument("--device", type=torch.device, default=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    parser.add_argument("--steps", type=int, default=300, help="timed steps per contender and round")
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best of each counts")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--precision", default="bf16", choices=["fp32", "tf32", "bf16"])
    parser.add_argument("--compile", action="store_true", help="torch.compile both loops' networks")
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    parser.add_argument("--settings", default="", help="comma-separated extra settings for the pipeline alone, "
                                                       "e.g. fp32,tf32,bf16,bf16+cl,bf16+cl+compile")
    parser.add_argument("--images", type=int, default=50_000, help="random images on the device")
    args = parse_args(parser, argv, SMOKE)
    x, y = _data(args.device, args.images)
    pipe, ref = [], []
    for _ in range(args.rounds):
        pipe.append(args.steps * args.batch / pipeline_seconds(args, x, y, args.steps))
        ref.append(args.steps * args.batch / reference_seconds(args, x, y, args.steps))
    flops = step_flops(args, x, y)
    name = torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else "cpu"
    peak = next((v for k, v in DATASHEET_BF16_DENSE.items() if k in name), None)
    measured = matmul_tflops(args.device) if args.device.type == "cuda" else None
    best = max(pipe)
    achieved = best * flops / args.batch
    result = {
        "device": name, "torch": torch.__version__, "model": "resnet20", "input": [3, 32, 32], "batch": args.batch,
        "precision": args.precision, "compile": args.compile, "channels_last": args.channels_last,
        "steps": args.steps, "rounds": args.rounds,
        "pipeline_images_per_s": best, "reference_images_per_s": max(ref), "ratio": best / max(ref),
        "rounds_pipeline_images_per_s": pipe, "rounds_reference_images_per_s": ref,
        "train_flops_per_image": flops / args.batch, "achieved_tflops": achieved / 1e12,
        "bf16_peak_fraction": achieved / peak if peak else None, "bf16_datasheet_peak_tflops": peak and peak / 1e12,
        "bf16_matmul_measured_tflops": measured and measured / 1e12,
        "bf16_matmul_fraction": achieved / measured if measured else None, "target_ratio_min": 0.9,
        "pipeline_images_per_s_by_setting": {}}
    write_json(args.json, result)  # the comparison first: the settings below may take minutes (compile)
    for setting in filter(None, args.settings.split(",")):
        variant = copy.copy(args)
        variant.precision, *flags = setting.split("+")
        variant.channels_last, variant.compile = "cl" in flags, "compile" in flags
        start = time.perf_counter()
        images_per_s = args.steps * args.batch / pipeline_seconds(variant, x, y, args.steps)
        result["pipeline_images_per_s_by_setting"][setting] = images_per_s
        print(f"{setting}: {images_per_s:.0f} images/s ({time.perf_counter() - start:.0f} s with warm-up)", flush=True)
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
