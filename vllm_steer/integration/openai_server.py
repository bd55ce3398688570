"""The plugin's part of vLLM's OpenAI-compatible server (``vllm serve``, or
``python -m vllm.entrypoints.openai.api_server``), in the API-server process.

* Requests: completions and chat completions accept a ``steering`` object in the body. It is moved
  into ``SamplingParams.extra_args`` before vLLM builds the SamplingParams, so it goes through the
  same validation as offline requests (``frontend.py``): a bad value is a ``VLLMValidationError``,
  i.e. HTTP 400 naming the field, raised before any streaming starts. The flat ``vllm_xargs`` form
  (``steering_pack``, ``steering_alpha``, ...) needs nothing here.
* Routes that do not steer refuse steering requests with 400 (``route_guard.py``); beam search on
  the steering routes is refused too (vLLM builds its own params for it, without ``extra_args``).
  A server started without steering refuses them on every route.
* ``GET /v1/steering/packs``: the loaded packs (name, methods, model shape, K, layers, metadata).
  There is no endpoint that loads a file: packs come only from the operator's ``--steering-packs``.
* ``/metrics``: before vLLM's Prometheus app renders, the steering counters are fetched from every
  engine this API server talks to (``engine_stats.ENGINE_STATS_UTILITY`` through
  ``compat.call_utility_all``), summed over the data-parallel engines
  (``engine_stats.combine_engine_stats``) and exposed as ``vllm_steer:*`` series, plus
  ``vllm_steer:requests_per_engine_total{engine}`` / ``vllm_steer:slots_in_use_per_engine{engine}``.

The routes and the middleware are added where vLLM attaches endpoint plugins, once the core
routers exist (``compat.endpoint_attach_points``); only for servers started with steering.

Several API servers (``--api-server-count N``, or ``--data-parallel-size N``'s default of N API
servers): vLLM spawns them from the pickled command-line namespace. ``serve_flags`` puts the steering
config on that namespace at parse time, so each API server builds its own pack registry when it
builds its engine config and validates requests itself; one that finds steering asked for but no
registry refuses to start (``_attach_endpoint_plugins``). vLLM then renders ``/metrics`` from a new
Prometheus multiprocess registry per scrape (``PROMETHEUS_MULTIPROC_DIR``), over the files the
processes write, not from the global registry; the ``/metrics`` middleware appends the steering
series to that body (``add_steering_series``). They are not written to the multiprocess files: the
counters live in the engines, and every API server's client talks to all of its node's engines, so
whichever API server answers a scrape reports the engines' totals once.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the route handlers' annotations.
from typing import Any

from vllm_steer.config import steering_config_from
from vllm_steer.integration.engine_stats import ENGINE_STATS_UTILITY
from vllm_steer.integration.patching import patch
from vllm_steer.integration.route_guard import SteeringRouteGuard, steering_key_in
from vllm_steer.spec import SPEC_KEY

PACKS_ROUTE = "/v1/steering/packs"
_REQUEST_CLASSES = (
    ("vllm.entrypoints.openai.completion.protocol", "CompletionRequest"),
    ("vllm.entrypoints.openai.chat_completion.protocol", "ChatCompletionRequest"),
)


def _steering_enabled(args: Any) -> bool:
    if getattr(args, "steering_plugin", False):
        return True
    return steering_config_from(getattr(args, "additional_config", None)) is not None


# -- request bodies --------------------------------------------------------------------------------
def _carries_steering(request) -> bool:
    extra = request.model_extra or {}
    return SPEC_KEY in extra or steering_key_in(getattr(request, "vllm_xargs", None) or {}) is not None


def _to_sampling_params(original, self, *args, **kwargs):
    extra = self.model_extra or {}
    if SPEC_KEY in extra:
        xargs = dict(self.vllm_xargs or {})
        if steering_key_in(xargs) is not None:
            from vllm.exceptions import VLLMValidationError

            raise VLLMValidationError(
                "give the steering spec either as the 'steering' body field or in vllm_xargs, not both",
                parameter=SPEC_KEY,
            )
        xargs[SPEC_KEY] = extra[SPEC_KEY]
        self.vllm_xargs = xargs  # read by the original right below; validated in SamplingParams
    params = original(self, *args, **kwargs)
    _check_against_the_engine(params)
    return params


def _to_beam_search_params(original, self, *args, **kwargs):
    if _carries_steering(self):
        from vllm.exceptions import VLLMValidationError

        raise VLLMValidationError(
            "steering does not apply to beam search (use_beam_search): vLLM runs beam search "
            "without the request's steering; drop one of the two",
            parameter="use_beam_search",
        )
    return original(self, *args, **kwargs)


def _check_against_the_engine(params) -> None:
    """Check the spec against the server's packs now, not later in the engine's input processor:
    for a streaming request that would already be inside the event stream (HTTP 200), not a 400."""
    from vllm_steer.integration.frontend import check_spec_against, steering_engines

    engines = steering_engines()
    if len(engines) == 1:  # the API server's own engine; otherwise the engine checks it later
        check_spec_against(params, *engines[0])


def _patch_request_classes() -> None:
    import importlib

    for module_name, class_name in _REQUEST_CLASSES:
        request_cls = getattr(importlib.import_module(module_name), class_name)
        patch(request_cls, "to_sampling_params")(_to_sampling_params)
        if hasattr(request_cls, "to_beam_search_params"):
            patch(request_cls, "to_beam_search_params")(_to_beam_search_params)


# -- routes -----------------------------------------------------------------------------------------
def _engine_registry(app):
    from vllm_steer.integration.frontend import engine_steering

    engine_client = getattr(app.state, "engine_client", None)
    model_config = getattr(engine_client, "model_config", None)
    found = engine_steering(model_config) if model_config is not None else None
    return found[0] if found is not None else None


def _add_routes(app) -> None:
    from fastapi import Request
    from fastapi.responses import JSONResponse

    async def list_packs(request: Request):
        registry = _engine_registry(request.app)
        if registry is None:
            return JSONResponse({"error": {"message": "this server runs without steering", "code": 404}}, 404)
        return JSONResponse({"object": "list", "data": registry.describe()})

    app.add_api_route(PACKS_ROUTE, list_packs, methods=["GET"], name="vllm_steer_list_packs")
    _add_live_pack_routes(app)
    app.add_middleware(SteeringRouteGuard)

    @app.middleware("http")
    async def refresh_steering_metrics(request: Request, call_next):
        if request.url.path.rstrip("/") != "/metrics":
            return await call_next(request)
        await _refresh_metrics(request.app)
        response = await call_next(request)
        if not _multiprocess_metrics() or response.status_code != 200:
            return response
        return await _with_steering_series(response)


# -- metrics ----------------------------------------------------------------------------------------
class _SteeringCollector:
    """Prometheus collector over the last counters fetched from the engines (summed over them).
    It yields nothing until this process serves steering (``enabled``)."""

    def __init__(self) -> None:
        self.stats: dict = {}
        self.enabled = False

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        if not self.enabled:
            return
        stats = self.stats
        by_method = CounterMetricFamily(
            "vllm_steer:requests", "Requests that reached the engine with an active steering spec, by method",
            labels=["method"],
        )
        for method, n in sorted(stats.get("requests_by_method", {}).items()):
            by_method.add_metric([method], n)
        yield by_method
        for key, help_text in (
            ("probe_checks", "FASB probe scores compared with a request's threshold"),
            ("backtracks", "FASB backtracks (each drops up to s generated tokens and regenerates them)"),
            ("recomputed_tokens", "Generated tokens dropped by FASB backtracks and generated again"),
            ("l2s_predictions", "L2S predictor runs (one per L2S request)"),
            ("conditions_decided", "CAST conditions decided (one per conditioned request, in its prefill)"),
            ("conditions_met", "CAST conditions that held (their request was steered)"),
            ("failed_requests", "Requests failed by an unexpected error in steering code (the engine served on)"),
        ):
            yield CounterMetricFamily(f"vllm_steer:{key}", help_text, value=stats.get(key, 0))
        per_request = stats.get("recomputed_tokens_per_request")
        if per_request:
            yield HistogramMetricFamily(
                "vllm_steer:recomputed_tokens_per_request",
                "Generated tokens one finished FASB request's backtracks recomputed",
                buckets=[(str(bound), count) for bound, count in per_request["buckets"]],
                sum_value=per_request["sum"],
            )
        yield GaugeMetricFamily("vllm_steer:slots_in_use", "Steering slots held by running requests",
                                value=stats.get("slots_in_use", 0))
        yield GaugeMetricFamily("vllm_steer:slots_total",
                                "Steering slots of the engines (max_num_seqs each, summed)",
                                value=stats.get("slots_total", 0))
        per_engine = stats.get("per_engine", [])
        requests = CounterMetricFamily(
            "vllm_steer:requests_per_engine",
            "Requests with an active steering spec each data-parallel engine received", labels=["engine"])
        slots = GaugeMetricFamily("vllm_steer:slots_in_use_per_engine",
                                  "Steering slots held by running requests, per data-parallel engine",
                                  labels=["engine"])
        for engine in per_engine:
            requests.add_metric([str(engine["engine"])], engine["requests"])
            slots.add_metric([str(engine["engine"])], engine["slots_in_use"])
        yield requests
        yield slots


_COLLECTOR = _SteeringCollector()
_IN_GLOBAL_REGISTRY = False


def _collector() -> _SteeringCollector:
    """The collector, turned on and in prometheus_client's global registry (what ``/metrics``
    renders with one API server)."""
    global _IN_GLOBAL_REGISTRY
    _COLLECTOR.enabled = True
    if not _IN_GLOBAL_REGISTRY:
        from prometheus_client import REGISTRY

        REGISTRY.register(_COLLECTOR)
        _IN_GLOBAL_REGISTRY = True
    return _COLLECTOR


def _multiprocess_metrics() -> bool:
    """Whether ``/metrics`` is rendered from Prometheus multiprocess files (vLLM sets
    ``PROMETHEUS_MULTIPROC_DIR`` for several API servers): then it builds a new registry over the
    files at each scrape, without the global registry's collectors."""
    import os

    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


