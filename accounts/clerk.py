"""Verify Clerk session tokens (RS256 JWTs) against the instance's JWKS; shared by HTTP and the socket.

The signing keys are kept in the Django cache (Redis in production, so every process shares one
copy) and in a per-process copy in front of it. A token whose ``kid`` is unknown may trigger one
JWKS refetch per minute across all processes (a ``cache.add`` flag, so forged
``kid`` values cannot stampede the JWKS endpoint). A JWKS outage never drops keys that are
already cached: users whose key is known stay signed in.

Settings are read at call time (``CLERK_ISSUER``, ``CLERK_JWKS_URL``, ``CLERK_AUTHORIZED_PARTIES``,
``CLERK_LEEWAY_SECONDS``). Without ``CLERK_ISSUER`` Clerk is off. See docs/auth.md.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import jwt
from django.conf import settings
from django.core.cache import cache

from chatapp import metrics

if TYPE_CHECKING:
    from accounts.models import User

logger = logging.getLogger(__name__)

ALGORITHM = "RS256"
REQUIRED_CLAIMS = ("exp", "nbf", "iat", "sub", "sid")
SESSION_COOKIE = "__session"
# Clerk session tokens are a few hundred bytes; anything far bigger is not one.
MAX_TOKEN_LENGTH = 8192
# A key set older than this is refreshed (one fetch per refetch interval); until then, and
# whenever the JWKS endpoint fails, the cached keys keep working.
JWKS_MAX_AGE_SECONDS = 60 * 60
# The per-process copy is compared with the shared cache at most this often for known keys.
LOCAL_RECHECK_SECONDS = 60
# With no keys anywhere, one process fetches (lock held this long) and the others wait for it.
COLD_FETCH_LOCK_SECONDS = 10
COLD_FETCH_WAIT_SECONDS = 3.0
JWKS_HTTP_TIMEOUT_SECONDS = 5
# A kid this process and the cache do not know triggers at most one JWKS fetch per this many seconds.
JWKS_REFETCH_SECONDS = 60
# Revoked session ids are refused for this long (Clerk session tokens live about a minute).
REVOKED_SESSION_TTL = 24 * 60 * 60
_JWT_SHAPE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
# The ``cat`` header Clerk stamps on what its instance key signs (values kept in sync with Clerk's
# backend SDK, packages/backend/src/tokens/jwtCategories.ts): a session token, or "no class" on
# instances that opted out. Any other category (a JWT-template token, a machine token) is not a
# session token, and Clerk's ``authenticateRequest`` treats it as signed out; so do we. Tokens
# minted before categories existed have no ``cat`` and are judged as before.
SESSION_TOKEN_CATEGORIES = frozenset({"cl_B7d4PD111AAA", "cl_I7d4PD111III"})


class ClerkTokenError(Exception):
    """A token that must not authenticate anyone.

    ``reason`` is a short code (``token_invalid``, ``token_expired``, ``session_revoked``,
    ``session_pending``, ``user_inactive``) reported to the socket consumer as ``scope["auth_error"]``; ``user`` is the
    local user when the token itself was valid but the user may not sign in.
    """

    def __init__(self, reason: str, message: str, *, user: User | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.user = user


TOKEN_INVALID = "token_invalid"  # noqa: S105 - a reason code, not a secret
TOKEN_EXPIRED = "token_expired"  # noqa: S105 - a reason code, not a secret
SESSION_REVOKED = "session_revoked"
SESSION_PENDING = "session_pending"
USER_INACTIVE = "user_inactive"


def _invalid(reason: str) -> ClerkTokenError:
    logger.info("clerk token refused: %s", reason)
    return ClerkTokenError(TOKEN_INVALID, "The session token is invalid.")


def looks_like_jwt(value: bytes | str) -> bool:
    """Three base64url segments separated by dots (a Bearer value that is Clerk's to judge)."""
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    return _JWT_SHAPE.fullmatch(text) is not None


# --- Settings, read at call time ---------------------------------------------------------------


def clerk_enabled() -> bool:
    return bool(settings.CLERK_ISSUER)


def clerk_issuer() -> str:
    return str(settings.CLERK_ISSUER).rstrip("/")


def clerk_jwks_url() -> str:
    explicit = str(getattr(settings, "CLERK_JWKS_URL", "") or "")
    return explicit or f"{clerk_issuer()}/.well-known/jwks.json"


# --- The key store -----------------------------------------------------------------------------


@dataclass
class _KeySet:
    keys: dict[str, Any]  # kid -> cryptography RSA public key
    fetched_at: float  # wall-clock time of the JWKS fetch (shared by every process)
    checked_at: float = field(default_factory=time.monotonic)  # last comparison with the shared cache


def _parse_jwks(data: Any) -> dict[str, Any]:
    """RS256 signing keys by kid; other key types and malformed entries are skipped."""
    keys: dict[str, Any] = {}
    entries = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        return keys
    for entry in entries:
        if not isinstance(entry, dict) or entry.get("kty") != "RSA":
            continue
        kid = entry.get("kid")
        if not isinstance(kid, str) or not kid or entry.get("use") not in (None, "sig"):
            continue
        if entry.get("alg") not in (None, ALGORITHM):
            continue
        try:
            keys[kid] = jwt.PyJWK.from_dict(entry, algorithm=ALGORITHM).key
        except jwt.PyJWTError:
            logger.warning("JWKS key %s could not be parsed; skipped", kid)
    return keys


class JwksStore:
    """Signing keys for one or more JWKS URLs: process copy -> shared cache -> rate-limited fetch."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._local: dict[str, _KeySet] = {}
        self._last_refetch: dict[str, float] = {}  # monotonic; the in-process half of the limiter

    @staticmethod
    def _cache_key(url: str, kind: str) -> str:
        return f"clerk:jwks:v1:{kind}:{hashlib.sha256(url.encode()).hexdigest()[:24]}"

    def forget(self) -> None:
        """Drop the per-process copies (tests; the shared cache is untouched)."""
        with self._lock:
            self._local.clear()
            self._last_refetch.clear()

    def signing_key(self, kid: str) -> Any:
        url = clerk_jwks_url()
        now = time.time()
        with self._lock:
            local = self._local.get(url)
        if (
            local is not None
            and kid in local.keys
            and time.monotonic() - local.checked_at < LOCAL_RECHECK_SECONDS
            and now - local.fetched_at < JWKS_MAX_AGE_SECONDS
        ):
            return local.keys[kid]
        keyset = self._from_shared(url) or local
        if keyset is None:
            keyset = self._cold_fetch(url)
        elif kid not in keyset.keys or now - keyset.fetched_at >= JWKS_MAX_AGE_SECONDS:
            keyset = self._refetch(url) or keyset
        if keyset is not None and kid in keyset.keys:
            return keyset.keys[kid]
        raise _invalid(f"unknown kid {kid[:64]!r}")

    def _install(self, url: str, data: Any, fetched_at: float) -> _KeySet:
        with self._lock:
            current = self._local.get(url)
            if current is not None and current.fetched_at == fetched_at:
                current.checked_at = time.monotonic()
                return current
            keyset = _KeySet(keys=_parse_jwks(data), fetched_at=fetched_at)
            self._local[url] = keyset
            return keyset

    def _from_shared(self, url: str) -> _KeySet | None:
        try:
            shared = cache.get(self._cache_key(url, "set"))
        except Exception:
            logger.warning("JWKS cache read failed; using the process copy", exc_info=True)
            return None
        if not isinstance(shared, dict) or "jwks" not in shared:
            return None
        return self._install(url, shared["jwks"], float(shared.get("fetched_at", 0)))

    def _fetch(self, url: str) -> _KeySet | None:
        """One HTTP fetch (PyJWT's client: http(s) only, no redirects); stores it for every process."""
        try:
            data = jwt.PyJWKClient(url, cache_jwk_set=False, timeout=JWKS_HTTP_TIMEOUT_SECONDS).fetch_data()
        except (jwt.PyJWKClientError, ValueError, OSError):  # unreachable, HTTP error, not JSON
            logger.warning("JWKS fetch from %s failed; cached keys stay in use", url, exc_info=True)
            return None
        if not _parse_jwks(data):
            logger.warning("JWKS at %s has no RS256 signing keys; cached keys stay in use", url)
            return None
        fetched_at = time.time()
        try:
            # No expiry: keys leave only when a later fetch no longer lists them.
            cache.set(self._cache_key(url, "set"), {"jwks": data, "fetched_at": fetched_at}, timeout=None)
        except Exception:
            logger.warning("JWKS cache write failed; keeping the process copy", exc_info=True)
        return self._install(url, data, fetched_at)

    def _refetch(self, url: str) -> _KeySet | None:
        """Fetch again if no process did in the last refetch interval (forged kids cannot stampede)."""
        interval = JWKS_REFETCH_SECONDS
        with self._lock:
            last = self._last_refetch.get(url)
            if last is not None and time.monotonic() - last < interval:
                return None
            self._last_refetch[url] = time.monotonic()
        try:
            allowed = cache.add(self._cache_key(url, "refetch"), 1, timeout=interval)
        except Exception:
            logger.warning("JWKS refetch flag unavailable; limiting per process only", exc_info=True)
            allowed = True
        if not allowed:
            # Another process refetched within the interval: its result is in the shared cache.
            return self._from_shared(url)
        return self._fetch(url)

    def _cold_fetch(self, url: str) -> _KeySet | None:
        """No keys in this process or the cache: one process fetches, the others wait briefly for it."""
        try:
            leader = cache.add(self._cache_key(url, "cold"), 1, timeout=COLD_FETCH_LOCK_SECONDS)
        except Exception:
            leader = True
        if leader:
            return self._fetch(url)
        deadline = time.monotonic() + COLD_FETCH_WAIT_SECONDS
        while time.monotonic() < deadline:
            time.sleep(0.05)
            keyset = self._from_shared(url)
            if keyset is not None:
                return keyset
        return None


jwks_store = JwksStore()


# --- Revoked sessions (Clerk session.revoked / session.ended webhooks) -------------------------


def revoked_session_key(session_id: str) -> str:
    """Cache key marking a Clerk session revoked (set by the session.* webhooks for REVOKED_SESSION_TTL)."""
    return f"clerk:revoked-sid:v1:{hashlib.sha256(session_id.encode()).hexdigest()[:32]}"


def session_is_revoked(session_id: str) -> bool:
    return session_id in revoked_sessions([session_id])


def revoked_sessions(session_ids: list[str]) -> set[str]:
    """Which of these Clerk sessions were revoked (one cache round trip for all of them).

    Fails open, deliberately (docs/auth.md, "When the revocation store cannot be read"): a
    revoked session's token stays usable for at most its own lifetime (about a minute; Clerk
    mints no new one for it), and a socket opened with it closes when that token expires
    unless re-authenticated with a fresh one, which Clerk no longer issues. Failing closed would
    sign every Clerk user out whenever Redis blinks.
    """
    if not session_ids:
        return set()
    keys = {revoked_session_key(sid): sid for sid in session_ids}
    try:
        found = cache.get_many(list(keys))
    except Exception:
        metrics.revocation_check_errors.inc()
        logger.warning("revoked-session check unavailable (cache error); allowing", exc_info=True)
        return set()
    return {keys[key] for key, value in found.items() if value}


# --- Verification ------------------------------------------------------------------------------


def verify_session_token(token: str) -> dict[str, Any]:
    """The verified claims of a Clerk session token, or ClerkTokenError.

    RS256 only, signed by a key of the configured JWKS; ``exp``, ``nbf``, ``iat``, ``sub`` and
    ``sid`` required; ``iss`` equal to ``CLERK_ISSUER``; ``azp`` in ``CLERK_AUTHORIZED_PARTIES``
    when that list is set; no ``cat`` header but a session token's; the session active (``sts``)
    and not revoked.
    """
    if not clerk_enabled():
        raise _invalid("Clerk is not configured")
    if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_LENGTH:
        raise _invalid("empty or oversized token")
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise _invalid("malformed token") from None
    if header.get("alg") != ALGORITHM:
        raise _invalid(f"alg {str(header.get('alg'))[:16]!r}")
    if "cat" in header and header["cat"] not in SESSION_TOKEN_CATEGORIES:
        raise _invalid(f"not a session token (cat {str(header['cat'])[:32]!r})")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise _invalid("no kid")
    key = jwks_store.signing_key(kid)
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            key,
            algorithms=[ALGORITHM],
            issuer=clerk_issuer(),
            leeway=settings.CLERK_LEEWAY_SECONDS,
            options={"require": [*REQUIRED_CLAIMS, "iss"], "verify_aud": False},
        )
    except jwt.ExpiredSignatureError:
        raise ClerkTokenError(TOKEN_EXPIRED, "The session token has expired.") from None
    except jwt.PyJWTError as exc:
        raise _invalid(f"{type(exc).__name__}: {exc}") from None
    for name in ("sub", "sid"):
        value = claims.get(name)
        if not isinstance(value, str) or not value or len(value) > 64:
            raise _invalid(f"claim {name} is not an id")
    parties = list(settings.CLERK_AUTHORIZED_PARTIES)
    if parties and claims.get("azp") not in parties:
        raise _invalid(f"azp {str(claims.get('azp'))[:100]!r} not authorized")
    if claims.get("sts", "active") != "active":
        # A pending session (v2 tokens: ``sts: "pending"``) has tasks to finish before it may be
        # used: choosing an organization, resetting a password. Clerk's SDKs treat it as signed out.
        raise ClerkTokenError(SESSION_PENDING, "The session has tasks to finish before it can be used.")
    if session_is_revoked(claims["sid"]):
        raise ClerkTokenError(SESSION_REVOKED, "The session has been signed out.")
    return claims


def user_for_session_token(token: str) -> tuple[User, dict[str, Any]]:
    """The active local user of a Clerk session token (created from its claims on first sight), and the claims.

    Raises ClerkTokenError for any token that does not verify, and for a deactivated user.
    """
    from accounts.services import user_get_or_create_from_clerk_claims

    claims = verify_session_token(token)
    user = user_get_or_create_from_clerk_claims(claims=claims)
    if not user.is_active:
        raise ClerkTokenError(USER_INACTIVE, "This account is deactivated.", user=user)
    return user, claims
