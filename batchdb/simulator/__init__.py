"""A local OpenAI / Azure OpenAI / Gemini / Vertex AI server with provider-style rate limits.

Nothing here reaches the internet: tests, benchmarks and the demo point the
official SDKs at this simulator, which answers in the providers' wire formats,
enforces RPM/TPM/RPD with real 429s, injects faults and records what it served.

Modules: `config` (what to simulate), `limits` (the rate limiter and its exact
semantics), `tokens` (prompt counting), `content` (generated text/JSON),
`responses` (wire formats), `prompt_cache` (cached prompt tokens, as the
providers' automatic prefix caching reports them), `answers` (the checks and
answer of a chat / generateContent request, shared by online routes and batches),
`batches` (the Batch APIs: files, batches and their life in compressed time),
`batch_routes` (their HTTP routes), `recorder` (stats), `state` (one run's state
and random streams), `server` (aiohttp routes), `process` (run it as a
subprocess), `__main__` (the command line). docs/simulator.md describes the
Batch API routes and settings.

Vertex AI's generateContent (`/{v1,v1beta1}/projects/{p}/locations/{l}/publishers/google/models/
{m}:generateContent`, what google-genai calls with ``vertexai=True`` and ``base_url=sim.base_url``)
takes a bearer token (checked against ``api_keys`` when set; none or another is 401
UNAUTHENTICATED), counts limits and cached prompts per ``{p}/{l}`` (the key a `LimitRule` names),
and answers a limit with Vertex's bare 429 RESOURCE_EXHAUSTED (no quota, no retry delay).
"""

from batchdb.simulator.config import Distribution, ErrorRates, LimitRule, Limits, Outage, SimulatorConfig
from batchdb.simulator.process import SimulatorError, SimulatorProcess, start_simulator

__all__ = [
    "Distribution",
    "ErrorRates",
    "LimitRule",
    "Limits",
    "Outage",
    "SimulatorConfig",
    "SimulatorError",
    "SimulatorProcess",
    "start_simulator",
]
