"""Input statistics and basis math of the subspace mode (GPM, Saha et al. 2021; InfLoRA, CVPR 2024).

For an adapted layer with inputs ``x`` (n features) the task's uncentred covariance is ``C = sum x^T x``
over its tokens (each batch's product in fp32, summed and decomposed in fp64). ``M`` (n x k, orthonormal
columns) is the union of earlier tasks' input bases. Working in an orthonormal basis ``Q`` (n x (n-k)) of
the complement of ``M`` keeps every new direction exactly orthogonal to ``M``:

* :func:`extend_basis`: GPM's criterion. With ``E = trace(C)`` and ``E_M = trace(M^T C M)``, add the fewest
  top eigenvectors of ``Q^T C Q`` (mapped back by ``Q``) such that ``(E_M + sum lambda) / E >= energy``.
* :func:`complement_rows`: the next task's ``A`` = top-r eigenvectors of ``(I - M M^T) C (I - M M^T)``,
  i.e. the top-r left singular vectors of ``(I - M M^T) C``, again computed as ``Q`` times eigenvectors of
  ``Q^T C Q``; without data, ``r`` random orthonormal directions of the complement.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from typing import Optional

import torch
from torch import nn

from ..core.batches import call_model, to_device
from ..core.distributed import all_reduce_sums
from ..core.finite import check_finite
from ..core.orthonormal import random_orthonormal_rows


@contextmanager
def _eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


_COUNT = "\0batches"
_REL_TOL = 1e-10  # eigenvalues below this share of the largest count as zero


def collect_covariances(
    model: nn.Module, layers: Mapping[str, nn.Module], dataloader: Iterable, step: str = "collect_covariances"
) -> dict[str, torch.Tensor]:
    """``{name: sum x^T x}`` (n x n; fp32 per batch, summed in fp64) of each layer's input in ``dataloader``.

    The model runs in eval mode under ``no_grad``. When a dict batch has an ``attention_mask`` whose shape
    matches the input's leading dims, padded tokens are left out. Under ``torch.distributed`` the sums are
    all-reduced, so every rank returns the same matrices.

    Raises:
        NonFiniteError: a NaN / Inf in a layer's summed covariance (a bad value in some batch's inputs to
            that layer); the message names ``step`` and the layer. Every rank raises (the sums are reduced).
    """
    sums: dict[str, torch.Tensor] = {}
    current: dict[str, Optional[torch.Tensor]] = {"mask": None}

    def hook(name: str):
        def fn(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else kwargs["x"]
            mask = current["mask"]
            if mask is not None and x.dim() == mask.dim() + 1 and x.shape[:-1] == mask.shape:
                x = x[mask.bool()]
            flat = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
            cov = (flat.t() @ flat).to(torch.float64)  # fp32 per batch, fp64 across batches
            sums[name] = cov if name not in sums else sums[name] + cov

        return fn

    handles = [m.register_forward_pre_hook(hook(n), with_kwargs=True) for n, m in layers.items()]
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    batches = 0
    try:
        with torch.no_grad(), _eval_mode(model):
            for batch in dataloader:
                batch = to_device(batch, device)
                current["mask"] = batch.get("attention_mask") if isinstance(batch, Mapping) else None
                call_model(model, batch)
                batches += 1
    finally:
        for h in handles:
            h.remove()
    for name, layer in layers.items():
        if name not in sums:
            n = layer.in_features
            sums[name] = torch.zeros(n, n, dtype=torch.float64, device=device)
    sums[_COUNT] = torch.tensor([float(batches)], dtype=torch.float64, device=device)
    sums = all_reduce_sums(sums)
    if float(sums.pop(_COUNT)) == 0:
        raise ValueError("the dataloader yielded no batches: cannot compute the task's input statistics")
    for name in layers:
        check_finite(
            sums[name],
            step=step,
            statistic="input covariance sum x^T x",
            layer=name,
            hint="a batch holds a NaN / Inf input (or the model produces one upstream of this layer); "
            "nothing was changed",
        )
    return sums


def complement_basis(m: Optional[torch.Tensor], n: int) -> torch.Tensor:
    """Orthonormal ``Q`` (n x (n-k), fp64) with ``Q^T M = 0``; the identity when ``M`` is None or empty."""
    if m is None or m.shape[1] == 0:
        return torch.eye(n, dtype=torch.float64, device=None if m is None else m.device)
    q, _ = torch.linalg.qr(m.to(torch.float64), mode="complete")
    return q[:, m.shape[1] :].contiguous()


def _top_eigvecs(cov: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending, clamped at 0) and eigenvectors (mapped by ``q``) of ``q^T cov q``."""
    evals, evecs = torch.linalg.eigh(q.t() @ cov @ q)
    evals, evecs = evals.flip(0).clamp_min(0.0), evecs.flip(1)
    return evals, q @ evecs


def extend_basis(m: Optional[torch.Tensor], cov: torch.Tensor, energy: float) -> torch.Tensor:
    """GPM's union: ``[M, V_j]`` (n x (k+j), fp64, orthonormal) with the fewest ``j`` reaching ``energy``."""
    n = cov.shape[0]
    m64 = torch.zeros(n, 0, dtype=torch.float64, device=cov.device) if m is None else m.to(torch.float64)
    total = torch.trace(cov)
    if total <= 0 or m64.shape[1] == n:
        return m64
    inside = torch.trace(m64.t() @ cov @ m64)
    evals, evecs = _top_eigvecs(cov, complement_basis(m64, n))
    reached = (inside + torch.cumsum(evals, 0)) / total
    # directions with numerically no energy are never added (so energy = 1.0 keeps the inputs' span)
    nonzero = int((evals > _REL_TOL * float(evals[0])).sum()) if evals.numel() and evals[0] > 0 else 0
    if inside / total >= energy:
        j = 0
    else:
        hits = torch.nonzero(reached >= energy - 1e-12)
        j = min(int(hits[0]) + 1 if len(hits) else evals.numel(), nonzero)
    new = torch.cat([m64, evecs[:, :j]], dim=1)
    q, _ = torch.linalg.qr(new)  # re-orthonormalize the union in fp64
    return q


def complement_rows(
    m: Optional[torch.Tensor], n: int, r: int, cov: Optional[torch.Tensor], seed: int, where: str
) -> torch.Tensor:
    """``A`` (r x n, fp64, orthonormal rows) inside the complement of ``M``.

    With ``cov``: the top-r eigenvectors of ``(I - M M^T) cov (I - M M^T)``. Without: r Haar-random directions
    of the complement from a private generator seeded with ``seed``.

    Raises:
        ValueError: the complement (``n - k`` dimensions) is smaller than ``r``; ``where`` names the layer.
    """
    k = 0 if m is None else m.shape[1]
    if n - k < r:
        raise ValueError(
            f"layer '{where}': the orthogonal complement of the earlier tasks' input bases has {n - k} "
            f"dimensions (n={n}, basis k={k}), fewer than r={r}; lower `energy` or `r`"
        )
    q = complement_basis(m, n)
    if cov is not None:
        return _top_eigvecs(cov.to(torch.float64), q)[1][:, :r].t().contiguous()
    rows = random_orthonormal_rows(r, q.shape[1], seed, dtype=torch.float64).to(q.device)
    return (q @ rows.t()).t().contiguous()
