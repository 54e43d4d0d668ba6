"""The settings of ``ilora serve``: where it listens, how it batches, and the limits every request is held to."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import check_minimums, check_range
from ..devices import check_device
from ..errors import UserError

API_KEY_ENV = "ILORA_API_KEY"  # environment variable read when api_key is not set


@dataclass
class ServeConfig:
    run: str = ""  # run directory or name under $ILORA_HOME/runs
    host: str = "127.0.0.1"  # address to listen on; set api_key before listening on anything but loopback
    port: int = 8000  # TCP port; 0 picks a free one (--json prints the address)
    api_key: str | None = None  # when set (or $ILORA_API_KEY), /v1/* and /metrics need "Authorization: Bearer KEY"
    max_batch: int = 16  # users scored together in one forward, each with their own expert mixture
    max_wait_ms: float = 5.0  # how long a batch waits for more users once its first one has arrived
    max_queue: int = 256  # users waiting for the model; one more gets 503 with Retry-After at once
    request_timeout_s: float = 60.0  # a request not answered by then gets 504
    max_body_bytes: int = 1048576  # largest request body (413 beyond)
    max_header_bytes: int = 16384  # largest request line and headers together (431 beyond)
    read_timeout_s: float = 10.0  # a connection must send a request's line and headers within this of opening (or
    # of its previous answer), else it is closed; then the body within as long again, else 408
    max_connections: int = 512  # open connections; a request while more are open gets 503 (uvicorn's limit)
    max_history_items: int = 1000  # most items in one history (the model reads the most recent ones it was trained on)
    max_candidates: int = 100  # most candidates one user may list
    max_top_k: int = 100  # largest top_k a request may ask for
    max_users: int = 64  # most users in one /v1/recommend/batch request (at most max_queue)
    top_k: int = 10  # recommendations per user when a request does not say
    retrieve: int = 20  # without candidates: the encoder's top-N of the catalogue, reranked (title head)
    normalize: str | None = None  # sum or mean of title token log-probs (default: the run's)
    device: str = "auto"  # auto (cuda when available, else cpu), cpu, cuda or cuda:N
    access_log: bool = False  # one line per request on stderr

    def validate(self) -> None:
        check_device(self.device)
        if not self.run:
            raise UserError("Pass --run RUN_DIR (a trained run).")
        if not 0 <= self.port <= 65535:
            raise UserError(f"port must be between 0 and 65535; got {self.port}.")
        check_minimums(
            self,
            {
                "max_batch": 1,
                "max_queue": 1,
                "max_body_bytes": 1,
                "max_header_bytes": 1024,
                "max_connections": 1,
                "max_history_items": 1,
                "max_candidates": 1,
                "max_top_k": 1,
                "max_users": 1,
                "top_k": 1,
                "retrieve": 1,
            },
        )
        check_range(self, "max_wait_ms", 0)
        check_range(self, "request_timeout_s", 0, low_open=True)
        check_range(self, "read_timeout_s", 0, low_open=True)
        if self.max_users > self.max_queue:
            raise UserError(f"max_users ({self.max_users}) must not exceed max_queue ({self.max_queue}).")
        if self.top_k > self.max_top_k:
            raise UserError(f"top_k ({self.top_k}) must not exceed max_top_k ({self.max_top_k}).")
        if self.normalize not in (None, "sum", "mean"):
            raise UserError(f"normalize must be sum or mean; got {self.normalize!r}.")
        if self.api_key is not None and not self.api_key.strip():
            raise UserError("api_key is empty; give a key, or leave it out to serve without one.")
