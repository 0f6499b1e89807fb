"""Reading a thread's event log for a socket's replay, a page at a time, bounded in bytes.

A replay (docs/realtime.md, "Resuming a large backlog") holds at most one page of events in the
process at a time and writes it only as fast as the client takes it (``messaging.wire.Outflow``),
so what a resuming client costs is about one page, whatever its backlog. A page is bounded by count
(``realtime.BACKLOG_PAGE``) *and* by bytes (``PAGE_BYTES``): events vary from a few hundred bytes
to a few hundred kilobytes (a 100 KB message with its rendered HTML), so a count alone would let
500 large events be half a gigabyte.

The byte bound is applied by the database: a running total of each event's size as JSON text
(``TextSize``), and a row past the bound comes back without its payload, so the process never
loads it. The database measures only the rows the page's count limit lets it read (a window over
an ordered index scan stops at the limit), and the next page's count follows what fitted in the
last one, so it does not measure many rows only to send a few.
"""

from __future__ import annotations

from typing import Any

from django.db.models import Case, F, Func, IntegerField, JSONField, Sum, Value, When, Window
from django.db.models.lookups import LessThan

from threads.models import ThreadEvent

# Roughly what one page of a replay costs the process (as JSON text; the parsed rows weigh a few
# times more while the page is being written).
PAGE_BYTES = 512 * 1024
# The count limit of a replay's first page; later pages follow what fitted (``next_limit``).
FIRST_PAGE = 100
MIN_PAGE = 16
# A replay reads its next page, and writes its next event, only while at most this much of its
# socket's writes waits in the server (Twisted's buffer; the kernel's send buffer holds more
# beyond it): the flow-control mark (messaging.consumers ChatConsumer._replay).
UNSENT_MARK = 64 * 1024


class TextSize(Func):
    """Bytes of a JSON value as text: what an event weighs once loaded and framed (near enough:
    PostgreSQL's text form has a space after each ``:`` and ``,``, the frame has none)."""

    output_field = IntegerField()

    def as_postgresql(self, compiler: Any, connection: Any, **extra: Any) -> Any:
        # pg_column_size would read only the stored size, but that is after TOAST compression: a
        # 100 KB body of one repeated letter is stored in a few hundred bytes.
        return self.as_sql(compiler, connection, template="octet_length(%(expressions)s::text)", **extra)

    def as_sqlite(self, compiler: Any, connection: Any, **extra: Any) -> Any:
        return self.as_sql(compiler, connection, template="length(%(expressions)s)", **extra)


def thread_events_page(
    *, thread_id: int, after: int, limit: int, max_bytes: int = PAGE_BYTES
) -> tuple[list[tuple[int, dict[str, Any]]], bool]:
    """The next logged events of a thread after sequence ``after``, in order: at most ``limit``,
    and no more than ``max_bytes`` of JSON after the first (which always comes, however large).

    Returns ``(rows, more)``: ``rows`` as ``(seq, exact event JSON)``; ``more`` is False when the log
    had nothing after them at the time of the read. One query. The caller has checked access (the
    socket subscribed through thread_get_for_member).
    """
    size = TextSize("payload")
    before = Window(Sum(size), order_by=F("sequence").asc()) - size  # bytes of the page before this row
    fits = LessThan(F("before"), Value(max_bytes))
    fitting = Case(When(fits, then=F("payload")), default=None, output_field=JSONField())
    found = list(
        ThreadEvent.objects.filter(thread_id=thread_id, sequence__gt=after)
        .order_by("sequence")
        .annotate(before=before)
        .values_list("sequence", fitting)[:limit]
    )
    rows = [(int(seq), payload) for seq, payload in found if payload is not None]
    return rows, len(rows) < len(found) or len(found) == limit


def next_limit(fitted: int, most: int) -> int:
    """The next page's count limit: twice what fitted in the last one (at least ``MIN_PAGE``, at most ``most``)."""
    return min(most, max(MIN_PAGE, 2 * fitted))
