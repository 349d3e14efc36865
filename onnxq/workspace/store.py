"""The workspace: a folder that makes a conversion resumable and every recorded step recoverable.

Format (version 1), all JSON, no pickle::

    WORKSPACE/manifest.json        {"format": "onnxq-workspace", "version": 1, "onnxq_version",
                                     "model": {"structure", "weights"}, "config": {...},
                                     "data": {"first_batch_sha256"}}
    WORKSPACE/steps/NNNNNN-KIND.json {"format", "version", "index", "kind", "sha256", "payload"}

Steps are append-only and numbered from 0. ``sha256`` is the hash of the payload serialized
canonically (sorted keys, no spaces); a step whose file is truncated or whose hash does not
match is skipped, so the last good step is used. Every file is written atomically (temp file,
fsync, rename). The kinds and their payloads are the step types of ``onnxq.workspace.steps``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path
from typing import TypeVar

from onnxq.errors import WorkspaceError
from onnxq.files import write_atomically
from onnxq.workspace.steps import StepRecord

T = TypeVar("T", bound=StepRecord)
FORMAT = "onnxq-workspace"
VERSION = 1


def _canonical(payload: dict) -> bytes:
    return json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()


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

    @classmethod
    def create(cls, path: str | Path, manifest: dict) -> Workspace:
        """Start a fresh workspace at ``path``, discarding the steps of any earlier run there."""
        path = Path(path)
        manifest = {"format": FORMAT, "version": VERSION, **manifest}
        try:
            if (path / "steps").is_dir():
                shutil.rmtree(path / "steps")
            (path / "steps").mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise WorkspaceError(f"cannot create workspace {path}: {exc.strerror}; choose another --workspace") from exc
        write_atomically(json.dumps(manifest, indent=2, sort_keys=True).encode(), path / "manifest.json")
        return cls(path, manifest)

    @classmethod
    def open(cls, path: str | Path) -> Workspace:
        """Open an existing workspace; a missing or unreadable manifest is a ``WorkspaceError``."""
        path = Path(path)
        manifest_path = path / "manifest.json"
        if not manifest_path.is_file():
            raise WorkspaceError(f"no workspace at {path} (no manifest.json); run without --resume to start one")
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as exc:
            raise WorkspaceError(f"workspace manifest {manifest_path} is unreadable ({exc}); start a new run") from exc
        if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
            raise WorkspaceError(
                f"{path} is not an onnxq workspace of format version {VERSION}; start a new run"
            )
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
        return sorted(self._steps_dir.glob("[0-9][0-9][0-9][0-9][0-9][0-9]-*.json"))

    def append(self, step: StepRecord) -> int:
        """Record a step atomically; returns its index."""
        kind, payload = step.KIND, step.to_payload()
        files = self._files()
        index = int(files[-1].name[:6]) + 1 if files else 0
        record = {
            "format": FORMAT,
            "version": VERSION,
            "index": index,
            "kind": kind,
            "sha256": hashlib.sha256(_canonical(payload)).hexdigest(),
            "payload": payload,
        }
        write_atomically(json.dumps(record, sort_keys=True).encode(), self._steps_dir / f"{index:06d}-{kind}.json")
        return index

    def _read(self, file: Path) -> Step | None:
        try:
            record = json.loads(file.read_text())
            payload = record["payload"]
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
        matching = [step for step in self.steps() if step.kind == kind]
        return matching[-1] if matching else None
