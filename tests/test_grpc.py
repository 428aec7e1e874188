"""clipfold serve over gRPC (the Open Inference Protocol's ``inference.GRPCInferenceService``),
driven by the stock ``tritonclient.grpc`` clients (sync and aio) and by its generated stub: health,
metadata, config, infer with raw and typed contents, BYTES images and text, streaming, batches
shared with HTTP, status codes of bad input, a malformed-message fuzz and draining on SIGTERM.

Expectations come from an :class:`Engine` opened on the same bundle in this process (the answers
must be the engine's, byte for byte where the engine is deterministic)."""

from __future__ import annotations

import asyncio
import io
import random
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from clipfold.compile.tiny import data
from clipfold.errors import BatcherClosedError, ConfigError, QueueFullError
from clipfold.runtime import Engine
from clipfold.runtime.preprocess import preprocess

grpc = pytest.importorskip("grpc")
grpcclient = pytest.importorskip("tritonclient.grpc")
pytest.importorskip("uvicorn")
from tritonclient.grpc import aio as grpcaio  # noqa: E402
from tritonclient.grpc import service_pb2 as pb  # noqa: E402
from tritonclient.grpc import service_pb2_grpc as pb_grpc  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from clipfold.runtime.serve.app import ClipfoldServer, ServeConfig, open_models  # noqa: E402
from clipfold.runtime.serve.grpc_service import check_port, status_of  # noqa: E402
from clipfold.runtime.serve.limits import PayloadTooLarge, RequestTimeout  # noqa: E402

from .live_server import LiveServer, free_port, hold_engine  # noqa: E402

OUTPUTS = ("scores", "indices", "embedding")


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _samples(n: int, seed: int):
    return [s.image for s in data.generate(n, seed=seed)]


@pytest.fixture(scope="module")
def bundle(tiny_text_bundle):
    return tiny_text_bundle.path  # the session's tiny model with its text tower (conftest.py); only read here


@pytest.fixture(scope="module")
def served(bundle):
    engines, _ = open_models([bundle])
    # A batch starts at 8 rows or after 20 ms: concurrent requests share engine calls.
    config = ServeConfig(max_batch=8, max_delay_ms=20, preferred_batch=8, max_body_bytes=1 << 20,
                         max_image_pixels=100_000, grpc_port=free_port())
    live = LiveServer(ClipfoldServer(engines, config))
    yield live, f"127.0.0.1:{config.grpc_port}"
    live.stop()


@pytest.fixture(scope="module")
def reference(bundle):
    return Engine.open(bundle)


@pytest.fixture(scope="module")
def stub(served):
    with grpc.insecure_channel(served[1]) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel), channel


def _pixels_request(pixels: np.ndarray, model: str = "tiny", **kw) -> pb.ModelInferRequest:
    tensor = pb.ModelInferRequest.InferInputTensor(name="pixels", datatype="UINT8", shape=list(pixels.shape))
    return pb.ModelInferRequest(model_name=model, inputs=[tensor], raw_input_contents=[pixels.tobytes()], **kw)


def _check(result_numpy, want: dict, names=OUTPUTS) -> None:
    for name in names:
        if name == "indices":
            np.testing.assert_array_equal(result_numpy(name), want[name])
        else:
            np.testing.assert_allclose(result_numpy(name), want[name], rtol=1e-6, atol=1e-7)


