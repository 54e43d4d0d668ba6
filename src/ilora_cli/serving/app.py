"""The HTTP API of ``ilora serve`` (FastAPI): routes, request schemas, errors as one sentence, limits, metrics.

Every error a client can cause is answered with a status code and ``{"error": "one sentence"}``: 401 without
the API key, 408 for a body that does not arrive within ``read_timeout_s``, 413 for a body over
``max_body_bytes``, 431 for a request line and headers over ``max_header_bytes``, 422 for bad input (wrong
types, unknown fields, empty histories, unknown or ambiguous titles with their closest matches, unknown item
ids, an entry whose id and title name different items), 503 with Retry-After while loading or when the queue
is full, 504 when a request times out. A bug answers 500 without a traceback (the traceback goes to the
server's log).

A request passes, in order: the header limit, the API key, admission (the queue), the body limit, then the
route. Nothing reads the body or tells the server's state to a client without the key.
"""

from __future__ import annotations

import asyncio
import hmac
import re
import time
from contextlib import asynccontextmanager
from typing import Annotated, Any

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema
from starlette.exceptions import HTTPException

from .. import __version__
from ..console import err
from ..errors import UserError
from .batching import QueueFull
from .service import NotReady, Service, Timeout, UserRequest

# -- request and response schemas (also the OpenAPI page) -------------------------------------------------------


class RecommendRequest(BaseModel):
    """One user's history, and optionally the items to rank and how many recommendations to return."""

    model_config = ConfigDict(extra="forbid")

    history: list[Any] = Field(
        description="The user's items, oldest first: item ids, titles, or objects with item_id or title. Titles "
        "resolve exactly, then case-insensitively.",
        examples=[[12, "Radiohead", {"title": "Portishead"}]],
    )
    top_k: int | None = Field(default=None, strict=True, description="Recommendations to return (server default).")
    candidates: list[Any] | None = Field(
        default=None,
        description="Items to rank (ids or titles); by default the run's own candidates: the encoder's top items "
        "of the catalogue (title head) or the whole catalogue (item head).",
    )
    dataset: str | None = Field(
        default=None, strict=True, description="The dataset the ids refer to; refused unless it is the run's."
    )


class BatchRequest(BaseModel):
    """Several users, answered in order."""

    model_config = ConfigDict(extra="forbid")

    # Each user is checked against RecommendRequest on their own, so that one malformed user is answered in
    # their place, as one with an unknown title is, and the others are answered.
    users: list[Annotated[Any, WithJsonSchema(RecommendRequest.model_json_schema())]] = Field(
        description="One request per user."
    )


class Item(BaseModel):
    item_id: int
    title: str


class Recommendation(Item):
    score: float = Field(description="The run's default ranking score (fused when the run has fusion weights).")
    llm_score: float
    encoder_score: float


class CatalogueCheck(BaseModel):
    below: bool = Field(description="True: the run's default ranking was below its own encoder on its val catalogue.")
    metric: str
    default: float
    encoder: float
    p_value: float | None = Field(description="The paired permutation test over the val users.")
    split: str
    rows: int


class RecommendResponse(BaseModel):
    """What ``ilora recommend --json`` prints for the user."""

    history: list[Item] = Field(description="The history as the model read it (its most recent items).")
    recommendations: list[Recommendation]
    ranking: str = Field(description="llm, or fused: fusion.llm · llm_score + fusion.encoder · encoder_score.")
    fusion: dict[str, float] | None
    gate: list[float] = Field(description="The user's weights over the K LoRA experts.")
    candidates: str = Field(description="What was ranked: given, encoder top-N, or whole catalogue.")
    below_encoder: CatalogueCheck | None = Field(
        None,
        description="The run's default ranking against its own encoder on the val catalogue, as training measured "
        "it (NDCG@10); null where not measured (the title head).",
    )
    notes: list[str]


class ErrorResponse(BaseModel):
    error: str = Field(description="What was wrong, in one sentence.")


class BatchResponse(BaseModel):
    results: list[RecommendResponse | ErrorResponse] = Field(
        description="One per user, in order; a user whose request is malformed or whose history or candidates "
        "cannot be resolved gets an error naming them (users[i]: ...) in their place, and the others are answered."
    )


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in (
        (401, "The API key is missing or wrong."),
        (408, "The body did not arrive within read_timeout_s."),
        (413, "The body is larger than max_body_bytes."),
        (422, "Bad input, in one sentence."),
        (431, "The request line and headers are larger than max_header_bytes."),
        (503, "Loading, or the queue is full: retry after Retry-After seconds."),
        (504, "Not answered within request_timeout_s."),
    )
}


BEARER = HTTPBearer(auto_error=False, description="The server's API key.")

# -- metrics ----------------------------------------------------------------------------------------------------

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


CLIENT_CLOSED = 499  # the code counted for a client that left before its request was answered (nginx's)


