"""Steering requests on routes that do not steer are refused with HTTP 400, never served unsteered.

Only ``/v1/completions`` and ``/v1/chat/completions`` apply a request's steering (``STEERING_ROUTES``;
beam search on them is refused separately, see ``openai_server.py``). vLLM serves many more routes
(``/v1/responses``, ``/v1/messages``, ``/generative_scoring``, ``/inference/v1/generate``, pooling,
tokenizer, render, ...) and a future vLLM will add others. Rather than list them, this ASGI
middleware looks at the JSON body of every POST to any other path and answers 400 when it carries a
steering spec anywhere a route could pick it up (``steering_field_in``):

* a top-level ``steering`` object, or top-level flat ``steering_*`` keys;
* ``steering`` / ``steering_*`` keys inside top-level ``vllm_xargs`` or ``extra_args``;
* the same inside ``sampling_params.extra_args`` (the token-in/token-out route's form).

Bodies that are not JSON (multipart uploads, for instance) pass through untouched, and so does any
body without the bytes ``steering`` in it (checked before any JSON is parsed).

A server started *without* steering gets the same guard with no steering route at all: a request
that asks for steering there is refused, not served unsteered.
"""

from __future__ import annotations

import json
from typing import Any

from vllm_steer.spec import FLAT_PREFIX, SPEC_KEY

STEERING_ROUTES = frozenset({"/v1/completions", "/v1/chat/completions"})
_ARGUMENT_HOLDERS = ("vllm_xargs", "extra_args")


def steering_key_in(mapping: dict) -> str | None:
    """The first key of ``mapping`` that is a steering spec (``steering`` or ``steering_*``), or None."""
    for key in mapping:
        if isinstance(key, str) and (key == SPEC_KEY or key.startswith(FLAT_PREFIX)):
            return key
    return None


def steering_field_in(body: Any) -> str | None:
    """The first place in a decoded JSON body where a steering spec sits (e.g. ``steering``,
    ``vllm_xargs.steering_pack``, ``sampling_params.extra_args.steering``), or None."""
    if isinstance(body, list):
        for item in body:
            found = steering_field_in(item)
            if found is not None:
                return found
        return None
    if not isinstance(body, dict):
        return None
    key = steering_key_in(body)
    if key is not None:
        return key
    holders = [(name, body.get(name)) for name in _ARGUMENT_HOLDERS]
    sampling = body.get("sampling_params")
    if isinstance(sampling, dict):
        holders += [(f"sampling_params.{name}", sampling.get(name)) for name in _ARGUMENT_HOLDERS]
    for name, holder in holders:
        if isinstance(holder, dict):
            key = steering_key_in(holder)
            if key is not None:
                return f"{name}.{key}"
    return None


def refusal(path: str, field: str, steering_routes: frozenset[str] = STEERING_ROUTES) -> dict:
    """The OpenAI-style error body for a steering request on a route that does not steer."""
    if steering_routes:
        why = f"{path} does not apply steering (found {field!r}): send steered requests to " + " or ".join(
            sorted(steering_routes))
    else:
        why = (f"this server was started without steering (found {field!r} in a request to {path}): start "
               "it with --steering-plugin --steering-packs DIR")
    return {"error": {"message": why, "type": "BadRequestError", "param": field, "code": 400}}


class SteeringRouteGuard:
    """Pure ASGI middleware (it must read the body and hand it on unchanged)."""

    def __init__(self, app, steering_routes: frozenset[str] = STEERING_ROUTES) -> None:
        self.app = app
        self.steering_routes = steering_routes

    async def __call__(self, scope, receive, send) -> None:
        if (scope["type"] != "http" or scope["method"] != "POST"
                or scope["path"].rstrip("/") in self.steering_routes):
            await self.app(scope, receive, send)
            return
        content_type = dict(scope.get("headers") or []).get(b"content-type", b"")
        if b"json" not in content_type.lower():
            await self.app(scope, receive, send)
            return
        messages, chunks = [], []
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        field = None
        body = b"".join(chunks)
        if b"steering" in body:
            try:
                field = steering_field_in(json.loads(body))
            except (ValueError, RecursionError):
                pass  # not JSON: the route answers for itself
        if field is not None:
            payload = json.dumps(refusal(scope["path"], field, self.steering_routes)).encode()
            await send({"type": "http.response.start", "status": 400,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(payload)).encode())]})
            await send({"type": "http.response.body", "body": payload})
            return

        async def replay():
            if messages:
                return messages.pop(0)
            return await receive()

        await self.app(scope, replay, send)
