"""Users of a shared batchdb: PostgreSQL roles plus their weight and budgets.

A user *is* a login role in one of batchdb's group roles (see
sql/migrations/0005_users.sql): row-level security then shows it only its own
jobs through every way in — SQL, the SDK, the CLI, the dashboard and Dagster.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import psycopg

from batchdb.queries import query

# batchdb.users.team's check (0021).
TEAM_NAME = re.compile(r"^[a-z_][a-z0-9_.-]{0,62}$")


class UserKind(enum.StrEnum):
    USER = "user"  # sees and changes only its own jobs
    ADMIN = "admin"  # sees and changes every job
    WORKER = "worker"  # the role worker processes connect as: claims everyone's rows


@dataclass(frozen=True, slots=True)
class User:
    name: str
    kind: str
    weight: float
    budget_usd_day: Decimal | None
    budget_usd_month: Decimal | None
    email: str | None
    spent_today_usd: Decimal
    spent_month_usd: Decimal
    # Users of one team may reuse one another's answers (submit(reuse_scope="team"), 0021).
    team: str | None = None


def add_user(
    conn: psycopg.Connection[Any],
    name: str,
    *,
    kind: UserKind = UserKind.USER,
    weight: float | None = None,
    budget_usd_day: float | None = None,
    budget_usd_month: float | None = None,
    email: str | None = None,
    password: str | None = None,
    team: str | None = None,
) -> None:
    """Create the login role (if missing), put it in its group role, and save its settings.

    Run again to change settings: options left as None keep their current value; `team=""`
    takes the user out of their team. Users of one team may reuse one another's answers
    (`submit(reuse="exact", reuse_scope="team")`); nothing else crosses users.

        >>> add_user(conn, "alice", team="analytics")  # doctest: +SKIP
    """
    if weight is not None and not (0.001 <= weight <= 1000):
        raise ValueError(f"weight: expected a number from 0.001 to 1000, got {weight!r}")
    for field, value in (("budget_usd_day", budget_usd_day), ("budget_usd_month", budget_usd_month)):
        if value is not None and not value > 0:
            raise ValueError(f"{field}: expected a positive amount in USD, got {value!r}")
    conn.execute(
        query("add_user"),
        {
            "name": name,
            "kind": str(UserKind(kind)),
            "weight": weight,
            "budget_usd_day": budget_usd_day,
            "budget_usd_month": budget_usd_month,
            "email": email,
            "password": password,
        },
    )
    if team is not None:
        if team and not TEAM_NAME.match(team):
            raise ValueError(
                f"team: expected 1-63 lowercase letters, digits, _ . - starting with a letter or _, got {team!r}"
            )
        conn.execute(query("set_user_team"), {"name": name, "team": team or None})


def list_users(conn: psycopg.Connection[Any]) -> list[User]:
    """Every user this role may see (an ordinary user sees only itself)."""
    with conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        return [User(**row) for row in cur.execute(query("list_users")).fetchall()]
