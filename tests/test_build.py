"""build_blocklist and `guardrail build`: every SOURCE kind, bad data, dedupe, downloads, atomic output."""

from __future__ import annotations

import csv
import functools
import hashlib
import http.server
import io
import json
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from guardrail import Blocklist, ImageDecodeError, UsageError
from guardrail.build import BuildError, build_blocklist, merge_blocklists
from guardrail.cli import main
from guardrail.sources import expand_braces, iter_items

SHARED_MANIFEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "sdv1_500_memorized.jsonl"
REPO_MANIFEST = Path(__file__).resolve().parents[1] / "blocklists" / "sd-v1-memorized.jsonl"


@functools.lru_cache(maxsize=None)
def real_photos() -> tuple[np.ndarray, ...]:
    from skimage import data

    return tuple(load() for load in (data.astronaut, data.coffee, data.chelsea, data.rocket))


def photo(seed: int, size: int = 64) -> Image.Image:
    """A distinct test image: a real photo bundled with scikit-image, cropped and tinted per seed."""
    source = real_photos()[seed % 4]
    rng = np.random.default_rng(seed)
    top, left = rng.integers(0, 100, 2)
    crop = source[top : top + 256, left : left + 256].astype(np.float32) * rng.uniform(0.6, 1.0, 3)
    return Image.fromarray(crop.astype(np.uint8)).resize((size, size))


def png_bytes(image: Image.Image, format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format)
    return buffer.getvalue()


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "images"
    (root / "nested").mkdir(parents=True)
    for i in range(3):
        photo(i).save(root / f"{i}.png")
    photo(3).save(root / "nested" / "3.jpg")
    (root / "notes.txt").write_text("not scanned")
    return root


def test_a_folder_is_scanned_recursively_with_file_hashes(folder, embedder):
    blocklist = build_blocklist([str(folder)], embedder, threshold=0.9)
    assert [entry["id"] for entry in blocklist.entries] == ["0.png", "1.png", "2.png", "nested/3.jpg"]
    assert blocklist.entries[0]["sha256"] == hashlib.sha256((folder / "0.png").read_bytes()).hexdigest()
    assert blocklist.threshold == 0.9 and blocklist.spec == embedder.spec
    np.testing.assert_allclose(blocklist.embeddings[0], embedder.embed([folder / "0.png"])[0], atol=1e-5)
    assert blocklist.build_report["embedded"] == 4 and blocklist.build_report["skipped"] == 0


def test_csv_manifests_resolve_relative_paths_and_keep_every_column(folder, embedder):
    manifest = folder.parent / "manifest.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["key", "filepath", "TEXT", "license"])
        writer.writeheader()
        writer.writerow({"key": "a", "filepath": "images/0.png", "TEXT": "an astronaut", "license": "public domain"})
        writer.writerow({"key": "b", "filepath": "images/nested/3.jpg", "TEXT": "a rocket", "license": "cc-by"})
    blocklist = build_blocklist(str(manifest), embedder)
    first = blocklist.entries[0]
    assert first["id"] == "a" and first["caption"] == "an astronaut" and first["license"] == "public domain"
    assert first["source"].endswith("manifest.csv:1")


