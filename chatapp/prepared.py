"""A queryset compiled to SQL once per database and run again with new values.

Django compiles a queryset (``filter`` → ``Query.add_q`` → ``SQLCompiler.as_sql``) every time one
is built and evaluated. For a filtered join that is ~0.2 ms of CPU, two thirds of the lookup;
the membership check that every socket frame, every request and every send makes was the largest
single cost in a send (docs/benchmarks.md). ``PreparedQuery`` builds the queryset once per
database with placeholder values, keeps the compiler's SQL and its row-to-model plan (columns,
converters, ``select_related`` populators: Django's own, as ``ModelIterable`` uses them), and
afterwards only executes the SQL with the real values.

The values must be plain parameters of the SQL (``field=value`` filters on integer or text
columns), each appearing once: building checks that every placeholder is found exactly once in
the compiled parameters, so a queryset this cannot replay fails at the first call rather than
answering wrongly. tests/test_prepared.py compares it with the ORM on every backend the suite runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from django.db import connections
from django.db.models import Model, QuerySet
from django.db.models.query import get_related_populators
from django.db.models.sql.compiler import SQLCompiler

M = TypeVar("M", bound=Model)

# Placeholders no real id takes; each must come out of the compiler as one parameter.
_PLACEHOLDER_BASE = -7_340_031


@dataclass(frozen=True)
class _Plan:
    db: str
    sql: str
    params: tuple[Any, ...]
    positions: tuple[int, ...]  # where each named value goes in ``params``
    compiler: SQLCompiler
    converters: dict[int, Any]
    model: type[Model]
    init_list: list[str]
    model_slice: slice
    populators: list[Any]


class PreparedQuery(Generic[M]):
    """``build(**values)`` returns the queryset; ``first(**values)`` runs its SQL, compiled once per database.

    >>> members = PreparedQuery(lambda thread_id, user_id: Participant.objects.filter(
    ...     thread_id=thread_id, user_id=user_id).select_related("thread"), "thread_id", "user_id")
    >>> members.first(thread_id=4, user_id=9)
    """

    def __init__(self, build: Callable[..., QuerySet[M]], *names: str) -> None:
        self.build = build
        self.names = names
        self._plans: dict[str, _Plan] = {}

    def _plan(self, using: str | None) -> _Plan:
        placeholders = {name: _PLACEHOLDER_BASE - i for i, name in enumerate(self.names)}
        queryset = self.build(**placeholders)
        db = using or queryset.db
        compiler = queryset.query.get_compiler(using=db)
        sql, params = compiler.as_sql()
        positions = []
        for name, value in placeholders.items():
            found = [i for i, param in enumerate(params) if param == value]
            if len(found) != 1:
                raise ValueError(f"{name!r} is not one plain parameter of the compiled query")
            positions.append(found[0])
        select, klass_info = compiler.select, compiler.klass_info
        if klass_info is None or compiler.annotation_col_map:
            raise ValueError("only a query of model rows without annotations can be prepared")
        fields = klass_info["select_fields"]
        start, end = fields[0], fields[-1] + 1
        return _Plan(
            db=db,
            sql=sql,
            params=tuple(params),
            positions=tuple(positions),
            compiler=compiler,
            converters=compiler.get_converters([s[0] for s in select[: compiler.col_count]]),
            model=klass_info["model"],
            init_list=[column[0].target.attname for column in select[start:end]],
            model_slice=slice(start, end),
            populators=get_related_populators(klass_info, select, db),  # type: ignore[call-arg]  # Django 5.2's
        )

    def all(self, *, using: str | None = None, **values: Any) -> list[M]:
        key = using or ""
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = self._plan(using)
        params = list(plan.params)
        for name, position in zip(self.names, plan.positions, strict=True):
            params[position] = values[name]
        with connections[plan.db].cursor() as cursor:
            cursor.execute(plan.sql, params)
            rows: Sequence[Any] = cursor.fetchall()
        if plan.converters:
            rows = list(plan.compiler.apply_converters(rows, plan.converters))
        objects = []
        for row in rows:
            obj = plan.model.from_db(plan.db, plan.init_list, row[plan.model_slice])
            for populator in plan.populators:
                populator.populate(row, obj)
            objects.append(obj)
        return objects  # type: ignore[return-value]

    def first(self, *, using: str | None = None, **values: Any) -> M | None:
        """The one row's model (the query is on a unique key), or None."""
        found = self.all(using=using, **values)
        return found[0] if found else None
