"""Streaming data at real size: bounded memory and reader throughput (issue 14).

1. Generates a folder of ``--images`` synthetic 64x64 JPEGs in ``--classes`` class folders
   (coloured blobs plus noise, so there is something to learn), unless it is there already.
2. Runs ``metadistill run --set data.storage=stream`` on it as a subprocess (preparing the
   shards, then training) and samples the resident memory of its whole process tree (the
   CLI, the Prefect server it starts, the DataLoader workers) every 0.2 s: ``peak_rss_mb`` is
   the largest sum seen.  RSS counts a page shared by several processes once per process
   (each worker maps torch's ~0.5 GB again); ``peak_pss_mb`` shares such pages out, so it
   sums to the memory really used.  A second run (``workers_0_run``, shards cached) decodes
   in the training process, without worker processes.
3. Times three readers of the prepared training split, side by side in interleaved rounds
   (the median of ``--rounds``), with the same worker count, each yielding batches of ``--batch``:
   - ``images_per_s``: the pipeline's stream reader (its seeded random order, the loop's
     batch plan, the DataLoader over the shards' offsets, normalisation included);
   - ``reference_images_per_s``: WebDataset's own loader over the same tar shards, in order,
     with the pipeline's decoder (torchvision's), uint8 batches;
   - ``imagefolder_images_per_s``: a plain torchvision ImageFolder over the raw files,
     shuffled (its default PIL loader), uint8 batches.

    pip install -e '.[bench]'   # webdataset
    python -m benchmarks.data_stream --folder /tmp/jpegs --json docs/benchmarks/data_stream.json
    python -m benchmarks.data_stream --smoke --json PATH  # 64 images, a tiny pipeline, 3 batches per reader

Without webdataset (the ``bench`` extra) the reference reader is left out: its rate and
ratio are null, and the run says so.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks.common import parse_args, write_json


def _write_chunk(args: tuple[Path, int, int, int, int]) -> None:
    from PIL import Image

    folder, start, stop, classes, size = args
    rng = np.random.default_rng(start)
    palette = np.random.default_rng(1234).integers(30, 225, (classes, 3))
    yy, xx = np.mgrid[:size, :size]
    for i in range(start, stop):
        c = i % classes
        cy, cx = rng.integers(size // 4, 3 * size // 4, 2)
        blob = ((yy - cy) ** 2 + (xx - cx) ** 2 < (size // 5) ** 2)[..., None]
        pixels = np.where(blob, palette[c], 255 - palette[c]) + rng.normal(0, 25, (size, size, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"class{c:02d}" / f"{i:07d}.jpg",
                                                                        quality=85)


def generate(folder: Path, images: int, classes: int, size: int = 64) -> float:
    """The synthetic folder; returns the seconds it took (0 when it was there)."""
    marker = folder / f".complete-{images}-{classes}-{size}"
    if marker.is_file():
        return 0.0
    import multiprocessing

    start = time.perf_counter()
    for c in range(classes):
        (folder / f"class{c:02d}").mkdir(parents=True, exist_ok=True)
    chunks = [(folder, i, min(i + 5000, images), classes, size) for i in range(0, images, 5000)]
    with multiprocessing.Pool(os.cpu_count()) as pool:
        for done, _ in enumerate(pool.imap_unordered(_write_chunk, chunks), 1):
            print(f"\rgenerating: {min(done * 5000, images)}/{images}", end="", flush=True)
    print()
    marker.touch()
    return time.perf_counter() - start


def _tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def _memory_kb(pid: int, field: str, source: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/{source}").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_pipeline(folder: Path, home: Path, overrides: list[str]) -> dict:
    """``metadistill run`` streamed, its process tree's memory sampled as it goes."""
    env = {**os.environ, "METADISTILL_HOME": str(home), "METADISTILL_PROGRESS": "0",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    args = ["data.name=imagefolder", f"data.root={folder}", "data.image_size=64", "data.storage=stream", *overrides]
    summary = home / "summary.json"
    cmd = [sys.executable, "-m", "pipelines.cli", "run", *[x for a in args for x in ("--set", a)],
           "--summary", str(summary)]
    peak = {"rss": 0, "pss": 0, "processes": 0}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    log: list[str] = []
    reader = threading.Thread(target=lambda: log.extend(proc.stdout), daemon=True)
    reader.start()
    while proc.poll() is None:
        pids = _tree(proc.pid)
        rss = sum(_memory_kb(p, "VmRSS:", "status") for p in pids)
        if rss > peak["rss"]:
            peak = {"rss": rss, "pss": sum(_memory_kb(p, "Pss:", "smaps_rollup") for p in pids),
                    "processes": len(pids)}
        time.sleep(0.2)
    reader.join()
    if proc.returncode != 0:
        raise SystemExit(f"metadistill run failed ({proc.returncode}):\n{''.join(log)[-4000:]}")
    import json

    return {"seconds": time.perf_counter() - start, "peak_rss_mb": peak["rss"] / 1024,
            "peak_pss_mb": peak["pss"] / 1024, "processes_at_peak": peak["processes"],
            "summary": json.loads(summary.read_text()), "log_tail": "".join(log)[-1500:]}


def _rate(batches, limit: int) -> float:
    seen, start = 0, None
    for i, batch in enumerate(batches):
        if i == 2:  # workers started and warm
            start, seen = time.perf_counter(), 0
        seen += len(batch)
        if i >= limit:
            break
    return seen / (time.perf_counter() - start)


def pipeline_reader(images, batch: int, steps: int):
    import torch

    from pipelines.engine.batches import BatchPlan

    plan = BatchPlan(len(images), batch, torch.Generator().manual_seed(0), seeds=False)
    for _, x in images.stream(plan.ahead(steps, slice(None)), torch.device("cpu")):
        yield x


def webdataset_reader(images, batch: int, workers: int):
    import torch
    import webdataset as wds
    from torchvision.io import ImageReadMode, decode_image

    urls = [str(images.folder / name) for name in images.shards]
    decode = lambda data: decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8),  # noqa: E731
                                       mode=ImageReadMode.RGB)
    dataset = (wds.WebDataset(urls, shardshuffle=False, empty_check=False)
               .to_tuple("jpg", "cls").map_tuple(decode, int).batched(batch, partial=False))
    for x, _ in torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers):
        yield x


