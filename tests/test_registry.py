"""The model registry: stages and integrity, hostile version names, concurrent writers, a corrupt index.

The concurrency tests start real processes that all wait for one "go" file, so their changes
collide as hard as two CI jobs and a notebook can make them collide.
"""

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from filelock import FileLock

from course_utils import models, production
from course_utils.registry import (
    CorruptRegistryError,
    IntegrityError,
    ModelRegistry,
    RegistryBusyError,
    RegistryError,
    check_version,
)
from course_utils.serving import Predictor
from course_utils.serving.spec import ModelSpec


@pytest.fixture
def artifact(tmp_path):
    path = tmp_path / "source" / "cnn.pth"
    path.parent.mkdir()
    path.write_bytes(models.checkpoint_path().read_bytes())
    return path


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


# ----------------------------------------------------------------------------- stages and integrity

def test_promote_rollback_and_integrity(tmp_path, artifact):
    registry = ModelRegistry(tmp_path / "registry")
    registry.register(artifact, "v1", {"accuracy": 0.9833})
    registry.register(artifact, "v2", {"accuracy": 0.98})
    with pytest.raises(RegistryError, match="immutable"):
        registry.register(artifact, "v1")
    with pytest.raises(RegistryError, match="no version is in production"):
        registry.path()
    with pytest.raises(RegistryError, match="no previous version"):
        registry.rollback()
    registry.promote("v1")
    assert registry.promote("v1")["stage"] == "production" and registry.history() == ["v1"], \
        "promoting production again is a no-op: a retried release job does not grow the history"
    with pytest.raises(RegistryError, match="no previous version"):
        registry.rollback()
    registry.promote("v2")
    assert registry.production()["version"] == "v2" and registry.get("v1")["stage"] == "archived"
    assert registry.rollback()["version"] == "v1" and registry.production()["version"] == "v1"
    assert registry.get("v2")["stage"] == "archived"
    assert registry.path().read_bytes() == artifact.read_bytes()
    registry.path("v2").write_bytes(b"tampered")
    with pytest.raises(IntegrityError, match="refusing to load"):
        registry.path("v2")
    with pytest.raises(RegistryError, match="unknown version"):
        registry.promote("v9")
    assert list(registry.table().index) == ["v1", "v2"] == registry.versions()
    assert json.loads((tmp_path / "registry" / "registry.json").read_text())["history"] == ["v1"]
    assert production.ModelRegistry is ModelRegistry and production.RegistryError is RegistryError  # old imports


def test_companions_travel_with_the_artifact_and_are_verified(tmp_path, artifact):
    ModelSpec(name="digits-v9").save_next_to(artifact)
    (artifact.parent / "cnn.pth.data").write_bytes(b"external weights")   # as ONNX's external data would be
    (artifact.parent / "other.pth.spec.json").write_text("{}")              # not a companion of cnn.pth
    registry = ModelRegistry(tmp_path / "registry")
    entry = registry.register(artifact, "v1")
    assert sorted(entry["companions"]) == ["cnn.pth.data", "cnn.pth.spec.json"]
    assert sorted(files_under(tmp_path / "registry" / "v1")) == ["cnn.pth", "cnn.pth.data", "cnn.pth.spec.json"]
    assert Predictor.load(registry.path("v1"), device="cpu").spec.name == "digits-v9"
    ModelSpec.sidecar(registry.path("v1")).write_text(json.dumps({"name": "tampered"}))
    with pytest.raises(IntegrityError, match="cnn.pth.spec.json of v1"):
        registry.path("v1")
    ModelSpec(name="digits-v9").save_next_to(registry.path("v1", verify=False))
    (tmp_path / "registry" / "v1" / "cnn.pth.data").unlink()
    with pytest.raises(IntegrityError, match="cnn.pth.data of v1 has sha256 missing"):
        registry.path("v1")


# ----------------------------------------------------------------------------- version names

HOSTILE_VERSIONS = ["../escaped", "..", ".", "", "a/b", "a\\b", "/tmp/abs", "v1/../../x", "C:evil", "x" * 65,
                    "v1\x00", "v 1", "v1\n", "ve\u0301rsion", "-v1", ".hidden", "v1.", "v1..2", "registry.json",
                    "Registry.JSON",
                    "NUL", "com1.txt", 3, None, ["v1"]]


@pytest.mark.parametrize("version", HOSTILE_VERSIONS, ids=repr)
def test_a_version_is_a_plain_name(tmp_path, artifact, version):
    registry = ModelRegistry(tmp_path / "registry")
    before = files_under(tmp_path)
    with pytest.raises(RegistryError, match="invalid version|a version is a string") as error:
        registry.register(artifact, version)
    assert "A-Z a-z 0-9 . _ -" in str(error.value), "the error says which characters are allowed"
    assert files_under(tmp_path) == before, "nothing was written, inside the registry or out of it"
    assert registry.versions() == []


