"""Build synthetic Custom Vision ONNX exports whose outputs the tests choose."""

import io
from collections.abc import Sequence

import numpy as np
import onnx
from onnx import NodeProto, TensorProto, ValueInfoProto, helper, numpy_helper
from PIL import Image

IR_VERSION = 8
OPSET = 13
GRID_STRIDE_PX = 32

_ZERO = "zero_per_image"


def compact_classifier(
    probabilities: Sequence[float],
    *,
    size: int = 224,
    input_name: str = "data",
    output_name: str = "model_output",
    batch: int | None = None,
    float16: bool = False,
    metadata: dict[str, str] | None = None,
) -> bytes:
    """Build a compact classifier answering `probabilities` for every image."""
    values = np.asarray(probabilities, np.float32).reshape(1, -1)
    image, nodes = _image_as_float32(input_name, float16)
    nodes += _zero_per_image(image)
    nodes += _pinned_output(output_name, values, float16)

    inputs = [_image_input(input_name, _batch_dim(batch), size, size, float16)]
    outputs = [
        _float_output(output_name, [_batch_dim(batch), values.shape[1]], float16)
    ]
    return _serialize(nodes, inputs, outputs, metadata)


def probe_classifier(
    *,
    size: int = 224,
    input_name: str = "data",
    output_name: str = "model_output",
    batch: int | None = None,
    float16: bool = False,
    metadata: dict[str, str] | None = None,
) -> bytes:
    """Build a 3-label classifier answering each input channel's mean divided by 255."""
    image, nodes = _image_as_float32(input_name, float16)
    nodes += [
        helper.make_node("ReduceMean", [image], ["means"], axes=[2, 3], keepdims=0),
        _constant("full_scale", np.array(255, np.float32)),
        helper.make_node("Div", ["means", "full_scale"], ["scaled"]),
        _emit("scaled", output_name, float16),
    ]

    inputs = [_image_input(input_name, _batch_dim(batch), size, size, float16)]
    outputs = [_float_output(output_name, [_batch_dim(batch), 3], float16)]
    return _serialize(nodes, inputs, outputs, metadata)


def legacy_classifier(
    labels: Sequence[str],
    probabilities: Sequence[float],
    *,
    multilabel: bool = False,
    opset: int = 7,
    metadata: dict[str, str] | None = None,
) -> bytes:
    """Build a 2018-2019 "ONNX 1.2" classifier with `classLabel` and a `loss` map."""
    if len(labels) != len(probabilities):
        raise ValueError("one probability per label")
    logits = _logits(np.asarray(probabilities, np.float64), multilabel)
    nodes = _zero_per_image("data")
    nodes += [
        *_pinned_output("logits", logits.reshape(1, -1), float16=False),
        helper.make_node("Sigmoid" if multilabel else "Softmax", ["logits"], ["probs"]),
        helper.make_node("ArgMax", ["probs"], ["label_id"], axis=1, keepdims=1),
        _constant("labels", np.array(labels, dtype=object)),
        # Like the real exports, this answers shape (1, N) for a batch of N images.
        helper.make_node(
            "ArrayFeatureExtractor",
            ["labels", "label_id"],
            ["classLabel"],
            domain="ai.onnx.ml",
        ),
        helper.make_node(
            "ZipMap",
            ["probs"],
            ["loss"],
            domain="ai.onnx.ml",
            classlabels_strings=labels,
        ),
    ]

    outputs = [
        helper.make_tensor_value_info("classLabel", TensorProto.STRING, ["None", 1]),
        _label_map_output("loss"),
    ]
    inputs = [_image_input("data", "None", 227, 227, float16=False)]
    opsets = [helper.make_opsetid("", opset), helper.make_opsetid("ai.onnx.ml", 1)]
    # IR 3 is what the real exports carry, and onnxruntime still loads it.
    return _serialize(nodes, inputs, outputs, metadata, opsets=opsets, ir_version=3)


def opset1_classifier() -> bytes:
    """Build a 2018 "ONNX 1.0" WinMLTools export, which onnxruntime refuses."""
    ones, zeros = np.ones(3, np.float32), np.zeros(3, np.float32)
    params = {"scale": ones, "bias": zeros, "mean": zeros, "var": ones}
    # IR 3 wants every initializer listed among the graph inputs too.
    inputs = [_image_input("data", "None", 227, 227, float16=False)]
    inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, [3]) for n in params]
    nodes = [
        helper.make_node(
            "BatchNormalization",
            ["data", *params],
            ["normalized"],
            name="batchnorm",
            consumed_inputs=[0, 0, 0, 1, 1],
            epsilon=1e-5,
            is_test=1,
        ),
        helper.make_node("GlobalAveragePool", ["normalized"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("Softmax", ["flat"], ["loss"]),
    ]
    graph = helper.make_graph(
        nodes,
        "squeezenet",
        inputs,
        [helper.make_tensor_value_info("loss", TensorProto.FLOAT, ["None", 3])],
        initializer=[numpy_helper.from_array(v, n) for n, v in params.items()],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 1)],
        ir_version=3,
        producer_name="WinMLTools",
        producer_version="0.1",
    )
    return model.SerializeToString()


