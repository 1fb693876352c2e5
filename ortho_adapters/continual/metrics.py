"""Continual-learning metrics of an accuracy matrix ``R`` (``R[t][i]``: accuracy on task ``i`` after ``t``).

AA = mean_i R[T-1][i]; BWT = mean_{i < T-1} (R[T-1][i] - R[i][i]) (Lopez-Paz & Ranzato, 2017);
plasticity = mean_i R[i][i].
"""

from __future__ import annotations


def transfer_metrics(R: list[list[float]]) -> tuple[float, float, float]:
    """``(AA, BWT, plasticity)`` of a lower-triangular ``R`` with ``T`` rows (BWT is 0 for one task)."""
    T = len(R)
    aa = sum(R[-1]) / T
    bwt = sum(R[-1][i] - R[i][i] for i in range(T - 1)) / max(T - 1, 1)
    plasticity = sum(R[i][i] for i in range(T)) / T
    return aa, bwt, plasticity
