"""Bring your own teacher and starting weights: the input adapter, head replacement, each
source kind, each refusal (exit 2 before any work), and the flow end to end: a registry
round trip, a torchvision resnet18 fine-tuned on the CIFAR-10 JPEGs teaching a resnet8
that is registered and served over HTTP, torchrun with brought weights, and few-shot
meta-training from pretrained weights."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from mlflow.tracking import MlflowClient
from safetensors.torch import save_file

from models.external import head_classes, replace_head
from models.normalize import Adapted, adapt_input
from models.registry import build_model
from models.weights import save_weights
from pipelines.config.errors import ConfigError
from pipelines.config.loader import load_config
from pipelines.teacher import sources
from tests.helpers import free_port

TINY = ["tracking.cost_card=false",  # measured in test_cost and test_integration
        "teacher.model.arch=mlp", "teacher.model.kwargs={hidden: [64]}", "teacher.train.steps=120",
        "student.train.steps=40", "student.seeds=[0]", "student.methods=[scratch, kd]"]
DIGITS_SPEC = {"input_shape": [1, 8, 8], "num_classes": 10, "mean": [0.3], "std": [0.4]}


def _client(home) -> MlflowClient:
    uri = f"sqlite:///{home / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _mlp_folder(folder: Path, hidden: list[int], classes: int = 10, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = build_model("mlp", (1, 8, 8), classes, hidden=hidden)
    save_weights(model, folder, {**DIGITS_SPEC, "arch": "mlp", "kwargs": {"hidden": hidden}, "num_classes": classes})
    return folder


def _cli(home, *args, timeout=600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
    env["METADISTILL_HOME"] = str(home)
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


# ---------------------------------------------------------------- pure torch parts

def test_adapter_undoes_data_normalisation_repeats_grey_resizes_and_renormalises():
    seen = {}

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen["x"] = x
            return x.mean(dim=(2, 3))

    raw = torch.rand(2, 1, 4, 4)
    data = (raw - 0.3) / 0.4  # what the pipeline's splits hold
    adapted = Adapted(Probe(), [0.3], [0.4], (3, 8, 8), mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.5])
    adapted(data)
    expected = torch.nn.functional.interpolate(raw.expand(-1, 3, -1, -1), size=(8, 8), mode="bilinear",
                                               align_corners=False)
    expected = (expected - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) / torch.tensor([0.2, 0.25, 0.5]).view(1, 3, 1, 1)
    assert seen["x"].shape == (2, 3, 8, 8)
    assert torch.allclose(seen["x"], expected, atol=1e-5)
    # Same input as the data: no wrapper at all; the state dict is the network's alone.
    net = build_model("mlp", (1, 8, 8), 10, hidden=[8])
    assert adapt_input(net, {"input_shape": [1, 8, 8], "mean": [0.3], "std": [0.4]}, (1, 8, 8), [0.3], [0.4]) is net
    assert set(Adapted(net, [0.3], [0.4], (1, 8, 8), [0.5], [0.5]).state_dict()) == {f"model.{k}" for k in net.state_dict()}
    with pytest.raises(ValueError, match="1-channel images; the data has 3"):
        adapt_input(net, {"input_shape": [1, 8, 8], "mean": [0.3], "std": [0.4]}, (3, 8, 8), [0.3] * 3, [0.4] * 3)


@pytest.mark.parametrize("arch,shape,head", [("torchvision:resnet18", (3, 32, 32), "fc"),
                                             ("torchvision:mobilenet_v3_small", (3, 32, 32), "classifier.3"),
                                             ("mlp", (1, 8, 8), "net.5")])
def test_replace_head_keeps_the_body_and_gives_new_classes(arch, shape, head):
    model = build_model(arch, shape, 1000 if ":" in arch else 7)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert head_classes(before, model) == (1000 if ":" in arch else 7)
    names = replace_head(model, 5)
    assert names == [f"{head}.weight", f"{head}.bias"]
    after = model.state_dict()
    assert model.eval()(torch.zeros(2, *shape)).shape == (2, 5)
    assert all(torch.equal(before[k], after[k]) for k in after if not k.startswith(f"{head}."))


# ---------------------------------------------------------------- sources and refusals

def test_file_source_materialises_the_same_weights_with_lineage(home, tmp_path):
    folder = _mlp_folder(tmp_path / "teacher", [64])
    cfg = load_config(overrides=[*TINY, "teacher.source=file", f"teacher.uri={folder}"])
    [source] = sources.preflight(cfg)
    model, spec = source.load()
    assert spec["arch"] == "mlp" and source.folder.is_relative_to(home)
    assert source.sha256 == hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    torch.manual_seed(0)
    original = build_model("mlp", (1, 8, 8), 10, hidden=[64])
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), original.state_dict().values()))
    assert source.lineage()["teacher.source"] == "file" and source.lineage()["teacher.arch"] == "mlp"
    # A single safetensors file with its spec beside it (same stem) works too.
    single = tmp_path / "single"
    single.mkdir()
    (folder / "model.safetensors").rename(single / "t.safetensors")
    (single / "t.json").write_text((folder / "spec.json").read_text())
    cfg = load_config(overrides=[*TINY, "teacher.source=file", f"teacher.uri={single / 't.safetensors'}"])
    assert sources.preflight(cfg)[0].sha256 == source.sha256


def test_torchvision_weights_from_a_plain_pth_state_dict(home, tmp_path):
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=1000)
    torch.save(net.state_dict(), tmp_path / "r18.pth")
    cfg = load_config(overrides=[*TINY, "teacher.source=torchvision", "teacher.model.arch=resnet18",
                                 f"teacher.weights={tmp_path / 'r18.pth'}", "teacher.image_size=32",
                                 "teacher.finetune.mode=head"])
    assert cfg.teacher.model.arch == "torchvision:resnet18"
    [source] = sources.preflight(cfg)
    spec = source.spec
    assert spec["input_shape"] == [3, 32, 32] and spec["num_classes"] == 1000
    assert spec["mean"] == [0.485, 0.456, 0.406]  # ImageNet's, the weights' own normalisation
    loaded, _ = source.load()
    assert torch.equal(loaded.conv1.weight, net.conv1.weight)


def _refusal(home, tmp_path, case: str) -> tuple[list[str], str]:
    """(overrides, expected message) of one bad source."""
    good = _mlp_folder(tmp_path / "good", [64])
    if case == "missing file":
        return ["teacher.source=file", f"teacher.uri={tmp_path / 'nope'}"], "no such file or folder"
    if case == "spec does not match":
        spec = json.loads((good / "spec.json").read_text())
        (good / "spec.json").write_text(json.dumps({**spec, "kwargs": {"hidden": [32]}}))
        return ["teacher.source=file", f"teacher.uri={good}"], "does not match the weights"
    if case == "pickle":
        torch.save(build_model("mlp", (1, 8, 8), 10, hidden=[64]), tmp_path / "model.pt")
        (tmp_path / "model.json").write_text((good / "spec.json").read_text())
        return ["teacher.source=file", f"teacher.uri={tmp_path / 'model.pt'}"], "weights_only=True refuses"
    if case == "not a plain tensor dict":
        torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "ckpt.pth")
        return ["teacher.source=torchvision", "teacher.model.arch=resnet18", f"teacher.weights={tmp_path / 'ckpt.pth'}",
                "teacher.finetune.mode=all"], "not a plain dict of tensors"
    if case == "classes without a new head":
        _mlp_folder(good, [64], classes=7)
        return ["teacher.source=file", f"teacher.uri={good}"], "predicts 7 classes; digits has 10"
    if case == "unknown registered model":
        return ["teacher.source=registry", "teacher.uri=models:/nobody-teacher/1"], "no registered model 'nobody-teacher'"
    if case == "student init of another network":
        return ["student.init=file", f"student.init_uri={good}"], "holds mlp with {'hidden': [64]}"
    raise AssertionError(case)


REFUSALS = ["missing file", "spec does not match", "pickle", "not a plain tensor dict", "classes without a new head",
            "unknown registered model", "student init of another network"]


@pytest.mark.parametrize("case", REFUSALS)
def test_bad_sources_are_refused_before_any_work(home, tmp_path, case):
    overrides, message = _refusal(home, tmp_path, case)
    cfg = load_config(overrides=[*TINY, *overrides])
    with pytest.raises(sources.SourceError, match=message.replace("(", r"\(").replace("[", r"\[")):
        sources.preflight(cfg)
    assert not (home / "cache" / "teacher").exists()  # nothing trained, nothing cached


def test_channel_refusal_and_cli_exit_code(home, tmp_path, shared_data):
    """A 1-channel teacher cannot serve RGB CIFAR images; the CLI exits 2 naming it."""
    folder = tmp_path / "grey"
    torch.manual_seed(0)
    save_weights(build_model("resnet8", (1, 28, 28), 10), folder,
                 {"arch": "resnet8", "kwargs": {}, "input_shape": [1, 28, 28], "num_classes": 10,
                  "mean": [0.5], "std": [0.5]})
    out = _cli(home, "run", "--set", "data.name=cifar10", "--set", f"data.root={shared_data}",
               "--set", "teacher.source=file", "--set", f"teacher.uri={folder}",
               "--set", "student.model.arch=resnet8", "--set", "student.model.kwargs={base_width: 4}")
    assert out.returncode == 2, out.stderr[-2000:]
    assert "takes 1-channel images; the data has 3 channels" in out.stderr
    assert not (home / "mlflow.db").exists()  # refused before any run was created
    pickle = tmp_path / "evil.pt"
    torch.save(build_model("mlp", (1, 8, 8), 10), pickle)
    out = _cli(home, "run", "--set", "teacher.source=torchvision", "--set", "teacher.model.arch=resnet18",
               "--set", f"teacher.weights={pickle}", "--set", "teacher.finetune.mode=all")
    assert out.returncode == 2 and "weights_only=True refuses" in out.stderr and "save_file" in out.stderr


@pytest.mark.parametrize("overrides,message", [
    (["teacher.source=registry"], "needs teacher.uri"),
    (["teacher.source=registry", "teacher.uri=champion"], "is not a registry URI"),
    (["teacher.finetune.mode=head"], "applies to a teacher you bring"),
    (["teacher.source=file", "teacher.uri=x", "teacher.image_size=64"], "applies to torchvision/timm"),
    (["teacher.source=torchvision", "teacher.model.arch=resnet1888", "teacher.weights=w.pth"],
     "unknown torchvision classification model"),
    (["student.init=torchvision", "student.model.arch=resnet18", "student.init_uri=w.pth"], "takes 3-channel images"),
    (["student.init=file"], "needs student.init_uri"),
    (["data.name=cifar10", "student.model.arch=torchvision:mobilenet_v3_small", "student.must_be_smaller=false",
      "student.methods=[kd, maml_init]"], "without BatchNorm running statistics"),
])
def test_source_settings_are_checked_with_the_config(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[*TINY, *overrides])


# ---------------------------------------------------------------- the flow

def test_registry_round_trip_reuses_the_teacher(home, prefect_server):
    """Run A trains and registers its teacher; run B takes it from the registry (and its
    student starts from A's registered student): no teacher training, same accuracy."""
    from pipelines.orchestrate.flow import metadistill_flow

    a = metadistill_flow(config=load_config(overrides=[*TINY, "tracking.experiment=rt-a",
                                                       "tracking.register_teacher=true"]))
    client = _client(home)
    version = client.get_model_version("rt-a-teacher", "1")
    assert float(version.tags["test_acc"]) == pytest.approx(a["teacher_test_acc"], abs=1e-6)
    for uri, message in (("models:/rt-a-teacher@gold", "has no alias 'gold'; its aliases: none"),
                         ("models:/rt-a-teacher/9", "has no version 9; its versions: 1")):
        with pytest.raises(sources.SourceError, match=message):
            sources.preflight(load_config(overrides=[*TINY, "teacher.source=registry", f"teacher.uri={uri}"]))
    b = metadistill_flow(config=load_config(overrides=[
        *TINY, "tracking.experiment=rt-b", "teacher.source=registry", "teacher.uri=models:/rt-a-teacher/latest",
        "student.model.kwargs={hidden: [16]}", "student.init=registry",
        "student.init_uri=models:/rt-a-student@champion"]))
    assert b["teacher_test_acc"] == a["teacher_test_acc"]
    runs = {r.info.run_name: r for r in client.search_runs(
        [client.get_experiment_by_name("rt-b").experiment_id], f"tags.mlflow.parentRunId = '{b['mlflow_run_id']}'")}
    teacher = runs["teacher-registry"]
    assert "train_loss" not in teacher.data.metrics  # reused, not trained
    assert teacher.data.tags["teacher.uri"] == "models:/rt-a-teacher/latest"
    assert teacher.data.tags["teacher.version"] == "1" and len(teacher.data.tags["teacher.sha256"]) == 64
    assert runs["student/kd/seed0"].data.tags["student.init.uri"] == "models:/rt-a-student@champion"
    student = client.get_model_version("rt-b-student", b["registered_model"]["version"])
    assert student.tags["teacher_source"] == "registry" and student.tags["teacher_version"] == "1"
    assert client.get_experiment_by_name("rt-b").tags["mlflow.experimentKind"] == "custom_model_development"


def _cifar_test_only(tmp_path, shared_data) -> Path:
    """The CIFAR-10 JPEG test zip alone: the carved-split setting (10,000 images)."""
    root = tmp_path / "cifar-root" / "cifar10"
    root.mkdir(parents=True)
    (root / "cifar10_test_jpg.zip").symlink_to(shared_data / "cifar10" / "cifar10_test_jpg.zip")
    return root.parent


def test_torchvision_resnet18_finetuned_teaches_resnet8_registered_and_served(home, tmp_path, shared_data,
                                                                              prefect_server):
    from pipelines.orchestrate.flow import metadistill_flow

    torch.manual_seed(0)  # "pretrained" weights built here: the point is the path, not ImageNet
    torch.save(torchvision.models.resnet18(num_classes=1000).state_dict(), tmp_path / "resnet18.pth")
    cfg = load_config("cifar10", overrides=[
        f"data.root={_cifar_test_only(tmp_path, shared_data)}", "data.label_budget=null", "data.train_fraction=0.3",
        # the teacher's outputs over 1,000 transfer images and 1,000 test images, not 5,600 and 2,000:
        # at 48x48 a resnet18 pass over them was a fifth of the test
        "data.transfer_limit=1000", "data.test_fraction=0.1",
        "teacher.source=torchvision", "teacher.model.arch=resnet18", f"teacher.weights={tmp_path / 'resnet18.pth'}",
        "teacher.image_size=48", "teacher.finetune.mode=all", "teacher.finetune.steps=100",
        "teacher.finetune.batch_size=32", "teacher.finetune.optimizer.lr=0.02", "teacher.finetune.augment=false",
        "student.model.arch=resnet8", "student.model.kwargs={base_width: 8}", "student.train.steps=200",
        "student.train.batch_size=32", "student.seeds=[0]", "student.methods=[kd]", "tracking.experiment=byo-cifar",
        "teacher.improve.method=none",  # the brought teacher's path is the point; its improvement is tested elsewhere
        "tracking.cost_card=false"])  # a resnet18's card takes seconds; cards are tested in test_cost
    summary = metadistill_flow(config=cfg)
    assert summary["teacher_test_acc"] > 0.15  # a random resnet18 is at 0.10: the fine-tune learned
    assert summary["registered_model"]["alias"] == "champion"
    client = _client(home)
    runs = {r.info.run_name: r for r in client.search_runs(
        [client.get_experiment_by_name("byo-cifar").experiment_id],
        f"tags.mlflow.parentRunId = '{summary['mlflow_run_id']}'")}
    finetune = runs["teacher-finetune"]
    assert finetune.data.tags["teacher.arch"] == "torchvision:resnet18"
    assert finetune.data.tags["teacher.input_shape"] == "3x48x48"
    assert "train_loss" in finetune.data.metrics
    teacher_spec = json.loads(next((home / "cache" / "teacher").glob("*/spec.json")).read_text())
    assert teacher_spec["num_classes"] == 10 and teacher_spec["input_shape"] == [3, 48, 48]

    port = free_port()
    env = {**os.environ, "METADISTILL_HOME": str(home)}
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "serve", "--model", "byo-cifar-student",
                             "--port", str(port), "--poll-seconds", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise AssertionError(proc.stdout.read().decode()[-3000:]) from None
                time.sleep(0.3)
        x = np.random.default_rng(0).random((2, 3, 32, 32)).astype(np.float32)
        req = urllib.request.Request(f"http://127.0.0.1:{port}/predict", data=json.dumps({"instances": x.tolist()}).encode(),
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            out = json.loads(r.read())
        assert len(out["predictions"]) == 2 and out["model"]["name"] == "byo-cifar-student"
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_brought_teacher_finetuned_and_student_init_under_torchrun(home, tmp_path, prefect_server):
    from pipelines.orchestrate.flow import metadistill_flow

    teacher = _mlp_folder(tmp_path / "teacher", [64], classes=7)  # other classes: a new head is fine-tuned
    init = _mlp_folder(tmp_path / "init", [16], seed=1)
    summary = metadistill_flow(config=load_config(overrides=[
        *TINY, "tracking.experiment=byo-ddp", "dist.nproc=2", "teacher.source=file", f"teacher.uri={teacher}",
        "teacher.finetune.mode=head", "teacher.finetune.steps=60", "teacher.finetune.optimizer.lr=0.1",
        "student.init=file", f"student.init_uri={init}", "student.methods=[kd, maml_init]", "maml.meta_steps=4"]))
    assert summary["teacher_test_acc"] > 0.2 and set(summary["methods"]) == {"kd", "maml_init"}
    client = _client(home)
    runs = {r.info.run_name: r for r in client.search_runs(
        [client.get_experiment_by_name("byo-ddp").experiment_id],
        f"tags.mlflow.parentRunId = '{summary['mlflow_run_id']}'")}
    assert runs["teacher-finetune"].data.tags["dist.world_size"] == "2"
    assert runs["student/maml_init/seed0"].data.tags["student.init.sha256"] == hashlib.sha256(
        (init / "model.safetensors").read_bytes()).hexdigest()


def test_fewshot_meta_trains_from_pretrained_weights(home, tmp_path, shared_data):
    torch.manual_seed(0)
    folder = tmp_path / "conv4"
    save_weights(build_model("conv4", (1, 28, 28), 50, channels=8, norm="batch"), folder,
                 {"arch": "conv4", "kwargs": {"channels": 8, "norm": "batch"}, "input_shape": [1, 28, 28],
                  "num_classes": 50, "mean": [0.0], "std": [1.0]})
    save_file({"x": torch.zeros(1)}, str(tmp_path / "unused.safetensors"))
    settings = ["fewshot.model.kwargs={channels: 8, norm: batch}", "fewshot.meta.meta_steps=3",
                "fewshot.meta.time_budget_s=null", "fewshot.meta.meta_batch=2", "fewshot.train_ways=[5]",
                "fewshot.eval_shots=[1]", "fewshot.eval_tasks=4", "fewshot.lake_runs=false",
                "fewshot.init=file", f"fewshot.init_uri={folder}", f"data.root={shared_data}",
                "tracking.experiment=byo-fewshot"]
    out = _cli(home, "fewshot", *[x for s in settings for x in ("--set", s)], "--summary", str(tmp_path / "s.json"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "5way_1shot" in json.loads((tmp_path / "s.json").read_text())["results"]
    client = _client(home)
    [parent] = client.search_runs([client.get_experiment_by_name("byo-fewshot-fewshot").experiment_id],
                                  "tags.`fewshot.init.source` = 'file'")
    assert parent.data.tags["fewshot.init.arch"] == "conv4"
    wrong = [*settings[:-3], "fewshot.init=file", f"fewshot.init_uri={tmp_path / 'unused.safetensors'}",
             f"data.root={shared_data}"]
    out = _cli(home, "fewshot", *[x for s in wrong for x in ("--set", s)])
    assert out.returncode == 2 and "no spec beside" in out.stderr


def test_timm_teacher_head_finetuned_by_the_teacher_stage(home, tmp_path):
    """timm weights from a local file, a new 10-class head trained alone on digits, fed
    8x8 grey digits as 32x32 RGB: the body's weights are untouched, the stage learned."""
    import timm

    from pipelines import data as data_stage
    from pipelines.evaluate.metrics import evaluate
    from pipelines.teacher.context import TeacherContext
    from pipelines.teacher.fit import cached_teacher, obtain_teacher

    torch.manual_seed(0)
    net = timm.create_model("resnet10t", num_classes=1000)
    save_file(net.state_dict(), str(tmp_path / "resnet10t.safetensors"))
    cfg = load_config(overrides=[*TINY, "teacher.source=timm", "teacher.model.arch=resnet10t",
                                 f"teacher.weights={tmp_path / 'resnet10t.safetensors'}", "teacher.image_size=32",
                                 "teacher.finetune.mode=head", "teacher.finetune.steps=40",
                                 "teacher.finetune.optimizer.lr=0.1", "teacher.finetune.augment=false"])
    [source] = sources.preflight(cfg)
    assert source.kind == "timm" and source.spec["input_shape"] == [3, 32, 32]
    prepared = data_stage.prepare(cfg.data)
    ctx = TeacherContext.from_config(cfg, prepared)
    outcome = obtain_teacher(ctx)
    assert isinstance(outcome.model, Adapted) and outcome.result.curve["train_loss"]
    tuned = outcome.model.model.state_dict()
    body = [k for k in tuned if not k.startswith("fc.") and "running" not in k and "num_batches" not in k]
    assert body and all(torch.equal(tuned[k], net.state_dict()[k]) for k in body)
    acc = evaluate(outcome.model, prepared.x("test"), prepared.y("test"), 10).accuracy
    assert acc > 0.3  # chance is 0.1: the new head learned on the random body's features
    assert cached_teacher(ctx.teacher_folder, prepared).cached  # the fine-tuned teacher is cached by weights + settings
