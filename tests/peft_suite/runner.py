"""Run PEFT's ``test_custom_models.py`` (patched) on our methods and the control, and classify the outcome.

Everything happens in a temporary workspace (kept with ``keep=True``): the patched copy of the cached
tests (:func:`ortho_adapters.fetch.fetch_peft_tests`), ``pytest.log`` and ``junit.xml``. Offline once the
tests are cached: ``HF_HUB_OFFLINE=1``; one thread (``OMP_NUM_THREADS=1`` unless set).
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from . import cases, classify, junit, patch, report
from .pairing import Pairing

TESTS_ROOT = Path(__file__).resolve().parents[1]  # puts ``peft_suite`` on the child's sys.path
REPO_ROOT = TESTS_ROOT.parent


@dataclass
class SuiteRun:
    results: dict[str, classify.MethodResult]
    control: Counter
    meta: dict

    def markdown(self) -> str:
        return report.markdown(self.results, self.control, self.meta)

    def json(self) -> dict:
        return report.to_json(self.results, self.control, self.meta)

    def gaps(self, method: str) -> list[classify.Entry]:
        return self.results[method].buckets[classify.GAP]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", "1")
    paths = [str(TESTS_ROOT), str(REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def _pytest(workspace: Path, target: Path, k: Optional[str], echo: bool) -> tuple[int, Path, Path]:
    xml, log = workspace / "junit.xml", workspace / "pytest.log"
    cmd = [sys.executable, "-m", "pytest", str(target.relative_to(workspace))]
    cmd += ["-c", "pytest.ini", "--rootdir", ".", "-p", "peft_suite.plugin", "-p", "no:cacheprovider"]
    cmd += [f"--junitxml={xml}", "-o", "junit_family=xunit2", "-q", "--tb=short"]
    cmd += ["-k", k] if k else []
    with open(log, "w", encoding="utf-8") as out:
        out.write(" ".join(cmd) + "\n")
        proc = subprocess.Popen(
            cmd, cwd=workspace, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            out.write(line)
            if echo:
                sys.stderr.write(line)
        rc = proc.wait()
    return rc, xml, log


def _tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])


def run_suite(
    methods: Optional[list[str]] = None,
    k: Optional[str] = None,
    keep: bool = False,
    json_path: Optional[Path | str] = None,
    echo: bool = False,
) -> SuiteRun:
    """Run the control's and ``methods``' (default all) tests, optionally filtered by ``-k k``."""
    from ortho_adapters.fetch import fetch_peft_tests

    keys = [m.key for m in cases.methods(methods)]
    peft_tests = fetch_peft_tests()
    workspace = Path(tempfile.mkdtemp(prefix="peft-suite-"))
    try:
        target = patch.make_workspace(peft_tests, workspace, keys)
        start = time.perf_counter()
        rc, xml, log = _pytest(workspace, target, k, echo)
        runtime = time.perf_counter() - start
        # 0: all passed, 1: some failed; anything else (collection error, usage, no tests) is ours to fix.
        if rc not in (0, 1) or not xml.is_file():
            where = f"(workspace kept: {workspace})" if keep else ""
            raise RuntimeError(f"pytest on PEFT's tests exited {rc} {where}; last lines:\n{_tail(log)}")
        results, control = classify.classify(junit.read(xml), Pairing(keys))
        meta = {
            "peft_version": importlib.metadata.version("peft"),
            "methods": keys,
            "k": k,
            "runtime_s": round(runtime, 1),
            "pytest_returncode": rc,
            "workspace": str(workspace) if keep else None,
        }
        run = SuiteRun(results, control, meta)
        if json_path is not None:
            report.write_json(json_path, run.json())
        return run
    finally:
        if not keep:
            shutil.rmtree(workspace, ignore_errors=True)