# --- the stock sync client ---------------------------------------------------------------------
def test_tritonclient_grpc_health_metadata_and_config(served):
    live, address = served
    client = grpcclient.InferenceServerClient(address)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("tiny") and client.is_model_ready("tiny-text") and client.is_model_ready("tiny", "1")
    assert not client.is_model_ready("nope") and not client.is_model_ready("tiny", "7")
    assert client.get_server_metadata().name == "clipfold"

    meta = client.get_model_metadata("tiny", as_json=True)
    assert meta["versions"] == ["1"] and meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "pixels", "datatype": "UINT8", "shape": ["-1", "3", "64", "64"]},
                              {"name": "image", "datatype": "BYTES", "shape": ["-1"]}]
    assert meta["outputs"] == [{"name": "scores", "datatype": "FP32", "shape": ["-1", "5"]},
                               {"name": "indices", "datatype": "INT64", "shape": ["-1", "5"]},
                               {"name": "embedding", "datatype": "FP32", "shape": ["-1", "64"]}]
    text = client.get_model_metadata("tiny-text", as_json=True)
    assert text["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": ["-1"]}]

    config = client.get_model_config("tiny", as_json=True)["config"]
    assert config["max_batch_size"] == 8
    assert config["dynamic_batching"]["preferred_batch_size"] == [8]
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == "20000"
    assert [(i["name"], i["data_type"], i["dims"]) for i in config["input"]] == \
        [("pixels", "TYPE_UINT8", ["3", "64", "64"]), ("image", "TYPE_STRING", ["1"])]
    assert {m["name"]: m["state"] for m in client.get_model_repository_index(as_json=True)["models"]} == \
        {"tiny": "READY", "tiny-text": "READY"}
    with pytest.raises(InferenceServerException, match="unknown model 'nope'") as err:
        client.get_model_metadata("nope")
    assert err.value.status() == "StatusCode.NOT_FOUND"


def test_tritonclient_grpc_infer_pixels_images_and_text(served, reference):
    client = grpcclient.InferenceServerClient(served[1])
    images = _samples(3, 5)
    pixels = preprocess(images, reference.manifest.preprocess)
    want = reference.run_pixels(pixels)

    tensor = grpcclient.InferInput("pixels", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels)
    result = client.infer("tiny", [tensor], request_id="r-1")
    assert result.get_response().id == "r-1" and result.get_response().model_version == "1"
    _check(result.as_numpy, want)
    only = client.infer("tiny", [tensor], outputs=[grpcclient.InferRequestedOutput("indices")])
    assert [o.name for o in only.get_response().outputs] == ["indices"]
    np.testing.assert_array_equal(only.as_numpy("indices"), want["indices"])

    # encoded image files as BYTES: decoded and preprocessed by the server
    encoded = grpcclient.InferInput("image", [3], "BYTES")
    encoded.set_data_from_numpy(np.array([_png(im) for im in images], dtype=object))
    _check(client.infer("tiny", [encoded]).as_numpy, want)

    texts = ["a red circle", "a photo of a blue star.", "naïve 🐈 " * 20]
    tensor = grpcclient.InferInput("text", [3], "BYTES")
    tensor.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object))
    result = client.infer("tiny-text", [tensor])
    expected = reference.embed_text(texts)
    np.testing.assert_allclose(result.as_numpy("embedding"), expected.embeddings, atol=1e-6)
    assert result.as_numpy("truncated").tolist() == [False, False, True]


def test_typed_contents_answer_like_raw_contents(stub, reference):
    stub = stub[0]
    pixels = preprocess(_samples(2, 17), reference.manifest.preprocess)
    tensor = pb.ModelInferRequest.InferInputTensor(name="pixels", datatype="UINT8", shape=list(pixels.shape))
    tensor.contents.uint_contents.extend(pixels.ravel().tolist())
    typed = stub.ModelInfer(pb.ModelInferRequest(model_name="tiny", id="typed", inputs=[tensor]))
    raw = stub.ModelInfer(_pixels_request(pixels, id="raw"))
    assert typed.id == "typed" and typed.raw_output_contents == raw.raw_output_contents
    _check(grpcclient.InferResult(typed).as_numpy, reference.run_pixels(pixels))

    text = pb.ModelInferRequest.InferInputTensor(name="text", datatype="BYTES", shape=[2])
    text.contents.bytes_contents.extend([b"a green triangle", b"a yellow cross"])
    answer = grpcclient.InferResult(stub.ModelInfer(pb.ModelInferRequest(model_name="tiny-text", inputs=[text])))
    np.testing.assert_allclose(answer.as_numpy("embedding"),
                               reference.embed_text(["a green triangle", "a yellow cross"]).embeddings, atol=1e-6)


