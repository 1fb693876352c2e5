"""Crash-safe file writes for the federated state kept on disk (privacy ledgers, server checkpoints)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_atomically(path: Path, write: Callable[[str], None]) -> None:
    """Replace ``path`` with what ``write(temporary_path)`` writes, all or nothing.

    The content goes to a temporary file in the same folder, is fsynced, renamed over ``path`` and the
    folder is fsynced: after a crash ``path`` holds either its old or its new content, never a partial
    one. On an error the temporary file is removed and ``path`` is left as it was.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    try:
        write(temporary)
        with open(temporary, "rb+") as file:
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
