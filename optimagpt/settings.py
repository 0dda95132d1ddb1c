"""OptimaGPT settings, all read from the environment (see .env.example for every variable).

Embedded default: SQLite and the in-memory channel layer in one daphne process,
Celery tasks run in-process. DATABASE_URL switches to PostgreSQL, REDIS_URL to the
Redis channel layer and a real Celery broker.
"""

from __future__ import annotations

import hashlib
import ipaddress
import secrets
from datetime import timedelta
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from .env import env_bool, env_float, env_int, env_list, env_secret, env_str, env_str_map
from .files import restrict_to_owner

BASE_DIR = Path(__file__).resolve().parent.parent
DATA_DIR = Path(env_str("OPTIMAGPT_DATA_DIR", str(BASE_DIR / "var")))

DEBUG = env_bool("DEBUG", False)
SECRET_KEY = env_secret("SECRET_KEY")
# Without a key, Django still loads (so `manage.py check` can explain), but the system
# check optimagpt.E001 stops every command and the ASGI application refuses to start.
SECRET_KEY_MISSING = not SECRET_KEY
if SECRET_KEY_MISSING:
    SECRET_KEY = "insecure-debug-only-key-never-use-in-production" if DEBUG else secrets.token_urlsafe(50)

ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]"])
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "ninja",  # its Swagger UI files, so /docs loads nothing from another host
    "rest_framework_simplejwt.token_blacklist",
    "accounts",
    "nodes",
    "gateway",
    "chat",
    "mcp_servers",
    "responses_api",
    "operations",
    "certificates",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    # Static files (our CSS, Django admin's) from the gateway itself, also with DEBUG off.
    "whitenoise.middleware.WhiteNoiseMiddleware",
    # Browsers on HTTP to HTTPS, when switched on (certificates/middleware.py; never the API or node links).
    "certificates.middleware.HttpsRedirectMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Our pages run only their own script and style files (optimagpt/csp.py).
    "optimagpt.csp.ContentSecurityPolicyMiddleware",
]

ROOT_URLCONF = "optimagpt.urls"
ASGI_APPLICATION = "optimagpt.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASES = {
    "default": dj_database_url.parse(
        env_str("DATABASE_URL", f"sqlite:///{DATA_DIR / 'optimagpt.sqlite3'}"),
        conn_max_age=env_int("DATABASE_CONN_MAX_AGE", 60),
        conn_health_checks=True,
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # The database holds password hashes and key digests: its folder and files are for this user alone.
    restrict_to_owner(DATA_DIR, Path(DATABASES["default"]["NAME"]))
    # WAL lets the gateway's reads go on while a node report writes; the busy
    # timeout turns a brief lock into a wait instead of "database is locked".
    DATABASES["default"]["OPTIONS"] = {
        "timeout": 20,
        "transaction_mode": "IMMEDIATE",
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
AUTH_USER_MODEL = "accounts.User"
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "/"

REDIS_URL = env_str("REDIS_URL")
if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            # The pub/sub layer, not channels_redis.core: in the core layer every reply
            # channel of a process shares one blocking read, so a message for one waiter
            # waited for the other's (bench/README.md, "Measurements behind the code").
            "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
            "CONFIG": {"hosts": [REDIS_URL]},
        }
    }
else:
    CHANNEL_LAYERS = {
        "default": {"BACKEND": "channels.layers.InMemoryChannelLayer", "CONFIG": {"capacity": 1000, "expiry": 60}}
    }

# Tasks run in the process that enqueues them, unless CELERY_WORKER says a worker
# (`celery -A optimagpt worker`) takes them from Redis: with REDIS_URL alone and no
# worker, queued tasks (usage accounting) would wait for ever.
CELERY_WORKER = env_bool("CELERY_WORKER", False)
if CELERY_WORKER and not REDIS_URL:
    raise ImproperlyConfigured("CELERY_WORKER=true needs REDIS_URL: the worker takes its tasks from Redis.")
CELERY_BROKER_URL = REDIS_URL or "memory://"
CELERY_TASK_ALWAYS_EAGER = not CELERY_WORKER
CELERY_TASK_TIME_LIMIT = 300

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator", "OPTIONS": {"min_length": 8}},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
# Served straight from the apps' static folders: no STATIC_ROOT, no collectstatic step to forget.
WHITENOISE_USE_FINDERS = True
WHITENOISE_AUTOREFRESH = DEBUG

SECURE_CONTENT_TYPE_NOSNIFF = True
SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SECURE = env_bool("SESSION_COOKIE_SECURE", False)
CSRF_COOKIE_SECURE = SESSION_COOKIE_SECURE

