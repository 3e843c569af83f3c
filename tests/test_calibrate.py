"""Calibration: a threshold that holds its false-positive target on real photos, and an honest TPR per transform.

Real photos bundled with scikit-image (no downloads): four go in the blocklist, the rest and their crops are the
negatives. The embedder is the session's random-weight ViT-S-32, so the TPRs are printed, not asserted high.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from guardrail import Blocklist, Guard, UsageError
from guardrail.build import build_blocklist
from guardrail import calibration
from guardrail.calibration import TRANSFORM_FAMILIES, CalibrationResult, calibrate
from guardrail.cli import main as cli_main

BLOCKLISTED = ["astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg"]
OTHERS = ["brick.png", "camera.png", "cell.png", "chessboard_RGB.png", "clock_motion.png", "coins.png", "color.png",
          "grass.png", "gravel.png", "horse.png", "hubble_deep_field.jpg", "ihc.png", "logo.png", "microaneurysms.png",
          "moon.png", "motorcycle_left.png", "page.png", "phantom.png", "retina.jpg", "text.png", "chessboard_GRAY.png",
          "motorcycle_right.png"]
TARGET_FPR = 0.01


def bundled(name: str) -> Image.Image:
    """A photo that ships inside the scikit-image wheel, as RGB, at most 512 px on its long side."""
    import skimage.data

    with Image.open(Path(skimage.data.__file__).parent / name) as image:
        image = image.convert("RGB")
    image.thumbnail((512, 512))
    return image


def quadrants(image: Image.Image) -> list[Image.Image]:
    width, height = image.size
    return [image.crop((x, y, x + width // 2, y + height // 2)) for x in (0, width // 2) for y in (0, height // 2)]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """`blocklisted/` (4 photos) and `negatives/` (22 other photos and 4 quarter crops of each: 110 images)."""
    root = tmp_path_factory.mktemp("calibrate")
    (root / "blocklisted").mkdir()
    (root / "negatives").mkdir()
    for name in BLOCKLISTED:
        bundled(name).save(root / "blocklisted" / f"{Path(name).stem}.png")
    for name in OTHERS:
        photo = bundled(name)
        for i, image in enumerate([photo, *quadrants(photo)]):
            image.save(root / "negatives" / f"{Path(name).stem}-{i}.png")
    return {"blocklisted": root / "blocklisted", "negatives": root / "negatives", "root": root}


@pytest.fixture(scope="module")
def blocklist_file(folders, embedder) -> Path:
    """Built from the folder, so each entry's `source` is the local file (the CLI's default positives)."""
    blocklist = build_blocklist(str(folders["blocklisted"]), embedder, threshold=0.5)
    return blocklist.save(folders["root"] / "blocklist.safetensors")


@pytest.fixture(scope="module")
def negatives(folders) -> list[str]:
    return sorted(str(path) for path in folders["negatives"].iterdir())


@pytest.fixture(scope="module")
def result(blocklist_file, embedder, folders, negatives) -> CalibrationResult:
    positives = sorted(str(path) for path in folders["blocklisted"].iterdir())
    result = calibrate(Blocklist.load(blocklist_file), embedder, positives, negatives, target_fpr=TARGET_FPR,
                       copies_per_image=3)
    print(f"\nrandom-weight ViT-S-32, {result.negatives} negatives, {result.positives} positives, target FPR "
          f"{TARGET_FPR}, threshold {result.threshold:.6f}\n{result.table()}")
    return result


def test_the_chosen_threshold_keeps_the_false_positive_rate_at_or_below_the_target(result, blocklist_file, embedder,
                                                                                    negatives):
    assert result.negatives == len(negatives) == 110 and result.positives == 4
    assert result.fpr <= TARGET_FPR and result.fpr_resolution == pytest.approx(1 / 110)
    guard = Guard(Blocklist.load(blocklist_file).with_threshold(result.threshold), embedder)  # an independent count
    verdicts = guard.check(negatives)
    assert sum(verdict.matched for verdict in verdicts) / len(negatives) == result.fpr <= TARGET_FPR
    scores = np.array([verdict.score for verdict in verdicts])
    lower = np.nextafter(result.threshold, -np.inf)  # the smallest such threshold: any lower one exceeds the target
    assert np.mean(scores >= lower) > TARGET_FPR


def test_each_family_rate_agrees_with_its_score_range_at_the_threshold(result):
    """A family whose weakest copy reaches the threshold is caught entirely, one whose best copy misses it not at
    all, and the median copy is caught exactly when more than half are (12 copies per family here)."""
    assert set(result.tpr_by_family) == set(TRANSFORM_FAMILIES) == set(result.scores["positives"])
    for family, tpr in result.tpr_by_family.items():
        stats = result.scores["positives"][family]
        assert stats["min"] <= stats["median"] <= stats["max"], family
        assert (tpr == 1.0) == (stats["min"] >= result.threshold), family
        assert (tpr == 0.0) == (stats["max"] < result.threshold), family
        if tpr > 0.5:
            assert stats["median"] >= result.threshold, family
        elif tpr < 0.5:
            assert stats["median"] < result.threshold, family
    as_dict = result.to_dict()
    assert json.loads(json.dumps(as_dict)) == as_dict


def test_rates_are_counted_per_family_and_over_all_copies(blocklist_file, embedder, folders, negatives, monkeypatch):
    """Two stand-in families with known outcomes: one returns the photo itself (cosine 1, always caught), one returns
    the lowest-scoring negative (never caught at a threshold above every negative)."""
    blocklist = Blocklist.load(blocklist_file)
    few = negatives[:20]
    scores = [verdict.score for verdict in Guard(blocklist, embedder).check(few)]
    with Image.open(few[int(np.argmin(scores))]) as lowest:
        unrelated = lowest.convert("RGB")
    monkeypatch.setattr(calibration, "TRANSFORM_FAMILIES", {
        "same": lambda image, rng: image.copy(),
        "other": lambda image, rng: unrelated.copy(),
    })
    positives = sorted(str(path) for path in folders["blocklisted"].iterdir())[:2]
    result = calibrate(blocklist, embedder, positives, few, target_fpr=0.01, copies_per_image=2, on_suspect="keep")
    assert result.threshold > max(scores)  # 20 negatives: a 1% target allows none of them to match
    assert result.tpr_by_family == {"same": 1.0, "other": 0.0}
    assert result.tpr == 0.5
    assert result.scores["positives"]["same"]["min"] == pytest.approx(1.0, abs=1e-5)
    assert result.scores["positives"]["other"]["max"] == pytest.approx(min(scores), abs=1e-5)


def test_the_verb_writes_the_chosen_threshold_into_a_new_blocklist(blocklist_file, folders, weights_file, result,
                                                                   capsys):
    output = folders["root"] / "calibrated.safetensors"
    assert cli_main(["calibrate", "-b", str(blocklist_file), "--negatives", str(folders["negatives"]), "-o",
                     str(output), "--pretrained", str(weights_file), "--target-fpr", str(TARGET_FPR), "--copies", "1",
                     "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["threshold"] == result.threshold, "the threshold depends on the negatives alone"
    assert set(printed["tpr_by_family"]) == set(TRANSFORM_FAMILIES) and printed["output"] == str(output)
    calibrated = Blocklist.load(output)
    assert calibrated.threshold == result.threshold
    assert Blocklist.load(blocklist_file).threshold == 0.5, "the input blocklist is left as it was"
    np.testing.assert_array_equal(calibrated.embeddings, Blocklist.load(blocklist_file).embeddings)


def test_the_verb_prints_a_table_of_every_family(blocklist_file, folders, negatives, weights_file, capsys):
    few = folders["root"] / "few-negatives"
    few.mkdir()
    for path in negatives[::11]:  # 10 of them
        (few / Path(path).name).write_bytes(Path(path).read_bytes())
    assert cli_main(["calibrate", "-b", str(blocklist_file), "--negatives", str(few), "--copies", "1",
                     "-o", str(folders["root"] / "table.safetensors"), "--pretrained", str(weights_file)]) == 0
    out = capsys.readouterr().out
    assert all(family in out for family in TRANSFORM_FAMILIES) and "wrote" in out and "on 10 negatives" in out
    assert "resolution" in out, "too few negatives for a 1% target is said, not hidden"


def test_without_local_sources_the_positives_flag_is_required(embedder, folders, weights_file, capsys):
    blocklist = Blocklist.from_images([bundled("astronaut.png")], embedder, entries=[{"id": "a", "source": "gone.png"}])
    path = blocklist.save(folders["root"] / "no-sources.safetensors")
    output = folders["root"] / "x.safetensors"
    assert cli_main(["calibrate", "-b", str(path), "--negatives", str(folders["negatives"]), "-o", str(output),
                     "--pretrained", str(weights_file)]) == UsageError.exit_code == 2
    assert "--positives DIR" in capsys.readouterr().err and not output.exists()


@pytest.mark.parametrize(
    "positives, negatives, target_fpr, message",
    [([], ["n"], 0.01, "positives is empty"), (["p"], [], 0.01, "negatives is empty"),
     (["p"], ["n"], 0.0, "target_fpr"), (["p"], ["n"], 1.0, "target_fpr"), (["p"], ["n"], -0.5, "target_fpr")],
)
def test_bad_arguments_are_usage_errors(blocklist_file, embedder, positives, negatives, target_fpr, message):
    with pytest.raises(UsageError, match=message):
        calibrate(Blocklist.load(blocklist_file), embedder, positives, negatives, target_fpr=target_fpr)


def test_too_few_negatives_are_said_to_limit_the_fpr_resolution(blocklist_file, embedder, negatives):
    photo = bundled("astronaut.png")
    result = calibrate(Blocklist.load(blocklist_file), embedder, [photo], negatives[:10], target_fpr=0.01,
                       copies_per_image=1)
    assert result.fpr_resolution == 0.1 and result.fpr == 0.0
    assert any("resolution" in note and "100 negatives" in note for note in result.notes)


def near_copy_of(path: Path, out: Path) -> Path:
    """`path` with +-2 of pixel noise: a copy any user would call the same image, scoring just under cosine 1."""
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB")).astype(np.int16)
    noisy = pixels + np.random.default_rng(0).integers(-2, 3, pixels.shape)
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(out)
    return out


@pytest.fixture(scope="module")
def contaminated(folders, negatives, tmp_path_factory) -> dict:
    """20 clean negatives, and the same plus a near-copy of the blocklisted astronaut photo."""
    photo = folders["blocklisted"] / "astronaut.png"
    near = near_copy_of(photo, tmp_path_factory.mktemp("contaminated") / "astronaut-near-copy.png")
    return {"photo": str(photo), "clean": negatives[:20], "with_copy": [*negatives[:20], str(near)], "copy": str(near)}


def test_a_near_copy_among_the_negatives_is_flagged_and_left_out_of_the_threshold(blocklist_file, embedder,
                                                                                 contaminated):
    blocklist = Blocklist.load(blocklist_file)
    (astronaut,) = [entry["id"] for entry in blocklist.entries if entry["source"] == contaminated["photo"]]
    clean = calibrate(blocklist, embedder, [contaminated["photo"]], contaminated["clean"], copies_per_image=1)
    result = calibrate(blocklist, embedder, [contaminated["photo"]], contaminated["with_copy"], copies_per_image=1)
    assert clean.suspect_negatives == []
    (suspect,) = result.suspect_negatives
    assert suspect["negative"] == contaminated["copy"] and suspect["entry_id"] == astronaut
    assert 0.999 < suspect["score"] < 1.0, "not an exact copy: the old check (score 1.0 only) let it through"
    assert result.threshold == clean.threshold < suspect["score"], "the near-copy must not lift the threshold"
    assert result.negatives == 20 and result.fpr == clean.fpr and not result.suspects_counted
    assert any("left out" in note and contaminated["copy"] in note for note in result.notes)


def test_suspect_negatives_can_be_counted_or_refused(blocklist_file, embedder, contaminated):
    blocklist = Blocklist.load(blocklist_file)
    kept = calibrate(blocklist, embedder, [contaminated["photo"]], contaminated["with_copy"], copies_per_image=1,
                     on_suspect="keep")
    assert kept.suspects_counted and kept.negatives == 21
    assert kept.threshold > kept.suspect_negatives[0]["score"], "counted, the near-copy lifts the threshold"
    with pytest.raises(UsageError, match="astronaut-near-copy.png"):
        calibrate(blocklist, embedder, [contaminated["photo"]], contaminated["with_copy"], copies_per_image=1,
                  on_suspect="raise")
    with pytest.raises(UsageError, match="on_suspect"):
        calibrate(blocklist, embedder, [contaminated["photo"]], contaminated["clean"], on_suspect="ignore")


def test_negatives_that_are_exact_copies_of_entries_are_refused(blocklist_file, embedder, folders):
    copies = sorted(str(path) for path in folders["blocklisted"].iterdir())
    with pytest.raises(UsageError, match="every negative scores at or above the median transformed copy"):
        calibrate(Blocklist.load(blocklist_file), embedder, copies[:1], copies, target_fpr=0.01, copies_per_image=1)
    with pytest.raises(UsageError, match="copies of its entries"):
        calibrate(Blocklist.load(blocklist_file), embedder, copies[:1], copies, target_fpr=0.01, copies_per_image=1,
                  on_suspect="keep")


@pytest.mark.parametrize("family", sorted(TRANSFORM_FAMILIES))
def test_each_transform_is_seeded_and_returns_an_rgb_image(family):
    photo = bundled("coffee.png")
    first = TRANSFORM_FAMILIES[family](photo, random.Random(7)).convert("RGB")
    again = TRANSFORM_FAMILIES[family](photo, random.Random(7)).convert("RGB")
    assert first.mode == "RGB" and np.array_equal(np.asarray(first), np.asarray(again))
    if family != "crop":
        assert first.size == photo.size
    assert not np.array_equal(np.asarray(first.resize(photo.size)), np.asarray(photo)), "the copy must differ"
