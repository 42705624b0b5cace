"""The one YAML file: pydantic models (schema v1), ${ENV} interpolation, loading, errors with paths.

Schema names are a contract (see DESIGN.md). Unknown keys are rejected; every
secret is held as a SecretStr and registered with ``redact`` as it is loaded.
"""

from __future__ import annotations

import fnmatch
import os
import re
import string
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from supervisor import redact
from supervisor.durations import parse_duration

Duration = Annotated[float, BeforeValidator(parse_duration)]
PLATFORM_KINDS = ("cloudfoundry", "docker", "kubernetes", "systemd", "local")
# pip extra and the module each platform kind needs (checked without importing it)
PLATFORM_REQUIREMENTS = {
    "cloudfoundry": ("cloudfoundry", "cloudfoundry_client"),
    "docker": ("docker", "docker"),
    "kubernetes": ("kubernetes", "kubernetes"),
}
PLACEHOLDERS = {"hostname", "worker", "node"}


class ConfigError(Exception):
    """An invalid or unreadable config: ``errors`` are (path, reason) pairs."""

    def __init__(self, errors: list[tuple[str, str]], source: str = ""):
        self.errors = errors
        self.source = source
        super().__init__("\n".join(f"{p}: {m}" if p else m for p, m in errors))


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
    transport_options: dict[str, Any] = Field(default_factory=dict)
    management_url: SecretStr | None = None
    connect_timeout: Duration = Field(3.0, ge=0.5)  # connecting / one broker round trip; "could not observe" after

    @field_validator("url")
    @classmethod
    def _scheme(cls, v: SecretStr) -> SecretStr:
        url = v.get_secret_value()
        scheme = url.split("://", 1)[0].lower() if "://" in url else ""
        allowed = ("redis", "rediss", "amqp", "amqps", "pyamqp", "filesystem", "memory")
        if scheme not in allowed:
            raise ValueError("broker url must start with redis://, rediss://, amqp:// or amqps://")
        return v

    @property
    def scheme(self) -> str:
        return self.url.get_secret_value().split("://", 1)[0].lower()

    @property
    def is_redis(self) -> bool:
        return self.scheme in ("redis", "rediss")

    @property
    def display_url(self) -> str:
        return redact.redact_url(self.url.get_secret_value())


class LoopConfig(_Model):
    interval: Duration = 5.0
    state_path: Path = Path("./supervisor-state.db")
    ping_timeout: Duration = Field(1.0, ge=0.1)  # how long a targeted ping waits for replies

    @field_validator("interval")
    @classmethod
    def _positive(cls, v: float) -> float:
        if v < 0.1:
            raise ValueError("interval must be at least 100ms")
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
    repeat_every: Duration = 4 * 3600.0
    send_resolved: bool = True
    retry: list[Duration] = Field(default_factory=lambda: [5.0, 30.0, 120.0, 600.0])  # waits between attempts

    @field_validator("channels")
    @classmethod
    def _unique(cls, v: list[ChannelConfig]) -> list[ChannelConfig]:
        return _unique_names(v, "channel")


# ---------------------------------------------------------------- platforms (connection settings)
class LocalPlatform(_Model):
    run_dir: Path | None = None  # pid files and worker output; default: next to state_path


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
def _check_template(v: str | None) -> str | None:
    if v is None:
        return v
    try:
        names = {f for _, f, _, _ in string.Formatter().parse(v) if f is not None}
    except ValueError as e:
        raise ValueError(f"invalid template {v!r}: {e}") from None
    bad = sorted(n for n in names if n not in PLACEHOLDERS)
    if bad:
        raise ValueError(
            f"unknown placeholder {{{bad[0]}}}: use {{hostname}}, {{worker}} or {{node}} "
            "(write {{ and }} for literal braces)"
        )
    return v


class _RestartBase(_Model):
    target: str | None = None
    max_restarts: int = Field(3, ge=0)
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
        try:
            names = [f for _, f, _, _ in string.Formatter().parse(v) if f is not None]
        except ValueError as e:
            raise ValueError(f"invalid instance pattern {v!r}: {e}") from None
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
    min_workers: int = Field(0, ge=0)
    queues: list[str] = Field(default_factory=list)
    heartbeat_timeout: Duration = 10.0
    hung_timeout: Duration = 600.0
    restart: RestartConfig | None = None

    @field_validator("workers")
    @classmethod
    def _full_hostnames(cls, v: list[str]) -> list[str]:
        for h in v:
            if "@" not in h or any(c in h for c in "*?["):
                raise ValueError(f"{h!r} is not a full Celery hostname such as celery@web-1 (globs go in hostnames)")
        return v

    @model_validator(mode="after")
    def _something_to_match(self) -> GroupConfig:
        if not self.hostnames and not self.workers:
            raise ValueError("a group needs hostnames (globs) or workers (explicit hostnames)")
        if self.heartbeat_timeout < 3.0:
            raise ValueError("heartbeat_timeout must be at least 3s (workers heartbeat every 2s)")
        if self.hung_timeout < self.heartbeat_timeout:
            raise ValueError("hung_timeout must not be shorter than heartbeat_timeout")
        return self

    def matches(self, hostname: str) -> bool:
        return hostname in self.workers or any(fnmatch.fnmatchcase(hostname, g) for g in self.hostnames)


