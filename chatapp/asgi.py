"""The one ASGI application: the client's address and scheme from the trusted proxies (chatapp/proxy.py),
then HTTP to Django, websockets through origin check and authentication."""

from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatapp.settings")
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter  # noqa: E402

from accounts.ws_auth import WebsocketAuthMiddleware  # noqa: E402
from chatapp.proxy import TrustedProxyMiddleware  # noqa: E402
from chatapp.routing import websocket_app  # noqa: E402
from chatapp.ws_origin import origin_validator  # noqa: E402

application = TrustedProxyMiddleware(
    ProtocolTypeRouter(
        {
            "http": django_asgi_app,
            "websocket": origin_validator(WebsocketAuthMiddleware(websocket_app)),
        }
    )
)
