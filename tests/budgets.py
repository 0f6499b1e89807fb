"""Helpers for tests that spend the send budget.

The budget is a sliding log (messaging/ratelimits.py): a test that fills it is refused until its
oldest send is a window old, whenever it starts, so nothing here waits for a "fresh" window.
"""

from __future__ import annotations

from messaging.ratelimits import budget_storage


def clear_send_budgets() -> None:
    """Forget every user's logged sends (in the shared Redis, or in this process's memory)."""
    budget_storage().reset()
