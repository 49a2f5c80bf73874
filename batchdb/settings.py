"""Every environment variable batchdb reads, named once, with its default and meaning.

Modules read these names from here, never spelled again, so a variable cannot be
renamed in one place and missed in another; `ENVIRONMENT` is the table the README's
"Environment" section lists (tests/test_settings.py holds the code, this table and the
README to the same names). API keys follow the providers' own variables
(`OPENAI_API_KEY`, ...) or `BATCHDB_KEY_<PROVIDER>_<ALIAS>` (batchdb/secrets.py), which
are patterns rather than names and are documented there.

Example:

    >>> from batchdb import settings
    >>> settings.DSN
    'BATCHDB_DSN'
    >>> [v.name for v in settings.ENVIRONMENT][:2]
    ['BATCHDB_DSN', 'BATCHDB_HOME']
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

# Words a yes/no variable may hold (an empty value is no).
TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "off", ""})


def is_true(value: str) -> bool:
    return value.strip().lower() in TRUE_WORDS


def _positive_number(value: str) -> str | None:
    try:
        ok = float(value) > 0
    except ValueError:
        ok = False
    return None if ok else "expected a number of seconds above 0"


def _port(value: str) -> str | None:
    return None if value.strip().isdigit() and 0 < int(value) < 65536 else "expected a port number (1-65535)"


def _pooler(value: str) -> str | None:
    return None if value.strip().lower() in ("auto", "none", "transaction") else "expected auto, none or transaction"


def _boolean(value: str) -> str | None:
    return None if value.strip().lower() in TRUE_WORDS | FALSE_WORDS else "expected true or false"


@dataclass(frozen=True, slots=True)
class EnvVar:
    name: str
    default: str
    meaning: str
    # Says what is wrong with a set value (None: fine); None for free text.
    check: Callable[[str], str | None] | None = None


DSN = "BATCHDB_DSN"
HOME = "BATCHDB_HOME"
SECRETS_FILE = "BATCHDB_SECRETS_FILE"
AZURE_API_VERSION = "BATCHDB_AZURE_API_VERSION"
WEBHOOK_SECRET = "BATCHDB_WEBHOOK_SECRET"
SMTP_HOST = "BATCHDB_SMTP_HOST"
SMTP_PORT = "BATCHDB_SMTP_PORT"
SMTP_USERNAME = "BATCHDB_SMTP_USERNAME"
SMTP_PASSWORD = "BATCHDB_SMTP_PASSWORD"
SMTP_STARTTLS = "BATCHDB_SMTP_STARTTLS"
SMTP_FROM = "BATCHDB_SMTP_FROM"
OUTPUT_ROOT = "BATCHDB_OUTPUT_ROOT"
DASHBOARD_REFRESH = "BATCHDB_DASHBOARD_REFRESH"
DASHBOARD_OUTPUTS = "BATCHDB_DASHBOARD_OUTPUTS"
POOLER = "BATCHDB_POOLER"
LISTEN_DSN = "BATCHDB_LISTEN_DSN"
METRICS_PORT = "BATCHDB_METRICS_PORT"

DEFAULT_OUTPUT_ROOT = "batchdb-output"

ENVIRONMENT: tuple[EnvVar, ...] = (
    EnvVar(DSN, "(the embedded server)", "the PostgreSQL database every part uses (`--dsn` overrides it)"),
    EnvVar(HOME, "~/.local/share/batchdb", "where the embedded PostgreSQL and the dev logs live"),
    EnvVar(POOLER, "auto", "`transaction`: the DSN goes through PgBouncer in transaction mode", _pooler),
    EnvVar(LISTEN_DSN, "(the DSN; none through a pooler)", "a direct connection for LISTEN beside a pooler"),
    EnvVar(SECRETS_FILE, "(none)", "a TOML file of API keys and endpoints by provider and alias"),
    EnvVar(AZURE_API_VERSION, "(the SDK's)", "the Azure OpenAI API version"),
    EnvVar(WEBHOOK_SECRET, "(none)", "the signing secret `batchdb submit --webhook-url` uses"),
    EnvVar(SMTP_HOST, "(no email)", "the SMTP server job emails go through"),
    EnvVar(SMTP_PORT, "587 with STARTTLS, else 25", "its port", _port),
    EnvVar(SMTP_USERNAME, "(none)", "its login"),
    EnvVar(SMTP_PASSWORD, "(none)", "its password"),
    EnvVar(SMTP_STARTTLS, "true when a username is set", "whether to STARTTLS", _boolean),
    EnvVar(SMTP_FROM, "batchdb@<host>", "the sender address"),
    EnvVar(OUTPUT_ROOT, DEFAULT_OUTPUT_ROOT, "where the Dagster example writes its Parquet outputs"),
    EnvVar(DASHBOARD_REFRESH, "5", "seconds between the dashboard's live refreshes", _positive_number),
    EnvVar(DASHBOARD_OUTPUTS, "(the working directory)", "where the dashboard looks for Parquet outputs"),
    EnvVar(METRICS_PORT, "(off)", "the port a worker serves `/metrics` and `/healthz` on (`--metrics-port`)", _port),
)


_BY_NAME = {var.name: var for var in ENVIRONMENT}


def value_problem(name: str, value: str) -> str | None:
    """What is wrong with `value` for the variable `name`, as one line naming both; None if usable."""
    check = _BY_NAME[name].check
    why = check(value) if check is not None else None
    return f"{name}: {why}, got {value!r}" if why else None


def environment_problems(env: Mapping[str, str] | None = None) -> list[str]:
    """One line per variable that is set to a value batchdb cannot use, naming it and what it
    expects. `batchdb` (every command) and every worker check this when they start, so a typo
    is told at once instead of as a fallback or a failure hours later."""
    env = os.environ if env is None else env
    set_values = ((var.name, env.get(var.name) or "") for var in ENVIRONMENT)
    return [problem for name, value in set_values if value.strip() and (problem := value_problem(name, value))]
