"""HTTP prediction service: ``multitag serve RUN_DIR`` or ``create_app(run_dir)`` for any ASGI server.

Endpoints (OpenAPI docs at /docs and /redoc, which work offline; schema at /openapi.json):

    POST /predict   multipart field ``file`` (one image) and/or ``files`` (a batch; every part
                    of either field counts, so a repeated ``file`` is a batch too);
                    query ``threshold`` ("calibrated" or a float in [0, 1]) and ``top_k``
                    -> {"predictions": [{"image", "labels", "scores"}]}, "image" being the
                    upload's file name: the record `multitag predict --format json` writes
    GET  /labels    -> {"class_names", "thresholds", "multi_label"}
    GET  /health    -> {"status", "model", "backend", "run"}

Every error is JSON ``{"error": "one sentence"}`` with a 4xx status for bad input:
400 no image / empty file / bad parameter, 413 request, image or batch too large,
415 not a readable image. A bad image never gives a 500.

Limits, checked in this order so that no work is spent on input that will be refused:
1. request body <= ``max_bytes``: the body is read up to that size before any parsing
   (Content-Length is checked first, so a declared oversize body is refused unread);
2. number of images <= ``max_batch``;
3. pixels <= ``max_pixels`` per image, read from the image header before decoding
   (decompression bombs: a few KB of PNG can declare gigapixels; a GIF counts every
   frame, because the decoder decodes every frame): ``decode_image``'s own header check,
   given this limit, so training, prediction and the service share one implementation;
4. then the image is decoded by the same ``decode_image`` as training and shrunk to the
   model's input at once, so a request holds one full-size image at a time, not all of them.
A batch is all or nothing: one refused image refuses the request, naming that file.

Concurrency: decoding runs in the thread pool, in parallel; inference runs in the thread
pool too (never on the event loop) but one call at a time, under a lock. Not every
backend is safe to call from several threads at once, and on CPU one call already uses
every core, so a micro-batching queue would add latency and code for little throughput;
clients that want throughput send a batch in ``files``.
"""

import socket
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import File, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from starlette.datastructures import UploadFile as StarletteUpload
from starlette.exceptions import HTTPException

# header_pixels is re-exported for callers of multitag.serve; its one implementation is in decode.py.
from multitag.data.decode import BadImageError, ImageTooLargeError, NotAnImageError, decode_image, header_pixels
from multitag.errors import UserError
from multitag.predict import check_top_k_alone, parse_threshold   # re-exported: the service and the CLI parse alike

MB = 1 << 20
DEFAULT_MAX_BYTES = 20 * MB
DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_MAX_BATCH = 32


@dataclass(frozen=True)
class Limits:
    """Upload limits shared by the HTTP service and the Streamlit app."""

    max_bytes: int = DEFAULT_MAX_BYTES    # the whole request (service) or one file (app)
    max_pixels: int = DEFAULT_MAX_PIXELS  # per image (all frames of a GIF)
    max_batch: int = DEFAULT_MAX_BATCH    # images per request / shown at once


