"""The cost card as the pipeline reports it: measured in a process of its own, on one thread.

A process of its own, so that the latency is not the training process's (its threads, its
allocator, whatever else it runs); one thread (``OMP_NUM_THREADS``, ``MKL_NUM_THREADS`` and
``torch.set_num_threads(1)``), as ``deploy/serve.py`` runs its forwards, so that the number
does not depend on how many cores the machine had free.

``cost_cards(folders)``: the cards of saved weights folders (loaded as ``load_folder`` does:
``spec.json`` + ``model.safetensors``, nothing unpickled), several in one process.
``LatencyProbe``: one long-lived process of the same kind that times randomly initialised
candidates of an architecture search, over JSON lines, with no process start per candidate.

``python -m deploy.cost FOLDER...`` prints the cards as one JSON list; ``--probe`` answers
JSON lines on stdin.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from models.cost import Cost, Latency

ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
ROOT = Path(__file__).resolve().parents[1]  # where `deploy` imports from, for the child


class CostError(RuntimeError):
    """A cost card or a probe's latency that could not be measured (named in the message)."""


def _child_env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, **ONE_THREAD, "PYTHONPATH": str(ROOT) + (os.pathsep + path if path else "")}


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no message"


def cost_cards(folders: list[Path], timeout_s: float = 600.0) -> list[Cost]:
    """The cost card of each saved weights folder, measured in one child process."""
    names = ", ".join(str(f) for f in folders)
    try:
        proc = subprocess.run([sys.executable, "-m", "deploy.cost", *map(str, folders)], capture_output=True,
                              text=True, timeout=timeout_s, env=_child_env())
    except subprocess.TimeoutExpired:
        raise CostError(f"cost card of {names}: no answer in {timeout_s:g} s") from None
    if proc.returncode != 0:
        raise CostError(f"cost card of {names}: {_last_line(proc.stderr)}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cost_card(folder: Path, timeout_s: float = 600.0) -> Cost:
    """The cost card of one saved weights folder (see :func:`cost_cards`)."""
    return cost_cards([folder], timeout_s)[0]


class LatencyProbe:
    """One child process (one thread) that times candidates: ``probe.latency(arch, kwargs,
    input_shape, num_classes, batch)`` builds the architecture randomly initialised, wraps it
    as served and returns its :func:`models.cost.measure_latency`.  An error in the child
    comes back as a CostError naming the architecture; a child that does not answer within
    ``timeout_s`` is killed (the next call starts a new one)."""

    def __init__(self, timeout_s: float = 120.0):
        self.timeout_s = timeout_s
        self._proc: subprocess.Popen | None = None
        self._answers: queue.Queue = queue.Queue()
        self._stderr = None

    def __enter__(self) -> LatencyProbe:
        self._start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start(self) -> None:
        self._stderr = tempfile.TemporaryFile()
        self._proc = subprocess.Popen([sys.executable, "-m", "deploy.cost", "--probe"], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=self._stderr, text=True, env=_child_env())
        self._answers = queue.Queue()  # a reader thread per child: a read that can time out
        threading.Thread(target=_read_lines, args=(self._proc.stdout, self._answers), daemon=True).start()

    def latency(self, arch: str, kwargs: dict, input_shape: tuple[int, ...], num_classes: int, batch: int = 1,
                **measure) -> Latency:
        """``measure``: ``measure_latency``'s keywords (``repeats``, ``target_s``...)."""
        what = f"latency of {arch} {json.dumps(kwargs)} at batch {batch}"
        if self._proc is None or self._proc.poll() is not None:
            self._start()
        request = {"arch": arch, "kwargs": kwargs, "input_shape": list(input_shape), "num_classes": num_classes,
                   "batch": batch, "measure": measure}
        try:
            self._proc.stdin.write(json.dumps(request) + "\n")
            self._proc.stdin.flush()
            line = self._answers.get(timeout=self.timeout_s)
        except queue.Empty:
            self.close(kill=True)
            raise CostError(f"{what}: no answer in {self.timeout_s:g} s; the probe process was stopped") from None
        except (BrokenPipeError, OSError):
            line = None
        if line is None:
            why = self._stderr_tail()
            self.close()
            raise CostError(f"{what}: the probe process ended: {why}")
        answer = json.loads(line)
        if "error" in answer:
            raise CostError(f"{what}: {answer['error']}")
        return answer["latency"]

    def _stderr_tail(self) -> str:
        self._proc.wait(timeout=5)
        self._stderr.seek(0)
        return _last_line(self._stderr.read().decode(errors="replace"))

    def close(self, kill: bool = False) -> None:
        """End the child: at the end of its input, or at once (``kill``: one that did not answer)."""
        if self._proc is None:
            return
        if self._proc.poll() is None and not kill:
            self._proc.stdin.close()  # the child's loop ends at end of input
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                kill = True
        if kill and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._stderr.close()
        self._proc = None


def _read_lines(stream, answers: queue.Queue) -> None:
    for line in stream:
        answers.put(line)
    answers.put(None)  # end of output: the child is gone


# ---------------------------------------------------------------- the child

def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # only settable before any inter-op work; then it is moot
        pass


def _flop_counter_without_dynamo() -> None:
    """Spare the child the import of ``torch._dynamo`` (1.3 s of a 2.5 s card): every
    TorchDispatchMode's dispatch is wrapped to disable dynamo, which imports it on the first
    call.  Nothing is compiled in this process, so the disabled function is the function
    itself; where torch names things otherwise, this does nothing and the import happens."""
    from torch.utils.flop_counter import _FlopCounterMode

    raw = getattr(_FlopCounterMode.__dict__.get("__torch_dispatch__"), "__wrapped__", None)
    if raw is not None and not hasattr(raw, "__dynamo_disable"):
        raw.__dynamo_disable = raw


INT8 = "int8:"  # a folder named with this prefix is measured as its int8 variant


def measure_folder(folder: Path, int8: bool = False) -> Cost:
    """The card of a saved weights folder, in this process (the child's work); ``int8``: of
    the model :func:`models.quantize.quantize_int8` rebuilds from it, as ``serve --variant
    int8`` runs it, its size that of its TorchScript file (packed int8 weights have no
    safetensors size)."""
    import torch

    from deploy.registry import load_folder
    from models.cost import BATCHES, count_macs, measure_cost, measure_latency
    from models.registry import count_parameters

    model, spec = load_folder(folder)
    shape = tuple(spec["input_shape"])
    if not int8:
        cost = measure_cost(model, shape, size_bytes=(Path(folder) / "model.safetensors").stat().st_size)
    else:  # the same parameters and arithmetic (done in int8 where it can be); its own file and clock
        from models.quantize import quantize_int8, torchscript_bytes

        counted = {"parameters": count_parameters(model), "macs": count_macs(model, shape)}
        model = quantize_int8(model)
        cost = {**counted, "size_bytes": len(torchscript_bytes(model, torch.rand(1, *shape))),
                **{f"latency_b{b}": measure_latency(model, shape, b) for b in BATCHES}}
    return {**cost, "threads": torch.get_num_threads(), "torch": torch.__version__}


def _probe_latency(request: dict) -> Latency:
    from models.cost import measure_latency
    from models.normalize import Normalized
    from models.registry import build_model

    shape = tuple(request["input_shape"])
    model = build_model(request["arch"], shape, request["num_classes"], **request.get("kwargs", {}))
    served = Normalized(model, [0.5] * shape[0], [0.25] * shape[0]).eval()  # as load_folder wraps it
    return measure_latency(served, shape, request["batch"], **request.get("measure", {}))


def _serve_probe() -> int:
    out, sys.stdout = sys.stdout, sys.stderr  # stdout carries the answers and nothing else
    for line in sys.stdin:
        try:
            answer = {"latency": _probe_latency(json.loads(line))}
        except Exception as exc:  # noqa: BLE001 - every failure is an answer, never a hang
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        out.write(json.dumps(answer) + "\n")
        out.flush()
    return 0


def main(argv: list[str]) -> int:
    _one_thread()
    _flop_counter_without_dynamo()
    if argv == ["--probe"]:
        return _serve_probe()
    if not argv:
        print(f"usage: python -m deploy.cost [{INT8}]FOLDER... | --probe", file=sys.stderr)
        return 2
    from deploy.registry import ModelLoadError

    try:
        cards = [measure_folder(Path(folder.removeprefix(INT8)), int8=folder.startswith(INT8)) for folder in argv]
    except ModelLoadError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(json.dumps(cards))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