# --- OptimaGPT ---------------------------------------------------------------
# Shared secret of gateway and nodes; it never crosses the wire (HMAC challenge and response).
OPTIMAGPT_NODE_ACCESS_KEY = env_secret("OPTIMAGPT_NODE_ACCESS_KEY")
# Whether a node id seen for the first time is routed requests at once; off, it waits on the Nodes page for an
# admin's approval (the run command approves its own local node).
OPTIMAGPT_NODE_AUTO_APPROVE = env_bool("OPTIMAGPT_NODE_AUTO_APPROVE", False)
OPTIMAGPT_HEARTBEAT_INTERVAL_S = env_float("OPTIMAGPT_HEARTBEAT_INTERVAL_S", 2.0)
# A request whose first token (or answer) took longer than this many seconds counts as delayed on the Nodes page.
OPTIMAGPT_DELAYED_REQUEST_S = env_float("OPTIMAGPT_DELAYED_REQUEST_S", 5.0)
# How long node metrics (CPU, RAM, GPU, VRAM samples) and node log lines are kept, in hours.
OPTIMAGPT_METRICS_RETENTION_H = env_float("OPTIMAGPT_METRICS_RETENTION_H", 24.0)
OPTIMAGPT_LOGS_RETENTION_H = env_float("OPTIMAGPT_LOGS_RETENTION_H", 168.0)
# Seconds between prunings of old metrics and logs (a Celery periodic task; in-process without a worker).
OPTIMAGPT_PRUNE_INTERVAL_S = env_float("OPTIMAGPT_PRUNE_INTERVAL_S", 600.0)
# Stored responses of the Responses API (store: true, the default) are deleted this many days after they were made.
OPTIMAGPT_RESPONSES_RETENTION_DAYS = env_float("OPTIMAGPT_RESPONSES_RETENTION_DAYS", 30.0)
# The request log (every API request's figures, never its prompt or reply; /manage/requests/): on or off, how
# often its buffer is written, and how many days entries are kept.
OPTIMAGPT_REQUEST_LOG = env_bool("OPTIMAGPT_REQUEST_LOG", True)
OPTIMAGPT_REQUEST_LOG_FLUSH_S = env_float("OPTIMAGPT_REQUEST_LOG_FLUSH_S", 1.0)
OPTIMAGPT_REQUEST_LOG_RETENTION_DAYS = env_float("OPTIMAGPT_REQUEST_LOG_RETENTION_DAYS", 30.0)
CELERY_BEAT_SCHEDULE = {
    "prune-node-history": {"task": "nodes.tasks.node_history_prune", "schedule": OPTIMAGPT_PRUNE_INTERVAL_S},
    "prune-responses": {"task": "responses_api.tasks.responses_prune", "schedule": OPTIMAGPT_PRUNE_INTERVAL_S},
    "prune-request-log": {"task": "operations.tasks.request_log_prune", "schedule": OPTIMAGPT_PRUNE_INTERVAL_S},
}
# Prometheus metrics at /metrics: counted at all, the bearer token a scraper must send, or open to anyone
# who reaches the gateway (only when said so: the figures name models, nodes and clients' load).
OPTIMAGPT_METRICS = env_bool("OPTIMAGPT_METRICS", True)
OPTIMAGPT_METRICS_TOKEN = env_secret("OPTIMAGPT_METRICS_TOKEN")
OPTIMAGPT_METRICS_OPEN = env_bool("OPTIMAGPT_METRICS_OPEN", False)
# System Tracing (switched on on the Configuration page) switches itself off after this many seconds; each
# channel of the Diagnostics page keeps this many traces. OTEL_EXPORTER_OTLP_ENDPOINT also sends them to a collector.
OPTIMAGPT_TRACING_MAX_S = env_float("OPTIMAGPT_TRACING_MAX_S", 3600.0)
OPTIMAGPT_TRACES_KEPT = env_int("OPTIMAGPT_TRACES_KEPT", 200)
# Inference answers name the node and the SHA-256 of the model file that made them (x-optimagpt-node,
# x-optimagpt-model-sha256).
OPTIMAGPT_PROVENANCE_HEADERS = env_bool("OPTIMAGPT_PROVENANCE_HEADERS", True)
# Per client address, on the API: failed authentications a minute before its unauthenticated attempts get 429
# (a valid key from the same address still passes), and requests a minute (0: no limit).
OPTIMAGPT_IP_AUTH_FAILURES_PER_MINUTE = env_int("OPTIMAGPT_IP_AUTH_FAILURES_PER_MINUTE", 20)
OPTIMAGPT_IP_REQUESTS_PER_MINUTE = env_int("OPTIMAGPT_IP_REQUESTS_PER_MINUTE", 0)
# With no node registered at all, try a node listening at this address and register it as "Local Node";
# empty turns it off.
OPTIMAGPT_AUTO_CONNECT_ADDRESS = env_str("OPTIMAGPT_AUTO_CONNECT_ADDRESS", "localhost:8022")
# HTTPS (certificates/): the port each gateway process serves HTTPS on beside HTTP, once it has a certificate
# (0: never); a certificate and key in PEM files that the deployment manages itself (certbot, say; read again
# when they change), which win over one uploaded on the Certificates page; and whether browsers that open a
# page over HTTP are sent to HTTPS (the API, health checks and node links never are; also a switch on the page).
OPTIMAGPT_HTTPS_PORT = env_int("OPTIMAGPT_HTTPS_PORT", 8443)
OPTIMAGPT_TLS_CERT_FILE = env_str("OPTIMAGPT_TLS_CERT_FILE", "")
OPTIMAGPT_TLS_KEY_FILE = env_str("OPTIMAGPT_TLS_KEY_FILE", "")
# How often each process looks whether the certificate files, or the stored certificate, changed.
OPTIMAGPT_TLS_CHECK_S = env_float("OPTIMAGPT_TLS_CHECK_S", 10.0)
OPTIMAGPT_HTTPS_REDIRECT = env_bool("OPTIMAGPT_HTTPS_REDIRECT", False)
# Request bodies above this size are refused with 413 before they are read.
OPTIMAGPT_MAX_BODY_BYTES = env_int("OPTIMAGPT_MAX_BODY_BYTES", 8 * 1024 * 1024)
# A request body must have arrived this many seconds after its request began; slower ones get 408.
OPTIMAGPT_BODY_TIMEOUT_S = env_float("OPTIMAGPT_BODY_TIMEOUT_S", 30.0)
# max_tokens above this is refused as absurd; the model's context window limits it further.
OPTIMAGPT_MAX_TOKENS_LIMIT = env_int("OPTIMAGPT_MAX_TOKENS_LIMIT", 131072)
# Waits on a node: until the first event (queueing and prompt processing), between events, in all.
OPTIMAGPT_FIRST_EVENT_TIMEOUT_S = env_float("OPTIMAGPT_FIRST_EVENT_TIMEOUT_S", 120.0)
OPTIMAGPT_EVENT_TIMEOUT_S = env_float("OPTIMAGPT_EVENT_TIMEOUT_S", 60.0)
OPTIMAGPT_REQUEST_DEADLINE_S = env_float("OPTIMAGPT_REQUEST_DEADLINE_S", 900.0)
# How long a verified API key is trusted without asking the database (per gateway process).
OPTIMAGPT_API_KEY_CACHE_S = env_float("OPTIMAGPT_API_KEY_CACHE_S", 5.0)
# How long the router trusts its view of the executors of a model without asking the database.
OPTIMAGPT_ROUTE_CACHE_S = env_float("OPTIMAGPT_ROUTE_CACHE_S", 1.0)
DATA_UPLOAD_MAX_MEMORY_SIZE = OPTIMAGPT_MAX_BODY_BYTES
# Routing (gateway/routing/router.py): least_busy (the smallest share of its slots in use) or round_robin.
OPTIMAGPT_ROUTING = env_str("OPTIMAGPT_ROUTING", "least_busy")
if OPTIMAGPT_ROUTING not in ("least_busy", "round_robin"):  # gateway/routing/router.py's STRATEGIES
    raise ImproperlyConfigured(f"OPTIMAGPT_ROUTING must be least_busy or round_robin, not {OPTIMAGPT_ROUTING!r}")
