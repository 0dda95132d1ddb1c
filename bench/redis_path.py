"""The Redis path: a request at gateway A for a node linked to gateway B, against the same request sent to B.

    .venv/bin/python bench/redis_path.py [--threads 2] [--quick]
        [--database-url postgres://postgres@127.0.0.1:5432/postgres] [--redis-url redis://127.0.0.1:6379/3]

Two gateway processes on one PostgreSQL database (made fresh for the run, dropped after) and the Redis
channel layer, one real node agent with the default model linked to gateway B. The same figures as
backbone.py, taken round-robin across the two paths: latency of a 1-token chat request (p50, p90),
time to first token, tokens/s of a streamed 128-token reply (and its ratio to the direct path in the
same round), requests/s with 8 concurrent clients sending 1-token requests.

  direct (B)    client -> gateway B -> node
  via Redis (A) client -> gateway A -> Redis -> gateway B -> node, and the events back the same way
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.backbone import MODEL_ID, Http, models_folder, print_table, run_interleaved  # noqa: E402
from node_agent.default_model import ensure_default_model  # noqa: E402
from tests.processes import Gateway, NodeAgent, free_port  # noqa: E402


@contextmanager
def fresh_database(admin_url: str) -> Iterator[str]:
    """A new PostgreSQL database for this run, dropped afterwards; its URL."""
    import psycopg

    name = f"bench_redis_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    try:
        yield admin_url.rsplit("/", 1)[0] + "/" + name
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@contextmanager
def two_gateways(model: Path, threads: int, database_url: str, redis_url: str) -> Iterator[tuple[str, str, str]]:
    """Gateways A and B and a node linked to B; yields A's URL, B's URL and an API key."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        models = models_folder(root, model)
        for name in ("a", "b", "node"):
            (root / name).mkdir()
        env = {"DATABASE_URL": database_url, "REDIS_URL": redis_url}
        gateway_a = Gateway(data_dir=root / "a", port=free_port(), **env)
        gateway_b = Gateway(data_dir=root / "b", port=free_port(), **env)
        agent = NodeAgent(gateway=gateway_b, models_dir=models, state_dir=root / "node",
                          extra_args=("--threads", str(threads)))
        agent.env["OPTIMAGPT_NODE_LOG_LEVEL"] = "WARNING"
        gateway_a.start()
        gateway_b.start(migrate=False)
        agent.start()
        try:
            agent.wait_for_model(MODEL_ID)
            yield gateway_a.url, gateway_b.url, gateway_a.create_api_key("bench")
        finally:
            agent.stop()
            gateway_a.stop()
            gateway_b.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, for a smoke run")
    parser.add_argument("--database-url", default=os.environ.get(
        "OPTIMAGPT_TEST_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/test"))
    parser.add_argument("--redis-url", default=os.environ.get("OPTIMAGPT_TEST_REDIS_URL", "redis://127.0.0.1:6379/3"))
    args = parser.parse_args()
    n, n_long = (50, 4) if args.quick else (300, 16)
    model = ensure_default_model(REPO / "models")
    print(f"model {model.name}, {args.threads} threads, {os.cpu_count()} cores; {n} latency samples, {n_long} long "
          "replies per path, round-robin; PostgreSQL and Redis on this machine", flush=True)
    with fresh_database(args.database_url) as database_url, \
            two_gateways(model, args.threads, database_url, args.redis_url) as (url_a, url_b, key):
        headers = {"Authorization": f"Bearer {key}"}
        paths = [Http("direct (B)", url_b, headers, MODEL_ID), Http("via Redis (A)", url_a, headers, MODEL_ID)]
        try:
            results = run_interleaved(paths, n, n_long)
        finally:
            for p in paths:
                p.close()
    print_table(results, "direct (B)", "vs direct")
    direct, redis = results["direct (B)"], results["via Redis (A)"]
    added = redis["p50"] - direct["p50"]
    print(f"\nvia Redis: 1-token p50 {added:+.2f} ms ({'PASS' if added <= 2 else 'FAIL'}; goal at most +2 ms), "
          f"tokens/s {100 * redis['tps_ratio']:.1f}% ({'PASS' if redis['tps_ratio'] >= 0.95 else 'FAIL'}; goal 95%), "
          f"req/s @8 {100 * redis['rps'] / direct['rps']:.0f}% of direct")


if __name__ == "__main__":
    main()
