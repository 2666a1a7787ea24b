"""The model store: exports on disk, the active one and the one before it.

    <root>/state.json          the current, previous and rolled-back-from SHA-256
    <root>/exports/<sha256>/   meta.json and the unpacked export
    <root>/incoming/           downloads and unpacking in progress

Models are keyed by the SHA-256 of the file that was downloaded. Every change of
state.json is a write to a temporary file and an atomic rename, so a power cut leaves
either the old or the new state. All methods block: call them off the event loop.
"""

import json
import logging
import os
import shutil
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import BadModelError
from .export import MODEL_FILE, unpack_zip

STATE_FILE = "state.json"
META_FILE = "meta.json"
EXPORT_FOLDER = "export"

_LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoredModel:
    """An export kept in the store, and where it came from."""

    sha256: str
    folder: Path
    url: str | None = None  # redacted: no query string
    version: str | None = None
    installed_at: str | None = None

    def describe(self) -> dict[str, Any]:
        """Return what the twin and the logs may show."""
        return {"sha256": self.sha256, "url": self.url, "version": self.version}


class ModelStore:
    """Exports persisted on disk, with the active and the previous one remembered."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._exports = root / "exports"
        self._incoming = root / "incoming"
        self._exports.mkdir(parents=True, exist_ok=True)
        # Whatever is in incoming/ was interrupted: it is never worth resuming.
        shutil.rmtree(self._incoming, ignore_errors=True)
        self._incoming.mkdir(parents=True, exist_ok=True)

    def new_download(self) -> Path:
        """Return a fresh file name for a download in progress."""
        handle, name = tempfile.mkstemp(prefix="download-", dir=self._incoming)
        os.close(handle)
        return Path(name)

    def unpack(self, download: Path) -> Path:
        """Unpack a downloaded zip, or place a bare .onnx; return the export folder."""
        staging = Path(tempfile.mkdtemp(prefix="staging-", dir=self._incoming))
        target = staging / EXPORT_FOLDER
        target.mkdir()
        if zipfile.is_zipfile(download):
            return unpack_zip(download, target)
        with download.open("rb") as stream:
            signature = stream.read(2)
        if signature == b"PK":
            raise BadModelError(
                "the download looks like a zip but cannot be read as one"
            )
        shutil.copyfile(download, target / MODEL_FILE)
        return target

    def install(self, export: Path, model: StoredModel) -> StoredModel:
        """Move an unpacked, validated export into the store under its SHA-256."""
        staging = self._incoming_entry(export)
        entry = self._exports / model.sha256
        if entry.exists():
            shutil.rmtree(entry)
        staging.rename(entry)
        stored = StoredModel(
            model.sha256,
            entry / export.relative_to(staging),
            model.url,
            model.version,
            model.installed_at,
        )
        meta = {**asdict(stored), "folder": str(stored.folder.relative_to(entry))}
        _write_json(entry / META_FILE, meta)
        return stored

    def get(self, sha256: str) -> StoredModel | None:
        """Return a stored export by its SHA-256, if it is complete."""
        entry = self._exports / sha256
        try:
            meta = json.loads((entry / META_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return StoredModel(
            sha256,
            entry / meta.get("folder", EXPORT_FOLDER),
            meta.get("url"),
            meta.get("version"),
            meta.get("installed_at"),
        )

    def current(self) -> StoredModel | None:
        """Return the export that was active last."""
        sha256 = self._state().get("current")
        return self.get(sha256) if sha256 else None

    def previous(self) -> StoredModel | None:
        """Return the export that was active before the current one."""
        sha256 = self._state().get("previous")
        return self.get(sha256) if sha256 else None

    @property
    def rolled_back_from(self) -> str | None:
        """Return the SHA-256 a rollback moved away from, until a new model comes."""
        value = self._state().get("rolledBackFrom")
        return value if isinstance(value, str) else None

    def activate(self, sha256: str, *, rolled_back_from: str | None = None) -> None:
        """Record an export as current, the old current as previous; prune the rest."""
        state = self._state()
        current = state.get("current")
        previous = current if current != sha256 else state.get("previous")
        _write_json(
            self.root / STATE_FILE,
            {
                "current": sha256,
                "previous": previous,
                "rolledBackFrom": rolled_back_from,
            },
        )
        self._prune({sha256, previous})

    def discard(self, path: Path) -> None:
        """Remove a download or staging folder that will not be installed."""
        entry = self._incoming_entry(path)
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)

    def _incoming_entry(self, path: Path) -> Path:
        """Return the download file or staging folder directly under incoming/."""
        return self._incoming / path.relative_to(self._incoming).parts[0]

    def _state(self) -> dict[str, Any]:
        try:
            state = json.loads((self.root / STATE_FILE).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as error:
            _LOGGER.warning("Ignoring an unreadable model store state: %s", error)
            return {}
        return state if isinstance(state, dict) else {}

    def _prune(self, keep: set[str | None]) -> None:
        for entry in self._exports.iterdir():
            if entry.name not in keep:
                shutil.rmtree(entry, ignore_errors=True)


def _unpack_into(download: Path, target: Path) -> Path:
    if zipfile.is_zipfile(download):
        return unpack_zip(download, target)
    with download.open("rb") as stream:
        signature = stream.read(2)
    if signature == b"PK":
        raise BadModelError("the download looks like a zip but cannot be read as one")
    shutil.copyfile(download, target / MODEL_FILE)
    return target


def _write_json(path: Path, document: dict[str, Any]) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    with temporary.open("w", encoding="utf-8") as stream:
        json.dump(document, stream, indent=2)
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(temporary, path)