# --- the aio client: concurrency, shared batches, streaming ----------------------------------
def _batches(live) -> float:
    metric = live.server.metrics.batch.labels(model="tiny")
    return sum(bucket.get() for bucket in metric._buckets)


def test_aio_client_concurrent_requests_share_batches_with_http(served, reference):
    live, address = served
    import tritonclient.http as httpclient

    pixels = preprocess(_samples(16, 23), reference.manifest.preprocess)
    want = reference.run_pixels(pixels)
    http = httpclient.InferenceServerClient(f"127.0.0.1:{live.port}", concurrency=4)

    async def main():
        client = grpcaio.InferenceServerClient(address)
        try:
            assert await client.is_server_ready()

            async def one(i):
                tensor = grpcaio.InferInput("pixels", [1, 3, 64, 64], "UINT8")
                tensor.set_data_from_numpy(pixels[i:i + 1])
                return await client.infer("tiny", [tensor], request_id=str(i))
            return await asyncio.gather(*(one(i) for i in range(12)))
        finally:
            await client.close()

    def over_http(i):
        tensor = httpclient.InferInput("pixels", [1, 3, 64, 64], "UINT8")
        tensor.set_data_from_numpy(pixels[i:i + 1])
        return http.async_infer("tiny", [tensor])

    before = _batches(live)
    pending = [over_http(i) for i in range(12, 16)]  # HTTP rows queue beside the gRPC ones
    results = asyncio.run(main())
    http_results = [p.get_result() for p in pending]
    for i, result in enumerate(results):
        assert result.get_response().id == str(i)
        _check(result.as_numpy, {k: v[i:i + 1] for k, v in want.items()})
    for i, result in enumerate(http_results, start=12):
        np.testing.assert_array_equal(result.as_numpy("indices"), want["indices"][i:i + 1])
    # 16 one-row requests at once, over both protocols: far fewer engine calls than requests
    assert _batches(live) - before < 16


def test_aio_stream_infer_answers_each_request_and_survives_bad_ones(served, reference):
    address = served[1]
    pixels = preprocess(_samples(6, 29), reference.manifest.preprocess)
    want = reference.run_pixels(pixels)

    async def main():
        client = grpcaio.InferenceServerClient(address)

        async def requests():
            for i in range(6):
                tensor = grpcaio.InferInput("pixels", [1, 3, 64, 64], "UINT8")
                tensor.set_data_from_numpy(pixels[i:i + 1])
                yield {"model_name": "tiny", "inputs": [tensor], "request_id": f"ok-{i}"}
                if i % 2:  # a bad request between good ones
                    bad = grpcaio.InferInput("pixels", [1, 3, 32, 32], "UINT8")
                    bad.set_data_from_numpy(np.zeros((1, 3, 32, 32), np.uint8))
                    yield {"model_name": "tiny", "inputs": [bad], "request_id": f"bad-{i}"}
            yield {"model_name": "nope", "inputs": [tensor], "request_id": "unknown"}
        answers, errors = {}, []
        try:
            async for result, error in client.stream_infer(requests()):
                if error is not None:
                    errors.append(str(error))
                else:
                    answers[result.get_response().id] = result
        finally:
            await client.close()
        return answers, errors

    answers, errors = asyncio.run(main())
    assert sorted(answers) == [f"ok-{i}" for i in range(6)]
    for i in range(6):
        _check(answers[f"ok-{i}"].as_numpy, {k: v[i:i + 1] for k, v in want.items()})
    assert len(errors) == 4
    assert sum("INVALID_ARGUMENT" in e and "must have shape" in e for e in errors) == 3
    assert sum("NOT_FOUND" in e for e in errors) == 1


# --- status codes -----------------------------------------------------------------------------
def _tensor(name="pixels", datatype="UINT8", shape=(1, 3, 64, 64)):
    return pb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=list(shape))


