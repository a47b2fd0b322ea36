"""Weighted k-means of ``dim``-dimensional vectors, batched over many code books at once.

Each coordinate of each vector has its own weight (the input energy ``H_jj`` of the column it came from), so
the distance is ``sum_u w_u (x_u - c_u)^2`` and a centroid is the per-coordinate weighted mean of its vectors:
the diagonal Hessian-weighted initialisation of GPTVQ ("GPTVQ: The Blessing of Dimensionality for LLM
Quantization", van Baalen et al., 2024). Initialisation is weighted k-means++ (Arthur & Vassilvitskii, 2007),
seeded; code books are processed a few at a time so the ``[books, vectors, k]`` distances stay bounded.
"""

from __future__ import annotations

import torch

from .kmeans import draw

CHUNK_ELEMENTS = 1 << 20  # distances (vectors x centroids) computed at once: small enough to stay in cache


def assign(weighted: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """The nearest centroid of every vector (int64 ``[T, n]``) in the distance ``sum_u w_u (x_u - c_u)^2``, given
    ``weighted = [w, w x]`` (``[T, n, 2d]``, from vectors ``x`` and their weights ``w``) and centroids ``c [T, k, d]``
    (the ``sum_u w_u x_u^2`` term is the same for every centroid and left out): one product ``[w, w x] @ [c^2, -2 c]``
    per chunk of vectors."""
    t, n, _ = weighted.shape
    step = max(1, CHUNK_ELEMENTS // max(t * c.shape[1], 1))
    terms = torch.cat([c * c, -2 * c], 2).transpose(1, 2)
    distances = torch.empty(t, min(step, n), c.shape[1])  # reused: a fresh 4 MB buffer a chunk is paged in each time
    codes = torch.empty(t, n, dtype=torch.long)
    for i in range(0, n, step):
        out = distances[:, :min(step, n - i)]
        torch.bmm(weighted[:, i:i + step], terms, out=out)
        codes[:, i:i + step] = out.min(-1).indices  # argmin's first index, 2-3x faster on CPU
    return codes


def kmeans_pp_init(x: torch.Tensor, w: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """Weighted k-means++: each next centroid drawn with probability ~ total weight x distance."""
    t, n, d = x.shape
    books = torch.arange(t)
    mass = w.sum(-1)
    centroids = torch.empty(t, k, d)
    centroids[:, 0] = x[books, draw(mass + 1e-30, gen)]
    dist = (w * (x - centroids[:, :1]).pow(2)).sum(-1)
    for j in range(1, k):
        p = mass * dist
        p[p.sum(1) <= 0] = 1.0  # every vector already sits on a centroid: any choice will do
        centroids[:, j] = x[books, draw(p, gen)]
        dist = torch.minimum(dist, (w * (x - centroids[:, j:j + 1]).pow(2)).sum(-1))
    return centroids


def slot_sums(slot: torch.Tensor, values: torch.Tensor, slots: int) -> torch.Tensor:
    """``[slots, m]`` float64: row ``i`` of ``values[n, m]`` added into row ``slot[i]`` (``index_add_``'s sums, the
    same order, by one ``bincount`` a column: several times faster on a CPU)."""
    return torch.stack([torch.bincount(slot, column, minlength=slots) for column in values.double().unbind(1)], 1)


def weighted_mean_update(weighted: torch.Tensor, codes: torch.Tensor, centroids: torch.Tensor):
    """Each centroid moved to the per-coordinate weighted mean of its vectors (one that has none stays), given
    ``weighted = [w, w x]`` as :func:`assign` takes it."""
    t, k, d = centroids.shape
    slot = (codes + torch.arange(t).unsqueeze(1) * k).reshape(-1)
    sums = slot_sums(slot, weighted.reshape(-1, 2 * d), t * k)
    wsum, wxsum = sums[:, :d], sums[:, d:]
    means = (wxsum / wsum.clamp_min(1e-300)).float().reshape(t, k, d)
    return torch.where(wsum.reshape(t, k, d) > 0, means, centroids)


def vector_kmeans(x: torch.Tensor, k: int, w: torch.Tensor | None = None, iterations: int = 50,
                  seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster the vectors ``x[T, n, d]`` of each of ``T`` code books into ``k`` centroids.

    -> (centroids ``[T, k, d]`` float32, codes ``[T, n]`` int64). ``w[T, n, d]`` >= 0 weights each coordinate
    (None: uniform); Lloyd iterations stop early once no assignment changes. Deterministic for a given ``seed``."""
    x = x.float()
    w = torch.ones_like(x) if w is None else w.float().clamp_min(0)
    gen = torch.Generator().manual_seed(seed)
    centroids = kmeans_pp_init(x, w, k, gen)
    weighted = torch.cat([w, w * x], 2)
    codes = assign(weighted, centroids)
    for _ in range(iterations):
        centroids = weighted_mean_update(weighted, codes, centroids)
        new = assign(weighted, centroids)
        if torch.equal(new, codes):
            break
        codes = new
    return centroids, codes
