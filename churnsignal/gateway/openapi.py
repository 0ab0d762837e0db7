"""The OpenAPI description the gateway serves at /openapi.json (and the fuzz tests read)."""

from __future__ import annotations

from typing import Any

_TIME = {"type": "string", "format": "date-time"}
_MESSAGE: dict[str, Any] = {
    "type": "object",
    "properties": {
        "type": {"type": "string", "enum": ["track", "identify", "group", "page", "screen",
                                            "alias"]},
        "messageId": {"type": "string"},
        "userId": {"type": "string"},
        "anonymousId": {"type": "string"},
        "event": {"type": "string"},
        "name": {"type": "string"},
        "groupId": {"type": "string"},
        "previousId": {"type": "string"},
        "properties": {"type": "object"},
        "traits": {"type": "object"},
        "context": {"type": "object"},
        "integrations": {"type": "object"},
        "timestamp": _TIME,
        "sentAt": _TIME,
    },
}
_ANSWERS: dict[str, Any] = {
    "200": {"description": "Accepted: Kafka acknowledged every record.",
            "content": {"application/json": {"schema": {"type": "object"}}}},
    "400": {"description": "Not JSON, not an object, or an invalid single message (reason "
                           "in the body)."},
    "401": {"description": "Missing credentials (or the route has none configured)."},
    "403": {"description": "Wrong write key, or a wrong or stale signature."},
    "413": {"description": "Over the size limits."},
    "415": {"description": "Unsupported Content-Encoding."},
    "503": {"description": "Kafka cannot take it now, or the gateway is at its request "
                           "limit: retry after Retry-After seconds.",
            "headers": {"Retry-After": {"schema": {"type": "integer"}}}},
}


def _segment(name: str, schema: dict[str, Any], summary: str) -> dict[str, Any]:
    return {"post": {
        "operationId": name, "summary": summary, "security": [{"writeKey": []}],
        "requestBody": {"required": True,
                        "content": {"application/json": {"schema": schema}}},
        "responses": _ANSWERS,
    }}


def _webhook(name: str, headers: list[str], summary: str) -> dict[str, Any]:
    return {"post": {
        "operationId": name, "summary": summary,
        "parameters": [{"name": h, "in": "header", "required": False,
                        "schema": {"type": "string"}} for h in headers],
        "requestBody": {"required": True,
                        "content": {"application/json": {"schema": {"type": "object"}}}},
        "responses": _ANSWERS,
    }}


def _probe(name: str, summary: str) -> dict[str, Any]:
    return {"get": {"operationId": name, "summary": summary,
                    "responses": {"200": {"description": "OK"},
                                  "503": {"description": "Not ready"}}}}


def document() -> dict[str, Any]:
    batch = {"type": "object", "required": ["batch"], "properties": {
        "batch": {"type": "array", "items": _MESSAGE}, "sentAt": _TIME,
        "context": {"type": "object"}, "integrations": {"type": "object"},
        "writeKey": {"type": "string"}}}
    paths: dict[str, Any] = {"/v1/batch": _segment("batch", batch, "Segment batch")}
    for call in ("track", "identify", "group", "page", "screen", "alias"):
        paths[f"/v1/{call}"] = _segment(call, _MESSAGE, f"Segment {call} call")
    paths["/webhooks/stripe"] = _webhook("stripe", ["Stripe-Signature"], "Stripe webhook")
    paths["/webhooks/zendesk"] = _webhook(
        "zendesk", ["X-Zendesk-Webhook-Signature", "X-Zendesk-Webhook-Signature-Timestamp"],
        "Zendesk webhook")
    paths["/webhooks/intercom"] = _webhook("intercom", ["X-Hub-Signature"], "Intercom webhook")
    paths["/healthz"] = _probe("healthz", "The process answers")
    paths["/readyz"] = _probe("readyz", "Kafka reachable and topics present")
    return {
        "openapi": "3.0.3",
        "info": {"title": "churnsignal gateway", "version": "1"},
        "paths": paths,
        "components": {"securitySchemes": {"writeKey": {"type": "http", "scheme": "basic"}}},
    }
