"""examples/serve.py: the HTTP API's limits and errors, its metrics, and a real load test over a socket.

The module builds the server's default app once (tiny offline pipeline, seeded ViT-S-32, a blocklist of the image of
`DEMO_SEED`), so the no-argument factory is what is tested; apps with other limits share its pipeline and guard.
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import importlib.util
import io
import queue
import random
import struct
import threading
import time
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("python_multipart")
httpx = pytest.importorskip("httpx")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from guardrail import Guard  # noqa: E402
from guardrail.images import load_image  # noqa: E402

SERVE = Path(__file__).resolve().parent.parent / "examples" / "serve.py"


def load_serve():
    spec = importlib.util.spec_from_file_location("guardrail_example_serve", SERVE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


serve = load_serve()


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims `width` x `height` and whose pixel data is garbage: only a header check accepts it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"not zlib data") + chunk(b"IEND", b"")


def files(*items: tuple[str, bytes]) -> list:
    return [("image", (name, data, "image/png")) for name, data in items]


def parse_metrics(text: str) -> dict[str, float]:
    """`name{labels}` -> value for every sample line of a Prometheus text exposition."""
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


# ---- fixtures ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def app():
    return serve.create_app()  # the no-argument factory: everything offline


@pytest.fixture(scope="module")
def pool(app) -> list[bytes]:
    """PNGs of the demo prompt for seeds 0-5, as the pipeline makes them; seed 1 is the blocklisted image."""
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in range(6)]
    images = app.state.pipe(serve.DEMO_PROMPT, num_images_per_prompt=6, num_inference_steps=serve.DEMO_STEPS,
                            generator=generators).images
    return [png_bytes(image) for image in images]


@pytest.fixture(scope="module")
def blocked_png(pool) -> bytes:
    return pool[serve.DEMO_SEED]


@pytest.fixture(scope="module")
def other_png(pool) -> bytes:
    return pool[3]


@pytest.fixture
def client(app):
    with TestClient(app) as test_client:
        yield test_client


@pytest.fixture
def make_client(app):
    """A client of a fresh app (fresh metrics, other limits) sharing the module app's pipeline and guard."""
    with contextlib.ExitStack() as stack:

        def make(guard: Guard | None = None, **limits) -> TestClient:
            limits.setdefault("default_steps", serve.DEMO_STEPS)  # a passed pipe would default to 30 steps
            fresh = serve.create_app(app.state.pipe, guard or app.state.guard, **limits)
            return stack.enter_context(TestClient(fresh))

        yield make


# ---- /healthz and /check -------------------------------------------------------------------------------------------


def test_healthz_reports_the_blocklist(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "blocklist_entries": 1, "model": "ViT-S-32"}


def test_check_matches_the_blocklisted_image_and_passes_another(client, blocked_png, other_png):
    response = client.post("/check", files=files(("blocked.png", blocked_png), ("other.png", other_png)))
    assert response.status_code == 200, response.text
    blocked, other = response.json()["verdicts"]
    assert blocked["image"] == "blocked.png" and other["image"] == "other.png"
    assert blocked["matched"] and blocked["entry_id"] == f"demo-seed-{serve.DEMO_SEED}"
    assert blocked["score"] >= serve.DEMO_THRESHOLD
    assert not other["matched"] and other["score"] < serve.DEMO_THRESHOLD


def test_check_accepts_one_image_as_the_raw_body(client, blocked_png):
    response = client.post("/check", content=blocked_png, headers={"content-type": "image/png"})
    assert response.status_code == 200, response.text
    assert [v["matched"] for v in response.json()["verdicts"]] == [True]


def test_check_verdicts_equal_guard_check(client, app, blocked_png, other_png):
    response = client.post("/check", files=files(("a.png", other_png), ("b.png", blocked_png)))
    direct = app.state.guard.check([load_image(io.BytesIO(other_png)), load_image(io.BytesIO(blocked_png))])
    assert [{k: v for k, v in item.items() if k != "image"} for item in response.json()["verdicts"]] == [
        serve.verdict_json(verdict) for verdict in direct
    ]


