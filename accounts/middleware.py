"""Pages (not the API) accept Clerk's ``__session`` cookie too, so the web chat works for Clerk users.

Clerk's browser SDK keeps the short-lived session token fresh in that cookie; each page request
verifies it with the same verifier as the API and the socket. Nothing is stored in a Django
session, so signing out of Clerk signs out of the page. Django's own login (staff, local users)
still wins when present.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from django.http import HttpRequest, HttpResponse

from accounts.clerk import SESSION_COOKIE, ClerkTokenError, clerk_enabled, user_for_session_token

logger = logging.getLogger(__name__)


class ClerkSessionMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        token = request.COOKIES.get(SESSION_COOKIE)
        user = getattr(request, "user", None)
        if token and clerk_enabled() and not request.path.startswith("/api/") and not (user and user.is_authenticated):
            try:
                request.user, _ = user_for_session_token(token)
            except ClerkTokenError as exc:
                logger.info("page request with an unusable Clerk session token: %s", exc.reason)
        return self.get_response(request)
