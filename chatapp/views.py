from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET

from chatapp.errors import RateLimited
from chatapp.ratelimit import password_attempt_check


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


def _password_refused(request: HttpRequest) -> int | None:
    """Spend one attempt of the client address's password budget (shared with the API's token
    login), before the password is checked: the seconds to wait when it is spent, else None."""
    try:
        password_attempt_check(request)
    except RateLimited as exc:
        return int(exc.retry_after)
    return None


def _too_many(response: HttpResponse, retry_after: int) -> HttpResponse:
    response.status_code = 429
    response["Retry-After"] = str(retry_after)
    return response


def password_attempts_limited(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    """A sign-in form's POST is refused (429 with Retry-After) once the password budget is spent."""

    @functools.wraps(view)
    def limited(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if request.method == "POST" and (retry_after := _password_refused(request)) is not None:
            text = f"Too many sign-in attempts from your address. Try again in {retry_after} seconds."
            return _too_many(HttpResponse(text, content_type="text/plain; charset=utf-8"), retry_after)
        return view(request, *args, **kwargs)

    return limited


class LoginView(auth_views.LoginView):
    """Django's login (local users and staff), with Clerk's sign-in beside it when configured.
    Password attempts are limited per client address like the API's token login."""

    def post(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if (retry_after := _password_refused(request)) is not None:
            page = self.render_to_response(self.get_context_data(retry_after=retry_after))
            return _too_many(page, retry_after)
        return super().post(request, *args, **kwargs)

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
