"""Weights you bring: a registered model, a safetensors file, or a torchvision/timm network
with its weights, as the teacher (``teacher.source``), the student's start
(``student.init``) or the few-shot model's (``fewshot.init``).

Every source is resolved before any work: the reference must resolve, the spec must
match the tensors, and the network must take the input the data can give; anything else
raises :class:`SourceError` (the CLI exits 2).  A resolved source is copied once into the
project home (``cache/sources/<sha>``: ``model.safetensors``, ``spec.json``,
``source.json``), so torchrun workers read a local folder and never the registry.
Nothing is unpickled: ``.pt``/``.pth`` files are read with ``weights_only=True`` and
must hold a plain dict of tensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from models.external import IMAGENET_MEAN, IMAGENET_STD, head_classes, head_parameter_names, replace_head, split_name
from models.normalize import adapt_input
from models.registry import build_model, count_parameters
from models.weights import load_weights, save_weights
from pipelines.common.home import cache_dir, cache_key, sha256_of
from pipelines.config.errors import ConfigError
from pipelines.config.pipeline import PipelineConfig, dataset_shape
from pipelines.config.sources import REGISTRY_URI
from pipelines.config.students import StudentConfig
from pipelines.config.teacher import TeacherConfig, teacher_input_shape
from pipelines.data.readers import source_size

TENSOR_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
SPEC_KEYS = ("arch", "input_shape", "num_classes")


class SourceError(ConfigError):
    """A weights source that cannot be used, found before any work started."""


@dataclass(frozen=True)
class WeightsSource:
    """A resolved source, materialised in ``folder`` (spec.json + model.safetensors)."""

    role: str  # teacher | student.init | fewshot.init
    kind: str  # registry | file | torchvision | timm
    uri: str  # as the user gave it
    version: str  # the registry version it resolved to ("" otherwise)
    sha256: str  # of the weights as given (the file, or the registered model.safetensors)
    folder: Path

    @property
    def spec(self) -> dict:
        return json.loads((self.folder / "spec.json").read_text())

    def lineage(self) -> dict[str, str]:
        """MLflow params/tags naming exactly which weights were used."""
        spec = self.spec
        return {f"{self.role}.source": self.kind, f"{self.role}.uri": self.uri, f"{self.role}.version": self.version,
                f"{self.role}.sha256": self.sha256, f"{self.role}.arch": spec["arch"],
                f"{self.role}.input_shape": "x".join(map(str, spec["input_shape"]))}

    def load(self) -> tuple[nn.Module, dict]:
        model, spec = load_weights(self.folder)
        return model.train(), spec  # a starting point for training

    @classmethod
    def from_folder(cls, folder: Path) -> WeightsSource:
        """A materialised source (what torchrun workers are handed)."""
        meta = json.loads((Path(folder) / "source.json").read_text())
        return cls(**{**meta, "folder": Path(folder)})


# ---------------------------------------------------------------- reading weights

def _convert_hint(path: Path) -> str:
    return (f"convert a file you trust with: python -c \"import torch; from safetensors.torch import save_file; "
            f"m = torch.load('{path}', weights_only=False); "
            f"save_file({{k: v.contiguous() for k, v in getattr(m, 'state_dict', lambda: m)().items()}}, "
            f"'{path.with_suffix('.safetensors')}')\"")


def read_tensors(path: Path, label: str) -> dict[str, torch.Tensor]:
    """A plain name -> tensor dict from a safetensors or ``.pt``/``.pth`` file; anything
    that would need unpickling code is refused."""
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"{label}: no such file {path}")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise SourceError(f"{label}: {path} is not a valid safetensors file ({exc})") from None
    if path.suffix not in TENSOR_SUFFIXES:
        raise SourceError(f"{label}: {path.name}: use a .safetensors file (or a .pt/.pth dict of tensors)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - the unpickler's refusal, whatever its type
        raise SourceError(f"{label}: {path} is a pickle that weights_only=True refuses to load "
                          f"({type(exc).__name__}); it is not read. {_convert_hint(path)}") from None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SourceError(f"{label}: {path} holds {type(state).__name__}, not a plain dict of tensors; "
                          f"{_convert_hint(path)}")
    return state


def _verified_model(spec: dict, state: dict[str, torch.Tensor], label: str) -> nn.Module:
    """The network of ``spec`` with ``state`` loaded strictly, and one forward pass of the
    spec's input: a spec that does not match the file, or an input the architecture
    cannot take, is a :class:`SourceError`."""
    missing = [k for k in SPEC_KEYS if k not in spec]
    if missing:
        raise SourceError(f"{label}: its spec lacks {', '.join(missing)} (needs {', '.join(SPEC_KEYS)})")
    try:
        model = build_model(spec["arch"], tuple(spec["input_shape"]), spec["num_classes"], **spec.get("kwargs", {}))
    except (TypeError, ValueError, RuntimeError) as exc:
        raise SourceError(f"{label}: its spec's architecture {spec['arch']!r} cannot be built: {exc}") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).split("\n\t", 3)
        raise SourceError(f"{label}: the spec ({spec['arch']}, {spec['num_classes']} classes) does not match the "
                          f"weights: {' '.join(first[1:3])[:600]}") from None
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(2, *spec["input_shape"]))
    except (RuntimeError, ValueError) as exc:
        raise SourceError(f"{label}: {spec['arch']} cannot take inputs of shape {spec['input_shape']}: "
                          f"{str(exc).splitlines()[0][:300]}") from None
    return model


def _materialise(role: str, kind: str, uri: str, version: str, sha: str, spec: dict, model: nn.Module) -> WeightsSource:
    key = cache_key(None, sha=sha, spec=spec)
    folder = cache_dir("sources") / key
    if not (folder / "model.safetensors").is_file():
        save_weights(model, folder, spec)
    meta = {"role": role, "kind": kind, "uri": uri, "version": version, "sha256": sha}
    (folder / "source.json").write_text(json.dumps(meta, indent=2))
    return WeightsSource(**meta, folder=folder)


# ---------------------------------------------------------------- the four kinds

def _spec_beside(path: Path, label: str) -> dict:
    candidates = [path / "spec.json"] if path.is_dir() else [path.with_suffix(".json"), path.parent / "spec.json"]
    for candidate in candidates:
        if candidate.is_file():
            try:
                spec = json.loads(candidate.read_text())
            except json.JSONDecodeError as exc:
                raise SourceError(f"{label}: {candidate} is not valid JSON ({exc})") from None
            if not isinstance(spec, dict):
                raise SourceError(f"{label}: {candidate} must hold a JSON object")
            return spec
    raise SourceError(f"{label}: no spec beside {path} (looked for {', '.join(str(c) for c in candidates)}); "
                      f"it names arch, kwargs, input_shape, num_classes, mean and std")


def _weights_in(path: Path, label: str) -> Path:
    if not path.exists():
        raise SourceError(f"{label}: no such file or folder {path}")
    if path.is_dir():
        found = [p for p in sorted(path.iterdir()) if p.suffix in (".safetensors", *TENSOR_SUFFIXES)]
        if not found:
            raise SourceError(f"{label}: {path} holds no model.safetensors")
        return path / "model.safetensors" if (path / "model.safetensors").is_file() else found[0]
    return path


def _from_file(role: str, uri: str, label: str) -> WeightsSource:
    path = Path(uri).expanduser()
    weights = _weights_in(path, label)
    spec = _spec_beside(path, label)
    model = _verified_model(spec, read_tensors(weights, label), label)
    return _materialise(role, "file", str(path.resolve()), "", sha256_of(weights), _complete(spec), model)


def _from_registry(role: str, uri: str, label: str) -> WeightsSource:
    from pipelines import tracking

    name, alias, version = REGISTRY_URI.match(uri).groups()
    try:
        found = tracking.resolve_version(name, alias=alias, version=version)
    except tracking.VersionNotFound as exc:
        raise SourceError(f"{label}: {uri} does not resolve: {exc}") from None
    run_id = found["tags"].get("source_run_id") or found["run_id"]
    try:
        folder = tracking.download_artifacts(run_id, "weights")
    except Exception as exc:  # noqa: BLE001 - MLflow raises several types for a missing artifact
        raise SourceError(f"{label}: {uri} (version {found['version']}) has no weights artifact in run {run_id}: "
                          f"{exc}") from None
    try:
        weights = _weights_in(folder, label)
        spec = _spec_beside(folder, label)
        model = _verified_model(spec, read_tensors(weights, label), label)
        sha = sha256_of(weights)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return _materialise(role, "registry", uri, found["version"], sha, _complete(spec), model)


def _named_weights(library: str, arch: str, weights: str, label: str) -> dict[str, torch.Tensor]:
    """The library's own pretrained weights (downloads: needs internet)."""
    try:
        if library == "torchvision":
            import torchvision

            enum = torchvision.models.get_model_weights(arch)
            if weights not in enum.__members__:
                raise SourceError(f"{label}: {arch} has no weights {weights!r} (no such file either); "
                                  f"named weights: {', '.join(enum.__members__)}")
            return enum[weights].get_state_dict(progress=False)
        if weights != "pretrained":
            raise SourceError(f"{label}: {weights!r} is neither a file nor 'pretrained'")
        import timm

        return timm.create_model(arch, pretrained=True).state_dict()
    except SourceError:
        raise
    except Exception as exc:  # noqa: BLE001 - no network, hub errors...
        raise SourceError(f"{label}: {library} weights {weights!r} for {arch} could not be fetched ({exc}); "
                          f"on a machine without internet pass a local weights file") from None


