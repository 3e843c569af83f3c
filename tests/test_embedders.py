"""OpenCLIPEmbedder: real open_clip model code, loaded from a local weights file like users' own weights."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from conftest import PROMPT, STEPS, generators

from guardrail import EmbedderMismatchError, Embedder, ImageDecodeError, OpenCLIPEmbedder, UsageError, embedder_from_spec
from guardrail.embedders import quick_gelu_required, spec_differences


def test_vectors_are_unit_norm_float32_one_per_image(embedder, unguarded):
    vectors = embedder.embed(unguarded)
    assert vectors.dtype == np.float32 and vectors.shape == (4, embedder.dim)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert isinstance(embedder, Embedder)


def test_every_diffusers_output_type_embeds_the_same(embedder, sd_pipe):
    outputs = {
        output_type: sd_pipe(PROMPT, num_inference_steps=STEPS, generator=generators([0]), output_type=output_type).images
        for output_type in ("pil", "np", "pt")
    }
    vectors = {output_type: embedder.embed(images) for output_type, images in outputs.items()}
    np.testing.assert_allclose(vectors["np"], vectors["pil"], atol=1e-6)
    np.testing.assert_allclose(vectors["pt"], vectors["pil"], atol=1e-6)


def test_batching_does_not_change_vectors(weights_file, unguarded):
    one_by_one = OpenCLIPEmbedder("ViT-S-32", pretrained=weights_file, batch_size=1).embed(unguarded)
    together = OpenCLIPEmbedder("ViT-S-32", pretrained=weights_file, batch_size=8).embed(unguarded)
    np.testing.assert_allclose(one_by_one, together, atol=1e-5)


def test_matches_a_direct_open_clip_forward_pass(embedder, weights_file, unguarded):
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms("ViT-S-32", pretrained=str(weights_file))
    model.eval()
    with torch.no_grad():
        direct = model.encode_image(torch.stack([preprocess(image) for image in unguarded]))
    direct = torch.nn.functional.normalize(direct, dim=-1).numpy()
    np.testing.assert_allclose(embedder.embed(unguarded), direct, atol=1e-5)


def test_spec_pins_the_weights_by_sha256_and_never_stores_the_path(embedder, weights_file):
    spec = embedder.spec
    assert spec["model"] == "ViT-S-32" and spec["pretrained"] is None
    assert spec["weights_file"] == weights_file.name and len(spec["weights_sha256"]) == 64
    assert str(weights_file.parent) not in repr(spec)
    assert spec["dim"] == embedder.dim == 384
    assert spec["image_size"] == [224, 224] and spec["interpolation"] == "bicubic" and spec["resize_mode"] == "shortest"
    assert len(spec["mean"]) == 3 and len(spec["std"]) == 3


def test_specs_of_other_weights_differ_only_in_the_sha256(embedder, other_embedder):
    assert [line.split(":")[0] for line in spec_differences(embedder.spec, other_embedder.spec)] == ["weights_sha256"]
    assert spec_differences(embedder.spec, {**embedder.spec, "weights_file": "renamed.safetensors"}) == []


def test_openai_tags_get_quick_gelu_even_without_the_suffix():
    assert quick_gelu_required("ViT-B-32", "openai") is True
    assert quick_gelu_required("ViT-L-14", "openai") is True
    assert quick_gelu_required("ViT-L-14-quickgelu", "openai") is True
    assert quick_gelu_required("ViT-B-32", "laion2b_s34b_b79k") is False
    assert quick_gelu_required("ViT-B-32", None) is False


@pytest.mark.parametrize(
    "model, pretrained, message",
    [
        ("ViT-S-32", None, "pretrained is required"),
        ("ViT-S-32", "no-such-tag", "not a pretrained tag"),
        ("ViT-S-32", "/no/such/weights.safetensors", "does not exist"),
        ("No-Such-Model", "openai", "unknown open_clip model"),
    ],
)
def test_bad_model_arguments_are_usage_errors(model, pretrained, message):
    with pytest.raises(UsageError, match=message):
        OpenCLIPEmbedder(model, pretrained)


def test_batch_size_must_be_positive(weights_file):
    with pytest.raises(UsageError, match="batch_size"):
        OpenCLIPEmbedder("ViT-S-32", weights_file, batch_size=0)


def test_empty_and_nan_inputs_raise(embedder):
    with pytest.raises(ImageDecodeError, match="empty"):
        embedder.embed([])
    with pytest.raises(ImageDecodeError, match="NaN"):
        embedder.embed(np.full((1, 8, 8, 3), np.nan, np.float32))


def test_rebuilding_from_a_file_spec_needs_the_file_and_checks_its_hash(embedder, weights_file, other_embedder, tmp_path):
    with pytest.raises(EmbedderMismatchError, match="--pretrained"):
        embedder_from_spec(embedder.spec)
    rebuilt = embedder_from_spec(embedder.spec, pretrained=weights_file)
    assert spec_differences(rebuilt.spec, embedder.spec) == []
    wrong = tmp_path / "wrong.safetensors"
    wrong.write_bytes(b"0" * 10)
    with pytest.raises(EmbedderMismatchError, match="sha256"):
        embedder_from_spec(embedder.spec, pretrained=wrong)


def test_rebuilding_an_unknown_family_names_the_fix():
    with pytest.raises(EmbedderMismatchError, match="pass one yourself"):
        embedder_from_spec({"family": "sscd", "dim": 512})


def test_an_extreme_strip_image_is_embedded_without_a_huge_allocation(embedder):
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    vectors = embedder.embed(np.zeros((1, 100_000, 3), np.uint8))
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert vectors.shape == (1, embedder.dim) and grown_mib < 200


def as_if_built_from_a_tag(spec: dict, tag: str = "a-tag", **fields) -> dict:
    """The spec a tag load makes: the tag instead of the file name, plus what the loaded file's hash pins."""
    tag_spec = {key: value for key, value in spec.items() if key != "weights_file"}
    return {**tag_spec, "pretrained": tag, **fields}


