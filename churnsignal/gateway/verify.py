"""Credentials of each route: Segment write keys, Stripe, Zendesk and Intercom signatures (pure).

Every function returns None when the request is authentic, else a ``Refusal`` saying why (its
``status``: 401 when the credential is missing, 403 when it is wrong or stale). Comparisons are
constant-time (``hmac.compare_digest``) and no message ever holds a secret or a signature.
Secrets are plain ``bytes``; the edge unwraps them from the settings.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Refusal:
    status: int  # 401 missing, 403 wrong or stale
    code: str  # machine-readable
    message: str  # for the sender; never holds a secret


def _missing(what: str) -> Refusal:
    return Refusal(401, "missing_credentials", what)


def _unconfigured(setting: str) -> Refusal:
    return Refusal(401, "not_configured", f"this route accepts nothing: {setting} is empty")


def _any_equal(presented: bytes, candidates: Sequence[bytes]) -> bool:
    """Constant time in the candidates: every one is compared, whatever matches first."""
    found = False
    for candidate in candidates:
        found |= hmac.compare_digest(presented, candidate)
    return found


def basic_user(authorization: str | None) -> str | None:
    """The user name of an HTTP Basic ``Authorization`` header (Segment: the write key);
    None when the header is absent or not Basic."""
    if not authorization:
        return None
    scheme, _, encoded = authorization.strip().partition(" ")
    if scheme.lower() != "basic" or not encoded.strip():
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return decoded.partition(":")[0]


def segment_write_key(authorization: str | None, body_key: object,
                      keys: Sequence[bytes]) -> Refusal | None:
    """Segment's HTTP API: the write key as the Basic user name, or ``writeKey`` in the body."""
    if not keys:
        return _unconfigured("CHURNSIGNAL_GATEWAY__SEGMENT_WRITE_KEYS")
    presented = basic_user(authorization)
    if not presented and isinstance(body_key, str) and body_key:
        presented = body_key
    if not presented:
        return _missing("no write key: send it as the HTTP Basic user name (or writeKey "
                        "in the body)")
    if not _any_equal(presented.encode("utf-8", "replace"), keys):
        return Refusal(403, "invalid_write_key", "invalid write key")
    return None


def _hex_hmac(secret: bytes, message: bytes, digest: str) -> bytes:
    return hmac.new(secret, message, digest).hexdigest().encode()


def stripe_signature(header: str | None, body: bytes, secrets: Sequence[bytes], now: float,
                     tolerance_s: float) -> Refusal | None:
    """``Stripe-Signature: t=<unix>,v1=<hex>[,v1=<hex>...][,v0=...]``: some ``v1`` must be
    HMAC-SHA256(secret, ``t.`` + raw body) for some secret, and ``t`` within ``tolerance_s``
    of now (either way; 0 disables the time check)."""
    if not secrets:
        return _unconfigured("CHURNSIGNAL_GATEWAY__STRIPE_WEBHOOK_SECRETS")
    if not header:
        return _missing("no Stripe-Signature header")
    timestamp: int | None = None
    signatures: list[bytes] = []
    for part in header.split(","):
        name, sep, value = part.strip().partition("=")
        if not sep:
            continue
        if name == "t" and value.isdigit() and len(value) <= 12:
            timestamp = int(value)
        elif name == "v1" and value:
            signatures.append(value.strip().lower().encode("ascii", "replace"))
    if timestamp is None or not signatures:
        return Refusal(403, "invalid_signature", "Stripe-Signature has no t= timestamp or no "
                       "v1= signature")
    signed = str(timestamp).encode() + b"." + body
    expected = [_hex_hmac(secret, signed, "sha256") for secret in secrets]
    if not any(_any_equal(sig, expected) for sig in signatures):
        return Refusal(403, "invalid_signature", "no v1 signature matches the body and any "
                       "configured secret")
    if tolerance_s and abs(now - timestamp) > tolerance_s:
        return Refusal(403, "stale_signature", f"signature timestamp is {now - timestamp:.0f}s "
                       f"from now (tolerance {tolerance_s:g}s)")
    return None


def zendesk_signature(signature: str | None, timestamp: str | None, body: bytes,
                      secrets: Sequence[bytes], now: float,
                      tolerance_s: float) -> Refusal | None:
    """Zendesk webhooks: ``X-Zendesk-Webhook-Signature`` is base64(HMAC-SHA256(secret,
    timestamp + body)) with ``X-Zendesk-Webhook-Signature-Timestamp`` (ISO 8601 UTC, e.g.
    ``2026-12-06T04:00:00Z``), which must be within ``tolerance_s`` of now."""
    if not secrets:
        return _unconfigured("CHURNSIGNAL_GATEWAY__ZENDESK_SIGNING_SECRETS")
    if not signature or not timestamp:
        return _missing("no X-Zendesk-Webhook-Signature or X-Zendesk-Webhook-Signature-"
                        "Timestamp header")
    message = timestamp.encode("utf-8", "replace") + body
    presented = signature.strip().encode("ascii", "replace")
    expected = [base64.b64encode(hmac.new(secret, message, hashlib.sha256).digest())
                for secret in secrets]
    if not _any_equal(presented, expected):
        return Refusal(403, "invalid_signature", "X-Zendesk-Webhook-Signature does not match "
                       "the body and any configured secret")
    if tolerance_s:
        at = _iso_seconds(timestamp)
        if at is None:
            return Refusal(403, "invalid_signature", "X-Zendesk-Webhook-Signature-Timestamp is "
                           "not an ISO 8601 time")
        if abs(now - at) > tolerance_s:
            return Refusal(403, "stale_signature", f"signature timestamp is {now - at:.0f}s "
                           f"from now (tolerance {tolerance_s:g}s)")
    return None


def intercom_signature(header: str | None, body: bytes,
                       secrets: Sequence[bytes]) -> Refusal | None:
    """Intercom: ``X-Hub-Signature: sha1=<hex HMAC-SHA1(client secret, body)>``. Intercom
    signs no timestamp, so there is no replay window to check: duplicates are harmless (the
    worker deduplicates on the notification id)."""
    if not secrets:
        return _unconfigured("CHURNSIGNAL_GATEWAY__INTERCOM_CLIENT_SECRETS")
    if not header:
        return _missing("no X-Hub-Signature header")
    scheme, _, value = header.strip().partition("=")
    if scheme.lower() != "sha1" or not value:
        return Refusal(403, "invalid_signature", "X-Hub-Signature must be sha1=<hex>")
    expected = [_hex_hmac(secret, body, "sha1") for secret in secrets]
    if not _any_equal(value.strip().lower().encode("ascii", "replace"), expected):
        return Refusal(403, "invalid_signature", "X-Hub-Signature does not match the body and "
                       "any configured client secret")
    return None


def _iso_seconds(value: str) -> float | None:
    from datetime import datetime

    try:
        parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        return None
    return parsed.timestamp()
