"""Write ONNX models one initializer at a time (peak memory, issue 24 item 6).

``onnx.save`` serializes the whole model into one buffer and copies that into a bytes object: three
copies of the weights at its peak (ViT-L-14's image tower: 3.6 GB on top of the model). Protobuf
merges concatenated messages (repeated fields append), so a file written as one ModelProto per
initializer followed by the rest of the model parses to the same model, initializers in order,
while only the model and one tensor's bytes are held. :func:`without_weights` is the copy that type
inference and the checker get instead of the model (they serialize it twice more).
"""

from __future__ import annotations

from pathlib import Path


def save_streamed(model, dst: Path) -> None:
    """Write the ``onnx.ModelProto`` ``model`` to ``dst`` as one file; empties its initializers."""
    import onnx

    written = 0
    with open(dst, "wb") as f:
        for tensor in model.graph.initializer:
            piece = onnx.ModelProto()
            piece.graph.initializer.add().CopyFrom(tensor)
            written += f.write(piece.SerializeToString())
            if written > onnx.checker.MAXIMUM_PROTOBUF:  # as onnx.save refuses: no protobuf parser reads it
                break
        else:
            model.graph.ClearField("initializer")
            f.write(model.SerializeToString())
            return
    Path(dst).unlink()
    raise ValueError(f"The proto size is larger than the 2 GB limit ({Path(dst).name}): its weights would need "
                     "external data")


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
            getattr(light, field.name).extend(value) if field.label == field.LABEL_REPEATED else \
                (getattr(light, field.name).CopyFrom(value) if field.type == field.TYPE_MESSAGE
                 else setattr(light, field.name, value))
    for field, value in model.graph.ListFields():
        if field.name == "initializer":
            for tensor in value:
                if tensor.ByteSize() <= small:
                    light.graph.initializer.add().CopyFrom(tensor)
                else:
                    light.graph.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims))
        elif field.label == field.LABEL_REPEATED:
            getattr(light.graph, field.name).extend(value)
        elif field.type == field.TYPE_MESSAGE:
            getattr(light.graph, field.name).CopyFrom(value)
        else:
            setattr(light.graph, field.name, value)
    return light
