"""What PostgreSQL can store, checked once where input enters: the JSON decoders (request bodies,
socket frames, webhooks), the form parsers and the request middleware (paths, query strings, headers).

PostgreSQL's ``text`` and ``jsonb`` hold any Unicode scalar value except NUL; a lone UTF-16
surrogate (``"\\ud800"`` in JSON) is not one and cannot even be encoded as UTF-8, and ``jsonb`` has no
NaN or infinity. Refusing these at decode time, with the field named, makes every place behind the
edge safe without a check of its own; refusing deep nesting there keeps the recursive code behind it
(serializers, ``copy.deepcopy``, ``json.dumps``) far from Python's recursion limit.

Hand-written because no kept library states these rules: the standard decoder accepts all of it,
and DRF's validators cover only the fields they declare (not object keys, ``DictField`` values or
frames), while a stricter decoder would still not know PostgreSQL's NUL rule or our depth bound.
"""

from __future__ import annotations

import codecs
import json
import math
from collections.abc import Iterable
from typing import Any

# Deeper than any document the API or the socket protocol defines (preferences are the deepest, a
# few levels), far below where the decoder or the code behind it would run out of stack.
MAX_JSON_DEPTH = 32

NUL = "Must not contain NUL characters."
SURROGATE = "Must be valid Unicode text (no lone surrogates such as \\ud800)."
TOO_DEEP = f"Nested more than {MAX_JSON_DEPTH} levels deep."
NOT_FINITE = "Numbers must be finite."

Path = tuple[str | int, ...]


class Unstorable(ValueError):
    """Input that must be refused. ``field`` names the top-level field it came in (None when the
    document as a whole is malformed: not JSON, or nested past the decoder itself)."""

    def __init__(self, message: str, *, path: Path | None = None) -> None:
        self.path = path
        self.field: str | None = None
        if path is not None:
            self.field = str(path[0]) if path and isinstance(path[0], str) else "non_field_errors"
            if len(path) > 1 and message != TOO_DEEP:
                message = f"{message[:-1]} (at {_dotted(path)})."
        super().__init__(message)
        self.message = message

    def fields(self) -> dict[str, list[str]]:
        return {self.field or "non_field_errors": [self.message]}


def _dotted(path: Path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else part
    return out


def text_problem(value: str) -> str | None:
    """Why ``value`` cannot be stored as PostgreSQL text, or None when it can."""
    if "\x00" in value:
        return NUL
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return SURROGATE
    return None


def json_problem(value: Any, *, max_depth: int = MAX_JSON_DEPTH) -> Unstorable | None:
    """The first thing in a decoded JSON value that cannot be stored (in document order), or None.

    Iterative, so a deep value is measured without recursing.
    """
    stack: list[tuple[Any, Path, int]] = [(value, (), 0)]
    while stack:
        item, path, depth = stack.pop()
        if isinstance(item, str):
            problem = text_problem(item)
            if problem:
                return Unstorable(problem, path=path)
        elif isinstance(item, float):
            if not math.isfinite(item):
                return Unstorable(NOT_FINITE, path=path)
        elif isinstance(item, (dict, list)):
            if depth >= max_depth:
                return Unstorable(TOO_DEEP, path=path)
            children: Iterable[tuple[str | int, Any]]
            if isinstance(item, dict):
                for key in item:
                    problem = text_problem(key)
                    if problem:
                        return Unstorable(problem, path=(*path, _printable_name(key)))
                children = item.items()
            else:
                children = enumerate(item)
            stack.extend((child, (*path, key), depth + 1) for key, child in reversed(list(children)))
    return None


def refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def loads(raw: str | bytes) -> Any:
    """Decode JSON strictly: standard JSON only (no NaN/Infinity), every string storable text,
    every number finite, nesting at most ``MAX_JSON_DEPTH``. Raises :class:`Unstorable`."""
    try:
        value = json.loads(raw, parse_constant=refuse_constant)
    except RecursionError:
        raise Unstorable(f"Not valid JSON: nested far more than {MAX_JSON_DEPTH} levels deep.") from None
    except ValueError as exc:  # JSONDecodeError, bad UTF-8, an integer past Python's digit limit
        raise Unstorable(f"Not valid JSON: {exc}.") from None
    problem = json_problem(value)
    if problem is not None:
        raise problem
    return value


# Charsets whose decoder yields only Unicode scalar values (UTF-7 and the escape codecs can yield
# lone surrogates from plain ASCII bytes).
SAFE_CHARSETS = frozenset(
    {"utf-8", "utf-8-sig", "ascii", "iso8859-1", "utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-32-be"}
)


def safe_charset(name: str) -> bool:
    try:
        return codecs.lookup(name).name in SAFE_CHARSETS
    except LookupError:
        return False


def pairs_problems(pairs: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    """Problems of decoded name/value text pairs (a query string, form fields, headers), by name."""
    found: dict[str, list[str]] = {}
    for name, value in pairs:
        problem = text_problem(name) or text_problem(value)
        if problem:
            found.setdefault(_printable_name(name), [problem])
    return found


def _printable_name(name: str) -> str:
    """A field name fit to echo back in an error (a bad name itself is shown escaped)."""
    if text_problem(name) is None:
        return name
    return name.encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace").replace("\x00", "\\x00")
