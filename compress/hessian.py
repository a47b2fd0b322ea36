"""What the Hessian-based passes share (GPTQ, SparseGPT, k-means with error feedback): the Optimal Brain
Surgeon preparation, the lazy column sweep, and the relative output error of a compressed layer."""

import torch


def prepare_inverse_hessian(w: torch.Tensor, h: torch.Tensor, damp: float, order: torch.Tensor | None = None,
                            in_place: bool = False):
    """-> (w, upper Cholesky factor of H^-1) for an OBS column sweep, with the columns in ``order`` when given.

    Inputs that never fired (``H_jj = 0``) get a unit diagonal and zero weights; the diagonal is
    dampened by ``damp`` times its mean, as in the GPTQ / SparseGPT reference code. ``h`` is copied, never
    changed; ``w`` too unless ``in_place`` (a float32 scratch copy of the caller's, then permuted and zeroed where
    it is). At most two [in, in] matrices of this function's are alive at once (an 8B model's down projection has
    14336 inputs: 0.8 GB each)."""
    if in_place:
        assert w.dtype == torch.float32, "an in-place sweep needs a float32 scratch copy"
        if order is not None:
            permute_columns_(w, order)
    else:
        w = w.float()[:, order] if order is not None else w.float().clone()
    h = _permuted_copy(h.float(), order)
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h.diagonal().add_(damp * torch.mean(torch.diagonal(h)))
    factor = torch.linalg.cholesky(h)
    del h
    inverse = torch.cholesky_inverse(factor)
    del factor
    return w, torch.linalg.cholesky(inverse, upper=True)


def _permuted_copy(h: torch.Tensor, order: torch.Tensor | None) -> torch.Tensor:
    """``h[order][:, order]`` (or a copy of ``h``) as one new matrix, never through a second full-size copy."""
    if order is None:
        return h.clone()
    return permute_columns_(h.index_select(0, order), order)


def permute_columns_(m: torch.Tensor, order: torch.Tensor, rows_at_once: int = 1024) -> torch.Tensor:
    """``m[:, order]`` in place, a slice of rows at a time."""
    for r in range(0, m.shape[0], rows_at_once):
        m[r:r + rows_at_once] = m[r:r + rows_at_once].index_select(1, order)
    return m


def obq_sweep(w: torch.Tensor, hinv: torch.Tensor, round_column, block_size: int = 128, start_block=None) -> None:
    """The Optimal Brain Quantization column sweep in GPTQ's lazy-batch form, in place on ``w``.

    Column ``j`` is replaced by ``round_column(j, rest)`` (its stored value; ``rest`` is the
    not-yet-rounded part of the current lazy block from column ``j`` on, updated so far), and the
    error is spread over the later columns through the Cholesky factor ``hinv`` of ``H^-1``.
    ``start_block(i1, i2, w1, hinv1)``, when given, sees each lazy block first (its columns as updated
    so far and its part of the factor): SparseGPT chooses the block's mask there."""
    cols = w.shape[1]
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        if start_block is not None:
            start_block(i1, i2, w1, hinv1)
        for i in range(i2 - i1):
            rounded = round_column(i1 + i, w1[:, i:])
            e = (w1[:, i] - rounded) / hinv1[i, i]
            w1[:, i:].addr_(e, hinv1[i, i:], alpha=-1)  # in place: no rows x block temporary per column
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]


def output_error(w: torch.Tensor, wq: torch.Tensor, h: torch.Tensor, rows_at_once: int = 2048) -> float:
    """Relative output error ||(W - Wq) X||^2 / ||W X||^2 = tr(D H D^T) / tr(W H W^T), summed over slices of
    ``rows_at_once`` rows (its temporaries stay a few slices of the weight, whatever the layer's height)."""
    err = ref = 0.0
    for r in range(0, w.shape[0], rows_at_once):
        wr = w[r:r + rows_at_once].float()
        d = wr - wq[r:r + rows_at_once]
        err += float(((d @ h) * d).sum())
        ref += float(((wr @ h) * wr).sum())
    return err / max(ref, 1e-12)
