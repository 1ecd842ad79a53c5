"""Serving, promotion, export and unsafe-artifact refusal against a real MLflow store and
registry and a real `metadistill serve` process over HTTP on 127.0.0.1."""

from __future__ import annotations

import base64
import io
import json
import os
import pickle
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from deploy.registry import ModelLoadError, load_folder, load_registered
from models import build_model
from models.normalize import Normalized
from models.weights import save_weights
from pipelines import tracking
from pipelines.common.home import project_home
from pipelines.common.net import outward_address
from pipelines.register.promotion import promote, rollback
from pipelines.register.student import cost_tags
from tests.helpers import free_port

NAME = "serve-test-student"
SPEC = {"arch": "mlp", "kwargs": {"hidden": [16]}, "input_shape": [1, 8, 8], "num_classes": 10,
        "class_names": [str(i) for i in range(10)], "mean": [0.3], "std": [0.4], "data_key": "k1"}


# v2's cost card, in its tags as the pipeline writes them (v1 was registered before the cost tags)
CARD = {"parameters": 1210, "macs": 1184, "size_bytes": 5128,
        "latency_b1": {"median_ms": 0.08, "spread_pct": 5.0, "calls": 200, "repeats": 5, "batch": 1},
        "latency_b64": {"median_ms": 0.2, "spread_pct": 3.0, "calls": 200, "repeats": 5, "batch": 64}}


def register_tiny(seed: int, test_acc: float, alias: str | None, arch: str = "mlp", kwargs: dict | None = None,
                  tags: dict | None = None) -> str:
    """A version of ``arch`` on SPEC's inputs and classes, registered without the pipeline."""
    spec = {**SPEC, "arch": arch, "kwargs": SPEC["kwargs"] if kwargs is None else kwargs}
    torch.manual_seed(seed)
    model = build_model(arch, (1, 8, 8), 10, **spec["kwargs"]).eval()
    with tracking.pipeline_run("serve-test", f"tiny-{seed}", {}) as run:
        folder = project_home() / "staging" / run.run_id
        save_weights(model, folder, spec)
        uri = tracking.log_student_model(run, Normalized(model, SPEC["mean"], SPEC["std"]).eval(),
                                         np.random.rand(2, 1, 8, 8).astype(np.float32), folder)
        reg = tracking.register_model(uri, NAME, alias, {"test_acc": test_acc, "data_key": "k1", "source_run_id": run.run_id,
                                                   "method": "kd", **(tags or {})})
    return reg.version


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    home = tmp_path_factory.mktemp("serve-home")
    old = os.environ.get("METADISTILL_HOME")
    os.environ["METADISTILL_HOME"] = str(home)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    v1 = register_tiny(1, 0.90, "champion")
    v2 = register_tiny(2, 0.80, "challenger", tags=cost_tags(CARD))
    yield {"home": home, "v1": v1, "v2": v2}
    if old is None:
        os.environ.pop("METADISTILL_HOME", None)
    else:
        os.environ["METADISTILL_HOME"] = old


def request(port, path, body=None, ctype="application/json", raw: bytes | None = None, headers: dict | None = None,
            host: str = "127.0.0.1", full: bool = False):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    sent = {**({"content-type": ctype} if data is not None else {}), **(headers or {})}
    req = urllib.request.Request(f"http://{host}:{port}{path}", data=data, headers=sent)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            status, answer, got = resp.status, json.loads(resp.read()), resp.headers
    except urllib.error.HTTPError as err:
        status, answer, got = err.code, json.loads(err.read()), err.headers
    return (status, answer, got) if full else (status, answer)


@pytest.fixture(scope="module")
def server(registry):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "serve", "--model", NAME, "--port", str(port),
                             "--poll-seconds", "1", "--max-body-bytes", "200000"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=os.environ.copy())
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if request(port, "/ready")[0] == 200:
                break
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.3)
        if proc.poll() is not None:
            raise RuntimeError(proc.stdout.read().decode())
    yield port
    proc.terminate()
    proc.wait(timeout=20)


