"""Serve a guarded diffusion pipeline over HTTP: generation that never returns a blocklisted image, and a check API.

This is the shape of a production deployment in one file, so that the limits a public endpoint needs (request size,
image dimensions, batch size, a serialized pipeline, off-loop CPU work, metrics) are written down and tested rather
than left to each user. Endpoints:

- `POST /generate` (JSON `prompt`, `num_images`, `seed`, `steps`): runs `GuardedPipeline` (action `"resample"`) and
  returns base64 PNGs with the guard's report per image. The diffusers pipeline is not thread-safe, so generations
  run one at a time; beyond `max_queued_generations` in flight (running or waiting), requests get 503.
- `POST /check`: images as `multipart/form-data` (one or more file parts) or one image as the raw body. Returns a
  verdict per image. Bad input gets a JSON `{"error": code, "detail": message}`, never a 500: 400 for a malformed
  request, 413 for a limit exceeded (bytes, images per request, pixels, side), 422 for an image that cannot be
  decoded.
- `GET /healthz`, and `GET /metrics` in the Prometheus text format.

With no arguments everything is offline: the tiny seeded StableDiffusionPipeline, seeded open_clip ViT-S-32 weights,
and a blocklist holding the image the pipeline generates for `DEMO_PROMPT` with seed `DEMO_SEED`, so asking for that
seed really resamples:

    python examples/serve.py --port 8000
    curl -s localhost:8000/generate -H 'content-type: application/json' -d '{"seed": 0, "num_images": 2}'
    curl -s localhost:8000/check -F image=@generated.png
    python examples/serve.py --sd stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --model ViT-L-14-quickgelu --pretrained openai --blocklist blocklists/sd-v1-memorized.safetensors

Requires the `serve` extra: fastapi, uvicorn, python-multipart.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoint annotations at runtime.

import argparse
import base64
import io
import secrets
import tempfile
import threading
import time
import warnings
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from python_multipart.multipart import parse_options_header
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from guardrail import Blocklist, Guard, GuardedPipeline, ImageDecodeError, ResampleExhaustedError, UsageError, Verdict
from guardrail.images import to_pil_images

DEMO_PROMPT = "a photograph of an astronaut riding a horse"
DEMO_SEED = 1
"""The seed whose image the offline demo blocklists: `/generate` with `seed` 0 and 2 images resamples slot 1."""
DEMO_STEPS = 2
DEMO_THRESHOLD = 0.995
"""Random-weight ViT-S-32 puts different tiny-SD samples at cosine 0.95-0.98 and a re-generated copy at 1.0."""

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
"""Formats `/check` decodes. PIL knows many more; some (EPS) run external programs and none are needed here."""
MAX_PROMPT_CHARS = 2000
CHECK_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
GENERATE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


# ---- metrics -------------------------------------------------------------------------------------------------------


@dataclass
class Histogram:
    """Cumulative-on-render latency histogram (Prometheus semantics: a value is counted in every bucket `le` >= it)."""

    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)  # per bucket, not cumulative; the last one is +Inf
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        index = next((i for i, bound in enumerate(self.buckets) if value <= bound), len(self.buckets))
        self.counts[index] += 1
        self.total += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        cumulative, lines = 0, []
        for bound, count in zip([*map(repr, self.buckets), "+Inf"], self.counts):
            cumulative += count
            lines.append(f'{name}_bucket{{le="{bound}"}} {cumulative}')
        return [*lines, f"{name}_sum {self.total!r}", f"{name}_count {self.count}"]


def _label(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    """The server's counters and histograms; every method takes one lock, so worker threads may update it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.checks = 0
        self.matches: Counter[str] = Counter()
        self.resamples = 0
        self.exhausted = 0
        self.generations_in_flight = 0
        self.http: Counter[tuple[str, int]] = Counter()
        self.check_seconds = Histogram(CHECK_BUCKETS)
        self.generate_seconds = Histogram(GENERATE_BUCKETS)

    def record_verdicts(self, verdicts: Sequence[Verdict]) -> None:
        with self._lock:
            self.checks += len(verdicts)
            self.matches.update(str(v.entry_id) for v in verdicts if v.matched)

    def record_generation(self, attempts: Sequence[int], exhausted: Sequence[bool], seconds: float) -> None:
        with self._lock:
            self.resamples += sum(count - 1 for count in attempts)
            self.exhausted += sum(exhausted)
            self.generate_seconds.observe(seconds)

    def record_check(self, seconds: float) -> None:
        with self._lock:
            self.check_seconds.observe(seconds)

    def set_generations_in_flight(self, count: int) -> None:
        with self._lock:
            self.generations_in_flight = count

    def record_request(self, path: str, status: int) -> None:
        with self._lock:
            self.http[(path, status)] += 1

    def render(self) -> str:
        """The Prometheus text exposition format (version 0.0.4)."""
        with self._lock:
            families: list[tuple[str, str, str, list[str]]] = [
                ("guardrail_checks_total", "counter", "Images checked against the blocklist (/check and /generate).",
                 [f"guardrail_checks_total {self.checks}"]),
                ("guardrail_matches_total", "counter", "Checked images that matched the blocklist, per entry.",
                 [f'guardrail_matches_total{{entry_id="{_label(entry)}"}} {count}'
                  for entry, count in sorted(self.matches.items())]),
                ("guardrail_resamples_total", "counter", "Image slots regenerated because they matched.",
                 [f"guardrail_resamples_total {self.resamples}"]),
                ("guardrail_exhausted_total", "counter", "Image slots that still matched after every attempt.",
                 [f"guardrail_exhausted_total {self.exhausted}"]),
                ("guardrail_generations_in_flight", "gauge", "/generate requests running or waiting for the "
                 "pipeline.", [f"guardrail_generations_in_flight {self.generations_in_flight}"]),
                ("guardrail_http_requests_total", "counter", "HTTP requests by path and status.",
                 [f'guardrail_http_requests_total{{path="{_label(path)}",status="{status}"}} {count}'
                  for (path, status), count in sorted(self.http.items())]),
                ("guardrail_check_seconds", "histogram", "Seconds per successful /check request (decode + guard).",
                 self.check_seconds.lines("guardrail_check_seconds")),
                ("guardrail_generate_seconds", "histogram", "Seconds per successful /generate request, queueing "
                 "included.", self.generate_seconds.lines("guardrail_generate_seconds")),
            ]
        text = []
        for name, kind, help_text, samples in families:
            text += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples]
        return "\n".join(text) + "\n"


