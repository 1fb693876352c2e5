"""FedSVD's server step (Lee et al., arXiv 2505.12805, Alg. 1) and the control arms' averaging.

For every adapted layer, with client weights ``w_k = n_k / sum_j n_j``::

    B_avg = sum_k w_k B_k                      (clients trained only B; A was frozen and shared)
    U S Vh = svd(B_avg A)                      (rank <= r: no truncation loss)
    A_new = Vh[:r]    (orthonormal rows)       B_new = U[:, :r] diag(S[:r])

so ``B_new A_new = B_avg A = sum_k w_k B_k A`` exactly. The SVD is computed without forming the
``m x n`` product: with ``A^T = Q R`` (thin QR, ``Q`` n x r), ``B_avg A = (B_avg R^T) Q^T`` and the SVD of the
``m x r`` matrix ``B_avg R^T = U S W^T`` gives ``B_avg A = U S (W^T Q^T)``, where ``W^T Q^T`` has orthonormal
rows. The new ``A`` therefore always spans the old ``A``'s row space: with plain SGD FedSVD differs from
FFA-LoRA with an orthonormal ``A0`` only by the conditioning of the ``(B, A)`` factorization.
All arithmetic is float64; results are cast back to the global state's dtypes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch

from ..core.finite import check_finite

A_SUFFIX = "fedsvd_A"
B_SUFFIX = "fedsvd_B.weight"

StateDict = Mapping[str, torch.Tensor]


def factor_pairs(state: StateDict) -> list[tuple[str, str]]:
    """``(A key, B key)`` of every FedSVD layer in an adapter state dict."""
    pairs = []
    for key in state:
        if key.endswith(A_SUFFIX):
            b_key = key[: -len(A_SUFFIX)] + B_SUFFIX
            if b_key not in state:
                raise ValueError(f"global state has {key!r} but no matching {b_key!r}")
            pairs.append((key, b_key))
    return pairs


def validate_updates(
    global_state: StateDict,
    client_states: Sequence[StateDict],
    num_examples: Sequence[int],
    frozen_keys: Iterable[str] = (),
    client_names: Sequence[str] | None = None,
) -> None:
    """Raise ``ValueError`` naming the client and the tensor for the first bad update.

    A good update has exactly the global state's keys, shapes and dtypes, only finite values (checked by the
    shared :func:`~ortho_adapters.core.finite.check_finite`: a :class:`NonFiniteError` saying NaN or Inf), a
    positive integer example count, and leaves every key in ``frozen_keys`` bit-identical to the global state.
    """
    if len(client_states) != len(num_examples):
        raise ValueError(f"{len(client_states)} client states but {len(num_examples)} example counts")
    if not client_states:
        raise ValueError("no client updates to aggregate")
    names = (
        list(client_names) if client_names is not None else [f"client {i}" for i in range(len(client_states))]
    )
    frozen = set(frozen_keys)
    for name, state, count in zip(names, client_states, num_examples):
        if isinstance(count, bool) or not isinstance(count, int) or count <= 0:
            raise ValueError(f"{name}: number of examples must be a positive int, got {count!r}")
        missing = sorted(set(global_state) - set(state))
        extra = sorted(set(state) - set(global_state))
        if missing or extra:
            raise ValueError(
                f"{name}: keys differ from the global state (missing {missing}, unexpected {extra})"
            )
        for key, ref in global_state.items():
            tensor = state[key]
            if not isinstance(tensor, torch.Tensor):
                raise ValueError(f"{name}: tensor {key!r} is a {type(tensor).__name__}, not a torch.Tensor")
            if tensor.shape != ref.shape:
                raise ValueError(
                    f"{name}: tensor {key!r} has shape {tuple(tensor.shape)}, expected {tuple(ref.shape)}"
                )
            if tensor.dtype != ref.dtype:
                raise ValueError(f"{name}: tensor {key!r} has dtype {tensor.dtype}, expected {ref.dtype}")
            check_finite(
                tensor,
                step="validate_updates",
                statistic=f"{name}: tensor {key!r}",
                hint="the update was rejected; nothing was aggregated",
            )
            if key in frozen and not torch.equal(tensor.cpu(), ref.cpu()):
                raise ValueError(f"{name}: tensor {key!r} is frozen but differs from the global state")


def weights_of(num_examples: Sequence[int]) -> list[float]:
    """``n_k / sum_j n_j``."""
    total = float(sum(num_examples))
    return [n / total for n in num_examples]


def weighted_average(
    global_state: StateDict,
    client_states: Sequence[StateDict],
    num_examples: Sequence[int],
    keys: Iterable[str],
) -> dict[str, torch.Tensor]:
    """``sum_k w_k state_k[key]`` (float64, cast to the global dtype) for each floating key in ``keys``."""
    weights = weights_of(num_examples)
    out = {}
    for key in keys:
        ref = global_state[key]
        if not ref.is_floating_point():
            out[key] = ref.clone()
            continue
        acc = torch.zeros(ref.shape, dtype=torch.float64, device=ref.device)
        for w, state in zip(weights, client_states):
            acc += w * state[key].to(device=ref.device, dtype=torch.float64)
        out[key] = acc.to(ref.dtype)
    return out


def refactorize(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B_new, A_new)`` with ``B_new A_new = b a``, ``A_new`` orthonormal rows, ``B_new = U S`` (float64).

    ``A_new`` = top-r right singular vectors of ``b a``; via a thin QR of ``a^T`` (module doc).
    """
    b64, a64 = b.to(torch.float64), a.to(torch.float64)
    q, rr = torch.linalg.qr(a64.t())  # a^T = Q R, Q: n x r
    u, s, wh = torch.linalg.svd(b64 @ rr.t(), full_matrices=False)  # (m x r) = U S W^T
    return u * s, wh @ q.t()


