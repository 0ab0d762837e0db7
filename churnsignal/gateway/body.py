"""Request bodies: gzip within a bound, JSON with a reason (pure)."""

from __future__ import annotations

import zlib
from typing import Any

import orjson


class BodyError(Exception):
    """The body cannot be read: ``status`` (400, 413, 415) and a machine ``code``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def decode_content(raw: bytes, encoding: str | None, limit: int) -> bytes:
    """The body as sent before ``Content-Encoding`` (identity or gzip; deflate too), never
    more than ``limit`` bytes inflated: a decompression bomb stops at ``limit`` + 1."""
    name = (encoding or "identity").strip().lower()
    if name in ("", "identity"):
        if len(raw) > limit:
            raise BodyError(413, "too_large", f"body is {len(raw)} bytes; limit {limit}")
        return raw
    if name not in ("gzip", "x-gzip", "deflate"):
        raise BodyError(415, "unsupported_encoding",
                        f"Content-Encoding {name[:40]!r} is not supported (gzip or identity)")
    wbits = 16 + zlib.MAX_WBITS if name != "deflate" else zlib.MAX_WBITS
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(raw, limit + 1)
    except zlib.error as exc:
        raise BodyError(400, "bad_encoding", f"body is not valid {name}: {exc}") from None
    if len(out) > limit:
        raise BodyError(413, "too_large", f"body inflates beyond the {limit}-byte limit")
    if not inflater.eof:
        raise BodyError(400, "bad_encoding", f"body is a truncated {name} stream")
    return out


def json_object(raw: bytes) -> dict[str, Any]:
    """A JSON object, or a BodyError(400) saying why not."""
    if not raw:
        raise BodyError(400, "empty", "empty body; expected a JSON object")
    try:
        payload = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BodyError(400, "not_json", f"body is not JSON: {exc}"[:300]) from None
    if not isinstance(payload, dict):
        raise BodyError(400, "not_object",
                        f"body is JSON {type(payload).__name__}, not an object")
    return payload
