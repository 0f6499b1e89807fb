from typing import Any

from django.apps import AppConfig


class AccountsConfig(AppConfig):
    name = "accounts"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django.contrib.auth.signals import user_logged_out

        user_logged_out.connect(_signed_out, dispatch_uid="accounts.session_signed_out")


def _signed_out(sender: Any, request: Any, user: Any, **kwargs: Any) -> None:
    from accounts.services import session_signed_out

    if user is not None and request is not None:
        session_signed_out(user_id=user.pk, session_key=request.session.session_key)
