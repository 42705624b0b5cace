"""The one YAML file: pydantic models (schema v1), ${ENV} interpolation, loading, errors with paths.

Schema names are a contract (see DESIGN.md). Unknown keys are rejected; every
secret is held as a SecretStr and registered with ``redact`` as it is loaded.
"""

from __future__ import annotations

import fnmatch
import math
import os
import re
import shlex
import string
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from supervisor import hostnames, redact
from supervisor.durations import format_duration, parse_duration

Duration = Annotated[float, BeforeValidator(parse_duration)]
PLATFORM_KINDS = ("cloudfoundry", "docker", "kubernetes", "systemd", "local")
# pip extra and the module each platform kind needs (checked without importing it)
PLATFORM_REQUIREMENTS = {
    "cloudfoundry": ("cloudfoundry", "cloudfoundry_client"),
    "docker": ("docker", "docker"),
    "kubernetes": ("kubernetes", "kubernetes"),
}
PLACEHOLDERS = {"hostname", "worker", "node"}
SAMPLE_HOSTNAME = "celery@sample-1"  # templates must render for it (check-config)
GROUP_CACHE = 100_000  # hostnames whose group is remembered (Config.group_of); then it starts over
MAX_COUNT = 1_000_000_000  # counts and thresholds (min_workers, warning, ...): beyond it, a typo
MAX_PING_TIMEOUT = 10.0  # a live worker answers a targeted ping in milliseconds
MAX_CONNECT_TIMEOUT = 60.0
PATH_MAX_BYTES = 4095  # Linux PATH_MAX (4096 with the NUL)
NAME_MAX_BYTES = 255  # one file or directory name
STATE_NAME_MAX_BYTES = 200  # state_path's own name: the supervisor adds .lock, -wal, .corrupt-<time> to it


def _check_path(v, *, name_max: int = NAME_MAX_BYTES):
    """A file system path the supervisor will open: no NUL, within Linux's limits."""
    if v is None:
        return v
    text = str(v)
    if not text.strip():
        raise ValueError("must not be empty")
    if "\0" in text:
        raise ValueError("holds a NUL character")
    raw = os.fsencode(text)
    if len(raw) > PATH_MAX_BYTES:
        raise ValueError(f"is {len(raw)} bytes long: a path holds at most {PATH_MAX_BYTES} bytes")
    names = [n for n in raw.split(b"/") if n]
    longest = max(names[:-1], key=len, default=b"")
    if len(longest) > NAME_MAX_BYTES:
        raise ValueError(f"has a directory name of {len(longest)} bytes: a name holds at most {NAME_MAX_BYTES}")
    if names and len(names[-1]) > name_max:
        raise ValueError(f"its file name is {len(names[-1])} bytes long: at most {name_max} here")
    return v


def _switch(on: str, off: str):
    """YAML 1.1 reads an unquoted on/off/yes/no/true/false as a boolean: take it as the switch meant."""
    def conv(v):
        if v is True:
            return on
        if v is False:
            return off
        return v
    return conv


class ConfigError(Exception):
    """An invalid or unreadable config: ``errors`` are (path, reason) pairs."""

    def __init__(self, errors: list[tuple[str, str]], source: str = ""):
        # printable whatever went wrong: a lone surrogate in a key or value must not make the
        # message itself unprintable (UnicodeEncodeError when it is shown)
        self.errors = [(_printable(p), _printable(m)) for p, m in errors]
        self.source = _printable(source)
        errors = self.errors
        super().__init__("\n".join(f"{p}: {m}" if p else m for p, m in errors))


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def printable(text: object) -> str:
    """One printable line whatever the text holds: a lone surrogate, a newline or an escape sequence
    in a key or value is shown as its escape (never breaks the line, never talks to the terminal)."""
    s = str(text).encode("utf-8", "backslashreplace").decode("utf-8")
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), s)


_printable = printable


def _unique_names(items: list, what: str) -> list:
    names = [i.name for i in items]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"{what} names must be unique: {', '.join(dup)}")
    return items


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


# ---------------------------------------------------------------- broker
class BrokerConfig(_Model):
    url: SecretStr
    transport_options: dict[str, Any] = Field(default_factory=dict, validate_default=True)
    management_url: SecretStr | None = None
    connect_timeout: Duration = Field(3.0, ge=0.5, le=MAX_CONNECT_TIMEOUT)  # connecting / one broker round trip; "could not observe" after

    @field_validator("url")
    @classmethod
    def _scheme(cls, v: SecretStr) -> SecretStr:
        url = v.get_secret_value()
        schemes = [_url_scheme(part) for part in url.split(";")]
        if schemes[0] not in BROKER_SCHEMES:
            raise ValueError("broker url must start with one of "
                             + ", ".join(f"{s}://" for s in BROKER_SCHEMES))
        if schemes[0] == "sentinel" and any(s != "sentinel" for s in schemes):
            # kombu's form: every sentinel of the group, each as its own URL, joined by ';'
            raise ValueError("a Redis Sentinel url lists sentinels only: "
                             "sentinel://host:26379;sentinel://host2:26379")
        return v

    @field_validator("transport_options")
    @classmethod
    def _sentinel_master(cls, v: dict[str, Any], info) -> dict[str, Any]:
        url = info.data.get("url")
        if url is not None and _url_scheme(url.get_secret_value()) == "sentinel" and not (v or {}).get("master_name"):
            raise ValueError("a sentinel:// broker needs master_name here: the name the sentinels monitor "
                             "the master under, as in the Celery app's broker_transport_options")
        return v

    @property
    def scheme(self) -> str:
        return _url_scheme(self.url.get_secret_value())

    @property
    def is_redis(self) -> bool:
        """Any Redis kombu's redis transport speaks to: TCP, TLS, a unix socket, or the master a
        Sentinel names (observed alike: heartbeats, ping, queue lengths, the lease)."""
        return self.scheme in REDIS_SCHEMES

    @property
    def display_url(self) -> str:
        # sentinel://h1:26379;sentinel://h2:26379 is several URLs: each is shown without its password
        return ";".join(redact.redact_url(part) for part in self.url.get_secret_value().split(";"))