def aggregate(
    global_state: StateDict,
    client_states: Sequence[StateDict],
    num_examples: Sequence[int],
    client_names: Sequence[str] | None = None,
) -> dict[str, torch.Tensor]:
    """FedSVD server step: the new global adapter state from the clients' (validated) states.

    Args:
        global_state: the adapter state dict sent to the clients this round
            (``peft.get_peft_model_state_dict``: ``...fedsvd_A`` and ``...fedsvd_B.weight`` per layer, plus
            any ``modules_to_save`` tensors).
        client_states: the clients' adapter state dicts after local training (same keys; ``A`` unchanged).
        num_examples: the clients' training example counts ``n_k`` (weights ``n_k / sum n``).
        client_names: labels used in error messages (default ``client 0``, ``client 1``, ...).

    Returns:
        A new state dict: per layer ``B_new = U S`` and ``A_new = Vh`` from the SVD of ``B_avg A``; every
        other floating tensor (e.g. a trained classifier head) is the weighted average. Inputs are never
        modified.

    Raises:
        ValueError: a client update is malformed (naming the client and the tensor), see
            :func:`validate_updates`.
    """
    pairs = factor_pairs(global_state)
    a_keys = [a for a, _ in pairs]
    validate_updates(global_state, client_states, num_examples, frozen_keys=a_keys, client_names=client_names)
    others = [k for k in global_state if k not in set(a_keys)]
    new = weighted_average(global_state, client_states, num_examples, others)
    for a_key, b_key in pairs:
        b_new, a_new = refactorize(new[b_key], global_state[a_key])
        new[b_key] = b_new.to(global_state[b_key].dtype)
        new[a_key] = a_new.to(global_state[a_key].dtype)
    return {k: new[k] for k in global_state}


def average_trainable(
    global_state: StateDict,
    client_states: Sequence[StateDict],
    num_examples: Sequence[int],
    frozen_keys: Iterable[str] = (),
    client_names: Sequence[str] | None = None,
) -> dict[str, torch.Tensor]:
    """The control arms' server step: validated weighted average of every key not in ``frozen_keys``.

    FFA-LoRA: ``frozen_keys`` = the ``lora_A`` keys (only ``B`` is averaged); FedAvg-LoRA: none.
    """
    frozen = set(frozen_keys)
    validate_updates(global_state, client_states, num_examples, frozen_keys=frozen, client_names=client_names)
    new = weighted_average(
        global_state, client_states, num_examples, [k for k in global_state if k not in frozen]
    )
    return {k: (new[k] if k in new else global_state[k].clone()) for k in global_state}
