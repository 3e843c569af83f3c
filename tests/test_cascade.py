"""Two-stage matching (main vectors propose, a copy descriptor decides) and tiles, as a spec of behaviour.

Most tests use `Thumbnails`, a transparent stand-in embedder (a small mean-free thumbnail), so each decision can be
traced by hand; the last ones go through the real classes: a tiny open_clip model, a TorchScript descriptor exported
from torchvision, `build_blocklist`, the file format, and `Guard`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import PROMPT, STEPS, generators

from guardrail import Blocklist, Guard, build_blocklist
from guardrail.embedders import spec_differences
from guardrail.embedding_sets import TILE_GRID, EmbeddingSet
from guardrail.errors import BlocklistError, EmbedderMismatchError, UsageError
from guardrail.images import to_pil_images

BUNDLED = ["astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "horse.png", "motorcycle_left.png"]


def bundled(name: str, size: int = 128) -> Image.Image:
    import skimage.data

    with Image.open(Path(skimage.data.__file__).parent / name) as image:
        return image.convert("RGB").resize((size, size), Image.BICUBIC)


class Thumbnails:
    """Images -> a mean-free `side`×`side` RGB thumbnail, unit-norm. Counts the images it embeds."""

    def __init__(self, side: int) -> None:
        self.side, self.dim, self.calls, self.images = side, 3 * side * side, 0, 0
        self.spec = {"family": "thumbnail", "side": side, "dim": self.dim}

    def embed(self, images) -> np.ndarray:
        pils = to_pil_images(images)
        self.calls, self.images = self.calls + 1, self.images + len(pils)
        rows = np.stack([np.asarray(image.resize((self.side, self.side), Image.BILINEAR), np.float32).ravel()
                         for image in pils])
        rows -= rows.mean(axis=1, keepdims=True)
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    return [bundled(name) for name in BUNDLED]


def two_stage_blocklist(photos, main, descriptor, *, tiles: bool = False, **thresholds) -> Blocklist:
    """The first four photos blocklisted, with a descriptor set (and tiles of both sets)."""
    entries = photos[:4]
    crops = [crop for image in entries for crop in _crops(image)] if tiles else []
    descriptor_tiles = descriptor.embed(crops).reshape(4, len(TILE_GRID), -1) if tiles else None
    main_tiles = main.embed(crops).reshape(4, len(TILE_GRID), -1) if tiles else None
    descriptor_set = EmbeddingSet(descriptor.embed(entries), descriptor.spec, thresholds.pop("descriptor", 0.9),
                                  descriptor_tiles, thresholds.pop("descriptor_tile", None))
    return Blocklist(main.embed(entries), [{"id": f"photo-{i}"} for i in range(4)], spec=main.spec,
                     threshold=thresholds.pop("main", 0.9), descriptor=descriptor_set, tiles=main_tiles,
                     recall_threshold=thresholds.pop("recall", 0.5), tile_threshold=thresholds.pop("main_tile", None))


def _crops(image):
    from guardrail.tiles import tile_crops

    return tile_crops([image])


def pasted(entry: Image.Image, background: Image.Image, fraction: float = 0.5) -> Image.Image:
    """`entry` shrunk to `fraction` of the side and pasted into the top-left of `background`."""
    canvas = background.copy()
    side = round(canvas.width * fraction)
    canvas.paste(entry.resize((side, side), Image.BICUBIC), (0, 0))
    return canvas


def test_the_descriptor_decides_what_the_main_stage_proposes(photos):
    main, descriptor = Thumbnails(4), Thumbnails(16)
    guard = Guard(two_stage_blocklist(photos, main, descriptor), main, descriptor=descriptor)
    darker = Image.eval(photos[2], lambda value: int(value * 0.9))
    (verdict,) = guard.check([darker])
    assert verdict.matched and verdict.stage == "descriptor" and verdict.entry_id == "photo-2"
    expected = float(descriptor.embed([darker])[0] @ descriptor.embed([photos[2]])[0])
    assert verdict.score == pytest.approx(expected, abs=1e-5)
    assert set(verdict.scores) == {"main", "descriptor"} and verdict.scores["descriptor"] == pytest.approx(expected)


def test_a_look_alike_proposed_by_the_main_stage_is_cleared_by_the_descriptor(photos):
    """A 4-px thumbnail cannot tell the photo from a blurred copy; the 16-px descriptor can, at a strict threshold."""
    main, descriptor = Thumbnails(4), Thumbnails(16)
    blocklist = two_stage_blocklist(photos, main, descriptor)
    look_alike = photos[0].resize((4, 4), Image.BILINEAR).resize(photos[0].size, Image.NEAREST)
    main_score = float(main.embed([look_alike])[0] @ blocklist.embeddings[0])
    descriptor_score = float(descriptor.embed([look_alike])[0] @ blocklist.descriptor.embeddings[0])
    assert main_score >= 0.9 > descriptor_score  # what makes it a look-alike, not a copy
    (alone,) = Guard(blocklist, main).check([look_alike])
    (cascade,) = Guard(blocklist, main, descriptor=descriptor).check([look_alike])
    assert alone.matched and not cascade.matched and cascade.stage == "descriptor"


def test_an_image_no_entry_comes_near_never_runs_the_descriptor(photos):
    main, descriptor = Thumbnails(4), Thumbnails(16)
    guard = Guard(two_stage_blocklist(photos, main, descriptor, recall=0.95), main, descriptor=descriptor)
    descriptor.calls = 0
    verdicts = guard.check(photos[4:])
    assert [verdict.stage for verdict in verdicts] == ["recall", "recall"]
    assert not any(verdict.matched for verdict in verdicts) and descriptor.calls == 0
    assert all(set(verdict.scores) == {"main"} for verdict in verdicts)


def test_only_proposed_images_of_a_batch_go_to_the_descriptor(photos):
    main, descriptor = Thumbnails(4), Thumbnails(16)
    guard = Guard(two_stage_blocklist(photos, main, descriptor, recall=0.95), main, descriptor=descriptor)
    descriptor.images = 0
    verdicts = guard.check([photos[4], photos[1], photos[5]])
    assert [verdict.stage for verdict in verdicts] == ["recall", "descriptor", "recall"]
    assert verdicts[1].matched and descriptor.images == 1


def test_disabled_entries_are_never_proposed(photos):
    main, descriptor = Thumbnails(4), Thumbnails(16)
    guard = Guard(two_stage_blocklist(photos, main, descriptor), main, descriptor=descriptor)
    guard.disable("photo-3")
    (verdict,) = guard.check([photos[3]])
    assert not verdict.matched and verdict.entry_id != "photo-3"


def test_a_descriptor_with_another_spec_is_refused(photos):
    main = Thumbnails(4)
    blocklist = two_stage_blocklist(photos, main, Thumbnails(16))
    with pytest.raises(EmbedderMismatchError, match="descriptor does not match"):
        Guard(blocklist, main, descriptor=Thumbnails(8))


def test_a_descriptor_for_a_blocklist_without_a_descriptor_set_is_a_usage_error(photos):
    main = Thumbnails(4)
    plain = Blocklist(main.embed(photos[:2]), spec=main.spec)
    with pytest.raises(UsageError, match="no descriptor set"):
        Guard(plain, main, descriptor=Thumbnails(16))


def test_without_a_descriptor_the_guard_matches_the_main_vectors_alone(photos):
    main = Thumbnails(4)
    guard = Guard(two_stage_blocklist(photos, main, Thumbnails(16)), main)
    (verdict,) = guard.check([photos[1]])
    assert verdict.matched and verdict.stage == "main" and verdict.scores == {"main": pytest.approx(1.0)}


def test_tiles_catch_an_entry_pasted_into_part_of_another_image(photos):
    main = Thumbnails(8)
    entries = photos[:4]
    blocklist = Blocklist(main.embed(entries), [{"id": f"photo-{i}"} for i in range(4)], spec=main.spec,
                          threshold=0.9, tile_threshold=0.9)
    collage = pasted(photos[1], photos[5])
    (whole,) = Guard(blocklist, main).check([collage])
    (tiled,) = Guard(blocklist, main, tiles=True).check([collage])
    assert not whole.matched
    assert tiled.matched and tiled.entry_id == "photo-1" and tiled.tile == "image top-left ~ entry"
    assert tiled.scores["main_tile"] >= 0.9 > tiled.scores["main"]


def test_stored_entry_tiles_catch_a_crop_of_an_entry(photos):
    main = Thumbnails(8)
    blocklist = Blocklist(main.embed(photos[:4]), spec=main.spec, threshold=0.9, tile_threshold=0.9,
                          tiles=main.embed(_crops(photos[0]) + [c for p in photos[1:4] for c in _crops(p)]).reshape(
                              4, len(TILE_GRID), -1))
    quarter = photos[0].crop((64, 64, 128, 128)).resize((128, 128), Image.BICUBIC)
    (verdict,) = Guard(blocklist, main, tiles=True).check([quarter])
    assert verdict.matched and verdict.entry_id == "0" and verdict.tile == "image ~ entry bottom-right"


def test_tiles_without_a_tile_threshold_are_refused_up_front(photos):
    main = Thumbnails(4)
    blocklist = Blocklist(main.embed(photos[:2]), spec=main.spec)
    with pytest.raises(UsageError, match="tile_threshold.*guardrail calibrate --tiles"):
        Guard(blocklist, main, tiles=True)


def test_a_two_stage_blocklist_with_tiles_survives_save_and_load(photos, tmp_path):
    main, descriptor = Thumbnails(4), Thumbnails(16)
    blocklist = two_stage_blocklist(photos, main, descriptor, tiles=True, descriptor_tile=0.8, main_tile=0.85)
    loaded = Blocklist.load(blocklist.save(tmp_path / "two-stage.safetensors"))
    assert loaded.descriptor.spec == descriptor.spec and loaded.recall_threshold == blocklist.recall_threshold
    assert (loaded.descriptor.threshold, loaded.descriptor.tile_threshold, loaded.tile_threshold) == (0.9, 0.8, 0.85)
    np.testing.assert_array_equal(loaded.descriptor.embeddings, blocklist.descriptor.embeddings)
    np.testing.assert_array_equal(loaded.descriptor.tiles, blocklist.descriptor.tiles)
    np.testing.assert_array_equal(loaded.tiles, blocklist.tiles)
    (verdict,) = Guard(loaded, main, descriptor=descriptor, tiles=True).check([pasted(photos[3], photos[4], 0.6)])
    assert verdict.matched and verdict.entry_id == "photo-3" and verdict.stage == "descriptor"


def test_a_changed_descriptor_vector_fails_the_checksum(photos, tmp_path):
    from safetensors.numpy import load_file, save_file
    from safetensors import safe_open

    main, descriptor = Thumbnails(4), Thumbnails(16)
    path = two_stage_blocklist(photos, main, descriptor).save(tmp_path / "b.safetensors")
    with safe_open(str(path), framework="numpy") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(path))
    tensors["embeddings.descriptor"] = tensors["embeddings.descriptor"][[1, 0, 2, 3]]
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(BlocklistError, match="checksum"):
        Blocklist.load(path)


def test_a_descriptor_tensor_without_its_spec_is_refused_even_when_re_signed(photos, tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    from guardrail.blocklist import content_sha256

    main, descriptor = Thumbnails(4), Thumbnails(16)
    path = two_stage_blocklist(photos, main, descriptor).save(tmp_path / "b.safetensors")
    with safe_open(str(path), framework="numpy") as handle:
        metadata = dict(handle.metadata())
    del metadata["descriptor_spec"]
    tensors = load_file(str(path))
    metadata["content_sha256"] = content_sha256(tensors, metadata)
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(BlocklistError, match="come together"):
        Blocklist.load(path)


def test_a_descriptor_set_of_the_wrong_length_is_refused(photos):
    main, descriptor = Thumbnails(4), Thumbnails(16)
    short = EmbeddingSet(descriptor.embed(photos[:3]), descriptor.spec, 0.9)
    with pytest.raises(BlocklistError, match=r"expected \(4, 768\)"):
        Blocklist(main.embed(photos[:4]), spec=main.spec, descriptor=short)


def test_merge_keeps_the_descriptor_set_and_refuses_to_mix(photos):
    from guardrail.build import merge_blocklists

    main, descriptor = Thumbnails(4), Thumbnails(16)
    first = two_stage_blocklist(photos, main, descriptor)
    second = Blocklist(main.embed(photos[4:]), [{"id": "a"}, {"id": "b"}], spec=main.spec,
                       descriptor=EmbeddingSet(descriptor.embed(photos[4:]), descriptor.spec, 0.9))
    merged = merge_blocklists([first, second])
    assert len(merged) == 6 and merged.descriptor.embeddings.shape == (6, descriptor.dim)
    np.testing.assert_allclose(merged.descriptor.embeddings[4:], second.descriptor.embeddings)
    plain = Blocklist(main.embed(photos[4:]), [{"id": "a"}, {"id": "b"}], spec=main.spec)
    with pytest.raises(UsageError, match="differ in their descriptor set"):
        merge_blocklists([first, plain])
    other = Blocklist(main.embed(photos[4:]), [{"id": "a"}, {"id": "b"}], spec=main.spec,
                      descriptor=EmbeddingSet(Thumbnails(8).embed(photos[4:]), Thumbnails(8).spec, 0.9))
    with pytest.raises(EmbedderMismatchError, match="descriptor set was made by another descriptor"):
        merge_blocklists([first, other])


# ---- through the real classes ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def torchscript_descriptor(descriptor_files):
    from guardrail import TorchScriptEmbedder

    return TorchScriptEmbedder(descriptor_files["torchscript"], image_size=96, resize_mode="squash")


def test_build_makes_both_sets_and_tiles_in_one_pass_and_the_cascade_catches_copies(
        photos, embedder, torchscript_descriptor, tmp_path):
    folder = tmp_path / "entries"
    folder.mkdir()
    for i, image in enumerate(photos[:4]):
        image.save(folder / f"entry-{i}.png")
    built = build_blocklist([str(folder)], embedder, threshold=0.95, descriptor=torchscript_descriptor, tiles=True)
    assert built.descriptor.spec == torchscript_descriptor.spec
    assert built.descriptor.embeddings.shape == (4, torchscript_descriptor.dim)
    assert built.tiles.shape == (4, len(TILE_GRID), embedder.dim)
    assert built.descriptor.tiles.shape == (4, len(TILE_GRID), torchscript_descriptor.dim)
    row = next(i for i, entry in enumerate(built.entries) if entry["id"].endswith("entry-2.png"))
    np.testing.assert_allclose(built.descriptor.embeddings[row], torchscript_descriptor.embed([photos[2]])[0],
                               atol=1e-5)

    loaded = Blocklist.load(built.save(tmp_path / "two-stage.safetensors"))
    copy_ = photos[2].resize((100, 100), Image.BICUBIC)
    descriptor_score = float(torchscript_descriptor.embed([copy_])[0] @ loaded.descriptor.embeddings[row])
    main_score = float(embedder.embed([copy_])[0] @ loaded.embeddings[row])
    guard = Guard(loaded.with_thresholds(recall_threshold=main_score - 0.01, descriptor_threshold=descriptor_score - 0.01),
                  embedder, descriptor=torchscript_descriptor)
    verdicts = guard.check([copy_, photos[5]])
    assert verdicts[0].matched and verdicts[0].stage == "descriptor" and verdicts[0].entry_id.endswith("entry-2.png")
    assert verdicts[0].scores["main"] >= main_score - 1e-4
    assert not verdicts[1].matched


def test_a_blocklist_built_with_another_descriptor_file_refuses_this_one(photos, embedder, export_descriptor,
                                                                         torchscript_descriptor, tmp_path):
    from guardrail import TorchScriptEmbedder

    other_file = export_descriptor(tmp_path / "other.torchscript.pt", "torchscript", seed=1)
    other = TorchScriptEmbedder(other_file, image_size=96, resize_mode="squash")
    blocklist = Blocklist.from_images(photos[:2], embedder)
    blocklist = Blocklist(blocklist.embeddings, spec=embedder.spec,
                          descriptor=EmbeddingSet(other.embed(photos[:2]), other.spec, 0.75))
    with pytest.raises(EmbedderMismatchError, match="weights_sha256"):
        Guard(blocklist, embedder, descriptor=torchscript_descriptor)


def test_precomputed_sources_cannot_get_a_descriptor_set(tmp_path, torchscript_descriptor, embedder):
    (tmp_path / "img_emb").mkdir()
    np.save(tmp_path / "img_emb" / "img_emb_0.npy", embedder.embed([Image.new("RGB", (32, 32), "red")]))
    with pytest.raises(UsageError, match="need the images"):
        build_blocklist([str(tmp_path)], spec=embedder.spec, descriptor=torchscript_descriptor)


# ---- calibration per stage ------------------------------------------------------------------------------------

OTHERS = ["brick.png", "camera.png", "cell.png", "chessboard_RGB.png", "clock_motion.png", "coins.png", "color.png",
          "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png", "logo.png", "moon.png", "page.png",
          "retina.jpg", "text.png", "motorcycle_right.png"]


@pytest.fixture(scope="module")
def negatives() -> list[Image.Image]:
    return [bundled(name) for name in OTHERS] + [bundled(name).transpose(Image.Transpose.ROTATE_90) for name in OTHERS]


def test_stage_calibration_reports_every_configuration_and_its_thresholds_hold_in_the_guard(photos, negatives):
    from guardrail.stage_calibration import calibrate_stages

    main, descriptor = Thumbnails(4), Thumbnails(16)
    blocklist = two_stage_blocklist(photos, main, descriptor, tiles=True)
    result = calibrate_stages(blocklist, main, photos[:4], negatives, descriptor, tiles=True, target_fpr=0.05,
                              recall_fpr=0.5, copies_per_image=1, measure_speed=False)
    assert set(result.tpr_by_family) == {"main", "descriptor", "cascade", "cascade+tiles"}
    assert "partial" in result.tpr_by_family["cascade"] and len(result.tpr_by_family["cascade"]) == 10
    assert all(fpr <= 0.05 for fpr in result.fpr.values())
    assert 0.0 < result.proposed <= 0.5

    thresholds = result.thresholds
    calibrated = blocklist.with_thresholds(recall_threshold=thresholds["recall_threshold"],
                                           descriptor_threshold=thresholds["descriptor_threshold"])
    guard = Guard(calibrated, main, descriptor=descriptor)
    assert np.mean([verdict.matched for verdict in guard.check(negatives)]) == pytest.approx(result.fpr["cascade"])


def test_stage_calibration_needs_a_descriptor_or_tiles(photos, negatives):
    from guardrail.stage_calibration import calibrate_stages

    main = Thumbnails(4)
    with pytest.raises(UsageError, match="needs a descriptor or tiles"):
        calibrate_stages(Blocklist(main.embed(photos[:4]), spec=main.spec), main, photos[:4], negatives)


# ---- the command ----------------------------------------------------------------------------------------------


def test_the_command_builds_inspects_calibrates_and_checks_a_two_stage_blocklist(
        photos, negatives, weights_file, descriptor_files, tmp_path, capsys):
    from guardrail.cli import main as cli

    entries, others = tmp_path / "entries", tmp_path / "negatives"
    entries.mkdir(), others.mkdir()
    for i, image in enumerate(photos[:4]):
        image.save(entries / f"entry-{i}.png")
    for i, image in enumerate(negatives[:12]):
        image.save(others / f"other-{i}.png")
    built = tmp_path / "two-stage.safetensors"
    assert cli(["build", str(entries), "-o", str(built), "--model", "ViT-S-32", "--pretrained", str(weights_file),
                "--descriptor", str(descriptor_files["onnx"]), "--descriptor-image-size", "96",
                "--descriptor-resize", "squash", "--tiles"]) == 0
    assert cli(["info", str(built), "--json"]) == 0
    info = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert info["descriptor"]["spec"]["family"] == "onnx" and info["descriptor"]["vectors"] == "float32 x 512"
    assert info["tiles"].startswith("5 per entry") and info["descriptor"]["tiles"].endswith("not calibrated")

    calibrated = tmp_path / "calibrated.safetensors"
    assert cli(["calibrate", "-b", str(built), "--negatives", str(others), "--pretrained", str(weights_file),
                "--target-fpr", "0.1", "--copies", "1", "--tiles", "-o", str(calibrated), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    loaded = Blocklist.load(calibrated)
    assert loaded.descriptor.threshold == pytest.approx(report["written"]["descriptor_threshold"])
    assert loaded.descriptor.tile_threshold == pytest.approx(report["written"]["descriptor_tile_threshold"])
    assert loaded.recall_threshold == pytest.approx(report["written"]["recall_threshold"])

    (entries / "entry-1.png").rename(tmp_path / "copy.png")
    code = cli(["check", "-b", str(calibrated), str(tmp_path / "copy.png"), str(others / "other-0.png"),
                "--pretrained", str(weights_file), "--tiles", "--json"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 1 and lines[0]["matched"] and lines[0]["stage"] == "descriptor"
    assert set(lines[0]["scores"]) >= {"main", "descriptor"}


def test_check_with_a_descriptor_for_a_single_set_blocklist_is_a_usage_error(embedder, weights_file, descriptor_files,
                                                                            photos, tmp_path, capsys):
    from guardrail.cli import main as cli

    path = Blocklist.from_images(photos[:2], embedder).save(tmp_path / "plain.safetensors")
    photos[0].save(tmp_path / "image.png")
    assert cli(["check", "-b", str(path), str(tmp_path / "image.png"), "--pretrained", str(weights_file),
                "--descriptor", str(descriptor_files["onnx"])]) == 2
    assert "has no descriptor set" in capsys.readouterr().err


def test_a_guarded_pipeline_with_a_two_stage_guard_blocks_the_copy_and_saves_whole(
        sd_pipe, unguarded, embedder, torchscript_descriptor, tmp_path):
    from guardrail import GuardedPipeline

    descriptor_vectors = torchscript_descriptor.embed(unguarded)
    others = descriptor_vectors[[0, 2, 3]] @ descriptor_vectors[1]
    assert others.max() < 0.999  # the other seeds' images are not copies of seed 1's by the descriptor either
    blocklist = Blocklist(embedder.embed([unguarded[1]]), [{"id": "seed-1"}], spec=embedder.spec, threshold=0.999,
                          descriptor=EmbeddingSet(descriptor_vectors[[1]], torchscript_descriptor.spec,
                                                  (1.0 + float(others.max())) / 2),
                          recall_threshold=-1.0)  # every image goes to the descriptor
    guarded = GuardedPipeline(sd_pipe, Guard(blocklist, embedder, descriptor=torchscript_descriptor), action="reject")
    out = guarded(PROMPT, num_images_per_prompt=4, num_inference_steps=STEPS, generator=generators(range(4)))
    assert out.guardrail.blocked == [False, True, False, False]
    assert [verdict.stage for verdict in out.guardrail.verdicts] == ["descriptor"] * 4

    guarded.save_pretrained(tmp_path / "guarded")
    restored = GuardedPipeline.from_pretrained(tmp_path / "guarded", embedder=embedder, local_files_only=True)
    assert spec_differences(restored.guard.descriptor.spec, torchscript_descriptor.spec) == []
    assert Path(restored.guard.descriptor.spec["weights_file"]).parent == tmp_path / "guarded" / "guardrail"
    out = restored(PROMPT, num_images_per_prompt=4, num_inference_steps=STEPS, generator=generators(range(4)))
    assert out.guardrail.blocked == [False, True, False, False]