class Metrics:
    """Prometheus metrics of one app, in a registry of its own."""

    def __init__(self, queue_length):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("ilora_requests", "HTTP requests answered.", ["endpoint", "code"], registry=r)
        self.errors = Counter(
            "ilora_request_errors",
            "Requests answered 4xx or 5xx, or left by their client before the answer (499).",
            ["endpoint", "code"],
            registry=r,
        )
        self.latency = Histogram(
            "ilora_request_seconds", "Time to answer a request.", ["endpoint"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.batch_size = Histogram("ilora_batch_size", "Users per forward.", buckets=BATCH_BUCKETS, registry=r)
        self.batch_seconds = Histogram(
            "ilora_batch_seconds", "Time of one forward.", buckets=LATENCY_BUCKETS, registry=r
        )
        self.users = Counter("ilora_users", "Users answered.", registry=r)
        self.queue = Gauge("ilora_queue_length", "Users waiting for the model.", registry=r)
        self.queue.set_function(queue_length)

    def request(self, endpoint: str, code: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(code)).inc()
        if code >= 400:
            self.errors.labels(endpoint, str(code)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)
        self.users.inc(size)


# -- middleware (plain ASGI) ------------------------------------------------------------------------------------


async def _send_error(scope, receive, send, status: int, message: str, headers: dict[str, str] | None = None) -> None:
    await JSONResponse({"error": message}, status_code=status, headers=headers)(scope, receive, send)


class HeaderLimit:
    """Refuses a request whose line and headers together are larger than ``limit`` bytes: 431. (The HTTP parser
    bounds only a head it has not read whole; one that arrives in one piece reaches the app, whatever its size.)"""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            line = len(scope["method"]) + len(scope.get("raw_path") or b"") + len(scope["query_string"])
            size = line + sum(len(name) + len(value) + 4 for name, value in scope["headers"])  # "name: value\r\n"
            if size > self.limit:
                message = f"The request line and headers are larger than {self.limit} bytes."
                return await _send_error(scope, receive, send, 431, message)
        await self.app(scope, receive, send)


class Authenticate:
    """Admits a request to ``/v1/...`` or ``/metrics`` only with ``Authorization: Bearer <api_key>`` (compared in
    constant time), before anything reads its body or tells the state of the server (the queue) to it."""

    GUARDED = ("/v1", "/metrics")

    def __init__(self, app, api_key: str):
        self.app, self.expected = app, api_key.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and self._guarded(scope["path"]) and not self._authorized(scope["headers"]):
            message = "A valid API key is needed: send the header 'Authorization: Bearer KEY'."
            return await _send_error(scope, receive, send, 401, message, {"WWW-Authenticate": "Bearer"})
        await self.app(scope, receive, send)

    def _guarded(self, path: str) -> bool:
        return any(path == p or path.startswith(p + "/") for p in self.GUARDED)

    def _authorized(self, headers) -> bool:
        value = next((v for k, v in headers if k == b"authorization"), b"")
        scheme, _, token = value.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.expected)


class Admission:
    """Refuses a recommendation request at once, before its body is read or checked, while the queue is full:
    under overload the refusal is the cheapest answer the server can give."""

    PATHS = ("/v1/recommend", "/v1/recommend/batch")

    def __init__(self, app, service: Service):
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send) -> None:
        batcher = self.service.batcher
        if scope["type"] == "http" and scope["path"] in self.PATHS and batcher.waiting >= batcher.max_queue:
            await _busy(batcher.retry_after(), batcher.waiting)(scope, receive, send)
            return
        await self.app(scope, receive, send)