def altered_copy(path, folder):
    """A copy of a weights file with its last byte changed: still loadable, another sha256."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    copy = folder / f"altered-{path.name}"
    copy.write_bytes(bytes(data))
    return copy


def test_a_local_copy_of_a_tags_weights_file_is_accepted_by_its_sha256(embedder, weights_file, unguarded):
    """Air-gapped: a blocklist built from a tag accepts the very same weights file, loaded from a path."""
    from guardrail import Blocklist, Guard

    tag_spec = as_if_built_from_a_tag(embedder.spec, quick_gelu=True, interpolation="bilinear")  # as a tag config may
    assert tag_spec["weights_sha256"] == hashlib.sha256(weights_file.read_bytes()).hexdigest()
    rebuilt = embedder_from_spec(tag_spec, pretrained=weights_file)
    assert rebuilt.spec["quick_gelu"] is True and rebuilt.spec["interpolation"] == "bilinear", "as the tag loads"
    assert spec_differences(tag_spec, rebuilt.spec) == []
    blocklist = Blocklist(rebuilt.embed([unguarded[1]]), spec=tag_spec)
    assert Guard(blocklist, rebuilt).check([unguarded[1]])[0].matched
    published_only = {**as_if_built_from_a_tag(embedder.spec), "weights_sha256": None,
                      "published_sha256": tag_spec["weights_sha256"]}
    assert spec_differences(published_only, embedder_from_spec(published_only, pretrained=weights_file).spec) == []


def test_a_local_file_with_another_sha256_is_refused_for_a_tag(embedder, weights_file, tmp_path):
    from guardrail import Blocklist, Guard

    tag_spec = as_if_built_from_a_tag(embedder.spec)
    altered = altered_copy(weights_file, tmp_path)
    with pytest.raises(EmbedderMismatchError, match="sha256"):
        embedder_from_spec(tag_spec, pretrained=altered)
    with pytest.raises(EmbedderMismatchError, match="pretrained"):
        Guard(Blocklist(np.zeros((0, embedder.dim), np.float32), spec=tag_spec),
              OpenCLIPEmbedder("ViT-S-32", pretrained=altered))
    unpinned = {key: value for key, value in tag_spec.items() if key != "weights_sha256"}  # an older blocklist
    with pytest.raises(EmbedderMismatchError, match="records no sha256"):
        embedder_from_spec(unpinned, pretrained=weights_file)


def test_tag_specs_record_the_sha256_open_clip_publishes_for_the_tag():
    from guardrail.embedders import open_clip_spec

    openai = open_clip_spec("ViT-B-32", "openai")  # from open_clip's config: no weights are loaded
    assert openai["published_sha256"] == "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af"
    assert "published_sha256" not in open_clip_spec("ViT-B-32", "laion2b_s34b_b79k"), "no full hash is published"
    local_copy = {**{key: value for key, value in openai.items() if key not in ("pretrained", "published_sha256")},
                  "weights_file": "ViT-B-32.pt", "weights_sha256": openai["published_sha256"]}
    assert spec_differences(openai, local_copy) == []
    assert [line.split(":")[0] for line in spec_differences(openai, {**local_copy, "weights_sha256": "0" * 64})] == [
        "pretrained"]


def test_the_cached_weights_lookup_needs_no_network(tmp_path):
    from guardrail.embedders import cached_weights_path

    assert cached_weights_path("ViT-B-32", "openai", cache_dir=str(tmp_path)) is None  # nothing cached, no download
