"""Rebuild the embedder a blocklist's spec names: open_clip, or a TorchScript/ONNX descriptor.

A blocklist stores the spec of every embedder that made its vectors. Serving code, the CLI and
`GuardedPipeline.from_pretrained` turn a spec back into an embedder here, whatever its family, so that none of them
needs to know the families (and the embedder modules need not know each other).
"""

from __future__ import annotations

import os

from .descriptors import DESCRIPTOR_FAMILIES, descriptor_from_spec
from .embedders import Embedder, open_clip_from_spec


def embedder_from_spec(
    spec: dict,
    pretrained: str | os.PathLike | None = None,
    device: str = "cpu",
    batch_size: int = 32,
    precision: str | None = None,
) -> Embedder:
    """Rebuild the embedder a blocklist was built with, from its stored spec.

    An open_clip spec that names a pretrained tag is rebuilt from that tag, or from a local copy of its weights file
    (`pretrained=PATH`) whose sha256 the spec records: the air-gapped path. A spec built from a weights file needs
    that file again. QuickGELU and preprocessing follow the spec. A TorchScript or ONNX descriptor's spec is rebuilt
    from `pretrained=PATH`, else from the spec's `weights_file`. Raises `EmbedderMismatchError` when it cannot be
    rebuilt, a file's sha256 is not the spec's, or the result differs.
    """
    rebuild = descriptor_from_spec if spec.get("family") in DESCRIPTOR_FAMILIES else open_clip_from_spec
    return rebuild(spec, pretrained, device=device, batch_size=batch_size, precision=precision)
