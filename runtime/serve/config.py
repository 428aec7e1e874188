"""``clipfold serve``'s options and their checks (no serving dependency: the CLI builds one first)."""

from __future__ import annotations

from dataclasses import dataclass

from clipfold.errors import ConfigError


@dataclass(frozen=True)
class ServeConfig:
    """Server options; every limit is per request unless it says otherwise."""

    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 32  # rows per engine call
    max_delay_ms: float = 5.0  # how long the oldest waiting row may wait for others
    # rows at which a batch starts without waiting longer; None: measured per model at start-up
    # (the smallest batch within 10 % of the engine's best time per image, see batcher.py)
    preferred_batch: int | None = None
    max_queue: int = 512  # rows waiting per model; more answers 503
    max_body_bytes: int = 32 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    max_items: int = 64  # images or texts in one classify/embed request
    max_text_bytes: int = 8 * 1024  # UTF-8 bytes per text query (only the first context-length tokens count)
    # decoded pixels held at once across all requests; None: twice max_image_pixels
    max_pixels_in_flight: int | None = None
    max_header_bytes: int = 64 * 1024  # request line + headers of one request
    header_timeout_s: float = 10.0  # a request's headers must arrive within this time
    max_connections: int = 512  # open HTTP connections; at the cap the oldest one without a request is closed
    timeout_s: float = 30.0
    threads: int | None = None  # ONNX Runtime threads per graph
    # ONNX Runtime threads busy-wait between calls: off, as the event loop needs the same cores.
    # bench_serve measures both: off costs less server CPU per request and serves more requests/s
    # from 16 clients up; spinning answers a few clients faster (README, Serving).
    spin: bool = False
    # the Open Inference Protocol over gRPC on its own port (grpc_service.py); 0: off (the CLI's default is 8001)
    grpc_port: int = 0
    # the page at /ui (webui.py); None: on when the server listens on loopback only
    ui: bool | None = None

    def __post_init__(self) -> None:
        ints = {"port": (self.port, 0, 65535), "grpc_port": (self.grpc_port, 0, 65535), "max_batch": (self.max_batch, 1, 4096),
                "max_queue": (self.max_queue, self.max_batch, 1 << 20), "max_body_bytes": (self.max_body_bytes, 1, 1 << 34),
                "max_image_pixels": (self.max_image_pixels, 1, 1 << 34), "max_items": (self.max_items, 1, 1 << 16),
                "max_text_bytes": (self.max_text_bytes, 1, 1 << 30), "max_header_bytes": (self.max_header_bytes, 1024, 1 << 30),
                "max_connections": (self.max_connections, 1, 1 << 20)}
        if self.max_pixels_in_flight is not None:  # an image must fit the budget alone
            ints["max_pixels_in_flight"] = (self.max_pixels_in_flight, self.max_image_pixels, 1 << 40)
        if self.preferred_batch is not None:  # None: measured at start-up
            ints["preferred_batch"] = (self.preferred_batch, 1, self.max_batch)
        for name, (value, lo, hi) in ints.items():
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise ConfigError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")
        if not 0 <= self.max_delay_ms <= 10_000:
            raise ConfigError(f"max_delay_ms must be between 0 and 10000, got {self.max_delay_ms!r}")
        if not 0 < self.timeout_s <= 3600:
            raise ConfigError(f"timeout_s must be in (0, 3600], got {self.timeout_s!r}")
        if not 0 < self.header_timeout_s <= 3600:
            raise ConfigError(f"header_timeout_s must be in (0, 3600], got {self.header_timeout_s!r}")

    @property
    def pixels_in_flight(self) -> int:
        return self.max_pixels_in_flight or 2 * self.max_image_pixels
