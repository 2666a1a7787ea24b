"""Reading exports: folders, zips, bare models, manifests, labels and unsafe zips."""

import hashlib
import json
import stat
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from modules.errors import BadModelError
from modules.export import Manifest, parse_labels, read_export, unpack_zip
from modules.model import CustomVisionModel
from tests import cvmodels

Export = Callable[..., Path]
MODEL = cvmodels.compact_classifier([0.2, 0.8])


def manifest_for(model: bytes, **fields: object) -> str:
    """Return a cvexport.manifest for a model, with CRLF line endings as exported."""
    document = {
        "DomainType": "Classification",
        "Platform": "ONNX",
        "Flavor": None,
        "ExporterVersion": "2.0",
        "ExportedDate": "2025-02-06T20:41:49.0487474Z",
        "IterationId": "c5bdcac8-428d-4406-a245-0c1ed7edd422",
        "ModelFileName": "model.onnx",
        "LabelFileName": "labels.txt",
        "MetadataPropsFileName": "metadata_properties.json",
        "ModelFileSHA1": hashlib.sha1(model).hexdigest(),
        "SchemaVersion": "1.0",
        **fields,
    }
    return json.dumps(document, indent=2).replace("\n", "\r\n")


def zip_folder(folder: Path, archive: Path, prefix: str = "") -> Path:
    """Zip every file of a folder, optionally under a top-level prefix."""
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as bundle:
        for path in sorted(folder.rglob("*")):
            bundle.write(path, prefix + path.relative_to(folder).as_posix())
    return archive


def test_labels_split_on_lines_only() -> None:
    assert parse_labels("Letra A\r\nLetra B\r\n") == ("Letra A", "Letra B")
    assert parse_labels("Box") == ("Box",)
    assert parse_labels("cat\ndog\n\n") == ("cat", "dog")


def test_real_manifests_parse(fixtures_dir: Path) -> None:
    examples = fixtures_dir / "_export-metadata-examples"
    text = (examples / "onnx-od-fp16-and-fp32-2020/cvexport.fp16.manifest").read_text()

    manifest = Manifest.from_json(json.loads(text))

    assert manifest.flavor == "ONNXFloat16"
    assert manifest.domain_type == "ObjectDetection"
    assert manifest.iteration_id == "f45f52e5-ef0f-4aa4-8505-969ac41b8753"
    assert manifest.model_sha1 == "c3190318e7af89cfa3c3f1e4c534ee2def01677c"
    assert manifest.properties_file is None


def test_real_labels_with_spaces_and_no_final_newline(fixtures_dir: Path) -> None:
    labels_path = fixtures_dir / "_export-metadata-examples/onnx-od-2024/labels.txt"

    labels = parse_labels(labels_path.read_text(encoding="utf-8"))

    assert len(labels) == 8
    assert any(" " in label for label in labels)


def test_folder_with_manifest_gives_iteration_and_verified_model(
    write_export: Export,
) -> None:
    folder = write_export(
        MODEL, ["no", "yes"], {"cvexport.manifest": manifest_for(MODEL)}
    )

    model = CustomVisionModel.load(folder)

    assert model.identity.iteration == "c5bdcac8-428d-4406-a245-0c1ed7edd422"
    assert model.identity.exported == "2025-02-06T20:41:49.0487474Z"
    assert model.identity.labels == ("no", "yes")


def test_model_that_does_not_match_its_manifest_sha1_is_refused(
    write_export: Export,
) -> None:
    manifest = manifest_for(MODEL, ModelFileSHA1="0" * 40)
    folder = write_export(MODEL, ["no", "yes"], {"cvexport.manifest": manifest})

    with pytest.raises(BadModelError, match="does not match its manifest: SHA-1"):
        read_export(folder)


