"""Silence one known-harmless third-party warning pair, and nothing else.

On a CPU with AVX512-BF16, ``import bitsandbytes`` (which ``import peft`` does) tries to fetch an optional
CPU 4-bit kernel from the model hub (``kernels-community/quantization-bitsandbytes``). Offline, as every run
here is, that fails and two warnings are logged, even for a plain fp32 run; bitsandbytes then uses its
built-in kernels. The filters below drop exactly those two records (matched by logger and message start);
every other record of those loggers, and every warning of ours, still shows.
"""

from __future__ import annotations

import logging

HUB_KERNEL = "kernels-community/quantization-bitsandbytes"
_DROPPED: dict[str, tuple[str, ...]] = {
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward from kernels-community",),
    "kernels._internals.hf_hub": (f"Skipping publisher trust check for '{HUB_KERNEL}'",),
}


class _DropMessages(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def install() -> None:
    """Attach the filters (idempotent; runs at import, before ``bitsandbytes`` is first imported)."""
    for name, prefixes in _DROPPED.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(prefixes))


install()