def reference(version: str):
    folder = tracking.download_artifacts(tracking.model_version(NAME, version)["tags"]["source_run_id"], "weights")
    return load_folder(folder)[0]


def test_predict_and_invocations_match_the_model(registry, server):
    x = np.random.default_rng(0).random((3, 1, 8, 8)).astype(np.float32)
    status, out = request(server, "/predict", {"instances": x.tolist()})
    assert status == 200 and out["model"]["version"] == registry["v1"]
    with torch.no_grad():
        logits = reference(registry["v1"])(torch.from_numpy(x))
    assert out["predictions"] == logits.argmax(-1).tolist()
    assert np.allclose(out["probabilities"], logits.softmax(-1).numpy(), atol=1e-5)
    status, inv = request(server, "/invocations", {"inputs": x.tolist()})
    assert status == 200 and np.allclose(inv["predictions"], logits.numpy(), atol=1e-4)
    # [batch, H, W] for one channel and flat rows are accepted too
    assert request(server, "/predict", {"instances": x[:, 0].tolist()})[1]["predictions"] == out["predictions"]
    assert request(server, "/predict", {"instances": x.reshape(3, -1).tolist()})[1]["predictions"] == out["predictions"]


def test_base64_png(registry, server):
    from PIL import Image

    pixels = (np.random.default_rng(1).random((8, 8)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    status, out = request(server, "/predict", {"images_b64": [base64.b64encode(buf.getvalue()).decode()]})
    assert status == 200 and len(out["predictions"]) == 1 and abs(sum(out["probabilities"][0]) - 1) < 1e-5
    with torch.no_grad():  # the PNG's pixels, scaled to [0, 1], through the registered weights
        logits = reference(registry["v1"])(torch.from_numpy(pixels / np.float32(255))[None, None].float())
    assert out["predictions"] == logits.argmax(-1).tolist()
    assert np.allclose(out["probabilities"], logits.softmax(-1).numpy(), atol=1e-5)


def test_inputs_outside_the_pixel_range_get_422_naming_it(server):
    from sklearn.datasets import load_digits

    raw = load_digits().images[:20]  # 0-16, where the model reads [0, 1]
    status, out = request(server, "/predict", {"instances": raw.tolist()})
    assert status == 422 and "[0, 1]" in out["error"] and "[0, 16]" in out["error"]
    status, out = request(server, "/invocations", {"inputs": (-np.ones((1, 1, 8, 8))).tolist()})
    assert status == 422 and "[-1, -1]" in out["error"]
    assert request(server, "/predict", {"instances": (raw / 16).tolist()})[0] == 200
    assert request(server, "/metadata")[1]["input_range"] == [0.0, 1.0]


def test_metadata_health(registry, server):
    assert request(server, "/health") == (200, {"status": "ok"})
    status, meta = request(server, "/metadata")
    assert status == 200 and meta["model"] == NAME and meta["input_shape"] == [1, 8, 8]
    assert meta["test_metrics"]["test_acc"] == 0.9 and meta["class_names"][3] == "3"
    # what it is and what it costs: v1 has no cost tags, so what the loaded model says
    assert meta["arch"] == "mlp" and meta["kwargs"] == {"hidden": [16]}
    folder = tracking.download_artifacts(tracking.model_version(NAME, registry["v1"])["tags"]["source_run_id"], "weights")
    assert meta["cost"] == {"parameters": 1210, "macs": None, "latency_b1": None, "latency_b64": None,
                            "size_bytes": (folder / "model.safetensors").stat().st_size}
    tagged = load_registered(NAME, "challenger").metadata  # v2: the card its registration measured
    assert tagged["cost"]["macs"] == 1184 and tagged["cost"]["latency_b1"] == {"median_ms": 0.08, "spread_pct": 5.0,
                                                                               "batch": 1}


@pytest.mark.parametrize("body,ctype,raw,status,message", [
    ({"instances": [[[1.0] * 8] * 7]}, "application/json", None, 400, "expected [batch, 1, 8, 8]"),
    ({"instances": [["a"] * 64]}, "application/json", None, 400, "nested array of numbers"),
    ({"instances": [[1e39] * 64]}, "application/json", None, 400, "NaN or infinite"),
    (None, "application/json", b'{"instances": [[NaN]]}', 400, "not valid JSON"),
    ({"instances": []}, "application/json", None, 400, "expected"),
    ({"instances": np.zeros((0, 64)).tolist()}, "application/json", None, 400, "expected"),
    ({"instances": [[0.0] * 64] * 300}, "application/json", None, 413, "exceed the limit"),
    ({"instances": [[0.0] * 64]}, "text/plain", None, 415, "content-type"),
    ({"images_b64": ["!!!not base64"]}, "application/json", None, 400, "not valid base64"),
    ({"images_b64": [base64.b64encode(b"not an image").decode()]}, "application/json", None, 400, "PNG or JPEG"),
    ({"instances": [[0.0] * 64], "extra": 1}, "application/json", None, 400, "unknown field"),
    (None, "application/json", b"{broken", 400, "not valid JSON"),
    (None, "application/json", b"[1, 2]", 400, "JSON object"),
])
def test_bad_input_gets_4xx_and_server_survives(server, body, ctype, raw, status, message):
    got, out = request(server, "/predict", body, ctype=ctype, raw=raw)
    assert got == status and message in out["error"]
    assert request(server, "/health")[0] == 200


def test_oversized_payload_and_bad_routes(server):
    big = json.dumps({"instances": [[0.123456789012] * 64] * 250}).encode()
    assert len(big) > 200_000  # the limit set above
    status, out = request(server, "/predict", raw=big)
    assert status == 413 and "body" in out["error"]
    assert request(server, "/nope")[0] == 404
    assert request(server, "/predict")[0] == 405
    status, out = request(server, "/invocations", {"dataframe_split": {}})
    assert status == 400 and "tensor input" in out["error"]


@pytest.mark.parametrize("chunked", [False, True])
def test_oversized_body_sent_whole_before_reading_gets_its_413(server, chunked):
    """urllib writes the whole body before it reads the answer; an 8 MB body (40x the
    limit, far past the socket buffers) must still see the 413, not a connection reset."""
    big = b'{"instances": [' + b"0.5," * 2_000_000 + b"0.5]}"
    body = iter([big[i:i + 65536] for i in range(0, len(big), 65536)]) if chunked else big
    status, out = request(server, "/predict", raw=body)
    assert status == 413 and "exceeds the limit" in out["error"]
    assert request(server, "/health")[0] == 200


def test_concurrent_requests_and_hot_swap_on_promotion(registry, server):
    # A different input per request, so a row answered to the wrong request would show.
    xs = np.random.default_rng(2).random((240, 1, 1, 8, 8)).astype(np.float32)
    models = {v: reference(registry[v]) for v in ("v1", "v2")}
    with torch.no_grad():
        expected = {registry[v]: m(torch.from_numpy(xs[:, 0])).softmax(-1).numpy() for v, m in models.items()}

    def hit(i):
        return i, *request(server, "/predict", {"instances": xs[i].tolist()})

    with ThreadPoolExecutor(8) as pool:
        before = list(pool.map(hit, range(40)))
        promote(NAME, registry["v2"], reason="test swap")
        during = list(pool.map(hit, range(40, 240)))
    assert all(s == 200 for _, s, _ in before + during)
    for i, _, out in before + during:  # each answer is its own input's, from the version it names
        assert np.allclose(out["probabilities"][0], expected[out["model"]["version"]][i], atol=1e-5), i
    assert {out["model"]["version"] for _, _, out in before} == {registry["v1"]}
    deadline = time.time() + 30
    while request(server, "/metadata")[1]["version"] != registry["v2"] and time.time() < deadline:
        time.sleep(0.3)
    assert request(server, "/metadata")[1]["version"] == registry["v2"]
    assert hit(0)[2]["model"]["version"] == registry["v2"]
    rollback(NAME, reason="test rollback")


def served_version(port: int, version: str, timeout: float = 30) -> str:
    """The version ``port`` serves once it is ``version`` (or ``timeout`` seconds have passed)."""
    deadline = time.time() + timeout
    while (served := request(port, "/metadata")[1]["version"]) != version and time.time() < deadline:
        time.sleep(0.3)
    return served


def test_a_champion_of_another_architecture_is_hot_reloaded(registry, server):
    """Architectures vary from run to run: the server runs the MLP champion, a CIFAR ResNet
    on the same inputs and classes is promoted, and the next poll serves it."""
    assert served_version(server, registry["v1"]) == registry["v1"]  # after the rollback above
    resnet = register_tiny(3, 0.95, None, arch="resnet8", kwargs={"base_width": 4})
    promote(NAME, resnet, reason="another architecture")
    assert served_version(server, resnet) == resnet
    status, meta = request(server, "/metadata")
    assert status == 200 and meta["version"] == resnet and meta["input_shape"] == [1, 8, 8]
    x = np.random.default_rng(5).random((4, 1, 8, 8)).astype(np.float32)
    status, out = request(server, "/predict", {"instances": x.tolist()})
    model = reference(resnet)
    assert type(model.model).__name__ == "CifarResNet"
    with torch.no_grad():
        logits = model(torch.from_numpy(x))
    assert status == 200 and out["model"]["version"] == resnet
    assert np.asarray(out["probabilities"]).shape == (4, 10)
    assert out["predictions"] == logits.argmax(-1).tolist()
    assert np.allclose(out["probabilities"], logits.softmax(-1).numpy(), atol=1e-5)
    rollback(NAME, reason="back to the MLP")  # the tests below start from v1
    assert served_version(server, registry["v1"]) == registry["v1"]


def test_int8_of_a_version_without_one_is_refused_exit_2(registry, tmp_path, capsys):
    from pipelines.cli import main

    code = main(["serve", "--model", NAME, "--variant", "int8", "--port", str(free_port())])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "predates int8" in err[-1] and "metadistill run" in err[-1], err
    code = main(["serve", "--model", NAME, "--variant", "int8", "--device", "cuda"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "runs on the CPU only" in err[-1], err
    code = main(["export", "--format", "torchscript", "--variant", "int8", "--model", NAME,
                 "--out", str(tmp_path / "s.pt")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "predates int8" in err[0], err
    code = main(["export", "--format", "onnx", "--variant", "int8", "--model", NAME, "--out", str(tmp_path / "s.onnx")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--format torchscript --variant int8" in err[0], err
    assert not list(tmp_path.iterdir())


def start_server(*args: str, headers: dict | None = None) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "serve", "--model", NAME, "--port", str(port), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=os.environ.copy())
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if request(port, "/ready", headers=headers)[0] == 200:
                return proc, port
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.3)
        if proc.poll() is not None:
            raise RuntimeError(proc.stdout.read().decode())
    raise TimeoutError("serve did not get ready")


def test_a_token_guards_every_route_but_health_even_beyond_loopback(registry, tmp_path):
    """``--token-file``: without the header, with a wrong token, a lower-case scheme or two
    headers, every route but /health answers 401 and says how to authenticate; with it,
    the routes work.  Bound to 0.0.0.0, the check holds on this machine's own network
    address too, not only on loopback."""
    from pipelines.common.secrets import made_secret

    token = made_secret(tmp_path / "token")
    right = {"authorization": f"Bearer {token}"}
    proc, port = start_server("--token-file", str(tmp_path / "token"), "--host", "0.0.0.0", "--poll-seconds", "0",
                              headers=right)
    try:
        x = {"instances": np.zeros((1, 1, 8, 8)).tolist()}
        for host in ("127.0.0.1", *filter(None, [outward_address()])):
            for wrong in ({}, {"authorization": f"Bearer {token[:-1]}x"}, {"authorization": f"bearer {token}"},
                          {"authorization": token}, {"authorization": "Basic " + base64.b64encode(
                              f"admin:{token}".encode()).decode()}):
                for path, body in (("/ready", None), ("/metadata", None), ("/predict", x), ("/invocations", x),
                                   ("/nowhere", None)):
                    status, answer, got = request(port, path, body, headers=wrong, host=host, full=True)
                    assert status == 401 and "bearer token" in answer["error"], (host, path, wrong, status)
                    assert got["www-authenticate"].startswith("Bearer")
            assert request(port, "/health", host=host) == (200, {"status": "ok"})  # a liveness probe needs none
            assert request(port, "/predict", x, headers=right, host=host)[0] == 200
            assert request(port, "/metadata", headers=right, host=host)[1]["version"] == registry["v1"]
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.putrequest("GET", "/ready")
        conn.putheader("Authorization", "Bearer nope")  # a wrong one and the right one: refused, not picked from
        conn.putheader("Authorization", f"Bearer {token}")
        conn.endheaders()
        assert conn.getresponse().status == 401
        conn.close()
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert token not in proc.stdout.read().decode()


def test_a_request_fuzzer_gets_no_5xx_from_a_guarded_server(registry, tmp_path):
    from benchmarks.team_auth import SERVE, fuzz
    from pipelines.common.secrets import made_secret

    token = made_secret(tmp_path / "token")
    right = {"authorization": f"Bearer {token}"}
    proc, port = start_server("--token-file", str(tmp_path / "token"), "--poll-seconds", "0", headers=right)
    try:
        rows = fuzz(f"http://127.0.0.1:{port}", [e[2] for e in SERVE] + ["/health"], right, 120, seed=2)
        assert not [r for r in rows if r["status"] >= 500], [r for r in rows if r["status"] >= 500][:5]
        assert sum(r["status"] == 401 for r in rows) >= 20 and sum(r["status"] in (400, 405, 413, 415) for r in rows)
        assert request(port, "/health") == (200, {"status": "ok"})
        x = {"instances": np.zeros((1, 1, 8, 8)).tolist()}
        assert request(port, "/predict", x, headers=right)[0] == 200
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_serving_beyond_loopback_without_a_token_exits_2(registry, tmp_path):
    """``--host 0.0.0.0`` without ``--token-file`` is refused before anything loads or
    listens (exit 2, naming the flag); so is a token file others can read."""
    port = free_port()
    done = subprocess.run([sys.executable, "-m", "pipelines.cli", "serve", "--model", NAME, "--host", "0.0.0.0",
                           "--port", str(port)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--token-file" in done.stderr and "Traceback" not in done.stderr, done.stderr
    loose = tmp_path / "loose"
    loose.write_text("a-token")
    loose.chmod(0o644)
    done = subprocess.run([sys.executable, "-m", "pipelines.cli", "serve", "--model", NAME, "--token-file", str(loose),
                           "--port", str(port)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and f"chmod 600 {loose}" in done.stderr, done.stderr
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)


def test_int8_variant_is_served_and_kept_across_reloads(registry):
    """The registry holds float weights only; a version whose run kept its int8 variant
    (the tags the pipeline writes) is served quantized, and a reload stays int8: an alias
    moved to a version without one is not swapped in."""
    from models.quantize import quantize_int8

    kept = {"int8.kept": "true", "int8.test_acc": "0.900000", "int8.reason": "within the margin"}
    first = register_tiny(4, 0.90, None, tags=kept)
    tracking.set_alias(NAME, "int8-test", first, {})
    proc, port = start_server("--alias", "int8-test", "--variant", "int8", "--poll-seconds", "0.5")
    try:
        status, meta = request(port, "/metadata")
        assert status == 200 and meta["variant"] == "int8" and meta["variants"] == ["float", "int8"]
        assert meta["int8"]["test_acc"] == 0.9 and "convolutions stay float" in meta["int8"]["quantized"]
        x = np.random.default_rng(6).random((5, 1, 8, 8)).astype(np.float32)
        with torch.no_grad():  # the same batch through the same quantized model: the same activation scale
            int8 = quantize_int8(reference(first))(torch.from_numpy(x))
            floats = reference(first)(torch.from_numpy(x))
        out = request(port, "/invocations", {"inputs": x.tolist()})[1]
        assert np.allclose(out["predictions"], int8.numpy(), atol=1e-5)
        assert not np.allclose(out["predictions"], floats.numpy(), atol=1e-5)  # it is not the float model
        tracking.set_alias(NAME, "int8-test", registry["v2"], {})  # no int8 variant: refused, still serving
        time.sleep(2)
        assert request(port, "/metadata")[1]["version"] == first
        second = register_tiny(5, 0.91, "int8-test", tags=kept)
        assert served_version(port, second) == second
        assert request(port, "/metadata")[1]["variant"] == "int8"
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    log = proc.stdout.read().decode()
    assert f"v{registry['v2']} predates int8" in log, log[-2000:]


def test_promote_and_rollback_record_who_when_why(registry):
    # (runs after the swap test, which ended with a rollback to v1)
    assert tracking.model_version_by_alias(NAME, "champion")["version"] == registry["v1"]
    info = promote(NAME, registry["v2"], reason="better calibrated")
    tags = tracking.model_version(NAME, registry["v2"])["tags"]
    assert tags["promotion_reason"] == "better calibrated" and tags["promoted_by"] and tags["promoted_at"]
    assert tags["previous_champion"] == registry["v1"] and float(tags["delta_vs_champion"]) == pytest.approx(-0.1)
    assert tracking.model_version_by_alias(NAME, "challenger")["version"] == registry["v1"]
    assert info["previous"] == registry["v1"]
    back = rollback(NAME, reason="regression")
    assert back["version"] == registry["v1"]
    assert tracking.model_version_by_alias(NAME, "champion")["version"] == registry["v1"]
    assert "rollback from v" in tracking.model_version(NAME, registry["v1"])["tags"]["promotion_reason"]
    with pytest.raises(ValueError, match="already the champion"):
        promote(NAME, registry["v1"], reason="again")


class Exploit:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickled_artifact_is_refused_not_executed(registry, tmp_path):
    sentinel = tmp_path / "pwned"
    with tracking.pipeline_run("serve-test", "evil", {}) as run:
        evil = tmp_path / "evil"
        evil.mkdir()
        (evil / "model.safetensors").write_bytes(pickle.dumps(Exploit(str(sentinel))))
        (evil / "spec.json").write_text(json.dumps(SPEC))
        run.log_artifact(evil / "model.safetensors", "weights")
        run.log_artifact(evil / "spec.json", "weights")
        only_pt = tmp_path / "only_pt"
        only_pt.mkdir()
        torch.save({"x": Exploit(str(sentinel))}, only_pt / "model.pt")
    c = tracking.client()
    version = c.create_model_version(NAME, f"runs:/{run.run_id}/weights",
                                     tags={"source_run_id": run.run_id}).version
    c.set_registered_model_alias(NAME, "evil", str(version))
    with pytest.raises(ModelLoadError, match="refused"):
        load_registered(NAME, "evil")
    with pytest.raises(ModelLoadError, match="refused"):
        load_folder(only_pt)
    assert not sentinel.exists()


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_matches_pytorch(registry, tmp_path, fmt):
    from deploy.export import export

    loaded = load_registered(NAME, "champion")
    path = export(loaded, fmt, tmp_path / f"student.{fmt}")
    x = np.random.default_rng(3).random((5, 1, 8, 8)).astype(np.float32)
    with torch.no_grad():
        expected = loaded.model(torch.from_numpy(x)).numpy()
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = session.run(None, {session.get_inputs()[0].name: x})[0]
        meta = {k: json.loads(v) for k, v in session.get_modelmeta().custom_metadata_map.items() if k in SIDE_KEYS}
    else:
        extra = {"metadistill.json": ""}
        got = torch.jit.load(str(path), _extra_files=extra)(torch.from_numpy(x)).detach().numpy()
        meta = json.loads(extra["metadistill.json"])
    assert np.allclose(got, expected, atol=1e-5)
    # what another stack needs to feed it travels with the file, and as JSON beside it
    side = json.loads((tmp_path / f"student.{fmt}.json").read_text())
    assert side["format"] == fmt and side["file"] == f"student.{fmt}"
    for found in (meta, side):
        assert set(found) >= SIDE_KEYS
        assert found["class_names"] == SPEC["class_names"] and found["input_shape"] == [1, 8, 8]
        assert found["input_range"] == [0.0, 1.0] and found["input_name"] == "pixels"
        assert found["normalisation"]["mean"] == SPEC["mean"] and found["normalisation"]["std"] == SPEC["std"]
        assert "inside the graph" in found["normalisation"]["applied"]
        assert found["model"] == NAME and found["version"] == loaded.version
        assert found["arch"] == "mlp" and found["cost"]["parameters"] == 1210


SIDE_KEYS = {"class_names", "input_shape", "input_range", "input_name", "normalisation", "model", "version", "arch",
             "kwargs", "cost"}


def test_onnx_file_matches_the_served_prediction(registry, server, tmp_path):
    import onnxruntime

    from deploy.export import export

    loaded = load_registered(NAME, "champion")
    path = export(loaded, "onnx", tmp_path / "served.onnx")
    deadline = time.time() + 30  # the server picks up the champion at its next poll
    while request(server, "/metadata")[1]["version"] != loaded.version and time.time() < deadline:
        time.sleep(0.3)
    x = np.random.default_rng(4).random((6, 1, 8, 8)).astype(np.float32)
    status, out = request(server, "/predict", {"instances": x.tolist()})
    assert status == 200 and out["model"]["version"] == loaded.version
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"pixels": x})[0]
    assert logits.argmax(-1).tolist() == out["predictions"]
    probabilities = np.exp(logits - logits.max(-1, keepdims=True))
    assert np.allclose(probabilities / probabilities.sum(-1, keepdims=True), out["probabilities"], atol=1e-5)
    names = json.loads(session.get_modelmeta().custom_metadata_map["class_names"])
    assert [names[i] for i in logits.argmax(-1)] == [SPEC["class_names"][p] for p in out["predictions"]]


def test_missing_onnxscript_is_one_line_exit_2(registry, tmp_path, monkeypatch, capsys):
    from pipelines.cli import main

    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as on an install without it
    code = main(["export", "--format", "onnx", "--model", NAME, "--out", str(tmp_path / "s.onnx")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "'onnxscript'" in err[0] and "pip install" in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "s.onnx").exists()


def _cli(registry, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "METADISTILL_HOME": str(registry["home"])}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], capture_output=True, text=True, env=env,
                          timeout=180)


def test_promote_rollback_and_export_as_commands(registry, tmp_path):
    champion = tracking.model_version_by_alias(NAME, "champion")["version"]
    other = registry["v2"] if champion == registry["v1"] else registry["v1"]
    out = _cli(registry, "promote", other, "--model", NAME, "--reason", "from the command line")
    assert out.returncode == 0, out.stderr[-2000:]
    assert tracking.model_version_by_alias(NAME, "champion")["version"] == other
    assert tracking.model_version(NAME, other)["tags"]["promotion_reason"] == "from the command line"
    again = _cli(registry, "promote", other, "--model", NAME)
    assert again.returncode == 1 and "already the champion" in again.stderr and "Traceback" not in again.stderr
    back = _cli(registry, "rollback", "--model", NAME, "--reason", "regression")
    assert back.returncode == 0, back.stderr[-2000:]
    assert tracking.model_version_by_alias(NAME, "champion")["version"] == champion
    twice = _cli(registry, "rollback", "--model", NAME)  # the restored champion records nothing before it
    assert twice.returncode == 1 and "nothing to roll back to" in twice.stderr
    missing = _cli(registry, "promote", "99", "--model", NAME)
    assert missing.returncode == 1 and "has no version 99" in missing.stderr
    exported = _cli(registry, "export", "--format", "onnx", "--model", NAME, "--out", str(tmp_path / "s.onnx"))
    assert exported.returncode == 0 and (tmp_path / "s.onnx").stat().st_size > 1000, exported.stderr[-2000:]
    assert str(tmp_path / "s.onnx.json") in exported.stdout and "metadata_props" in exported.stdout
    nobody = _cli(registry, "rollback", "--model", "nobody-student")
    assert nobody.returncode == 1 and len(nobody.stderr.strip().splitlines()) <= 2
