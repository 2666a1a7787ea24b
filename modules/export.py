"""Read a Custom Vision export: a folder, a zip of one, or a bare .onnx file."""

import hashlib
import json
import stat
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import BadModelError

MODEL_FILE = "model.onnx"
LABELS_FILE = "labels.txt"
MANIFEST_FILE = "cvexport.manifest"
PROPERTIES_FILE = "metadata_properties.json"

MAX_MODEL_BYTES = 512 * 1024 * 1024
MAX_SIDECAR_BYTES = 4 * 1024 * 1024
MAX_ZIP_ENTRIES = 1000
MAX_UNPACKED_BYTES = 1024 * 1024 * 1024
_COPY_CHUNK_BYTES = 1024 * 1024


@dataclass(frozen=True)
class Manifest:
    """The fields of cvexport.manifest the module uses."""

    domain_type: str | None = None
    platform: str | None = None
    flavor: str | None = None
    exported_date: str | None = None
    iteration_id: str | None = None
    model_file: str = MODEL_FILE
    label_file: str | None = LABELS_FILE
    properties_file: str | None = None
    model_sha1: str | None = None

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> "Manifest":
        """Build a manifest from the JSON object of cvexport.manifest."""
        return cls(
            domain_type=_optional_str(document, "DomainType"),
            platform=_optional_str(document, "Platform"),
            flavor=_optional_str(document, "Flavor"),
            exported_date=_optional_str(document, "ExportedDate"),
            iteration_id=_optional_str(document, "IterationId"),
            model_file=_optional_str(document, "ModelFileName") or MODEL_FILE,
            label_file=_optional_str(document, "LabelFileName"),
            properties_file=_optional_str(document, "MetadataPropsFileName"),
            model_sha1=_optional_str(document, "ModelFileSHA1"),
        )


@dataclass(frozen=True)
class ExportFiles:
    """The files of one export, read into memory and checked."""

    model: bytes = field(repr=False)
    labels: tuple[str, ...] | None
    manifest: Manifest | None
    properties: Mapping[str, str]
    origin: str


def read_export(path: Path) -> ExportFiles:
    """Read an export from a folder, a zip of one, or a bare .onnx file."""
    if path.is_dir():
        return read_folder(path)
    if not path.is_file():
        raise BadModelError(f"no model at {path}: the path does not exist")
    if zipfile.is_zipfile(path):
        with tempfile.TemporaryDirectory(prefix="cvexport-") as scratch:
            return _with_origin(read_folder(unpack_zip(path, Path(scratch))), path)
    return _read_bare_model(path)


def read_folder(folder: Path) -> ExportFiles:
    """Read an unpacked export folder, checking the model against its manifest."""
    manifest = _read_manifest(folder / MANIFEST_FILE)
    model_name = manifest.model_file if manifest else MODEL_FILE
    model = _read_limited(_inside(folder, model_name), MAX_MODEL_BYTES, "model")
    if manifest and manifest.model_sha1:
        _verify_sha1(model, manifest.model_sha1, model_name)

    label_name = manifest.label_file if manifest else LABELS_FILE
    labels = _read_labels(_inside(folder, label_name)) if label_name else None
    properties_name = (manifest and manifest.properties_file) or PROPERTIES_FILE
    properties = _read_properties(_inside(folder, properties_name))
    return ExportFiles(model, labels, manifest, properties, str(folder))


def parse_labels(text: str) -> tuple[str, ...]:
    """Split labels.txt into labels: one per line, CRLF tolerated, spaces kept."""
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    return tuple(lines)


def unpack_zip(
    archive: Path,
    destination: Path,
    *,
    max_entries: int = MAX_ZIP_ENTRIES,
    max_bytes: int = MAX_UNPACKED_BYTES,
) -> Path:
    """Unpack an export zip safely into destination and return the export's folder."""
    try:
        with zipfile.ZipFile(archive) as bundle:
            members = _checked_members(bundle, max_entries, max_bytes)
            for member in members:
                _extract(bundle, member, destination)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError) as error:
        raise BadModelError(f"{archive.name} is not a readable zip: {error}") from error
    return _export_root(destination)


def _read_bare_model(path: Path) -> ExportFiles:
    model = _read_limited(path, MAX_MODEL_BYTES, "model")
    labels_path = path.with_name(LABELS_FILE)
    labels = _read_labels(labels_path) if labels_path.is_file() else None
    return ExportFiles(model, labels, None, {}, str(path))


def _with_origin(files: ExportFiles, origin: Path) -> ExportFiles:
    return ExportFiles(
        files.model, files.labels, files.manifest, files.properties, str(origin)
    )


