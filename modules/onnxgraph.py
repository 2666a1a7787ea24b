"""Read the few graph facts the module needs from ONNX bytes, without the onnx package.

onnxruntime exposes a model's inputs, outputs and metadata but not its nodes, and
the module needs three facts from them: the operator sets (to name the 2018 exports
onnxruntime cannot load), the label order of a ZipMap node (onnxruntime returns its
map sorted by key), and the activation that ends a classifier (Softmax for
multiclass, Sigmoid for multilabel). They come from the protobuf wire format
directly; tensors are skipped by their length.
"""

from collections.abc import Iterator
from dataclasses import dataclass

# Field numbers from onnx.proto (ModelProto, GraphProto, NodeProto, AttributeProto).
_MODEL_OPSET_IMPORT = 8
_MODEL_PRODUCER_NAME = 2
_MODEL_GRAPH = 7
_OPSET_DOMAIN = 1
_OPSET_VERSION = 2
_GRAPH_NODE = 1
_NODE_OP_TYPE = 4
_NODE_ATTRIBUTE = 5
_ATTRIBUTE_NAME = 1
_ATTRIBUTE_STRINGS = 9

_VARINT = 0
_FIXED64 = 1
_LENGTH_DELIMITED = 2
_FIXED32 = 5

ACTIVATIONS = frozenset({"Softmax", "Sigmoid"})


class GraphFormatError(ValueError):
    """The bytes are not a well-formed ONNX protobuf."""


@dataclass(frozen=True)
class GraphFacts:
    """What the module reads from an ONNX graph besides its signature."""

    producer: str
    opsets: dict[str, int]
    zipmap_labels: tuple[str, ...] | None
    last_activation: str | None

    @property
    def default_opset(self) -> int | None:
        """Return the version of the default (ai.onnx) operator set."""
        return self.opsets.get("", self.opsets.get("ai.onnx"))


def read_graph_facts(data: bytes) -> GraphFacts:
    """Return the operator sets, ZipMap labels and final activation of a model."""
    view = memoryview(data)
    producer = ""
    opsets: dict[str, int] = {}
    graph: memoryview | None = None
    for number, value in _fields(view):
        if number == _MODEL_PRODUCER_NAME:
            producer = _text(value)
        elif number == _MODEL_OPSET_IMPORT:
            domain, version = _opset(value)
            opsets[domain] = version
        elif number == _MODEL_GRAPH:
            graph = value
    if graph is None:
        raise GraphFormatError("the file has no graph")

    labels: tuple[str, ...] | None = None
    activation: str | None = None
    for op_type, attributes in _nodes(graph):
        if op_type in ACTIVATIONS:
            activation = op_type
        elif op_type == "ZipMap":
            labels = attributes.get("classlabels_strings") or labels
    return GraphFacts(producer, opsets, labels, activation)


def _nodes(graph: memoryview) -> Iterator[tuple[str, dict[str, tuple[str, ...]]]]:
    for number, node in _fields(graph):
        if number != _GRAPH_NODE:
            continue
        op_type = ""
        attributes: dict[str, tuple[str, ...]] = {}
        for field, value in _fields(node):
            if field == _NODE_OP_TYPE:
                op_type = _text(value)
            elif field == _NODE_ATTRIBUTE:
                name, strings = _string_attribute(value)
                attributes[name] = strings
        yield op_type, attributes


def _string_attribute(attribute: memoryview) -> tuple[str, tuple[str, ...]]:
    name = ""
    strings: list[str] = []
    for number, value in _fields(attribute):
        if number == _ATTRIBUTE_NAME:
            name = _text(value)
        elif number == _ATTRIBUTE_STRINGS:
            strings.append(_text(value))
    return name, tuple(strings)


def _opset(entry: memoryview) -> tuple[str, int]:
    domain, version = "", 0
    for number, value in _fields(entry):
        if number == _OPSET_DOMAIN:
            domain = _text(value)
        elif number == _OPSET_VERSION and isinstance(value, int):
            version = value
    return domain, version


def _text(value: memoryview | int) -> str:
    if isinstance(value, int):
        raise GraphFormatError("a string field holds a number")
    return bytes(value).decode("utf-8", errors="replace")


def _fields(view: memoryview) -> Iterator[tuple[int, memoryview | int]]:
    """Yield (field number, value) for each field of one protobuf message."""
    position, end = 0, len(view)
    while position < end:
        key, position = _varint(view, position)
        number, wire_type = key >> 3, key & 7
        if wire_type == _VARINT:
            value, position = _varint(view, position)
            yield number, value
        elif wire_type == _LENGTH_DELIMITED:
            length, position = _varint(view, position)
            if position + length > end:
                raise GraphFormatError("a field runs past the end of its message")
            yield number, view[position : position + length]
            position += length
        elif wire_type in (_FIXED64, _FIXED32):
            position += 8 if wire_type == _FIXED64 else 4
        else:
            raise GraphFormatError(f"unknown protobuf wire type {wire_type}")


def _varint(view: memoryview, position: int) -> tuple[int, int]:
    result, shift = 0, 0
    while True:
        if position >= len(view) or shift > 63:
            raise GraphFormatError("a number runs past the end of the data")
        byte = view[position]
        position += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, position
        shift += 7
