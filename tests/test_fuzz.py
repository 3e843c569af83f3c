"""Hostile files: every damaged blocklist is a BlocklistError, every bad image an ImageDecodeError, nothing unpickles.

Property tests with hypothesis, derandomized (the same cases every run) and bounded so the file runs in well under a
minute on two cores. Each property counts the cases it ran in `CASES`; the counts print at the end of the module.
"""

from __future__ import annotations

import copy
import io
import json
import pickle
import resource
import struct
import tracemalloc
import zlib
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from guardrail import Blocklist, BlocklistError, Guard, ImageDecodeError
from guardrail.blocklist import content_sha256
from guardrail.images import load_image, to_pil_images

FUZZ = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
MAX_PEAK_BYTES = 200 * 2**20
"""No hostile input may make guardrail allocate more than this (the files themselves are a few kB)."""

CASES: Counter = Counter()
SPEC = {"family": "open_clip", "model": "test", "dim": 8}


@pytest.fixture(scope="module", autouse=True)
def report_case_counts():
    yield
    print("\nfuzz cases run per property:")
    for name, count in sorted(CASES.items()):
        print(f"  {name:<44} {count}")


@contextmanager
def bounded_memory():
    """Fails when Python-visible allocations (numpy's too) peak above MAX_PEAK_BYTES, or peak RSS grows by that much."""
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    tracemalloc.start()
    try:
        yield
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    rss_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    assert peak < MAX_PEAK_BYTES, f"a hostile input made guardrail allocate {peak / 2**20:.0f} MiB"
    assert rss_growth < MAX_PEAK_BYTES, f"peak RSS grew by {rss_growth / 2**20:.0f} MiB"


# ---- blocklist files ---------------------------------------------------------------------------------------------


