"""The README as a specification: its CI commands are what CI runs, and every quickstart runs, offline.

Each quickstart's code blocks are taken from README.md and run as written, after a small, explicit table of
substitutions puts offline stand-ins where the README loads from the Hub or needs a GPU: the tiny seeded Stable
Diffusion pipeline, seeded open_clip weights in local files, images made here, and a loopback web server for the
manifest's URLs. A substitution whose source text is no longer in the README fails the test, and so does a
quickstart or a code block the table does not know: the README cannot drift away from what is run here.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import io
import json
import re
import shlex
import tarfile
import threading
from pathlib import Path

import pytest
import torch
from PIL import Image

import guardrail
from guardrail import Blocklist

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
STEPS = 2  # the README's calls use the pipeline's default 50 steps; the tiny pipeline needs 2

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def readme_commands() -> list[str]:
    readme = README.read_text(encoding="utf-8")
    return re.findall(r"<!-- ci:command-\d[^>]*-->\n```bash\n(.+?)\n```", readme)


def test_ci_runs_the_readme_install_demo_and_test_commands_verbatim():
    commands = readme_commands()
    assert len(commands) == 2 and "guardrail demo" in commands[0] and "pytest" in commands[1]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    for command in commands:
        assert command in ci, f"{command!r} is not a line of .ci/run"


def test_every_name_the_readme_imports_from_guardrail_exists():
    readme = README.read_text(encoding="utf-8")
    for names in re.findall(r"from guardrail import ([\w, ]+)", readme):
        for name in names.split(","):
            assert hasattr(guardrail, name.strip()), name


def test_no_doc_or_example_names_the_retired_runwayml_repository():
    """`runwayml/stable-diffusion-v1-5` left the Hub in 2024; a copied command must name a repository that exists."""
    paths = [ROOT / "README.md", *(ROOT / "examples").rglob("*.py"), *(ROOT / "docs").rglob("*.md"),
             *(ROOT / "guardrail").rglob("*.py"), *(ROOT / "blocklists").rglob("*.md")]
    stale = [str(path.relative_to(ROOT)) for path in paths if "runwayml/" in path.read_text(encoding="utf-8")]
    assert not stale, f"use stable-diffusion-v1-5/stable-diffusion-v1-5 instead of runwayml/ in {stale}"


# ---- the quickstarts, run -------------------------------------------------------------------------------------


def quickstart_blocks() -> dict[str, list[tuple[str, str]]]:
    """`{"Quickstart 1": [(language, code), ...], ...}`: the fenced code blocks of each `## Quickstart N` section."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    readme = README.read_text(encoding="utf-8")
    for match in re.finditer(r"^## ([^\n]+)$|^```(\w*)\n(.*?)^```$", readme, re.M | re.S):
        heading, language, code = match.groups()
        if heading is not None:
            quickstart = re.match(r"Quickstart \d+", heading)
            current = quickstart.group(0) if quickstart else None
            if current:
                sections[current] = []
        elif current:
            sections[current].append((language, code))
    return sections


def substituted(code: str, substitutions: list[tuple[str, str]], where: str) -> str:
    """`code` with each `(README text, stand-in)` replaced; README text that is gone fails the test.

    Runs of whitespace in the README text match any whitespace, so re-wrapping a line is not drift; changing a
    word is.
    """
    for old, new in substitutions:
        pattern = r"\s+".join(map(re.escape, old.split()))
        code, count = re.subn(pattern, lambda _: new, code)
        assert count, f"{where}: the README no longer contains {old!r}; update the substitution table in {__file__}"
    return code


PROMPT = "a photo of an astronaut riding a horse"
# README text that the substitution tables below replace before running: the hub id is never loaded (no network).
LOAD_SD = (
    'StableDiffusionPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5", '
    'torch_dtype=torch.float16).to("cuda")'
)
LOAD_CLIP = 'OpenCLIPEmbedder("ViT-L-14-quickgelu", pretrained="openai", device="cuda")'

PYTHON_SUBSTITUTIONS = {
    "Quickstart 1": [
        (LOAD_SD, "TINY_SD_PIPELINE"),
        (LOAD_CLIP, 'OpenCLIPEmbedder("ViT-S-32", pretrained=WEIGHTS)'),
        ('torch.Generator("cuda")', 'torch.Generator("cpu")'),
        ("num_images_per_prompt=4,", "num_images_per_prompt=4, num_inference_steps=STEPS,"),
    ],
    "Quickstart 2": [(LOAD_CLIP, 'OpenCLIPEmbedder("ViT-S-32", pretrained=WEIGHTS)')],
    "Quickstart 4": [("num_images_per_prompt=4,", "num_images_per_prompt=4, num_inference_steps=STEPS,"),
                     ('torch.Generator("cuda")', 'torch.Generator("cpu")')],
}