def test_jsonl_and_parquet_manifests(folder, embedder):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"id": 7, "path": str(folder / "1.png"), "caption": "a cup of coffee", "score": 0.5}]
    (folder.parent / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    pq.write_table(pa.Table.from_pylist(rows), folder.parent / "m.parquet")
    for name in ("m.jsonl", "m.parquet"):
        (entry,) = build_blocklist(str(folder.parent / name), embedder).entries
        assert entry["id"] == "7" and entry["caption"] == "a cup of coffee" and entry["score"] == 0.5


def write_shard(path: Path, samples: dict[str, Image.Image]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, image in samples.items():
            for extension, payload in (("jpg", png_bytes(image, "JPEG")), ("txt", f"caption of {key}".encode()),
                                       ("json", json.dumps({"similarity": 0.3}).encode())):
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def test_webdataset_shards_with_a_brace_pattern(tmp_path, embedder):
    write_shard(tmp_path / "shard-000.tar", {"000000": photo(0), "000001": photo(1)})
    write_shard(tmp_path / "shard-001.tar", {"000002": photo(2)})
    blocklist = build_blocklist(str(tmp_path / "shard-{000..001}.tar"), embedder)
    assert [entry["id"] for entry in blocklist.entries] == ["000000", "000001", "000002"]
    assert blocklist.entries[2]["caption"] == "caption of 000002" and blocklist.entries[2]["similarity"] == 0.3
    assert expand_braces("a-{08..10}.tar") == ["a-08.tar", "a-09.tar", "a-10.tar"]
    assert expand_braces("{x,y}-{1..2}") == ["x-1", "x-2", "y-1", "y-2"]


def test_precomputed_embedding_folders_need_no_embedder_and_are_verified(tmp_path, embedder):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "emb" / "img_emb").mkdir(parents=True)
    (tmp_path / "emb" / "metadata").mkdir()
    vectors = embedder.embed([photo(i) for i in range(3)]).astype(np.float16)
    vectors[2] *= 3  # not unit-norm: must be skipped, not silently renormalized
    np.save(tmp_path / "emb" / "img_emb" / "img_emb_0.npy", vectors)
    pq.write_table(pa.Table.from_pylist([{"key": f"k{i}", "caption": f"c{i}", "url": f"http://x/{i}"} for i in range(3)]),
                   tmp_path / "emb" / "metadata" / "metadata_0.parquet")
    blocklist = build_blocklist(str(tmp_path / "emb"), None, spec=embedder.spec)
    assert [entry["id"] for entry in blocklist.entries] == ["k0", "k1"]
    assert blocklist.build_report["precomputed"] == 2 and blocklist.build_report["skipped"] == 1
    assert "unit-norm" in blocklist.build_report["skips"][0]["reason"]
    with pytest.raises(UsageError, match="embedder is required"):
        build_blocklist(str(tmp_path / "emb"), None)


def test_the_shared_real_world_manifest_parses(tmp_path):
    items = list(iter_items(str(REPO_MANIFEST)))
    assert len(items) == 500
    assert all(item.url and item.url.startswith("http") for item in items)
    assert items[0].record["id"] == "1030727993" and items[0].record["caption"] == "The No Limits Business Woman Podcast"
    assert len({item.record["id"] for item in items}) == 500


@pytest.mark.skipif(not SHARED_MANIFEST.exists(), reason="needs ../shared/data beside the checkout")
def test_the_starter_kit_manifest_is_the_shared_one():
    assert REPO_MANIFEST.read_bytes() == SHARED_MANIFEST.read_bytes()


def test_url_entries_without_download_name_the_flag(tmp_path, embedder):
    manifest = tmp_path / "urls.jsonl"
    manifest.write_text(json.dumps({"caption": "x", "url": "http://127.0.0.1:9/x.jpg"}) + "\n")
    with pytest.raises(UsageError, match="--download"):
        build_blocklist(str(manifest), embedder)


def bad_data_folder(root: Path) -> Path:
    root.mkdir()
    photo(0).save(root / "good.png")
    good = png_bytes(photo(1))
    (root / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(200))
    (root / "text.png").write_text("this is not an image")
    (root / "empty.png").write_bytes(b"")
    Image.new("CMYK", (32, 32), (10, 200, 30, 0)).save(root / "cmyk.jpg")
    Image.fromarray(np.linspace(0, 65535, 32 * 32, dtype=np.uint16).reshape(32, 32)).save(root / "sixteen-bit.png")
    palette = Image.new("P", (32, 32), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.save(root / "palette-transparent.png", transparency=0)
    Image.new("L", (3000, 3000)).save(root / "bomb.png")
    (root / "folder.png").mkdir()  # a directory with an image name: unreadable as a file
    return root


def test_bad_data_is_skipped_into_the_report_and_odd_modes_are_converted(tmp_path, embedder, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4_000_000)  # bomb.png has 9M pixels: over twice the limit
    root = bad_data_folder(tmp_path / "bad")
    blocklist = build_blocklist(str(root), embedder)
    report = blocklist.build_report
    reasons = {skip["id"]: skip["reason"] for skip in report["skips"]}
    assert set(reasons) == {"truncated.png", "corrupt.jpg", "text.png", "empty.png", "bomb.png"}
    assert reasons["bomb.png"].startswith("decompression bomb")
    assert all(reasons[name].startswith("cannot decode") for name in ("truncated.png", "corrupt.jpg", "text.png"))
    assert sorted(entry["id"] for entry in blocklist.entries) == [
        "cmyk.jpg", "good.png", "palette-transparent.png", "sixteen-bit.png"]
    assert report["converted_modes"] == {"CMYK": 1, "I;16": 1, "P": 1}
    assert report["read"] == 9 and report["skipped"] == 5


def test_unreadable_and_missing_paths_are_skipped(tmp_path, embedder):
    photo(0).save(tmp_path / "ok.png")
    (tmp_path / "dir.png").mkdir()
    manifest = tmp_path / "m.csv"
    manifest.write_text("path\nok.png\nmissing.png\ndir.png\n")
    report = build_blocklist(str(manifest), embedder).build_report
    assert report["skipped_by_reason"] == {"unreadable path": 2}


def test_a_build_with_nothing_valid_fails_with_the_report(tmp_path, embedder):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.png").write_text("junk")
    with pytest.raises(BuildError, match="all 1 items were skipped") as failed:
        build_blocklist(str(tmp_path / "junk"), embedder)
    assert failed.value.report["skips"][0]["id"] == "a.png"


def test_on_error_raise_stops_at_the_first_bad_item(tmp_path, embedder):
    root = bad_data_folder(tmp_path / "bad")
    with pytest.raises(ImageDecodeError, match="cannot decode|decompression bomb"):
        build_blocklist(str(root), embedder, on_error="raise")


def test_dedupe_folds_the_records_of_copies_and_keeps_every_vector(tmp_path, embedder):
    root = tmp_path / "dupes"
    root.mkdir()
    for name in ("a1", "a2", "a3"):
        photo(0).save(root / f"{name}.png")  # the same image three times, across batches
    photo(1).save(root / "b.png")
    photo(0).save(root / "a4.jpg", quality=95)  # a near-copy
    blocklist = build_blocklist(str(root), embedder, dedupe=0.99, batch_size=2)
    records = {entry["id"]: (entry["duplicates"], entry.get("duplicate_of")) for entry in blocklist.entries}
    assert records == {"a1.png": (4, None), "a2.png": (0, "a1.png"), "a3.png": (0, "a1.png"),
                       "a4.jpg": (0, "a1.png"), "b.png": (1, None)}
    assert len(blocklist.embeddings) == 5 and sum(duplicates for duplicates, _ in records.values()) == 5
    assert blocklist.build_report["deduplicated"] == 3 and blocklist.build_report["dedupe"] == 0.99
    assert all("duplicate_of" not in entry for entry in build_blocklist(str(root), embedder).entries)


def near(anchor: np.ndarray, towards: np.ndarray, cosine: float) -> np.ndarray:
    """The unit vector at `cosine` to `anchor`, rotated towards `towards`."""
    orthogonal = towards - (towards @ anchor) * anchor
    orthogonal /= np.linalg.norm(orthogonal)
    return (cosine * anchor + np.sqrt(1 - cosine**2) * orthogonal).astype(np.float32)


def write_embedding_folder(folder: Path, vectors: np.ndarray) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (folder / "img_emb").mkdir(parents=True)
    (folder / "metadata").mkdir()
    np.save(folder / "img_emb" / "img_emb_0.npy", vectors)
    pq.write_table(pa.Table.from_pylist([{"key": f"k{i}"} for i in range(len(vectors))]),
                   folder / "metadata" / "metadata_0.parquet")
    return folder


def test_an_image_near_a_folded_duplicate_still_matches(tmp_path, embedder):
    """dedupe 0.97 at threshold 0.95: an image at 0.95 to the duplicate is about 0.85 from the entry kept first."""
    from guardrail import BlocklistIndex

    rng = np.random.default_rng(0)
    first, away = (v / np.linalg.norm(v) for v in rng.standard_normal((2, embedder.dim)))
    duplicate = near(first, away, 0.975)
    generated = near(duplicate, away, 0.95)  # further from `first`, on the duplicate's far side
    assert float(generated @ first) < 0.87
    source = write_embedding_folder(tmp_path / "emb", np.stack([first, duplicate]))
    blocklist = build_blocklist(str(source), None, spec=embedder.spec, threshold=0.95, dedupe=0.97)
    assert [entry.get("duplicate_of") for entry in blocklist.entries] == [None, "k0"]
    scores, ids = BlocklistIndex.from_blocklist(blocklist).search(generated[None], k=1)
    assert scores[0, 0] >= blocklist.threshold and ids[0, 0] == 1, "the duplicate's vector is still searched"


def test_merging_with_dedupe_keeps_earlier_groups_whole_and_counts_once(embedder):
    rng = np.random.default_rng(1)
    base, away, other = (v / np.linalg.norm(v) for v in rng.standard_normal((3, embedder.dim)))
    first = Blocklist(np.stack([base, near(base, away, 0.999)]), [{"id": "a"}, {"id": "b"}], spec=embedder.spec)
    first = merge_blocklists([first], dedupe=0.99)
    second = Blocklist(np.stack([near(base, away, 0.995), other]), [{"id": "c"}, {"id": "d"}], spec=embedder.spec)
    merged = merge_blocklists([first, second], dedupe=0.99)
    records = {entry["id"]: (entry["duplicates"], entry.get("duplicate_of")) for entry in merged.entries}
    assert records == {"a": (3, None), "b": (0, "a"), "c": (0, "a"), "d": (1, None)}
    assert len(merged.embeddings) == 4


def test_large_groups_of_identical_copies_fold_into_one_entry(embedder):
    from guardrail.build import DEDUPE_NEIGHBOURS, fold_duplicates

    rng = np.random.default_rng(2)
    distinct = rng.standard_normal((50, embedder.dim)).astype(np.float32)
    distinct /= np.linalg.norm(distinct, axis=1, keepdims=True)
    copies = 4 * DEDUPE_NEIGHBOURS  # more copies than neighbours searched per vector
    vectors = np.concatenate([distinct[:1].repeat(copies, axis=0), distinct])
    records = [{"id": str(i), "duplicates": 1} for i in range(len(vectors))]
    folded, _ = fold_duplicates(vectors, records, 0.99)
    assert folded == copies and records[0]["duplicates"] == copies + 1
    assert {record.get("duplicate_of") for record in records[1 : copies + 1]} == {"0"}


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True


@pytest.fixture
def http_server():
    """A loopback HTTP server: /good.png, /missing (404), /slow (timeout), /text, and /flaky (500 once, then ok)."""
    image = png_bytes(photo(2))
    hits: dict[str, int] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            hits[self.path] = hits.get(self.path, 0) + 1
            if self.path == "/slow":
                time.sleep(2)
            if self.path == "/missing" or (self.path == "/flaky" and hits[self.path] == 1):
                self.send_response(404 if self.path == "/missing" else 500)
                self.end_headers()
                return
            body = b"<html>not an image</html>" if self.path == "/text" else image
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = _Server(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", hits, image
    server.shutdown()
    server.server_close()


def test_downloads_from_a_loopback_server(tmp_path, embedder, http_server):
    base, hits, image = http_server
    manifest = tmp_path / "urls.jsonl"
    rows = [{"index": name, "url": f"{base}/{name}", "caption": name} for name in ("good.png", "missing", "slow", "text", "flaky")]
    manifest.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    blocklist = build_blocklist(str(manifest), embedder, download=True, download_timeout=0.5, download_retries=1)
    kept = {entry["id"]: entry for entry in blocklist.entries}
    assert set(kept) == {"good.png", "flaky"}
    assert kept["good.png"]["sha256"] == hashlib.sha256(image).hexdigest()
    reasons = {skip["id"]: skip["reason"] for skip in blocklist.build_report["skips"]}
    assert "HTTP 404" in reasons["missing"] and "timed out" in reasons["slow"].lower()
    assert reasons["text"].startswith("cannot decode")
    assert hits["/missing"] == 1, "a 404 is not retried"
    assert hits["/flaky"] == 2, "a 500 is retried"


def test_cli_round_trip_build_info_check_merge(folder, weights_file, tmp_path, capsys):
    out, report = tmp_path / "bl.safetensors", tmp_path / "report.json"
    common = ["--model", "ViT-S-32", "--pretrained", str(weights_file)]
    assert main(["build", str(folder), "-o", str(out), "--report", str(report), "--threshold", "0.99", *common]) == 0
    assert json.loads(report.read_text())["entries"] == 4
    assert main(["info", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.split("\n", 1)[1])["count"] == 4
    photo(9).save(tmp_path / "new.png")
    assert main(["check", "-b", str(out), "--pretrained", str(weights_file), str(folder / "1.png")]) == 1
    assert main(["check", "-b", str(out), "--pretrained", str(weights_file), str(tmp_path / "new.png")]) == 0

    other = tmp_path / "other.safetensors"
    single = tmp_path / "single"
    single.mkdir()
    photo(9).save(single / "x.png")
    assert main(["build", str(single), "-o", str(other), *common]) == 0
    merged = tmp_path / "merged.safetensors"
    assert main(["merge", str(out), str(other), "-o", str(merged)]) == 0
    assert len(Blocklist.load(merged)) == 5 and Blocklist.load(merged).threshold == 0.99
    assert main(["merge", str(out), str(out), "-o", str(merged)]) == 1, "the same ids twice"


def test_merge_refuses_blocklists_of_different_embedders(memorized_blocklist, other_embedder):
    other = Blocklist.from_images([photo(0)], other_embedder, entries=[{"id": "x"}])
    with pytest.raises(Exception, match="equal specs"):
        merge_blocklists([memorized_blocklist, other])


def test_a_failed_build_writes_no_blocklist_but_writes_the_report(tmp_path, weights_file):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.png").write_text("junk")
    out, report = tmp_path / "bl.safetensors", tmp_path / "report.json"
    code = main(["build", str(tmp_path / "junk"), "-o", str(out), "--report", str(report), "--model", "ViT-S-32",
                 "--pretrained", str(weights_file)])
    assert code == 1 and not out.exists()
    assert json.loads(report.read_text())["skipped"] == 1


def test_an_interrupted_build_leaves_nothing_behind(tmp_path, weights_file, monkeypatch):
    from guardrail import OpenCLIPEmbedder

    root = tmp_path / "many"
    root.mkdir()
    for i in range(6):
        photo(i).save(root / f"{i}.png")
    calls = []

    def interrupt(self, pixels):
        calls.append(len(pixels))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, pixels)

    original = OpenCLIPEmbedder.encode
    monkeypatch.setattr(OpenCLIPEmbedder, "encode", interrupt)
    out = tmp_path / "out" / "bl.safetensors"
    out.parent.mkdir()
    code = main(["build", str(root), "-o", str(out), "--batch-size", "2", "--model", "ViT-S-32",
                 "--pretrained", str(weights_file)])
    assert code == 130 and len(calls) == 2
    assert list(out.parent.iterdir()) == []


def test_a_killed_build_process_leaves_nothing_behind(tmp_path, weights_file):
    root = tmp_path / "many"
    root.mkdir()
    for i in range(400):
        photo(i, size=32).save(root / f"{i:03d}.png")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    process = subprocess.Popen(
        [sys.executable, "-m", "guardrail.cli", "build", str(root), "-o", str(out_dir / "bl.safetensors"),
         "--batch-size", "2", "--workers", "1", "--progress", "--model", "ViT-S-32", "--pretrained", str(weights_file)],
        stderr=subprocess.PIPE, text=True,
    )
    seen = ""
    while "img" not in seen and process.poll() is None:  # wait until it is embedding
        seen += process.stderr.read(1)
    process.terminate()
    process.communicate(timeout=60)
    assert process.returncode == 130
    assert list(out_dir.iterdir()) == []


def test_malformed_urls_are_skipped_not_fatal(tmp_path, embedder, http_server):
    base, _, _ = http_server
    manifest = tmp_path / "urls.jsonl"
    rows = [{"id": "good", "url": f"{base}/good.png"}, {"id": "bad", "url": "http://[::1"}]
    manifest.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    blocklist = build_blocklist(str(manifest), embedder, download=True)
    assert [entry["id"] for entry in blocklist.entries] == ["good"]
    assert "invalid URL" in blocklist.build_report["skips"][0]["reason"]


def test_csv_rows_with_surplus_fields_keep_them(folder, embedder, tmp_path):
    manifest = folder.parent / "extra.csv"
    manifest.write_text("path,caption\nimages/0.png,a photo,surplus,more\n")
    blocklist = build_blocklist(str(manifest), embedder)
    assert blocklist.entries[0]["extra_fields"] == "['surplus', 'more']"
    blocklist.save(tmp_path / "x.safetensors")


def test_bad_build_options_fail_before_any_embedding(folder, embedder):
    with pytest.raises(UsageError, match="threshold"):
        build_blocklist(str(folder), embedder, threshold=1.5)
    with pytest.raises(UsageError, match="batch_size"):
        build_blocklist(str(folder), embedder, batch_size=-1)


def test_written_files_get_the_usual_permissions(folder, embedder, tmp_path):
    import os
    import stat

    path = build_blocklist(str(folder), embedder).save(tmp_path / "bl.safetensors")
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_the_cli_restores_the_sigterm_handler(folder, weights_file, tmp_path):
    import signal

    before = signal.getsignal(signal.SIGTERM)
    main(["info", str(tmp_path / "missing.safetensors")])
    assert signal.getsignal(signal.SIGTERM) is before


def test_build_and_merge_store_the_trained_index_that_auto_chooses(tmp_path, embedder, monkeypatch):
    from guardrail import index as index_module

    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((60, embedder.dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    source = write_embedding_folder(tmp_path / "emb", vectors)
    assert build_blocklist(str(source), None, spec=embedder.spec).index_kind is None, "exact search stores nothing"
    monkeypatch.setattr(index_module, "EXACT_LIMIT", 10)  # what 20,001 entries would get, at 60 entries
    built = build_blocklist(str(source), None, spec=embedder.spec)
    assert built.index_kind == "ivf-sq8" and built.faiss_index is not None
    loaded = Blocklist.load(built.save(tmp_path / "built.safetensors"))
    assert index_module.BlocklistIndex.from_blocklist(loaded).kind == "ivf-sq8", "loading reuses it"
    first = Blocklist(vectors[:30], [{"id": f"a{i}"} for i in range(30)], spec=embedder.spec)
    second = Blocklist(vectors[30:], [{"id": f"b{i}"} for i in range(30)], spec=embedder.spec)
    assert merge_blocklists([first, second]).index_kind == "ivf-sq8"
    assert merge_blocklists([first, second], index="hnsw").index_kind == "hnsw"
    assert build_blocklist(str(source), None, spec=embedder.spec, index="flat").index_kind is None
    with pytest.raises(UsageError, match="index must be"):
        build_blocklist(str(source), None, spec=embedder.spec, index="ivf")


def test_the_build_command_stores_the_index_it_is_asked_for(folder, weights_file, tmp_path):
    out = tmp_path / "bl.safetensors"
    common = ["--model", "ViT-S-32", "--pretrained", str(weights_file)]
    assert main(["build", str(folder), "-o", str(out), "--index", "hnsw", *common]) == 0
    assert Blocklist.load(out).index_kind == "hnsw"
