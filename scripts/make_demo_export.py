"""Generate the built-in demo export: a compact classifier of an image's main colour.

The module's runtime has no `onnx` package, so this script (run with the dev
requirements) writes the export once into modules/demo, where it is committed.
Usage: .venv/bin/python scripts/make_demo_export.py [--check]
"""

import argparse
import hashlib
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

DEMO_FOLDER = Path(__file__).resolve().parents[1] / "modules" / "demo"
MODEL_FILE = "model.onnx"
LABELS_FILE = "labels.txt"
MANIFEST_FILE = "cvexport.manifest"

# The tags and their prototype colours (RGB, 0..255), in the model's output order.
PROTOTYPES = {
    "red": (220, 40, 40),
    "orange": (240, 140, 30),
    "yellow": (235, 215, 50),
    "green": (50, 160, 60),
    "blue": (40, 80, 200),
    "purple": (130, 60, 160),
    "white": (240, 240, 240),
    "grey": (128, 128, 128),
    "black": (20, 20, 20),
}
# Grey and purple, the closest prototypes, are 0.087 apart (squared, in 0..1 units):
# at 40 each prototype scores above 0.96, and an image halfway between two prototypes
# splits its probability between them.
TEMPERATURE = 40.0
FULL_SCALE = 255.0

INPUT_NAME = "data"
OUTPUT_NAME = "model_output"
INPUT_SIZE_PX = 224
IR_VERSION = 8
OPSET = 13
PRODUCER = "customvision-scorer demo"
METADATA = {
    "Image.BitmapPixelFormat": "Rgb8",
    "Image.NominalPixelRange": "NominalRange_0_255",
}

# Fixed, so that regenerating the export reproduces it byte for byte.
ITERATION_ID = "00000000-0000-4000-8000-00000000de70"
EXPORTED_DATE = "2026-01-01T00:00:00.0000000Z"


def main(argv: Sequence[str] | None = None) -> int:
    """Write the demo export, or with --check compare it with the committed one."""
    arguments = _parser().parse_args(argv)
    files = build_export()
    if arguments.check:
        return check(files, arguments.folder)
    write(files, arguments.folder)
    return 0


def build_export() -> dict[str, bytes]:
    """Return the demo export's files, by name."""
    model = build_model()
    return {
        MODEL_FILE: model,
        LABELS_FILE: "".join(f"{label}\n" for label in PROTOTYPES).encode(),
        MANIFEST_FILE: build_manifest(model),
    }


def build_model() -> bytes:
    """Build the colour classifier with a compact Custom Vision signature."""
    weights, bias = logit_layer(np.array(list(PROTOTYPES.values())), TEMPERATURE)
    tags = len(PROTOTYPES)
    nodes = [
        helper.make_node(
            "ReduceMean",
            [INPUT_NAME],
            ["means"],
            "channel_means",
            axes=[2, 3],
            keepdims=0,
        ),
        helper.make_node("Div", ["means", "full_scale"], ["colour"], "to_unit_range"),
        helper.make_node("MatMul", ["colour", "weights"], ["affinity"], "affinity"),
        helper.make_node("Add", ["affinity", "bias"], ["logits"], "logits"),
        helper.make_node("Softmax", ["logits"], [OUTPUT_NAME], "softmax", axis=1),
    ]
    initializers = [
        numpy_helper.from_array(np.array(FULL_SCALE, np.float32), "full_scale"),
        numpy_helper.from_array(weights, "weights"),
        numpy_helper.from_array(bias, "bias"),
    ]
    size = INPUT_SIZE_PX
    graph = helper.make_graph(
        nodes,
        "dominant_colour",
        [
            helper.make_tensor_value_info(
                INPUT_NAME, TensorProto.FLOAT, ["N", 3, size, size]
            )
        ],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", tags])],
        initializer=initializers,
    )
    return _serialize(graph, METADATA)


def logit_layer(
    prototypes: np.ndarray, temperature: float
) -> tuple[np.ndarray, np.ndarray]:
    """Return the weights [3, K] and bias [K] of nearest-prototype logits."""
    # Softmax of -T * |m - c_k|^2 over k equals softmax of T * (2 m.c_k - |c_k|^2):
    # |m|^2 is the same for every tag and cancels, which leaves an affine layer.
    centres = prototypes.astype(np.float64) / FULL_SCALE
    weights = 2.0 * temperature * centres.T
    bias = -temperature * np.sum(centres**2, axis=1)
    return weights.astype(np.float32), bias.astype(np.float32)


def build_manifest(model: bytes) -> bytes:
    """Return a cvexport.manifest for the model, laid out as Custom Vision's are."""
    document = {
        "DomainType": "Classification",
        "Platform": "ONNX",
        "Flavor": None,
        "ExporterVersion": "2.0",
        "ExportedDate": EXPORTED_DATE,
        "IterationId": ITERATION_ID,
        "ModelFileName": MODEL_FILE,
        "LabelFileName": LABELS_FILE,
        "MetadataPropsFileName": None,
        "ModelFileSHA1": hashlib.sha1(model, usedforsecurity=False).hexdigest(),
        "SchemaVersion": "1.0",
    }
    # Real manifests have two-space indents, CRLF line endings and no final newline.
    return json.dumps(document, indent=2).replace("\n", "\r\n").encode()


def check(files: Mapping[str, bytes], folder: Path) -> int:
    """Return 0 when the folder holds exactly these files' contents, else 1."""
    stale = [name for name, data in files.items() if _read(folder / name) != data]
    for name in stale:
        print(f"{folder / name} is not what this script generates", file=sys.stderr)
    if stale:
        print("regenerate it: python scripts/make_demo_export.py", file=sys.stderr)
    return 1 if stale else 0


def write(files: Mapping[str, bytes], folder: Path) -> None:
    """Write the files into the folder, creating it if needed."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
        print(f"wrote {folder / name} ({len(data)} bytes)")


def _serialize(graph: onnx.GraphProto, metadata: Mapping[str, str]) -> bytes:
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        producer_name=PRODUCER,
        doc_string="Demo: tags an image with the prototype nearest its mean colour.",
    )
    helper.set_model_props(model, dict(metadata))
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Generate the demo export into modules/demo."
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="regenerate in memory and exit 1 if the committed files differ",
    )
    parser.add_argument(
        "--folder",
        type=Path,
        default=DEMO_FOLDER,
        help="where the export is (default: modules/demo)",
    )
    return parser


if __name__ == "__main__":
    sys.exit(main())