ONE = bytes(3 * 64 * 64)
BAD = [  # (request, status code, message)
    (pb.ModelInferRequest(model_name="nope", inputs=[_tensor()], raw_input_contents=[ONE]), "NOT_FOUND", "unknown model"),
    (pb.ModelInferRequest(model_name="tiny", model_version="2", inputs=[_tensor()], raw_input_contents=[ONE]),
     "NOT_FOUND", "no version '2'"),
    (pb.ModelInferRequest(model_name="tiny"), "INVALID_ARGUMENT", "'inputs' is empty"),
    (pb.ModelInferRequest(model_name="tiny", inputs=[_tensor(datatype="FP32")], raw_input_contents=[ONE]),
     "INVALID_ARGUMENT", "must have datatype UINT8"),
    (pb.ModelInferRequest(model_name="tiny", inputs=[_tensor(shape=(1, 3, 64))], raw_input_contents=[ONE]),
     "INVALID_ARGUMENT", "must have shape"),
    (pb.ModelInferRequest(model_name="tiny", inputs=[_tensor(shape=(0, 3, 64, 64))], raw_input_contents=[b""]),
     "INVALID_ARGUMENT", "empty batch"),
    (pb.ModelInferRequest(model_name="tiny", inputs=[_tensor()], raw_input_contents=[ONE[:-1]]),
     "INVALID_ARGUMENT", "needs 12288 raw bytes"),
    (pb.ModelInferRequest(model_name="tiny", inputs=[_tensor(), _tensor()], raw_input_contents=[ONE, ONE]),
     "INVALID_ARGUMENT", "given twice"),
    (pb.ModelInferRequest(model_name="tiny", inputs=[_tensor()], raw_input_contents=[ONE, ONE]),
     "INVALID_ARGUMENT", "2 entries for 1 inputs"),
    (pb.ModelInferRequest(model_name="tiny", inputs=[_tensor()]), "INVALID_ARGUMENT", "needs 12288 values"),
    (pb.ModelInferRequest(model_name="tiny", inputs=[_tensor("image", "BYTES", (1,)), _tensor()],
                          raw_input_contents=[b"\x01\x00\x00\x00x", ONE]), "INVALID_ARGUMENT", "this model takes"),
    (pb.ModelInferRequest(model_name="tiny", inputs=[_tensor("image", "BYTES", (1,))],
                          raw_input_contents=[b"\x04\x00\x00\x00nope"]), "INVALID_ARGUMENT", "image 0"),
    (pb.ModelInferRequest(model_name="tiny", inputs=[_tensor("image", "BYTES", (2,))],
                          raw_input_contents=[b"\x09\x00\x00\x00x"]), "INVALID_ARGUMENT", "claims 9 bytes"),
    (pb.ModelInferRequest(model_name="tiny", inputs=[_tensor(shape=(9, 3, 64, 64))], raw_input_contents=[ONE * 9]),
     "INVALID_ARGUMENT", "at most 8"),
    (pb.ModelInferRequest(model_name="tiny", inputs=[_tensor()], raw_input_contents=[ONE],
                          outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="logits")]),
     "INVALID_ARGUMENT", "unknown output 'logits'"),
    (pb.ModelInferRequest(model_name="tiny-text", inputs=[_tensor("text", "BYTES", (1,))],
                          raw_input_contents=[b"\x02\x00\x00\x00\xff\xfe"]), "INVALID_ARGUMENT", "UTF-8"),
    (pb.ModelInferRequest(model_name="tiny-text", inputs=[_tensor("text", "BYTES", (1,))],
                          raw_input_contents=[(40_000).to_bytes(4, "little") + b"a" * 40_000]),
     "RESOURCE_EXHAUSTED", "40,000 bytes"),  # over the server's bytes per text
]


@pytest.mark.parametrize("request_, code, message", BAD, ids=[f"{i}-{c}" for i, (_, c, _) in enumerate(BAD)])
def test_bad_requests_get_their_status_code(stub, request_, code, message):
    with pytest.raises(grpc.RpcError) as err:
        stub[0].ModelInfer(request_)
    assert err.value.code().name == code and message in err.value.details(), err.value.details()


