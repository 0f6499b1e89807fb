"""Small shared pieces for the DRF views: strict input parsing."""

from __future__ import annotations

from typing import Any

from rest_framework import serializers


class StrictSerializer(serializers.Serializer):
    """An input serializer that refuses fields it does not declare (sender, sequence, role...)."""

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        initial = getattr(self, "initial_data", None)
        if isinstance(initial, dict):
            unknown = sorted(set(initial) - set(self.fields))
            read_only = sorted(k for k in initial if k in self.fields and self.fields[k].read_only)
            errors = {k: ["Unknown field."] for k in unknown}
            errors.update({k: ["This field is read-only."] for k in read_only})
            if errors:
                raise serializers.ValidationError(errors)
        return attrs


def parse(serializer_class: type[serializers.Serializer], data: Any, **kwargs: Any) -> dict[str, Any]:
    """Validate request data with ``serializer_class``; DRF's ValidationError becomes the 400 error shape."""
    if not isinstance(data, dict) and not hasattr(data, "getlist"):
        raise serializers.ValidationError({"non_field_errors": ["Expected a JSON object."]})
    serializer = serializer_class(data=data, **kwargs)
    serializer.is_valid(raise_exception=True)
    return dict(serializer.validated_data)
