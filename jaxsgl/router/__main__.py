"""`python -m jaxsgl.router`: one endpoint in front of many workers.

    python -m jaxsgl.router --worker-urls http://10.0.0.1:30000 http://10.0.0.2:30000 \\
        --pool-workers big=http://10.0.0.3:30000 --rules rules.json \\
        --policy cache_aware --host 0.0.0.0 --port 30000

Workers are jaxsgl servers or any OpenAI-compatible server (which answers `GET /health`).
"""

from __future__ import annotations

import argparse
import logging
import sys

from aiohttp import web

from jaxsgl.router.app import RouterConfig, create_app
from jaxsgl.router.policy import POLICIES
from jaxsgl.router.rules import Rules, load_rules
from jaxsgl.router.workers import WorkerSet

logger = logging.getLogger("jaxsgl.router")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxsgl.router", description=__doc__.split("\n")[0])
    a = p.add_argument
    a("--worker-urls", nargs="*", default=[], help="workers of the default pool")
    a(
        "--pool-workers",
        action="append",
        default=[],
        metavar="POOL=URL[,URL...]",
        help="workers of a named pool (repeatable)",
    )
    a("--policy", default="cache_aware", choices=sorted(POLICIES))
    a("--rules", default=None, help="JSON file of grading rules (see jaxsgl/router/rules.py)")
    a("--host", default="127.0.0.1")
    a("--port", type=int, default=30000)
    a("--api-key", default=None, help="clients must send it as a Bearer token")
    a("--worker-api-key", default=None, help="sent to workers (default: the client's own)")
    a("--health-check-interval", type=float, default=5.0, help="seconds between checks")
    a("--health-check-timeout", type=float, default=3.0)
    a(
        "--health-failure-threshold",
        type=int,
        default=2,
        help="failed checks in a row that mark a worker dead",
    )
    a("--max-retries", type=int, default=2, help="other workers to try for a failed request")
    a("--request-timeout", type=float, default=600.0, help="seconds of worker silence allowed")
    a("--log-level", default="info", choices=["debug", "info", "warning", "error", "critical"])
    return p


def build(args: argparse.Namespace) -> web.Application:
    """The app for parsed flags; ValueError naming a bad flag value."""
    if args.health_check_interval <= 0 or args.health_check_timeout <= 0:
        raise ValueError("health check interval and timeout must be positive")
    if args.health_failure_threshold < 1 or args.max_retries < 0:
        raise ValueError("--health-failure-threshold must be >= 1, --max-retries >= 0")
    rules = load_rules(args.rules) if args.rules else Rules()
    workers = WorkerSet(args.policy, args.health_failure_threshold)
    for url in args.worker_urls:
        workers.add(url, rules.default_pool)
    for spec in args.pool_workers:
        pool, sep, urls = spec.partition("=")
        if not sep or not pool or not urls:
            raise ValueError(f"--pool-workers wants POOL=URL[,URL...], got {spec!r}")
        for url in urls.split(","):
            workers.add(url, pool)
    empty = sorted(rules.pools - set(workers.pools()))
    if empty:
        logger.warning("pools with no workers yet (add them with /add_worker): %s", empty)
    config = RouterConfig(
        rules=rules,
        health_interval_s=args.health_check_interval,
        health_timeout_s=args.health_check_timeout,
        max_retries=args.max_retries,
        request_timeout_s=args.request_timeout,
        worker_api_key=args.worker_api_key,
    )
    return create_app(workers, config, api_key=args.api_key)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="[%(asctime)s] %(levelname)s %(name)s: %(message)s"
    )
    try:
        app = build(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logger.info("routing on http://%s:%d", args.host, args.port)
    web.run_app(
        app, host=args.host, port=args.port, print=None, handler_cancellation=True, access_log=None
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