def test_limits_answer_resource_exhausted_and_the_server_serves_on(stub, reference):
    stub, channel = stub
    with pytest.raises(grpc.RpcError) as err:  # over max_body_bytes (1 MiB): grpc's own message limit
        stub.ModelInfer(_pixels_request(np.zeros((1, 3, 640, 640), np.uint8)))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    from PIL import Image

    big = _png(Image.new("RGB", (400, 400)))  # 160,000 pixels > max_image_pixels 100,000
    request = pb.ModelInferRequest(model_name="tiny", inputs=[_tensor("image", "BYTES", (1,))])
    request.inputs[0].contents.bytes_contents.append(big)
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(request)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "pixels" in err.value.details()
    # a message that is not a ModelInferRequest at all: INVALID_ARGUMENT, not grpc's INTERNAL
    raw = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
    with pytest.raises(grpc.RpcError) as err:
        raw(b"\xff\xff\xff\xff\x0f")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "cannot be parsed" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:  # not implemented here
        stub.ModelStatistics(pb.ModelStatisticsRequest(name="tiny"))
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    pixels = preprocess(_samples(1, 3), reference.manifest.preprocess)
    answer = grpcclient.InferResult(stub.ModelInfer(_pixels_request(pixels)))
    np.testing.assert_array_equal(answer.as_numpy("indices"), reference.run_pixels(pixels)["indices"])