# redis+socket:///path/redis.sock is kombu's redis transport over a unix socket; sentinel:// asks the
# sentinels for the master of transport_options.master_name
REDIS_SCHEMES = ("redis", "rediss", "redis+socket", "sentinel")
BROKER_SCHEMES = (*REDIS_SCHEMES, "amqp", "amqps", "pyamqp", "filesystem", "memory")


def _url_scheme(url: str) -> str:
    return url.split("://", 1)[0].strip().lower() if "://" in url else ""


class LoopConfig(_Model):
    interval: Duration = 5.0
    state_path: Path = Path("./supervisor-state.db")
    # how long a targeted ping (and the consumers' active_queues) waits for replies: at most 10s and
    # never longer than interval (a tick would otherwise outlast its interval, and `once` wait as long)
    ping_timeout: Duration = Field(1.0, ge=0.1)

    @field_validator("interval")
    @classmethod
    def _positive(cls, v: float) -> float:
        if v < 0.1:
            raise ValueError("interval must be at least 100ms")
        return v

    @model_validator(mode="before")
    @classmethod
    def _default_ping_within_interval(cls, data: Any) -> Any:
        # the default ping_timeout (1s) shrinks to a shorter interval; a ping_timeout one sets is checked
        if isinstance(data, dict) and "ping_timeout" not in data and "interval" in data:
            try:
                interval = parse_duration(data["interval"])
            except ValueError:
                return data
            if 0.1 <= interval < 1.0:
                data = {**data, "ping_timeout": interval}
        return data

    @field_validator("state_path", mode="before")
    @classmethod
    def _state_path(cls, v: Any) -> Any:
        return _check_path(v, name_max=STATE_NAME_MAX_BYTES) if isinstance(v, (str, Path)) else v

    @field_validator("ping_timeout")
    @classmethod
    def _ping_bounded(cls, v: float, info) -> float:
        if v > MAX_PING_TIMEOUT:
            raise ValueError(f"ping_timeout must be at most {MAX_PING_TIMEOUT:g}s: a live worker answers a "
                             "targeted ping within milliseconds, a longer wait only slows every tick and `once`")
        interval = info.data.get("interval")
        if interval is not None and v > interval:
            raise ValueError(f"ping_timeout ({format_duration(v)}) must not be longer than interval "
                             f"({format_duration(interval)}): a tick would wait longer for replies than it lasts")
        return v


# ---------------------------------------------------------------- notify
SeverityName = Literal["info", "warning", "critical"]


class ChannelConfig(_Model):
    name: str = Field(min_length=1)
    url: SecretStr
    severities: list[SeverityName] = Field(default_factory=lambda: ["warning", "critical"])
    timeout: Duration = 10.0  # one delivery attempt


class NotifyConfig(_Model):
    channels: list[ChannelConfig] = Field(default_factory=list)
    repeat_every: Annotated[float, BeforeValidator(lambda v: 0.0 if v is False else parse_duration(v))] = 4 * 3600.0  # 0/off: never
    send_resolved: bool = True
    retry: list[Duration] = Field(default_factory=lambda: [5.0, 30.0, 120.0, 600.0])  # waits between attempts

    @field_validator("channels")
    @classmethod
    def _unique(cls, v: list[ChannelConfig]) -> list[ChannelConfig]:
        return _unique_names(v, "channel")


# ---------------------------------------------------------------- platforms (connection settings)
class LocalPlatform(_Model):
    run_dir: Path | None = None  # pid files and worker output; default: next to state_path

    @field_validator("run_dir", mode="before")
    @classmethod
    def _path(cls, v: Any) -> Any:
        return _check_path(v) if isinstance(v, (str, Path)) else v


