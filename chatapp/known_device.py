"""Known devices: a browser (or client) that signed in to an account with its password gets a signed
cookie naming that account, and its later password attempts at that account spend a budget of its
own instead of the account's (OWASP's "device cookies" against account lockout). A guess spread over
many addresses then exhausts the account's budget without locking the owner out of the browsers
they already use; a stolen cookie buys only its own budget.

Django's signed cookies do the signing and the expiry (no library offers the rest: django-axes
locks accounts out by username and address, but has no per-device exemption).
"""

from __future__ import annotations

import hashlib
import secrets
import unicodedata
from typing import Any

from django.conf import settings
from django.http import HttpResponseBase

COOKIE = "chatapp_device"
_SALT = "chatapp.known-device"


def account_key(username: str) -> str:
    """The budget key of the account a username names: every spelling that could reach it is one key."""
    return unicodedata.normalize("NFKC", str(username)).strip().casefold()


def _digest(account: str) -> str:
    # The cookie names the account without showing its username.
    return hashlib.sha256(account.encode()).hexdigest()[:32]


def device_for(request: Any, *, account: str) -> str | None:
    """This browser's device id, if its cookie is valid, unexpired and for ``account``; else None."""
    value = request.get_signed_cookie(COOKIE, default=None, salt=_SALT, max_age=settings.KNOWN_DEVICE_DAYS * 86400)
    if not value:
        return None
    device, _, digest = str(value).partition(".")
    return device if device and secrets.compare_digest(digest, _digest(account)) else None


def remember(response: HttpResponseBase, *, username: str) -> None:
    """Mark the client that has just signed in to ``username`` with its password as a known device."""
    response.set_signed_cookie(
        COOKIE,
        f"{secrets.token_urlsafe(16)}.{_digest(account_key(username))}",
        salt=_SALT,
        max_age=settings.KNOWN_DEVICE_DAYS * 86400,
        secure=settings.SESSION_COOKIE_SECURE,
        httponly=True,
        samesite="Lax",
    )
