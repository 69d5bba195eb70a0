"""Cutting LoRA side paths out of a serialized ONNX model, without the ``onnx`` package.

The device needs ONNX Runtime only, so the runtime edits the few fields this takes on the protobuf wire
format itself (https://protobuf.dev/programming-guides/encoding/): a node's ``input`` / ``output`` /
``name``, a value info's and a tensor's ``name``. Every other field is copied as the bytes it was.
A bypassed node's output is replaced by its first input wherever it is read; then every node no graph
output depends on goes, and so do the inputs and initializers nothing reads any more.
"""

from __future__ import annotations

from dataclasses import dataclass

# field numbers (onnx.proto)
MODEL_GRAPH = 7
GRAPH_NODE, GRAPH_INITIALIZER, GRAPH_INPUT, GRAPH_OUTPUT = 1, 5, 11, 12
NODE_INPUT, NODE_OUTPUT, NODE_NAME = 1, 2, 3
VALUE_INFO_NAME, TENSOR_NAME = 1, 8
VARINT, FIXED64, LENGTH, FIXED32 = 0, 1, 2, 5


@dataclass
class _Field:
    number: int
    wire: int
    raw: bytes  # the whole field: its key and its value, as encoded
    value: bytes | int  # a length-delimited field's payload, or a varint / fixed value's integer


def _varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if at >= len(data) or shift > 63:
            raise ValueError("truncated or overlong varint")
        byte = data[at]
        value |= (byte & 0x7F) << shift
        at += 1
        if not byte & 0x80:
            return value, at
        shift += 7


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _fields(data: bytes) -> list[_Field]:
    fields, at = [], 0
    while at < len(data):
        start = at
        key, at = _varint(data, at)
        number, wire = key >> 3, key & 7
        if wire == VARINT:
            value, at = _varint(data, at)
        elif wire == LENGTH:
            size, at = _varint(data, at)
            if at + size > len(data):
                raise ValueError("a length-delimited field runs past its message")
            value, at = data[at : at + size], at + size
        elif wire in (FIXED64, FIXED32):
            width = 8 if wire == FIXED64 else 4
            value, at = int.from_bytes(data[at : at + width], "little"), at + width
        else:
            raise ValueError(f"wire type {wire} is not used by ONNX")
        fields.append(_Field(number, wire, data[start:at], value))
    return fields


def _length_field(number: int, payload: bytes) -> bytes:
    return _encode_varint(number << 3 | LENGTH) + _encode_varint(len(payload)) + payload


def _strings(fields: list[_Field], number: int) -> list[str]:
    return [f.value.decode() for f in fields if f.number == number]


def _name(message: bytes, number: int) -> str:
    return next(iter(_strings(_fields(message), number)), "")


def _node_name(node: list[_Field]) -> str:
    return next(iter(_strings(node, NODE_NAME)), "")


def node_names(model: bytes) -> list[str]:
    """The names of the graph's nodes, in order."""
    graph = next(f for f in _fields(model) if f.number == MODEL_GRAPH)
    return [_node_name(_fields(f.value)) for f in _fields(graph.value) if f.number == GRAPH_NODE]


def prune_nodes(model: bytes, bypass: set[str]) -> bytes:
    """``model`` with the nodes named in ``bypass`` replaced by their first input, then without every
    node, input and initializer the graph's outputs no longer depend on."""
    top = _fields(model)
    graph = next(f for f in top if f.number == MODEL_GRAPH)
    parts = _fields(graph.value)
    nodes = [(f, _fields(f.value)) for f in parts if f.number == GRAPH_NODE]
    replaced = {
        _strings(node, NODE_OUTPUT)[0]: _strings(node, NODE_INPUT)[0]
        for _, node in nodes
        if _node_name(node) in bypass
    }

    def source(name: str) -> str:
        while name in replaced:
            name = replaced[name]
        return name

    kept = [(f, node) for f, node in nodes if _node_name(node) not in bypass]
    needed = {_name(f.value, VALUE_INFO_NAME) for f in parts if f.number == GRAPH_OUTPUT}
    live: set[int] = set()
    for i in range(len(kept) - 1, -1, -1):  # nodes are topologically sorted: walk back from the outputs
        node = kept[i][1]
        if any(o in needed for o in _strings(node, NODE_OUTPUT)):
            live.add(i)
            needed.update(source(x) for x in _strings(node, NODE_INPUT) if x)
    rewritten = {}
    for i in live:
        field, node = kept[i]
        if any(source(x) != x for x in _strings(node, NODE_INPUT)):
            payload = b"".join(
                _length_field(NODE_INPUT, source(f.value.decode()).encode())
                if f.number == NODE_INPUT
                else f.raw
                for f in node
            )
            rewritten[id(field)] = _length_field(GRAPH_NODE, payload)
        else:
            rewritten[id(field)] = field.raw
    out = bytearray()
    for f in parts:
        if f.number == GRAPH_NODE:
            out += rewritten.get(id(f), b"")
        elif f.number == GRAPH_INPUT:
            out += f.raw if _name(f.value, VALUE_INFO_NAME) in needed else b""
        elif f.number == GRAPH_INITIALIZER:
            out += f.raw if _name(f.value, TENSOR_NAME) in needed else b""
        else:
            out += f.raw
    return b"".join(_length_field(MODEL_GRAPH, bytes(out)) if f is graph else f.raw for f in top)
