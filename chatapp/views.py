from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET


@login_required
def home(request: HttpRequest) -> HttpResponse:
    """The web chat. Its data comes from the API and the socket; this only hands over the config."""
    from django.conf import settings

    user = request.user
    config = {
        "user": {"id": user.pk, "username": user.get_username(), "name": getattr(user, "name", user.get_username())},
        "api": "/api/v1",
        "ws_path": "/ws/",
        "max_message_bytes": settings.CHAT_MAX_MESSAGE_BYTES,
        "heartbeat_seconds": settings.CHAT_HEARTBEAT_SECONDS,
        "service_worker": "/sw.js",
    }
    return render(
        request, "chat/index.html", {"chat_config": config, "clerk_enabled": settings.CLERK_ENABLED}
    )


def service_worker(request: HttpRequest) -> HttpResponse:
    """The service worker, served from the root so its scope covers the page."""
    from django.contrib.staticfiles import finders

    path = finders.find("chat/sw.js")
    with open(str(path), encoding="utf-8") as handle:
        body = handle.read()
    response = HttpResponse(body, content_type="application/javascript")
    response["Service-Worker-Allowed"] = "/"
    response["Cache-Control"] = "no-cache"
    return response


@require_GET
def healthz(request: HttpRequest) -> JsonResponse:
    """The process is alive (it answers). Readiness of its services is /readyz."""
    return JsonResponse({"status": "ok"})
