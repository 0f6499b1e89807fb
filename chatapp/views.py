from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET

from chatapp import known_device
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


def _password_refused(request: HttpRequest) -> RateLimited | None:
    """Spend one password attempt (shared with the API's token login) of the client address's budget
    and the account's, before the password is checked: the refusal when one is spent, else None."""
    try:
        password_attempt_check(request, username=request.POST.get("username", ""))
    except RateLimited as exc:
        return exc
    return None


def _too_many(response: HttpResponse, refusal: RateLimited) -> HttpResponse:
    response.status_code = 429
    response["Retry-After"] = str(refusal.retry_after)
    return response


def _remember_if_signed_in(request: HttpRequest, response: HttpResponse) -> HttpResponse:
    """A sign-in form that has just signed in the account it was given (a redirect) marks this browser
    as a known device of that account (chatapp.known_device)."""
    username = request.POST.get("username", "")
    user = getattr(request, "user", None)
    if (
        response.status_code == 302
        and user is not None
        and user.is_authenticated
        and known_device.account_key(user.get_username()) == known_device.account_key(username)
    ):
        known_device.remember(response, username=username)
    return response


def password_attempts_limited(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    """A sign-in form's POST is refused (429 with Retry-After) once the password budget is spent;
    a successful one marks the browser as a known device of the account."""

    @functools.wraps(view)
    def limited(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if request.method != "POST":
            return view(request, *args, **kwargs)
        if (refusal := _password_refused(request)) is not None:
            text = f"{refusal.message} Try again in {refusal.retry_after} seconds."
            return _too_many(HttpResponse(text, content_type="text/plain; charset=utf-8"), refusal)
        return _remember_if_signed_in(request, view(request, *args, **kwargs))

    return limited


class LoginView(auth_views.LoginView):
    """Django's login (local users and staff), with Clerk's sign-in beside it when configured.
    Password attempts are limited per client address and per account like the API's token login."""

    def post(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if (refusal := _password_refused(request)) is not None:
            page = self.render_to_response(
                self.get_context_data(retry_after=refusal.retry_after, refusal=refusal.message)
            )
            return _too_many(page, refusal)
        return _remember_if_signed_in(request, super().post(request, *args, **kwargs))

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