def test_full_queue_answers_resource_exhausted(bundle, reference):
    engines, _ = open_models([bundle])
    config = ServeConfig(max_batch=1, max_queue=1, max_delay_ms=0, grpc_port=free_port())
    server = ClipfoldServer(engines, config)
    gate, entered = hold_engine(server)
    batcher = server.models["tiny"].batcher
    live = LiveServer(server)
    try:
        pixels = preprocess(_samples(1, 3), reference.manifest.preprocess)
        with grpc.insecure_channel(f"127.0.0.1:{config.grpc_port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            first = stub.ModelInfer.future(_pixels_request(pixels))
            assert entered.wait(10)  # the engine holds the first request
            second = stub.ModelInfer.future(_pixels_request(pixels))
            deadline = time.monotonic() + 10
            while batcher.queue_depth < 1:  # the second waits in the queue, which is now full
                assert time.monotonic() < deadline
                time.sleep(0.01)
            with pytest.raises(grpc.RpcError) as err:
                stub.ModelInfer(_pixels_request(pixels))
            gate.set()
            assert first.result(30).outputs and second.result(30).outputs
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue" in err.value.details()
    finally:
        gate.set()
        live.stop()


def test_a_batch_over_max_batch_is_refused_from_its_shape_before_its_contents_are_read():
    from clipfold.errors import RequestError
    from clipfold.runtime.serve.grpc_tensors import parse_request
    from clipfold.runtime.serve.inference_protocol import TensorMeta

    text = TensorMeta("text", "BYTES", (-1,))
    request = pb.ModelInferRequest(model_name="tiny-text", inputs=[_tensor("text", "BYTES", (100_000,))],
                                   raw_input_contents=[bytes(4 * 100_000)])  # 100,000 empty texts
    with pytest.raises(RequestError, match="100000 rows in one request; this model takes at most 8"):
        parse_request(request, (text,), (), max_rows=8)
    assert len(parse_request(request, (text,), ()).inputs["text"]) == 100_000  # without a limit: read


def test_status_of_each_failure():
    assert status_of(QueueFullError("full"))[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status_of(BatcherClosedError("closed"))[0] == grpc.StatusCode.UNAVAILABLE
    assert status_of(asyncio.TimeoutError())[0] == grpc.StatusCode.DEADLINE_EXCEEDED
    assert status_of(RequestTimeout("decoding passed the deadline"))[0] == grpc.StatusCode.DEADLINE_EXCEEDED
    assert status_of(PayloadTooLarge("text 0 is 9,000 bytes"))[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status_of(ConfigError("bad"))[0] == grpc.StatusCode.INVALID_ARGUMENT
    code, message = status_of(ZeroDivisionError("bug"))  # only a bug is INTERNAL, without its text
    assert code == grpc.StatusCode.INTERNAL and "bug" not in message


# --- fuzz -------------------------------------------------------------------------------------
def _fuzzed(rng: random.Random, png: bytes):
    """Malformed ModelInferRequests (and raw bytes that are no message at all), forever."""
    names = ["pixels", "image", "text", "", "x" * 300, "PIXELS"]
    types = ["UINT8", "BYTES", "FP32", "FP16", "INT64", "BOOL", "", "uint8", "STRING"]
    models = ["tiny"] * 5 + ["tiny-text"] * 3 + ["", "nope", "tiny\x00", "../tiny"]
    shape_values = [0, 1, 2, 3, 64, -1, -(2 ** 62), 2 ** 62, 8, 9]
    while True:
        kind = rng.randrange(7)
        req = pb.ModelInferRequest(model_name=rng.choice(models), model_version=rng.choice(["", "", "", "1", "2", "x"]),
                                   id=rng.choice(["", "a", "\u2603" * 50]))
        if kind == 6:  # bytes that may not parse as a message
            yield bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300)))
            continue
        for _ in range(rng.choice([0, 1, 1, 1, 2, 3])):
            tensor = req.inputs.add(name=rng.choice(names), datatype=rng.choice(types),
                                    shape=[rng.choice(shape_values) for _ in range(rng.randrange(0, 6))])
            if kind == 0:  # typed contents of a random kind
                field = rng.choice(["uint_contents", "int_contents", "fp32_contents", "bytes_contents",
                                    "bool_contents", "int64_contents", "uint64_contents", "fp64_contents"])
                n = rng.choice([0, 1, 5, 12288, 12289])
                values = {"bytes_contents": [png, b"", b"\x00"], "bool_contents": [True, False],
                          "fp32_contents": [0.5, -1e30, float("nan")], "fp64_contents": [1e300],
                          "int_contents": [-1, 300, 2 ** 31 - 1], "int64_contents": [-(2 ** 63)],
                          "uint64_contents": [2 ** 64 - 1], "uint_contents": [0, 255, 256, 2 ** 32 - 1]}[field]
                getattr(tensor.contents, field).extend(rng.choice(values) for _ in range(n))
            elif kind == 1:  # requested outputs and parameters
                req.outputs.add(name=rng.choice(["scores", "nope", "embedding", ""]))
                req.outputs[-1].parameters["classification"].int64_param = rng.choice([1, 5])
        if kind in (2, 3, 4, 5):  # raw contents: wrong count, wrong size, damaged BYTES, a damaged image
            count = len(req.inputs) + rng.choice([0, 0, 1, -1])
            for _ in range(max(count, 0)):
                if kind == 4:
                    blob = bytearray(png)
                    for _ in range(rng.randint(1, 20)):
                        blob[rng.randrange(len(blob))] = rng.randrange(256)
                    blob = bytes(blob[:rng.randrange(1, len(blob) + 1)])
                    raw = len(blob).to_bytes(4, "little") + blob
                elif kind == 5:
                    raw = rng.choice([b"\xff\xff\xff\xff", b"\x01\x00", b"\x00\x00\x00\x00", b"\x05\x00\x00\x00abc"])
                else:
                    raw = bytes(rng.choice([0, 12287, 12288, 12289, 24576]))
                req.raw_input_contents.append(raw)
        yield req