class SystemdPlatform(_Model):
    host: str | None = None  # systemctl -H [user@]host[:port][/container] (systemctl uses ssh)
    user: bool = False  # systemctl --user (the user's own service manager)
    timeout: Duration = Field(30.0, ge=1.0)  # one systemctl/journalctl call; a restart also waits the unit's TimeoutStopSec

    @field_validator("host")
    @classmethod
    def _host(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(
            r"(?:[A-Za-z0-9_][A-Za-z0-9._-]*@)?(?:[A-Za-z0-9_][A-Za-z0-9._-]*|\[[0-9A-Fa-f:.]+\])(?::\d{1,5})?"
            r"(?:/[A-Za-z0-9_][A-Za-z0-9._-]*)?", v
        ):
            raise ValueError("host must be [user@]host[:port][/container], as systemctl -H takes it")
        return v


class DockerPlatform(_Model):
    # unix:///var/run/docker.sock, tcp://host:2376, ssh://user@host; default: DOCKER_HOST, else the
    # local socket. TLS (tcp://...:2376): DOCKER_TLS_VERIFY / DOCKER_CERT_PATH, as for the docker CLI
    base_url: str | None = None
    timeout: Duration = Field(30.0, ge=1.0)  # one API call; a restart waits stop_timeout more


class KubernetesPlatform(_Model):
    in_cluster: bool | None = None  # None: in-cluster when running in a pod, else kubeconfig
    kubeconfig: str | None = None  # default: $KUBECONFIG, else ~/.kube/config
    context: str | None = None  # default: the kubeconfig's current-context
    namespace: str = "default"
    timeout: Duration = Field(30.0, gt=0)  # one API call (a delete/evict waits longer than its grace period)


class CloudFoundryPlatform(_Model):
    """Log in with username + password (UAA password grant, client ``client_id`` or "cf"), or with
    client_id + client_secret alone (client credentials grant). The adapter checks the pair."""

    api_url: str
    username: str | None = None
    password: SecretStr | None = None
    client_id: str | None = None
    client_secret: SecretStr | None = None
    verify_ssl: bool = True
    timeout: Duration = Field(30.0, gt=0)  # every call to the API, UAA and log-cache

    @field_validator("api_url")
    @classmethod
    def _http(cls, v: str) -> str:
        if not re.match(r"https?://[^/\s]+", v):
            raise ValueError("api_url must be the CF API's http(s) URL, e.g. https://api.cf.example.com")
        return v.rstrip("/")


class PlatformsConfig(_Model):
    local: LocalPlatform | None = None
    systemd: SystemdPlatform | None = None
    docker: DockerPlatform | None = None
    kubernetes: KubernetesPlatform | None = None
    cloudfoundry: CloudFoundryPlatform | None = None


# ---------------------------------------------------------------- groups and restarts
def _fields(v: str, what: str = "template") -> list[str]:
    """The placeholder names of a template; ValueError for a format spec or conversion: placeholders
    are plain substitutions ({hostname:>9999999} would make a 10 MB name, {hostname:d} never renders)."""
    try:
        parsed = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(v) if f is not None]
    except ValueError as e:
        raise ValueError(f"invalid {what} {v!r}: {e} (write {{{{ and }}}} for literal braces)") from None
    for f, spec, conv in parsed:
        if spec or conv:
            shown = f"{{{f}{'!' + conv if conv else ''}{':' + spec if spec else ''}}}"
            raise ValueError(f"{shown}: a placeholder is a plain substitution, write {{{f}}} "
                             "(no format spec or !conversion)")
    return [f for f, _, _ in parsed]


def _sample(template: str) -> str:
    worker, _, node = SAMPLE_HOSTNAME.partition("@")
    try:
        return template.format(hostname=SAMPLE_HOSTNAME, worker=worker, node=node)
    except (ValueError, KeyError, IndexError, AttributeError, TypeError) as e:
        raise ValueError(f"the template does not render for {SAMPLE_HOSTNAME}: {e}") from None


def _check_template(v: str | None) -> str | None:
    if v is None:
        return v
    if "\0" in v:
        raise ValueError("holds a NUL character")
    names = set(_fields(v))
    bad = sorted(n for n in names if n not in PLACEHOLDERS)
    if bad:
        raise ValueError(
            f"unknown placeholder {{{bad[0]}}}: use {{hostname}}, {{worker}} or {{node}} "
            "(write {{ and }} for literal braces)"
        )
    _sample(v)
    return v


class _RestartBase(_Model):
    target: str | None = None
    max_restarts: int = Field(3, ge=0, le=MAX_COUNT)
    window: Duration = 30 * 60.0
    backoff: Duration = 30.0  # doubles per restart in the window, capped at the window
    grace: Duration = 60.0  # after a restart, do not judge the worker for this long
    stop_timeout: Duration = 10.0  # how long a restart lets the old process stop gracefully

    @field_validator("target")
    @classmethod
    def _template(cls, v: str | None) -> str | None:
        return _check_template(v)


class LocalRestart(_RestartBase):
    platform: Literal["local"]
    target: str  # the command line, e.g. "celery -A proj worker -n {hostname} --pool prefork"
    cwd: str | None = None
    env: dict[str, str] = Field(default_factory=dict)

    @field_validator("target")
    @classmethod
    def _command(cls, v: str) -> str:
        # split as the adapter does (POSIX shell words, no shell), then each word filled
        try:
            words = shlex.split(v)
        except ValueError as e:
            raise ValueError(f"the command cannot be split into words: {str(e).lower()} "
                             "(quote as a POSIX shell would)") from None
        if not words:
            raise ValueError("the command is empty")
        for w in words:
            _sample(w)
        return v

    @field_validator("cwd")
    @classmethod
    def _cwd(cls, v: str | None) -> str | None:
        return _check_path(v)

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, str]) -> dict[str, str]:
        for name, value in v.items():
            if not name or "=" in name or "\0" in name:
                raise ValueError(f"{name!r} is not an environment variable name (no '=', not empty)")
            if "\0" in value:
                raise ValueError(f"the value of {name} holds a NUL character")
        return v


class SystemdRestart(_RestartBase):
    platform: Literal["systemd"]
    target: str = "celery-worker@{worker}.service"  # the unit; ".service" is added when no unit type is given

    @field_validator("target")
    @classmethod
    def _unit_name(cls, v: str) -> str:
        literal = "".join(text for text, _, _, _ in string.Formatter().parse(v))
        if not re.fullmatch(r"[A-Za-z0-9:_.\\@-]*", literal) or literal.startswith("-"):
            raise ValueError(f"{v!r} is not a unit name template: a unit name holds only letters, digits "
                             "and :_.@- (e.g. celery-worker@{worker}.service)")
        return v