@pytest.mark.skipif(not hasattr(Guard, "disable"), reason="this Guard cannot disable entries")
def test_check_and_generate_follow_changes_to_the_callers_guard(make_client, app, blocked_png):
    guard = Guard(app.state.guard.blocklist, app.state.guard.embedder)  # not the shared one: it is changed here
    client = make_client(guard=guard)
    guard.disable(f"demo-seed-{serve.DEMO_SEED}")
    assert client.post("/check", content=blocked_png).json()["verdicts"][0]["matched"] is False
    images = client.post("/generate", json={"num_images": 2, "seed": 0}).json()["images"]
    assert [image["attempts"] for image in images] == [1, 1]
    guard.enable(f"demo-seed-{serve.DEMO_SEED}")
    assert client.post("/check", content=blocked_png).json()["verdicts"][0]["matched"] is True


def test_check_rejects_an_oversized_upload_by_content_length(make_client, other_png):
    client = make_client(max_upload_bytes=len(other_png) - 1)
    response = client.post("/check", content=other_png)
    assert response.status_code == 413
    assert response.json()["error"] == "upload_too_large"


def test_check_rejects_an_oversized_upload_while_reading_a_chunked_body(make_client, other_png):
    client = make_client(max_upload_bytes=len(other_png) - 1)

    def chunks():  # no Content-Length: the limit must be enforced while reading
        for start in range(0, len(other_png), 1024):
            yield other_png[start : start + 1024]

    response = client.post("/check", content=chunks())
    assert response.status_code == 413
    assert response.json()["error"] == "upload_too_large"


@pytest.mark.parametrize(
    ("width", "height", "why"),
    [(5000, 5000, "pixels"), (9000, 10, "side"), (100_000, 100_000, "PIL's own bomb limit")],
)
def test_check_rejects_too_large_dimensions_from_the_header_alone(client, width, height, why):
    # The pixel data is garbage: decoding it would give 422, so a 413 shows the header was checked first.
    response = client.post("/check", files=files(("huge.png", png_header_only(width, height))))
    assert response.status_code == 413, (why, response.text)
    assert response.json()["error"] == "image_too_large"
    assert "huge.png" in response.json()["detail"]


def test_check_applies_the_pixel_limit_to_real_images(make_client, other_png):
    response = make_client(max_pixels=63 * 63).post("/check", files=files(("other.png", other_png)))
    assert response.status_code == 413
    assert "64x64" in response.json()["detail"]