class _CountingGuard:
    """The caller's guard, reporting every verdict to the metrics; everything else is forwarded to it.

    `GuardedPipeline` checks through it, which is the only way to see the verdicts of the attempts a resample
    replaced. It holds no state of its own, so a blocklist swapped or an entry disabled on the caller's guard
    applies at once.
    """

    def __init__(self, guard: Guard, metrics: Metrics) -> None:
        self._guard, self._metrics = guard, metrics

    def __getattr__(self, name: str) -> Any:  # called only for what this object lacks: all of the guard's state
        if name in ("_guard", "_metrics"):
            raise AttributeError(name)
        return getattr(self._guard, name)

    def check(self, images: Any, record: bool = True) -> list[Verdict]:
        verdicts = self._guard.check(images, record=record)
        if record:  # the sampler's early checks of unfinished images are previews, not checked images
            self._metrics.record_verdicts(verdicts)
        return verdicts

    def check_embeddings(self, vectors: Any) -> list[Verdict]:
        verdicts = self._guard.check_embeddings(vectors)
        self._metrics.record_verdicts(verdicts)
        return verdicts


class _RequestCounter:
    """ASGI middleware counting responses by route path and status (unknown paths count as `other`)."""

    def __init__(self, app: Callable[..., Awaitable[None]], metrics: Metrics, paths: Callable[[], Iterable[str]]):
        self.app, self.metrics, self.paths = app, metrics, paths

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # what the client gets when the app raises before starting a response

        async def send_and_note(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            path = scope["path"] if scope["path"] in set(self.paths()) else "other"
            self.metrics.record_request(path, status)


# ---- uploads -------------------------------------------------------------------------------------------------------


class RequestRejected(Exception):
    """A request the server refuses (bad input, a limit, busy); becomes `{"error": code, "detail": message}`."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, or `RequestRejected` 413 as soon as it is known to exceed `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise RequestRejected(400, "bad_content_length", f"Content-Length {declared!r} is not a byte count")
        if int(declared) > limit:
            message = f"request body of {declared} bytes exceeds the {limit}-byte limit"
            raise RequestRejected(413, "upload_too_large", message)
    chunks, size = [], 0
    async for chunk in request.stream():  # also bounds chunked uploads and lying Content-Length headers
        size += len(chunk)
        if size > limit:
            raise RequestRejected(413, "upload_too_large", f"request body exceeds the {limit}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


async def split_uploads(request: Request, body: bytes, max_images: int) -> list[tuple[str, bytes]]:
    """`(name, bytes)` per uploaded image: every file part of a multipart body, or the raw body as one image."""
    if not body:
        raise RequestRejected(400, "empty_body", "the request has no body; send images as multipart/form-data "
                              "file parts or one image as the raw body")
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data":
        return [("body", body)]
    boundary = params.get(b"boundary")
    if not boundary:
        raise RequestRejected(400, "bad_multipart", "multipart/form-data without a boundary parameter")
    parts = body.count(b"--" + boundary) - 1  # the delimiters, minus the closing one; data may not contain it
    if parts > max_images:
        raise RequestRejected(413, "too_many_images", f"{parts} parts in one request; the limit is {max_images} images")

    async def once() -> Any:
        yield body

    parser = MultiPartParser(request.headers, once(), max_files=max_images, max_fields=max_images)
    try:
        form = await parser.parse()
    except MultiPartException as error:
        raise RequestRejected(400, "bad_multipart", f"cannot parse the multipart body: {error.message}") from error
    try:
        uploads = []
        for name, value in form.multi_items():
            if not isinstance(value, UploadFile):
                message = f"form field {name!r} is not a file part; send images as files"
                raise RequestRejected(400, "not_a_file", message)
            uploads.append((value.filename or name, await value.read()))
    finally:
        await form.close()
    if not uploads:
        raise RequestRejected(400, "no_images", "the multipart body holds no file parts")
    return uploads


def size_problem(width: int, height: int, max_pixels: int, max_side: int) -> Optional[str]:
    """Why a `width` x `height` image is too large to decode, or None."""
    if max(width, height) > max_side:
        return f"is {width}x{height}; each side must be at most {max_side}"
    if width * height > max_pixels:
        return f"is {width}x{height} = {width * height} pixels; the limit is {max_pixels}"
    return None


def decode_upload(data: bytes, name: str, max_pixels: int, max_side: int) -> Image.Image:
    """Decode one upload into an RGB image, checking its dimensions from the header before any pixel is decoded."""
    if not data:
        raise RequestRejected(400, "empty_image", f"image {name!r} is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as image:  # reads the header only
                problem = size_problem(*image.size, max_pixels, max_side)
                if problem:
                    raise RequestRejected(413, "image_too_large", f"image {name!r} {problem}")
                image.load()  # decode now: a truncated file fails here
                return to_pil_images(image)[0]  # RGB, converted as guardrail converts every input
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise RequestRejected(413, "image_too_large", f"image {name!r} is too large to decode: {error}") from error
    except Image.UnidentifiedImageError as error:
        formats = ", ".join(ALLOWED_FORMATS)
        message = f"{name!r} is not an image in a supported format ({formats}), or its header is cut short"
        raise RequestRejected(422, "not_an_image", message) from error
    except (OSError, ValueError, SyntaxError, EOFError, ImageDecodeError) as error:  # truncated or corrupt
        raise RequestRejected(422, "undecodable_image", f"cannot decode image {name!r}: {error}") from error


def png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def verdict_json(verdict: Verdict) -> dict:
    return {"matched": verdict.matched, "score": verdict.score, "entry_id": verdict.entry_id, "entry": verdict.entry}


# ---- generation ----------------------------------------------------------------------------------------------------


class GenerateRequest(BaseModel):
    """The body of `POST /generate`; `num_images` and `steps` are also bounded by the app's limits."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(DEMO_PROMPT, min_length=1, max_length=MAX_PROMPT_CHARS)
    num_images: int = Field(1, ge=1)
    seed: Optional[int] = Field(None, ge=0, lt=2**63, description="image i uses seed + i; random when omitted")
    steps: Optional[int] = Field(None, ge=1, description="denoising steps (default: the app's default_steps)")


def demo_guard(
    pipe: Any, model: str = "ViT-S-32", pretrained: Optional[str] = None, steps: int = DEMO_STEPS, device: str = "cpu"
) -> Guard:
    """The offline demo guard: a blocklist of the image `pipe` generates for `DEMO_PROMPT` and `DEMO_SEED`.

    Without `pretrained`, seeded open_clip weights are written to a temp file, loaded, and the file deleted.
    """
    import torch

    from guardrail import OpenCLIPEmbedder
    from guardrail.offline import write_seeded_open_clip_weights

    if pretrained is None:
        with tempfile.TemporaryDirectory(prefix="guardrail-serve-") as folder:
            weights = write_seeded_open_clip_weights(f"{folder}/{model}.safetensors")
            embedder = OpenCLIPEmbedder(model, pretrained=weights, device=device)  # loaded: the file may go
    else:
        embedder = OpenCLIPEmbedder(model, pretrained=pretrained, device=device)
    generator = [torch.Generator("cpu").manual_seed(DEMO_SEED)]
    memorized = pipe(DEMO_PROMPT, num_inference_steps=steps, generator=generator).images[0]
    entry = {"id": f"demo-seed-{DEMO_SEED}", "caption": DEMO_PROMPT}
    return Guard(Blocklist.from_images([memorized], embedder, entries=[entry], threshold=DEMO_THRESHOLD), embedder)


# ---- the app -------------------------------------------------------------------------------------------------------


def create_app(
    pipe: Any = None,
    guard: Optional[Guard] = None,
    *,
    max_upload_bytes: int = 16 * 2**20,
    max_pixels: int = 4096 * 4096,
    max_side: int = 8192,
    max_batch: int = 8,
    max_images: int = 4,
    default_steps: Optional[int] = None,
    max_steps: int = 100,
    max_queued_generations: int = 8,
    check_concurrency: int = 2,
) -> FastAPI:
    """Build the FastAPI app around a diffusers pipeline and a guard.

    Args:
        pipe (`DiffusionPipeline`, *optional*):
            Any text-to-image pipeline `GuardedPipeline` supports. Defaults to the tiny offline pipeline.
        guard (`Guard`, *optional*):
            Defaults to `demo_guard(pipe)`: seeded ViT-S-32 weights and a blocklist of the image of `DEMO_SEED`.
        max_upload_bytes: largest `/check` request body (413 above it).
        max_pixels, max_side: largest image `/check` decodes, in pixels and per side (413 above them).
        max_batch: most images in one `/check` request (413 above it).
        max_images, max_steps: bounds of `/generate`'s `num_images` and `steps` (422 above them).
        default_steps: `steps` when a request gives none (2 for the tiny pipeline, else 30).
        max_queued_generations: generations in flight (running or waiting for the pipeline); more get 503.
        check_concurrency: `/check` requests embedding at the same time (more wait; CPU cores are the limit).
    """
    for name, value in [("max_upload_bytes", max_upload_bytes), ("max_pixels", max_pixels), ("max_side", max_side),
                        ("max_batch", max_batch), ("max_images", max_images), ("max_steps", max_steps),
                        ("max_queued_generations", max_queued_generations), ("check_concurrency", check_concurrency)]:
        if not isinstance(value, int) or value < 1:
            raise UsageError(f"{name} must be an integer >= 1, got {value!r}")
    if default_steps is None:
        default_steps = DEMO_STEPS if pipe is None else 30
    if pipe is None:
        from guardrail.offline import tiny_stable_diffusion_pipeline

        pipe = tiny_stable_diffusion_pipeline()
    if guard is None:
        guard = demo_guard(pipe, steps=default_steps)

    metrics = Metrics()
    counting_guard = _CountingGuard(guard, metrics)
    guarded = GuardedPipeline(pipe, counting_guard, action="resample")
    pipeline_lock = threading.Lock()  # diffusers pipelines are not thread-safe
    check_slots = threading.BoundedSemaphore(check_concurrency)
    queue_lock, queued = threading.Lock(), [0]

    app = FastAPI(title="guardrail", description=__doc__.split("\n\n")[0])
    app.state.pipe, app.state.guard, app.state.metrics = pipe, guard, metrics
    app.add_middleware(_RequestCounter, metrics=metrics, paths=lambda: [route.path for route in app.routes])

    @app.exception_handler(RequestRejected)
    async def rejected(request: Request, error: RequestRejected) -> JSONResponse:
        return JSONResponse({"error": error.code, "detail": error.message}, status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": "invalid_request", "detail": jsonable_encoder(error.errors())}, status_code=422)

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok", "blocklist_entries": len(guard.blocklist), "model": guard.embedder.spec.get("model")}

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/check")
    async def check(request: Request) -> dict:
        started = time.perf_counter()
        body = await read_body(request, max_upload_bytes)
        uploads = await split_uploads(request, body, max_batch)

        def work() -> list[Verdict]:
            images = [decode_upload(data, name, max_pixels, max_side) for name, data in uploads]
            with check_slots:
                return counting_guard.check(images)

        verdicts = await run_in_threadpool(work)
        metrics.record_check(time.perf_counter() - started)
        return {
            "verdicts": [{"image": name, **verdict_json(v)} for (name, _), v in zip(uploads, verdicts)],
            "threshold": guard.threshold,
        }

    @app.post("/generate")
    async def generate(spec: GenerateRequest) -> dict:
        started = time.perf_counter()
        steps = default_steps if spec.steps is None else spec.steps
        if spec.num_images > max_images:
            message = f"num_images is {spec.num_images}; the limit is {max_images}"
            raise RequestRejected(422, "too_many_images", message)
        if steps > max_steps:
            raise RequestRejected(422, "too_many_steps", f"steps is {steps}; the limit is {max_steps}")
        seed = secrets.randbits(62) if spec.seed is None else spec.seed
        with queue_lock:
            if queued[0] >= max_queued_generations:
                raise RequestRejected(503, "busy", f"{queued[0]} generations are in flight (the limit); retry later")
            queued[0] += 1
            metrics.set_generations_in_flight(queued[0])

        def work() -> tuple[list[str], Any]:
            import torch

            generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(spec.num_images)]
            with pipeline_lock:
                output = guarded(spec.prompt, num_images_per_prompt=spec.num_images, num_inference_steps=steps,
                                 generator=generators)
            return [png_base64(image) for image in output.images], output.guardrail

        try:
            pngs, report = await run_in_threadpool(work)  # a cancelled request still waits for its thread
        except ResampleExhaustedError as error:  # only with a pipeline configured on_exhausted="raise"
            raise RequestRejected(409, "resample_exhausted", str(error)) from error
        finally:
            with queue_lock:
                queued[0] -= 1
                metrics.set_generations_in_flight(queued[0])
        metrics.record_generation(report.attempts, report.exhausted, time.perf_counter() - started)
        images = [
            {"png_base64": png, **verdict_json(verdict), "attempts": attempts, "blocked": blocked,
             "exhausted": exhausted, "stage": stage, "memorization": memorization, "stopped_at": stopped_at}
            for png, verdict, attempts, blocked, exhausted, stage, memorization, stopped_at in zip(
                pngs, report.verdicts, report.attempts, report.blocked, report.exhausted, report.stages,
                report.memorization, report.stopped_at,
            )
        ]
        return {"images": images, "seed": seed, "steps": steps, "prompt": spec.prompt}

    return app


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--sd", help="diffusers pipeline id or folder (default: the tiny offline pipeline)")
    parser.add_argument("--model", help="open_clip model name (default: the blocklist's, or ViT-S-32 for the demo)")
    parser.add_argument("--pretrained", help="open_clip pretrained tag or weights file (default: seeded weights)")
    parser.add_argument("--blocklist", help="blocklist file (default: the demo blocklist of one generated image)")
    parser.add_argument("--threshold", type=float, help="override the --blocklist's threshold")
    parser.add_argument("--device", default="cpu", help="torch device of the pipeline and the embedder")
    parser.add_argument("--steps", type=int, help="default denoising steps (default: 2 tiny, 30 --sd)")
    args = parser.parse_args(argv)

    import uvicorn

    from guardrail import embedder_from_spec
    from guardrail.offline import tiny_stable_diffusion_pipeline

    if args.sd:
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(args.sd).to(args.device)
    else:
        pipe = tiny_stable_diffusion_pipeline()
    steps = args.steps or (30 if args.sd else DEMO_STEPS)
    if args.blocklist:
        blocklist = Blocklist.load(args.blocklist)
        spec = blocklist.spec if args.model is None else {**blocklist.spec, "model": args.model}
        embedder = embedder_from_spec(spec, pretrained=args.pretrained, device=args.device)
        guard = Guard(blocklist, embedder, threshold=args.threshold)
    else:
        guard = demo_guard(pipe, args.model or "ViT-S-32", args.pretrained, steps=steps, device=args.device)
    uvicorn.run(create_app(pipe, guard, default_steps=steps), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
