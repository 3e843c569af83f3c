"""Nearest-neighbour search over blocklist vectors with faiss.

Vectors are unit-norm, so inner product is cosine similarity. Search is exact (`IndexFlatIP`) today;
`_build_faiss_index` is the one place an approximate index will plug in.
"""

from __future__ import annotations

import numpy as np

from .errors import UsageError


class BlocklistIndex:
    """Cosine top-k search over a blocklist's embeddings. Safe for concurrent `search` calls (faiss CPU reads)."""

    def __init__(self, embeddings: np.ndarray) -> None:
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        if embeddings.ndim != 2:
            raise UsageError(f"embeddings must be (N, dim), got shape {embeddings.shape}")
        self.dim = embeddings.shape[1]
        self._index = _build_faiss_index(embeddings)

    @classmethod
    def from_blocklist(cls, blocklist: "Blocklist") -> "BlocklistIndex":  # noqa: F821
        return cls(blocklist.embeddings)

    def __len__(self) -> int:
        return int(self._index.ntotal)

    def search(self, vectors: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Top-`k` cosine scores and row ids for each query vector.

        Returns:
            `(scores, ids)`, both `(n, k)`: float32 scores, best first, and int64 row ids. Slots with no neighbour
            (an empty or small blocklist) have id -1 and score -inf.
        """
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise UsageError(f"query vectors must be (n, {self.dim}), got shape {vectors.shape}")
        if k < 1:
            raise UsageError(f"k must be >= 1, got {k}")
        if len(vectors) == 0 or len(self) == 0:
            return np.full((len(vectors), k), -np.inf, np.float32), np.full((len(vectors), k), -1, np.int64)
        scores, ids = self._index.search(vectors, k)
        scores[ids < 0] = -np.inf
        return scores, ids


def _build_faiss_index(embeddings: np.ndarray):  # -> faiss.Index
    import faiss

    index = faiss.IndexFlatIP(embeddings.shape[1])
    if len(embeddings):
        index.add(embeddings)
    return index