# Requests sent at once to each process of an executor: one generating, the next one ready on the node.
OPTIMAGPT_REQUESTS_PER_SLOT = env_int("OPTIMAGPT_REQUESTS_PER_SLOT", 2)
# Requests waiting per model (per gateway process) while every slot is busy; more get 429.
OPTIMAGPT_QUEUE_MAX_LENGTH = env_int("OPTIMAGPT_QUEUE_MAX_LENGTH", 1000)
# The longest a request waits in that queue before it gets 503 (with Retry-After).
OPTIMAGPT_QUEUE_MAX_WAIT_S = env_float("OPTIMAGPT_QUEUE_MAX_WAIT_S", 60.0)
# A request that failed before any of its reply reached the client is sent to another node this many times.
OPTIMAGPT_FAILOVER_ATTEMPTS = env_int("OPTIMAGPT_FAILOVER_ATTEMPTS", 2)
# With Redis: how often gateway processes share their in-flight counts per executor.
OPTIMAGPT_SHARED_LOAD_INTERVAL_S = env_float("OPTIMAGPT_SHARED_LOAD_INTERVAL_S", 0.1)
# MCP servers (mcp_servers/): a tool call's time limit; the most characters of a result the model reads;
# how often servers are checked again; tool rounds per request before the reply ends; and the stdio servers
# the gateway may start, as a JSON object of names to command lines (never from a page: only from here).
OPTIMAGPT_MCP_CALL_TIMEOUT_S = env_float("OPTIMAGPT_MCP_CALL_TIMEOUT_S", 30.0)
OPTIMAGPT_MCP_RESULT_MAX_CHARS = env_int("OPTIMAGPT_MCP_RESULT_MAX_CHARS", 20000)
OPTIMAGPT_MCP_CHECK_INTERVAL_S = env_float("OPTIMAGPT_MCP_CHECK_INTERVAL_S", 60.0)
OPTIMAGPT_MCP_MAX_ROUNDS = env_int("OPTIMAGPT_MCP_MAX_ROUNDS", 8)
OPTIMAGPT_MCP_STDIO_COMMANDS = env_str_map("OPTIMAGPT_MCP_STDIO_COMMANDS")

