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

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class EnvVar:
    name: str
    default: str
    meaning: str


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

DEFAULT_OUTPUT_ROOT = "batchdb-output"

ENVIRONMENT: tuple[EnvVar, ...] = (
    EnvVar(DSN, "(the embedded server)", "the PostgreSQL database every part uses (`--dsn` overrides it)"),
    EnvVar(HOME, "~/.local/share/batchdb", "where the embedded PostgreSQL and the dev logs live"),
    EnvVar(SECRETS_FILE, "(none)", "a TOML file of API keys and endpoints by provider and alias"),
    EnvVar(AZURE_API_VERSION, "(the SDK's)", "the Azure OpenAI API version"),
    EnvVar(WEBHOOK_SECRET, "(none)", "the signing secret `batchdb submit --webhook-url` uses"),
    EnvVar(SMTP_HOST, "(no email)", "the SMTP server job emails go through"),
    EnvVar(SMTP_PORT, "587 with STARTTLS, else 25", "its port"),
    EnvVar(SMTP_USERNAME, "(none)", "its login"),
    EnvVar(SMTP_PASSWORD, "(none)", "its password"),
    EnvVar(SMTP_STARTTLS, "true when a username is set", "whether to STARTTLS"),
    EnvVar(SMTP_FROM, "batchdb@<host>", "the sender address"),
    EnvVar(OUTPUT_ROOT, DEFAULT_OUTPUT_ROOT, "where the Dagster example writes its Parquet outputs"),
    EnvVar(DASHBOARD_REFRESH, "5", "seconds between the dashboard's live refreshes"),
    EnvVar(DASHBOARD_OUTPUTS, "(the working directory)", "where the dashboard looks for Parquet outputs"),
)
