"""A local stand-in for a Clerk instance: RSA keys, its JWKS served over HTTP on 127.0.0.1 (a free port,
a request counter), session tokens signed with PyJWT, webhooks signed with svix's own library.
No network and no mock of PyJWT or svix.

Test modules make their own fixture::

    @pytest.fixture
    def clerk(settings):
        with clerk_environment(settings) as env:
            yield env
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import hmac
import json
import secrets
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from svix.webhooks import Webhook

from accounts.clerk import jwks_store

AZP = "https://chat.example.test"
CLERK_ID = "user_2abcDEFghiJKLmno"
SESSION_ID = "sess_2abcDEFghiJKLmno"
WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"chatapp-test-webhook-secret-32b!").decode()


@functools.cache
def rsa_key(name: str) -> rsa.RSAPrivateKey:
    """One 2048-bit key per name for the whole run (generating it is the slow part)."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_jwk(key: rsa.RSAPrivateKey, kid: str) -> dict[str, Any]:
    jwk: dict[str, Any] = jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return {**jwk, "kid": kid, "use": "sig", "alg": "RS256"}


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64json(value: Any) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode())


class JwksServer:
    """Serves a JWKS on 127.0.0.1 (free port); counts requests; ``status`` other than 200 is an outage."""

    def __init__(self) -> None:
        self.requests = 0
        self.status = 200
        self._document: dict[str, Any] = {"keys": []}
        self._lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with owner._lock:
                    owner.requests += 1
                    status = owner.status
                    body = json.dumps(owner._document).encode()
                if self.path != "/.well-known/jwks.json":
                    status, body = 404, b"{}"
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._httpd: ThreadingHTTPServer | None = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        host, port = self._httpd.server_address[:2]
        self.base_url = f"http://{host!s}:{port}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    @property
    def jwks_url(self) -> str:
        return f"{self.base_url}/.well-known/jwks.json"

    def serve(self, *jwks: dict[str, Any]) -> None:
        """Publish these keys (a rotation is serving a new set)."""
        with self._lock:
            self._document = {"keys": list(jwks)}

    def stop(self) -> None:
        """The JWKS endpoint goes away: connections are refused from now on."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=5)
            self._httpd = None


class ClerkEnv:
    """The CLERK_* settings of one test, pointing at a local JWKS server; mints tokens and signs webhooks.

    The issuer is the server's base URL, so the JWKS URL derived from it (``<issuer>/.well-known/jwks.json``)
    is the same server.
    """

    def __init__(self, settings: Any, server: JwksServer) -> None:
        self.settings = settings
        self.server = server
        self.issuer = server.base_url
        self.key = rsa_key("clerk-main")
        self.kid = "ins_kid_main"
        server.serve(public_jwk(self.key, self.kid))

    def claims(self, without: tuple[str, ...] = (), **overrides: Any) -> dict[str, Any]:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": CLERK_ID,
            "sid": SESSION_ID,
            "azp": AZP,
            "iat": now - 2,
            "nbf": now - 12,
            "exp": now + 60,
            **overrides,
        }
        for name in without:
            claims.pop(name, None)
        return claims

    def token(
        self,
        *,
        key: rsa.RSAPrivateKey | None = None,
        kid: str | None = None,
        algorithm: str = "RS256",
        without: tuple[str, ...] = (),
        headers: dict[str, Any] | None = None,
        **claims: Any,
    ) -> str:
        """A session token as Clerk signs it; any claim can be overridden or left out (``without``),
        and header fields added (``headers``, e.g. Clerk's ``cat``).

        Signed through PyJWS so claims PyJWT would refuse to encode (a non-string ``sub``) can be tested.
        """
        payload = json.dumps(self.claims(without, **claims), separators=(",", ":")).encode()
        header = {"kid": kid or self.kid, "typ": "JWT", **(headers or {})}
        return jwt.api_jws.PyJWS().encode(payload, key or self.key, algorithm=algorithm, headers=header)

    def token_alg_none(self) -> str:
        return f"{b64json({'alg': 'none', 'typ': 'JWT', 'kid': self.kid})}.{b64json(self.claims())}."

    def token_hs256_with_public_pem(self) -> str:
        """The algorithm-confusion forgery: HMAC-SHA256 keyed with the published public key's PEM."""
        pem = self.key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        signing_input = f"{b64json({'alg': 'HS256', 'typ': 'JWT', 'kid': self.kid})}.{b64json(self.claims())}"
        mac = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
        return f"{signing_input}.{b64url(mac)}"

    def token_tampered(self, **claims: Any) -> str:
        """A genuine token whose payload was swapped after signing."""
        header, _, signature = self.token().split(".")
        return f"{header}.{b64json(self.claims(**claims))}.{signature}"

    def svix_headers(
        self,
        body: str,
        *,
        msg_id: str | None = None,
        timestamp: datetime | None = None,
        secret: str | None = None,
    ) -> dict[str, str]:
        """The headers Svix sends with ``body``, signed by svix's own library."""
        msg_id = msg_id or f"msg_{secrets.token_hex(12)}"
        timestamp = timestamp or datetime.now(tz=UTC)
        signature = Webhook(secret or self.settings.CLERK_WEBHOOK_SECRET).sign(msg_id, timestamp, body)
        return {"svix-id": msg_id, "svix-timestamp": str(int(timestamp.timestamp())), "svix-signature": signature}


@contextlib.contextmanager
def clerk_environment(settings: Any) -> Iterator[ClerkEnv]:
    """Clerk on for one test: CLERK_* settings (read at call time) pointing at a fresh local JWKS server."""
    server = JwksServer()
    env = ClerkEnv(settings, server)
    settings.CLERK_ISSUER = env.issuer
    settings.CLERK_JWKS_URL = server.jwks_url
    settings.CLERK_AUTHORIZED_PARTIES = [AZP]
    settings.CLERK_LEEWAY_SECONDS = 5
    settings.CLERK_WEBHOOK_SECRET = WEBHOOK_SECRET
    # Ports are reused between tests: no process copy of another test's keys may survive.
    jwks_store.forget()
    try:
        yield env
    finally:
        jwks_store.forget()
        server.stop()


def clerk_user_payload(
    *,
    id: str = CLERK_ID,
    username: str | None = "ada",
    first_name: str = "Ada",
    last_name: str = "Lovelace",
    email: str = "ada@example.test",
    image_url: str = "https://img.clerk.com/ada.png",
    updated_at: int = 1_700_000_000_000,
    role: str | None = None,
) -> dict[str, Any]:
    """A Clerk user object as user.created / user.updated carry it (primary email among several)."""
    return {
        "object": "user",
        "id": id,
        "username": username,
        "first_name": first_name,
        "last_name": last_name,
        "image_url": image_url,
        "primary_email_address_id": "idn_primary",
        "email_addresses": [
            {"object": "email_address", "id": "idn_old", "email_address": "old@example.test"},
            {"object": "email_address", "id": "idn_primary", "email_address": email},
        ],
        "public_metadata": {"role": role} if role else {},
        "private_metadata": {},
        "created_at": 1_690_000_000_000,
        "updated_at": updated_at,
    }


def clerk_event(event_type: str, data: dict[str, Any]) -> str:
    """The JSON body of a Clerk webhook delivery."""
    return json.dumps({"object": "event", "type": event_type, "data": data, "timestamp": int(time.time() * 1000)})