# JWTs for applications and OptimaChat. Signed with JWT_SIGNING_KEY, or a key derived from
# SECRET_KEY (never a default). A password change or deactivation invalidates a user's tokens.
SIMPLE_JWT = {
    "SIGNING_KEY": env_secret("JWT_SIGNING_KEY")
    or hashlib.sha256(b"optimagpt-jwt\n" + SECRET_KEY.encode()).hexdigest(),
    "ALGORITHM": "HS256",
    "ACCESS_TOKEN_LIFETIME": timedelta(seconds=env_int("JWT_ACCESS_TOKEN_LIFETIME_S", 3600)),
    "REFRESH_TOKEN_LIFETIME": timedelta(seconds=env_int("JWT_REFRESH_TOKEN_LIFETIME_S", 14 * 24 * 3600)),
    "CHECK_REVOKE_TOKEN": True,  # nosec B105 # not a password: a token type, a prefix or an empty default
    "CHECK_USER_IS_ACTIVE": True,
    "UPDATE_LAST_LOGIN": True,
}
# Seconds between writes of the usage accounting (tokens per key and user per day).
OPTIMAGPT_USAGE_FLUSH_S = env_float("OPTIMAGPT_USAGE_FLUSH_S", 2.0)
# Failed logins allowed per client address (and per username) in OPTIMAGPT_LOGIN_WINDOW_S.
# Failed logins allowed per client address and username in OPTIMAGPT_LOGIN_WINDOW_S; an address may fail
# four times as often over all usernames. Throttled is the address that fails, never the account.
OPTIMAGPT_LOGIN_FAILURES = env_int("OPTIMAGPT_LOGIN_FAILURES", 5)
OPTIMAGPT_LOGIN_WINDOW_S = env_int("OPTIMAGPT_LOGIN_WINDOW_S", 900)
# Reverse proxies (addresses or networks) whose X-Forwarded-For names the client; empty: none is believed.
OPTIMAGPT_TRUSTED_PROXIES = env_list("OPTIMAGPT_TRUSTED_PROXIES", [])
for _proxy in OPTIMAGPT_TRUSTED_PROXIES:
    try:
        ipaddress.ip_network(_proxy, strict=False)
    except ValueError:
        raise ImproperlyConfigured(f"OPTIMAGPT_TRUSTED_PROXIES: {_proxy!r} is not an address or network") from None
# Every way to log in (login page, /api/auth/login, Django admin) asks this backend, which applies the throttle.
AUTHENTICATION_BACKENDS = ["accounts.backends.ThrottledModelBackend"]

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"},
                 # The gateway's lines on the Diagnostics page (operations/diagnostics.py).
                 "diagnostics": {"class": "operations.diagnostics.DiagnosticsHandler"}},
    "root": {"handlers": ["console", "diagnostics"], "level": env_str("LOG_LEVEL", "INFO").upper()},
    "loggers": {
        # daphne logs every request line at INFO; keep the console for what matters.
        "daphne": {"level": "WARNING"},
        "django.channels.server": {"level": "WARNING"},
        # Every 4xx is a warning there; API clients get the reason in the body, the log keeps 5xx.
        "django.request": {"level": "ERROR"},
        # The MCP SDK's HTTP client logs every request line, and the SDK its session ids: not for the console.
        "httpx2": {"level": "WARNING"},
        "mcp": {"level": "WARNING"},
    },
}
