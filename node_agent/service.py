"""systemd units for the gateway (`optimagpt-gateway.service`) and the node (`optimanode.service`).

Each runs the installed program from a prepared virtual environment (nothing installed, downloaded or
bootstrapped on start), as a dedicated user, with restart on failure, an environment file for settings and
secrets' file paths (never a secret on a command line, so never one in the journal), and the hardening
systemd offers: no new privileges, the whole file system read-only but the state folder, private /tmp and
devices (the node keeps the GPUs), no capabilities, a system-call filter. `systemd-analyze security` rates
both MEDIUM at worst (tests/node_agent/test_service.py runs it). Django-free, so the node agent can write
its own; `./optimagpt.sh install-service` writes the gateway's with the same code.
"""

from __future__ import annotations

import argparse
import os
import pwd
import secrets
import subprocess  # nosec B404 # useradd, and manage.py as the service's user: fixed argument lists
import sys
from dataclasses import dataclass
from pathlib import Path

from .settings import ENROLLED_FILE

# What both units share. Every line is a restriction a Python server of ours can live with: it opens
# sockets (IPv4, IPv6, Unix; netlink for psutil's interface list), reads its program and writes its state.
HARDENING = """\
NoNewPrivileges=yes
ProtectSystem=strict
ReadWritePaths={state}
ProtectHome=read-only
PrivateTmp=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
RemoveIPC=yes
CapabilityBoundingSet=
AmbientCapabilities=
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged @resources @mount @debug @cpu-emulation @obsolete
SystemCallErrorNumber=EPERM
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX AF_NETLINK
UMask=0077
"""

# The gateway needs no device and runs no generated code; it reads only its own process under /proc.
GATEWAY_ONLY = """\
PrivateDevices=yes
DevicePolicy=closed
MemoryDenyWriteExecute=yes
ProtectProc=invisible
ProcSubset=pid
PrivateUsers=yes
"""

# The node reads the machine's load under /proc (psutil) and uses its GPUs: those devices stay visible.
NODE_ONLY = """\
ProtectProc=invisible
DevicePolicy=closed
DeviceAllow=char-nvidiactl rw
DeviceAllow=char-nvidia-frontend rw
DeviceAllow=char-nvidia-uvm rw
DeviceAllow=char-nvidia-caps rw
DeviceAllow=/dev/dri rw
"""


@dataclass(frozen=True)
class Unit:
    name: str  # the file name, e.g. optimagpt-gateway.service
    text: str


def _unit(*, description: str, after: str, user: str, app: Path, env_file: Path, state: Path, exec_start: str,
          extra: str) -> str:
    return f"""\
[Unit]
Description={description}
Documentation=file://{app}/README.md
After={after}
Wants=network-online.target

[Service]
Type=simple
User={user}
Group={user}
WorkingDirectory={app}
EnvironmentFile={env_file}
Environment=PYTHONUNBUFFERED=1
ExecStart={exec_start}
Restart=on-failure
RestartSec=5
# SIGTERM stops both cleanly (streams finish, links close); past this, systemd kills.
TimeoutStopSec=30
{HARDENING.format(state=state)}{extra}
[Install]
WantedBy=multi-user.target
"""


def gateway_unit(*, python: Path, app: Path, user: str, state: Path, env_file: Path,
                 host: str = "0.0.0.0", port: int = 8000) -> Unit:  # nosec B104 # a server, by default on every address
    """The gateway: `python -m optimagpt.server` (daphne) from the virtual environment at `python`."""
    return Unit("optimagpt-gateway.service", _unit(
        description="OptimaGPT gateway", after="network-online.target postgresql.service redis-server.service",
        user=user, app=app, env_file=env_file, state=state,
        exec_start=f"{python} -m optimagpt.server -b {host} -p {port}", extra=GATEWAY_ONLY))


