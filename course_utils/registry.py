"""A file-based model registry that several processes can share: versions, stages, rollback, integrity.

Layout of a registry folder::

    registry.json          the index: every version, its sha256, its stage, and the promotion history
    .registry.lock         the lock every change holds (flock on Linux and macOS, msvcrt on Windows)
    <version>/<artifact>   one folder per version: the artifact and its companions, the files named
                           ``<artifact>.*`` beside it (the ``.spec.json`` sidecar, ONNX's ``.data``)

What makes it safe to share between two CI jobs, a notebook and a script on one machine:

* **A version is a plain name** (:func:`check_version`): letters, digits, ``.``, ``_`` and ``-``,
  so ``"../escaped"`` or ``"a/b"`` can never place a file outside the folder.
* **Every change holds the lock** for its whole read-modify-write of the index, so two changes
  never both read the old index and the second never erases the first. The lock is the
  operating system's (it is released when its process dies, even by ``kill -9``): a stale lock
  file is harmless and must not be deleted by hand.
* **The index is replaced, never edited**: a change writes a new file under a unique temporary
  name, flushes it to disk and renames it over ``registry.json`` (atomic on every OS), so a reader
  without the lock always sees a whole index, the old one or the new one.
* **An artifact is copied before the lock is taken** (a big file does not block the others) into a
  hidden folder, then renamed to its version folder under the lock.
* **Everything read is checked**: the index's structure when it is loaded (a truncated or
  hand-edited ``registry.json`` gives a :class:`CorruptRegistryError` that says what is wrong),
  and the sha256 of an artifact and of each companion before it is loaded (:class:`IntegrityError`).

What it does not do is what a real registry (MLflow's, or a cloud provider's) adds: it serves one
machine's disk (file locks on network file systems are not reliable), has no users or permissions,
no audit log beyond the promotion history, no remote storage and no UI.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from filelock import FileLock, Timeout

from .data import sha256_file
from .ort import onnx_graph_tensors

if TYPE_CHECKING:
    import pandas as pd

    from .serving.predictor import Predictor

LOG = logging.getLogger("course_utils.registry")

INDEX_NAME = "registry.json"
LOCK_NAME = ".registry.lock"
STAGES = ("staging", "production", "archived")
#: A version: 1 to 64 of A-Z a-z 0-9 . _ -, starting with a letter or a digit.
VERSION_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
VERSION_RULE = ("1 to 64 of the characters A-Z a-z 0-9 . _ -, starting with a letter or a digit, "
                "with no '..' and not ending in '.'")
# Names Windows reserves for devices, whatever the extension: a folder "NUL" cannot be created there.
_WINDOWS_DEVICES = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}
_SHA256 = re.compile(r"[0-9a-f]{64}")
_ENTRY_FIELDS = {"version": str, "file": str, "sha256": str, "created": str, "stage": str, "metadata": dict,
                 "companions": dict}


def _umask() -> int:
    mask = os.umask(0o022)   # read it (once, at import) by setting it, then put it back
    os.umask(mask)
    return mask


_UMASK = _umask()
_FILE_MODE, _DIR_MODE = 0o666 & ~_UMASK, 0o777 & ~_UMASK


def _replace(source: str, target: Path) -> None:
    """``os.replace``; on Windows, retried while a reader holds the target open."""
    for attempt in range(20):
        try:
            os.replace(source, target)
            return
        except PermissionError:
            if os.name != "nt" or attempt == 19:
                raise
            time.sleep(0.05)


class RegistryError(RuntimeError):
    """A registry operation that cannot be done (unknown version, nothing to roll back to, ...)."""


class RegistryBusyError(RegistryError):
    """Another process held the registry's lock for longer than the timeout."""


class CorruptRegistryError(RegistryError):
    """``registry.json`` is not a registry index (truncated, hand-edited, or not written by this class)."""


class IntegrityError(RuntimeError):
    """An artifact's bytes do not match the sha256 recorded when it was registered."""


def check_version(version: object) -> str:
    """Return ``version`` if it is a plain name for a folder on any OS, else raise :class:`RegistryError`.

    >>> check_version("v1.2-rc_3")
    'v1.2-rc_3'
    """
    if not isinstance(version, str):
        raise RegistryError(f"a version is a string, got {type(version).__name__}: use {VERSION_RULE}")
    if (not VERSION_PATTERN.fullmatch(version) or ".." in version or version.endswith(".")
            or version.casefold() == INDEX_NAME or version.split(".")[0].upper() in _WINDOWS_DEVICES):
        raise RegistryError(f"invalid version {version!r}: use {VERSION_RULE} (and not a name Windows reserves "
                            f"such as NUL or COM1)")
    return version


