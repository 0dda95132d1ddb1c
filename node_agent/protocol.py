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

import asyncio
import hashlib
import hmac
import json
import logging
import random
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

PROTOCOL_VERSION = 1
CLOSE_AUTH_FAILED = 4401
CLOSE_PROTOCOL_ERROR = 4400
CLOSE_HEARTBEAT_LOST = 4408
CLOSE_REPLACED = 4409  # the same node connected again; the older link gives way
HANDSHAKE_TIMEOUT_S = 10.0

# What a request asks of an executor ("op"): the first three run on an inference process, "tokenize"
# counts a conversation's tokens, "configure" changes the executor's settings on the node.
OP_CHAT = "chat"
OP_COMPLETION = "completion"
OP_EMBEDDING = "embedding"
OP_TOKENIZE = "tokenize"
OP_CONFIGURE = "configure"
OP_CANCEL = "cancel"  # on the agent -> worker pipe only: stop generating request `id`
INFERENCE_OPS = (OP_CHAT, OP_COMPLETION, OP_EMBEDDING)

# Heartbeat intervals without a word from the other side before a link is given up (checked four times an
# interval, so a half-open socket is let go within three).
SILENCE_LIMIT = 2.75
# Dialing again after a lost link: a random wait up to BACKOFF_BASE_S * 2**failures, at most BACKOFF_MAX_S.
BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 30.0

# A public model id, as clients name it in "model": a node's alias for a file, a remote upstream's id.
MODEL_ID_MAX_LENGTH = 200
MODEL_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$"
MODEL_ID_RE = re.compile(MODEL_ID_PATTERN)


def valid_model_id(text: str) -> bool:
    return len(text) <= MODEL_ID_MAX_LENGTH and MODEL_ID_RE.fullmatch(text) is not None

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


def redial_delay(failures: int, link_lasted_s: float) -> tuple[int, float]:
    """After a link ended: the failure count to keep and the seconds to wait before dialing again.

    A link that stayed up longer than BACKOFF_MAX_S was healthy, so the backoff starts over.
    """
    failures = 1 if link_lasted_s > BACKOFF_MAX_S else failures + 1
    return failures, random.uniform(0, min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** failures))  # nosec B311 # jitter


async def watch_silence(*, interval_s: float, last_heard: Callable[[], float], ping: Callable[[], Awaitable[None]],
                        lost: Callable[[float], Awaitable[None]], running: Callable[[], bool] = lambda: True) -> None:
    """The heartbeat of either end of a link: ping every interval, and call `lost(silent_s)` (then return) once
    the other side has said nothing for SILENCE_LIMIT intervals. Returns too when `running()` turns false."""
    pinged = 0.0
    while running():
        now = time.monotonic()
        silent = now - last_heard()
        if silent > SILENCE_LIMIT * interval_s:
            await lost(silent)
            return
        if now - pinged >= interval_s:
            pinged = now
            try:
                await ping()
            except Exception as exc:  # noqa: BLE001 - a link closing meanwhile: the silence check ends it
                logging.getLogger("optimagpt.link").debug("ping not sent: %s", type(exc).__name__)
        await asyncio.sleep(interval_s / 4)


# -- the handshake, the gateway's side (the node link consumer, and the probe of New Node) -------------
def hello_message(gateway_nonce: str) -> dict[str, Any]:
    return {"type": "hello", "protocol": PROTOCOL_VERSION, "nonce": gateway_nonce}


# Refusals that mean the other side does not speak this protocol at all (not: it holds another key).
REFUSED_NOT_AUTH = "expected auth"
REFUSED_SHORT_NONCE = "nonce too short"
NOT_THE_PROTOCOL = frozenset({REFUSED_NOT_AUTH, REFUSED_SHORT_NONCE})


def auth_refusal(auth: dict[str, Any], *, key: str, gateway_nonce: str) -> str | None:
    """Why the gateway refuses a node's `auth` answer to its hello, or None when the node proved the key."""
    if auth.get("type") != "auth":
        return REFUSED_NOT_AUTH
    if not key:
        return "the gateway has no node access key configured"
    node_nonce = str(auth.get("nonce", ""))
    if len(node_nonce) < 32:
        return REFUSED_SHORT_NONCE
    if not proof_matches(node_proof(key, gateway_nonce, node_nonce, str(auth.get("node_id", ""))), auth.get("proof")):
        return "access key mismatch"
    return None


def welcome_message(*, key: str, gateway_nonce: str, auth: dict[str, Any], heartbeat_interval_s: float,
                    new_secret: str | None = None) -> dict[str, Any]:
    """The gateway's proof, once the node's `auth` passed; with the node's identity secret on its first link."""
    node_nonce, node_id = str(auth["nonce"]), str(auth["node_id"])
    welcome: dict[str, Any] = {"type": "welcome", "proof": gateway_proof(key, gateway_nonce, node_nonce, node_id),
                               "heartbeat_interval_s": heartbeat_interval_s}
    if new_secret:
        welcome["node_secret"] = seal_node_secret(new_secret, key, gateway_nonce, node_nonce, node_id)
    return welcome


# -- the handshake, the node's side (dialing, or listening) -----------------------------------------
def auth_message(*, key: str, hello: dict[str, Any], node_id: str, node_nonce: str, name: str, version: str,
                 node_secret: str = "") -> dict[str, Any]:
    """The node's answer to the gateway's hello: its proof of the access key, and of its identity once it has
    a secret of its own."""
    gateway_nonce = str(hello.get("nonce", ""))
    auth = {"type": "auth", "node_id": node_id, "name": name, "version": version, "nonce": node_nonce,
            "proof": node_proof(key, gateway_nonce, node_nonce, node_id)}
    if node_secret:
        auth["identity"] = identity_proof(node_secret, gateway_nonce, node_nonce, node_id)
    return auth


def welcome_proven(welcome: dict[str, Any], *, key: str, auth: dict[str, Any], hello: dict[str, Any]) -> bool:
    """Whether the gateway's welcome proves that it holds the access key too."""
    expected = gateway_proof(key, str(hello.get("nonce", "")), auth["nonce"], auth["node_id"])
    return welcome.get("type") == "welcome" and proof_matches(expected, welcome.get("proof"))


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
    return bytes(a ^ b for a, b in zip(raw, pad, strict=True)).hex()


def open_node_secret(sealed: str, key: str, gateway_nonce: str, node_nonce: str, node_id: str) -> str:
    return seal_node_secret(sealed, key, gateway_nonce, node_nonce, node_id)  # the same pad undoes it


def new_node_secret() -> str:
    return secrets.token_hex(32)


def proof_matches(expected: str, given: object) -> bool:
    return isinstance(given, str) and hmac.compare_digest(expected.encode(), given.encode())