# Quickstart 3 runs through guardrail.cli.main with the bundled tiny open_clip model and its weights file (fast to
# load), and with files made by the `workspace` fixture. A blocklist built from a weights file needs the file again
# (the README says so), hence --pretrained on check and calibrate.
CLI_SUBSTITUTIONS = [
    ("--model ViT-L-14-quickgelu --pretrained openai", "--model guardrail-tiny-vit --pretrained {weights}"),
    ("shards/train-{0000..0099}.tar", "shards/train-{0000..0001}.tar"),
    ("blocklists/sd-v1-memorized.jsonl", "sd-v1-memorized.jsonl"),
    ("guardrail check -b catalogue.safetensors", "guardrail check -b catalogue.safetensors --pretrained {weights}"),
    ("guardrail calibrate -b catalogue.safetensors",
     "guardrail calibrate -b catalogue.safetensors --pretrained {weights}"),
    ("guardrail demo --model ViT-B-32 --pretrained openai",
     "guardrail demo --model guardrail-tiny-vit --pretrained {weights} --samples 4 --steps 2"),
]
CLI_EXIT_CODES = {"guardrail check -b catalogue.safetensors out1.png out2.png": 1}  # out1.png is a copy; others 0


def test_the_table_knows_every_quickstart_and_every_code_block():
    languages = {name: [language for language, _ in blocks] for name, blocks in quickstart_blocks().items()}
    assert languages == {"Quickstart 1": ["python"], "Quickstart 2": ["python"], "Quickstart 3": ["bash"],
                         "Quickstart 4": ["python"]}, (
        "a quickstart or a code block was added or removed: run it in this file too"
    )


def bundled_photo(name: str, size: int = 128) -> Image.Image:
    """A photo shipped in the scikit-image wheel, as a small RGB image."""
    import skimage.data

    with Image.open(Path(skimage.data.__file__).parent / name) as image:
        image = image.convert("RGB")
    image.thumbnail((size, size))
    return image


@pytest.fixture(scope="module")
def readme_images(sd_pipe):
    """What the tiny pipeline makes of the README's prompt for seeds 0-3: slot 1 plays the memorized image."""
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in range(4)]
    return sd_pipe(PROMPT, num_images_per_prompt=4, num_inference_steps=STEPS, generator=generators).images


@pytest.fixture
def memorized_file(readme_images, embedder, tmp_path, monkeypatch):
    """`sd-v1-memorized.safetensors` in the working directory, holding the image the README's call makes in slot 1."""
    from conftest import TEST_THRESHOLD

    monkeypatch.chdir(tmp_path)
    entry = {"id": "laion-1", "caption": PROMPT}
    Blocklist.from_images([readme_images[1]], embedder, entries=[entry], threshold=TEST_THRESHOLD).save(
        "sd-v1-memorized.safetensors"
    )
    return tmp_path / "sd-v1-memorized.safetensors"


def test_quickstart_1_resamples_the_memorized_slot(memorized_file, sd_pipe, weights_file):
    (code,) = [code for _, code in quickstart_blocks()["Quickstart 1"]]
    assert PROMPT in code and "[1, 2, 1, 1]" in code, "the README's prompt and promised attempts changed"
    namespace = {"TINY_SD_PIPELINE": sd_pipe, "WEIGHTS": str(weights_file), "STEPS": STEPS}
    exec(substituted(code, PYTHON_SUBSTITUTIONS["Quickstart 1"], "Quickstart 1"), namespace)
    report = namespace["out"].guardrail
    assert report.attempts == [1, 2, 1, 1], "the README promises: slot 1 matched and was resampled once"
    assert not any(verdict.matched for verdict in report.verdicts) and len(namespace["out"].images) == 4


def test_quickstart_2_prints_the_matched_entry(memorized_file, readme_images, weights_file, capsys):
    (code,) = [code for _, code in quickstart_blocks()["Quickstart 2"]]
    namespace = {"WEIGHTS": str(weights_file), "images": readme_images}
    exec(substituted(code, PYTHON_SUBSTITUTIONS["Quickstart 2"], "Quickstart 2"), namespace)
    assert [verdict.matched for verdict in namespace["verdicts"]] == [False, True, False, False]
    (line,) = capsys.readouterr().out.strip().splitlines()
    assert line.endswith(f"laion-1 {PROMPT}")