def node_unit(*, python: Path, app: Path, user: str, state: Path, env_file: Path) -> Unit:
    """The node agent: `python -m node_agent`; where it links and what it serves come from `env_file`
    (OPTIMAGPT_GATEWAY_URL, OPTIMAGPT_MODELS_DIRS, ...), its state (id, secret) from `state`."""
    return Unit("optimanode.service", _unit(
        description="OptimaGPT node agent", after="network-online.target", user=user, app=app,
        env_file=env_file, state=state, exec_start=f"{python} -m node_agent --state-dir {state}", extra=NODE_ONLY))


# -- the one-time setup: `python -m node_agent install-service`, `./optimagpt.sh install-service` ---------
NOLOGIN = "/usr/sbin/nologin"


def _in_virtualenv() -> bool:
    return sys.prefix != sys.base_prefix


def _user(name: str, home: Path, create: bool) -> tuple[int, int] | None:
    """The service user's ids, made as a system user (no login, no password) if it is missing and `create`."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        if not create:
            return None
        subprocess.run(["useradd", "--system", "--user-group", "--home-dir", str(home), "--no-create-home",  # nosec B603 B607
                        "--shell", NOLOGIN, name], check=True)
        entry = pwd.getpwnam(name)
    return entry.pw_uid, entry.pw_gid


def _owned_dir(path: Path, ids: tuple[int, int] | None) -> None:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.chmod(0o700)
    if ids is not None:
        os.chown(path, *ids)


def _private_file(path: Path, text: str, ids: tuple[int, int] | None, mode: int = 0o600) -> None:
    """Write `text` to `path` readable by its owner only (the service's group too with 0o640)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.chmod(path, mode)
    if ids is not None:
        os.chown(path, 0 if mode == 0o640 else ids[0], ids[1])


def _secret_file(path: Path, ids: tuple[int, int] | None, given: str = "") -> None:
    """A secret in a file of its own, made once (an existing one is kept: restarting setup changes no key)."""
    if path.exists() and path.read_text().strip():
        return
    _private_file(path, (given or secrets.token_urlsafe(32)) + "\n", ids)


def _env_file(path: Path, values: dict[str, str], ids: tuple[int, int] | None) -> None:
    """The unit's EnvironmentFile: settings and the paths of secret files (never a secret itself); kept if it
    exists, so an admin's edits survive a second setup."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        return
    lines = ["# Read by systemd for the service (README.md, \"Running it for real\"); .env.example lists the settings."]
    lines += [f"{k}={v}" for k, v in values.items()]
    _private_file(path, "\n".join(lines) + "\n", ids, 0o640)


def _write_unit(unit: Unit, unit_dir: Path) -> Path:
    unit_dir.mkdir(parents=True, exist_ok=True)
    path = unit_dir / unit.name
    path.write_text(unit.text)
    path.chmod(0o644)
    return path


def _common(parser: argparse.ArgumentParser, user: str, state: str, env_file: str) -> None:
    parser.add_argument("--user", default=user, help=f"the service's own user, made if missing (default {user})")
    parser.add_argument("--state-dir", default=state, help=f"its only writable folder (default {state})")
    parser.add_argument("--env-file", default=env_file, help=f"its EnvironmentFile (default {env_file})")
    parser.add_argument("--unit-dir", default="/etc/systemd/system", help="where the unit is written")
    parser.add_argument("--no-system-user", action="store_true",
                        help="make no user and change no owner (files stay the caller's): for trying it out")


def _prepare(args: argparse.Namespace) -> tuple[Path, Path, tuple[int, int] | None]:
    if not _in_virtualenv():
        raise SystemExit("run this with the Python of the virtual environment the service will use "
                         "(./optimagpt.sh made .venv; .venv/bin/python -m node_agent install-service)")
    state, env_file = Path(args.state_dir).resolve(), Path(args.env_file).resolve()
    ids = None if args.no_system_user else _user(args.user, state, create=os.geteuid() == 0)
    if ids is None and not args.no_system_user:
        raise SystemExit(f"the user {args.user} does not exist; run as root to make it, or pass --no-system-user")
    _owned_dir(state, ids)
    return state, env_file, ids


def _systemctl_hint(path: Path, unit: Unit) -> str:
    return (f"Wrote {path}. To start it now and at every boot:\n"
            f"  sudo systemctl daemon-reload\n  sudo systemctl enable --now {unit.name}\n"
            f"Its log: journalctl -u {unit.name} -f")


def install_node(argv: list[str]) -> None:
    """The node's setup: its state folder, and either the shared access key (copied in) or an enrollment with a
    token (`join`, run as the service's user so that the credential is its own), the gateway's CA if it has its
    own certificate, the environment file and the unit."""
    parser = argparse.ArgumentParser(prog="python -m node_agent install-service",
                                     description="Set the node agent up as a systemd service (optimanode.service).")
    _common(parser, "optimanode", "/var/lib/optimanode", "/etc/optimanode/node.env")
    parser.add_argument("--gateway-url", required=True, help="the gateway to dial, https:// for wss")
    parser.add_argument("--models-dir", action="append", required=True, help="a folder of GGUF models (repeatable)")
    parser.add_argument("--name", default=os.uname().nodename, help="the node's name on the gateway")
    parser.add_argument("--access-key-file", help="a file holding the gateway's node access key (copied into the "
                        "state folder, readable by the service only); or OPTIMAGPT_NODE_ACCESS_KEY for this command")
    parser.add_argument("--enrollment-token-file", help="a file holding an enrollment token from the gateway's "
                        "Nodes page (or OPTIMAGPT_ENROLLMENT_TOKEN): the node joins with it and needs no access key")
    parser.add_argument("--ca-file", help="the gateway's certificate or CA (public), for a gateway whose certificate "
                        "no public CA issued; copied into the state folder")
    args = parser.parse_args(argv)
    key = Path(args.access_key_file).read_text().strip() if args.access_key_file else \
        os.environ.get("OPTIMAGPT_NODE_ACCESS_KEY", "")
    token = Path(args.enrollment_token_file).read_text().strip() if args.enrollment_token_file else \
        os.environ.get("OPTIMAGPT_ENROLLMENT_TOKEN", "")
    state, env_file, ids = _prepare(args)
    env = {"OPTIMAGPT_GATEWAY_URL": args.gateway_url,
           "OPTIMAGPT_MODELS_DIRS": ",".join(str(Path(d).resolve()) for d in args.models_dir),
           "OPTIMAGPT_NODE_NAME": args.name}
    if args.ca_file:
        ca_file = state / "gateway-ca.pem"
        _private_file(ca_file, _certificates(Path(args.ca_file)), ids, 0o644)
        env["OPTIMAGPT_GATEWAY_CA_FILE"] = str(ca_file)
    key_file = state / "node_access_key"
    if token:
        _join(args, state, ids, token, env.get("OPTIMAGPT_GATEWAY_CA_FILE"))
    elif key or key_file.exists():
        _secret_file(key_file, ids, key)
        env["OPTIMAGPT_NODE_ACCESS_KEY_FILE"] = str(key_file)
    elif not (state / ENROLLED_FILE).exists():
        raise SystemExit("give the gateway's node access key (--access-key-file FILE, or OPTIMAGPT_NODE_ACCESS_KEY), "
                         "or an enrollment token (--enrollment-token-file FILE, or OPTIMAGPT_ENROLLMENT_TOKEN)")
    _env_file(env_file, env, ids)
    unit = node_unit(python=Path(sys.executable), app=Path(__file__).resolve().parent.parent, user=args.user,
                     state=state, env_file=env_file)
    print(_systemctl_hint(_write_unit(unit, Path(args.unit_dir)), unit))


def _certificates(path: Path) -> str:
    """The PEM certificates in `path` (public), or SystemExit saying why it is not one."""
    from cryptography import x509

    try:
        text = path.read_text()
        x509.load_pem_x509_certificates(text.encode())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"--ca-file {path}: not a readable PEM certificate ({type(exc).__name__})") from None
    return text


def _join(args: argparse.Namespace, state: Path, ids: tuple[int, int] | None, token: str, ca_file: str | None) -> None:
    """`python -m node_agent join` as the service's user: the token through the environment, never an argument."""
    as_user = [] if ids is None or os.geteuid() != 0 else ["runuser", "-u", args.user, "--"]
    env = {**os.environ, "OPTIMAGPT_ENROLLMENT_TOKEN": token, "OPTIMAGPT_NODE_STATE_DIR": str(state)}
    if ca_file:
        env["OPTIMAGPT_GATEWAY_CA_FILE"] = ca_file
    joined = subprocess.run([*as_user, sys.executable, "-m", "node_agent", "join", "--gateway-url",  # nosec B603
                             args.gateway_url, "--name", args.name], env=env, capture_output=True, text=True,
                            timeout=120)
    if joined.returncode != 0:
        raise SystemExit(f"could not enroll: {joined.stderr.strip()}")
    print(f"Enrolled {args.name} with the token; its credential is in {state} (readable by {args.user} only).")


def install_gateway(argv: list[str]) -> None:
    """The gateway's setup (`./optimagpt.sh install-service` runs it with the venv it prepared): its state folder
    with the database and secret files, the environment file, the database migrated and the admin account made
    (its password printed here, once: never in the journal), and the unit."""
    parser = argparse.ArgumentParser(prog="./optimagpt.sh install-service",
                                     description="Set the gateway up as a systemd service (optimagpt-gateway.service).")
    _common(parser, "optimagpt", "/var/lib/optimagpt", "/etc/optimagpt/gateway.env")
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on")  # nosec B104 # a server's choice
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--allowed-hosts", default="localhost,127.0.0.1", help="the names clients use (ALLOWED_HOSTS)")
    parser.add_argument("--https-port", type=int, default=8443,
                        help="where HTTPS listens once a certificate is applied (OPTIMAGPT_HTTPS_PORT; 0: never)")
    args = parser.parse_args(argv)
    state, env_file, ids = _prepare(args)
    for name in ("secret_key", "node_access_key"):
        _secret_file(state / name, ids)
    env = {"OPTIMAGPT_DATA_DIR": str(state), "SECRET_KEY_FILE": str(state / "secret_key"),
           "OPTIMAGPT_NODE_ACCESS_KEY_FILE": str(state / "node_access_key"), "ALLOWED_HOSTS": args.allowed_hosts,
           "OPTIMAGPT_AUTO_CONNECT_ADDRESS": "", "OPTIMAGPT_HTTPS_PORT": str(args.https_port)}
    _env_file(env_file, env, ids)
    app = Path(__file__).resolve().parent.parent
    settings_env = {**os.environ, **_read_env(env_file)}
    as_user = [] if ids is None or os.geteuid() != 0 else ["runuser", "-u", args.user, "--"]
    for command in (["migrate", "--verbosity", "0"], ["bootstrap"]):
        subprocess.run([*as_user, sys.executable, str(app / "manage.py"), *command], cwd=app, env=settings_env,  # nosec B603
                       check=True)
    unit = gateway_unit(python=Path(sys.executable), app=app, user=args.user, state=state, env_file=env_file,
                        host=args.host, port=args.port)
    print(_systemctl_hint(_write_unit(unit, Path(args.unit_dir)), unit))


def _read_env(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        name, sep, value = line.partition("=")
        if sep and not line.lstrip().startswith("#"):
            values[name.strip()] = value.strip()
    return values


if __name__ == "__main__":
    {"gateway": install_gateway, "node": install_node}[sys.argv[1]](sys.argv[2:])
