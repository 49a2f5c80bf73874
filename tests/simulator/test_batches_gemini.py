"""Gemini Batch Mode through google-genai: inlined requests, the Files API's resumable upload, states.

As in test_batches_openai.py, time is compressed so a batch ends in well under a second, and what it
contains depends on the simulator clock only.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from google import genai
from google.genai import errors, types

from batchdb.simulator import Distribution, Limits, SimulatorProcess
from batchdb.tokens import count_gemini_contents, count_text

from .conftest import ConfigureSimulator

MODEL = "gemini-2.0-flash"
FAST: dict[str, Any] = {
    "batch_validation_s": 0.05,
    "batch_duration_s": Distribution(kind="fixed", value=0.3),
    "output_tokens": Distribution(kind="fixed", value=9),
}
_OPEN: list[genai.Client] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _OPEN:
        _OPEN.pop().close()


def gemini(sim: SimulatorProcess, key: str = "g-test") -> genai.Client:
    made = genai.Client(api_key=key, http_options=types.HttpOptions(base_url=sim.base_url))
    _OPEN.append(made)
    return made


def request(text: str, key: str | None = None, **config: Any) -> dict[str, Any]:
    item: dict[str, Any] = {"contents": [{"role": "user", "parts": [{"text": text}]}]}
    if key is not None:
        item["metadata"] = {"key": key}
    if config:
        item["config"] = config
    return item


def wait(client: genai.Client, name: str, timeout: float = 10.0) -> types.BatchJob:
    deadline = time.monotonic() + timeout
    while True:
        job = client.batches.get(name=name)
        if job.done:
            return job
        assert time.monotonic() < deadline, f"batch still {job.state}"
        time.sleep(0.05)


def test_inlined_requests_succeed_in_order_with_metadata_and_usage(simulator: ConfigureSimulator) -> None:
    sim = simulator(**FAST)
    client = gemini(sim)
    texts = [f"Is review {i} positive? The lamp {'flickers' if i % 2 else 'glows'}." for i in range(5)]
    job = client.batches.create(
        model=MODEL,
        src=[request(text, f"row-{i}", system_instruction="Answer briefly.") for i, text in enumerate(texts)],
        config={"display_name": "reviews-1"},
    )
    assert job.name is not None and job.name.startswith("batches/")
    assert job.state == types.JobState.JOB_STATE_PENDING and job.display_name == "reviews-1"
    assert job.model == f"models/{MODEL}"
    done = wait(client, job.name)

    assert done.state == types.JobState.JOB_STATE_SUCCEEDED and done.end_time is not None
    assert done.dest is not None and done.dest.inlined_responses is not None
    responses = done.dest.inlined_responses
    assert [r.metadata for r in responses] == [{"key": f"row-{i}"} for i in range(5)]  # input order
    for text, item in zip(texts, responses, strict=True):
        assert item.error is None and item.response is not None
        usage = item.response.usage_metadata
        assert usage is not None
        contents = [{"role": "user", "parts": [{"text": text}]}]
        system = {"parts": [{"text": "Answer briefly."}]}
        assert usage.prompt_token_count == count_gemini_contents(contents, system)[0]
        assert usage.candidates_token_count == 9 and item.response.text and count_text(item.response.text) == 9

    # The online route answers the same request with the same text.
    online = client.models.generate_content(
        model=MODEL, contents=texts[0], config=types.GenerateContentConfig(system_instruction="Answer briefly.")
    )
    assert responses[0].response is not None and online.text == responses[0].response.text
    totals = sim.stats(series=False)["totals"]
    assert (totals["batch_requests"], totals["batch_completion_tokens"], totals["requests"]) == (5, 45, 1)


def test_input_file_uploaded_with_the_files_api(simulator: ConfigureSimulator) -> None:
    sim = simulator(**FAST)
    client = gemini(sim)
    rows = [
        {"key": f"doc-{i}", "request": {"contents": [{"parts": [{"text": f"Summarise document {i}."}]}]}}
        for i in range(4)
    ]
    rows.append(
        {
            "key": "snake",
            "request": {"contents": [{"parts": [{"text": "hi"}]}], "generation_config": {"maxOutputTokens": 3}},
        }
    )
    data = "\n".join(json.dumps(row) for row in rows).encode()
    uploaded = client.files.upload(
        file=io.BytesIO(data), config=types.UploadFileConfig(display_name="docs", mime_type="jsonl")
    )
    assert uploaded.name is not None and uploaded.name.startswith("files/")
    assert uploaded.size_bytes == len(data) and uploaded.state == types.FileState.ACTIVE
    assert client.files.get(name=uploaded.name).display_name == "docs"

    done = wait(client, client.batches.create(model=MODEL, src=uploaded.name).name or "")
    assert done.state == types.JobState.JOB_STATE_SUCCEEDED
    assert done.dest is not None and done.dest.file_name is not None
    lines = [json.loads(raw) for raw in client.files.download(file=done.dest.file_name).decode().splitlines()]
    assert [line["key"] for line in lines] == [row["key"] for row in rows]
    assert all(line["response"]["usageMetadata"]["candidatesTokenCount"] == 9 for line in lines[:4])
    assert lines[4]["response"]["candidates"][0]["finishReason"] == "MAX_TOKENS"  # snake_case config honoured

    client.files.delete(name=uploaded.name)
    with pytest.raises(errors.ClientError) as missing:
        client.files.get(name=uploaded.name)
    assert missing.value.code == 404


def test_partial_failures_are_errors_in_place(simulator: ConfigureSimulator) -> None:
    sim = simulator(**FAST, batch_error_rate=0.5, seed=11)
    client = gemini(sim)
    done = wait(
        client, client.batches.create(model=MODEL, src=[request(f"q{i}", f"k{i}") for i in range(10)]).name or ""
    )
    assert done.state == types.JobState.JOB_STATE_SUCCEEDED
    assert done.dest is not None and done.dest.inlined_responses is not None
    failed = [r for r in done.dest.inlined_responses if r.error is not None]
    assert 0 < len(failed) < 10
    assert all(r.error is not None and r.error.code == 500 and r.response is None for r in failed)
    assert [r.metadata for r in done.dest.inlined_responses] == [{"key": f"k{i}"} for i in range(10)]
    assert sim.stats(series=False)["totals"]["batch_failed"] == len(failed)


def test_inlined_batch_over_the_size_limit_is_refused(simulator: ConfigureSimulator) -> None:
    sim = simulator(**FAST, batch_max_inline_bytes=2_000)
    client = gemini(sim)
    with pytest.raises(errors.ClientError) as refused:
        client.batches.create(model=MODEL, src=[request("x" * 3_000)])
    assert refused.value.code == 400 and refused.value.status == "INVALID_ARGUMENT"
    assert "Request payload size exceeds the limit: 2000 bytes." in str(refused.value.message)
    assert wait(client, client.batches.create(model=MODEL, src=[request("short")]).name or "").done


def test_a_batch_past_its_window_expires_without_results(simulator: ConfigureSimulator) -> None:
    sim = simulator(batch_validation_s=0.05, batch_duration_s=Distribution(kind="fixed", value=2.0), batch_window_s=0.4)
    client = gemini(sim)
    done = wait(client, client.batches.create(model=MODEL, src=[request(f"q{i}") for i in range(4)]).name or "")
    assert done.state == types.JobState.JOB_STATE_EXPIRED
    assert done.dest is None  # "The job will not have any results to retrieve"


def test_cancel_is_immediate(simulator: ConfigureSimulator) -> None:
    sim = simulator(batch_validation_s=0.05, batch_duration_s=Distribution(kind="fixed", value=5.0))
    client = gemini(sim)
    job = client.batches.create(model=MODEL, src=[request(f"q{i}") for i in range(4)])
    assert job.name is not None
    client.batches.cancel(name=job.name)
    cancelled = client.batches.get(name=job.name)
    assert cancelled.state == types.JobState.JOB_STATE_CANCELLED and cancelled.done and cancelled.dest is None
    client.batches.cancel(name=job.name)  # again: nothing changes


def test_enqueued_token_limit_is_a_429_until_the_queue_drains(simulator: ConfigureSimulator) -> None:
    src = [request("Summarise the quarterly report in one line.") for _ in range(3)]
    tokens = sum(count_gemini_contents(item["contents"])[0] for item in src)
    sim = simulator(**{**FAST, "batch_duration_s": Distribution(kind="fixed", value=2.0)}, batch_queue_tokens=tokens)
    client = gemini(sim)
    first = client.batches.create(model=MODEL, src=src)
    with pytest.raises(errors.ClientError) as refused:
        client.batches.create(model=MODEL, src=src)
    assert refused.value.code == 429 and refused.value.status == "RESOURCE_EXHAUSTED"
    assert wait(client, first.name or "").state == types.JobState.JOB_STATE_SUCCEEDED
    sim.set_config(batch_duration_s=Distribution(kind="fixed", value=0.1))
    assert (
        wait(client, client.batches.create(model=MODEL, src=src).name or "").state == types.JobState.JOB_STATE_SUCCEEDED
    )


def test_list_pages_and_delete(simulator: ConfigureSimulator) -> None:
    sim = simulator(**FAST, default_limits=Limits(rpm=1))
    client = gemini(sim)
    names = [
        client.batches.create(model=MODEL, src=[request("hi")], config={"display_name": f"job-{i}"}).name
        for i in range(5)
    ]
    listed = list(client.batches.list(config={"page_size": 2}))  # the pager follows nextPageToken
    assert [job.name for job in listed] == names[::-1]
    assert [job.display_name for job in listed if job.display_name == "job-3"] == ["job-3"]
    assert list(gemini(sim, "g-other").batches.list()) == []

    client.batches.delete(name=names[0] or "")
    assert [job.name for job in client.batches.list()] == names[:0:-1]
    with pytest.raises(errors.ClientError) as missing:
        client.batches.get(name=names[0] or "")
    assert missing.value.code == 404
    # Batch lines use none of the online quota (1 RPM here).
    client.models.generate_content(model=MODEL, contents="hi")
    assert sim.stats(series=False)["totals"]["rate_limited"] == 0
