"""FedSVD (arXiv 2505.12805): LoRA with a frozen orthonormal ``A`` and a trainable ``B`` on clients, and a
server step that re-factorizes the averaged update by SVD.

``privacy`` (Opacus DP-SGD with a run-long accountant) and ``flower`` (Flower ClientApp / ServerApp) are
imported on demand: they need the ``fed`` extra (``pip install ortho_adapters[fed]``).
"""

from ..registry import register
from .aggregate import aggregate, average_trainable, refactorize
from .config import FedSVDConfig
from .layer import FedSVDLayer
from .model import FedSVDModel

register("FEDSVD", FedSVDConfig, FedSVDModel)

__all__ = ["FedSVDConfig", "FedSVDLayer", "FedSVDModel", "aggregate", "average_trainable", "refactorize"]
