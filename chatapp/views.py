from __future__ import annotations

from typing import Any

from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET


def clerk_context() -> dict[str, object]:
    """What the pages need to load Clerk's browser SDK when Clerk is configured."""
    from django.conf import settings

    from accounts.clerk import clerk_enabled

    enabled = clerk_enabled() and bool(settings.CLERK_PUBLISHABLE_KEY and settings.CLERK_FRONTEND_API_URL)
    return {
        "clerk_enabled": enabled,
        "clerk_publishable_key": settings.CLERK_PUBLISHABLE_KEY,
        "clerk_js_url": f"{settings.CLERK_FRONTEND_API_URL.rstrip('/')}/npm/@clerk/clerk-js@5/dist/clerk.browser.js",
    }


class LoginView(auth_views.LoginView):
    """Django's login (local users and staff), with Clerk's sign-in beside it when configured."""

    def get_context_data(self, **kwargs: object) -> dict[str, object]:
        return {**super().get_context_data(**kwargs), **clerk_context()}


class LogoutView(auth_views.LogoutView):
    """Django's logout; the browser also drops this site's caches and storage (the offline copies of
    conversations and the outbox), so the next person on this browser finds nothing of ours."""

    def post(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        response = super().post(request, *args, **kwargs)
        response["Clear-Site-Data"] = '"cache", "storage"'
        return response


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
    return render(request, "chat/index.html", {"chat_config": config, **clerk_context()})


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
