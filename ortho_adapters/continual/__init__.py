"""Orthogonal continual LoRA: learn a sequence of tasks in one adapter without forgetting.

Four modes (see :class:`OrthoLoraConfig`): ``"subspace"`` (GPM / InfLoRA-style: each task's frozen ``A``
lies in the orthogonal complement of the earlier tasks' input bases, only ``B`` trains), ``"gradient"`` (the
same guarantee, ``A`` from the new task's loss gradient in that complement), ``"scaled"`` (SGP-style: each
basis direction is damped by ``1 - lambda_i``, its importance) and ``"olora"`` (O-LoRA, arXiv 2310.14152:
per-task LoRA with an orthogonality penalty). The lifecycle is
``start_task(model, name)`` -> train -> ``end_task(model, dataloader)``; inference sums every task's update.
"""

from ..registry import register
from .config import OrthoLoraConfig
from .layer import OrthoLoraLayer
from .lifecycle import TaskLifecycleError, end_task, start_task
from .model import OrthoLoraModel
from .penalty import OrthoLoraTrainer, olora_penalty

register("ORTHO_LORA", OrthoLoraConfig, OrthoLoraModel)

__all__ = [
    "OrthoLoraConfig",
    "OrthoLoraLayer",
    "OrthoLoraModel",
    "OrthoLoraTrainer",
    "TaskLifecycleError",
    "end_task",
    "olora_penalty",
    "start_task",
]