class DockerRestart(_RestartBase):
    platform: Literal["docker"]
    # target: a container name template ("celery-{node}"); selector: container labels. Either or
    # both; a container serves the hostname whose node part is its own hostname (Config.Hostname)
    selector: dict[str, str] = Field(default_factory=dict)  # container labels

    @model_validator(mode="after")
    def _target_or_selector(self) -> DockerRestart:
        if not self.target and not self.selector:
            raise ValueError("platform docker needs target (a container name template such as "
                             "\"celery-{node}\") or selector (container labels such as {app: celery-worker})")
        return self


class KubernetesRestart(_RestartBase):
    platform: Literal["kubernetes"]
    target: str = "{node}"  # the pod's name: a worker started with -n celery@$(POD_NAME) -> "{node}"
    namespace: str | None = None  # default: platforms.kubernetes.namespace
    selector: dict[str, str] = Field(default_factory=dict)  # pod labels (equality only)
    mode: Literal["delete", "evict", "rollout"] = "delete"
    container: str | None = None  # the worker's container (for its state and logs); default: the pod's only one


class CloudFoundryRestart(_RestartBase):
    """``app``: the CF app name (a template over {hostname} {worker} {node}, or fixed). ``instance``:
    the pattern a Celery hostname of the app matches, ``*`` any text, ``{index}`` the CF instance
    index (digits), ``{app}`` the app name (``app`` when set, else taken from the hostname). Workers
    are started with ``-n celery@<app>-$CF_INSTANCE_INDEX`` for the default pattern."""

    platform: Literal["cloudfoundry"]
    app: str | None = None
    instance: str = "*@{app}-{index}"
    process: str | None = None  # process type; default: the app's only one, else worker, else web
    space_guid: str | None = None  # when the same app name exists in several spaces
    mode: Literal["instance", "app", "rolling"] = "instance"

    @field_validator("app")
    @classmethod
    def _app_template(cls, v: str | None) -> str | None:
        return _check_template(v)

    @field_validator("instance")
    @classmethod
    def _instance_pattern(cls, v: str) -> str:
        names = _fields(v, "instance pattern")
        bad = sorted(n for n in names if n not in ("app", "index"))
        if bad:
            raise ValueError(f"unknown placeholder {{{bad[0]}}} in instance pattern: use {{index}}, {{app}} and *")
        if names.count("index") != 1 or names.count("app") > 1:
            raise ValueError("the instance pattern needs {index} exactly once (and {app} at most once), "
                             "e.g. \"*@{app}-{index}\" for workers started with -n celery@APP-$CF_INSTANCE_INDEX")
        return v

    @model_validator(mode="after")
    def _app_known(self) -> CloudFoundryRestart:
        if self.target is not None:
            raise ValueError("cloudfoundry restarts take app and instance, not target "
                             "(app: my-worker, instance: \"*@{app}-{index}\")")
        if self.app is None and "{app}" not in self.instance:
            raise ValueError("set app (the CF app name) or put {app} in the instance pattern")
        return self


RestartConfig = Annotated[
    LocalRestart | SystemdRestart | DockerRestart | KubernetesRestart | CloudFoundryRestart,
    Field(discriminator="platform"),
]


class GroupConfig(_Model):
    name: str = Field(min_length=1)
    hostnames: list[str] = Field(default_factory=list)  # globs over Celery hostnames
    workers: list[str] = Field(default_factory=list)  # explicit hostnames that must exist
    min_workers: int = Field(0, ge=0, le=MAX_COUNT)
    queues: list[str] = Field(default_factory=list)
    heartbeat_timeout: Duration = 10.0
    hung_timeout: Duration = 600.0
    # a worker that heartbeats, has free pool slots and takes nothing from a backlog of its queues
    # that does not drain for this long is stalled (0 = off; supervisor/stall.py)
    stall_timeout: Duration = Field(120.0, ge=0.0)
    restart: RestartConfig | None = None

    @field_validator("workers")
    @classmethod
    def _full_hostnames(cls, v: list[str]) -> list[str]:
        for h in v:
            if "@" not in h or any(c in h for c in "*?["):
                raise ValueError(f"{h!r} is not a full Celery hostname such as celery@web-1 (globs go in hostnames)")
            why = hostnames.problem(h)
            if why:  # events of such a hostname are refused: the worker could never be seen alive
                raise ValueError(f"{hostnames.shown(h)} cannot be a Celery hostname ({why})")
        return v

    @model_validator(mode="after")
    def _something_to_match(self) -> GroupConfig:
        if not self.hostnames and not self.workers:
            raise ValueError("a group needs hostnames (globs) or workers (explicit hostnames)")
        if self.heartbeat_timeout < 3.0:
            raise ValueError("heartbeat_timeout must be at least 3s (workers heartbeat every 2s)")
        if self.hung_timeout < self.heartbeat_timeout:
            raise ValueError("hung_timeout must not be shorter than heartbeat_timeout")
        if 0 < self.stall_timeout < 5.0:
            raise ValueError("stall_timeout must be 0 (off) or at least 5s (workers heartbeat every 2s)")
        return self

    def matches(self, hostname: str) -> bool:
        return hostname in self.workers or any(fnmatch.fnmatchcase(hostname, g) for g in self.hostnames)


class QueueConfig(_Model):
    name: str = Field(min_length=1)
    warning: int | None = Field(None, ge=0, le=MAX_COUNT)
    critical: int | None = Field(None, ge=0, le=MAX_COUNT)
    for_: Duration = Field(0.0, alias="for")
    min_consumers: int = Field(0, ge=0, le=MAX_COUNT)

    @model_validator(mode="after")
    def _order(self) -> QueueConfig:
        if self.warning is not None and self.critical is not None and self.warning > self.critical:
            raise ValueError("warning must not be above critical")
        return self


