"""HTTP serving of a registered student: a small ASGI app on uvicorn.

Routes: ``POST /predict`` (JSON ``{"instances": nested arrays}`` or ``{"images_b64": [PNG/JPEG]}``;
returns class ids, class names and probabilities), ``POST /invocations`` (MLflow's scoring
protocol: ``{"inputs": ...}`` or ``{"instances": ...}``, returns ``{"predictions": logits}``),
``GET /health``, ``GET /ready``, ``GET /metadata``.

With a token (``token_file``, as ``metadistill serve --token-file`` gives it) every route but
``/health`` (a liveness probe that says nothing of the model) asks for ``Authorization:
Bearer <token>`` and answers 401 without it; the token is compared in constant time.

Concurrent requests are micro-batched: the batcher takes whatever is queued (up to
``max_batch`` rows, waiting at most ``max_wait_ms`` for more) and runs one forward pass.
A new ``champion`` is picked up by polling the registry (``poll_seconds``) or on SIGHUP:
the new model is loaded completely, then swapped in; batches already running finish on
the old one.  A server of the int8 variant stays int8: a new champion without a kept int8
variant is not swapped in (the error is logged).  Bad input is answered with a 4xx and a
message, never a crash.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import io
import json
import logging
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np
import orjson
import torch

from deploy.registry import LoadedModel, ModelLoadError, VariantUnavailable, load_registered
from models.forward import forward
from pipelines.common.secrets import read_secret

log = logging.getLogger("metadistill.serve")
ENV_CONFIG = "METADISTILL_SERVE_CONFIG"


# Rounding of pixels written as decimal text, not a licence for values outside [0, 1].
PIXEL_SLACK = 1e-6


@dataclass
class ServeConfig:
    model: str
    alias: str = "champion"
    max_batch: int = 64
    max_wait_ms: float = 1.0
    max_body_bytes: int = 1 << 20
    max_instances: int = 256
    poll_seconds: float = 30.0
    drain_bytes: int = 64 << 20  # read and discard this much of an oversized body before answering
    device: str = "cpu"  # "cuda": forward passes on the GPU (cuda:0)
    variant: str = "float"  # "int8": the version's int8 variant (deploy.registry.load_registered)
    token_file: str | None = None  # a file (mode 600) holding the bearer token; None: no authentication


def check_device(device: str, variant: str = "float") -> None:
    if device not in ("cpu", "cuda"):
        raise ValueError(f"serve device must be cpu or cuda, got {device!r}")
    if device == "cuda" and variant == "int8":
        raise VariantUnavailable("--variant int8 runs on the CPU only (dynamically quantized kernels have no CUDA "
                                 "version): drop --device cuda, or serve --variant float on the GPU")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"--device cuda, but this machine has no usable CUDA device "
                             f"(torch {torch.__version__}): serve on the CPU (the default)")


def placed(loaded: LoadedModel, device: str) -> LoadedModel:
    """``loaded`` with its model on ``device``."""
    loaded.model = loaded.model.to(device).eval()
    return loaded


class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class Batcher:
    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.queue: asyncio.Queue = asyncio.Queue()
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="infer")

    async def infer(self, model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
        future = asyncio.get_running_loop().create_future()
        self.queue.put_nowait((model, x, future))
        return await future

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = [await self.queue.get()]
            rows = len(items[0][1])
            if self.cfg.max_wait_ms > 0 and self.queue.empty() and rows < self.cfg.max_batch:
                await asyncio.sleep(self.cfg.max_wait_ms / 1000)
            while rows < self.cfg.max_batch and not self.queue.empty():
                item = self.queue.get_nowait()
                items.append(item)
                rows += len(item[1])
            # Requests queued under different models (a swap happened) run in separate groups.
            for model in dict.fromkeys(i[0] for i in items):
                group = [i for i in items if i[0] is model]
                try:
                    out = await loop.run_in_executor(self.executor, forward, model,
                                                     np.concatenate([i[1] for i in group]))
                except Exception as exc:  # noqa: BLE001 - answer every waiting request
                    for _, _, fut in group:
                        if not fut.done():
                            fut.set_exception(exc)
                    continue
                start = 0
                for _, x, fut in group:
                    if not fut.done():
                        fut.set_result(out[start:start + len(x)])
                    start += len(x)


class App:
    """The ASGI application."""

    def __init__(self, loaded: LoadedModel, cfg: ServeConfig):
        self.current, self.cfg = loaded, cfg
        self.batcher = Batcher(cfg)
        self.shape = tuple(loaded.spec["input_shape"])
        self._tasks: list[asyncio.Task] = []
        # the expected header, whole: one constant-time compare, no parsing of what was sent
        self._authorization = (b"Bearer " + read_secret(cfg.token_file, "the serve token").encode()
                               if cfg.token_file else None)

    # ------------------------------------------------------------ lifecycle
    async def _startup(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self.batcher.run()))
        if self.cfg.poll_seconds > 0:
            self._tasks.append(loop.create_task(self._poll()))
        try:
            loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self.reload()))
        except (NotImplementedError, RuntimeError, ValueError):
            pass

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.poll_seconds)
            await self.reload()

    async def reload(self) -> bool:
        """Swap in the version that holds the alias now, if it changed."""
        loop = asyncio.get_running_loop()
        try:
            from pipelines import tracking

            info = await loop.run_in_executor(None, tracking.model_version_by_alias, self.cfg.model, self.cfg.alias)
            if info is None or info["version"] == self.current.version:
                return False
            loaded = await loop.run_in_executor(None, self._load)
        except Exception as exc:  # noqa: BLE001 - keep serving the current model
            log.error("reload of %s@%s failed, still serving v%s: %s", self.cfg.model, self.cfg.alias,
                      self.current.version, exc)
            return False
        if tuple(loaded.spec["input_shape"]) != self.shape:
            log.error("new %s v%s takes %s, the server was started for %s; not swapped", self.cfg.model,
                      loaded.version, loaded.spec["input_shape"], list(self.shape))
            return False
        log.info("serving %s v%s %s (was v%s)", self.cfg.model, loaded.version, loaded.variant, self.current.version)
        self.current = loaded
        return True

    def _load(self) -> LoadedModel:
        """The version that holds the alias now, as the variant and on the device this server serves."""
        return placed(load_registered(self.cfg.model, self.cfg.alias, self.cfg.variant), self.cfg.device)

    # ------------------------------------------------------------ ASGI
    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await self._startup()
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    for task in self._tasks:
                        task.cancel()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        headers = [(b"content-type", b"application/json")]
        try:
            if not self._authorized(scope):
                headers.append((b"www-authenticate", b'Bearer realm="metadistill"'))
                raise BadRequest(401, "this server asks for a bearer token: send Authorization: Bearer <token>")
            status, body = await self._route(scope, receive)
        except BadRequest as exc:
            status, body = exc.status, {"error": exc.message}
        except Exception as exc:  # noqa: BLE001
            log.exception("internal error")
            status, body = 500, {"error": f"internal error: {type(exc).__name__}"}
        payload = orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
        await send({"type": "http.response.start", "status": status,
                    "headers": [*headers, (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})

    def _authorized(self, scope) -> bool:
        if self._authorization is None or (scope["method"] == "GET" and scope["path"] == "/health"):
            return True
        sent = [value for name, value in scope["headers"] if name == b"authorization"]
        return len(sent) == 1 and hmac.compare_digest(sent[0], self._authorization)

    async def _route(self, scope, receive):
        method, path = scope["method"], scope["path"]
        if method == "GET":
            if path == "/health":
                return 200, {"status": "ok"}
            if path == "/ready":
                return 200, {"ready": True, "version": self.current.version}
            if path == "/metadata":
                return 200, self.current.metadata
        if method == "POST" and path in ("/predict", "/invocations"):
            data = await self._json_body(scope, receive)
            if path == "/predict":
                return 200, await self._predict(data)
            return 200, await self._invocations(data)
        if path in ("/health", "/ready", "/metadata", "/predict", "/invocations"):
            raise BadRequest(405, f"{method} is not allowed on {path}")
        raise BadRequest(404, f"no route {path}; routes: /predict, /invocations, /health, /ready, /metadata")

    async def _json_body(self, scope, receive) -> dict:
        headers = dict(scope["headers"])
        ctype = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if ctype != b"application/json":
            raise BadRequest(415, f"content-type must be application/json, got {ctype.decode() or 'none'!r}")
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.cfg.max_body_bytes:
            await self._drain(receive, more=True)
            raise BadRequest(413, f"body of {int(declared)} bytes exceeds the limit of {self.cfg.max_body_bytes}")
        chunks, size = [], 0
        while True:
            message = await receive()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.cfg.max_body_bytes:
                await self._drain(receive, more=message.get("more_body", False))
                raise BadRequest(413, f"body exceeds the limit of {self.cfg.max_body_bytes} bytes")
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        try:
            data = orjson.loads(b"".join(chunks))
        except orjson.JSONDecodeError as exc:
            raise BadRequest(400, f"body is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise BadRequest(400, "body must be a JSON object")
        return data

    async def _drain(self, receive, more: bool) -> None:
        """Read and discard the rest of a refused body, up to ``drain_bytes``, as nginx's
        lingering close does: a client that writes its whole body before reading (urllib,
        requests) then gets the 413 instead of a connection reset.  Past the bound the
        connection is closed."""
        drained = 0
        while more and drained < self.cfg.drain_bytes:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            drained += len(message.get("body", b""))
            more = message.get("more_body", False)

    def _to_batch(self, instances) -> np.ndarray:
        try:
            x = np.asarray(instances, dtype=np.float32)
        except (ValueError, TypeError):
            raise BadRequest(400, "instances must be a rectangular nested array of numbers") from None
        c, h, w = self.shape
        if x.ndim == 4 and x.shape[1:] == (c, h, w):
            pass
        elif c == 1 and x.ndim == 3 and x.shape[1:] == (h, w):
            x = x[:, None]
        elif x.ndim == 2 and x.shape[1] == c * h * w:
            x = x.reshape(-1, c, h, w)
        else:
            raise BadRequest(400, f"instances have shape {list(x.shape)}; expected [batch, {c}, {h}, {w}]"
                                  + (f" or [batch, {h}, {w}]" if c == 1 else "") + f" or [batch, {c * h * w}]")
        return self._check_rows(x)

    def _check_rows(self, x: np.ndarray) -> np.ndarray:
        if len(x) == 0:
            raise BadRequest(400, "empty batch: send at least one instance")
        if len(x) > self.cfg.max_instances:
            raise BadRequest(413, f"{len(x)} instances exceed the limit of {self.cfg.max_instances} per request")
        if not np.isfinite(x).all():
            raise BadRequest(400, "instances contain NaN or infinite values")
        low, high = float(x.min()), float(x.max())
        if low < -PIXEL_SLACK or high > 1 + PIXEL_SLACK:  # the model normalises [0, 1] pixels itself
            raise BadRequest(422, f"instances must be pixels in [0, 1] (the model normalises them itself); these span "
                                  f"[{low:g}, {high:g}]: divide 8-bit values by 255 (or by their maximum)")
        return np.ascontiguousarray(x)

    def _decode_images(self, images) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
            raise BadRequest(400, "images_b64 must be a list of base64 strings")
        c, h, w = self.shape
        out = []
        for n, text in enumerate(images):
            try:
                raw = base64.b64decode(text, validate=True)
                img = Image.open(io.BytesIO(raw)).convert("L" if c == 1 else "RGB").resize((w, h))
            except (binascii.Error, ValueError):
                raise BadRequest(400, f"images_b64[{n}] is not valid base64") from None
            except (UnidentifiedImageError, OSError):
                raise BadRequest(400, f"images_b64[{n}] is not a PNG or JPEG image") from None
            arr = np.asarray(img, dtype=np.float32) / 255.0
            out.append(arr[None] if c == 1 else arr.transpose(2, 0, 1))
        return self._check_rows(np.stack(out) if out else np.zeros((0, c, h, w), np.float32))

    async def _predict(self, data: dict) -> dict:
        unknown = set(data) - {"instances", "images_b64"}
        if unknown:
            raise BadRequest(400, f"unknown field(s) {sorted(unknown)}; send 'instances' or 'images_b64'")
        if len(data) != 1:
            raise BadRequest(400, "send exactly one of 'instances' or 'images_b64'")
        x = self._to_batch(data["instances"]) if "instances" in data else self._decode_images(data["images_b64"])
        loaded = self.current
        logits = await self.batcher.infer(loaded.model, x)
        probs = torch.from_numpy(logits).softmax(-1).numpy()
        ids = probs.argmax(-1)
        names = loaded.spec["class_names"]
        return {"predictions": ids.tolist(), "classes": [names[i] for i in ids], "probabilities": probs.tolist(),
                "model": {"name": loaded.name, "version": loaded.version}}

    async def _invocations(self, data: dict) -> dict:
        keys = set(data) - {"params"}
        if keys not in ({"inputs"}, {"instances"}):
            raise BadRequest(400, f"expected 'inputs' or 'instances' (tensor input), got {sorted(data)}")
        x = self._to_batch(data.get("inputs", data.get("instances")))
        logits = await self.batcher.infer(self.current.model, x)
        return {"predictions": logits.tolist()}


def create_app(cfg: ServeConfig | None = None) -> App:
    """App factory; without ``cfg`` it reads the JSON in ``$METADISTILL_SERVE_CONFIG``
    (how ``--workers`` processes get their settings)."""
    if cfg is None:
        cfg = ServeConfig(**json.loads(os.environ[ENV_CONFIG]))
    torch.set_num_threads(1)  # many small forwards: threads would only contend
    check_device(cfg.device, cfg.variant)
    return App(placed(load_registered(cfg.model, cfg.alias, cfg.variant), cfg.device), cfg)


def check_listening(host: str, token_file: str | None) -> None:
    """Nothing answers beyond this machine without a token; a token file must be usable."""
    from pipelines.common.secrets import AuthRequired, is_loopback

    if token_file is not None:
        read_secret(token_file, "the serve token")
    elif not is_loopback(host):
        raise AuthRequired(f"serve --host {host} listens beyond this machine, and anyone who reaches the port "
                           f"could use the model: give --token-file FILE (the bearer token clients send, "
                           f"mode 600), or bind 127.0.0.1")


def serve(cfg: ServeConfig, host: str = "127.0.0.1", port: int = 8080, workers: int = 1) -> None:
    import uvicorn

    check_listening(host, cfg.token_file)
    check_device(cfg.device, cfg.variant)
    load_registered(cfg.model, cfg.alias, cfg.variant)  # fail before binding if the model cannot be served
    os.environ[ENV_CONFIG] = json.dumps(asdict(cfg))
    uvicorn.run("deploy.serve:create_app", factory=True, host=host, port=port, workers=workers,
                log_level="warning", access_log=False, http="httptools", loop="uvloop",
                timeout_graceful_shutdown=10)


__all__ = ["App", "BadRequest", "ModelLoadError", "ServeConfig", "check_listening", "create_app", "serve"]
