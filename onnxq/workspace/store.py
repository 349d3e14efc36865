"""The workspace: a folder that makes a conversion resumable and every recorded step recoverable.

Format (version 2: version 1 numbered nodes of equal signature in graph order), all JSON, no pickle::

    WORKSPACE/manifest.json        {"format": "onnxq-workspace", "version": 2, "onnxq_version",
                                     "model": {"structure", "weights"}, "config": {...},
                                     "data": {"first_batch_sha256"}, "ties": {key: node name}}
    WORKSPACE/steps/NNNNNN-KIND.json {"format", "version", "index", "kind", "sha256", "payload"}

Steps are append-only and numbered from 0. ``sha256`` is the hash of the payload serialized
canonically (sorted keys, no spaces); a step whose file is truncated or whose hash does not
match is skipped, so the last good step is used. Every file is written atomically (temp file,
fsync, rename). The kinds and their payloads are the step types of ``onnxq.workspace.steps``.

Safety rules:
1. onnxq only ever deletes what it wrote: a folder that is neither empty nor marked as a
   workspace by its manifest's ``format`` is refused, never cleared.
2. A run holds an OS lock (``flock``) on ``WORKSPACE/.lock`` for its whole length; the OS
   releases it when the process dies, so a second run on the same workspace is refused while
   the first lives, and never blocked by a stale lock.
3. Temporary files left by a killed write (``.NAME.XXXXXXXX.tmp``) are removed when the
   workspace is opened or created.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

from onnxq.errors import WorkspaceError
from onnxq.files import os_reason, remove_stale_temporaries, write_atomically
from onnxq.workspace.steps import StepRecord

T = TypeVar("T", bound=StepRecord)
FORMAT = "onnxq-workspace"
VERSION = 2
LOCK_FILE = ".lock"
_STEP_GLOB = "[0-9][0-9][0-9][0-9][0-9][0-9]-*.json"


def _canonical(payload: dict) -> bytes:
    return json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()


def _is_workspace(path: Path) -> bool:
    """Whether ``path`` holds a manifest marked as an onnxq workspace's."""
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == FORMAT


def _check_manifest_schema(manifest: dict, path: Path) -> None:
    """Refuse a manifest whose fields are missing or of the wrong JSON type."""
    model, data = manifest.get("model"), manifest.get("data")
    valid = (
        isinstance(model, dict)
        and all(isinstance(model.get(key), str) for key in ("structure", "weights"))
        and isinstance(manifest.get("config"), dict)
        and (data is None or isinstance(data, dict))
    )
    if not valid:
        raise WorkspaceError(f"workspace manifest {path} lacks fields or has wrong types; the workspace is damaged, "
                             "start a new run")


def _remove_stale_temporaries(path: Path) -> None:
    """The temporary files killed writes left in the workspace (its manifest's and its steps')."""
    for folder in (path, path / "steps"):
        remove_stale_temporaries(folder)


def check_owned(path: Path) -> None:
    """Refuse a ``path`` that exists and is not an onnxq workspace (nor an empty folder): onnxq
    would otherwise overwrite or delete files it did not write."""
    if not path.exists():
        return
    if not path.is_dir():
        raise WorkspaceError(f"workspace {path} is a file, not a folder; choose another --workspace")
    if any(entry.name != LOCK_FILE for entry in path.iterdir()) and not _is_workspace(path):
        raise WorkspaceError(
            f"{path} is not empty and is not an onnxq workspace; choose a new or empty folder for --workspace"
        )


@contextlib.contextmanager
def locked(path: str | Path) -> Iterator[None]:
    """Hold the workspace at ``path`` (created if absent) for one run: an exclusive OS lock on
    ``path/.lock``, released when the block ends or the process dies. A workspace another run
    holds is a ``WorkspaceError``. A folder this run made and left without a manifest (the run
    was refused before it recorded anything) is removed again."""
    path = Path(path)
    check_owned(path)
    made = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise WorkspaceError(f"cannot create workspace {path}: {os_reason(exc)}; choose another --workspace") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WorkspaceError(
                f"workspace {path} is in use by another onnxq run; wait for it to end or choose another --workspace"
            ) from None
        yield
    except BaseException:
        if made and not (path / "manifest.json").exists():
            _remove_empty_workspace(path)
        raise
    finally:
        os.close(fd)


def _remove_empty_workspace(path: Path) -> None:
    """Remove the lock and the folders of a workspace that holds nothing else (best effort)."""
    (path / LOCK_FILE).unlink(missing_ok=True)
    for folder in (path / "steps", path):
        with contextlib.suppress(OSError):  # not empty, or already gone: leave it
            folder.rmdir()


@dataclasses.dataclass(frozen=True)
class Step:
    """One recorded step: its index, kind and payload (``read`` gives it typed)."""

    index: int
    kind: str
    payload: dict

    def read(self, step_type: type[T]) -> T:
        """The payload as ``step_type`` (one of ``onnxq.workspace.steps``), schema-checked."""
        if self.kind != step_type.KIND:
            raise WorkspaceError(f"step {self.index} is a {self.kind} step, not a {step_type.KIND} step")
        return step_type.from_payload(self.payload)