class HttpConfig(_Model):
    # bearer token (or the password of HTTP basic auth, any user name) for every endpoint; required
    # for a listen address that is not loopback, unless allow_unauthenticated is true. Declared before
    # listen: listen's check reads them.
    token: SecretStr | None = Field(None, min_length=16)
    allow_unauthenticated: bool = False
    listen: str | None = None

    @field_validator("listen")
    @classmethod
    def _hostport(cls, v: str | None, info: ValidationInfo) -> str | None:
        # an empty host (":9811") listens on every interface
        if v is not None and not re.fullmatch(r"(\[[0-9a-fA-F:]+\]|[^:\s]*):\d{1,5}", v):
            raise ValueError("listen must be HOST:PORT, e.g. 127.0.0.1:9811, [::1]:9811 or :9811")
        if v is not None and int(v.rsplit(":", 1)[1]) > 65535:
            raise ValueError("the port of listen must be at most 65535")
        if v is not None and {"token", "allow_unauthenticated"} <= info.data.keys() and info.data["token"] is None \
                and not info.data.get("allow_unauthenticated") and not listen_is_loopback(v):
            raise ValueError(f"{v} is not a loopback address: set http.token (bearer token or basic auth), "
                             "or http.allow_unauthenticated: true to let anyone who can reach it read the "
                             "status page and /status")
        return v


def listen_is_loopback(listen: str) -> bool:
    """127.0.0.0/8, ::1 and localhost; an empty host (every interface) is not."""
    import ipaddress

    host = listen.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class HaConfig(_Model):
    # YAML reads an unquoted off/no/false as false: that is "off"; on/yes/true is "auto"
    lease: Annotated[Literal["auto", "kubernetes", "off"], BeforeValidator(_switch("auto", "off"))] = "auto"
    lease_ttl: Duration = Field(15.0, ge=1.0)
    # the lease's name: replicas of one deployment share it (default: derived from the group names,
    # so that supervisors of different fleets on one broker do not stand by for each other)
    name: str | None = Field(None, pattern=r"^[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?$")
    namespace: str | None = None  # ha.lease kubernetes: the Lease's namespace (default platforms.kubernetes.namespace)

    @model_validator(mode="after")
    def _kubernetes_client(self) -> HaConfig:
        import importlib.util

        if self.lease == "kubernetes" and importlib.util.find_spec("kubernetes") is None:
            raise ValueError("ha.lease kubernetes needs the 'kubernetes' package: "
                             "pip install 'celery-supervisor[kubernetes]'")
        return self


class Config(_Model):
    version: Literal[1] = 1
    _groups_of: dict = PrivateAttr(default_factory=dict)  # hostname -> its group (group_of)
    broker: BrokerConfig
    loop: LoopConfig = Field(default_factory=LoopConfig)
    notify: NotifyConfig = Field(default_factory=NotifyConfig)
    platforms: PlatformsConfig = Field(default_factory=PlatformsConfig)
    groups: list[GroupConfig] = Field(default_factory=list)
    queues: list[QueueConfig] = Field(default_factory=list)
    http: HttpConfig = Field(default_factory=HttpConfig)
    ha: HaConfig = Field(default_factory=HaConfig)

    @field_validator("groups")
    @classmethod
    def _unique_groups(cls, v: list[GroupConfig]) -> list[GroupConfig]:
        return _unique_names(v, "group")

    @field_validator("queues")
    @classmethod
    def _unique_queues(cls, v: list[QueueConfig]) -> list[QueueConfig]:
        return _unique_names(v, "queue")

    def group(self, name: str) -> GroupConfig | None:
        return next((g for g in self.groups if g.name == name), None)

    def group_of(self, hostname: str) -> GroupConfig | None:
        """The group that names the hostname in its workers, else the first whose globs match it
        (remembered per hostname: a tick asks for every worker of the fleet, several times)."""
        cache = self.__pydantic_private__["_groups_of"]  # not self._groups_of: pydantic's __getattr__, 1 us
        try:
            return cache[hostname]
        except KeyError:
            pass
        except TypeError:  # not hashable: no group
            return None
        found = None
        for g in self.groups:
            if hostname in g.workers:
                found = g
                break
        else:
            for g in self.groups:
                if g.matches(hostname):
                    found = g
                    break
        if len(cache) >= GROUP_CACHE:  # hostnames come from the broker: keep the memory bounded
            cache.clear()
        cache[hostname] = found
        return found

    def missing_adapters(self) -> list[tuple[str, str]]:
        """(path, reason) for each group whose platform has no adapter in this version."""
        import importlib.util

        have = [k for k in PLATFORM_KINDS if importlib.util.find_spec(f"platforms.{k}") is not None]
        return [(f"groups.{i}.restart.platform",
                 f"no {g.restart.platform} adapter in this version of celery-supervisor (available: {', '.join(have)})")
                for i, g in enumerate(self.groups)
                if g.restart is not None and g.restart.platform not in have]

    def platform_kinds(self) -> set[str]:
        return {g.restart.platform for g in self.groups if g.restart is not None}

    def secrets(self) -> list[str]:
        """Every secret value in the config (for redaction): the broker, management and Apprise URLs,
        the CF password and client secret, the broker's transport options whose key names a secret
        (sentinel_kwargs.password), and each restart.env value that is a secret by the rule of
        ``redact.env_value_is_secret``."""
        out = [self.broker.url.get_secret_value()]
        if self.broker.management_url:
            out.append(self.broker.management_url.get_secret_value())
        out += [c.url.get_secret_value() for c in self.notify.channels]
        cf = self.platforms.cloudfoundry
        if cf:
            out += [s.get_secret_value() for s in (cf.password, cf.client_secret) if s]
        out += redact.named_secrets(self.broker.transport_options)
        for g in self.groups:
            env = getattr(g.restart, "env", None) or {}
            out += [v for k, v in env.items() if redact.env_value_is_secret(k, v)]
        if self.http.token is not None:
            out.append(self.http.token.get_secret_value())
        return out