def steering_exposition() -> bytes:
    """The steering series alone, in Prometheus' text format (nothing when steering is off here)."""
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_COLLECTOR)
    return generate_latest(registry)


def add_steering_series(body: bytes, content_encoding: str | None) -> bytes:
    """A multiprocess ``/metrics`` body with the steering series appended (once: a body that already
    has them is returned as it is); gzip bodies stay gzip."""
    import gzip

    zipped = (content_encoding or "").lower() == "gzip"
    text = gzip.decompress(body) if zipped else body
    if b"vllm_steer:" in text:
        return body
    if text and not text.endswith(b"\n"):
        text += b"\n"
    text += steering_exposition()
    return gzip.compress(text) if zipped else text


async def _with_steering_series(response):
    from starlette.responses import Response

    body = b"".join([chunk async for chunk in response.body_iterator])
    headers = {k: v for k, v in response.headers.items() if k.lower() != "content-length"}
    return Response(add_steering_series(body, response.headers.get("content-encoding")),
                    status_code=response.status_code, headers=headers)


async def _refresh_metrics(app) -> None:
    from vllm_steer.integration.compat import call_utility_all
    from vllm_steer.integration.engine_stats import combine_engine_stats

    engine_client = getattr(app.state, "engine_client", None)
    core = getattr(engine_client, "engine_core", None)
    if core is None or not hasattr(core, "call_utility_async"):
        return
    _collector().stats = combine_engine_stats(await call_utility_all(core, ENGINE_STATS_UTILITY))