@pytest.mark.parametrize("version", ["v1", "2026-12-01_rc.1", "a" * 64, "1"])
def test_plain_names_are_accepted(version):
    assert check_version(version) == version


def test_a_stray_file_is_never_deleted_and_metadata_must_be_json(tmp_path, artifact):
    registry = ModelRegistry(tmp_path / "registry")
    (tmp_path / "registry" / "README.md").write_text("notes")
    with pytest.raises(RegistryError, match="is a file that is not the registry's"):
        registry.register(artifact, "README.md")
    assert (tmp_path / "registry" / "README.md").read_text() == "notes"
    with pytest.raises(RegistryError, match="must be JSON"):
        registry.register(artifact, "v1", {"accuracy": object()})
    assert registry.versions() == [] and not (tmp_path / "registry" / "v1").exists()


def test_files_are_readable_by_the_other_users_of_a_shared_registry(tmp_path, artifact):
    import os
    import stat

    registry = ModelRegistry(tmp_path / "registry")
    registry.register(artifact, "v1")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(registry.index.stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "registry" / "v1").stat().st_mode) == 0o777 & ~umask


def test_onnx_external_data_travels_whatever_its_name(tmp_path):
    import onnx
    import torch

    from course_utils import export

    source = export.onnx_export(models.load_trained_cnn(), torch.zeros(2, 1, 8, 8), tmp_path / "inline.onnx")
    external = tmp_path / "src" / "model.onnx"
    external.parent.mkdir()
    onnx.save_model(onnx.load(str(source)), str(external), save_as_external_data=True, location="model.onnx_data")
    # (the weights over 1 KB go there; model.onnx_data is the name Hugging Face Optimum uses: not model.onnx.*)
    registry = ModelRegistry(tmp_path / "registry")
    assert list(registry.register(external, "v1")["companions"]) == ["model.onnx_data"]
    assert registry.load("v1").kind == "onnx"
    (external.parent / "model.onnx_data").unlink()
    with pytest.raises(RegistryError, match="needs its external data file 'model.onnx_data'"):
        registry.register(external, "v2")


def test_versions_that_differ_only_in_case_are_refused(tmp_path, artifact):
    registry = ModelRegistry(tmp_path / "registry")
    registry.register(artifact, "v1")
    with pytest.raises(RegistryError, match="differs only in case from 'v1'"):
        registry.register(artifact, "V1")


# ----------------------------------------------------------------------------- concurrent writers