def test_manifest_may_name_other_files(write_export: Export) -> None:
    manifest = manifest_for(MODEL, ModelFileName="m.onnx", LabelFileName="tags.txt")
    folder = write_export(b"", None, {"cvexport.manifest": manifest})
    (folder / "model.onnx").unlink()
    (folder / "m.onnx").write_bytes(MODEL)
    (folder / "tags.txt").write_text("first\nsecond\n")

    assert read_export(folder).labels == ("first", "second")


def test_manifest_naming_a_file_outside_the_export_is_refused(
    write_export: Export,
) -> None:
    manifest = manifest_for(MODEL, ModelFileName="../../etc/passwd")
    folder = write_export(MODEL, None, {"cvexport.manifest": manifest})

    with pytest.raises(BadModelError, match="outside the export"):
        read_export(folder)


def test_folder_without_a_model_says_so(tmp_path: Path) -> None:
    with pytest.raises(BadModelError, match=r"the export has no model\.onnx"):
        read_export(tmp_path)


@pytest.mark.parametrize("prefix", ["", "export/"])
def test_zip_of_an_export_loads(
    write_export: Export, tmp_path: Path, prefix: str
) -> None:
    folder = write_export(
        MODEL, ["no", "yes"], {"cvexport.manifest": manifest_for(MODEL)}
    )
    archive = zip_folder(folder, tmp_path / "export.zip", prefix)

    model = CustomVisionModel.load(archive)

    assert model.identity.labels == ("no", "yes")
    assert model.identity.iteration == "c5bdcac8-428d-4406-a245-0c1ed7edd422"
    assert model.identity.origin == str(archive)


def test_zip_of_the_real_export_scores_like_the_folder(
    fixtures_dir: Path, tmp_path: Path
) -> None:
    folder = fixtures_dir / "office-fruit-onnx12"
    archive = tmp_path / "office.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.write(folder / "model.onnx", "model.onnx")
        bundle.write(folder / "labels.txt", "labels.txt")
    pear = (folder / "images/pear.jpg").read_bytes()

    predictions = CustomVisionModel.load(archive).score(pear).predictions

    assert (predictions[0].tag_name, round(predictions[0].probability, 2)) == (
        "pear",
        1.0,
    )


def test_zip_entry_escaping_the_folder_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.writestr("model.onnx", MODEL)
        bundle.writestr("../escaped.txt", "gotcha")
    destination = tmp_path / "out"
    destination.mkdir()

    with pytest.raises(BadModelError, match="would leave the export folder"):
        unpack_zip(archive, destination)

    assert not (tmp_path / "escaped.txt").exists()
    assert list(destination.iterdir()) == []


def test_absolute_zip_entry_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.writestr("/tmp/absolute.txt", "gotcha")

    with pytest.raises(BadModelError, match="would leave the export folder"):
        read_export(archive)


def test_symbolic_link_in_a_zip_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "link.zip"
    link = zipfile.ZipInfo("labels.txt")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.writestr("model.onnx", MODEL)
        bundle.writestr(link, "/etc/passwd")

    with pytest.raises(BadModelError, match="is a symbolic link"):
        read_export(archive)


def test_zip_limits_on_entries_and_size(tmp_path: Path) -> None:
    archive = tmp_path / "many.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as bundle:
        for index in range(5):
            bundle.writestr(f"file{index}.bin", b"\0" * 10_000)

    with pytest.raises(BadModelError, match="5 entries, over the limit of 4"):
        unpack_zip(archive, tmp_path / "a", max_entries=4)
    with pytest.raises(BadModelError, match="50000 bytes, over the limit of 40000"):
        unpack_zip(archive, tmp_path / "b", max_bytes=40_000)


def test_zip_without_an_export_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "photos.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.writestr("holiday/beach.jpg", b"not really")

    with pytest.raises(BadModelError, match="not a Custom Vision export"):
        read_export(archive)


def test_missing_path_says_so(tmp_path: Path) -> None:
    with pytest.raises(BadModelError, match="does not exist"):
        read_export(tmp_path / "nothing.onnx")