# -- live packs (live_packs.py) ----------------------------------------------------------------------
def _error(status: int, message: str, param: str | None = None):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": "invalid_request_error" if status < 500 else "server_error",
                                   "param": param, "code": status}}, status)


def _admin_refusal(request):
    """The response refusing a pack-management request, or None when it may go on."""
    import hmac

    from vllm_steer.integration.serve_flags import ADMIN_KEY_ENV, ADMIN_KEY_FLAG, admin_key

    key = admin_key(getattr(request.app.state, "args", None))
    if key is None:
        return _error(403, f"packs are managed live only on a server started with {ADMIN_KEY_FLAG} (or {ADMIN_KEY_ENV})")
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        return _error(401, "pack management needs the admin key as 'Authorization: Bearer KEY'", "authorization")
    return None


async def _read_capped(request, limit: int) -> bytes | None:
    """The request body, or None when it is over ``limit`` bytes (read no further than that)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


def _add_live_pack_routes(app) -> None:
    import asyncio

    from fastapi import Request
    from fastapi.responses import JSONResponse

    from vllm_steer.errors import SteeringError
    from vllm_steer.integration.compat import call_utility_all
    from vllm_steer.integration.live_packs import ADD_PACK_UTILITY, REMOVE_PACK_UTILITY
    from vllm_steer.integration.serve_flags import MAX_PACK_FLAG, max_pack_bytes
    from vllm_steer.pack import load_pack_bytes

    changing = asyncio.Lock()  # one pack change at a time: the registry and the engines agree

    async def add_pack(request: Request):
        refusal = _admin_refusal(request)
        if refusal is not None:
            return refusal
        async with changing:
            return await _add_pack(request)

    async def _add_pack(request: Request):
        registry = _engine_registry(request.app)
        limit = max_pack_bytes(getattr(request.app.state, "args", None))
        data = await _read_capped(request, limit)
        if data is None:
            return _error(413, f"the pack is over this server's limit of {limit >> 20} MiB ({MAX_PACK_FLAG})", "body")
        try:
            pack = load_pack_bytes(data, registry.model)
            if pack.name in registry.packs:
                return _error(409, f"a pack named {pack.name!r} is loaded; DELETE it first to replace it", "name")
            registry.check_live(pack)  # as start-up loading checks it
        except SteeringError as exc:
            return _error(400, str(exc), exc.field)
        try:  # the engines first: a request the registry lets through finds the pack there
            answers = await call_utility_all(request.app.state.engine_client.engine_core, ADD_PACK_UTILITY, data)
        except Exception as exc:  # noqa: BLE001 - an engine refused it: it is not served
            message = str(exc)
            status = 409 if "still in use" in message else 500
            return _error(status, f"the engine did not add pack {pack.name!r}: {message}", "name")
        registry.add_live(pack)
        described = next(d for d in registry.describe() if d["name"] == pack.name)
        return JSONResponse({"object": "steering.pack", "engines": len(answers), **described})

    async def remove_pack(name: str, request: Request):
        refusal = _admin_refusal(request)
        if refusal is not None:
            return refusal
        async with changing:
            return await _remove_pack(name, request)

    async def _remove_pack(name: str, request: Request):
        registry = _engine_registry(request.app)
        try:
            registry.remove(name)  # new requests for it are refused from now on
        except SteeringError as exc:
            return _error(404, str(exc), "name")
        answers = await call_utility_all(request.app.state.engine_client.engine_core, REMOVE_PACK_UTILITY, name)
        in_use = sum(a.get("in_use", 0) for a in answers)
        return JSONResponse({"object": "steering.pack.deleted", "name": name, "deleted": True,
                             "requests_still_using": in_use})

    app.add_api_route(PACKS_ROUTE, add_pack, methods=["POST"], name="vllm_steer_add_pack")
    app.add_api_route(PACKS_ROUTE + "/{name}", remove_pack, methods=["DELETE"], name="vllm_steer_remove_pack")


# -- install ----------------------------------------------------------------------------------------
def check_this_server_steers() -> None:
    """An API server asked to steer (``--steering-plugin``) must have built its own pack registry
    when it built its engine config; refuse to start, naming the reason, rather than answer every
    steered request with 400 (vLLM's spawned API servers, ``--api-server-count``, get the config only
    through the command-line namespace; ``serve_flags.check_when_parsed``)."""
    from vllm_steer.errors import ConfigError
    from vllm_steer.integration.frontend import steering_engines

    if steering_engines():
        return
    import os

    raise ConfigError(
        f"vllm-steer: this API server process (pid {os.getpid()}) was started with --steering-plugin but "
        "built no steering pack registry: its engine arguments carry no additional_config['steering'] "
        "(vLLM spawned it from a command-line namespace the plugin's flag parsing did not see); refusing "
        "to start rather than answer every steered request with an error",
        field="--steering-plugin",
    )


def _attach_endpoint_plugins(original, app, *args, **kwargs):
    result = original(app, *args, **kwargs)
    if _steering_enabled(getattr(app.state, "args", None)):
        check_this_server_steers()
        _patch_request_classes()
        _add_routes(app)
        _collector()
    else:  # no route steers here: a request asking for steering is refused, not served unsteered
        app.add_middleware(SteeringRouteGuard, steering_routes=frozenset())
    return result


def install() -> bool:
    """Wrap every endpoint-plugin attach point the installed vLLM has (``compat``); returns whether
    there was one. Called again when ``vllm serve --steering-plugin`` parses its flags, once the API
    server module is surely imported."""
    from vllm_steer.integration.compat import endpoint_attach_points

    points = endpoint_attach_points()
    for module, name in points:
        patch(module, name)(_attach_endpoint_plugins)
    return bool(points)