def test_twenty_threads_register_at_once(tmp_path, artifact):
    registry = ModelRegistry(tmp_path / "registry")
    start, errors = threading.Barrier(20), []

    def register(i: int) -> None:
        start.wait()
        try:
            ModelRegistry(tmp_path / "registry").register(artifact, f"v{i}")
        except Exception as error:  # noqa: BLE001 - collected and asserted below
            errors.append(error)

    threads = [threading.Thread(target=register, args=(i,)) for i in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == [] and registry.versions() == sorted(f"v{i}" for i in range(20))


def run_processes(tmp_path: Path, script: str, count: int) -> list[dict]:
    """Run ``script`` (given ``i`` and ``root``) in ``count`` processes, released at once when all have imported."""
    go, waiting = tmp_path / "go", tmp_path / "waiting"
    waiting.mkdir()
    prelude = ("import json, sys, time\nfrom pathlib import Path\nfrom course_utils.registry import *\n"
               "i, root = int(sys.argv[1]), Path(sys.argv[2])\n"
               f"(Path({str(waiting)!r}) / str(i)).touch()\n"
               f"while not Path({str(go)!r}).exists():\n    time.sleep(0.001)\n")
    processes = [subprocess.Popen([sys.executable, "-c", prelude + script, str(i), str(tmp_path / "registry")],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(count)]
    try:
        deadline = time.monotonic() + 120
        while len(list(waiting.iterdir())) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        go.touch()
        results = []
        for process in processes:
            out, err = process.communicate(timeout=120)
            assert process.returncode == 0, err
            results.append(json.loads(out.strip().splitlines()[-1]))
        return results
    finally:
        for process in processes:
            process.kill()


def test_twenty_processes_register_at_once(tmp_path, artifact):
    registry = ModelRegistry(tmp_path / "registry")
    script = (f"entry = ModelRegistry(root).register({str(artifact)!r}, f'v{{i}}')\n"
              "print(json.dumps({'version': entry['version']}))\n")
    results = run_processes(tmp_path, script, 20)
    assert sorted(r["version"] for r in results) == registry.versions() == sorted(f"v{i}" for i in range(20))
    leftovers = [name for name in files_under(tmp_path / "registry") if name.startswith(".") and name != ".registry.lock"]
    assert leftovers == [], "no temporary index or incoming folder is left behind"
    for version in registry.versions():
        registry.path(version)   # every copy is whole


@pytest.fixture(scope="module")
def onnx_artifact(tmp_path_factory) -> Path:
    """The digits CNN in ONNX: promote and rollback load it to check it, without importing torch."""
    import torch

    from course_utils import export

    return export.onnx_export(models.load_trained_cnn(), torch.zeros(2, 1, 8, 8),
                              tmp_path_factory.mktemp("onnx") / "digits.onnx")


def test_concurrent_promotions_and_rollbacks_lose_nothing(tmp_path, onnx_artifact):
    """Ten processes each promote their own version, then roll back once: every rollback undoes one promotion.

    Whatever the interleaving, the history must end where it began, at v0. A lost update (two changes
    reading the same old index) leaves a different history or a version wrongly in production.
    """
    registry = ModelRegistry(tmp_path / "registry")
    for i in range(11):
        registry.register(onnx_artifact, f"v{i}")
    registry.promote("v0")
    script = ("registry = ModelRegistry(root)\npromoted = registry.promote(f'v{i + 1}')['stage']\n"
              "rolled_to = registry.rollback()['version']\n"
              "print(json.dumps({'promoted': promoted, 'rolled_to': rolled_to}))\n")
    results = run_processes(tmp_path, script, 10)
    assert all(r["promoted"] == "production" for r in results)
    assert registry.history() == ["v0"] and registry.production()["version"] == "v0"
    assert [registry.get(f"v{i}")["stage"] for i in range(1, 11)] == ["archived"] * 10


def test_a_held_lock_is_a_clear_busy_error_and_reads_go_on(tmp_path, artifact):
    registry = ModelRegistry(tmp_path / "registry", lock_timeout=0.2)
    registry.register(artifact, "v1")
    with FileLock(tmp_path / "registry" / ".registry.lock"):   # another process in the middle of a change
        with pytest.raises(RegistryBusyError, match="registry busy: another process has held"):
            registry.promote("v1")
        assert registry.get("v1")["stage"] == "staging", "reads need no lock: the index is replaced whole"
    assert registry.promote("v1")["stage"] == "production"


def test_a_folder_left_by_an_interrupted_register_is_replaced(tmp_path, artifact):
    registry = ModelRegistry(tmp_path / "registry")
    (tmp_path / "registry" / "v1").mkdir()
    (tmp_path / "registry" / "v1" / "half-copied.pth").write_bytes(b"\0" * 10)
    registry.register(artifact, "v1")
    assert files_under(tmp_path / "registry" / "v1") == {"cnn.pth"}
    registry.path("v1")


# ----------------------------------------------------------------------------- a corrupt index

def _edit(entry_change=None, top=None):
    def edit(state):
        if entry_change:
            entry_change(state["versions"]["v1"])
        return top if top is not None else state
    return edit


CORRUPT_INDEXES = {
    "truncated": (lambda text: text[: len(text) // 2], "is not valid JSON"),
    "empty": (lambda text: "", "is empty"),
    "not UTF-8": (b"\xff\xfe\x00junk", "is not UTF-8"),
    "a list": (lambda text: "[]", "the top level must be"),
    "escaping file": (_edit(lambda e: e.update(file="../../etc/passwd")), "is not inside its own folder v1/"),
    "unknown stage": (_edit(lambda e: e.update(stage="prod")), "stage 'prod' is not one of"),
    "bad sha256": (_edit(lambda e: e.update(sha256="abc")), "not 64 lowercase hex"),
    "missing key": (_edit(lambda e: e.pop("sha256")), "'sha256' is missing"),
    "renamed entry": (_edit(lambda e: e.update(version="v2")), "recorded under the name 'v2'"),
    "two in production": (_edit(lambda e: e.update(stage="production")), "the history says"),
    "hostile version key": (lambda text: text.replace('"v1"', '"../v1"'), "invalid version '../v1'"),
    "history of lists": (_edit(top={"versions": {}, "history": [[]]}), "the history must be a list of version names"),
    "history of an unknown version": (lambda text: text.replace('"history": [\n    "v2"', '"history": [\n    "v7"'),
                                      r"not registered: \['v7'\]"),
}


@pytest.mark.parametrize("case", list(CORRUPT_INDEXES))
def test_a_corrupt_index_is_a_clear_error(tmp_path, artifact, case):
    registry = ModelRegistry(tmp_path / "registry")
    registry.register(artifact, "v1")
    registry.register(artifact, "v2")
    registry.promote("v2")
    change, message = CORRUPT_INDEXES[case]
    if isinstance(change, bytes):
        registry.index.write_bytes(change)
    elif change.__name__ == "edit":
        registry.index.write_text(json.dumps(change(json.loads(registry.index.read_text())), indent=2))
    else:
        registry.index.write_text(change(registry.index.read_text()))
    with pytest.raises(CorruptRegistryError, match=message) as error:
        ModelRegistry(tmp_path / "registry")
    assert str(registry.index) in str(error.value)
    with pytest.raises(CorruptRegistryError):
        registry.promote("v1")
