"""The OpenAI Batch API (and Azure OpenAI Global Batch) through the official openai SDK.

Time is compressed (`SimulatorConfig.batch_*`): a batch validates, runs and finalizes in well under
a second, so each test polls to the end. What a batch contains is decided by the simulator clock,
not by when it is polled, so the assertions hold however slow the machine is; the last test checks
that exactly, on a simulator with a hand-driven clock.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from batchdb.simulator import Distribution, Limits, SimulatorConfig, SimulatorProcess
from batchdb.simulator.batches import Batch
from batchdb.simulator.state import Simulator
from batchdb.tokens import count_openai_messages, count_text

from .conftest import ConfigureSimulator

MODEL = "gpt-4o-mini"
TERMINAL = ("completed", "failed", "expired", "cancelled")
FAST: dict[str, Any] = {
    "batch_validation_s": 0.05,
    "batch_duration_s": Distribution(kind="fixed", value=0.3),
    "batch_finalizing_s": 0.05,
    "output_tokens": Distribution(kind="fixed", value=12),
}


_OPEN: list[openai.OpenAI] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    """Close every client a test made: an unclosed connection pool warns, and warnings are errors."""
    yield
    while _OPEN:
        _OPEN.pop().close()


def client(sim: SimulatorProcess, key: str = "sk-test") -> openai.OpenAI:
    made = openai.OpenAI(base_url=sim.openai_base_url, api_key=key, max_retries=0)
    _OPEN.append(made)
    return made


def line(custom_id: str, text: str, model: str = MODEL, **body: Any) -> dict[str, Any]:
    messages = [{"role": "user", "content": text}]
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": model, "messages": messages, **body},
    }


def upload(c: openai.OpenAI, lines: list[dict[str, Any]] | bytes, name: str = "input.jsonl") -> str:
    data = lines if isinstance(lines, bytes) else "\n".join(json.dumps(item) for item in lines).encode()
    return c.files.create(file=(name, io.BytesIO(data)), purpose="batch").id


def create(c: openai.OpenAI, file_id: str, **metadata: str) -> Any:
    return c.batches.create(
        input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h", metadata=metadata or None
    )


def wait(c: openai.OpenAI, batch_id: str, until: tuple[str, ...] = TERMINAL, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        batch = c.batches.retrieve(batch_id)
        if batch.status in until:
            return batch
        assert time.monotonic() < deadline, f"batch still {batch.status}"
        time.sleep(0.05)


def jsonl(c: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(raw) for raw in c.files.content(file_id).text.splitlines() if raw.strip()]


def test_batch_runs_to_completion_and_answers_like_the_online_route(simulator: ConfigureSimulator) -> None:
    sim = simulator(**FAST)
    c = client(sim)
    texts = {
        f"review-{i}": f"Classify review number {i}: the kettle {'leaks' if i % 2 else 'works'}." for i in range(6)
    }
    file_id = upload(c, [line(cid, text) for cid, text in texts.items()])
    assert c.files.retrieve(file_id).purpose == "batch"

    batch = create(c, file_id, batchdb_job="42")
    assert batch.status == "validating" and batch.request_counts is not None and batch.request_counts.total == 0
    assert batch.metadata == {"batchdb_job": "42"} and batch.model == MODEL
    assert batch.expires_at is not None and batch.expires_at >= batch.created_at
    done = wait(c, batch.id)

    assert done.status == "completed" and done.errors is None and done.error_file_id is None
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (6, 6, 0)
    assert done.created_at <= done.in_progress_at <= done.finalizing_at <= done.completed_at  # type: ignore[operator]
    output = jsonl(c, done.output_file_id)
    assert sorted(item["custom_id"] for item in output) == sorted(texts)  # every request answered once
    assert len({item["id"] for item in output}) == 6
    prompt_total = 0
    for item in output:
        assert item["error"] is None and item["response"]["status_code"] == 200 and item["response"]["request_id"]
        body = item["response"]["body"]
        assert body["object"] == "chat.completion" and body["model"] == MODEL
        prompt = count_openai_messages([{"role": "user", "content": texts[item["custom_id"]]}])[0]
        assert body["usage"]["prompt_tokens"] == prompt and body["usage"]["completion_tokens"] == 12
        assert count_text(body["choices"][0]["message"]["content"]) == 12
        prompt_total += prompt
    assert done.usage is not None and (done.usage.input_tokens, done.usage.output_tokens) == (prompt_total, 72)

    # The same request online gets the same text: batch and online share one generator.
    first = next(item for item in output if item["custom_id"] == "review-0")
    online = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": texts["review-0"]}])
    assert online.choices[0].message.content == first["response"]["body"]["choices"][0]["message"]["content"]

    result_file = c.files.retrieve(done.output_file_id)  # type: ignore[arg-type]
    assert result_file.purpose == "batch_output" and result_file.bytes > 0
    totals = sim.stats(series=False)["totals"]
    assert (totals["batch_requests"], totals["batch_failed"]) == (6, 0)
    assert (totals["batch_prompt_tokens"], totals["batch_completion_tokens"]) == (prompt_total, 72)
    assert totals["requests"] == totals["accepted"] == 1  # only the online call


def test_partial_failures_go_to_the_error_file(simulator: ConfigureSimulator) -> None:
    sim = simulator(**FAST, batch_error_rate=0.4, seed=7, context_window=5_000)
    c = client(sim)
    lines = [line(f"r{i}", f"Question {i}?") for i in range(12)]
    lines.append(line("too-long", "Question?", max_tokens=10_000))  # over the context window: a 400 for this line
    done = wait(c, create(c, upload(c, lines)).id)

    assert done.status == "completed"
    output, errors = jsonl(c, done.output_file_id), jsonl(c, done.error_file_id)
    assert sorted(item["custom_id"] for item in output + errors) == sorted(item["custom_id"] for item in lines)
    assert done.request_counts is not None
    assert (done.request_counts.completed, done.request_counts.failed) == (len(output), len(errors))
    assert 1 < len(errors) < 12  # 40% of 12 injected server errors, plus the 400
    by_id = {item["custom_id"]: item for item in errors}
    too_long = by_id.pop("too-long")
    assert too_long["response"]["status_code"] == 400 and too_long["error"] is None
    assert too_long["response"]["body"]["error"]["code"] == "context_length_exceeded"
    for item in by_id.values():
        assert item["response"]["status_code"] == 500
        assert item["response"]["body"]["error"]["type"] == "server_error"
    totals = sim.stats(series=False)["totals"]
    assert (totals["batch_requests"], totals["batch_failed"]) == (13, len(errors))


@pytest.mark.parametrize(
    ("content", "code", "line_no"),
    [
        (b"", "empty_file", None),
        (b'{"custom_id": "a", "method": "POST"', "invalid_json_line", 1),
        ([line("a", "x"), line("b", "y"), line("a", "z")], "duplicate_custom_id", 3),
        ([line("a", "x"), line("b", "y", model="gpt-4o")], "model_mismatch", 2),
        ([line("a", "x"), {**line("b", "y"), "url": "/v1/embeddings"}], "url_mismatch", 2),
        (
            [line("a", "x"), {"custom_id": "b", "method": "POST", "url": "/v1/chat/completions"}],
            "missing_required_parameter",
            2,
        ),
    ],
)
def test_invalid_input_files_fail_validation(
    simulator: ConfigureSimulator, content: Any, code: str, line_no: int | None
) -> None:
    sim = simulator(**FAST)
    c = client(sim)
    data = content if isinstance(content, bytes) else "\n".join(json.dumps(item) for item in content).encode()
    failed = wait(c, create(c, upload(c, data)).id)

    assert failed.status == "failed" and failed.failed_at is not None and failed.in_progress_at is None
    assert failed.errors is not None and failed.errors.data
    error = failed.errors.data[0]
    assert (error.code, error.line) == (code, line_no) and error.message
    assert failed.output_file_id is None and failed.error_file_id is None
    assert failed.request_counts is not None and failed.request_counts.total == 0
    assert sim.stats(series=False)["totals"]["batch_requests"] == 0


def test_too_many_requests_for_the_configured_limit(simulator: ConfigureSimulator) -> None:
    sim = simulator(**FAST, batch_max_requests=3)
    c = client(sim)
    failed = wait(c, create(c, upload(c, [line(f"r{i}", "hi") for i in range(4)])).id)
    assert failed.status == "failed" and failed.errors is not None
    assert failed.errors.data[0].code == "too_many_tasks"
    assert "up to 3 requests" in (failed.errors.data[0].message or "")
    assert wait(c, create(c, upload(c, [line(f"r{i}", "hi") for i in range(3)])).id).status == "completed"


def test_requests_the_batch_endpoint_refuses(simulator: ConfigureSimulator) -> None:
    sim = simulator(**FAST)
    c = client(sim)
    file_id = upload(c, [line("a", "x")])
    with pytest.raises(openai.BadRequestError, match=r"completion_window|24h"):
        c.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="48h")  # type: ignore[arg-type]
    with pytest.raises(openai.NotFoundError):
        create(c, "file-missing")
    with pytest.raises(openai.NotFoundError):
        create(client(sim, "sk-other"), file_id)  # files belong to their key
    other = c.files.create(file=("notes.jsonl", io.BytesIO(b"{}")), purpose="user_data")
    with pytest.raises(openai.BadRequestError, match="purpose"):
        create(c, other.id)
    with pytest.raises(openai.BadRequestError, match=r"\.jsonl"):
        c.files.create(file=("input.csv", io.BytesIO(b"a,b")), purpose="batch")
    with pytest.raises(openai.BadRequestError, match="metadata"):
        create(c, file_id, **{f"k{i}": "v" for i in range(17)})
    with pytest.raises(openai.NotFoundError):
        c.batches.retrieve("batch_missing")
    with pytest.raises(openai.AuthenticationError):
        client(simulator(**FAST, api_keys=("sk-good",)), "sk-bad").batches.list()


def test_a_batch_past_its_window_expires_with_partial_results(simulator: ConfigureSimulator) -> None:
    # Lines are due at 0.1 + 2.0 * (i + 1) / 8 = 0.35, 0.6, 0.85, ... s; the window closes at 0.7 s.
    sim = simulator(
        batch_validation_s=0.1,
        batch_duration_s=Distribution(kind="fixed", value=2.0),
        batch_window_s=0.7,
        output_tokens=Distribution(kind="fixed", value=5),
    )
    c = client(sim)
    lines = [line(f"r{i}", f"q{i}") for i in range(8)]
    expired = wait(c, create(c, upload(c, lines)).id)

    assert expired.status == "expired" and expired.expired_at is not None and expired.completed_at is None
    assert expired.request_counts is not None
    assert (expired.request_counts.completed, expired.request_counts.failed) == (2, 6)
    assert [item["custom_id"] for item in jsonl(c, expired.output_file_id)] == ["r0", "r1"]
    errors = jsonl(c, expired.error_file_id)
    assert [item["custom_id"] for item in errors] == [f"r{i}" for i in range(2, 8)]
    for item in errors:
        assert item["response"] is None
        assert item["error"] == {
            "code": "batch_expired",
            "message": "This request could not be executed before the completion window expired.",
        }
    assert sim.stats(series=False)["totals"]["batch_requests"] == 2  # expired lines were never run


def test_cancel_finishes_in_flight_lines_and_returns_partial_output(simulator: ConfigureSimulator) -> None:
    sim = simulator(
        batch_validation_s=0.05,
        batch_duration_s=Distribution(kind="fixed", value=6.0),  # a line every 0.6 s: the cancel lands mid-way
        batch_cancelling_s=0.2,
        output_tokens=Distribution(kind="fixed", value=5),
    )
    c = client(sim)
    lines = [line(f"r{i}", f"q{i}") for i in range(10)]
    batch = create(c, upload(c, lines))
    running = wait(c, batch.id, until=("in_progress",))
    assert running.in_progress_at is not None
    deadline = time.monotonic() + 10
    while (c.batches.retrieve(batch.id).request_counts or running.request_counts).completed < 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)

    cancelling = c.batches.cancel(batch.id)
    assert cancelling.status == "cancelling" and cancelling.cancelling_at is not None
    cancelled = wait(c, batch.id)
    assert cancelled.status == "cancelled" and cancelled.cancelled_at is not None
    assert c.batches.cancel(batch.id).status == "cancelled"  # cancelling again changes nothing

    assert cancelled.request_counts is not None
    done = cancelled.request_counts.completed
    assert 1 <= done < 10 and cancelled.request_counts.failed == 10 - done
    output, errors = jsonl(c, cancelled.output_file_id), jsonl(c, cancelled.error_file_id)
    assert [item["custom_id"] for item in output] == [f"r{i}" for i in range(done)]  # lines finish in file order
    assert [item["custom_id"] for item in errors] == [f"r{i}" for i in range(done, 10)]
    assert {item["error"]["code"] for item in errors} == {"batch_cancelled"}

    sim.set_config(batch_duration_s=Distribution(kind="fixed", value=0.1))
    finished = wait(c, create(c, upload(c, lines[:1])).id)
    with pytest.raises(openai.ConflictError):
        c.batches.cancel(finished.id)


def test_enqueued_token_limit_refuses_then_frees_the_tokens(simulator: ConfigureSimulator) -> None:
    lines = [line(f"r{i}", "Summarise this paragraph about enqueued tokens, please.") for i in range(4)]
    tokens = sum(count_openai_messages(item["body"]["messages"])[0] for item in lines)
    sim = simulator(
        **{**FAST, "batch_duration_s": Distribution(kind="fixed", value=2.0)}, batch_queue_tokens=tokens + 5
    )
    c = client(sim)
    file_id = upload(c, lines)

    first = create(c, file_id)
    refused = wait(c, create(c, file_id).id)  # two files' tokens > limit while the first runs
    assert refused.status == "failed" and refused.errors is not None
    error = refused.errors.data[0]
    assert error.code == "token_limit_exceeded"
    assert error.message == (
        f"Enqueued token limit reached for {MODEL} in organization org-simulator. Limit: {tokens + 5:,} enqueued "
        "tokens. Please try again once some in_progress batches have been completed."
    )
    assert wait(c, first.id).status == "completed"
    sim.set_config(batch_duration_s=Distribution(kind="fixed", value=0.1))  # (the first batch's was fixed at creation)
    assert wait(c, create(c, file_id).id).status == "completed"  # the first batch's tokens were freed

    # Per-model limits override the default; other models are not affected.
    sim.set_config(batch_queue_tokens_by_model={"gpt-4o": 1})
    assert wait(c, create(c, upload(c, [line("a", "hi", model="gpt-4o")])).id).status == "failed"


def test_listing_pages_through_every_batch_and_finds_one_by_metadata(simulator: ConfigureSimulator) -> None:
    sim = simulator(**FAST)
    c = client(sim)
    file_id = upload(c, [line("a", "hi")])
    created = [create(c, file_id, batchdb_job=f"job-{i}").id for i in range(25)]

    listed = list(c.batches.list(limit=10))  # the SDK follows `after` over three pages
    assert [b.id for b in listed] == created[::-1]  # newest first
    found = [b for b in listed if (b.metadata or {}).get("batchdb_job") == "job-3"]
    assert [b.id for b in found] == [created[3]]
    first_page = c.batches.list(limit=10)
    assert first_page.has_more is True and len(first_page.data) == 10
    assert list(client(sim, "sk-other").batches.list()) == []  # batches belong to their key


def test_batches_use_no_online_rate_limit(simulator: ConfigureSimulator) -> None:
    sim = simulator(**FAST, default_limits=Limits(rpm=1))
    c = client(sim)
    done = wait(c, create(c, upload(c, [line(f"r{i}", "hi") for i in range(5)])).id)
    assert done.request_counts is not None and done.request_counts.completed == 5
    c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])  # the one request a minute
    with pytest.raises(openai.RateLimitError):
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    totals = sim.stats(series=False)["totals"]
    assert (totals["batch_requests"], totals["admitted"], totals["rate_limited"]) == (5, 1, 1)


def test_azure_global_batch_routes(simulator: ConfigureSimulator) -> None:
    # Azure never expires batches: this one outlives the window and still completes.
    sim = simulator(**{**FAST, "batch_duration_s": Distribution(kind="fixed", value=0.6)}, batch_window_s=0.3)
    azure = openai.AzureOpenAI(
        azure_endpoint=sim.base_url, api_key="azure-key", api_version="2024-10-21", max_retries=0
    )
    deployment = "gpt-4o-mini-batch"
    file_id = azure.files.create(
        file=(
            "in.jsonl",
            io.BytesIO("\n".join(json.dumps(line(f"r{i}", "hi", model=deployment)) for i in range(3)).encode()),
        ),
        purpose="batch",
    ).id
    batch = azure.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
    done = wait(azure, batch.id)  # type: ignore[arg-type]
    assert done.status == "completed" and done.model == deployment
    assert sorted(item["custom_id"] for item in jsonl(azure, done.output_file_id)) == ["r0", "r1", "r2"]  # type: ignore[arg-type]
    [row] = [r for r in sim.stats()["by_key_model"] if r["batch_requests"]]
    assert (row["key"], row["model"], row["batch_requests"]) == ("azure-key", deployment, 3)
    # Azure's objects are not OpenAI's, even under the same key.
    with pytest.raises(openai.NotFoundError):
        client(sim, "azure-key").batches.retrieve(batch.id)

    sim.set_config(batch_queue_tokens=1)
    refused = wait(
        azure, azure.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h").id
    )  # type: ignore[arg-type]
    assert refused.status == "failed" and refused.errors is not None
    assert refused.errors.data[0].code == "token_limit_exceeded"
    assert f"configured limit of 1 for the deployment '{deployment}'" in (refused.errors.data[0].message or "")


class _Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_a_batch_depends_on_the_clock_not_on_when_it_is_polled() -> None:
    """In-process, with a hand-driven clock: the same batch polled often or once ends the same."""

    def run(poll_every: float | None) -> tuple[list[Any], dict[str, Any]]:
        clock = _Clock()
        sim = Simulator(
            SimulatorConfig(
                batch_validation_s=0.5,
                batch_duration_s=Distribution(kind="fixed", value=4.0),
                batch_window_s=2.8,
                batch_error_rate=0.3,
                seed=3,
            ),
            clock=clock,
        )
        data = "\n".join(json.dumps(line(f"r{i}", f"q{i}")) for i in range(8)).encode()
        stored = sim.batches.add_file("openai", "k", filename="in.jsonl", purpose="batch", data=data)
        batch = sim.batches.create_openai(
            "openai",
            "k",
            input_file_id=stored.id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            metadata=None,
        )
        assert isinstance(batch, Batch)
        states = []
        while clock.t < 1010:
            clock.t += poll_every or 10
            states.append(sim.batches.openai_object(batch)["status"])
        obj = sim.batches.openai_object(batch)
        results = [(ln.custom_id, ln.result.status if ln.result else None) for ln in batch.lines]
        return results, {"status": obj["status"], "counts": obj["request_counts"], "states": states}

    often, often_obj = run(0.25)
    once, once_obj = run(None)
    assert often == once and often_obj["counts"] == once_obj["counts"]
    assert often_obj["status"] == once_obj["status"] == "expired"
    # window 2.8 s, lines due at 0.5 + 0.5 * (i + 1): the first four are answered, the rest expire
    assert [status is not None for _, status in often] == [True] * 4 + [False] * 4
    assert often_obj["states"][:2] == ["validating", "in_progress"] and "expired" in often_obj["states"]


def test_prompt_caching_within_a_batch(simulator: ConfigureSimulator) -> None:
    sim = simulator(**FAST)
    c = client(sim)
    shared = "You grade essays. " * 400  # ~1,600 tokens: over OpenAI's 1,024-token minimum
    lines = [
        {
            **line(f"e{i}", f"Essay {i}."),
            "body": {
                "model": MODEL,
                "messages": [{"role": "system", "content": shared}, {"role": "user", "content": f"Essay {i}."}],
            },
        }
        for i in range(3)
    ]
    output = jsonl(c, wait(c, create(c, upload(c, lines)).id).output_file_id)
    cached = {
        item["custom_id"]: item["response"]["body"]["usage"]["prompt_tokens_details"]["cached_tokens"]
        for item in output
    }
    assert cached["e0"] == 0 and cached["e1"] == cached["e2"] >= 1024
    assert sim.stats(series=False)["totals"]["batch_cached_tokens"] == cached["e1"] + cached["e2"]
