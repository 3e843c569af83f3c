"""guardrail: stop text-to-image diffusion models from handing users copies of their training images.

A `Blocklist` holds embeddings of images that must not be reproduced; a `Guard` embeds generated images with
open_clip (or a copy-detection descriptor such as SSCD, from a TorchScript or ONNX file) and looks them up with
faiss; a `GuardedPipeline` wraps any diffusers pipeline and resamples, rejects or flags matches; `calibrate` picks
a blocklist's threshold from measured copies and non-copies. Heavy libraries (torch, open_clip, diffusers, faiss,
onnxruntime) are imported only when first used, so `import guardrail` costs numpy and PIL.
"""

from .blocklist import DEFAULT_THRESHOLD, Blocklist
from .build import BuildError, build_blocklist, merge_blocklists
from .calibration import CalibrationResult, calibrate
from .descriptors import ONNXEmbedder, TorchScriptEmbedder
from .detector import MemorizationThreshold, calibrate_memorization
from .embedders import Embedder, OpenCLIPEmbedder
from .embedding_sets import TILE_GRID, EmbeddingSet
from .engine_ray import build_blocklist_on_ray
from .errors import (
    BlocklistError,
    ClusterError,
    EmbedderMismatchError,
    GuardrailError,
    ImageDecodeError,
    ModelFileError,
    ResampleExhaustedError,
    ShardError,
    UsageError,
)
from .guard import Guard, Verdict
from .images import load_image
from .index import BlocklistIndex
from .mine import mine_duplicates
from .mitigation import DelayGuidance, PerturbPrompt, Reseed, Stage, SteerAway
from .pipeline import GuardedPipeline, GuardReport
from .rebuild import embedder_from_spec
from .stage_calibration import StageCalibration, calibrate_stages

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_THRESHOLD",
    "Blocklist",
    "BlocklistError",
    "BlocklistIndex",
    "BuildError",
    "CalibrationResult",
    "ClusterError",
    "DelayGuidance",
    "Embedder",
    "EmbedderMismatchError",
    "EmbeddingSet",
    "Guard",
    "GuardReport",
    "GuardedPipeline",
    "GuardrailError",
    "MemorizationThreshold",
    "ModelFileError",
    "ONNXEmbedder",
    "PerturbPrompt",
    "Reseed",
    "Stage",
    "StageCalibration",
    "SteerAway",
    "TILE_GRID",
    "ImageDecodeError",
    "OpenCLIPEmbedder",
    "ResampleExhaustedError",
    "ShardError",
    "TorchScriptEmbedder",
    "UsageError",
    "Verdict",
    "build_blocklist",
    "build_blocklist_on_ray",
    "calibrate",
    "calibrate_memorization",
    "calibrate_stages",
    "embedder_from_spec",
    "load_image",
    "merge_blocklists",
    "mine_duplicates",
]