MAX_DEPTH = 32  # nesting levels of a request body; a real one has at most 5: {"users": [{"history": [{...}]}]}
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.?)*(?:"|\Z)', re.S)  # an unfinished one too, to the end: linear
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_STEP = np.zeros(256, np.int32)  # a bracket's step in depth
_STEP[list(b"[{")], _STEP[list(b"]}")] = 1, -1


def nested_deeper_than(body: bytes, levels: int) -> bool:
    """Whether the JSON ``body`` opens more than ``levels`` lists and objects inside one another (brackets in
    strings aside), in time linear in the body and without parsing it."""
    if body.count(b"[") + body.count(b"{") <= levels:
        return False
    brackets = _JSON_STRING.sub(b"", body).translate(None, _NOT_BRACKETS)
    return bool(brackets) and int(np.cumsum(_STEP[np.frombuffer(brackets, np.uint8)]).max()) > levels


class BodyLimit:
    """Reads a request's body whole, up to ``limit`` bytes and within ``timeout`` seconds, before the app sees it:
    413 beyond the size (declared or streamed), 408 beyond the time (the connection is then closed), 422 for a
    body nested more than ``MAX_DEPTH`` deep (the JSON parser recurses, and ran out of stack at about 950)."""

    def __init__(self, app, limit: int, timeout: float):
        self.app, self.limit, self.timeout = app, limit, timeout

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        body = await self._read(scope, receive)
        if body is None:  # the client left
            return
        if isinstance(body, tuple):
            return await _send_error(scope, receive, send, *body)
        if nested_deeper_than(body, MAX_DEPTH):
            message = f"The request body is nested more than {MAX_DEPTH} levels deep."
            return await _send_error(scope, receive, send, 422, message)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _read(self, scope, receive) -> bytes | tuple[int, str, dict[str, str] | None] | None:
        """The body; or what to refuse it with (status, sentence, headers); None if the client left."""
        too_large = (413, f"The request body is larger than {self.limit} bytes.", None)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return too_large
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        chunks, size = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                return 408, f"The request body did not arrive within {self.timeout:g} s.", {"Connection": "close"}
            if message["type"] != "http.request":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return too_large
            if not message.get("more_body", False):
                return b"".join(chunks)


class Instrument:
    """Counts every request by endpoint (the route's path, never the raw one) and status, and its latency; a
    request whose client left before it was answered counts as 499, not as an error of the server."""

    def __init__(self, app, metrics: Metrics, paths: set[str]):
        self.app, self.metrics, self.paths = app, metrics, paths

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status, left = time.perf_counter(), None, False

        async def watch_receive():
            nonlocal left
            message = await receive()
            left = left or message["type"] == "http.disconnect"
            return message

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, watch_receive, send_status)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or (scope["path"] if scope["path"] in self.paths else "other")
            code = status if status is not None else CLIENT_CLOSED if left else 500
            self.metrics.request(path, code, time.perf_counter() - start)


# -- errors as one sentence -------------------------------------------------------------------------------------

USER_FIELDS = ", ".join(RecommendRequest.model_fields)


def validation_sentence(errors: list[dict[str, Any]], path: str) -> str:
    """The first of ``errors`` (pydantic's, of a request to ``path`` that does not fit its schema) in one
    sentence."""
    # A misspelt field is reported as unknown rather than as the field it was meant to be missing.
    first = next((e for e in errors if e.get("type") == "extra_forbidden"), errors[0])
    loc = [p for p in first.get("loc", ()) if p != "body"]
    kind = first.get("type", "")
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    if kind == "json_invalid":
        at = f" at character {loc[0]}" if loc and isinstance(loc[0], int) else ""
        return f"The request body is not valid JSON ({first.get('ctx', {}).get('error', 'decode error')}{at})."
    if kind == "missing":
        if not where:
            return "The request needs a JSON body (Content-Type: application/json)."
        return f"The request lacks the field {where}."
    if kind == "extra_forbidden":
        fields = "users" if len(loc) == 1 and path.endswith("/batch") else USER_FIELDS
        return f"Unknown field {where} in the request; the fields are {fields}."
    got = first.get("input")
    shown = repr(got) if isinstance(got, (int, float, str, bool)) or got is None else type(got).__name__
    if not where:
        return "The request body must be a JSON object (Content-Type: application/json)."
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"{where} must be a JSON object; got {shown}."
    msg = str(first.get("msg", "is not valid")).rstrip(".")
    return f"{where}: {msg[:1].lower()}{msg[1:]}; got {shown}."


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _busy(retry_after: int, waiting: int) -> JSONResponse:
    return _error(
        503,
        f"The server is busy ({waiting} users waiting); retry in {retry_after} s.",
        {"Retry-After": str(retry_after)},
    )


def _unavailable() -> JSONResponse:
    return _error(503, "The model is still loading; retry in a few seconds.", {"Retry-After": "2"})


# -- the app ----------------------------------------------------------------------------------------------------