def grid_detector(
    grid: np.ndarray,
    *,
    input_size: int | None = 416,
    float16: bool = False,
    metadata: dict[str, str] | None = None,
) -> bytes:
    """Build a compact YOLOv2-style detector answering `grid` as `model_outputs0`."""
    grid = np.asarray(grid, np.float32)
    image, nodes = _image_as_float32("data", float16)
    if input_size is None:
        return _dynamic_grid_detector(grid[0, :, 0, 0], image, nodes, float16, metadata)

    cells = input_size // GRID_STRIDE_PX
    if grid.ndim != 4 or grid.shape[0] != 1 or grid.shape[2:] != (cells, cells):
        raise ValueError(f"grid must be [1, K, {cells}, {cells}], not {grid.shape}")
    nodes += _zero_per_image(image)
    nodes += _pinned_output("model_outputs0", grid, float16)

    inputs = [_image_input("data", 1, input_size, input_size, float16)]
    outputs = [_float_output("model_outputs0", list(grid.shape), float16)]
    return _serialize(nodes, inputs, outputs, metadata)


def s1_detector(
    boxes: Sequence[Sequence[float]],
    scores: Sequence[float],
    classes: Sequence[int],
    *,
    float16: bool = False,
    metadata: dict[str, str] | None = None,
) -> bytes:
    """Build an [S1] detector answering the given boxes, scores and classes."""
    count = len(scores)
    if not len(boxes) == len(classes) == count:
        raise ValueError("boxes, scores and classes must have the same length")
    image, nodes = _image_as_float32("image_tensor", float16)
    nodes += _zero_per_image(image)
    nodes += _pinned_output(
        "detected_boxes", np.asarray(boxes, np.float32).reshape(1, count, 4), float16
    )
    nodes += _pinned_output(
        "detected_scores", np.asarray(scores, np.float32).reshape(1, count), float16
    )
    nodes += _pinned_output(
        "detected_classes", np.asarray(classes, np.int64).reshape(1, count), float16
    )

    inputs = [_image_input("image_tensor", 1, 320, 320, float16)]
    outputs = [
        _float_output("detected_boxes", [1, count, 4], float16),
        _float_output("detected_scores", [1, count], float16),
        helper.make_tensor_value_info(
            "detected_classes", TensorProto.INT64, [1, count]
        ),
    ]
    return _serialize(nodes, inputs, outputs, metadata)


def not_custom_vision() -> bytes:
    """Build a valid ONNX model that no Custom Vision flavor resembles."""
    nodes = [helper.make_node("Relu", ["x"], ["y"])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 10])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])]
    return _serialize(nodes, inputs, outputs, None)


def solid_image(
    rgb: tuple[int, int, int],
    size: tuple[int, int] = (64, 48),
    mode: str = "RGB",
    fmt: str = "PNG",
) -> bytes:
    """Encode an image of one colour, `size` being (width, height)."""
    buffer = io.BytesIO()
    Image.new("RGB", size, rgb).convert(mode).save(buffer, format=fmt)
    return buffer.getvalue()


def _dynamic_grid_detector(
    cell: np.ndarray,
    image: str,
    nodes: list[NodeProto],
    float16: bool,
    metadata: dict[str, str] | None,
) -> bytes:
    """Build the grid detector whose grid follows the input's height and width."""
    kernel = np.zeros((len(cell), 3, GRID_STRIDE_PX, GRID_STRIDE_PX), np.float32)
    nodes += [
        _constant("kernel", kernel),
        _constant("cell", cell),
        helper.make_node(
            "Conv",
            [image, "kernel", "cell"],
            ["grid"],
            strides=[GRID_STRIDE_PX, GRID_STRIDE_PX],
        ),
        _emit("grid", "model_outputs0", float16),
    ]

    inputs = [_image_input("data", "N", "H", "W", float16)]
    shape = ["N", len(cell), "grid_H", "grid_W"]
    outputs = [_float_output("model_outputs0", shape, float16)]
    return _serialize(nodes, inputs, outputs, metadata)