def _from_library(role: str, arch: str, weights: str, input_shape: tuple[int, ...], mean: list[float] | None,
                  std: list[float] | None, label: str) -> WeightsSource:
    library, name = split_name(arch)
    path = Path(weights).expanduser()
    if path.is_file() or path.suffix in (".safetensors", *TENSOR_SUFFIXES) or os.sep in weights:
        state, sha, uri = read_tensors(path, label), sha256_of(path), str(path.resolve())
    else:
        state = _named_weights(library, name, weights, label)
        sha = hashlib.sha256(b"".join(v.cpu().numpy().tobytes() for v in state.values())).hexdigest()
        uri = f"{library}:{name}:{weights}"
    probe = build_model(arch, tuple(input_shape), 1000 if library == "torchvision" else 1)
    try:
        classes = head_classes(state, probe)
    except (KeyError, ValueError) as exc:
        raise SourceError(f"{label}: {path.name} does not hold {arch} weights: {exc}") from None
    default_mean, default_std = (IMAGENET_MEAN, IMAGENET_STD) if input_shape[0] == 3 else ([0.5], [0.5])
    spec = {"arch": arch, "kwargs": {}, "input_shape": list(input_shape), "num_classes": classes,
            "mean": mean or default_mean, "std": std or default_std, "class_names": None}
    return _materialise(role, library, uri, "", sha, spec, _verified_model(spec, state, label))


