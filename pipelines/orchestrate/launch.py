"""Start a training stage as torchrun workers and wait for it (used by the flow's tasks).

The agent runs in its own session with ``PR_SET_PDEATHSIG``: if this process dies, so
does the agent, and each worker dies with its agent (``pipelines.orchestrate.worker``), so a cancelled
or crashed flow leaves no process behind.  Worker output is streamed line by line to
the caller's logger; a non-zero exit raises :class:`StageFailed` with the last lines.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from pipelines.common import entrypoints
from pipelines.common.net import free_port
from pipelines.config.pipeline import PipelineConfig

REPO = Path(__file__).resolve().parents[2]
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


# A line per checkpoint (every dist.checkpoint_every steps, from rank 0): the stage's
# progress for someone reading the workers' own output, noise in the flow's log.
CHATTER = re.compile(r"^(\[rank\d+\]: )?checkpoint \w+ step \d+$")


class StageFailed(RuntimeError):
    """A torchrun stage exited with a non-zero code."""


def torchrun_command(cfg: PipelineConfig, config_path: Path, stage_args: list[str]) -> list[str]:
    """The torchrun line of this node; every node of a multi-node job runs the same one."""
    d = cfg.dist
    endpoint = d.rdzv_endpoint
    if endpoint.endswith(":0"):
        endpoint = f"{endpoint.rsplit(':', 1)[0]}:{free_port()}"
    # srun starts the same line once on every node of the allocation (and kills them all
    # if one fails); without it, each other node runs the logged line itself.
    srun = ["srun", f"--nodes={d.nnodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1"] if d.launcher == "srun" else []
    return [*srun, sys.executable, "-m", "torch.distributed.run", "--nnodes", str(d.nnodes),
            "--nproc-per-node", str(d.procs_per_node()), "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
            "--max-restarts", str(d.max_restarts), "-m", entrypoints.WORKER, "--config", str(config_path),
            *stage_args]


def _agent_dies_with_us() -> None:
    if _libc is not None:
        _libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@contextlib.contextmanager
def _terminate_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM (how workers and Prefect cancel a flow run) into an exception, so the
    ``finally`` below stops the agent; only possible on the main thread."""
    def raise_exit(signum, frame):
        raise SystemExit(128 + signum)

    try:
        previous = signal.signal(signal.SIGTERM, raise_exit)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the agent (it stops its workers), then SIGKILL what is left of its group."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def run_torchrun(cfg: PipelineConfig, workdir: Path, stage_args: list[str], log: Callable[[str], None]) -> None:
    """Run one stage under torchrun; returns when every worker exited 0."""
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "config.json"
    config_path.write_text(cfg.model_dump_json())
    cmd = torchrun_command(cfg, config_path, [*stage_args, "--out", str(workdir)])
    threads = cfg.dist.threads_per_process(cfg.dist.procs_per_node())
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "METADISTILL_PROGRESS": "0", "OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    log("launch: " + " ".join(cmd))
    tail: collections.deque[str] = collections.deque(maxlen=200)
    with _terminate_on_sigterm():
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                cwd=REPO, start_new_session=True, preexec_fn=_agent_dies_with_us)
        try:
            for line in proc.stdout:
                tail.append(line.rstrip())
                if not CHATTER.search(line):  # kept for a failure's report, not the flow's log
                    log(line.rstrip())
            code = proc.wait()
        finally:
            _stop(proc)
    if code != 0:
        # The worker's own exception, not torchrun's summary of it, says what went wrong.
        causes = [line for line in tail if re.match(r"^(\[rank\d+\]: )?\w+(Error|Exception|Failed): ", line)]
        raise StageFailed(f"torchrun stage {' '.join(stage_args)} failed with exit code {code}: "
                          f"{causes[0] if causes else 'see the worker output above'}\n"
                          f"last worker output:\n" + "\n".join(list(tail)[-20:]))
