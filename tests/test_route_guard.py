"""Where a JSON body can carry a steering spec that a route other than completions/chat would pick up
(the middleware itself runs against a real server in test_openai_server.py)."""

from __future__ import annotations

import asyncio
import json

import pytest

from vllm_steer.integration.route_guard import SteeringRouteGuard, steering_field_in


@pytest.mark.parametrize("body, field", [
    ({"input": "hi", "steering": {"pack": "p"}}, "steering"),
    ({"input": "hi", "steering_pack": "p"}, "steering_pack"),
    ({"vllm_xargs": {"steering_alpha": 2}}, "vllm_xargs.steering_alpha"),
    ({"extra_args": {"steering": {}}}, "extra_args.steering"),
    ({"sampling_params": {"extra_args": {"steering": {"pack": "p"}}}}, "sampling_params.extra_args.steering"),
    ([{"prompt": "a"}, {"steering": {}}], "steering"),
    ({"input": "steering", "vllm_xargs": {"other": 1}, "metadata": {"steering": 1}}, None),
    ({"messages": [{"role": "user", "content": "steering_pack"}]}, None),
    ("steering", None),
])
def test_steering_field_in(body, field):
    assert steering_field_in(body) == field


def _call(path, body: bytes, content_type=b"application/json", method="POST", **guard):
    seen = {}

    async def app(scope, receive, send):
        message = await receive()
        seen["body"] = message.get("body", b"")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    chunks = [body[:5], body[5:]]

    async def receive():
        return {"type": "http.request", "body": chunks.pop(0), "more_body": bool(chunks)}

    sent = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "headers": [(b"content-type", content_type)]}
    asyncio.run(SteeringRouteGuard(app, **guard)(scope, receive, send))
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:]), seen.get("body")


def test_the_guard_refuses_steering_elsewhere_and_passes_everything_else_on_unchanged():
    steered = json.dumps({"input": "hi", "steering": {"pack": "p"}}).encode()
    status, body, _ = _call("/v1/responses", steered)
    error = json.loads(body)["error"]
    assert status == 400 and error["param"] == "steering" and "/v1/responses does not apply steering" in error["message"]
    plain = json.dumps({"input": "hi"}).encode()
    assert _call("/v1/responses", plain)[0] == 200
    # the app behind it reads the whole body (sent in two chunks), exactly as the client sent it
    status, _, forwarded = _call("/v1/completions", steered)
    assert status == 200 and forwarded == steered[:5]  # completions: passed straight through
    assert _call("/v1/messages", plain)[2] == plain[:5]
    assert _call("/v1/audio/transcriptions", steered, content_type=b"multipart/form-data")[0] == 200
    assert _call("/tokenize", b"{not json")[0] == 200


def test_a_server_without_steering_refuses_it_on_every_route():
    steered = json.dumps({"prompt": "hi", "steering": {"pack": "p"}}).encode()
    status, body, _ = _call("/v1/completions", steered, steering_routes=frozenset())
    assert status == 400 and "started without steering" in json.loads(body)["error"]["message"]
    assert _call("/v1/completions", json.dumps({"prompt": "hi"}).encode(), steering_routes=frozenset())[0] == 200
