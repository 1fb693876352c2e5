"""Configuration of O3 unlearning (Gao et al., "On Large Language Model Continual Unlearning" / "Practical
Unlearning for Large Language Models", arXiv 2407.10223)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional

from ..core.config import OrthoAdapterConfig

# The paper's targets: all seven projections of a Llama-family decoder layer.
LLAMA_PROJECTIONS: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)


@dataclass
class O3Config(OrthoAdapterConfig):
    """O3: one orthogonal LoRA per unlearning request inside one PEFT adapter, behind an OOD gate.

    Request ``t`` adds ``s B_t A_t`` (``A_t``: r x n, ``B_t``: m x r, ``s = alpha / r``) to every targeted
    layer; earlier requests' factors are frozen buffers. Training request ``t`` minimizes
    ``CE(forget input, replaced target) + lambda * mean_layers sum_{i<t} ||A_i A_t^T||_F^2``
    (:func:`ortho_adapters.o3.orthogonality_penalty`). With ``gate=True`` each sample's summed adapter
    contribution is scaled by ``w(x) = max_t w_t(x)`` in [0, 1], the calibrated OOD detector score of
    request ``t`` (:mod:`ortho_adapters.o3.gate`); ``w = 0`` gives exactly the base model's output.
    Default init: ``B = 0``, so the model starts exactly at the base model.

    Args:
        r: LoRA rank of every request (official: 8).
        alpha: scaling numerator, ``s = alpha / r`` (official: 16).
        orth_lambda: weight of the orthogonality penalty (official: 0.1).
        requests: names of the unlearning requests, oldest first (filled by
            :func:`ortho_adapters.o3.unlearn`; the last one owns the trainable LoRA).
        gate: scale each sample's contribution by the OOD gate (``False``: a plain sum of LoRAs).
        detector_model: local folder of the detector's encoder and tokenizer (``None``: the cached
            all-MiniLM-L6-v2).
        detector_r / detector_alpha / detector_targets: the detector encoder's PEFT LoRA.
        detector_max_length: token budget of the detector's inputs.
        gate_full_z / gate_zero_z: calibration ramp: ``w = 1`` above ``mu - gate_full_z * sd`` and ``w = 0``
            below ``mu - gate_zero_z * sd`` of the held-out forget scores, linear in between. Default 1 / 2:
            chosen on validation items in ``scripts/o3_benchmark.py``, where kept tasks share the forgotten
            tasks' prompt template and score only 2-5 sd below the held-out mean (a 3 / 12 ramp passed them
            a mean weight of 0.998; 1 / 2 passed 0.027, and 0.993 to unseen forgotten-task items).
            New forget items that drift from the request's own can fall below 2 sd (a trade-off, see
            ``docs/o3.md``); ``model.set_gate_ramp`` moves the ramp without refitting.
        gate_tokenizer: local folder of the LM's tokenizer, used to turn ``input_ids`` into text when no
            text is given (``None``: ``base_model_name_or_path`` if it holds a tokenizer).
    """

    PEFT_TYPE_NAME: ClassVar[str] = "O3"

    r: int = field(default=8, metadata={"help": "LoRA rank of each request (official 8)."})
    alpha: float = field(default=16.0, metadata={"help": "Scaling alpha/r (official 16)."})
    orth_lambda: float = field(default=0.1, metadata={"help": "Orthogonality penalty weight (official 0.1)."})
    init_seed: int = field(default=0, metadata={"help": "Seed of the random A of each request."})
    requests: list[str] = field(default_factory=list, metadata={"help": "Unlearning requests, oldest first."})
    gate: bool = field(default=True, metadata={"help": "Scale each sample's contribution by the OOD gate."})
    detector_model: Optional[str] = field(default=None, metadata={"help": "Detector encoder folder."})
    detector_r: int = field(default=8, metadata={"help": "Rank of the detector encoder's LoRA."})
    detector_alpha: float = field(default=16.0, metadata={"help": "Alpha of the detector encoder's LoRA."})
    detector_targets: list[str] = field(
        default_factory=lambda: ["query", "value"], metadata={"help": "Detector LoRA targets."}
    )
    detector_max_length: int = field(default=128, metadata={"help": "Detector token budget."})
    gate_full_z: float = field(default=1.0, metadata={"help": "w = 1 above mu - gate_full_z * sd."})
    gate_zero_z: float = field(default=2.0, metadata={"help": "w = 0 below mu - gate_zero_z * sd."})
    gate_tokenizer: Optional[str] = field(
        default=None, metadata={"help": "LM tokenizer folder for input_ids."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.alpha <= 0:
            raise ValueError(f"O3Config.alpha must be positive, got {self.alpha}")
        if self.orth_lambda < 0:
            raise ValueError(f"O3Config.orth_lambda must be >= 0, got {self.orth_lambda}")
        if not isinstance(self.detector_r, int) or self.detector_r <= 0:
            raise ValueError(f"O3Config.detector_r must be a positive integer, got {self.detector_r!r}")
        if not 0 <= self.gate_full_z < self.gate_zero_z:
            raise ValueError(
                f"O3Config needs 0 <= gate_full_z < gate_zero_z, got {self.gate_full_z}, {self.gate_zero_z}"
            )
        self.requests = list(self.requests)
        if len(set(self.requests)) != len(self.requests):
            raise ValueError(f"O3Config.requests has duplicate names: {self.requests}")
        self.detector_targets = list(self.detector_targets)
