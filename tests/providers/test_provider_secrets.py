"""Key and endpoint resolution, and keeping keys out of messages and logs."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from batchdb.secrets import (
    MissingSecret,
    RedactingFilter,
    alias_env,
    redact,
    resolve_endpoint,
    resolve_key,
    resolved_secrets,
)


def secrets_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data: dict[str, object]) -> Path:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(data))
    monkeypatch.setenv("BATCHDB_SECRETS_FILE", str(path))
    return path


def test_alias_env_names() -> None:
    assert alias_env("KEY", "openai", "team-b") == "BATCHDB_KEY_OPENAI_TEAM_B"
    assert alias_env("ENDPOINT", "azure", "eu.west 2") == "BATCHDB_ENDPOINT_AZURE_EU_WEST_2"


def test_alias_env_beats_standard_env_beats_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secrets_file(tmp_path, monkeypatch, {"openai": {"default": "sk-from-file", "team-b": "sk-team-b-file"}})
    assert resolve_key("openai") == "sk-from-file"
    assert resolve_key("openai", "team-b") == "sk-team-b-file"
    monkeypatch.setenv("OPENAI_API_KEY", "sk-standard")
    assert resolve_key("openai") == "sk-standard"
    assert resolve_key("openai", "team-b") == "sk-team-b-file"  # standard variables serve the default alias only
    monkeypatch.setenv("BATCHDB_KEY_OPENAI_DEFAULT", "sk-alias-env")
    assert resolve_key("openai") == "sk-alias-env"
    assert {"sk-alias-env", "sk-standard", "sk-from-file"} <= resolved_secrets()


def test_gemini_prefers_gemini_api_key_over_google_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GOOGLE_API_KEY", "google-key")
    assert resolve_key("gemini") == "google-key"
    monkeypatch.setenv("GEMINI_API_KEY", "gemini-key")
    assert resolve_key("gemini") == "gemini-key"


def test_toml_secrets_file_with_endpoints(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "keys.toml"
    path.write_text('[azure]\ndefault = "az-key"\n\n[endpoints.azure]\ndefault = "https://res.openai.azure.com"\n')
    monkeypatch.setenv("BATCHDB_SECRETS_FILE", str(path))
    assert resolve_key("azure") == "az-key"
    assert resolve_endpoint("azure") == "https://res.openai.azure.com"


def test_endpoint_resolution_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_endpoint("openai") is None
    secrets_file(tmp_path, monkeypatch, {"endpoints": {"openai": {"default": "http://file/v1"}}})
    assert resolve_endpoint("openai") == "http://file/v1"
    monkeypatch.setenv("OPENAI_BASE_URL", "http://standard/v1")
    assert resolve_endpoint("openai") == "http://standard/v1"
    assert resolve_endpoint("openai", "team-b") is None
    monkeypatch.setenv("BATCHDB_ENDPOINT_OPENAI_TEAM_B", "http://alias/v1")
    assert resolve_endpoint("openai", "team-b") == "http://alias/v1"


def test_missing_key_names_what_was_checked_and_no_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = secrets_file(tmp_path, monkeypatch, {"openai": {"team-a": "sk-team-a-secret"}})
    monkeypatch.setenv("BATCHDB_KEY_OPENAI_TEAM_B", "sk-team-b-secret")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-standard-secret")
    with pytest.raises(MissingSecret) as caught:
        resolve_key("openai", "team-c")
    message = str(caught.value)
    assert "BATCHDB_KEY_OPENAI_TEAM_C" in message and str(path) in message and "'team-c'" in message
    for key in ("sk-team-a-secret", "sk-team-b-secret", "sk-standard-secret"):
        assert key not in message


def test_missing_key_without_a_file_lists_the_standard_variables() -> None:
    with pytest.raises(MissingSecret) as caught:
        resolve_key("gemini")
    message = str(caught.value)
    for name in ("BATCHDB_KEY_GEMINI_DEFAULT", "GEMINI_API_KEY", "GOOGLE_API_KEY", "BATCHDB_SECRETS_FILE"):
        assert name in message


def test_broken_secrets_file_is_reported_without_its_content(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "keys.json"
    path.write_text('{"openai": {"default": "sk-half-written-secret"')
    monkeypatch.setenv("BATCHDB_SECRETS_FILE", str(path))
    with pytest.raises(MissingSecret) as caught:
        resolve_key("openai")
    assert "not valid JSON" in str(caught.value) and "sk-half-written-secret" not in str(caught.value)


def test_redact_masks_every_secret_longest_first() -> None:
    assert redact("key sk-abcdef and sk-abc", "sk-abc", "sk-abcdef", None) == "key *** and ***"
    assert redact("short ab", "ab") == "short ab"  # too short to mask safely


def test_log_filter_hides_resolved_keys_in_messages_and_exceptions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCHDB_KEY_OPENAI_LOGGED", "sk-logged-secret-123")
    key = resolve_key("openai", "logged")
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(self.format(record))

    handler = Collect()
    handler.addFilter(RedactingFilter())
    log = logging.getLogger("batchdb.test.redaction")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("calling with key %s", key)
        try:
            raise RuntimeError(f"provider said: bad key {key}")
        except RuntimeError:
            log.exception("request failed")
    finally:
        log.removeHandler(handler)
        log.propagate = True
    assert len(records) == 2
    assert records[0] == "calling with key ***"
    assert "provider said: bad key ***" in records[1] and key not in "".join(records)


def test_log_filter_takes_extra_secrets() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "token=%s", ("tok-extra-999",), None)
    assert RedactingFilter("tok-extra-999").filter(record)
    assert record.getMessage() == "token=***"
