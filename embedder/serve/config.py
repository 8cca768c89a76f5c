"""Settings of `embedder serve`, declared once (embedder.options)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from embedder.errors import ConfigError
from embedder.options import check_choices, option
from embedder.search.config import query_runtime_option, query_weights_option

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
DEFAULT_MAX_UPLOAD_PIXELS = 50_000_000  # a 50-MP photo passes; a decode costs ~4 bytes per pixel: 200 MB
DEFAULT_DECODE_SLOTS = 2  # images decoded at once (uploads and thumbnails)
MAX_K = 1000  # more neighbours than anyone can look at; bounds the work one request can ask for
DEFAULT_HEADER_TIMEOUT = 10.0  # seconds for a request line and headers: a browser needs milliseconds
DEFAULT_BODY_TIMEOUT = 60.0  # seconds for a body once its headers are in: 10 MB at 170 KB/s
DEFAULT_MAX_CONNECTIONS = 1024  # open connections answered; a request on one more gets a 503 at once
MAX_EXAMPLES = 8  # positive images, negative images, negative rows: at most this many of each in one query


@dataclass(frozen=True)
class ServerLimits:
    """How long a client may take to send a request, and how many connections are served (embedder.serve.server)."""

    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    body_timeout: float = DEFAULT_BODY_TIMEOUT
    max_connections: int = DEFAULT_MAX_CONNECTIONS


@dataclass(frozen=True)
class ServeConfig:
    index: str = option(positional=True, path=True, metavar="INDEX_DIR", help="index folder from `embedder index`")
    host: str = option("127.0.0.1", help="default loopback only; 0.0.0.0 exposes it to the network")
    port: int = option(8000, help="TCP port")
    allowed_host: tuple[str, ...] = option((), metavar="NAME",
                                            help="also answer requests whose Host header is NAME (repeatable; '*' = "
                                                 "any, for a proxy that checks Host itself); always allowed: "
                                                 "localhost, 127.0.0.1, ::1 and --host unless 0.0.0.0/::")
    max_upload_mb: float = option(10.0, help="larger uploads get 413")
    max_upload_pixels: int = option(DEFAULT_MAX_UPLOAD_PIXELS,
                                    help="uploads declaring more pixels are refused (400) before decoding; each "
                                         "image decoded at once may take ~4 bytes per pixel")
    decode_slots: int = option(DEFAULT_DECODE_SLOTS, help="images decoded at once, uploads and thumbnails together")
    k: int = option(10, flag="-k", aliases=("--top-k",), help="neighbours returned when a request does not say")
    weights: str | None = query_weights_option()
    runtime: str = query_runtime_option()
    header_timeout: float = option(ServerLimits.header_timeout, metavar="SECONDS",
                                   help="a request's line and headers must arrive within this many seconds of the "
                                        "connection (or of the previous answer); else the connection is closed")
    body_timeout: float = option(ServerLimits.body_timeout, metavar="SECONDS",
                                 help="a request's body must arrive within this many seconds of its headers")
    max_connections: int = option(ServerLimits.max_connections, metavar="N",
                                  help="connections served at once; a request on one more gets a 503 at once")

    def __post_init__(self):
        check_choices(self)
        if self.max_upload_mb <= 0:
            raise ConfigError(f"--max-upload-mb must be positive, got {self.max_upload_mb}.")
        if not 1 <= self.k <= MAX_K:
            raise ConfigError(f"-k must be between 1 and {MAX_K}, got {self.k}.")
        if not (0 < self.header_timeout < math.inf and 0 < self.body_timeout < math.inf):
            raise ConfigError(f"--header-timeout and --body-timeout must be positive numbers of seconds, got "
                              f"{self.header_timeout} and {self.body_timeout}.")
        if self.max_connections < 1:
            raise ConfigError(f"--max-connections must be at least 1, got {self.max_connections}.")

    @property
    def server_limits(self) -> ServerLimits:
        return ServerLimits(self.header_timeout, self.body_timeout, self.max_connections)

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)