def _read_manifest(path: Path) -> Manifest | None:
    if not path.is_file():
        return None
    document = _read_json(path)
    if not isinstance(document, dict):
        raise BadModelError(f"{path.name} is not a JSON object")
    return Manifest.from_json(document)


def _read_properties(path: Path) -> Mapping[str, str]:
    if not path.is_file():
        return {}
    document = _read_json(path)
    if not isinstance(document, dict):
        raise BadModelError(f"{path.name} is not a JSON object")
    return {str(key): str(value) for key, value in document.items() if value}


def _read_labels(path: Path) -> tuple[str, ...] | None:
    if not path.is_file():
        return None
    raw = _read_limited(path, MAX_SIDECAR_BYTES, "labels")
    try:
        return parse_labels(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as error:
        raise BadModelError(f"{path.name} is not UTF-8 text: {error}") from error


def _read_json(path: Path) -> Any:
    raw = _read_limited(path, MAX_SIDECAR_BYTES, path.name)
    try:
        return json.loads(raw.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BadModelError(f"{path.name} is not valid JSON: {error}") from error


def _read_limited(path: Path, limit: int, what: str) -> bytes:
    try:
        size = path.stat().st_size
        if size > limit:
            raise BadModelError(
                f"{path.name} is {size} bytes, over the {limit}-byte limit for a {what}"
            )
        return path.read_bytes()
    except FileNotFoundError as error:
        raise BadModelError(f"the export has no {path.name}") from error
    except OSError as error:
        raise BadModelError(f"cannot read {path}: {error.strerror}") from error


def _inside(folder: Path, name: str) -> Path:
    """Resolve a file name from a manifest, refusing names that leave the folder."""
    relative = PurePosixPath(name.replace("\\", "/"))
    if relative.is_absolute() or ".." in relative.parts:
        raise BadModelError(f"the manifest names a file outside the export: {name!r}")
    return folder.joinpath(*relative.parts)


def _verify_sha1(model: bytes, expected: str, name: str) -> None:
    actual = hashlib.sha1(model, usedforsecurity=False).hexdigest()
    if actual.lower() != expected.strip().lower():
        raise BadModelError(
            f"{name} does not match its manifest: SHA-1 {actual}, "
            f"the manifest says {expected}"
        )


def _checked_members(
    bundle: zipfile.ZipFile, max_entries: int, max_bytes: int
) -> list[zipfile.ZipInfo]:
    members = bundle.infolist()
    if len(members) > max_entries:
        raise BadModelError(
            f"the zip has {len(members)} entries, over the limit of {max_entries}"
        )
    total = 0
    for member in members:
        _check_member(member)
        total += member.file_size
    if total > max_bytes:
        raise BadModelError(
            f"the zip unpacks to {total} bytes, over the limit of {max_bytes}"
        )
    return members


def _check_member(member: zipfile.ZipInfo) -> None:
    name = member.filename
    path = PurePosixPath(name.replace("\\", "/"))
    drive = bool(path.parts) and ":" in path.parts[0]
    if path.is_absolute() or ".." in path.parts or drive:
        raise BadModelError(f"the zip entry {name!r} would leave the export folder")
    mode = member.external_attr >> 16
    if stat.S_ISLNK(mode):
        raise BadModelError(f"the zip entry {name!r} is a symbolic link")
    # Zips made on Windows or by writestr carry no file type at all: those are files.
    if stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise BadModelError(f"the zip entry {name!r} is not a regular file")


def _extract(bundle: zipfile.ZipFile, member: zipfile.ZipInfo, root: Path) -> None:
    target = root.joinpath(*PurePosixPath(member.filename.replace("\\", "/")).parts)
    if member.is_dir():
        target.mkdir(parents=True, exist_ok=True)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with bundle.open(member) as source, target.open("wb") as sink:
        while chunk := source.read(_COPY_CHUNK_BYTES):
            written += len(chunk)
            # The header's size is the attacker's word; count what really comes out.
            if written > member.file_size:
                raise BadModelError(
                    f"the zip entry {member.filename!r} is larger than it declares"
                )
            sink.write(chunk)


def _export_root(folder: Path) -> Path:
    """Return the folder holding the export, which zips sometimes nest one level."""
    if (folder / MODEL_FILE).is_file() or (folder / MANIFEST_FILE).is_file():
        return folder
    children = [child for child in folder.iterdir() if child.is_dir()]
    for child in children:
        if (child / MODEL_FILE).is_file() or (child / MANIFEST_FILE).is_file():
            return child
    raise BadModelError(
        f"the zip holds no {MODEL_FILE} or {MANIFEST_FILE} at its top level: "
        "it is not a Custom Vision export"
    )


def _optional_str(document: Mapping[str, Any], key: str) -> str | None:
    value = document.get(key)
    return str(value) if value is not None else None
