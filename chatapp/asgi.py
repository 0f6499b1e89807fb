"""The one ASGI application: the client's address and scheme from the trusted proxies (chatapp/proxy.py),
then HTTP to Django, websockets through origin check and authentication."""

from __future__ import annotations

import os
from typing import Any

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatapp.settings")
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter  # noqa: E402

from accounts.ws_auth import WebsocketAuthMiddleware  # noqa: E402
from chatapp.proxy import TrustedProxyMiddleware  # noqa: E402
from chatapp.routing import websocket_app  # noqa: E402
from chatapp.ws_origin import origin_validator  # noqa: E402


def daphne_leaves_bodies_to_django() -> None:
    """Turn off Twisted's own parsing of POST form bodies (``parsePOSTFormSubmission``) under daphne.

    Twisted parses every multipart or urlencoded POST body into ``request.args``, which daphne never
    reads: a body it cannot parse is answered with a bare 400 before the app sees it (not the one
    error shape), and an upload is read into memory and parsed a second time. Django parses bodies.
    """
    try:
        from daphne.http_protocol import WebRequest
    except ImportError:  # pragma: no cover - another ASGI server
        return
    if getattr(WebRequest.__init__, "chatapp_patched", False):
        return
    original = WebRequest.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("parsePOSTFormSubmission", False)
        original(self, *args, **kwargs)

    init.chatapp_patched = True  # type: ignore[attr-defined]
    WebRequest.__init__ = init  # type: ignore[method-assign]


daphne_leaves_bodies_to_django()

application = TrustedProxyMiddleware(
    ProtocolTypeRouter(
        {
            "http": django_asgi_app,
            "websocket": origin_validator(WebsocketAuthMiddleware(websocket_app)),
        }
    )
)
