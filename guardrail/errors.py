"""Typed errors, so callers (and the CLI) can tell bad input from bugs.

Every error guardrail raises on purpose is a `GuardrailError`. Messages name the argument or file at fault and
the fix. `exit_code` is what the `guardrail` command exits with: 1 for an error, 2 for a usage error.
"""

from __future__ import annotations


class GuardrailError(Exception):
    """Base class of every error guardrail raises on purpose."""

    exit_code = 1


class UsageError(GuardrailError, ValueError):
    """An argument is invalid: its value, type or combination with other arguments."""

    exit_code = 2


class BlocklistError(GuardrailError):
    """A blocklist file or object is unreadable, truncated, tampered with, or inconsistent."""


class EmbedderMismatchError(GuardrailError):
    """The runtime embedder does not make the same vectors as the one that built the blocklist."""


class ModelFileError(GuardrailError):
    """A TorchScript or ONNX file is not a usable model: missing, not of its format, or wrong output on a probe."""


class ShardError(GuardrailError):
    """An embedding shard is missing, unreadable or inconsistent (wrong dim, NaN rows, metadata row count)."""


class ClusterError(GuardrailError):
    """The Ray cluster at the given address cannot be reached, or Ray is not installed."""


class ImageDecodeError(GuardrailError, ValueError):
    """An input image cannot be decoded or turned into a valid embedding (corrupt, empty, NaN, bad shape)."""


class ResampleExhaustedError(GuardrailError):
    """Every resample attempt still matched the blocklist, and `on_exhausted="raise"` was asked for.

    `report` is the call's `GuardReport`; `output` is the pipeline output the call would have returned with
    `on_exhausted="black"` (the exhausted slots black, every other slot's image kept), so no clean image is lost.
    """

    def __init__(self, message: str, report: object = None, output: object = None) -> None:
        super().__init__(message)
        self.report = report
        self.output = output
