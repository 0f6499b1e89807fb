"""``GET /metrics``: Prometheus exposition, behind a bearer token or loopback-only."""

from __future__ import annotations

import hmac
import ipaddress

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET
from prometheus_client.exposition import choose_encoder

from chatapp import metrics as chat_metrics
from chatapp.errors import error_body
from chatapp.proxy import forwarded_beyond_trust


def _is_direct_loopback(request: HttpRequest) -> bool:
    """The client (chatapp.proxy's address) is this machine, and no proxy we do not trust is in between
    (a local proxy that nobody declared in CHATAPP_TRUSTED_PROXY_COUNT would make everyone loopback)."""
    if forwarded_beyond_trust(request.META):
        return False
    try:
        return ipaddress.ip_address(request.META.get("REMOTE_ADDR", "")).is_loopback
    except ValueError:
        return False


def _bearer_token(request: HttpRequest) -> str:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def metrics_access_error(request: HttpRequest) -> JsonResponse | None:
    """None if the caller may scrape; otherwise the 401/403 response to send."""
    expected = settings.METRICS_TOKEN
    if expected:
        if hmac.compare_digest(_bearer_token(request).encode(), expected.encode()):
            return None
        response = JsonResponse(
            error_body("unauthenticated", "A valid bearer token is required for /metrics."), status=401
        )
        response["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return response
    if _is_direct_loopback(request):
        return None
    return JsonResponse(
        error_body("forbidden", "Set CHATAPP_METRICS_TOKEN to scrape /metrics from another host."), status=403
    )


@never_cache
@require_GET
def metrics(request: HttpRequest) -> HttpResponse:
    """Prometheus text (or OpenMetrics, if the scraper asks for it) for this process or all of them."""
    refusal = metrics_access_error(request)
    if refusal is not None:
        return refusal
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    return HttpResponse(encoder(chat_metrics.exposition_registry()), content_type=content_type)
