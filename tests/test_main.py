"""The command line, run as a user runs it: `python main.py score` and `inspect`."""

import json
import subprocess
import sys
from pathlib import Path

from tests import cvmodels

ROOT = Path(__file__).resolve().parents[1]


def run(*arguments: str | Path) -> subprocess.CompletedProcess[str]:
    """Run main.py with arguments and return what it printed."""
    return subprocess.run(
        [sys.executable, str(ROOT / "main.py"), *map(str, arguments)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_score_prints_one_result_per_image_in_order(fixtures_dir: Path) -> None:
    folder = fixtures_dir / "office-fruit-onnx12"
    names = ["pear.jpg", "apple.jpg", "grapes.jpg"]

    done = run("score", "--model", folder, *(folder / "images" / n for n in names))

    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert done.returncode == 0, done.stderr
    assert [r["predictions"][0]["tagName"] for r in results] == [
        "pear",
        "apple",
        "grapes",
    ]
    assert [r["source"]["path"] for r in results] == [
        str(folder / "images" / n) for n in names
    ]
    first = results[0]
    assert set(first) >= {"id", "project", "iteration", "created", "predictions"}
    assert first["image"] == {"width": 1280, "height": 720}
    assert len(first["model"]["sha256"]) == 64
    assert set(first["predictions"][0]) == {"probability", "tagId", "tagName"}


def test_score_reports_unreadable_images_and_scores_the_rest(
    fixtures_dir: Path, tmp_path: Path
) -> None:
    folder = fixtures_dir / "office-fruit-onnx12"
    text = tmp_path / "notes.jpg"
    text.write_text("not a picture")

    done = run(
        "score",
        "--model",
        folder,
        folder / "images/pen.jpg",
        text,
        tmp_path / "missing.jpg",
        folder / "images/pear.jpg",
        "--full",
    )

    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert done.returncode == 1
    assert [r["predictions"][0]["tagName"] for r in results] == ["Pen", "pear"]
    assert round(results[0]["predictions"][0]["probability"], 2) == 0.56
    assert f"error: {text}: not an image" in done.stderr
    assert f"error: {tmp_path / 'missing.jpg'}: cannot read the file" in done.stderr


def test_score_threshold_and_max(tmp_path: Path) -> None:
    model = tmp_path / "model.onnx"
    model.write_bytes(cvmodels.compact_classifier([0.5, 0.3, 0.2]))
    image = tmp_path / "red.png"
    image.write_bytes(cvmodels.solid_image((255, 0, 0)))

    above = run("score", "--model", model, "--threshold", "0.25", image)
    first = run("score", "--model", model, "--max", "1", image)

    assert [p["tagId"] for p in json.loads(above.stdout)["predictions"]] == [0, 1]
    assert [p["tagId"] for p in json.loads(first.stdout)["predictions"]] == [0]


def test_score_with_a_bad_model_fails_clearly(tmp_path: Path) -> None:
    model = tmp_path / "model.onnx"
    model.write_bytes(cvmodels.not_custom_vision())

    done = run("score", "--model", model, model)

    assert done.returncode == 2
    assert "error: not a Custom Vision export" in done.stderr
    assert done.stdout == ""


def test_inspect_for_people_and_programs(fixtures_dir: Path) -> None:
    folder = fixtures_dir / "hemlock-cherry-onnx12"

    text = run("inspect", "--model", folder)
    machine = json.loads(run("inspect", "--model", folder, "--json").stdout)

    assert text.returncode == 0
    assert "colour:       BGR" in text.stdout
    assert "labels:       hemlock, JapaneseCherry" in text.stdout
    assert machine["flavor"] == "classifier-onnx12"
    assert machine["input"] == "data"
    assert machine["shape"] == "[N, 3, 227, 227]"
    assert machine["dtype"] == "float32"
    assert machine["range"] == "0..255"
    assert machine["labels"] == ["hemlock", "JapaneseCherry"]
    assert machine["sha256"].startswith("2caeb0598ee2")


def test_inspect_a_float16_detector(tmp_path: Path) -> None:
    model = tmp_path / "model.onnx"
    model.write_bytes(cvmodels.s1_detector([[0, 0, 1, 1]], [0.5], [0], float16=True))

    machine = json.loads(run("inspect", "--model", model, "--json").stdout)

    assert machine["flavor"] == "detector-compact-s1"
    assert machine["float16"] is True
    assert machine["dtype"] == "float16"
    assert machine["colour"] == "RGB"
    assert machine["shape"] == "[1, 3, 320, 320]"
