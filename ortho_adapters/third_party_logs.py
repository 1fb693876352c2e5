"""Silence known-harmless third-party log records on CPU runs, and nothing else.

On a CPU with AVX512-BF16, ``import bitsandbytes`` (which ``import peft`` does) tries to fetch an optional
CPU 4-bit kernel from the model hub (``kernels-community/quantization-bitsandbytes``). Offline, as every run
here is, that fails and two warnings are logged, even for a plain fp32 run; bitsandbytes then uses its
built-in kernels. The filters below drop exactly those two records (matched by logger and message start);
every other record of those loggers, and every warning of ours, still shows.

Where DeepSpeed is installed (the ``test`` extra), transformers' Trainer imports it, and on a machine
without a GPU it logs "Setting accelerator to CPU. If you have GPU ...": dropped too, for the same reason.
"""

from __future__ import annotations

import logging

HUB_KERNEL = "kernels-community/quantization-bitsandbytes"
_DROPPED: dict[str, tuple[str, ...]] = {
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward from kernels-community",),
    "kernels._internals.hf_hub": (f"Skipping publisher trust check for '{HUB_KERNEL}'",),
    "DeepSpeed": ("Setting accelerator to CPU. If you have GPU or other accelerator, we were unable",),
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