def test_quickstart_4_calibrates_a_score_threshold_and_reports_what_sampling_saw(memorized_file, sd_pipe, embedder):
    from guardrail import Guard, MemorizationThreshold

    (code,) = [code for _, code in quickstart_blocks()["Quickstart 4"]]
    (memorized_file.parent / "benign_prompts.txt").write_text(
        "\n".join(f"a photo of object number {i} on a table" for i in range(120)), encoding="utf-8")
    namespace = {"pipe": sd_pipe, "guard": Guard(Blocklist.load(memorized_file), embedder), "STEPS": STEPS}
    exec(substituted(code, PYTHON_SUBSTITUTIONS["Quickstart 4"], "Quickstart 4"), namespace)
    threshold = MemorizationThreshold.load(memorized_file.parent / "memorization.json")
    assert threshold.benign_prompts == 120 and threshold.fpr == 0.01
    report = namespace["out"].guardrail
    assert len(report.memorization) == 4 and all(score > 0 for score in report.memorization)
    assert report.stages[1] != "first" and report.stages[0] == "first", "seed 1 makes the memorized image"
    assert len(report.stopped_at) == 4


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep the test output clean
        pass


@contextlib.contextmanager
def loopback_server(folder: Path):
    """Serve `folder` over http on 127.0.0.1 (the tests may reach loopback only); yields the base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=folder))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def write_shard(path: Path, samples: dict[str, Image.Image]) -> None:
    """A webdataset shard: `key.jpg` and `key.txt` per sample."""
    with tarfile.open(path, "w") as tar:
        for key, image in samples.items():
            for name, data in ((f"{key}.jpg", _encoded(image, "JPEG")), (f"{key}.txt", key.encode())):
                member = tarfile.TarInfo(name)
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))


def _encoded(image: Image.Image, kind: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, kind, **options)
    return buffer.getvalue()


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """The files Quickstart 3 names, made from photos bundled with scikit-image, as the working directory."""
    monkeypatch.chdir(tmp_path)
    for folder in ("my-catalogue", "shards", "served", "other-images"):
        (tmp_path / folder).mkdir()
    for name in ("astronaut.png", "coffee.png", "chelsea.png"):
        bundled_photo(name).save(tmp_path / "my-catalogue" / name)
    write_shard(tmp_path / "shards" / "train-0000.tar", {"rocket": bundled_photo("rocket.jpg")})
    write_shard(tmp_path / "shards" / "train-0001.tar", {"camera": bundled_photo("camera.png")})
    for name in ("horse.png", "moon.png"):
        bundled_photo(name).save(tmp_path / "served" / name)
    Image.open(io.BytesIO(_encoded(bundled_photo("astronaut.png"), "JPEG", quality=85))).save(tmp_path / "out1.png")
    bundled_photo("brick.png").save(tmp_path / "out2.png")
    bundled_photo("coins.png").save(tmp_path / "out.png")
    for name in ("motorcycle_left.png", "logo.png", "ihc.png", "grass.png", "text.png", "gravel.png"):
        bundled_photo(name).save(tmp_path / "other-images" / name)
    return tmp_path


def readme_cli_commands() -> list[str]:
    """The `guardrail ...` commands of Quickstart 3, continuation lines joined and comments dropped."""
    ((_, code),) = quickstart_blocks()["Quickstart 3"]
    joined = re.sub(r"\\\n\s*", " ", code)
    commands = [line.split(" #", 1)[0].strip() for line in joined.splitlines() if not line.lstrip().startswith("#")]
    return [" ".join(command.split()) for command in commands if command]


def test_quickstart_3_commands_run_with_the_exit_codes_it_states(workspace, capsys):
    from guardrail.cli import main
    from guardrail.demo import DEMO_EMBEDDER_WEIGHTS

    commands = readme_cli_commands()
    assert commands and all(command.startswith("guardrail ") for command in commands), commands
    assert set(CLI_EXIT_CODES) <= set(commands), "a command with a stated exit code changed in the README"
    with loopback_server(workspace / "served") as base:
        served = ("horse.png", "moon.png")
        rows = [{"caption": name, "index": i, "url": f"{base}/{name}"} for i, name in enumerate(served)]
        (workspace / "sd-v1-memorized.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        block = substituted("\n".join(commands), CLI_SUBSTITUTIONS, "Quickstart 3")
        for readme_command, command in zip(commands, block.splitlines()):
            argv = shlex.split(command.replace("{weights}", str(DEMO_EMBEDDER_WEIGHTS)))
            code = main(argv[1:])
            output = capsys.readouterr()
            assert code == CLI_EXIT_CODES.get(readme_command, 0), f"{readme_command}\n{output.out}\n{output.err}"

    assert len(Blocklist.load("catalogue.safetensors")) == 5  # 3 folder images + 2 shard samples
    assert len(Blocklist.load("sd.safetensors")) == 2, "both URL entries were downloaded"
    assert len(Blocklist.load("all.safetensors")) == 7
    assert json.loads(Path("build-report.json").read_text())["skipped"] == 0
    assert Blocklist.load("calibrated.safetensors").threshold != Blocklist.load("catalogue.safetensors").threshold
    assert json.loads(Path("guardrail-demo/report.json").read_text())["samples"] == 4
    memorization = json.loads(Path("memorization.json").read_text())
    assert memorization["pipeline"].startswith("DigitsPipeline") and memorization["benign_prompts"] >= 25
