"""`python -m node_agent join --gateway-url URL --token TOKEN`: enroll this node with a token an admin made.

The token and the node's id go to the gateway's `POST /optima/v1/nodes/enroll`; the answer is the node's own
credential, kept in the state folder (`node_secret`, readable by this user only) with a marker (`enrolled`).
From then on `python -m node_agent` links with it, no shared access key needed. A plain http:// gateway is
refused except on this machine: the token would cross the network readable.
"""

from __future__ import annotations

import argparse
import os
import socket
import ssl
import sys
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from .link import NodeSecret, load_node_id
from .settings import ENROLLED_FILE

LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1"}
TIMEOUT_S = 30.0


def join_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m node_agent join",
                                     description="Enroll this node with a gateway, using an enrollment token.")
    parser.add_argument("--gateway-url", required=True, help="the gateway, https://... (http only on localhost)")
    parser.add_argument("--token", default=os.environ.get("OPTIMAGPT_ENROLLMENT_TOKEN", ""),
                        help="the token an admin made (or env OPTIMAGPT_ENROLLMENT_TOKEN, kept out of the shell's "
                             "history)")
    parser.add_argument("--state-dir", default=os.environ.get("OPTIMAGPT_NODE_STATE_DIR",
                                                              str(Path.home() / ".local/share/optimagpt-node")))
    parser.add_argument("--name", default=os.environ.get("OPTIMAGPT_NODE_NAME", socket.gethostname()))
    parser.add_argument("--ca-file", default=os.environ.get("OPTIMAGPT_GATEWAY_CA_FILE"),
                        help="CA bundle to trust for a gateway with its own certificate")
    return parser


def join(argv: list[str]) -> int:
    parser = join_parser()
    args = parser.parse_args(argv)
    if not args.token:
        parser.error("give the enrollment token: --token, or OPTIMAGPT_ENROLLMENT_TOKEN")
    parts = urlsplit(args.gateway_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        parser.error(f"the gateway URL must be https://host[:port], got {args.gateway_url!r}")
    if parts.scheme == "http" and parts.hostname not in LOCAL_HOSTS:
        parser.error("refusing to send an enrollment token over plain http:// to another machine; use the "
                     "gateway's https:// address (http:// only for a gateway on localhost)")
    state = Path(args.state_dir)
    node_id = load_node_id(state)
    try:
        verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=args.ca_file) if args.ca_file else True
    except (OSError, ssl.SSLError):
        parser.error(f"--ca-file {args.ca_file}: not a readable PEM certificate")
    url = f"{parts.scheme}://{parts.netloc}/optima/v1/nodes/enroll"
    try:
        response = httpx.post(url, json={"token": args.token, "node_id": node_id, "name": args.name},
                              timeout=TIMEOUT_S, verify=verify)
    except httpx.HTTPError as exc:
        print(f"could not reach the gateway at {parts.netloc}: {type(exc).__name__}", file=sys.stderr)
        return 1
    if response.status_code != 200:
        try:
            reason = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            reason = f"HTTP {response.status_code}"
        print(f"the gateway refused: {reason}", file=sys.stderr)
        return 1
    NodeSecret(state).save(str(response.json()["credential"]))
    (state / ENROLLED_FILE).write_text(f"{parts.scheme}://{parts.netloc}\n")
    print(f"Enrolled as {args.name} ({node_id}). Start the node with the same state folder:\n"
          f"  python -m node_agent --gateway-url {parts.scheme}://{parts.netloc} --state-dir {state} "
          "--models-dir <your models>")
    return 0