class RejectedInput(UserError):
    """Input refused with a reason for the user; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


# --- image checks (no web framework needed; the app uses these too) ---------------------------

def decode_upload(data: bytes, name: str, limits: Limits = Limits()) -> np.ndarray:
    """Encoded upload -> (H, W, 3) uint8 RGB, refused with RejectedInput when it breaks a limit.

    The checks run from cheapest to dearest: emptiness, byte size, then ``decode_image``, which
    reads the header's pixel count before decoding any pixel (413 over ``limits.max_pixels``).
    """
    if not data:
        raise RejectedInput(f"{name} is empty; send the image file's bytes", 400)
    if len(data) > limits.max_bytes:
        raise RejectedInput(f"{name} is {_bytes(len(data))}; the limit is {_bytes(limits.max_bytes)}", 413)
    try:
        chw = decode_image(data, name=name, max_pixels=limits.max_pixels)
    except ImageTooLargeError as e:   # pixels unknown only when PIL refused an image handed in already open
        frames = f" in {e.frames} frames" if e.frames > 1 else ""       # a GIF: every frame is decoded
        size = f"has {e.pixels:,} pixels{frames}; the limit is {e.limit:,}" if e.pixels else f"is too large: {e.reason}"
        fix = "send a still image or fewer frames" if frames else "downscale it first"
        raise RejectedInput(f"{name} {size}; {fix}", 413) from None
    except NotAnImageError:
        raise RejectedInput(f"{name} is not an image (JPEG, PNG, WEBP, GIF, BMP or TIFF expected)", 415) from None
    except BadImageError as e:
        raise RejectedInput(f"{name} is not a readable image: {e.reason}", 415) from None
    return chw.permute(1, 2, 0).numpy()  # decode_image's tensor is a view of HWC memory: no copy


def _bytes(n: int) -> str:
    """A byte count for people: '20.0 MB', or exact bytes below 1 MB."""
    return f"{n / MB:.1f} MB" if n >= MB else f"{n:,} bytes"


def _load_model(run_dir_or_model):
    """A run directory (loaded here) or an already loaded model (anything with ``predict``)."""
    if hasattr(run_dir_or_model, "predict"):
        return run_dir_or_model
    from multitag.predict import load

    return load(run_dir_or_model)


class LockedModel:
    """A model whose inference runs one call at a time (see the module docstring for why)."""

    def __init__(self, model) -> None:
        self.model = model
        self._lock = threading.Lock()

    def predict(self, images: Sequence[np.ndarray], threshold: str | float, top_k: int | None):
        with self._lock:
            return self.model.predict(list(images), threshold=threshold, top_k=top_k)


# --- the FastAPI application ---------------------------------------------------------------------

class BodySizeLimit:
    """ASGI middleware: refuse a request body over ``max_bytes`` with 413 before any parsing.

    The body is read (at most ``max_bytes``) before the app sees it, then replayed, so the
    multipart parser never spools an oversize upload to disk and the refusal is always JSON.
    """

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(scope, receive, send)
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                return await self._refuse(scope, receive, send)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:  # after the body, the app only waits for a disconnect
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send) -> None:
        message = f"request body over the limit of {_bytes(self.max_bytes)}; send fewer or smaller images"
        await JSONResponse({"error": message}, status_code=413)(scope, receive, send)


def create_app(run_dir_or_model, *, max_bytes: int = DEFAULT_MAX_BYTES, max_pixels: int = DEFAULT_MAX_PIXELS,
               max_batch: int = DEFAULT_MAX_BATCH):
    """The FastAPI app serving one model (a run directory or a loaded ``multitag.predict.Model``)."""
    model = _load_model(run_dir_or_model)
    locked = LockedModel(model)
    limits = Limits(max_bytes, max_pixels, max_batch)
    run_name = Path(str(getattr(model, "run_dir", "") or "model")).name
    meta = getattr(model, "meta", {}) or {}
    model_name = (meta.get("model") or {}).get("name", "unknown")

    # FastAPIOffline: FastAPI with /docs and /redoc pages whose scripts it serves itself (offline too)
    app = FastAPIOffline(title="multitag", version=str(meta.get("multitag_version", "0")),
                  description=f"Image tagging with `{model_name}` from run `{run_name}`. Errors are `{{\"error\": ...}}`.")
    app.add_middleware(BodySizeLimit, max_bytes=max_bytes)

    # One error shape for every failure, so clients parse a single format.
    @app.exception_handler(RejectedInput)
    async def _rejected(request: Request, exc: RejectedInput):
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @app.exception_handler(UserError)
    async def _user_error(request: Request, exc: UserError):
        return JSONResponse({"error": str(exc)}, status_code=400)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException):
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return JSONResponse({"error": describe_validation_error(exc.errors())}, status_code=400)

    @app.post("/predict", summary="Labels and per-class scores for one image (`file`) or a batch (`files`)")
    async def predict(
        request: Request,
        file: Annotated[UploadFile | None, File(description="one image")] = None,
        files: Annotated[list[UploadFile] | None, File(description=f"a batch of up to {max_batch} images")] = None,
        threshold: Annotated[str, Query(description="'calibrated' (per-class, from the run) or a float in [0, 1]")]
        = "calibrated",
        top_k: Annotated[int | None, Query(ge=1, le=len(model.class_names),
                                           description="return the k best classes instead")] = None,
    ) -> dict[str, Any]:
        # Every part of both fields: a parameter typed UploadFile keeps only the last of several `file` parts.
        form = await request.form()        # parsed (and cached) by FastAPI already
        uploads = [u for key in ("file", "files") for u in form.getlist(key) if isinstance(u, StarletteUpload)]
        if not uploads:
            raise RejectedInput(f"no image in the request{_fields_seen(request, form)}; send multipart/form-data "
                                "with field 'file' (one image) or 'files' (several)", 400)
        if len(uploads) > max_batch:
            raise RejectedInput(f"{len(uploads)} images in one request; the limit is {max_batch}", 413)
        named = [(u.filename or f"image{i}", await u.read()) for i, u in enumerate(uploads)]
        chosen = parse_threshold(threshold)
        check_top_k_alone(top_k, chosen)        # before any image is decoded (a UserError: 400)
        preds = await run_in_threadpool(_decode_and_predict, locked, named, limits, chosen, top_k)
        return {"predictions": [{"image": name, "labels": p.labels, "scores": p.scores}
                                for (name, _), p in zip(named, preds)]}

    @app.get("/labels", summary="Class names and the calibrated per-class thresholds")
    def labels() -> dict[str, Any]:
        return {"class_names": list(model.class_names), "thresholds": [float(t) for t in model.thresholds],
                "multi_label": bool(model.multi_label)}

    @app.get("/health", summary="Liveness, with the model and inference backend in use")
    def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, "run": run_name, "backend": getattr(model, "backend", "torch")}

    return app


def _fields_seen(request, form) -> str:
    """' (got fields: a, b)' naming the form fields that were sent, to point at a misspelt field name;
    for a body that is not a form at all (raw image bytes), what it was sent as instead."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "multipart/form-data":
        return f" (the body was sent as {content_type or 'no content type'}, not multipart/form-data)"
    names = sorted(set(form.keys()))
    return f" (got field{'s' if len(names) > 1 else ''}: {', '.join(names)})" if names else ""