def create_app(service: Service, api_key: str | None = None, on_fatal=None) -> FastAPI:
    """The API over ``service``; ``on_fatal(exit_code)`` is called when the run cannot be loaded."""
    metrics = Metrics(lambda: service.batcher.waiting)
    service.batcher.on_batch = metrics.batch

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.start(on_fatal or (lambda code: None))
        yield
        await service.stop()
        err.print("Stopped.", highlight=False)

    app = FastAPI(
        title="ilora",
        version=__version__,
        summary="Sequential recommendations from an iLoRA run: every user with their own mixture of LoRA experts, "
        "users batched together.",
        lifespan=lifespan,
    )
    app.state.service = service
    app.state.metrics = metrics
    guard = [Depends(BEARER)] if api_key else []  # documents the key in the OpenAPI page; Authenticate checks it

    _answer_errors_in_one_sentence(app)

    @app.get("/healthz", summary="Alive (answers even while the model loads).")
    async def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/readyz", summary="Ready: the model is loaded and has answered a warm-up request.")
    async def readyz() -> JSONResponse:
        if service.ready:
            return JSONResponse({"status": "ready"})
        return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "2"})

    @app.get("/v1/run", dependencies=guard, responses=ERRORS, summary="The run: backbone, K, gate, fusion, metrics.")
    async def run_info() -> dict[str, Any]:
        return service.run_document()

    @app.post(
        "/v1/recommend",
        dependencies=guard,
        response_model=RecommendResponse,
        responses=ERRORS,
        summary="Recommendations for one user.",
    )
    async def recommend(body: RecommendRequest) -> Response:
        if not service.ready:
            return _unavailable()
        try:
            job = service.job(UserRequest(body.history, body.candidates, body.top_k, body.dataset))
        except UserError as exc:
            return _error(422, str(exc))
        return await _answer(service, [job], lambda results: results[0])

    @app.post(
        "/v1/recommend/batch",
        dependencies=guard,
        response_model=BatchResponse,
        responses=ERRORS,
        summary="Recommendations for several users (at most max_users).",
    )
    async def recommend_batch(body: BatchRequest) -> Response:
        refused = _batch_refused(service, body)
        if refused is not None:
            return refused
        slots = [_user_job(service, i, user) for i, user in enumerate(body.users)]
        jobs = [s for s in slots if not isinstance(s, dict)]

        def merge(results: list[dict[str, Any]]) -> dict[str, Any]:
            answers = iter(results)
            return {"results": [s if isinstance(s, dict) else next(answers) for s in slots]}

        return await _answer(service, jobs, merge)

    @app.get("/metrics", dependencies=guard, summary="Prometheus metrics.")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    _add_middleware(app, service, metrics, api_key)
    return app


def _batch_refused(service: Service, body: BatchRequest) -> Response | None:
    """The answer to a batch refused as a whole (the server still loading, nobody or too many users), else None:
    a problem with one user is answered in that user's place."""
    if not service.ready:
        return _unavailable()
    if not body.users:
        return _error(422, "users lists nobody; give at least one user.")
    if len(body.users) > service.config.max_users:
        return _error(
            422,
            f"users lists {len(body.users)} users; this server takes at most {service.config.max_users} per request.",
        )
    return None


def _answer_errors_in_one_sentence(app: FastAPI) -> None:
    """Bad input, unknown paths and methods, and bugs as ``{"error": "one sentence"}``."""

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, validation_sentence(exc.errors(), request.url.path))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        message = str(exc.detail)
        if exc.status_code == 404:
            message = f"There is no {request.url.path} here; the endpoints are listed at /docs."
        elif exc.status_code == 405:
            message = f"{request.url.path} does not answer {request.method}; see /docs."
        return _error(exc.status_code, message, exc.headers)

    @app.exception_handler(UserError)
    async def _user(request: Request, exc: UserError) -> JSONResponse:
        return _error(422, str(exc))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:  # the traceback goes to the log
        return _error(500, "Internal error; the server's log has the details.")


def _add_middleware(app: FastAPI, service: Service, metrics: Metrics, api_key: str | None) -> None:
    """What every request passes before its route: Instrument, HeaderLimit, Authenticate (with a key),
    Admission, BodyLimit, in that order (the last added runs first)."""
    c = service.config
    paths = {r.path for r in app.routes}
    app.add_middleware(BodyLimit, limit=c.max_body_bytes, timeout=c.read_timeout_s)
    app.add_middleware(Admission, service=service)
    if api_key:
        app.add_middleware(Authenticate, api_key=api_key)
    app.add_middleware(HeaderLimit, limit=c.max_header_bytes)
    app.add_middleware(Instrument, metrics=metrics, paths=paths)  # outermost: counts 401s, 503s and 413s too


def _user_job(service: Service, i: int, user: Any):
    """User ``i`` of a batch request as a job, or ``{"error": "users[i]: ..."}`` in their place."""
    try:
        request = RecommendRequest.model_validate(user)
    except ValidationError as exc:
        errors = [{**e, "loc": ("users", i, *e["loc"])} for e in exc.errors()]
        return {"error": validation_sentence(errors, "/v1/recommend/batch")}
    try:
        return service.job(UserRequest(request.history, request.candidates, request.top_k, request.dataset))
    except UserError as exc:
        return {"error": f"users[{i}]: {exc}"}


async def _answer(service: Service, jobs, shape) -> JSONResponse:
    """Score ``jobs`` and answer ``shape(results)``; a full queue, a timeout or a loading model are answered
    here, so that the client sees the status code and one sentence."""
    try:
        results = await service.answer_jobs(jobs) if jobs else []
    except QueueFull as exc:
        return _busy(exc.retry_after, service.batcher.waiting)
    except Timeout:
        return _error(504, f"The request was not answered within {service.config.request_timeout_s:g} s; retry later.")
    except NotReady:
        return _unavailable()
    return JSONResponse(shape(results))
