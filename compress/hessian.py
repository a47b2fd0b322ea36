"""The Optimal Brain Surgeon preparation GPTQ and SparseGPT share."""

import torch


def prepare_inverse_hessian(w: torch.Tensor, h: torch.Tensor, damp: float):
    """-> (w, upper Cholesky factor of H^-1) for an OBS column sweep.

    Inputs that never fired (``H_jj = 0``) get a unit diagonal and zero weights; the diagonal is
    dampened by ``damp`` times its mean, as in the GPTQ / SparseGPT reference code. ``w`` and
    ``h`` are copied, never changed in place."""
    w = w.float().clone()
    h = h.float().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h.diagonal().add_(damp * torch.mean(torch.diagonal(h)))
    return w, torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