def companions(artifact: Path) -> list[Path]:
    """The files that must travel with ``artifact``: ``<name>.*`` beside it (the spec sidecar, ONNX's
    ``<name>.data``) and, for an ONNX model, every external-data file the model names."""
    found = {p for p in artifact.parent.glob(f"{glob.escape(artifact.name)}.*") if p.is_file()}
    if artifact.suffix.lower() == ".onnx":
        found |= {artifact.parent / name for name in _onnx_external_files(artifact)}
    return sorted(found)


def _onnx_external_files(model: Path) -> set[str]:
    """The external-data locations an ONNX file names (``model.onnx_data``, ``weights.bin``, ...)."""
    import onnx

    try:
        proto = onnx.load(str(model), load_external_data=False)
    except Exception:   # not ONNX at all: promote's load check says so in one line
        return set()
    names = set()
    for tensor in onnx_graph_tensors(proto.graph):
        for entry in tensor.external_data:
            if entry.key == "location":
                names.add(entry.value)
    for name in names:
        if Path(name).name != name:
            raise RegistryError(f"{model.name} keeps external data in {name!r}: only files beside the model are "
                                f"supported")
        if not (model.parent / name).is_file():
            raise RegistryError(f"{model.name} needs its external data file {name!r}, which is not beside it")
    return names


def index_problems(state: object) -> list[str]:
    """What makes ``state`` (a parsed ``registry.json``) not a registry index; empty if it is one."""
    if not isinstance(state, dict) or not isinstance(state.get("versions"), dict) \
            or not isinstance(state.get("history"), list):
        return ['the top level must be {"versions": {...}, "history": [...]}']
    problems: list[str] = []
    versions: dict[str, Any] = state["versions"]
    for name, entry in versions.items():
        try:
            check_version(name)
        except RegistryError as error:
            problems.append(str(error))
            continue
        if not isinstance(entry, dict):
            problems.append(f"version {name!r} is not an object")
            continue
        for key, kind in _ENTRY_FIELDS.items():
            if not isinstance(entry.get(key), kind):
                problems.append(f"version {name!r}: {key!r} is missing or not a {kind.__name__}")
        if problems:
            continue
        file = Path(entry["file"])
        if entry["version"] != name:
            problems.append(f"version {name!r} is recorded under the name {entry['version']!r}")
        if file.is_absolute() or len(file.parts) != 2 or file.parts[0] != name:
            problems.append(f"version {name!r}: its file {entry['file']!r} is not inside its own folder {name}/")
        extra = entry["companions"]
        if not all(isinstance(k, str) and k and Path(k).name == k and "\\" not in k and k not in (".", "..")
                   and k != file.name for k in extra):
            problems.append(f"version {name!r}: 'companions' must map plain file names to their sha256")
        elif not all(isinstance(h, str) and _SHA256.fullmatch(h) for h in [entry["sha256"], *extra.values()]):
            problems.append(f"version {name!r}: a sha256 is not 64 lowercase hex digits")
        if entry["stage"] not in STAGES:
            problems.append(f"version {name!r}: stage {entry['stage']!r} is not one of {', '.join(STAGES)}")
    history = state["history"]
    if not all(isinstance(v, str) for v in history):
        return [*problems, "the history must be a list of version names"]
    unknown = [v for v in history if v not in versions]
    if unknown:
        problems.append(f"the history names versions that are not registered: {unknown[:3]}")
    elif not problems:
        in_production = sorted(v for v, e in versions.items() if e["stage"] == "production")
        expected = [history[-1]] if history else []
        if in_production != expected:
            problems.append(f"the stages say {in_production or 'no version'} is in production, the history says "
                            f"{expected or 'none'}")
    return problems


