"""``tracking.*`` and ``dist.*``: where runs are recorded and how training processes start."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pipelines.common.threads import auto_threads
from pipelines.config.errors import Strict


class TrackingConfig(Strict):
    experiment: str | None = Field(None, min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$",
                                   description="MLflow experiment of the runs; the student registers as "
                                               "<experiment>-student. Default: metadistill-<data.name>, and "
                                               "metadistill-imagefolder-<folder name> for an image folder, so runs "
                                               "on other data never meet another data set's champion")
    register_best: bool = Field(True, description="register the best student in the model registry")
    register_teacher: bool = Field(False, description="register this run's teacher as <experiment>-teacher "
                                                      "(models:/<experiment>-teacher/latest)")
    promotion_alpha: float = Field(0.05, gt=0, le=1, description=(
        "a new student takes the champion alias only when it wins McNemar's exact test against the champion on the "
        "same test images at this level (one-sided)"))
    promotion_min_delta: float = Field(0.0, ge=0, lt=1, description="and beats its test accuracy by more than this "
                                                                    "(a fraction: 0.01 is one point)")
    int8_max_drop: float | None = Field(0.005, ge=0, lt=1, description=(
        "after registration, the student's nn.Linear layers are quantized to int8 (dynamic quantization; convolutions "
        "stay float) and evaluated on the same test split; the int8 variant is kept (servable with --variant int8) "
        "when it loses at most this much test accuracy (a fraction: 0.005 is half a point) and its TorchScript file is "
        "smaller; null: no int8 step"))
    cost_card: bool = Field(True, description=(
        "measure the student's and the teacher's cost card (parameters, MACs, file size, one-thread CPU latency at "
        "batch 1 and 64) in a process of its own: about 2.5 s for small networks; false: none is measured, and a "
        "student.budget cannot be checked at promotion"))


class DistConfig(Strict):
    """Training stages as torchrun workers: data-parallel over ``nnodes * nproc`` processes."""

    launcher: Literal["auto", "inprocess", "torchrun", "srun"] = Field(
        "auto", description="auto: torchrun when nnodes * nproc > 1, else inside the flow's process; "
                            "srun: torchrun on every node of the Slurm allocation")
    nproc: int | None = Field(None, ge=1, description="processes per node; default: one per GPU when training on "
                                                      "CUDA, else 1")
    nnodes: int = Field(1, ge=1, description="nodes; each runs the same torchrun line (see docs/distributed.md)")
    rdzv_endpoint: str = Field("127.0.0.1:0", pattern=r"^[A-Za-z0-9_.\-\[\]:]+:\d+$",
                               description="c10d rendezvous HOST:PORT; port 0: a free local port (one node only)")
    max_restarts: int = Field(3, ge=0, description="torchrun restarts all workers after a failure, this often")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="where training runs: auto is CUDA when present (each worker on cuda:LOCAL_RANK), "
                            "else the CPU; cuda on a machine without it exits 2 before any work")
    backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto", description="auto: nccl when training on CUDA, else gloo")
    threads: int | None = Field(None, ge=1, description="intra-op threads per process; default: the usable CPUs that "
                                                        "other processes leave free at the start, shared by nproc")
    checkpoint_every: int = Field(100, ge=1, description="steps between checkpoints of a torchrun stage")

    @model_validator(mode="after")
    def _endpoint(self) -> DistConfig:
        if self.nnodes > 1 and self.rdzv_endpoint.endswith(":0"):
            raise ValueError(f"dist.nnodes={self.nnodes} needs dist.rdzv_endpoint=HOST:PORT that every node "
                             f"can reach; port 0 only works on one node")
        return self

    @model_validator(mode="after")
    def _backend(self) -> DistConfig:
        if self.backend == "nccl" and self.device == "cpu":
            raise ValueError("dist.backend=nccl needs CUDA tensors, but dist.device=cpu: use dist.backend=gloo "
                             "or auto, or dist.device=cuda")
        return self

    def uses_cuda(self) -> bool:
        import torch

        return self.device == "cuda" or (self.device == "auto" and torch.cuda.is_available())

    def procs_per_node(self) -> int:
        import torch

        return self.nproc or (max(1, torch.cuda.device_count()) if self.uses_cuda() else 1)

    def threads_per_process(self, local_processes: int) -> int:
        """Intra-op threads of each of ``local_processes`` processes on this node:
        ``dist.threads``, else their share of the CPUs that are free now."""
        return self.threads or auto_threads(local_processes)

    def uses_torchrun(self) -> bool:
        if self.launcher != "auto":
            return self.launcher != "inprocess"
        return self.nnodes * self.procs_per_node() > 1