# ---------------------------------------------------------------- interpolation
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$\$")


def interpolate(data: Any, env: dict[str, str] | os._Environ, path: str = "", errors: list | None = None) -> Any:
    """Replace ${VAR} and ${VAR:-default} in every string value; $$ is a literal $."""
    if errors is None:
        errors = []
    if isinstance(data, dict):
        return {k: interpolate(v, env, f"{path}.{k}" if path else str(k), errors) for k, v in data.items()}
    if isinstance(data, list):
        return [interpolate(v, env, f"{path}.{i}" if path else str(i), errors) for i, v in enumerate(data)]
    if isinstance(data, str) and "$" in data:

        def sub(m: re.Match) -> str:
            if m.group(0) == "$$":
                return "$"
            name, default = m.group(1), m.group(2)
            val = env.get(name)
            if val is None or (val == "" and default is not None):
                if default is not None:
                    return default
                errors.append((path, f"environment variable {name} is not set (write ${{{name}:-default}} for a default)"))
                return ""
            return val

        return _VAR.sub(sub, data)
    return data


# ---------------------------------------------------------------- loading
_TAGS = set(PLATFORM_KINDS)


def _loc(loc: tuple) -> str:
    parts: list[str] = []
    for i, p in enumerate(loc):
        # drop the discriminator tag pydantic adds after "restart" (groups.0.restart.local.window)
        if i > 0 and loc[i - 1] == "restart" and p in _TAGS:
            continue
        if isinstance(p, str) and p.startswith("function-"):
            continue
        parts.append("for" if p == "for_" else str(p))
    return ".".join(parts)


def _reason(err: dict) -> str:
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        return "unknown key (not part of the schema; check its spelling)"
    if err["type"] == "missing":
        return "required"
    if err["type"] == "union_tag_invalid":
        return f"unknown platform: use one of {', '.join(PLATFORM_KINDS)}"
    if err["type"] in ("path_type", "path_parsing"):
        return "must be a path (text)"
    if err["type"] == "union_tag_not_found":
        return f"platform is required: one of {', '.join(PLATFORM_KINDS)}"
    return msg.removeprefix("Value error, ")


def parse_config(data: Any, env: dict[str, str] | os._Environ | None = None, source: str = "") -> Config:
    """Validate a loaded YAML document. Raises ConfigError listing every problem with its path."""
    if data is None:
        raise ConfigError([("", "the config is empty")], source)
    if not isinstance(data, dict):
        raise ConfigError([("", "the config must be a mapping (key: value) at the top level")], source)
    errors: list[tuple[str, str]] = []
    data = interpolate(data, os.environ if env is None else env, errors=errors)
    n_unset = len(errors)
    bad_text = _text_errors(data)
    if bad_text:  # nothing else is checked: other messages could quote the text, which cannot be printed
        raise ConfigError(errors + bad_text, source)
    try:
        cfg = Config.model_validate(data)
    except ValidationError as e:
        errors += [(_loc(err["loc"]), _reason(err)) for err in e.errors(include_input=False, include_url=False)]
        cfg = None
    errors += _channel_url_errors(data)
    errors += _broker_errors(data, errors)
    if cfg is not None:
        errors += _cross_checks(cfg)
    # a missing ${VAR} is one problem: not also "required" or "bad scheme" for the value it left empty
    unset = {p for p, m in errors[:n_unset]}
    errors = errors[:n_unset] + [(p, m) for p, m in errors[n_unset:] if p not in unset]
    if errors:
        _register_raw_secrets(data)
        # a value that failed validation may still be a secret: scrub the messages too
        raise ConfigError([(p, redact.scrub(m)) for p, m in errors], source)
    # every secret the config holds, in every form it may be printed (redact.register_url finds a
    # password however the URL is written, even one a URL parser rejects)
    redact.register_url(cfg.broker.url.get_secret_value())
    if cfg.broker.management_url:
        redact.register_url(cfg.broker.management_url.get_secret_value())
    for c in cfg.notify.channels:
        redact.register_url(c.url.get_secret_value(), tokens=True)
    for s in redact.named_secrets(cfg.broker.transport_options):
        redact.register_secret(s)
    cf = cfg.platforms.cloudfoundry
    if cf is not None:
        for secret in (cf.password, cf.client_secret):
            redact.register_secret(secret.get_secret_value() if secret else None)
        if cf.client_secret:  # the client credentials an HTTP client sends as Basic auth
            redact.register_basic(cf.client_id or "cf", cf.client_secret.get_secret_value())
    for g in cfg.groups:  # restart.env values are secrets by default (redact.env_value_is_secret)
        for name, value in (getattr(g.restart, "env", None) or {}).items():
            redact.register_env(name, value)
    if cfg.http.token is not None:  # the status page's token (bearer, or the password of basic auth)
        redact.register_secret(cfg.http.token.get_secret_value())
    return cfg