def _unit(n: int, dim: int = 8) -> np.ndarray:
    vectors = np.random.default_rng(0).standard_normal((n, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


ORIGINAL = Blocklist(
    _unit(3),
    [{"id": f"img-{i}", "caption": f"caption {i} ✓", "source": f"/data/{i}.png"} for i in range(3)],
    spec=SPEC,
    threshold=0.9,
    created="2026-11-01T00:00:00+00:00",
)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def valid_file(workdir) -> bytes:
    return ORIGINAL.save(workdir / "valid.safetensors").read_bytes()


def _split(data: bytes) -> tuple[dict, bytes]:
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def _join(header: object, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def _load_outcome(path: Path, data: bytes) -> Blocklist | None:
    """Blocklist.load on `data`: the blocklist, or None for a BlocklistError. Any other exception fails the test."""
    path.write_bytes(data)
    try:
        return Blocklist.load(path)
    except BlocklistError:
        return None


def _assert_same_as_original(loaded: Blocklist) -> None:
    """A damaged file that still loads must be the very same blocklist: no silent change gets through."""
    np.testing.assert_array_equal(loaded.embeddings, ORIGINAL.embeddings)
    assert loaded.entries == ORIGINAL.entries and loaded.spec == ORIGINAL.spec
    assert loaded.threshold == ORIGINAL.threshold and loaded.created == ORIGINAL.created


def test_the_unmutated_file_loads(workdir, valid_file):
    _assert_same_as_original(Blocklist.load(ORIGINAL.save(workdir / "again.safetensors")))


@FUZZ
@given(data=st.data())
def test_every_mutated_file_raises_blocklist_error_or_loads_unchanged(workdir, valid_file, data):
    """Byte flips anywhere: the length field, the JSON header, the padding, the tensors."""
    mutated = bytearray(valid_file)
    region = data.draw(st.sampled_from(["length", "header", "body", "anywhere"]))
    header_end = 8 + struct.unpack("<Q", valid_file[:8])[0]
    low, high = {"length": (0, 8), "header": (8, header_end), "body": (header_end, len(valid_file)),
                 "anywhere": (0, len(valid_file))}[region]
    flips = data.draw(st.lists(st.tuples(st.integers(low, high - 1), st.integers(0, 255)), min_size=1, max_size=6))
    for position, value in flips:
        mutated[position] = value
    CASES["blocklist: byte mutations"] += 1
    with bounded_memory():
        loaded = _load_outcome(workdir / "mutated.safetensors", bytes(mutated))
    if loaded is not None:  # e.g. a space of the header padding became a tab, or a byte was set to its own value
        _assert_same_as_original(loaded)


@FUZZ
@given(cut=st.integers(min_value=0, max_value=10_000))
def test_every_truncated_file_raises_blocklist_error(workdir, valid_file, cut):
    keep = cut % len(valid_file)
    CASES["blocklist: truncations"] += 1
    assert _load_outcome(workdir / "truncated.safetensors", valid_file[:keep]) is None


@FUZZ
@given(junk=st.binary(min_size=1, max_size=4096))
def test_appended_junk_raises_blocklist_error(workdir, valid_file, junk):
    CASES["blocklist: appended junk"] += 1
    assert _load_outcome(workdir / "junk.safetensors", valid_file + junk) is None


@FUZZ
@given(length=st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([2**63, 2**64 - 1, 2**32, 100_000_001])))
@example(length=2**63)
def test_a_lying_header_length_raises_blocklist_error_without_allocating_it(workdir, valid_file, length):
    true_length = struct.unpack("<Q", valid_file[:8])[0]
    if length == true_length:
        length += 1
    CASES["blocklist: header length field"] += 1
    with bounded_memory():
        assert _load_outcome(workdir / "length.safetensors", struct.pack("<Q", length) + valid_file[8:]) is None


HUGE = st.sampled_from([10**12, 2**31, 2**32 + 1, 2**53, 2**62, 2**64 - 1])
DTYPES = st.one_of(
    st.sampled_from(["I8", "U8", "F64", "F16", "BF16", "BOOL", "I64", "U16", "F8_E4M3", "C64", "f32", "", "F32 "]),
    st.text(max_size=8),
    st.integers(),
    st.none(),
)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@st.composite
def hostile_headers(draw, header: dict) -> dict:
    """The valid header with one tensor or the metadata rewritten by an attacker who did not re-sign it."""
    header = copy.deepcopy(header)
    target = draw(st.sampled_from(["embeddings", "entries", "__metadata__", "extra tensor", "whole header"]))
    if target in ("embeddings", "entries"):
        field = draw(st.sampled_from(["shape", "dtype", "data_offsets", "drop"]))
        if field == "shape":
            header[target]["shape"] = draw(st.lists(st.one_of(HUGE, st.integers(-5, 600)), max_size=4))
        elif field == "dtype":
            header[target]["dtype"] = draw(DTYPES)
        elif field == "data_offsets":
            header[target]["data_offsets"] = draw(st.lists(st.one_of(HUGE, st.integers(-5, 2000)), max_size=3))
        else:
            del header[target]
    elif target == "__metadata__":
        metadata = header["__metadata__"]
        key = draw(st.sampled_from(sorted(metadata) + ["other"]))
        action = draw(st.sampled_from(["drop", "json value", "string", "format", "not a dict"]))
        if action == "drop":
            metadata.pop(key, None)
        elif action == "json value":  # nested objects, numbers, null: safetensors metadata is strings only
            metadata[key] = draw(JSON)
        elif action == "string":
            metadata[key] = draw(st.text(max_size=40))
        elif action == "format":
            metadata["format"] = draw(st.sampled_from(["", "guardrail.blocklist ", "GUARDRAIL.BLOCKLIST", "pt", "np"]))
        else:
            header["__metadata__"] = draw(JSON)
    elif target == "extra tensor":
        header[draw(st.text(min_size=1, max_size=8))] = {
            "dtype": draw(DTYPES), "shape": draw(st.lists(HUGE, max_size=2)),
            "data_offsets": draw(st.lists(st.one_of(HUGE, st.integers(0, 400)), max_size=2)),
        }
    else:
        return draw(JSON)
    return header


@FUZZ
@given(data=st.data())
def test_every_rewritten_header_raises_blocklist_error_or_loads_unchanged(workdir, valid_file, data):
    """Huge shapes and offsets, wrong dtypes, metadata that is JSON but not ours, a header that is not a dict."""
    header, body = _split(valid_file)
    hostile = data.draw(hostile_headers(header))
    CASES["blocklist: rewritten headers"] += 1
    with bounded_memory():
        loaded = _load_outcome(workdir / "header.safetensors", _join(hostile, body))
    if loaded is not None:
        _assert_same_as_original(loaded)


@pytest.mark.parametrize("shape, offsets", [([10**12, 512], [0, 10**12 * 512 * 4]), ([10**12, 512], [0, 96]),
                                            ([2**62, 2**62], [0, 96]), ([3, 8], [0, 2**64 - 1])])
def test_a_header_claiming_huge_tensors_raises_blocklist_error_without_allocating_them(workdir, valid_file, shape,
                                                                                        offsets):
    header, body = _split(valid_file)
    header["embeddings"].update(shape=shape, data_offsets=offsets)
    CASES["blocklist: huge tensor claims (fixed)"] += 1
    with bounded_memory():
        assert _load_outcome(workdir / "huge.safetensors", _join(header, body)) is None


def _resigned(tensors: dict, metadata: dict) -> bytes:
    """A file a forger made with the real writer: self-consistent checksum, hostile content."""
    from safetensors.numpy import save as save_bytes

    metadata = {**metadata, "content_sha256": content_sha256(tensors, metadata)}
    return save_bytes(tensors, metadata=metadata)


def _original_parts() -> tuple[dict, dict]:
    return ORIGINAL._tensors_and_metadata("float32")


@FUZZ
@given(
    key=st.sampled_from(["spec", "threshold", "count", "created", "format_version", "entries", "embeddings"]),
    value=st.one_of(st.text(max_size=60), JSON.map(json.dumps)),
    dtype=st.sampled_from([np.float16, np.float32, np.float64, np.int8, np.uint8, np.bool_]),
)
def test_a_resigned_file_with_hostile_content_raises_blocklist_error_or_loads_valid(workdir, key, value, dtype):
    tensors, metadata = _original_parts()
    if key == "entries":
        tensors["entries"] = np.frombuffer(value.encode("utf-8"), np.uint8).copy()
    elif key == "embeddings":
        tensors["embeddings"] = np.frombuffer(value.encode("utf-8").ljust(8, b"\0")[:8], np.uint8).astype(dtype)[None]
    else:
        metadata[key] = value
    metadata.pop("content_sha256")
    CASES["blocklist: re-signed hostile content"] += 1
    with bounded_memory():
        loaded = _load_outcome(workdir / "forged.safetensors", _resigned(tensors, metadata))
    if loaded is not None:  # e.g. threshold "0.5": a valid file, so it must be valid in memory too
        assert len(loaded) == int(metadata["count"]) == len(loaded.embeddings)
        assert -1.0 <= loaded.threshold <= 1.0 and np.isfinite(loaded.embeddings).all()


@pytest.mark.parametrize("where", ["spec", "entries", "entry id"])
def test_absurdly_nested_json_in_a_resigned_file_raises_blocklist_error(workdir, where):
    deep = "[" * 100_000 + "]" * 100_000
    tensors, metadata = _original_parts()
    if where == "spec":
        metadata["spec"] = deep
    elif where == "entries":
        tensors["entries"] = np.frombuffer(((deep + "\n") * 3).encode(), np.uint8).copy()
    else:  # shallow enough for json, deep enough to trouble str()
        lines = "".join(json.dumps({"id": json.loads("[" * 900 + "]" * 900 if i == 0 else str(i))}) + "\n"
                        for i in range(3))
        tensors["entries"] = np.frombuffer(lines.encode(), np.uint8).copy()
    metadata.pop("content_sha256")
    CASES["blocklist: nested JSON (fixed)"] += 1
    outcome = _load_outcome(workdir / "nested.safetensors", _resigned(tensors, metadata))
    assert outcome is None or where == "entry id"


@FUZZ
@given(captions=st.lists(st.text(max_size=30), min_size=1, max_size=4))
@example(captions=["line\u2028separator", "next\x85line", "para\u2029graph", "form\x0cfeed\x1c"])
def test_any_caption_text_round_trips(workdir, captions):
    """Captions with U+2028, U+0085 and friends once split a record in two on load."""
    entries = [{"id": str(i), "caption": caption} for i, caption in enumerate(captions)]
    blocklist = Blocklist(_unit(len(captions)), entries, spec=SPEC)
    CASES["blocklist: caption round trips"] += 1
    loaded = Blocklist.load(blocklist.save(workdir / "captions.safetensors"))
    assert [entry["caption"] for entry in loaded.entries] == captions


# ---- images ------------------------------------------------------------------------------------------------------


def _photo() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.astronaut()).resize((48, 48))


def _encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def encoded_photos() -> dict[str, bytes]:
    photo = _photo()
    return {
        "PNG": _encoded(photo, "PNG"),
        "JPEG": _encoded(photo, "JPEG", quality=85),
        "progressive JPEG": _encoded(photo, "JPEG", quality=60, progressive=True),
        "palette PNG": _encoded(photo.convert("P"), "PNG"),
        "RGBA PNG": _encoded(photo.convert("RGBA"), "PNG"),
        "GIF": _encoded(photo, "GIF"),
        "WEBP": _encoded(photo, "WEBP"),
        "BMP": _encoded(photo, "BMP"),
    }


def _assert_decodes_or_refuses(decode) -> str:
    """Runs `decode()`; it must return RGB PIL images or raise ImageDecodeError. Returns which one happened."""
    try:
        result = decode()
    except ImageDecodeError:
        return "refused"
    images = result if isinstance(result, list) else [result]
    assert images and all(isinstance(image, Image.Image) and image.mode == "RGB" for image in images)
    assert all(image.width > 0 and image.height > 0 for image in images)
    return "decoded"


def _every_image_route(blob: bytes, tmp_file: Path) -> list[str]:
    """The routes bytes take to the guard: a stream, a path, and a lazily opened PIL image from the caller."""
    outcomes = [_assert_decodes_or_refuses(lambda: load_image(io.BytesIO(blob)))]
    tmp_file.write_bytes(blob)
    outcomes.append(_assert_decodes_or_refuses(lambda: to_pil_images(str(tmp_file))))
    try:
        lazy = Image.open(io.BytesIO(blob))  # the caller's own PIL call; whatever it raises is not guardrail's
    except Exception:  # noqa: BLE001 (warnings are errors under pytest: DecompressionBombWarning lands here too)
        return outcomes
    outcomes.append(_assert_decodes_or_refuses(lambda: to_pil_images(lazy)))
    return outcomes


FORMATS = st.sampled_from(["PNG", "JPEG", "progressive JPEG", "palette PNG", "RGBA PNG", "GIF", "WEBP", "BMP"])


@FUZZ
@given(fmt=FORMATS, fraction=st.floats(0.0, 1.0, exclude_max=True))
def test_every_truncated_image_is_decoded_or_refused(workdir, encoded_photos, fmt, fraction):
    blob = encoded_photos[fmt]
    CASES["images: truncations"] += 1
    _every_image_route(blob[: int(len(blob) * fraction)], workdir / "truncated-image")


@FUZZ
@given(fmt=FORMATS, data=st.data())
def test_every_byte_flipped_image_is_decoded_or_refused(workdir, encoded_photos, fmt, data):
    blob = bytearray(encoded_photos[fmt])
    near_header = data.draw(st.booleans())  # the header and first chunks are where parsers trust lengths
    top = min(len(blob), 128) if near_header else len(blob)
    for position, value in data.draw(st.lists(st.tuples(st.integers(0, top - 1), st.integers(0, 255)),
                                              min_size=1, max_size=8)):
        blob[position] = value
    CASES["images: byte flips"] += 1
    _every_image_route(bytes(blob), workdir / "flipped-image")


@FUZZ
@given(blob=st.binary(max_size=2048))
@example(blob=b"")
@example(blob=b"\x89PNG\r\n\x1a\n")
@example(blob=b"\xff\xd8\xff")
def test_random_bytes_are_decoded_or_refused(workdir, blob):
    CASES["images: random bytes"] += 1
    _every_image_route(blob, workdir / "random-image")


def _png_claiming(width: int, height: int, payload: bytes = b"") -> bytes:
    """A PNG whose IHDR claims `width` x `height` RGB pixels, with (almost) no pixel data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(payload)) + chunk(b"IEND", b"")


@FUZZ
@given(width=st.integers(1, 2**31 - 1), height=st.integers(1, 2**31 - 1))
@example(width=100_000, height=100_000)
@example(width=2**31 - 1, height=2**31 - 1)
def test_a_png_claiming_any_size_is_refused_without_allocating_it(workdir, width, height):
    """Headers that claim up to 2^31 x 2^31 pixels over a few bytes of data: refused, memory stays flat.

    PIL allocates the claimed size before it finds the data missing, up to its `MAX_IMAGE_PIXELS` limit (89M pixels,
    about 360 MB, by default). The limit is lowered here to 16M pixels so "flat" can mean under 200 MB.
    """
    CASES["images: claimed sizes (bombs)"] += 1
    with pytest.MonkeyPatch.context() as patch, bounded_memory():
        patch.setattr(Image, "MAX_IMAGE_PIXELS", 4096 * 4096)
        outcomes = _every_image_route(_png_claiming(width, height), workdir / "claimed")
    if width * height > 4096 * 4096:
        assert set(outcomes) == {"refused"}


def test_a_png_broken_after_its_first_pixel_chunk_is_refused_on_every_route(workdir):
    """PIL opens it lazily, then raises SyntaxError (not OSError) on load; that once escaped `to_pil_images`."""
    blob = _encoded(_photo(), "PNG", compress_level=0)
    start = blob.index(b"IDAT")
    (length,) = struct.unpack(">I", blob[start - 4 : start])
    pixels = blob[start + 4 : start + 4 + length]
    first = struct.pack(">I", 100) + b"IDAT" + pixels[:100] + struct.pack(">I", zlib.crc32(b"IDAT" + pixels[:100]))
    broken = struct.pack(">I", length - 100) + b"\xf9\xd3\xff\x17" + pixels[100:] + b"\0\0\0\0"
    CASES["images: broken PNG chunk (fixed)"] += 1
    outcomes = _every_image_route(blob[: start - 4] + first + broken + blob[-12:], workdir / "broken-chunk")
    assert outcomes == ["refused", "refused", "refused"]


@pytest.mark.parametrize("pixels", [64 * 64 + 1, 2 * 64 * 64 + 1])  # PIL warns above the limit, errors above 2x
def test_decompression_bombs_above_the_pixel_limit_are_refused(monkeypatch, pixels):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64)
    blob = _encoded(Image.new("RGB", (pixels, 1), (10, 20, 30)), "PNG")  # compresses to almost nothing
    CASES["images: decompression bombs (fixed)"] += 1
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        load_image(io.BytesIO(blob))


@pytest.mark.parametrize("size", [(0, 0), (0, 7), (7, 0)])
def test_zero_size_images_are_refused(size):
    CASES["images: zero size (fixed)"] += 1
    with pytest.raises(ImageDecodeError, match="zero size"):
        to_pil_images(Image.new("RGB", size))
    with pytest.raises(ImageDecodeError):
        load_image(io.BytesIO(_png_claiming(size[0], size[1])))
    with pytest.raises(ImageDecodeError):
        to_pil_images(np.zeros((size[1], size[0], 3), np.uint8))


@pytest.mark.parametrize("size", [(1, 100_000), (100_000, 1)])
def test_a_one_pixel_wide_strip_decodes(size):
    CASES["images: 1 x 100000 strips (fixed)"] += 1
    blob = _encoded(Image.new("RGB", size, (200, 100, 0)), "PNG")
    assert load_image(io.BytesIO(blob)).size == size
    (image,) = to_pil_images(np.full((size[1], size[0], 3), 0.5, np.float32))
    assert image.size == size and image.mode == "RGB"


@pytest.mark.parametrize("mode", ["1", "L", "LA", "La", "P", "PA", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB",
                                  "HSV", "I", "F", "I;16", "I;16L", "I;16B", "I;16N"])
def test_every_pil_mode_becomes_rgb(mode):
    CASES["images: PIL modes (fixed)"] += 1
    (image,) = to_pil_images(Image.new(mode, (5, 3)))
    assert image.mode == "RGB" and image.size == (5, 3)


ARRAY_DTYPES = st.sampled_from([np.uint8, np.uint16, np.int8, np.int32, np.int64, np.float16, np.float32,
                                np.float64, np.longdouble, np.bool_, np.complex64, ">f4", ">u2"])


@FUZZ
@given(
    array=hnp.arrays(
        dtype=ARRAY_DTYPES,
        shape=hnp.array_shapes(min_dims=0, max_dims=5, min_side=0, max_side=6),
        elements=None,  # the dtype's whole range: NaN, inf, 1e308, negative, huge ints
    )
)
@example(array=np.full((4, 4, 3), 1e39))
@example(array=np.full((4, 4, 3), np.nan, np.float32))
@example(array=np.zeros((2, 4, 4, 2)))
def test_any_numpy_array_becomes_rgb_images_or_an_image_decode_error(array):
    CASES["images: numpy arrays"] += 1
    outcome = _assert_decodes_or_refuses(lambda: to_pil_images(array))
    if outcome == "decoded":
        images = to_pil_images(array)
        batch = array.ndim == 4
        expected = (array.shape[2], array.shape[1]) if batch else (array.shape[1], array.shape[0])
        assert len(images) == (array.shape[0] if batch else 1) and all(im.size == expected for im in images)


# ---- nothing is ever unpickled ----------------------------------------------------------------------------------


def test_nothing_is_ever_unpickled(embedder, tmp_path, monkeypatch, capsys):
    """Save, load, `guardrail info`, build from a folder and check, with every unpickling door booby-trapped."""
    import torch

    from guardrail.build import build_blocklist
    from guardrail.cli import main as cli_main

    calls = []

    def trap(name):
        def refuse(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} was called: guardrail must never unpickle")

        return refuse

    real_np_load = np.load

    def np_load_without_pickle(*args, **kwargs):
        if kwargs.get("allow_pickle"):
            calls.append("np.load(allow_pickle=True)")
            raise AssertionError("np.load(allow_pickle=True) was called")
        return real_np_load(*args, **kwargs)

    for target, name in [(pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load"),
                         (torch.serialization, "load")]:
        monkeypatch.setattr(target, name, trap(f"{target.__name__}.{name}"))
    monkeypatch.setattr(np, "load", np_load_without_pickle)

    folder = tmp_path / "images"
    folder.mkdir()
    photo = _photo()
    for i, image in enumerate([photo, photo.rotate(90), photo.transpose(Image.Transpose.FLIP_TOP_BOTTOM)]):
        image.save(folder / f"{i}.png")
    built = build_blocklist(str(folder), embedder, threshold=0.99)
    path = built.save(tmp_path / "built.safetensors")
    loaded = Blocklist.load(path)
    assert len(loaded) == 3
    assert cli_main(["info", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["checksum"] == "ok"
    verdicts = Guard(loaded, embedder).check([photo, str(folder / "1.png")])
    assert [verdict.matched for verdict in verdicts] == [True, True]
    assert calls == []
    CASES["no unpickling (fixed)"] += 1
