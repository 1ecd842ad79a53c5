"""Meta-training throughput of this engine against the libraries MAML code uses, on one
workload, in one run, plus the machine's fp32 matmul peak and the engine's FLOP rate.

    python -m benchmarks.meta_engine --json results/meta_engine.json
    python -m benchmarks.meta_engine --smoke --json PATH  # seconds: every contender, a tiny workload

Workload (defaults): conv4 (GroupNorm) on 1x28x28, 5-way 1-shot, 15 queries, 5 inner SGD
steps (lr 0.4), exact second-order MAML, meta-batch 32.  Every contender runs the same
``nn.Module`` on the same task batches; each is timed over whole meta-steps (forward,
meta-gradient, Adam step) after one warm-up step.

Contenders: ``engine_*`` (meta.maml + meta.parallel: task-parallel threads, inside each
vmap, a loop, or vmap over the inner loops with the query sets in a loop), ``higher``
(innerloop_ctx), ``torchopt`` (MetaSGD, as in its MAML example), ``func_loop`` and
``func_vmap`` (PyTorch's functorch MAML Omniglot example: torch.func.grad per task in a
Python loop, or vmapped over tasks).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

from meta.functional import params_of  # noqa: E402
from meta.maml import InnerLoop, meta_batch_loss  # noqa: E402
from meta.parallel import TaskParallel  # noqa: E402
from meta.tasks import TaskSampler  # noqa: E402
from models import build_model  # noqa: E402

# --smoke: the engine (tasks vmapped) and a peer (a loop of torch.func.grad), on a tiny workload.
SMOKE = ["--channels", "8", "--meta-batch", "2", "--queries", "2", "--inner-steps", "1", "--seconds", "0.1",
         "--rounds", "1", "--peak-seconds", "0.1", "--only", "engine_vmap,func_loop"]


def make_workload(args):
    torch.manual_seed(0)
    model = build_model("conv4", (1, 28, 28), args.ways, channels=args.channels, norm=args.norm).to(args.device)
    sampler = TaskSampler(torch.rand(200, 20, 1, 28, 28), args.ways, args.shots, args.queries)
    return model, sampler


# ---------------------------------------------------------------- contenders

def engine_step(vectorize: bool, workers: int, vmap_query: bool = True):
    def build(model, args):
        runner = TaskParallel(model, workers)
        inner = InnerLoop(args.inner_steps, args.inner_lr)
        wrt = list(model.parameters())

        def chunk_loss(m, p, c):
            return meta_batch_loss(m, p, c, inner, vectorize=vectorize, vmap_query=vmap_query)

        def step(tasks):
            grads, _, _ = runner.grad(params_of(model), wrt, tasks, chunk_loss)
            for p, g in zip(wrt, grads):
                p.grad = g
        step.close = runner.close
        return step
    return build


def higher_step(model, args):
    import higher

    inner_opt = torch.optim.SGD(model.parameters(), lr=args.inner_lr)

    def step(tasks):
        xs, ys, xq, yq = tasks
        for i in range(len(xs)):
            with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False) as (fmodel, diffopt):
                for _ in range(args.inner_steps):
                    diffopt.step(F.cross_entropy(fmodel(xs[i]), ys[i]))
                (F.cross_entropy(fmodel(xq[i]), yq[i]) / len(xs)).backward()
    return step


def torchopt_step(model, args):
    import torchopt

    def step(tasks):
        xs, ys, xq, yq = tasks
        state = torchopt.extract_state_dict(model)
        for i in range(len(xs)):
            inner_opt = torchopt.MetaSGD(model, lr=args.inner_lr)
            for _ in range(args.inner_steps):
                inner_opt.step(F.cross_entropy(model(xs[i]), ys[i]))
            (F.cross_entropy(model(xq[i]), yq[i]) / len(xs)).backward()
            torchopt.recover_state_dict(model, state)
    return step


def _func_task_loss(model, args):
    from torch.func import functional_call, grad

    def compute_loss(p, x, y):
        return F.cross_entropy(functional_call(model, p, (x,)), y)

    def loss_for_task(params, xs, ys, xq, yq):
        new = params
        for _ in range(args.inner_steps):
            g = grad(compute_loss)(new, xs, ys)
            new = {k: new[k] - args.inner_lr * g[k] for k in new}
        return compute_loss(new, xq, yq)
    return loss_for_task


def func_loop_step(model, args):
    loss_for_task = _func_task_loss(model, args)

    def step(tasks):
        params = dict(model.named_parameters())
        losses = [loss_for_task(params, *(t[i] for t in tasks)) for i in range(len(tasks[0]))]
        torch.stack(losses).mean().backward()
    return step


def func_vmap_step(model, args):
    from torch.func import vmap

    loss_for_task = _func_task_loss(model, args)

    def step(tasks):
        params = dict(model.named_parameters())
        vmap(loss_for_task, in_dims=(None, 0, 0, 0, 0))(params, *tasks).mean().backward()
    return step


# ---------------------------------------------------------------- measurement

class Contender:
    """One contender's model, optimiser and step function, built once and timed in
    several short rounds interleaved with the others (best round counts), so that a
    noisy neighbour on the machine does not favour whoever ran in a quiet moment."""

    def __init__(self, name, build, args):
        self.name, self.args, self.build = name, args, build
        self.model, sampler = make_workload(args)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        generator = torch.Generator().manual_seed(1)
        self.batches = [tuple(t.to(args.device) for t in sampler.sample(args.meta_batch, generator))
                        for _ in range(3)]
        self.rounds: list[float] = []
        self.count = 0
        self._round(0.0)  # fails here, before any timing, if the contender cannot run

    def one(self, step):
        self.optimizer.zero_grad(set_to_none=True)
        step(self.batches[self.count % len(self.batches)])
        self.optimizer.step()
        self.count += 1

    def round(self, seconds: float) -> None:
        self.rounds.append(self._round(seconds))

    def _round(self, seconds: float) -> float:
        # Built per round and closed after it: idle worker threads left alive slow every
        # other contender's intra-op parallel kernels by about 2x on this machine.
        step = self.build(self.model, self.args)
        try:
            self.one(step)  # warm-up
            _sync(self.args.device)
            start, steps = time.perf_counter(), 0
            while time.perf_counter() - start < seconds or steps < 1:
                self.one(step)
                steps += 1
                if self.args.device.type == "cuda" and steps % 4 == 0:
                    _sync(self.args.device)  # bounds the queue, so the clock measures work done
            _sync(self.args.device)
            return steps * self.args.meta_batch / (time.perf_counter() - start)
        finally:
            getattr(step, "close", lambda: None)()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def flops_per_task(args) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    model, sampler = make_workload(args)
    n = min(4, args.meta_batch)
    tasks = tuple(t.to(args.device) for t in sampler.sample(n, torch.Generator().manual_seed(2)))
    inner = InnerLoop(args.inner_steps, args.inner_lr)
    with FlopCounterMode(display=False) as counter:
        loss, _ = meta_batch_loss(model, params_of(model), tasks, inner, vectorize=False)
        loss.backward()
    return counter.get_total_flops() / n


def matmul_peak(device: torch.device, seconds: float = 3.0) -> float:
    """Best fp32 matmul rate (TF32 off on GPUs: the workload runs in fp32)."""
    n = 2048 if device.type == "cpu" else 8192
    torch.backends.cuda.matmul.allow_tf32 = False
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    best = 0.0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        best = max(best, 2 * n ** 3 / (time.perf_counter() - start))
    return best


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def main(argv: list[str] | None = None) -> int:
    from benchmarks.common import parse_args, write_json

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", required=True)
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--norm", default="group", choices=["group", "batch"],
                        help="conv4's norm: group (the pipeline's) or batch (MAML's, batch statistics)")
    parser.add_argument("--meta-batch", type=int, default=32)
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--queries", type=int, default=15)
    parser.add_argument("--inner-steps", type=int, default=5)
    parser.add_argument("--inner-lr", type=float, default=0.4)
    parser.add_argument("--seconds", type=float, default=15.0, help="timed seconds per contender, all rounds")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best counts")
    parser.add_argument("--only", default="", help="comma-separated contenders to run")
    parser.add_argument("--device", type=torch.device, default=torch.device("cpu"),
                        help="cpu, or cuda: there the engine runs one worker (tasks batch by vmap)")
    parser.add_argument("--peak-seconds", type=float, default=3.0, help="seconds of the matmul peak's search")
    args = parse_args(parser, argv, SMOKE)

    cores = os.cpu_count() or 1
    workers = cores if args.device.type == "cpu" else 1
    contenders = {
        "engine_vmap": engine_step(True, workers), "engine_loop": engine_step(False, workers),
        "engine_vmap_inner": engine_step(True, workers, vmap_query=False),
        "engine_vmap_1worker": engine_step(True, 1), "engine_loop_1worker": engine_step(False, 1),
        "higher": higher_step, "torchopt": torchopt_step, "func_loop": func_loop_step, "func_vmap": func_vmap_step,
    }
    if workers == 1:
        del contenders["engine_vmap_1worker"], contenders["engine_loop_1worker"]
    if args.only:
        contenders = {k: v for k, v in contenders.items() if k in args.only.split(",")}
    rates: dict[str, float] = {}
    built: list[Contender] = []
    for name, build in contenders.items():
        try:
            built.append(Contender(name, build, args))
        except Exception as exc:  # a peer that does not run beside this torch is reported, not fatal
            print(f"{name:>24}: failed: {exc!r}", flush=True)
            rates[name] = float("nan")
    for r in range(args.rounds):
        for c in built:
            c.round(args.seconds / args.rounds)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{c.name} {c.rounds[-1]:.1f}" for c in built), flush=True)
    for c in built:
        rates[c.name] = max(c.rounds)
    peak = matmul_peak(args.device, args.peak_seconds)
    flops = flops_per_task(args)
    engine = max(v for k, v in rates.items() if k.startswith("engine") and v == v)
    peers = {k: v for k, v in rates.items() if not k.startswith("engine") and v == v}
    best_peer = max(peers.values()) if peers else float("nan")
    result = {
        "workload": {k: v for k, v in vars(args).items() if k not in ("json", "only", "device", "smoke")} | {
            "cores": cores, "torch": torch.__version__, "device": _device_name(args.device)},
        "tasks_per_s": rates,
        "rounds_tasks_per_s": {c.name: c.rounds for c in built},
        "ratio_vs_higher": engine / rates.get("higher", float("nan")),
        "ratio_vs_func_loop": engine / rates.get("func_loop", float("nan")),
        "ratio_vs_best_peer": engine / best_peer,
        "best_peer": max(peers, key=peers.get) if peers else None,
        "flops_per_task": flops,
        "engine_gflops": engine * flops / 1e9,
        "matmul_peak_gflops": peak / 1e9,
        "peak_fraction": engine * flops / peak,
    }
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