def _logits(probabilities: np.ndarray, multilabel: bool) -> np.ndarray:
    """Return the logits that Sigmoid or Softmax turns back into `probabilities`."""
    if not multilabel and not np.isclose(probabilities.sum(), 1):
        raise ValueError("multiclass probabilities must sum to 1")
    # A probability of 0 or 1 becomes an infinite logit, which the activation undoes.
    with np.errstate(divide="ignore"):
        if multilabel:
            return np.log(probabilities) - np.log1p(-probabilities)
        return np.log(probabilities)


def _image_as_float32(name: str, float16: bool) -> tuple[str, list[NodeProto]]:
    """Return the float32 view of the image input and the nodes that make it."""
    if not float16:
        return name, []
    return "image_f32", [
        helper.make_node("Cast", [name], ["image_f32"], to=TensorProto.FLOAT)
    ]


def _zero_per_image(image: str) -> list[NodeProto]:
    """Make a [N, 1] zero computed from the image, so the runtime must read it."""
    return [
        helper.make_node("Flatten", [image], ["flat_image"], axis=1),
        helper.make_node("ReduceMean", ["flat_image"], ["mean"], axes=[1], keepdims=1),
        _constant("nought", np.array(0, np.float32)),
        helper.make_node("Mul", ["mean", "nought"], [_ZERO]),
    ]


def _pinned_output(name: str, values: np.ndarray, float16: bool) -> list[NodeProto]:
    """Make `name` equal `values` (leading dim broadcast per image) via the zero."""
    if values.dtype == np.int64:
        return [
            helper.make_node("Cast", [_ZERO], [f"{name}_zero"], to=TensorProto.INT64),
            _constant(f"{name}_value", values),
            helper.make_node("Add", [f"{name}_zero", f"{name}_value"], [name]),
        ]
    return [
        _constant(f"{name}_value", values.astype(np.float32)),
        helper.make_node("Add", [_ZERO, f"{name}_value"], [f"{name}_sum"]),
        _emit(f"{name}_sum", name, float16),
    ]


def _emit(source: str, name: str, float16: bool) -> NodeProto:
    """Publish a float32 tensor as output `name`, in float16 for that flavor."""
    if float16:
        return helper.make_node("Cast", [source], [name], to=TensorProto.FLOAT16)
    return helper.make_node("Identity", [source], [name])


def _constant(name: str, values: np.ndarray) -> NodeProto:
    """Make a Constant node holding `values`."""
    # Constant nodes rather than initializers, which IR 3 would want listed as inputs.
    tensor = numpy_helper.from_array(values, name)
    return helper.make_node("Constant", [], [name], value=tensor)


def _batch_dim(batch: int | None) -> int | str:
    """Return a fixed batch size, or the symbolic dimension "N"."""
    return "N" if batch is None else batch


def _image_input(
    name: str, batch: int | str, height: int | str, width: int | str, float16: bool
) -> ValueInfoProto:
    """Declare an NCHW image input."""
    elem = TensorProto.FLOAT16 if float16 else TensorProto.FLOAT
    return helper.make_tensor_value_info(name, elem, [batch, 3, height, width])


def _float_output(name: str, shape: list[int | str], float16: bool) -> ValueInfoProto:
    """Declare a float output, float16 for that flavor."""
    elem = TensorProto.FLOAT16 if float16 else TensorProto.FLOAT
    return helper.make_tensor_value_info(name, elem, shape)


def _label_map_output(name: str) -> ValueInfoProto:
    """Declare a ZipMap output: one {label: probability} map per image."""
    probability = helper.make_tensor_type_proto(TensorProto.FLOAT, None)
    label_map = helper.make_map_type_proto(TensorProto.STRING, probability)
    return helper.make_value_info(name, helper.make_sequence_type_proto(label_map))


def _serialize(
    nodes: list[NodeProto],
    inputs: list[ValueInfoProto],
    outputs: list[ValueInfoProto],
    metadata: dict[str, str] | None,
    *,
    opsets: list[onnx.OperatorSetIdProto] | None = None,
    ir_version: int = IR_VERSION,
) -> bytes:
    """Wrap the graph in a checked model carrying `metadata` and serialize it."""
    graph = helper.make_graph(nodes, "customvision", inputs, outputs)
    model = helper.make_model(
        graph,
        opset_imports=opsets or [helper.make_opsetid("", OPSET)],
        ir_version=ir_version,
        producer_name="tests.cvmodels",
    )
    helper.set_model_props(model, metadata or {})
    onnx.checker.check_model(model)
    return model.SerializeToString()