def test_fuzz_malformed_messages_no_internal_no_crash(served, stub, reference):
    live, address = served
    stub, channel = stub
    raw = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
    rng = random.Random(4321)
    png = _png(_samples(1, 8)[0])
    codes: dict[str, int] = {}
    gen = _fuzzed(rng, png)
    for _ in range(1100):
        message = next(gen)
        try:
            if isinstance(message, bytes):
                raw(message, timeout=30)
            else:
                stub.ModelInfer(message, timeout=30)
            code = "OK"
        except grpc.RpcError as err:
            code = err.code().name
        codes[code] = codes.get(code, 0) + 1
        assert code not in ("INTERNAL", "UNKNOWN", "UNAVAILABLE", "DEADLINE_EXCEEDED"), (code, message)
    assert sum(codes.values()) >= 1000 and codes.get("INVALID_ARGUMENT", 0) > 400, codes
    print(f"grpc fuzz: {sum(codes.values())} messages by status {dict(sorted(codes.items()))}")

    # the same kinds of messages down one stream: every one answered, the stream stays open
    async def stream():
        client = grpcaio.InferenceServerClient(address)
        answered = 0

        async def requests():
            for _ in range(60):
                message = next(gen)
                if isinstance(message, pb.ModelInferRequest) and message.inputs:
                    yield {"model_name": message.model_name or "tiny", "inputs": [], "request_id": message.id}
                tensor = grpcaio.InferInput("pixels", [1, 3, 64, 64], "UINT8")
                tensor.set_data_from_numpy(np.zeros((1, 3, 64, 64), np.uint8))
                yield {"model_name": "tiny", "inputs": [tensor], "request_id": "good"}
        try:
            async for result, error in client.stream_infer(requests()):
                answered += 1
                assert error is None or "INTERNAL" not in str(error), str(error)
        finally:
            await client.close()
        return answered
    assert asyncio.run(stream()) >= 60

    text = live.server.metrics.registry
    from prometheus_client import generate_latest

    metrics = generate_latest(text).decode()
    assert not re.search(r'clipfold_requests_total\{code="INTERNAL"', metrics)
    assert re.search(r'clipfold_requests_total\{code="INVALID_ARGUMENT",endpoint="grpc_ModelInfer"', metrics)
    pixels = preprocess(_samples(1, 9), reference.manifest.preprocess)
    answer = grpcclient.InferResult(stub.ModelInfer(_pixels_request(pixels)))
    np.testing.assert_array_equal(answer.as_numpy("indices"), reference.run_pixels(pixels)["indices"])


# --- the command line: --grpc-port, a port in use, draining on SIGTERM --------------------------
def test_cli_grpc_port_in_use_is_refused_by_name(bundle):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(ConfigError, match=f"cannot listen for gRPC on 127.0.0.1:{port}"):
            check_port("127.0.0.1", port)
        proc = subprocess.run([sys.executable, "-m", "clipfold", "serve", str(bundle), "--port", str(free_port()),
                               "--grpc-port", str(port)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--grpc-port 0" in proc.stderr and "Traceback" not in proc.stderr
    with pytest.raises(ConfigError, match="grpc_port must be an integer"):
        ServeConfig(grpc_port=70000)


def test_cli_serves_grpc_and_drains_in_flight_calls_on_sigterm(bundle, reference):
    port, grpc_port = free_port(), free_port()
    # A 1.5 s batching delay keeps the request in the queue when SIGTERM arrives.
    proc = subprocess.Popen([sys.executable, "-m", "clipfold", "serve", str(bundle), "--port", str(port),
                             "--grpc-port", str(grpc_port), "--max-delay-ms", "1500", "--preferred-batch", "8"],
                            stderr=subprocess.PIPE, text=True)
    try:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        deadline = time.monotonic() + 60
        while True:
            try:
                if client.is_server_ready():
                    break
            except InferenceServerException:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)
        pixels = preprocess(_samples(1, 6), reference.manifest.preprocess)
        tensor = grpcclient.InferInput("pixels", [1, 3, 64, 64], "UINT8")
        tensor.set_data_from_numpy(pixels)
        done: dict = {}
        client.async_infer("tiny", [tensor], callback=lambda result, error: done.update(result=result, error=error))
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while not done and time.monotonic() < deadline:
            time.sleep(0.05)
        assert done.get("error") is None, done.get("error")
        np.testing.assert_array_equal(done["result"].as_numpy("indices"), reference.run_pixels(pixels)["indices"])
        assert proc.wait(30) in (0, -signal.SIGTERM)
        log = proc.stderr.read()
        assert f"gRPC on 127.0.0.1:{grpc_port}" in log and '"endpoint": "grpc_ModelInfer"' in log
        assert '"msg": "draining"' in log
        client.close()
    finally:
        if proc.poll() is None:
            proc.kill()
