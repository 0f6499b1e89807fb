"""Request parsers for the API (a module of its own: DRF imports it while its views module loads).

Every body is checked here, once, for what PostgreSQL cannot store (:mod:`chatapp.storable`): a
refused value is a 400 ``invalid`` naming its field, a body that is not JSON a 400 ``malformed``.
"""

from __future__ import annotations

from typing import Any

from rest_framework import parsers
from rest_framework.exceptions import ParseError, ValidationError

from chatapp import storable


class JSONParser(parsers.JSONParser):
    """Strict JSON (:func:`chatapp.storable.loads`): no NaN, no lone surrogates or NUL in any string
    or key, finite numbers, at most ``MAX_JSON_DEPTH`` levels."""

    def parse(self, stream: Any, media_type: str | None = None, parser_context: Any = None) -> Any:
        # DRF's own charset check (text codecs only: no bz2_codec bombs); its stubs do not list it.
        encoding = parsers.get_encoding(parser_context or {})  # type: ignore[attr-defined]
        try:
            text = stream.read().decode(encoding)
        except UnicodeDecodeError as exc:
            raise ParseError(f"JSON parse error - {exc}") from None
        try:
            return storable.loads(text)
        except storable.Unstorable as exc:
            if exc.field is None:
                raise ParseError(f"JSON parse error - {exc.message}") from None
            raise ValidationError(exc.fields()) from None


def _check_form(data: Any, files: Any = None) -> None:
    """Form fields (and upload file names) are text PostgreSQL can store, or the form is refused."""
    pairs = [(key, value) for key, values in data.lists() for value in values if isinstance(value, str)]
    if files is not None:
        pairs += [(key, upload.name or "") for key, uploads in files.lists() for upload in uploads]
    problems = storable.pairs_problems(pairs)
    if problems:
        raise ValidationError(problems)


class FormParser(parsers.FormParser):
    def parse(self, stream: Any, media_type: str | None = None, parser_context: Any = None) -> Any:
        data = super().parse(stream, media_type, parser_context)
        _check_form(data)
        return data


class MultiPartParser(parsers.MultiPartParser):
    def parse(self, stream: Any, media_type: str | None = None, parser_context: Any = None) -> Any:
        parsed = super().parse(stream, media_type, parser_context)
        _check_form(parsed.data, parsed.files)
        return parsed
