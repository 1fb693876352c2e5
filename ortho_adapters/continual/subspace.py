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
* :func:`collect_gradients` / gradient mode: the same :func:`complement_rows` applied to ``H = G^T G``,
  ``G = dL/dW`` (m x n) of the new task's loss, gives the top-r right singular vectors of ``G Q``.
* :func:`scaled_rows` / :func:`update_importance` (scaled mode, after SGP): ``P = I - M diag(lambda) M^T``;
  ``A = V^T P`` with ``V`` the top-r eigenvectors of ``P H P``; each task raises ``lambda_i`` to
  ``a e_i / ((a - 1) e_i + e_max)`` (``e_i = u_i^T C u_i``, ``e_max`` the top eigenvalue of ``C``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from typing import Any, Optional

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


def _sum_over_ranks(
    sums: dict[str, torch.Tensor],
    layers: Mapping[str, nn.Module],
    batches: int,
    device: torch.device,
    shape: Callable[[nn.Module], tuple[int, int]],
    what: str,
) -> dict[str, torch.Tensor]:
    """``sums`` (a zero ``shape(layer)`` for a layer no local batch reached) summed over every rank.

    Raises ``ValueError`` when no rank saw a batch (``what`` names the statistic in the message).
    """
    for name, layer in layers.items():
        if name not in sums:
            sums[name] = torch.zeros(*shape(layer), dtype=torch.float64, device=device)
    sums[_COUNT] = torch.tensor([float(batches)], dtype=torch.float64, device=device)
    sums = all_reduce_sums(sums)
    if float(sums.pop(_COUNT)) == 0:
        raise ValueError(f"the dataloader yielded no batches: cannot compute the task's {what}")
    return sums


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
    sums = _sum_over_ranks(
        sums, layers, batches, device, lambda lay: (lay.in_features, lay.in_features), "input statistics"
    )
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


def extend_basis(
    m: Optional[torch.Tensor], cov: torch.Tensor, energy: float, room_share: float = 1.0
) -> torch.Tensor:
    """GPM's union: ``[M, V_j]`` (n x (k+j), fp64, orthonormal) with the fewest ``j`` reaching ``energy``.

    ``room_share < 1`` caps ``j`` at ``floor(room_share * (n - k))``: a task may take at most that share of
    the input dimensions still free in this layer (so ``n - k`` never reaches 0 and later tasks keep room).
    """
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
    if room_share < 1.0:
        j = min(j, int(room_share * (n - m64.shape[1])))
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


def collect_gradients(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    dataloader: Iterable,
    loss_fn: Optional[Callable[[nn.Module, Any], torch.Tensor]] = None,
    step: str = "collect_gradients",
) -> dict[str, torch.Tensor]:
    """``{name: H = G^T G}`` (n x n, fp64) with ``G = sum over batches of dL/dW`` of each layer's weight.

    ``G`` is read at the layer's output without touching any parameter's ``.grad``: a forward hook adds a
    zero tensor ``p`` (requires grad) to the layer's output and ``torch.autograd.grad(loss, p)`` gives
    ``dL/dy``, so ``dL/dW = sum_tokens (dL/dy)^T x`` for every call of the layer. The model runs in eval
    mode. ``loss_fn(model, batch)`` gives each batch's loss; without it the model's output ``loss`` (a
    mapping key or attribute) is used. Under ``torch.distributed``, ``G`` is all-reduced before ``H`` is
    formed.

    Raises:
        ValueError: an empty dataloader, or a loss that does not depend on any of the layers.
        NonFiniteError: a NaN / Inf in a layer's gradient sum (the message names ``step`` and the layer).
    """
    sums: dict[str, torch.Tensor] = {}
    seen: list[tuple[str, torch.Tensor, torch.Tensor]] = []

    def hook(name: str):
        def fn(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            if not isinstance(output, torch.Tensor):
                return None
            x = args[0] if args else kwargs["x"]
            probe = torch.zeros_like(output, requires_grad=True)
            seen.append((name, x.detach(), probe))
            return output + probe

        return fn

    handles = [m.register_forward_hook(hook(n), with_kwargs=True) for n, m in layers.items()]
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    batches = 0
    try:
        with torch.enable_grad(), _eval_mode(model):
            for batch in dataloader:
                seen.clear()
                batch = to_device(batch, device)
                if loss_fn is not None:
                    loss = loss_fn(model, batch)
                else:
                    out = call_model(model, batch)
                    loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
                if not isinstance(loss, torch.Tensor) or not loss.requires_grad or not seen:
                    raise ValueError(
                        f"{step}: the batch gave no differentiable loss that depends on the adapted layers "
                        "(pass loss_fn(model, batch), or batches whose model output has a `loss`)"
                    )
                grads = torch.autograd.grad(loss, [p for _, _, p in seen], allow_unused=True)
                for (name, x, _), g in zip(seen, grads):
                    if g is None:
                        continue
                    gm = g.reshape(-1, g.shape[-1]).to(torch.float32).t() @ x.reshape(-1, x.shape[-1]).float()
                    sums[name] = gm.double() if name not in sums else sums[name] + gm.double()
                batches += 1
    finally:
        seen.clear()
        for h in handles:
            h.remove()
    sums = _sum_over_ranks(
        sums, layers, batches, device, lambda lay: (lay.out_features, lay.in_features), "loss gradient"
    )
    out: dict[str, torch.Tensor] = {}
    for name in layers:
        check_finite(
            sums[name],
            step=step,
            statistic="loss gradient sum dL/dW",
            layer=name,
            hint="a batch holds a NaN / Inf input or gives a NaN / Inf loss; nothing was changed",
        )
        out[name] = sums[name].t() @ sums[name]
    return out


def weighted_projection(m: Optional[torch.Tensor], lam: Optional[torch.Tensor], n: int) -> torch.Tensor:
    """``P = I - M diag(lam) M^T`` (n x n, fp64); the identity without a basis."""
    eye = torch.eye(n, dtype=torch.float64, device=None if m is None else m.device)
    if m is None or m.shape[1] == 0:
        return eye
    m64 = m.to(torch.float64)
    return eye - (m64 * lam.to(m64)) @ m64.t()


def scaled_rows(
    m: Optional[torch.Tensor],
    lam: Optional[torch.Tensor],
    n: int,
    r: int,
    stat: Optional[torch.Tensor],
    seed: int,
    where: str,
) -> torch.Tensor:
    """Scaled mode's ``A = V^T P`` (r x n, fp64), ``P = I - M diag(lam) M^T``.

    ``V^T`` (orthonormal rows): the top-r eigenvectors of ``P stat P`` (``stat``: ``G^T G`` or an input
    covariance), else r Haar-random directions of the space ``P`` does not annihilate. So a basis direction
    ``u_i`` reaches the update only as ``A u_i = (1 - lam_i) V^T u_i``.

    Raises:
        ValueError: fewer than ``r`` directions are left open (``n`` minus the directions with ``lam = 1``).
    """
    closed = 0 if lam is None else int((lam.to(torch.float64) >= 1.0 - 1e-9).sum())
    if n - closed < r:
        raise ValueError(
            f"layer '{where}': the scaled projection leaves {n - closed} open dimensions (n={n}, {closed} "
            f"basis directions with importance 1), fewer than r={r}; lower `sgp_scale`, `energy` or `r`"
        )
    p = weighted_projection(m, lam, n)
    if stat is not None:
        v = torch.linalg.eigh(p @ stat.to(p) @ p)[1].flip(1)[:, :r]
    else:
        keep = complement_basis(None if lam is None else m[:, lam.to(torch.float64) >= 1.0 - 1e-9], n)
        rows = random_orthonormal_rows(r, keep.shape[1], seed, dtype=torch.float64).to(keep.device)
        v = keep @ rows.t()
    return (v.t() @ p).contiguous()


def update_importance(
    m: torch.Tensor, lam_old: Optional[torch.Tensor], cov: torch.Tensor, scale: float
) -> torch.Tensor:
    """SGP's importance of every column of the new basis ``m`` (n x k) after a task with covariance ``cov``.

    ``lambda_i = max(lambda_old_i, a e_i / ((a - 1) e_i + e_max))`` with ``e_i = u_i^T C u_i`` (the task's
    squared singular value along ``u_i``), ``e_max`` the top eigenvalue of ``C`` and ``a = scale``; columns
    new to the basis have ``lambda_old = 0``. Values are clipped to [0, 1].
    """
    m64, cov64 = m.to(torch.float64), cov.to(torch.float64)
    old = torch.zeros(m64.shape[1], dtype=torch.float64, device=m64.device)
    if lam_old is not None and lam_old.numel():
        old[: lam_old.numel()] = lam_old.to(old)
    e_max = float(torch.linalg.eigvalsh(cov64)[-1])
    if e_max <= 0 or m64.shape[1] == 0:
        return old
    e = ((cov64 @ m64) * m64).sum(0).clamp_min(0.0)
    new = scale * e / ((scale - 1.0) * e + e_max)
    return torch.maximum(old, new).clamp(0.0, 1.0)