def _complete(spec: dict) -> dict:
    channels = spec["input_shape"][0]
    return {"kwargs": {}, "mean": [0.0] * channels, "std": [1.0] * channels, "class_names": None, **spec}


# ---------------------------------------------------------------- resolution, once per process

_resolved: dict[tuple, WeightsSource] = {}


def resolve(role: str, kind: str, location: str, arch: str, input_shape: tuple[int, ...],
            mean: list[float] | None = None, std: list[float] | None = None) -> WeightsSource:
    """Resolve and materialise one source (memoised: the flow and the CLI's pre-flight
    check share it, so ``@alias`` means one version for the whole run)."""
    key = (role, kind, location, arch, tuple(input_shape), tuple(mean or ()), tuple(std or ()))
    if key not in _resolved or not _resolved[key].folder.is_dir():
        label = f"{role} ({kind} {location})"
        if kind == "registry":
            _resolved[key] = _from_registry(role, location, label)
        elif kind == "file":
            _resolved[key] = _from_file(role, location, label)
        else:
            _resolved[key] = _from_library(role, arch, location, input_shape, mean, std, label)
    return _resolved[key]


def teacher_source(teacher: TeacherConfig, data_shape: tuple[int, ...]) -> WeightsSource | None:
    """The brought teacher's weights for data of ``data_shape``, or None for one trained here."""
    if not teacher.brought():
        return None
    location = teacher.weights if teacher.source in ("torchvision", "timm") else teacher.uri
    return resolve("teacher", teacher.source, location, teacher.model.arch, teacher_input_shape(teacher, data_shape),
                   teacher.mean, teacher.std)


def init_source(role: str, kind: str, location: str | None, arch: str, input_shape: tuple[int, ...]) -> WeightsSource | None:
    if kind == "scratch":
        return None
    return resolve(role, kind, location, arch, input_shape)


def student_source(student: StudentConfig, data_shape: tuple[int, ...]) -> WeightsSource | None:
    return init_source("student.init", student.init, student.init_uri, student.model.arch, data_shape)