@pytest.mark.parametrize(
    ("make_upload", "status", "error"),
    [
        (lambda png: b"this is not an image", 422, "not_an_image"),
        (lambda png: png[: len(png) // 2], 422, "undecodable_image"),
        (lambda png: png[:40], 422, "not_an_image"),  # PIL cannot even identify a PNG cut inside its header
        (lambda png: b"%!PS-Adobe-3.0 EPSF-3.0\n", 422, "not_an_image"),  # formats that run programs are refused
        (lambda png: b"", 400, "empty_image"),
    ],
    ids=["not-an-image", "truncated-png", "header-only-png", "eps", "empty-file"],
)
def test_check_rejects_bad_images_with_a_clear_4xx(client, other_png, make_upload, status, error):
    response = client.post("/check", files=files(("upload.png", make_upload(other_png))))
    assert response.status_code == status, response.text
    assert response.json()["error"] == error
    assert "upload.png" in response.json()["detail"]


def test_check_rejects_malformed_requests_with_400_or_413(make_client, other_png):
    client = make_client(max_batch=2)
    cases = {
        "empty_body": client.post("/check", content=b""),
        "too_many_images": client.post("/check", files=files(*[("x.png", other_png)] * 3)),
        "not_a_file": client.post("/check", data={"image": "text"}, files=files(("x.png", other_png))),
        "bad_multipart": client.post(
            "/check", content=b"garbage", headers={"content-type": "multipart/form-data; boundary=xyz"}
        ),
        "no_images": client.post("/check", content=b"--xyz--\r\n",
                                 headers={"content-type": "multipart/form-data; boundary=xyz"}),
    }
    statuses = {code: (response.status_code, response.json().get("error")) for code, response in cases.items()}
    assert statuses == {
        "empty_body": (400, "empty_body"),
        "too_many_images": (413, "too_many_images"),
        "not_a_file": (400, "not_a_file"),
        "bad_multipart": (400, "bad_multipart"),
        "no_images": (400, "no_images"),
    }


# ---- /generate -----------------------------------------------------------------------------------------------------


def test_generate_resamples_the_blocklisted_seed(client, app):
    response = client.post("/generate", json={"prompt": serve.DEMO_PROMPT, "num_images": 2, "seed": 0})
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["seed"], body["steps"]) == (0, serve.DEMO_STEPS)
    report = [{k: image[k] for k in ("attempts", "blocked", "exhausted", "matched", "stage")}
              for image in body["images"]]
    # Slot 1 has seed DEMO_SEED: its first image is the blocklisted one, and the prompt is the entry's caption, so
    # its retry skips the plain reseed.
    assert report == [
        {"attempts": 1, "blocked": False, "exhausted": False, "matched": False, "stage": "first"},
        {"attempts": 2, "blocked": False, "exhausted": False, "matched": False, "stage": "steer_away"},
    ]
    assert all(image["memorization"] > 0 for image in body["images"]), "the step-1 score of each slot"
    images = [load_image(io.BytesIO(base64.b64decode(image["png_base64"]))) for image in body["images"]]
    assert all(image.size == (64, 64) for image in images)
    rechecked = app.state.guard.check(images)  # the reported verdicts are those of the returned PNGs
    assert [v.score for v in rechecked] == pytest.approx([image["score"] for image in body["images"]], abs=1e-6)


def test_generate_blocks_a_slot_that_matches_on_every_attempt(make_client, app):
    everything_matches = Guard(app.state.guard.blocklist, app.state.guard.embedder, threshold=-1.0)
    client = make_client(guard=everything_matches)
    image = client.post("/generate", json={"num_images": 1, "seed": 5}).json()["images"][0]
    assert (image["attempts"], image["blocked"], image["exhausted"]) == (4, True, True)
    black = np.asarray(load_image(io.BytesIO(base64.b64decode(image["png_base64"]))))
    assert not black.any()
    metrics = parse_metrics(client.get("/metrics").text)
    assert metrics["guardrail_resamples_total"] == 3 and metrics["guardrail_exhausted_total"] == 1


@pytest.mark.parametrize(
    "body",
    [{"num_images": 0}, {"num_images": 5}, {"steps": 0}, {"steps": 101}, {"prompt": ""}, {"seed": -1},
     {"seed": "x"}, {"height": 4096}],
    ids=["no-images", "too-many-images", "no-steps", "too-many-steps", "empty-prompt", "negative-seed",
         "string-seed", "unknown-field"],
)
def test_generate_rejects_out_of_bounds_requests_with_422(client, body):
    response = client.post("/generate", json=body)
    assert response.status_code == 422, response.text
    assert "error" in response.json()


def test_generate_rejects_invalid_json_with_422(client):
    response = client.post("/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 422


class BlockingPipe:
    """A stand-in text-to-image pipeline that waits until released and records how many calls overlap."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.running = self.most_running = 0

    def __call__(self, prompt=None, num_images_per_prompt=1, num_inference_steps=1, generator=None):
        with self.lock:
            self.running += 1
            self.most_running = max(self.most_running, self.running)
        self.release.wait(20)
        with self.lock:
            self.running -= 1
        return SimpleNamespace(images=[Image.new("RGB", (64, 64), (200, 30, 30))] * num_images_per_prompt)


def test_generations_run_one_at_a_time_and_excess_ones_get_503(app):
    pipe = BlockingPipe()
    served = serve.create_app(pipe, app.state.guard, max_queued_generations=2)
    with running_server(served) as base_url, httpx.Client(base_url=base_url, timeout=20.0) as http:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            waiting = [pool.submit(http.post, "/generate", json={"seed": seed}) for seed in (0, 1)]
            deadline = time.monotonic() + 10
            while parse_metrics(http.get("/metrics").text)["guardrail_generations_in_flight"] < 2:
                assert time.monotonic() < deadline, "the two generations never got in flight"
                time.sleep(0.02)
            busy = http.post("/generate", json={"seed": 2})
            health = http.get("/healthz")  # the event loop is free while generations wait
            pipe.release.set()
            statuses = [future.result().status_code for future in waiting]
    assert (busy.status_code, busy.json()["error"]) == (503, "busy")
    assert health.status_code == 200
    assert statuses == [200, 200]
    assert pipe.most_running == 1, "the pipeline must never run two generations at once"


# ---- /metrics ------------------------------------------------------------------------------------------------------


def test_metrics_count_checks_matches_resamples_and_requests(make_client, blocked_png, other_png):
    client = make_client()
    assert client.post("/check", files=files(("b.png", blocked_png), ("o.png", other_png))).status_code == 200
    assert client.post("/generate", json={"num_images": 2, "seed": 0}).status_code == 200
    assert client.post("/check", content=b"not an image").status_code == 422
    assert client.get("/healthz").status_code == 200
    assert client.get("/no-such-path").status_code == 404
    response = client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    metrics = parse_metrics(response.text)
    entry = f"demo-seed-{serve.DEMO_SEED}"
    expected = {
        "guardrail_checks_total": 2 + 2 + 1,  # /check's two images, /generate's two images and one resample
        f'guardrail_matches_total{{entry_id="{entry}"}}': 1 + 1,  # the uploaded copy and the replaced slot
        "guardrail_resamples_total": 1,
        "guardrail_exhausted_total": 0,
        'guardrail_http_requests_total{path="/check",status="200"}': 1,
        'guardrail_http_requests_total{path="/check",status="422"}': 1,
        'guardrail_http_requests_total{path="/generate",status="200"}': 1,
        'guardrail_http_requests_total{path="/healthz",status="200"}': 1,
        'guardrail_http_requests_total{path="other",status="404"}': 1,
        "guardrail_check_seconds_count": 1,
        'guardrail_check_seconds_bucket{le="+Inf"}': 1,
        "guardrail_generate_seconds_count": 1,
        'guardrail_generate_seconds_bucket{le="+Inf"}': 1,
    }
    assert {name: metrics.get(name) for name in expected} == expected
    assert 0 < metrics["guardrail_check_seconds_sum"] and 0 < metrics["guardrail_generate_seconds_sum"]
    for histogram in ("guardrail_check_seconds", "guardrail_generate_seconds"):
        buckets = [value for name, value in metrics.items() if name.startswith(f"{histogram}_bucket")]
        assert buckets == sorted(buckets), "buckets are cumulative"
    for family in ("checks_total", "matches_total", "resamples_total", "exhausted_total", "http_requests_total",
                   "check_seconds", "generate_seconds"):
        assert f"# TYPE guardrail_{family} " in response.text


def test_metrics_escape_label_values():
    metrics = serve.Metrics()
    metrics.record_request('/a"b\\c\nd', 200)
    assert 'path="/a\\"b\\\\c\\nd"' in metrics.render()


def test_metrics_are_exact_under_concurrent_updates():
    metrics = serve.Metrics()

    def hammer() -> None:
        for _ in range(2000):
            metrics.record_request("/check", 200)
            metrics.record_check(0.01)

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    samples = parse_metrics(metrics.render())
    assert samples['guardrail_http_requests_total{path="/check",status="200"}'] == 16_000
    assert samples["guardrail_check_seconds_count"] == 16_000
    assert samples['guardrail_check_seconds_bucket{le="0.01"}'] == 16_000


# ---- a real server under load --------------------------------------------------------------------------------------


@contextlib.contextmanager
def running_server(app, timeout: float = 20.0):
    """uvicorn on 127.0.0.1 and a free port, in a thread; yields its base URL and stops it on exit."""
    import uvicorn

    config = uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="off", log_config=None, access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        assert not thread.is_alive(), "uvicorn did not stop"


def ms(seconds: list[float], q: float) -> str:
    """The `q`th percentile (nearest rank) in milliseconds, for the printed summary."""
    if not seconds:
        return "n/a"
    ordered = sorted(seconds)
    return f"{ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))] * 1000:.0f} ms"


CHECK_REQUESTS = 200
GENERATE_REQUESTS = 4
CLIENT_THREADS = 8
TIME_LIMIT_S = 30.0


def test_load_check_and_generate_over_a_real_socket(app, pool):
    guard = app.state.guard
    served = serve.create_app(app.state.pipe, guard, default_steps=serve.DEMO_STEPS, max_upload_bytes=2**20)
    rng = random.Random(0)
    batches = [rng.sample(range(len(pool)), rng.randint(1, 4)) for _ in range(8)]
    # What the guard says when asked directly, one batch after another: the server must say exactly the same.
    expected = [
        [serve.verdict_json(v) for v in guard.check([load_image(io.BytesIO(pool[i])) for i in batch])]
        for batch in batches
    ]
    jobs: queue.Queue = queue.Queue()
    plan = [("check", n % len(batches)) for n in range(CHECK_REQUESTS)] + [("generate", 0)] * GENERATE_REQUESTS
    rng.shuffle(plan)
    for job in plan:
        jobs.put(job)

    results: list[dict] = []
    results_lock = threading.Lock()
    health: list[float] = []
    done = threading.Event()

    def client_thread(base_url: str, deadline: float) -> None:
        with httpx.Client(base_url=base_url, timeout=20.0) as http:
            while time.monotonic() < deadline:
                try:
                    kind, batch = jobs.get_nowait()
                except queue.Empty:
                    return
                images = len(batches[batch]) if kind == "check" else 2
                result = {"kind": kind, "ok": False, "mismatch": False, "images": images}
                started = time.perf_counter()
                try:
                    if kind == "check":
                        parts = [("image", (f"{i}.png", pool[i], "image/png")) for i in batches[batch]]
                        response = http.post("/check", files=parts)
                    else:
                        response = http.post("/generate", json={"num_images": 2, "seed": 0})
                    result["seconds"] = time.perf_counter() - started
                    result["ok"] = response.status_code == 200
                    if result["ok"] and kind == "check":
                        got = [{k: v for k, v in item.items() if k != "image"} for item in response.json()["verdicts"]]
                        result["mismatch"] = got != expected[batch]
                    elif result["ok"]:
                        result["mismatch"] = [image["attempts"] for image in response.json()["images"]] != [1, 2]
                except httpx.HTTPError as error:
                    result["seconds"], result["error"] = time.perf_counter() - started, repr(error)
                with results_lock:
                    results.append(result)

    def health_thread(base_url: str) -> None:
        with httpx.Client(base_url=base_url, timeout=20.0) as http:
            while not done.wait(0.1):
                started = time.perf_counter()
                if http.get("/healthz").status_code == 200:
                    health.append(time.perf_counter() - started)

    with running_server(served) as base_url:
        started = time.perf_counter()
        deadline = time.monotonic() + TIME_LIMIT_S
        workers = [threading.Thread(target=client_thread, args=(base_url, deadline)) for _ in range(CLIENT_THREADS)]
        prober = threading.Thread(target=health_thread, args=(base_url,))
        for thread in [*workers, prober]:
            thread.start()
        for thread in workers:
            thread.join(TIME_LIMIT_S + 30)
        elapsed = time.perf_counter() - started
        done.set()
        prober.join(30)
        with httpx.Client(base_url=base_url, timeout=20.0) as http:  # a real socket answers 413, not a reset
            oversized = http.post("/check", content=bytes(2**20 + 1))
            metrics = parse_metrics(http.get("/metrics").text)

    checks = [r["seconds"] for r in results if r["kind"] == "check" and r["ok"]]
    generations = [r["seconds"] for r in results if r["kind"] == "generate" and r["ok"]]
    failures = [r for r in results if not r["ok"]]
    mismatches = [r for r in results if r["mismatch"]]
    print(
        f"\nload test: {len(results)}/{len(plan)} requests ({CHECK_REQUESTS} /check of 1-4 images, "
        f"{GENERATE_REQUESTS} /generate of 2) from {CLIENT_THREADS} threads in {elapsed:.1f} s, "
        f"torch threads {torch.get_num_threads()}\n"
        f"  throughput {len(results) / elapsed:.1f} requests/s "
        f"({sum(r['images'] for r in results if r['kind'] == 'check' and r['ok']) / elapsed:.1f} checked "
        f"images/s)\n"
        f"  /check    p50 {ms(checks, 50)}  p99 {ms(checks, 99)}\n"
        f"  /generate p50 {ms(generations, 50)}  max {ms(generations, 100)}\n"
        f"  /healthz during load: {len(health)} probes, p50 {ms(health, 50)}, max {ms(health, 100)}\n"
        f"  failed requests {len(failures)}, verdict mismatches {len(mismatches)}"
    )
    assert not failures, failures[:3]
    assert not mismatches
    # The time limit may stop the run early on a busy machine; too few requests would test nothing.
    assert len(results) >= len(plan) // 2, f"only {len(results)} of {len(plan)} requests finished in {TIME_LIMIT_S} s"
    assert health and max(health) < 2.0, "/healthz must stay responsive while the CPU works"
    assert oversized.status_code == 413
    # Counters updated from many threads add up exactly.
    finished_checks = [r for r in results if r["kind"] == "check"]
    finished_generations = len(results) - len(finished_checks)
    assert metrics['guardrail_http_requests_total{path="/check",status="200"}'] == len(finished_checks)
    assert metrics['guardrail_http_requests_total{path="/check",status="413"}'] == 1
    assert metrics["guardrail_check_seconds_count"] == len(finished_checks)
    assert metrics["guardrail_generate_seconds_count"] == finished_generations
    assert metrics["guardrail_resamples_total"] == finished_generations  # slot 1 of every generation
    assert metrics["guardrail_checks_total"] == sum(r["images"] for r in finished_checks) + 3 * finished_generations
