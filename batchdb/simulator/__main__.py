"""``python -m batchdb.simulator``: run the provider simulator in the foreground.

Examples::

    python -m batchdb.simulator --port 8765 --rpm 500 --tpm 200000
    python -m batchdb.simulator --config sim.json --port 0 --ready-file /tmp/sim.port

Flags override the matching fields of ``--config``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from batchdb.simulator.config import SimulatorConfig
from batchdb.simulator.server import serve


def parse_args(argv: Sequence[str] | None = None, prog: str = "python -m batchdb.simulator") -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Local OpenAI / Azure OpenAI / Gemini simulator with provider-style rate limits.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765, help="0 picks a free port (see --ready-file)")
    parser.add_argument("--config", help="JSON file with SimulatorConfig fields")
    parser.add_argument("--config-json", help="SimulatorConfig fields as an inline JSON object")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--rpm", type=int, help="default requests per minute per (key, model)")
    parser.add_argument("--tpm", type=int, help="default tokens per minute per (key, model)")
    parser.add_argument("--rpd", type=int, help="default requests per day per (key, model)")
    parser.add_argument("--latency", type=float, help="fixed latency in seconds")
    parser.add_argument("--ready-file", help="write the bound port here once listening")
    parser.add_argument("--exit-with-parent", action="store_true", help="stop when the parent process exits")
    parser.add_argument("--log-level", default="INFO")
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> SimulatorConfig:
    config = SimulatorConfig.load(args.config) if args.config else SimulatorConfig()
    changes: dict[str, Any] = json.loads(args.config_json) if args.config_json else {}
    if args.seed is not None:
        changes["seed"] = args.seed
    limits = {name: getattr(args, name) for name in ("rpm", "tpm", "rpd") if getattr(args, name) is not None}
    if limits:
        changes["default_limits"] = {
            **config.to_dict()["default_limits"],
            **changes.get("default_limits", {}),
            **limits,
        }
    if args.latency is not None:
        changes["latency_s"] = {"kind": "fixed", "value": args.latency}
    return config.updated(changes) if changes else config


def announce(host: str, port: int) -> None:
    """Where the simulator listens and how to point the SDKs and workers at it (stdout: a user reads it)."""
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    print(f"provider simulator listening on {url} (Ctrl-C stops it)", flush=True)
    print(f"  OpenAI SDK / batchdb workers:  export OPENAI_BASE_URL={url}/v1 OPENAI_API_KEY=sk-sim", flush=True)
    print(f"  Azure endpoint, Gemini base URL: {url}", flush=True)


def main(argv: Sequence[str] | None = None, prog: str = "python -m batchdb.simulator") -> int:
    args = parse_args(argv, prog)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    try:
        config = config_from_args(args)
    except (OSError, ValueError, TypeError) as exc:
        print(f"invalid simulator config: {exc}", file=sys.stderr)
        return 2
    serving = serve(
        config,
        host=args.host,
        port=args.port,
        ready_file=args.ready_file,
        exit_with_parent=args.exit_with_parent,
        on_ready=announce,
    )
    asyncio.run(serving)
    return 0


if __name__ == "__main__":
    sys.exit(main())
