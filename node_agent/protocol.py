"""The node link's wire protocol, shared by the agent and the gateway (so: no Django here).

Every message is a JSON object with a "type". After the socket opens, whoever
dialed, the handshake is:

    gateway -> node   {"type": "hello", "protocol": 1, "nonce": G}
    node -> gateway   {"type": "auth", "node_id", "name", "nonce": N, "proof": node_proof(key, G, N, node_id)}
    gateway -> node   {"type": "welcome", "proof": gateway_proof(key, G, N, node_id), "heartbeat_interval_s"}
                      or {"type": "refused", "reason"} and a close with code 4401

The access key never crosses the wire; each side proves it holds the key by an
HMAC over both fresh nonces, with a different label per direction so that one
side's proof can never be replayed as the other's. Then the node sends
"register" (hardware, executors), and from there on:

    gateway -> node   request {id, executor, op, stream, body}, cancel {id}, ping, pong
    node -> gateway   delta {id, ...}, end {id, ...}, error {id, error}, executors, metrics, logs, ping, pong
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

PROTOCOL_VERSION = 1
CLOSE_AUTH_FAILED = 4401
CLOSE_PROTOCOL_ERROR = 4400
CLOSE_HEARTBEAT_LOST = 4408
CLOSE_REPLACED = 4409  # the same node connected again; the older link gives way
HANDSHAKE_TIMEOUT_S = 10.0


def new_nonce() -> str:
    return secrets.token_hex(32)


def _proof(label: str, key: str, gateway_nonce: str, node_nonce: str, node_id: str) -> str:
    message = "\n".join((label, str(PROTOCOL_VERSION), gateway_nonce, node_nonce, node_id)).encode()
    return hmac.new(key.encode(), message, hashlib.sha256).hexdigest()


def node_proof(key: str, gateway_nonce: str, node_nonce: str, node_id: str) -> str:
    return _proof("optimagpt-node", key, gateway_nonce, node_nonce, node_id)


def gateway_proof(key: str, gateway_nonce: str, node_nonce: str, node_id: str) -> str:
    return _proof("optimagpt-gateway", key, gateway_nonce, node_nonce, node_id)


def proof_matches(expected: str, given: object) -> bool:
    return isinstance(given, str) and hmac.compare_digest(expected.encode(), given.encode())