def _text_errors(data: Any, path: str = "") -> list[tuple[str, str]]:
    """Strings that are not text (a lone surrogate: a \\uD800-\\uDFFF escape in YAML, or an undecodable
    byte from an environment variable): accepted, they would fail later when printed or sent."""
    why = ("is not valid text: it holds a lone surrogate (a \\uD800-\\uDFFF escape without its pair, or an "
           "undecodable byte from an environment variable)")

    def bad(text: str) -> bool:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False

    out: list[tuple[str, str]] = []
    if isinstance(data, dict):
        for k, v in data.items():
            p = f"{path}.{k}" if path else str(k)
            if isinstance(k, str) and bad(k):
                out.append((p, f"this key {why}"))
            out += _text_errors(v, p)
    elif isinstance(data, list):
        for i, v in enumerate(data):
            out += _text_errors(v, f"{path}.{i}" if path else str(i))
    elif isinstance(data, str) and bad(data):
        out.append((path, why))
    return out


# ---------------------------------------------------------------- broker URL and transport options
SSL_CERT_REQS = ("CERT_REQUIRED", "CERT_OPTIONAL", "CERT_NONE", "required", "optional", "none")


def _broker_errors(data: dict, errors: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """What kombu would fail on only when the daemon connects: checked here, for check-config."""
    broker = data.get("broker")
    if not isinstance(broker, dict):
        return []
    out: list[tuple[str, str]] = []
    url = broker.get("url")
    if isinstance(url, str) and not any(p == "broker.url" for p, _ in errors):
        out += [("broker.url", m) for m in _broker_url_problems(url)]
    opts = broker.get("transport_options")
    if isinstance(opts, dict):
        out += [(f"broker.transport_options.{k}", m) for k, m in transport_option_problems(opts)]
    return out


def _broker_url_problems(url: str) -> list[str]:
    """Each ';'-separated URL (kombu's failover list, and the sentinels of sentinel://) as kombu reads
    it. The messages never quote the URL: it may hold a password."""
    from urllib.parse import parse_qsl, urlsplit

    out: list[str] = []
    for part in (p.strip() for p in url.split(";")):
        if "://" not in part:
            continue
        scheme = part.split("://", 1)[0].lower()
        if scheme in ("memory", "filesystem"):
            continue
        try:
            u = urlsplit(part)
        except ValueError:
            out.append("is not a URL (check the brackets of an IPv6 address)")
            continue
        if "+" not in scheme:  # redis+socket:///path/redis.sock names a socket: no host, no port
            if "@" not in u.netloc and "@" in f"{u.path}?{u.query}#{u.fragment}":
                out.append("the URL has an @ after its host: a password holding #, / or ? must be "
                           "URL-encoded (%23, %2F, %3F)")
                continue
            try:
                port = u.port
            except ValueError:
                digits = u.netloc.rpartition("@")[2].rpartition(":")[2].isdigit()
                out.append("the port must be a number from 1 to 65535" + ("" if digits else
                           " (a password holding #, / or ? must be URL-encoded: %23, %2F, %3F)"))
                continue
            if port == 0:
                out.append("the port must be a number from 1 to 65535")
                continue
        try:
            query = parse_qsl(u.query, keep_blank_values=True)
        except ValueError:
            query = []
        for k, v in query:
            if k == "ssl_cert_reqs" and v not in SSL_CERT_REQS:
                out.append(f"ssl_cert_reqs must be one of {', '.join(SSL_CERT_REQS)}")
        if not out and "+" not in scheme:  # h5: kombu's Connection does not parse_url redis+socket:// URLs
            try:
                from kombu.utils.url import parse_url

                parse_url(part)
            except Exception as e:  # what kombu itself cannot read; its message may quote the URL
                out.append(f"kombu cannot read this URL ({type(e).__name__})")
    return out


_TEXT = "text"
_SECONDS = "seconds"
_COUNT = "count"
_FLAG = "flag"
_MAPPING = "mapping"
# kombu's redis (and sentinel) channel options and the virtual transport's, with the type kombu needs;
# others are passed through unchecked (another transport may take them). None: kombu's default.
TRANSPORT_OPTION_TYPES: dict[str, tuple[str, bool]] = {  # name -> (type, None allowed)
    "sep": (_TEXT, False), "global_keyprefix": (_TEXT, False), "master_name": (_TEXT, False),
    "unacked_key": (_TEXT, False), "unacked_index_key": (_TEXT, False), "unacked_mutex_key": (_TEXT, False),
    "body_encoding": (_TEXT, False), "deadletter_queue": (_TEXT, True), "client_name": (_TEXT, True),
    "ack_emulation": (_FLAG, False), "fanout_patterns": (_FLAG, False), "socket_keepalive": (_FLAG, True),
    "retry_on_timeout": (_FLAG, False), "sentinel_fanout_compat": (_FLAG, False),
    "confirm_publish": (_FLAG, False),
    "visibility_timeout": (_SECONDS, False), "unacked_mutex_expire": (_SECONDS, False),
    "unacked_restore_interval": (_SECONDS, True), "unacked_restore_throttle": (_SECONDS, True),
    "socket_timeout": (_SECONDS, True), "socket_connect_timeout": (_SECONDS, True),
    "health_check_interval": (_SECONDS, False), "polling_interval": (_SECONDS, True),
    "interval_start": (_SECONDS, False), "interval_step": (_SECONDS, False), "interval_max": (_SECONDS, False),
    "max_connections": (_COUNT, True), "max_retries": (_COUNT, True), "min_other_sentinels": (_COUNT, False),
    "unacked_restore_limit": (_COUNT, True),
    "sentinel_kwargs": (_MAPPING, True), "socket_keepalive_options": (_MAPPING, True),
}
QUEUE_ORDER_STRATEGIES = ("round_robin", "sorted", "priority")


def transport_option_problems(opts: dict) -> list[tuple[str, str]]:
    """(name, reason) for each transport option kombu would choke on (a TypeError inside kombu when
    the daemon connects, or worse, a wrong key layout for the queue lengths)."""
    out: list[tuple[str, str]] = []
    for name, value in opts.items():
        if name == "priority_steps":
            if (not isinstance(value, list) or not value
                    or not all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= 255 for n in value)
                    or value != sorted(set(value))):
                out.append((name, "must be a list of priorities from 0 to 255 in ascending order, "
                                  "e.g. [0, 3, 6, 9] (the same as the Celery app's)"))
            continue
        if name == "queue_order_strategy":
            if value not in QUEUE_ORDER_STRATEGIES:
                out.append((name, f"must be one of {', '.join(QUEUE_ORDER_STRATEGIES)}"))
            continue
        if name == "fanout_prefix":
            if not isinstance(value, (bool, str)):
                out.append((name, "must be true, false or a prefix (text)"))
            continue
        if name not in TRANSPORT_OPTION_TYPES:
            continue
        kind, nullable = TRANSPORT_OPTION_TYPES[name]
        if value is None:
            if not nullable:
                out.append((name, f"must not be null ({_KIND_TEXT[kind]})"))
            continue
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = {
            _TEXT: isinstance(value, str),
            _FLAG: isinstance(value, bool),
            _SECONDS: number and math.isfinite(value) and 0 <= value <= 365 * 86400,
            _COUNT: number and isinstance(value, int) and 0 <= value <= MAX_COUNT,
            _MAPPING: isinstance(value, dict),
        }[kind]
        if not ok:
            out.append((name, f"must be {_KIND_TEXT[kind]}"))
        elif name == "max_connections" and value < 1:
            out.append((name, "must be at least 1"))
    return out