def imagefolder_reader(folder: Path, batch: int, workers: int):
    import torch
    from torchvision import datasets, transforms

    dataset = datasets.ImageFolder(str(folder), transform=transforms.PILToTensor())
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers,
                                         generator=torch.Generator().manual_seed(0))
    for x, _ in loader:
        yield x


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, default=Path("/tmp/metadistill-jpegs"))
    parser.add_argument("--images", type=int, default=200_000)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--home", type=Path, default=None, help="project home for the run (default: <folder>.home)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of every reader")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--read-batches", type=int, default=100, help="batches timed per reader and round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the three readers (median)")
    parser.add_argument("--set", action="append", default=[], dest="overrides",
                        help="more overrides for the run (repeatable)")
    parser.add_argument("--json", required=True)
    args = parse_args(parser, argv, SMOKE)

    generated = generate(args.folder, args.images, args.classes)
    home = args.home or args.folder.with_name(args.folder.name + ".home")
    run = run_pipeline(args.folder, home, [f"data.workers={args.workers}", *RUN_SETTINGS, *args.overrides])
    print(f"run: {run['seconds']:.0f} s, peak RSS {run['peak_rss_mb']:.0f} MB", flush=True)
    # Again with decoding in the training process (the shards are cached now): what the
    # DataLoader worker processes add to the summed RSS, each counting torch's shared pages.
    in_process = run_pipeline(args.folder, home, ["data.workers=0", *RUN_SETTINGS, *args.overrides])

    os.environ["METADISTILL_HOME"] = str(home)
    from pipelines.config.data import DataConfig
    from pipelines.data.prepare import prepare

    prepared = prepare(DataConfig(name="imagefolder", root=args.folder, image_size=64, storage="stream",
                                  workers=args.workers))
    train = prepared.x("train")
    steps = args.read_batches
    readers = {"images_per_s": lambda: pipeline_reader(train, args.batch, steps + 5),
               "reference_images_per_s": lambda: webdataset_reader(train, args.batch, args.workers),
               "imagefolder_images_per_s": lambda: imagefolder_reader(args.folder, args.batch, args.workers)}
    try:
        import webdataset  # noqa: F401
    except ImportError:
        print("webdataset is not installed (pip install -e '.[bench]'): no reference reader", flush=True)
        del readers["reference_images_per_s"]
    rounds = {name: [] for name in readers}
    for _ in range(args.rounds):  # interleaved, so drifts of the machine touch all three alike
        for name, reader in readers.items():
            rounds[name].append(_rate(reader(), steps))
    rates = {name: float(np.median(values)) for name, values in rounds.items()}
    rates.setdefault("reference_images_per_s", None)
    float32_gb = sum(prepared.counts[s] for s in ("train", "quiz", "val", "test", "transfer")) * 3 * 64 * 64 * 4 / 2**30
    write_json(args.json, {
        "images": args.images, "image_size": 64, "in_memory_float32_gb": round(float32_gb, 2),
        "shards": len(list(Path(train.folder).glob("*.tar"))),
        "shard_gb": round(sum(p.stat().st_size for p in Path(train.folder).glob("*.tar")) / 2**30, 3),
        "generate_seconds": round(generated, 1), "run_seconds": round(run["seconds"], 1),
        "peak_rss_mb": round(run["peak_rss_mb"]), "peak_pss_mb": round(run["peak_pss_mb"]),
        "processes_at_peak": run["processes_at_peak"], "run_settings": RUN_SETTINGS + args.overrides,
        "workers_0_run": {"seconds": round(in_process["seconds"], 1), "peak_rss_mb": round(in_process["peak_rss_mb"]),
                          "peak_pss_mb": round(in_process["peak_pss_mb"]),
                          "processes_at_peak": in_process["processes_at_peak"]},
        "test_acc": {m: round(v["test_acc"], 4) for m, v in run["summary"]["methods"].items()},
        "stage_seconds": {k: round(v, 1) for k, v in run["summary"]["timings"].items()},
        "teacher_test_acc": round(run["summary"]["teacher_test_acc"], 4),
        "workers": args.workers, "batch": args.batch,
        **{k: v if v is None else round(v) for k, v in rates.items()},
        "rounds": {k: [round(v) for v in vs] for k, vs in rounds.items()},
        "ratio_vs_reference": rates["reference_images_per_s"] and round(rates["images_per_s"]
                                                                        / rates["reference_images_per_s"], 3),
        "ratio_vs_imagefolder": round(rates["images_per_s"] / rates["imagefolder_images_per_s"], 3),
        "cpu_count": os.cpu_count()})
    return 0


# A short run with MLPs (a conv teacher at 64x64 takes an hour on 2 cores): the point is the
# data path's memory, and every split still streams through it.
RUN_SETTINGS = ["teacher.model.arch=mlp", "teacher.model.kwargs={hidden: [256]}", "teacher.train.steps=300",
                "teacher.train.batch_size=128",
                "student.train.steps=300", "student.train.batch_size=128", "student.seeds=[0]",
                "student.methods=[scratch, kd]", "tracking.experiment=data-stream"]
SMOKE = ["--folder", str(Path(tempfile.gettempdir()) / "metadistill-jpegs-smoke"), "--images", "64", "--classes", "2",
         "--workers", "1", "--batch", "8", "--read-batches", "3", "--rounds", "1", *[x for item in (
             "teacher.train.steps=5", "teacher.train.batch_size=8", "student.train.steps=4", "student.train.batch_size=8",
             "teacher.model.kwargs={hidden: [16]}") for x in ("--set", item)]]

if __name__ == "__main__":
    sys.exit(main())
