from __future__ import annotations

import factory
from factory.django import DjangoModelFactory

from accounts.models import SystemRole, User


class UserFactory(DjangoModelFactory):
    class Meta:
        model = User
        django_get_or_create = ("username",)
        skip_postgeneration_save = True

    username = factory.Sequence(lambda n: f"user{n}")
    display_name = factory.LazyAttribute(lambda o: o.username.title())
    email = factory.LazyAttribute(lambda o: f"{o.username}@example.test")
    system_role = SystemRole.MEMBER
    password = factory.PostGenerationMethodCall("set_password", "pw-for-tests-123")

    @factory.post_generation
    def staff_flags(self, create: bool, extracted: object, **kwargs: object) -> None:
        self.is_staff = self.system_role in (SystemRole.OWNER, SystemRole.ADMIN)
        self.is_superuser = self.system_role == SystemRole.OWNER
        if create:
            self.save()  # type: ignore[attr-defined]