class QueueConfig(_Model):
    name: str = Field(min_length=1)
    warning: int | None = Field(None, ge=0)
    critical: int | None = Field(None, ge=0)
    for_: Duration = Field(0.0, alias="for")
    min_consumers: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _order(self) -> QueueConfig:
        if self.warning is not None and self.critical is not None and self.warning > self.critical:
            raise ValueError("warning must not be above critical")
        return self


class HttpConfig(_Model):
    listen: str | None = None

    @field_validator("listen")
    @classmethod
    def _hostport(cls, v: str | None) -> str | None:
        # an empty host (":9811") listens on every interface
        if v is not None and not re.fullmatch(r"(\[[0-9a-fA-F:]+\]|[^:\s]*):\d{1,5}", v):
            raise ValueError("listen must be HOST:PORT, e.g. 127.0.0.1:9811, [::1]:9811 or :9811")
        if v is not None and int(v.rsplit(":", 1)[1]) > 65535:
            raise ValueError("the port of listen must be at most 65535")
        return v


class HaConfig(_Model):
    lease: Literal["auto", "kubernetes", "off"] = "auto"
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
        """The group that names the hostname in its workers, else the first whose globs match it."""
        for g in self.groups:
            if hostname in g.workers:
                return g
        for g in self.groups:
            if g.matches(hostname):
                return g
        return None

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
        """Every secret value in the config (for redaction)."""
        out = [self.broker.url.get_secret_value()]
        if self.broker.management_url:
            out.append(self.broker.management_url.get_secret_value())
        out += [c.url.get_secret_value() for c in self.notify.channels]
        cf = self.platforms.cloudfoundry
        if cf:
            out += [s.get_secret_value() for s in (cf.password, cf.client_secret) if s]
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
    try:
        cfg = Config.model_validate(data)
    except ValidationError as e:
        errors += [(_loc(err["loc"]), _reason(err)) for err in e.errors(include_input=False, include_url=False)]
        cfg = None
    errors += _channel_url_errors(data)
    if cfg is not None:
        errors += _cross_checks(cfg)
    if errors:
        _register_raw_secrets(data)
        # a value that failed validation may still be a secret: scrub the messages too
        raise ConfigError([(p, redact.scrub(m)) for p, m in errors], source)
    redact.register_url(cfg.broker.url.get_secret_value())
    if cfg.broker.management_url:
        redact.register_url(cfg.broker.management_url.get_secret_value())
    for c in cfg.notify.channels:
        redact.register_url(c.url.get_secret_value(), tokens=True)
    for s in cfg.secrets():
        if "://" not in s:
            redact.register_secret(s)
    return cfg


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
    queue_names = {q.name for q in cfg.queues}
    for gi, g in enumerate(cfg.groups):
        for qi, q in enumerate(g.queues):
            if queue_names and q not in queue_names:
                errors.append((f"groups.{gi}.queues.{qi}", f"queue {q!r} is not declared under queues"))
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
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([("", f"config file {str(p)!r} does not exist")], str(p)) from None
    except IsADirectoryError:
        raise ConfigError([("", f"config file {str(p)!r} is a directory")], str(p)) from None
    except PermissionError:
        raise ConfigError([("", f"config file {str(p)!r} is not readable (permission denied)")], str(p)) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError([("", f"cannot read config file {str(p)!r}: {e}")], str(p)) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        where = ""
        mark = getattr(e, "problem_mark", None)
        if mark is not None:
            where = f"line {mark.line + 1}, column {mark.column + 1}: "
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise ConfigError([("", f"{where}{problem}")], str(p)) from None
    return parse_config(data, env, source=str(p))


def _register_raw_secrets(data):
    def get(d, *ks):
        for k in ks:
            d = d.get(k) if isinstance(d, dict) else None
        return d if isinstance(d, str) else None
    for u in (get(data, "broker", "url"), get(data, "broker", "management_url")):
        redact.register_url(u)
    notify = data.get("notify") if isinstance(data.get("notify"), dict) else {}
    for c in notify.get("channels") or []:
        if isinstance(c, dict) and isinstance(c.get("url"), str):
            redact.register_url(c["url"], tokens=True)
    for k in ("password", "client_secret"):
        redact.register_secret(get(data, "platforms", "cloudfoundry", k))