class ModelRegistry:
    """Versions of a model in a folder: ``registry.json`` plus one subfolder per version.

    Stages: ``staging`` when registered, ``production`` when promoted (one at a time), ``archived``
    when replaced. Every promotion is recorded, so a rollback returns to the previous production
    version. Artifacts are copied in and verified against their sha256 before every load. Safe to
    use from several threads and processes at once (see the module's docstring for how).
    """

    def __init__(self, root: str | Path, lock_timeout: float = 30.0) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.index = self.root / INDEX_NAME
        self.lock_file = self.root / LOCK_NAME
        self.lock_timeout = lock_timeout
        with self._locked():
            if not self.index.exists():
                self._save({"versions": {}, "history": []})
        self._load()   # a corrupt index is reported now, not at the first promotion

    # ------------------------------------------------------------------ the index, its lock and its checks
    @contextmanager
    def _locked(self) -> Iterator[None]:
        lock = FileLock(self.lock_file, timeout=self.lock_timeout)
        try:
            lock.acquire()
        except Timeout:
            raise RegistryBusyError(
                f"registry busy: another process has held {self.lock_file} for over {self.lock_timeout:g} s; "
                f"try again (the lock is the OS's: deleting the file would not release it)") from None
        try:
            yield
        finally:
            lock.release()

    def _load(self) -> dict[str, Any]:
        try:
            text = self.index.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise CorruptRegistryError(f"{self.index} is missing: restore it from a backup (the artifacts in "
                                       f"{self.root}/<version>/ are untouched)") from None
        except UnicodeDecodeError:
            raise CorruptRegistryError(f"{self.index} is not UTF-8 text: it was overwritten; restore it from a "
                                       f"backup") from None
        try:
            state = json.loads(text)
        except json.JSONDecodeError as error:
            what = "is empty" if not text.strip() else f"is not valid JSON ({error.msg}: line {error.lineno}, " \
                                                       f"column {error.colno})"
            raise CorruptRegistryError(f"{self.index} {what}: it was truncated or edited by hand; restore it from "
                                       f"a backup (the artifacts in {self.root}/<version>/ are untouched)") from None
        problems = index_problems(state)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise CorruptRegistryError(f"{self.index} is not a valid registry index: {problems[0]}{more}")
        return state

    def _save(self, state: dict[str, Any]) -> None:
        """Write a new index beside the old one and rename it over it (hold the lock)."""
        fd, temporary = tempfile.mkstemp(dir=self.root, prefix=".registry.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(state, fh, indent=2, sort_keys=True)
                fh.flush()
                os.fsync(fh.fileno())   # on disk before the rename: a power cut leaves the old index or the new
            os.chmod(temporary, _FILE_MODE)   # mkstemp makes it 0600: other users of the registry must read it
            _replace(temporary, self.index)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    # ------------------------------------------------------------------ changes (each under the lock)
    def register(self, artifact: str | Path, version: str, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
        """Copy ``artifact`` and its :func:`companions` in as ``version``, stage ``staging``. Versions are immutable."""
        check_version(version)
        source = Path(artifact)
        if not source.is_file():
            raise FileNotFoundError(f"artifact {source} does not exist")
        if version in self._load()["versions"]:   # fail before copying; checked again under the lock
            raise RegistryError(f"version {version!r} is already registered; versions are immutable")
        try:
            json.dumps(metadata or {})
        except (TypeError, ValueError) as error:
            raise RegistryError(f"the metadata of {version!r} must be JSON (str, int, float, bool, lists, dicts): "
                                f"{error}") from None
        incoming = Path(tempfile.mkdtemp(dir=self.root, prefix=f".incoming-{version}-"))
        try:
            hashes = {}
            for file in (source, *companions(source)):   # the model's spec and weights travel with it, hashed
                shutil.copy2(file, incoming / file.name)
                hashes[file.name] = sha256_file(incoming / file.name)
            entry: dict[str, Any] = {
                "version": version, "file": f"{version}/{source.name}", "sha256": hashes.pop(source.name),
                "companions": hashes, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "stage": "staging", "metadata": dict(metadata or {})}
            with self._locked():
                state = self._load()
                if version in state["versions"]:
                    raise RegistryError(f"version {version!r} is already registered; versions are immutable")
                clash = [v for v in state["versions"] if v.casefold() == version.casefold()]
                if clash:
                    raise RegistryError(f"version {version!r} differs only in case from {clash[0]!r}: macOS and "
                                        f"Windows disks would store both in one folder")
                folder = self.root / version
                if folder.is_dir():   # not in the index: left by a register that died before recording it
                    LOG.warning("replacing %s, left unrecorded by an interrupted register", folder)
                    shutil.rmtree(folder)
                elif folder.exists():
                    raise RegistryError(f"{folder} is a file that is not the registry's: move it, or pick another "
                                        f"version name")
                self._forget_stale_incoming()
                incoming.chmod(_DIR_MODE)   # mkdtemp makes it 0700
                incoming.rename(folder)
                state["versions"][version] = entry
                self._save(state)
            return entry
        finally:
            shutil.rmtree(incoming, ignore_errors=True)   # gone already unless something failed

    def _forget_stale_incoming(self, older_than_s: float = 3600.0) -> None:
        """Remove copies left by registers killed mid-copy an hour ago or more (hold the lock)."""
        for folder in self.root.glob(".incoming-*"):
            try:
                if time.time() - folder.stat().st_mtime > older_than_s:
                    shutil.rmtree(folder, ignore_errors=True)
            except FileNotFoundError:
                pass

    def promote(self, version: str, check: bool = True, device: Any = None) -> dict[str, Any]:
        """Make ``version`` production (the previous one is archived). Promoting production again changes nothing.

        ``check``: first load the artifact as the service would (:meth:`load`, on ``device``, default
        the best one here): a file that fails its sha256 or cannot be served is refused now, not at
        the first request.
        """
        if check:
            self.load(version, device=device)
        with self._locked():
            state = self._load()
            entry = self._entry(state, version)
            if state["history"] and state["history"][-1] == version:
                return entry   # idempotent: a retried release job does not grow the history
            for other in state["versions"].values():
                if other["stage"] == "production":
                    other["stage"] = "archived"
            entry["stage"] = "production"
            state["history"].append(version)
            self._save(state)
            return entry

    def rollback(self, check: bool = True, device: Any = None) -> dict[str, Any]:
        """Return production to the version promoted before the current one (checked first, as promote does)."""
        checked: set[str] = set()   # versions that passed the load check during this call
        deadline = time.monotonic() + self.lock_timeout
        while True:   # another process may change the history while a candidate is being checked
            history = self.history()
            if len(history) < 2:
                raise RegistryError("no previous version to roll back to: promote at least two versions first")
            if check and history[-2] not in checked:
                self.load(history[-2], device=device)   # outside the lock: loading a model takes time
                checked.add(history[-2])
            with self._locked():
                state = self._load()
                if len(state["history"]) < 2:
                    raise RegistryError("no previous version to roll back to: promote at least two versions first")
                if check and state["history"][-2] not in checked:
                    if time.monotonic() > deadline:
                        raise RegistryBusyError("registry busy: the history kept changing during the rollback; "
                                                "try again")
                    continue   # the candidate changed meanwhile: check that one first
                current = state["history"].pop()
                previous = state["history"][-1]
                state["versions"][current]["stage"] = "archived"
                state["versions"][previous]["stage"] = "production"
                self._save(state)
            LOG.warning("rolled back from %s to %s", current, previous)
            return state["versions"][previous]

    def load(self, version: str | None = None, **options: Any) -> Predictor:
        """``version`` (default: production) as a checked :class:`~course_utils.serving.Predictor`.

        Its sha256 first (:class:`IntegrityError`), then ``Predictor.load``'s checks
        (:class:`~course_utils.serving.ModelLoadError`); ``options`` go to ``Predictor.load``.
        """
        from .serving.predictor import Predictor

        path = self.path(version)
        name = version or path.parent.name
        return Predictor.load(path, version=name, **options)

    # ------------------------------------------------------------------ reads (no lock: the index is replaced whole)
    @staticmethod
    def _entry(state: dict[str, Any], version: str) -> dict[str, Any]:
        versions = state["versions"]
        if version not in versions:
            raise RegistryError(f"unknown version {version!r}; registered: {sorted(versions)}")
        return versions[version]

    def get(self, version: str) -> dict[str, Any]:
        return self._entry(self._load(), version)

    def versions(self) -> list[str]:
        return sorted(self._load()["versions"])

    def history(self) -> list[str]:
        """Every promotion, oldest first (a rollback removes the last one)."""
        return list(self._load()["history"])

    def production(self) -> dict[str, Any] | None:
        state = self._load()
        return self._entry(state, state["history"][-1]) if state["history"] else None

    def path(self, version: str | None = None, verify: bool = True) -> Path:
        """The artifact's path (default: production), after checking its sha256 and its companions'."""
        entry = self.get(version) if version else self.production()
        if entry is None:
            raise RegistryError("no version is in production yet")
        path = self.root / entry["file"]
        if verify:
            checks = [(path, entry["sha256"]), *((path.parent / name, h) for name, h in entry["companions"].items())]
            for file, registered in checks:
                actual = sha256_file(file) if file.is_file() else "missing"
                if actual != registered:
                    raise IntegrityError(f"{file.name} of {entry['version']} has sha256 {actual[:12]}..., registered "
                                         f"{registered[:12]}...: refusing to load a modified artifact")
        return path

    def table(self) -> pd.DataFrame:
        import pandas as pd

        rows = [{k: v for k, v in e.items() if k != "metadata"} | e["metadata"] for e in self._load()["versions"].values()]
        return pd.DataFrame(rows).set_index("version") if rows else pd.DataFrame()
