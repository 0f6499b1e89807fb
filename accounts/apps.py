from typing import Any

from django.apps import AppConfig


class AccountsConfig(AppConfig):
    name = "accounts"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django.contrib.auth.signals import user_logged_out
        from django.db.models.signals import post_delete, post_save
        from rest_framework.authtoken.models import Token

        user_logged_out.connect(_signed_out, dispatch_uid="accounts.session_signed_out")
        post_save.connect(_saved, sender=self.get_model("User"), dispatch_uid="accounts.password_changed")
        post_delete.connect(_token_deleted, sender=Token, dispatch_uid="accounts.api_token_deleted")


def _saved(sender: Any, instance: Any, created: bool, **kwargs: Any) -> None:
    # ``set_password`` leaves the new raw password on ``_password`` until ``save`` has run this
    # signal (Django's own hook for password validators): a changed password, whoever changed it
    # (``manage.py changepassword``, a reset), ends the credentials made with the old one.
    if not created and getattr(instance, "_password", None) is not None:
        from accounts.services import user_password_changed

        user_password_changed(user=instance)


def _signed_out(sender: Any, request: Any, user: Any, **kwargs: Any) -> None:
    from accounts.services import session_signed_out

    if user is not None and request is not None:
        session_signed_out(user_id=user.pk, session_key=request.session.session_key)


def _token_deleted(sender: Any, instance: Any, **kwargs: Any) -> None:
    from accounts.services import api_token_deleted

    api_token_deleted(user_id=instance.user_id, key=instance.key)