# ---------------------------------------------------------------- fitting a source to the data

def check_teacher(source: WeightsSource, teacher: TeacherConfig, student: StudentConfig, data_shape: tuple[int, ...],
                  classes: int, dataset: str) -> None:
    """The brought teacher can serve this data (``dataset``'s): its input, its classes, and
    its size beside the student's."""
    spec, label = source.spec, f"teacher ({source.kind} {source.uri})"
    if spec["input_shape"][0] < data_shape[0]:
        raise SourceError(f"{label} takes {spec['input_shape'][0]}-channel images; the data has {data_shape[0]} "
                          f"channels")
    if len(spec["mean"]) != spec["input_shape"][0] or len(spec["std"]) != spec["input_shape"][0]:
        raise SourceError(f"{label}: mean/std have {len(spec['mean'])}/{len(spec['std'])} values for "
                          f"{spec['input_shape'][0]} channels")
    if teacher.finetune.mode == "none":
        if spec["num_classes"] != classes:
            raise SourceError(f"{label} predicts {spec['num_classes']} classes; {dataset} has {classes}: "
                              f"set teacher.finetune.mode=head (or all) to give it a new head")
    if student.must_be_smaller:
        model, _ = source.load()
        teacher_params = count_parameters(model)
        student_model = build_model(student.model.arch, data_shape, classes, **student.model.kwargs)
        if count_parameters(student_model) > teacher_params:
            raise SourceError(f"student.model has {count_parameters(student_model):,} parameters, more than the "
                              f"{label}'s {teacher_params:,}; shrink it or set student.must_be_smaller=false")


def check_init(source: WeightsSource, model_key: str, arch: str, kwargs: dict, input_shape: tuple[int, ...]) -> None:
    """The student (or few-shot model) can start from these weights: same network, same input."""
    spec, label = source.spec, f"{source.role} ({source.kind} {source.uri})"
    if spec["arch"] != arch or dict(spec.get("kwargs", {})) != dict(kwargs):
        raise SourceError(f"{label} holds {spec['arch']} with {spec.get('kwargs', {})}; {model_key} is {arch} with "
                          f"{kwargs}: set {model_key} to match the weights")
    if tuple(spec["input_shape"]) != tuple(input_shape):
        raise SourceError(f"{label} was made for inputs {spec['input_shape']}; this data gives {list(input_shape)}")


def preflight(cfg: PipelineConfig, classes: int | None = None) -> list[WeightsSource]:
    """Resolve and check every source of ``cfg`` before any work (``metadistill run``): the
    CLI's entry, before any data is prepared (the shapes come from the data section; an
    image folder's ``classes`` from its folders, listed here when not given)."""
    shape, classes = dataset_shape(cfg.data, classes)
    if classes is None:
        classes = source_size(cfg.data)[2]
    found = []
    if (teacher := teacher_source(cfg.teacher, shape)) is not None:
        check_teacher(teacher, cfg.teacher, cfg.student, shape, classes, cfg.data.name)
        found.append(teacher)
    if (init := student_source(cfg.student, shape)) is not None:
        check_init(init, "student.model", cfg.student.model.arch, cfg.student.model.kwargs, shape)
        found.append(init)
    return found


def start_from(source: WeightsSource, num_classes: int, seed: int) -> tuple[nn.Module, list[str]]:
    """The source's network with a fresh head (seeded) where its classes are not
    ``num_classes``, and its head's parameter names."""
    model, spec = source.load()
    if spec["num_classes"] != num_classes:
        torch.manual_seed(seed)
        return model, replace_head(model, num_classes)
    return model, head_parameter_names(model)


def brought_spec(source: WeightsSource, num_classes: int, class_names: list[str], data_key: str) -> dict:
    """The spec a brought (and perhaps re-headed) teacher is saved with: its own input."""
    spec = source.spec
    return {**spec, "num_classes": num_classes,
            "class_names": class_names if num_classes != spec["num_classes"] or not spec.get("class_names")
            else spec["class_names"], "data_key": data_key, "lineage": source.lineage()}


def fed_by_data(model: nn.Module, spec: dict, data) -> nn.Module:
    """``model`` fed from the prepared data's tensors (see ``models.normalize.Adapted``)."""
    return adapt_input(model, spec, data.input_shape, data.mean, data.std)
