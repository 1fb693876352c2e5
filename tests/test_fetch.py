"""The install step (ortho_adapters.fetch): SHA-256 pins, one asset at a time, safe extraction.

``pip`` is replaced by a fake registry that serves archives built here, so these tests need no network;
``.ci/run`` exercises the real downloads into an empty cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest

from ortho_adapters import fetch, tasks

PEFT_VERSION = fetch._installed_version("peft")


def _jsonl(records: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def _fake_evals_wheel(path: Path) -> Path:
    """A wheel with each task file at its real path and record count (trivial valid records)."""
    samples = {
        "social_iqa": {"input": [{"role": "user", "content": "c{i}? A: a; B: b; C: c."}], "ideal": "A"},
        "sarcasm": {"input": [{"role": "user", "content": "h{i}"}], "ideal": "1"},
        "quartz": {"input": [{"role": "user", "content": "q{i}\n\n A: x\n B: y"}], "ideal": "B"},
        "logiqa": {
            "input": [{"role": "user", "content": "P{i}\nA. A.a\nB. B.b\nC. C.c\nD. D.d\nAnswer:"}],
            "ideal": "C",
        },
        "corr2cause": {"input": [{"role": "user", "content": "p{i}"}], "ideal": "Answer: neutral"},
        "event_categories": {"input": [{"role": "user", "content": "log {i}"}], "ideal": "Error"},
    }
    with zipfile.ZipFile(path, "w") as zf:
        for name, spec in tasks.EVALS_FILES.items():
            text = json.dumps(samples[name])
            records = [json.loads(text.replace("{i}", str(i))) for i in range(spec.records)]
            zf.writestr(tasks.EVALS_DATA_PREFIX + spec.relpath, _jsonl(records))
        zf.writestr("evals/registry/data/other/samples.jsonl", b"{}\n")
        zf.writestr(f"evals-{tasks.EVALS_VERSION}.dist-info/LICENSE.md", b"MIT\n")
    return path


def _fake_peft_sdist(path: Path) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, payload in {
            f"peft-{PEFT_VERSION}/tests/test_custom_models.py": b"# peft's tests\n",
            f"peft-{PEFT_VERSION}/src/peft/__init__.py": b"",
        }.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """An empty asset cache, and ``pip download`` served from archives made here (pins set to them)."""
    monkeypatch.setenv("ORTHO_ADAPTERS_CACHE", str(tmp_path / "cache"))
    served = {
        "evals": _fake_evals_wheel(tmp_path / f"evals-{tasks.EVALS_VERSION}-py3-none-any.whl"),
        "peft": _fake_peft_sdist(tmp_path / f"peft-{PEFT_VERSION}.tar.gz"),
    }
    assets = dict(fetch.ASSETS)
    assets["tasks"] = dataclasses.replace(assets["tasks"], sha256=_sha(served["evals"]))
    monkeypatch.setattr(fetch, "ASSETS", assets)
    monkeypatch.setattr(fetch, "PEFT_SDIST_SHA256", {PEFT_VERSION: _sha(served["peft"])})
    calls: list[tuple[str, ...]] = []

    def fake_pip(*args: str, quiet: bool) -> subprocess.CompletedProcess:
        calls.append(args)
        assert args[0] == "download" and "--no-cache-dir" in args, args
        spec, dest = args[args.index("-d") - 1], Path(args[args.index("-d") + 1])
        source = served[spec.split("==")[0]]
        (dest / source.name).write_bytes(source.read_bytes())
        return subprocess.CompletedProcess(args, 0, "", "")

    monkeypatch.setattr(fetch, "_pip", fake_pip)
    served["calls"] = calls  # type: ignore[assignment]
    return served


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in folder.rglob("*")
        if p.is_file()
    }


def test_fetch_caches_checks_and_skips_what_is_ready(registry) -> None:
    assert fetch.fetch_assets(only=["tasks", "peft_tests"], quiet=True) == {}
    assert tasks.load_task("logiqa")["choices"][0] == ["a", "b", "c", "d"]
    assert (tasks.evals_dir() / "LICENSE.md").read_text() == "MIT\n"
    assert not (tasks.evals_dir() / "other").exists()  # only the task files are kept
    assert (fetch.peft_tests_dir() / "test_custom_models.py").is_file()
    assert len(registry["calls"]) == 2
    assert fetch.fetch_assets(only=["tasks", "peft_tests"], quiet=True) == {}
    assert len(registry["calls"]) == 2  # ready: nothing downloaded again
    # a cached file that changed (or a manifest of another version) is not trusted: it is fetched again
    (tasks.evals_dir() / tasks.EVALS_FILES["quartz"].relpath).write_text("{}\n")
    assert not fetch.tasks_ready()
    assert fetch.fetch_assets(only=["tasks"], quiet=True) == {} and len(registry["calls"]) == 3
    assert len(tasks.load_task("quartz")) == tasks.EVALS_FILES["quartz"].records


def test_wrong_sha256_names_the_asset_and_leaves_other_assets(registry, monkeypatch, capsys) -> None:
    assert fetch.fetch_assets(only=["peft_tests"], quiet=True) == {}
    peft_cache = fetch.peft_tests_dir().parent
    before = _snapshot(peft_cache)
    wrong = dataclasses.replace(fetch.ASSETS["tasks"], sha256="0" * 64)
    monkeypatch.setitem(fetch.ASSETS, "tasks", wrong)
    assert fetch.main(["--only", "tasks", "peft_tests", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "asset 'tasks'" in err and "SHA-256 mismatch" in err and f"evals=={tasks.EVALS_VERSION}" in err
    assert "needed by" in err.lower() and "corr2cause" in err
    assert _snapshot(peft_cache) == before  # the other asset's cache is untouched
    assert not tasks.evals_dir().exists()  # nothing half-written for the failed one
    # a good cache of the asset itself survives a failed forced refetch too
    monkeypatch.setitem(fetch.ASSETS, "tasks", dataclasses.replace(wrong, sha256=_sha(registry["evals"])))
    assert fetch.fetch_assets(only=["tasks"], quiet=True) == {}
    good = _snapshot(tasks.evals_dir())
    monkeypatch.setitem(fetch.ASSETS, "tasks", wrong)
    failed = fetch.fetch_assets(only=["tasks"], force=True, quiet=True)
    assert list(failed) == ["tasks"] and _snapshot(tasks.evals_dir()) == good


def test_a_failing_command_is_named_and_the_next_asset_still_runs(registry, monkeypatch) -> None:
    def broken(*args: str, quiet: bool) -> subprocess.CompletedProcess:
        if "evals==" + tasks.EVALS_VERSION in args:
            return subprocess.CompletedProcess(args, 1, "", "ERROR: No matching distribution found")
        return registry_pip(*args, quiet=quiet)

    registry_pip = fetch._pip
    monkeypatch.setattr(fetch, "_pip", broken)
    failed = fetch.fetch_assets(only=["tasks", "peft_tests"], quiet=True)
    assert list(failed) == ["tasks"]
    assert (
        "`pip download --no-deps --no-cache-dir" in failed["tasks"]
        and "No matching distribution" in failed["tasks"]
    )
    assert fetch.peft_tests_ready()


def test_unpinned_peft_version_is_refused(registry, monkeypatch) -> None:
    monkeypatch.setattr(fetch, "PEFT_SDIST_SHA256", {})
    failed = fetch.fetch_assets(only=["peft_tests"], quiet=True)
    assert "no SHA-256 is pinned" in failed["peft_tests"]
    with pytest.raises(ValueError, match="unknown asset 'bigbench'"):
        fetch.fetch_assets(only=["bigbench"])


def test_real_pins_cover_the_installed_peft_and_every_asset() -> None:
    assert PEFT_VERSION in fetch.PEFT_SDIST_SHA256
    assert all(len(a.sha256) == 64 for a in fetch.ASSETS.values())
    assert set(fetch.ASSET_NAMES) == {"minilm", "rotten_tomatoes", "smollm2", "tasks", "peft_tests"}


@pytest.mark.parametrize("suffix", [".tar.gz", ".zip"])
def test_extract_members_refuses_paths_outside(tmp_path: Path, suffix: str) -> None:
    names = {
        "pkg/tests/a.py": b"a",
        "pkg/tests/sub/b.py": b"b",
        "pkg/src/c.py": b"c",
        "pkg/tests/../../evil": b"",
    }
    archive = tmp_path / f"pkg{suffix}"
    if suffix == ".zip":
        with zipfile.ZipFile(archive, "w") as zf:
            for name, payload in names.items():
                zf.writestr(name, payload)
    else:
        with tarfile.open(archive, "w:gz") as tf:
            for name, payload in names.items():
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
    out = tmp_path / "out"
    written = fetch.extract_members(archive, out, fetch._peft_tests_member)
    assert sorted(map(str, written)) == ["tests/a.py", "tests/sub/b.py"]
    assert not (tmp_path / "evil").exists()
    with pytest.raises(RuntimeError, match="outside"):
        fetch.extract_members(archive, out, lambda name: Path("../escape") if name.endswith("a.py") else None)
