"""``clipfold serve``: bundles over HTTP and gRPC with dynamic batching."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from clipfold.cli import options as o
from clipfold.errors import ConfigError

SERVE = "clipfold.runtime.serve.config:ServeConfig"
MIB = 1024 * 1024


def _digests(pairs: list[str]) -> dict[str, str]:
    """``--expect-digest NAME=DIGEST`` pairs as {name: digest}."""
    out: dict[str, str] = {}
    for pair in pairs:
        name, sep, digest = pair.partition("=")
        if not sep or not name or not digest:
            raise ConfigError(f"--expect-digest expects NAME=DIGEST (clipfold inspect prints the digest), got {pair!r}")
        out[name] = digest
    return out


def cmd_serve(args: argparse.Namespace) -> int:
    from clipfold import ServeConfig, serve

    config = ServeConfig(host=args.host, port=args.port, max_batch=args.max_batch, max_delay_ms=args.max_delay_ms,
                         max_queue=args.max_queue, max_body_bytes=int(args.max_body_mb * MIB),
                         max_image_pixels=args.max_image_pixels, max_items=args.max_items, timeout_s=args.timeout_s,
                         max_text_bytes=args.max_text_bytes, max_pixels_in_flight=args.max_pixels_in_flight,
                         max_header_bytes=args.max_header_bytes, header_timeout_s=args.header_timeout_s,
                         max_connections=args.max_connections,
                         threads=args.threads, spin=args.spin, preferred_batch=args.preferred_batch,
                         grpc_port=args.grpc_port, ui=args.ui)
    serve(args.bundles, config, variant=args.variant, indexes=args.index, expect_digests=_digests(args.expect_digest),
          progress=lambda m: print(m, file=sys.stderr, flush=True))
    return 0


def _limits(p) -> None:
    def limit(flag: str, field: str, help: str, type=int, convert=None) -> None:
        p.add_argument(flag, type=type, default=o.default(SERVE, field, convert), metavar="N", help=help)

    limit("--max-queue", "max_queue", "rows waiting per model before 503")
    limit("--max-body-mb", "max_body_bytes", "largest request body in MiB", float, lambda b: b / MIB)
    limit("--max-image-pixels", "max_image_pixels", "largest decoded image")
    limit("--max-items", "max_items", "images or texts per classify/embed request")
    limit("--timeout-s", "timeout_s", "per-request time limit in seconds", float)
    limit("--max-text-bytes", "max_text_bytes", "UTF-8 bytes per text query")
    p.add_argument("--max-pixels-in-flight", type=int, default=None, metavar="N",
                   help="decoded image pixels held at once across all requests (default: twice --max-image-pixels)")
    limit("--max-header-bytes", "max_header_bytes", "request line and headers of one request")
    limit("--header-timeout-s", "header_timeout_s", "time in seconds for a request's headers to arrive", float)
    limit("--max-connections", "max_connections",
          "open HTTP connections; at the cap the oldest one without a request is closed")


def register(sub) -> None:
    p = o.command(sub, "serve", "serve bundles over HTTP and gRPC (Open Inference Protocol v2), JSON and a page at "
                  "/ui, with dynamic batching", [
                      "clipfold serve pets.bundle",
                      "clipfold serve pets.bundle gda.bundle --port 8080 --max-batch 16 --max-delay-ms 2",
                      "clipfold serve pets.bundle --index photos.index --expect-digest pets=DIGEST",
                  ], cmd_serve)
    p.add_argument("bundles", nargs="+", type=Path, help="bundles to serve; each is a model named after its folder")
    p.add_argument("--host", default=o.default(SERVE, "host"), help="address to listen on")
    p.add_argument("--port", type=int, default=o.default(SERVE, "port"), help="HTTP port")
    p.add_argument("--max-batch", type=int, default=o.default(SERVE, "max_batch"), metavar="N",
                   help="rows per engine call (1: no batching)")
    o.add_max_delay_ms(p, o.default(SERVE, "max_delay_ms"), "longest wait of a request for its batch to fill")
    _limits(p)
    o.add_variant(p, o.AUTO_VARIANT + ", of every bundle to serve (default: each bundle's default)")
    p.add_argument("--index", action="append", default=[], type=Path,
                   help="an index (clipfold index) to answer /search with; repeatable")
    o.add_threads(p)
    p.add_argument("--preferred-batch", type=int, default=None, metavar="N",
                   help="rows at which a batch starts without waiting for --max-delay-ms (default: measured at "
                        "start-up, the smallest batch within 10%% of the engine's best time per image)")
    p.add_argument("--expect-digest", action="append", default=[], metavar="NAME=DIGEST",
                   help="serve model NAME only if its bundle has this digest (clipfold inspect prints it); repeatable")
    p.add_argument("--spin", action="store_true",
                   help="let ONNX Runtime threads busy-wait between calls (off: they would take the event loop's cores)")
    # The command serves gRPC by default; ServeConfig (the Python API) leaves it off (grpc_port 0).
    p.add_argument("--grpc-port", type=int, default=8001,
                   help="port of the Open Inference Protocol over gRPC (tritonclient.grpc; default 8001, 0: off)")
    p.add_argument("--ui", action=argparse.BooleanOptionalAction, default=None,
                   help="the page at /ui: classify dropped images, search the index (default: on when --host is "
                        "loopback; --no-ui turns it off)")
