"""The node link's wire protocol, shared by the agent and the gateway (so: no Django here).

Every message is a JSON object with a "type". After the socket opens, whoever
dialed, the handshake is:

    gateway -> node   {"type": "hello", "protocol": 1, "nonce": G}
    node -> gateway   {"type": "auth", "node_id", "name", "nonce": N, "proof": node_proof(key, G, N, node_id),
                       "identity": identity_proof(node_secret, G, N, node_id)  (once it has a secret)}
    gateway -> node   {"type": "welcome", "proof": gateway_proof(key, G, N, node_id), "heartbeat_interval_s",
                       "node_secret": seal_node_secret(...)  (on the first link under this id)}
                      or {"type": "refused", "reason"} and a close with code 4401

The access key never crosses the wire; each side proves it holds the key by an
HMAC over both fresh nonces, with a different label per direction so that one
side's proof can never be replayed as the other's. The access key is shared by
every node, so it cannot tell nodes apart: on a node id's first link the gateway
gives that node a secret of its own (kept encrypted on the gateway, in the
node's state folder on the node), and from then on a link under that id must
also prove it holds that secret. An impostor with only the access key and
another node's id is refused. Then the node sends
"register" (hardware, executors), and from there on:

    gateway -> node   request {id, executor, op, stream, deadline_s, body}, cancel {id}, ping, pong
    node -> gateway   delta {id, ...}, end {id, ...}, error {id, error}, part {id, data, more},
                      executors, metrics, logs, ping, pong

A node message longer than LINK_FRAME_BYTES goes as "part" messages of its text
(id: the request's, or "" for the node's own reports), joined by the gateway, so no
reply is ever too large for the gateway's WebSocket limit (daphne's 1 MiB, which
guards it against unauthenticated clients); see split_message.

Inside the node, the agent speaks to its inference processes over a pipe of
length-prefixed frames (`pipe_frame`): the request carries the client's JSON as
it was sent, newlines included, and a length, unlike a delimiter, cannot be
forged by any byte of it. Only the gateway mints request ids; they are hex.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from typing import Any

PROTOCOL_VERSION = 1
CLOSE_AUTH_FAILED = 4401
CLOSE_PROTOCOL_ERROR = 4400
CLOSE_HEARTBEAT_LOST = 4408
CLOSE_REPLACED = 4409  # the same node connected again; the older link gives way
HANDSHAKE_TIMEOUT_S = 10.0

# The largest WebSocket message either side accepts: a request body at the gateway's limit and the
# request's own fields fit. Longer node messages are split into parts of LINK_FRAME_BYTES characters:
# even all escaped (6 bytes a character) a part stays under the 1 MiB that WebSocket servers allow by default.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
LINK_FRAME_BYTES = 128 * 1024
# The largest frame on the agent -> worker pipe.
PIPE_FRAME_MAX_BYTES = MAX_MESSAGE_BYTES


def error_event(rid: str, message: str, *, code: str | None, status: int,
                kind: str | None = None) -> dict[str, Any]:
    """The event that ends request `rid` with an error; `status` is the HTTP status the client gets."""
    return {"type": "error", "id": rid, "error": {
        "message": message, "type": kind or ("invalid_request_error" if status < 500 else "server_error"),
        "code": code, "status": status}}


def pipe_frame(payload: bytes) -> bytes:
    """One message on the agent -> worker pipe: its length in decimal, a newline, then the payload."""
    return b"%d\n" % len(payload) + payload


def split_message(rid: str, text: str, limit: int = LINK_FRAME_BYTES) -> list[str]:
    """`text` as it goes on the link: itself when short, else "part" messages the gateway joins in order.

    Splits by characters, not bytes, so every part is valid text.
    """
    if len(text) <= limit:
        return [text]
    pieces = [text[i:i + limit] for i in range(0, len(text), limit)]
    return [json.dumps({"type": "part", "id": rid, "data": piece, "more": i < len(pieces) - 1},
                       ensure_ascii=False, separators=(",", ":")) for i, piece in enumerate(pieces)]


def new_nonce() -> str:
    return secrets.token_hex(32)


def _proof(label: str, key: str, gateway_nonce: str, node_nonce: str, node_id: str) -> str:
    message = "\n".join((label, str(PROTOCOL_VERSION), gateway_nonce, node_nonce, node_id)).encode()
    return hmac.new(key.encode(), message, hashlib.sha256).hexdigest()


def node_proof(key: str, gateway_nonce: str, node_nonce: str, node_id: str) -> str:
    return _proof("optimagpt-node", key, gateway_nonce, node_nonce, node_id)


def gateway_proof(key: str, gateway_nonce: str, node_nonce: str, node_id: str) -> str:
    return _proof("optimagpt-gateway", key, gateway_nonce, node_nonce, node_id)


def identity_proof(node_secret: str, gateway_nonce: str, node_nonce: str, node_id: str) -> str:
    """Proof that a node is the one that first linked under `node_id`: keyed by the secret the gateway gave it."""
    return _proof("optimagpt-node-identity", node_secret, gateway_nonce, node_nonce, node_id)


def _secret_pad(key: str, gateway_nonce: str, node_nonce: str, node_id: str) -> bytes:
    return bytes.fromhex(_proof("optimagpt-node-secret", key, gateway_nonce, node_nonce, node_id))


def seal_node_secret(secret: str, key: str, gateway_nonce: str, node_nonce: str, node_id: str) -> str:
    """The node's secret as the welcome carries it: masked by a pad only holders of the access key can make
    (fresh for every handshake), so it never crosses the wire readable, wss or not."""
    raw = bytes.fromhex(secret)
    pad = _secret_pad(key, gateway_nonce, node_nonce, node_id)
    if len(raw) != len(pad):
        raise ValueError("a node secret is 32 bytes")
    return bytes(a ^ b for a, b in zip(raw, pad)).hex()


def open_node_secret(sealed: str, key: str, gateway_nonce: str, node_nonce: str, node_id: str) -> str:
    return seal_node_secret(sealed, key, gateway_nonce, node_nonce, node_id)  # the same pad undoes it


def new_node_secret() -> str:
    return secrets.token_hex(32)


def proof_matches(expected: str, given: object) -> bool:
    return isinstance(given, str) and hmac.compare_digest(expected.encode(), given.encode())