_KIND_TEXT = {
    _TEXT: "text (quote it in YAML)",
    _FLAG: "true or false",
    _SECONDS: "a number of seconds from 0 to 31536000 (kombu takes no units such as 10s)",
    _COUNT: f"a whole number from 0 to {MAX_COUNT}",
    _MAPPING: "a mapping (key: value)",
}


def _channel_url_errors(data: dict) -> list[tuple[str, str]]:
    """Apprise URLs it would refuse, checked even when other parts of the file are invalid."""
    notify = data.get("notify")
    channels = notify.get("channels") if isinstance(notify, dict) else None
    urls = [(i, c["url"]) for i, c in enumerate(channels or []) if isinstance(c, dict)
            and isinstance(c.get("url"), str) and c["url"]] if isinstance(channels, list) else []
    if not urls:
        return []
    from supervisor.notify import url_error

    out = []
    for i, url in urls:
        err = url_error(url)
        if err:
            out.append((f"notify.channels.{i}.url", err))
    return out


def _cross_checks(cfg: Config) -> list[tuple[str, str]]:
    import importlib.util

    errors = []
    for gi, g in enumerate(cfg.groups):
        # a group's queues need no entry under `queues` (that is for thresholds): a typo shows as a
        # queue no worker of the group is seen consuming (status, the stall rule ignores it)
        if g.restart is None:
            continue
        kind = g.restart.platform
        if kind in PLATFORM_REQUIREMENTS:
            extra, module = PLATFORM_REQUIREMENTS[kind]
            if importlib.util.find_spec(module) is None:
                errors.append(
                    (
                        f"groups.{gi}.restart.platform",
                        f"the {kind} adapter needs the {module!r} package: "
                        f"pip install 'celery-supervisor[{extra}]'",
                    )
                )
        if kind == "cloudfoundry" and cfg.platforms.cloudfoundry is None:
            errors.append((f"groups.{gi}.restart.platform", "platform cloudfoundry needs platforms.cloudfoundry.api_url"))
    return errors


def load_config(path: str | os.PathLike, env: dict[str, str] | None = None) -> Config:
    """Read and validate a config file. Raises ConfigError (never a traceback) on any problem."""
    from supervisor.config_file import FileProblem, read_yaml

    source = os.fsdecode(path)
    try:  # a regular file of at most 1 MiB, YAML within limits (supervisor/config_file.py)
        data = read_yaml(path)
    except FileProblem as e:
        raise ConfigError([("", str(e))], source) from None
    return parse_config(data, env, source=source)


def _register_raw_secrets(data):
    # whatever the types: this runs on a config that failed validation (notify: {channels: 5})
    def get(d, *ks):
        for k in ks:
            d = d.get(k) if isinstance(d, dict) else None
        return d if isinstance(d, str) else None
    if not isinstance(data, dict):
        return
    for u in (get(data, "broker", "url"), get(data, "broker", "management_url")):
        redact.register_url(u)
    notify = data.get("notify") if isinstance(data.get("notify"), dict) else {}
    channels = notify.get("channels")
    for c in channels if isinstance(channels, list) else []:
        if isinstance(c, dict) and isinstance(c.get("url"), str):
            redact.register_url(c["url"], tokens=True)
    for k in ("password", "client_secret"):
        redact.register_secret(get(data, "platforms", "cloudfoundry", k))
    redact.register_secret(get(data, "http", "token"))