def _decode_and_predict(locked: LockedModel, named: list[tuple[str, bytes]], limits: Limits,
                        threshold: str | float, top_k: int | None):
    """Runs in a worker thread: decode every image (in parallel with other requests), then infer under the lock.

    Each image is shrunk to the model's input right after its decode, so a request holds one full-size
    image at a time (32 uploads of 36 MP each held together took 3.4 GB); a model without ``pixels``
    (any object with ``predict``) gets the decoded images as they are."""
    shrink = getattr(locked.model, "pixels", None)
    images = [shrink(im) if shrink else im for im in (decode_upload(data, name, limits) for name, data in named)]
    return locked.predict(images, threshold, top_k)


def describe_validation_error(errors: Sequence[dict]) -> str:
    """FastAPI's list of validation errors -> one sentence, e.g. "top_k: Input should be ... "."""
    parts = []
    for err in errors:
        where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("query", "body"))
        parts.append(f"{where}: {err.get('msg', 'invalid')}" if where else str(err.get("msg", "invalid")))
    return "; ".join(parts) or "invalid request"


def serve(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, *, max_bytes: int = DEFAULT_MAX_BYTES,
          max_pixels: int = DEFAULT_MAX_PIXELS, max_batch: int = DEFAULT_MAX_BATCH) -> None:
    """Load the run and serve it with uvicorn until interrupted (Ctrl-C)."""
    import uvicorn

    sock = bound_socket(host, port)         # before the model loads: a busy port is one line, at once
    port = sock.getsockname()[1]            # the real one for --port 0
    app = create_app(run_dir, max_bytes=max_bytes, max_pixels=max_pixels, max_batch=max_batch)
    print(f"serving {run_dir} on http://{host}:{port} (docs: http://{host}:{port}/docs)")
    uvicorn.Server(uvicorn.Config(app, log_level="info")).run(sockets=[sock])


def bound_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port), or a UserError naming a busy port or a bad host."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)    # as uvicorn does: restarts reuse the port
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror}); choose another --port "
                        "(0 picks a free one) or stop what uses it.") from None
    return sock


__all__ = ["Limits", "RejectedInput", "create_app", "decode_upload", "header_pixels", "parse_threshold", "serve"]
