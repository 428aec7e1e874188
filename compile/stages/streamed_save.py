"""Write ONNX models one initializer at a time (peak memory, issue 24 item 6).

``onnx.save`` serializes the whole model into one buffer and copies that into a bytes object: three
copies of the weights at its peak (ViT-L-14's image tower: 3.6 GB on top of the model). The file is
written here in protobuf's wire format by hand, in the layout readers expect (the model's own fields
first, ``ir_version`` leading, then one ``graph`` field): the graph's length is known up front from
each tensor's ``ByteSize``, so its initializers are serialized one at a time while only the model and
one tensor's bytes are held. :func:`without_weights` is the copy that type inference and the checker
get instead of the model (they serialize it twice more).
"""

from __future__ import annotations

from pathlib import Path

_GRAPH_TAG = bytes([7 << 3 | 2])  # ModelProto.graph, length-delimited
_INITIALIZER_TAG = bytes([5 << 3 | 2])  # GraphProto.initializer, length-delimited


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def save_streamed(model, dst: Path) -> None:
    """Write the ``onnx.ModelProto`` ``model`` to ``dst`` as one file; empties its initializers."""
    import onnx

    head, rest = onnx.ModelProto(), onnx.GraphProto()
    for field, value in model.ListFields():
        if field.name != "graph":
            _copy_field(head, field, value)
    for field, value in model.graph.ListFields():
        if field.name != "initializer":
            _copy_field(rest, field, value)
    head_bytes, rest_bytes = head.SerializeToString(), rest.SerializeToString()
    sizes = [tensor.ByteSize() for tensor in model.graph.initializer]
    graph_size = len(rest_bytes) + sum(len(_INITIALIZER_TAG) + len(_varint(n)) + n for n in sizes)
    if len(head_bytes) + len(_GRAPH_TAG) + len(_varint(graph_size)) + graph_size > onnx.checker.MAXIMUM_PROTOBUF:
        # as onnx.save refuses: no protobuf parser reads it
        raise ValueError(f"The proto size is larger than the 2 GB limit ({Path(dst).name}): its weights would need "
                         "external data")
    with open(dst, "wb") as f:
        f.write(head_bytes + _GRAPH_TAG + _varint(graph_size))
        for tensor, size in zip(model.graph.initializer, sizes):
            f.write(_INITIALIZER_TAG + _varint(size))
            f.write(tensor.SerializeToString())
        f.write(rest_bytes)
    model.graph.ClearField("initializer")


def _copy_field(message, field, value) -> None:
    repeated = field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED
    if repeated:
        getattr(message, field.name).extend(value)
    elif field.type == field.TYPE_MESSAGE:
        getattr(message, field.name).CopyFrom(value)
    else:
        setattr(message, field.name, value)


def save_ir(model, dst: Path) -> None:
    """``onnx_ir.save(model, dst)`` for a model with its weights inside the file, streamed."""
    from onnx_ir import serde

    save_streamed(serde.serialize_model(model), dst)


def without_weights(model, small: int = 4096):
    """A copy of ``model`` for type inference: initializers over ``small`` bytes become typed graph
    inputs, so that inference does not copy the weights (four times: to C++ and back)."""
    import onnx
    from onnx import helper

    light = onnx.ModelProto()
    for field, value in model.ListFields():
        if field.name != "graph":
            _copy_field(light, field, value)
    for field, value in model.graph.ListFields():
        if field.name != "initializer":
            _copy_field(light.graph, field, value)
            continue
        for tensor in value:
            if tensor.ByteSize() <= small:
                light.graph.initializer.add().CopyFrom(tensor)
            else:
                light.graph.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims))
    return light