class Workspace:
    """A workspace folder; create it with ``create`` or open an existing one with ``open``."""

    def __init__(self, path: Path, manifest: dict) -> None:
        self.path = path
        self.manifest = manifest
        self._steps_dir = path / "steps"
        files = self._files()  # listed once: a run holds the workspace (``locked``), so it alone appends
        self._next_index = int(files[-1].name[:6]) + 1 if files else 0

    @classmethod
    def create(cls, path: str | Path, manifest: dict) -> Workspace:
        """Start a fresh workspace at ``path``, discarding the step files of any earlier run there
        (only onnxq's own: a folder that is not a workspace is refused, see ``check_owned``)."""
        path = Path(path)
        check_owned(path)
        manifest = {"format": FORMAT, "version": VERSION, **manifest}
        try:
            (path / "steps").mkdir(parents=True, exist_ok=True)
            for file in (path / "steps").glob(_STEP_GLOB):
                file.unlink()
            _remove_stale_temporaries(path)
        except OSError as exc:
            raise WorkspaceError(f"cannot create workspace {path}: {os_reason(exc)}; choose another --workspace") from exc
        write_atomically(json.dumps(manifest, indent=2, sort_keys=True).encode(), path / "manifest.json")
        return cls(path, manifest)

    @classmethod
    def open(cls, path: str | Path) -> Workspace:
        """Open an existing workspace; a missing or unreadable manifest is a ``WorkspaceError``."""
        path = Path(path)
        manifest_path = path / "manifest.json"
        if not manifest_path.is_file():
            raise WorkspaceError(
                f"no workspace at {path} (no manifest.json); give the workspace folder of an earlier convert "
                "(its --workspace, by default OUTPUT.onnxq)"
            )
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as exc:
            raise WorkspaceError(f"workspace manifest {manifest_path} is unreadable ({exc}); start a new run") from exc
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
            raise WorkspaceError(
                f"{path} is not an onnxq workspace of format version {VERSION}; start a new run"
            )
        _check_manifest_schema(manifest, manifest_path)
        with contextlib.suppress(OSError):
            _remove_stale_temporaries(path)
        return cls(path, manifest)

    def check_matches(self, manifest: dict) -> None:
        """Refuse a workspace made for another model, configuration or data, saying what differs."""
        mine = self.manifest
        if mine["model"]["structure"] != manifest["model"]["structure"]:
            raise WorkspaceError(
                f"workspace {self.path} was made for a different model (its graph structure differs); "
                "use a new --workspace or the original model"
            )
        if mine["model"]["weights"] != manifest["model"]["weights"]:
            raise WorkspaceError(
                f"workspace {self.path} was made for a model with the same structure but other weights; "
                "use a new --workspace or the original model"
            )
        differs = sorted(k for k in manifest["config"] if mine["config"].get(k) != manifest["config"][k])
        if differs:
            detail = ", ".join(f"{k}: {mine['config'].get(k)!r} there, {manifest['config'][k]!r} now" for k in differs)
            raise WorkspaceError(f"workspace {self.path} used other options ({detail}); use the same options or a new --workspace")
        if manifest.get("data") is not None and mine.get("data") != manifest["data"]:
            raise WorkspaceError(
                f"workspace {self.path} was calibrated on other data (its first batch differs); "
                "resume with the same --calibration-data or start a new run"
            )

    def _files(self) -> list[Path]:
        return sorted(self._steps_dir.glob(_STEP_GLOB))

    def append(self, step: StepRecord) -> int:
        """Record a step atomically; returns its index."""
        kind, payload = step.KIND, step.to_payload()
        index = self._next_index
        record = {
            "format": FORMAT,
            "version": VERSION,
            "index": index,
            "kind": kind,
            "sha256": hashlib.sha256(_canonical(payload)).hexdigest(),
            "payload": payload,
        }
        write_atomically(json.dumps(record, sort_keys=True).encode(), self._steps_dir / f"{index:06d}-{kind}.json")
        self._next_index += 1
        return index

    def _read(self, file: Path) -> Step | None:
        try:
            record = json.loads(file.read_text())
            payload = record["payload"]
            if not isinstance(payload, dict) or not isinstance(record["kind"], str):
                return None
            if hashlib.sha256(_canonical(payload)).hexdigest() != record["sha256"]:
                return None
            return Step(int(record["index"]), record["kind"], payload)
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def steps(self) -> list[Step]:
        """Every intact step in order; truncated or corrupt step files are skipped."""
        return [step for step in map(self._read, self._files()) if step is not None]

    def step(self, index: int) -> Step:
        """The step with ``index``, or a ``WorkspaceError`` saying which indices exist."""
        for step in self.steps():
            if step.index == index:
                return step
        indices = [s.index for s in self.steps()]
        raise WorkspaceError(f"workspace {self.path} has no intact step {index}; recorded steps: {indices}")

    def latest(self, kind: str | type[StepRecord]) -> Step | None:
        """The last intact step of ``kind`` (a kind name or a step type), if any."""
        kind = kind if isinstance(kind, str) else kind.KIND
        for file in reversed(self._files()):  # newest first, by the kind in the file name
            step = self._read(file) if file.name[7:-5] == kind else None
            if step is not None and step.kind == kind:
                return step
        return None
