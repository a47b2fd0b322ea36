"""Weighted one-dimensional k-means, batched over many tables at once.

Palettization clusters the scalar weights of each table (a tensor, an output channel, or a group
of channels) into ``k`` centroids. In one dimension the nearest centroid of every value follows
from the midpoints between sorted centroids (``searchsorted``), and the update step is a weighted
mean of a run of the sorted values (prefix sums), so a Lloyd iteration costs O(k log n) per row
after one sort. Rows are processed in chunks to bound memory on large layers.

Weights make it the sensitivity-weighted k-means of SqueezeLLM ("SqueezeLLM: Dense-and-Sparse
Quantization", Kim et al., 2023): centroids move toward the values the loss is most sensitive to.
A weight of zero removes a value from the clustering (padding, outliers kept elsewhere).
Initialisation is weighted k-means++ (Arthur & Vassilvitskii, 2007), seeded.
"""

from __future__ import annotations

import torch

CHUNK_ELEMENTS = 1 << 22  # values per chunk of rows


def nearest(values: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid for ``values[T, n]`` given sorted ``centroids[T, k]`` (int64).
    On a GPU with CuPy the assignment runs in ``cuda/kmeans_assign.cu``."""
    if values.is_cuda:
        from .kernels import kmeans_assign

        codes = kmeans_assign(values, centroids)
        if codes is not None:
            return codes.long()
    mids = (centroids[:, 1:] + centroids[:, :-1]) / 2
    return torch.searchsorted(mids.contiguous(), values.contiguous())


def kmeans_pp_init(values: torch.Tensor, weight: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """Weighted k-means++: each next centroid drawn with probability ~ weight x D^2."""
    t, n = values.shape
    rows = torch.arange(t)
    first = draw(weight, gen, torch.float32)
    centroids = torch.empty(t, k)
    centroids[:, 0] = values[rows, first]
    d2 = (values - centroids[:, :1]).pow(2)
    for j in range(1, k):
        p = weight * d2
        empty = p.sum(1) <= 0  # every value already sits on a centroid: any choice will do
        p[empty] = weight[empty] + 1e-30
        pick = draw(p, gen, torch.float32)
        centroids[:, j] = values[rows, pick]
        d2 = torch.minimum(d2, (values - centroids[:, j:j + 1]).pow(2))
    return centroids.sort(dim=1).values


def draw(p: torch.Tensor, gen: torch.Generator, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """One index per row of the non-negative weights ``p[T, n]``, drawn with probability ``p / p.sum(1)`` by
    inverting each row's cumulative sum (one search; ``torch.multinomial`` is many times slower), summed and drawn
    in ``dtype`` (the palettes' k-means++ keeps float32, the draws its measured results came from); an index whose
    weight is zero is never drawn."""
    cdf = p.to(dtype).cumsum(1)
    r = torch.rand(p.shape[0], 1, generator=gen, dtype=dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, r, right=True).squeeze(1).clamp_max(p.shape[1] - 1)


def lloyd(values: torch.Tensor, weight: torch.Tensor, centroids: torch.Tensor, iterations: int) -> torch.Tensor:
    """Weighted Lloyd iterations from sorted ``centroids[T, k]`` until no assignment changes.

    In one dimension every cluster is a run of the sorted values, so an iteration only locates the
    ``k - 1`` run boundaries (``searchsorted`` of the midpoints into the sorted values) and takes
    each run's weighted mean from prefix sums: O(k log n) per row instead of O(n). Ties at a
    midpoint go to the lower cluster, as in :func:`nearest`. A cluster that loses all its weight
    keeps its centroid."""
    order = values.argsort(dim=1)
    sorted_values = values.gather(1, order).contiguous()
    w = weight.gather(1, order).double()
    zero = torch.zeros(values.shape[0], 1, dtype=torch.float64)
    cum_w = torch.cat([zero, w.cumsum(1)], 1)
    cum_wx = torch.cat([zero, (w * sorted_values.double()).cumsum(1)], 1)
    ends = torch.full((values.shape[0], 1), values.shape[1], dtype=torch.long)
    bounds = None
    for _ in range(iterations):
        mids = ((centroids[:, 1:] + centroids[:, :-1]) / 2).contiguous()
        new = torch.cat([torch.zeros_like(ends), torch.searchsorted(sorted_values, mids, right=True), ends], 1)
        if bounds is not None and torch.equal(new, bounds):
            break
        bounds = new
        run_w = cum_w.gather(1, bounds[:, 1:]) - cum_w.gather(1, bounds[:, :-1])
        run_wx = cum_wx.gather(1, bounds[:, 1:]) - cum_wx.gather(1, bounds[:, :-1])
        means = (run_wx / run_w.clamp_min(1e-300)).float()
        centroids = torch.where(run_w > 0, means, centroids).sort(dim=1).values
    return centroids


def weighted_kmeans(values: torch.Tensor, k: int, weight: torch.Tensor | None = None, iterations: int = 100,
                    seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster each row of ``values[T, n]`` into ``k`` centroids.

    Returns (sorted centroids ``[T, k]`` float32, codes ``[T, n]`` int64 of the nearest centroid).
    ``weight[T, n]`` >= 0 (None: uniform). Deterministic for a given ``seed``. Rows with fewer than
    ``k`` distinct values get repeated centroids (unused codes), never NaN."""
    values = values.float()
    weight = torch.ones_like(values) if weight is None else weight.float().clamp_min(0)
    t, n = values.shape
    gen = torch.Generator().manual_seed(seed)
    step = max(1, CHUNK_ELEMENTS // max(n, 1))
    centroids = torch.empty(t, k)
    for r in range(0, t, step):
        v, w = values[r:r + step], weight[r:r + step]
        init = kmeans_pp_init(v, w, k, gen)
        centroids[r:r + step] = lloyd(v, w, init, iterations)
    codes = torch.cat([nearest(values[r:r + step], centroids[r:r + step]) for r in range(0, t, step)])
    return centroids, codes
