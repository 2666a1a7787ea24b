"""Benchmark scoring: the module's path from JPEG bytes against bare inference.

Prints, for a 1280x720 and a 1920x1080 JPEG on the same model and in one run:
bare InferenceSession.run on a ready tensor, the reduced-scale JPEG decode alone, the
module's full path (bytes to predictions), the same with full-size decoding, and a
naive pipeline like Custom Vision's sample scripts (full decode, convert, resize, run).

    python bench/scoring.py [--model EXPORT] [--runs N]
"""

import argparse
import io
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modules import images
from modules.model import CustomVisionModel

FIXTURE = Path(__file__).resolve().parents[2] / "shared/fixtures/customvision"
DEFAULT_MODEL = FIXTURE / "office-fruit-onnx12"
SOURCE_IMAGE = "images/pen.jpg"
SIZES = ((1280, 720), (1920, 1080))


def median_ms(
    ways: dict[str, Callable[[], object]], runs: int, rounds: int = 5
) -> dict[str, float]:
    """Return each way's median wall time in ms, measured in alternating blocks.

    Each way runs in short blocks, the blocks taken in turn for several rounds, so
    every way sees the same drift in the machine's speed, while runs within a block
    stay warm (onnxruntime's threads, caches) as they would in a steady stream.
    """
    samples: dict[str, list[float]] = {name: [] for name in ways}
    block = max(1, runs // rounds)
    for _ in range(rounds):
        for name, work in ways.items():
            work()
            for _ in range(block):
                started = time.perf_counter()
                work()
                samples[name].append(time.perf_counter() - started)
    return {name: statistics.median(times) * 1000.0 for name, times in samples.items()}


def jpeg_frame(source: Image.Image, size: tuple[int, int]) -> bytes:
    """Return the source image as a camera-like JPEG of the given size."""
    frame = io.BytesIO()
    source.resize(size, Image.Resampling.BICUBIC).save(frame, "JPEG", quality=90)
    return frame.getvalue()


def naive(
    session: ort.InferenceSession, model: CustomVisionModel, data: bytes
) -> object:
    """Score the way the export's sample scripts do: decode fully, then resize."""
    contract = model.contract
    image = Image.open(io.BytesIO(data)).convert("RGB")
    pixels = np.array(image.resize(contract.size or (512, 512)), dtype=np.float32)
    tensor = pixels.transpose(2, 0, 1)[np.newaxis]
    if contract.bgr:
        tensor = tensor[:, ::-1]
    feed = {contract.name: np.ascontiguousarray(tensor, dtype=contract.dtype)}
    return session.run(None, feed)


def measure(
    model: CustomVisionModel, session: ort.InferenceSession, data: bytes, runs: int
) -> dict[str, float]:
    """Return the median ms of each way of scoring one frame."""
    tensor = model.preprocess(images.decode(data, model.decode_fit).image)
    feed = {model.contract.name: tensor}
    ways: dict[str, Callable[[], object]] = {
        "bare": lambda: session.run(None, feed),
        "draft": lambda: images.decode(data, model.decode_fit),
        "module": lambda: model.score(data),
        "full": lambda: model.score(data, draft=False),
        "naive": lambda: naive(session, model, data),
    }
    return median_ms(ways, runs)


def main() -> int:
    """Run the benchmark and print one table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--runs", type=int, default=60)
    parser.add_argument("--image", type=Path, default=DEFAULT_MODEL / SOURCE_IMAGE)
    arguments = parser.parse_args()

    model = CustomVisionModel.load(arguments.model)
    raw_model = arguments.model / "model.onnx" if arguments.model.is_dir() else None
    session = ort.InferenceSession(
        str(raw_model or arguments.model), providers=["CPUExecutionProvider"]
    )
    source = Image.open(arguments.image).convert("RGB")
    identity = model.identity
    print(f"model: {identity.flavor.description}, sha256 {identity.sha256[:12]}")
    print(f"onnxruntime {ort.__version__}, {arguments.runs} runs each, median ms\n")

    header = (
        f"{'frame':>10} {'bare run':>9} {'draft dec':>9} {'module':>8} "
        f"{'mod full':>9} {'naive':>8} {'mod/(dec+run)':>14} {'naive/mod':>10}"
    )
    print(header)
    for size in SIZES:
        times = measure(model, session, jpeg_frame(source, size), arguments.runs)
        print(
            f"{size[0]}x{size[1]:<5} {times['bare']:9.2f} {times['draft']:9.2f} "
            f"{times['module']:8.2f} {times['full']:9.2f} {times['naive']:8.2f} "
            f"{times['module'] / (times['draft'] + times['bare']):14.2f} "
            f"{times['naive'] / times['module']:10.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
