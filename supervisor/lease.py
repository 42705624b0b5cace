"""The leader lease (``ha:``): of several replicas pointed at one fleet, only the holder acts.

Every replica observes and decides; only the leader restarts and alerts (``Supervisor.acting``).

- ``is_leader()`` is a local check with no I/O: we hold the lease and our last successful
  acquire/renew, counted from the moment its request was *sent*, is younger than the ttl minus a
  safety margin. A leader that cannot renew (the store is unreachable, someone else's value is
  there) stops acting when that runs out, before the store lets anybody else take over.
- ``confirm()`` is one round trip, made just before each restart: is our fencing token still the
  current one? False on any error.
- A daemon thread acquires or renews every ttl/3 (sooner after an error); it never raises.
- ``may_alert()``: the leader; and, while a Redis store (with ``ha.lease: auto``, the broker itself)
  cannot be reached, the *outage pager*: with the store down the lease can be neither renewed nor
  taken, and without this nobody would say that the broker is down. Restarts still need
  ``is_leader()`` and ``confirm()``.

Who pages while the store is unreachable (``outage_pager``), so that one replica pages, however
many there are: the replica that held the lease at its last contact with the store, or that never
reached the store at all (it knows of no other replica); never one that last saw another replica
hold it (that one pages). The daemon keeps this in its state file (``remember``/``on_change``), so a
replica started during an outage goes by what it last saw: two replicas restarted while the broker
is down page once between them. When the store is back, a replica that did not page waits one ttl
before taking a free lease, so the one that paged the outage takes it back and sends the RESOLVED.
What stays open (README, "High availability"): two replicas that have never reached the store both
page; a replica that led, was down while another took over, and comes back during an outage pages
beside the new leader; a standby whose leader died with the broker (on the same host) pages
nothing -- watch the supervisor itself (``/healthz``, ``supervisor nagios``) from elsewhere.

Stores: ``RedisLease`` (ha.lease auto on a Redis broker -- redis://, rediss://, redis+socket://,
sentinel:// -- a key in the broker's own Redis database) and ``KubernetesLease`` (ha.lease
kubernetes: a coordination.k8s.io/v1 Lease, as client-go's leader election uses). RabbitMQ has no
lease store: ``make_lease`` says so and returns None (ha.lease kubernetes, or a single replica).
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable

from supervisor import redact

log = logging.getLogger("supervisor.lease")

RETRY_AFTER_ERROR = 1.0  # seconds before the next attempt after a store error (capped by ttl/3)


class LeaseError(Exception):
    """The lease cannot be set up (bad config, missing library). The message is fit to print."""


def default_holder() -> str:
    """hostname:pid:random -- unique per process, even for two replicas with the same hostname and
    pid in two containers."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def lease_name(cfg) -> str:
    """``ha.name``, else derived from the group names (nothing secret): replicas of one deployment
    share a lease, supervisors of different fleets on one broker do not stand by for each other."""
    if cfg.ha.name:
        return cfg.ha.name
    groups = ",".join(sorted(g.name for g in cfg.groups))
    return "groups-" + hashlib.sha1(groups.encode()).hexdigest()[:10]


def safety_margin(ttl: float) -> float:
    """Time cut off our own view of the lease: clock rate drift, the round trip of the renew, and
    the time between a check and the restart it guards."""
    return max(0.1, min(2.0, ttl * 0.1))


class Lease:
    """The part common to every store: local validity, the renew thread, logging of changes."""

    kind = "?"

    def __init__(self, ttl: float, holder: str | None = None, clock: Callable[[], float] = time.monotonic):
        self.ttl = float(ttl)
        self.period = self.ttl / 3
        self.margin = safety_margin(self.ttl)
        self.holder = holder or default_holder()
        self.clock = clock
        self.token: int | None = None  # our fencing token while we hold the lease
        self.valid_until = 0.0  # clock(): act no later than this
        self.seen_holder: str | None = None  # who holds it, as the store said last time
        self.store_error: str | None = None  # the store could not be reached at the last attempt
        # while the store is unreachable, this replica pages (it led at its last contact with the store,
        # or never reached it: it knows of no other replica); False after it saw another one lead
        self.outage_pager = True
        self._defer_until: float | None = None  # after an outage we did not page: leave a free lease until
        self._recovery_defer = False  # set while unreachable as a replica that did not page
        # persisted by the daemon (state file): what a replica started during an outage goes by
        self.on_change: Callable[[dict], None] | None = None
        self._remembered: dict | None = None
        self._role = "starting"  # for logging changes once: leader | standby | unknown
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- store I/O (subclasses)
    def _acquire_or_renew(self) -> tuple[bool, int | None, str | None]:
        """One round: renew if we hold it, else take it if free. Returns (held, token, holder seen).
        Raises on a store error."""
        raise NotImplementedError

    def _current(self) -> tuple[str | None, int | None]:
        """(holder, token) as the store has them now. Raises on a store error."""
        raise NotImplementedError

    def _release(self) -> None:
        raise NotImplementedError

    def where(self) -> str:
        """Where the lease lives (for logs; no secret)."""
        raise NotImplementedError

    # ---------------------------------------------------------------- local view (no I/O)
    def is_leader(self) -> bool:
        return self.token is not None and self.clock() < self.valid_until

    def may_alert(self) -> bool:
        """The leader alerts. When the store is the broker itself (a Redis lease), the outage pager
        alerts while the store is unreachable: somebody must say the broker is down, and every other
        finding is frozen meanwhile. A Kubernetes Lease has no such excuse: a replica cut off from the
        API server while the broker works would page beside the new leader."""
        return self.is_leader() or (self.kind == "redis" and self.outage_pager and self.store_error is not None)

    # ---------------------------------------------------------------- memory (the daemon's state file)
    def memory(self) -> dict:
        """What a later run of this replica goes by if it starts while the store is unreachable."""
        return {"outage_pager": self.outage_pager, "leader": self.seen_holder, "at": round(time.time(), 3)}

    def remember(self, memory: dict | None) -> None:
        """Before start(): what this replica last saw of the lease in an earlier run."""
        if not isinstance(memory, dict) or not isinstance(memory.get("outage_pager"), bool):
            return
        self.outage_pager = memory["outage_pager"]
        leader = memory.get("leader")
        self._remembered = {"outage_pager": self.outage_pager,
                            "leader": leader if isinstance(leader, str) else None, "at": memory.get("at")}
        if self.seen_holder is None and isinstance(leader, str):
            self.seen_holder = leader

    def _saw(self, pager: bool) -> dict | None:
        """After a successful round: the memory to persist when it changed (else None)."""
        self.outage_pager = pager
        mem = {"outage_pager": pager, "leader": self.seen_holder}
        last = self._remembered
        if last is not None and {"outage_pager": last.get("outage_pager"), "leader": last.get("leader")} == mem:
            return None
        self._remembered = mem
        return self.memory()

    def _changed(self, memory: dict | None) -> None:
        cb = self.on_change
        if memory is None or cb is None:
            return
        try:
            cb(memory)
        except Exception as e:  # persisting must never stop the lease
            log.warning("lease: could not record the lease's state: %s", _err(e))

    @property
    def role(self) -> str:
        if self.is_leader():
            return "leader"
        return "unknown" if self.store_error is not None else "standby"

    def status(self) -> dict:
        """For status documents and /status (no secret)."""
        return {"kind": self.kind, "lease": self.where(), "holder": self.holder, "role": self.role,
                "token": self.token, "leader": self.seen_holder, "error": self.store_error,
                "outage_pager": self.outage_pager}

    # ---------------------------------------------------------------- one round trip
    def confirm(self) -> bool:
        """Is our fencing token still the current one? Just before a restart. False on any error."""
        if not self.is_leader():
            return False
        try:
            holder, token = self._current()
        except Exception as e:
            log.warning("lease: cannot confirm leadership before acting (%s): not acting", _err(e))
            return False
        if holder == self.holder and token == self.token:
            return True
        changed = None
        with self._lock:
            self._lost(f"the lease is now held by {holder or 'nobody'} (token {token})")
            if holder is not None and holder != self.holder:
                self.seen_holder = holder
                changed = self._saw(False)
        self._changed(changed)
        return False

    def step(self) -> bool:
        """One acquire/renew round; never raises. Returns is_leader() afterwards."""
        with self._lock:
            changed = self._step()
            leading = self.is_leader()
        self._changed(changed)
        return leading

    def _step(self) -> dict | None:
        t0 = self.clock()
        try:
            if self._deferring(t0):
                held, token, seen = False, None, None
            else:
                held, token, seen = self._acquire_or_renew()
        except Exception as e:
            self._unreachable(e)
            return None
        recovered = self.store_error is not None
        was = self._role
        self.store_error = None
        self.seen_holder = seen
        if held:
            self._defer_until = None
            if self.token is not None and token != self.token and was == "leader":
                log.warning("lease: leadership of %s lost and taken again (token %s -> %s)", self.where(),
                            self.token, token)
            self.token = token
            self.valid_until = t0 + self.ttl - self.margin
            self._role = "leader"
            if was != "leader":
                log.info("lease: leader now (%s, token %s, holder %s)", self.where(), token, self.holder)
            elif recovered:
                log.info("lease: %s reachable again; still the leader (token %s)", self.where(), token)
            return self._saw(True)
        if self.token is not None:
            self._lost(f"held by {seen or 'nobody'}")
        if was != "standby" or recovered:
            if seen is None and self._defer_until is not None:
                log.info("lease: %s reachable again and free; left for %.1fs to the replica that paged the "
                         "outage", self.where(), self._defer_until - t0)
            else:
                log.info("lease: standby, %s is held by %s", self.where(), seen or "nobody")
        self._role = "standby"
        return self._saw(False) if seen is not None and seen != self.holder else None

    def _deferring(self, now: float) -> bool:
        """After an outage this replica did not page, a free lease is left alone for one ttl from the
        moment the store answers again: the replica that paged takes it back (and sends the RESOLVED
        of its page). True: leave it this round (the store answered: it is free). Raises on a store
        error."""
        if self.token is not None or (not self._recovery_defer and self._defer_until is None):
            return False
        holder, _ = self._current()  # the store answers: the outage is over
        if self._recovery_defer:
            self._recovery_defer = False
            self._defer_until = now + self.ttl
        if holder is not None or now >= self._defer_until:
            self._defer_until = None  # taken (an ordinary standby now), or nobody came: take it
            return False
        return True

    def _lost(self, why: str) -> None:
        if self.token is not None:
            log.warning("lease: leadership of %s lost (token %s): %s", self.where(), self.token, why)
        self.token = None
        self.valid_until = 0.0
        self._role = "standby"

    def _unreachable(self, e: BaseException) -> None:
        msg = _err(e)
        if self.store_error is None:
            if self.is_leader():
                self.outage_pager = True
            self._recovery_defer = not self.outage_pager
            if self.outage_pager:
                why = ("it leads" if self.is_leader() else
                       "it knows of no other replica" if self._remembered is None else
                       "it held the lease when it last reached the store")
                tail = f"; this replica pages a broker outage ({why}); restarts stop"
                if self.is_leader():
                    tail += " when the lease runs out"
            else:
                tail = (f"; {self.seen_holder}, the leader when last seen, pages a broker outage; "
                        "this replica stays quiet")
            log.warning("lease: cannot reach %s: %s%s", self.where(), msg, tail)
        self.store_error = msg
        if self.token is not None and not self.is_leader():
            log.warning("lease: leadership of %s ran out (token %s): the store is unreachable",
                        self.where(), self.token)
            self.token = None
            self._role = "unknown"

    # ---------------------------------------------------------------- thread
    def start(self) -> bool:
        """First attempt now (a lone replica acts on its first tick), then renew in the background.
        Returns is_leader() after the first attempt."""
        leading = self.step()
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name=f"lease-{self.kind}", daemon=True)
            self._thread.start()
        return leading

    def _run(self) -> None:
        from supervisor import osthread

        osthread.name("cs-lease")
        while True:
            wait = self.period if self.store_error is None else min(self.period, RETRY_AFTER_ERROR)
            if self._stop.wait(wait):
                return
            try:
                self.step()
            except Exception:  # step never raises; this guard keeps the thread alive whatever happens
                log.exception("lease: renew failed")

    def stop(self, release: bool = True, timeout: float = 5.0) -> None:
        """Stop renewing; with ``release`` hand the lease over at once (a clean stop). Never raises."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if not release:
            return
        with self._lock:
            if self.token is None:
                return
            try:
                self._release()
                log.info("lease: released %s (token %s)", self.where(), self.token)
            except Exception as e:
                log.warning("lease: could not release %s (%s): another replica takes over when it runs out",
                            self.where(), _err(e))
            self.token = None
            self.valid_until = 0.0
            self._role = "standby"


def _err(e: BaseException) -> str:
    from supervisor.redis_client import sentinel_summary

    text = str(e).strip() or type(e).__name__
    text = sentinel_summary(text) or text
    return redact.scrub(f"{type(e).__name__}: {text}" if type(e).__name__ not in text else text)


# ==================================================================== Redis
_ACQUIRE = """
local cur = redis.call('GET', KEYS[1])
if cur then return {0, cur} end
local token = redis.call('INCR', KEYS[2])
local value = token .. ' ' .. ARGV[1]
redis.call('SET', KEYS[1], value, 'PX', ARGV[2])
return {1, value}
"""
# extend only if the value is still ours; else say whose it is
_RENEW = """
local cur = redis.call('GET', KEYS[1])
if cur == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {1, cur}
end
return {0, cur or ''}
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _parse_value(value) -> tuple[str | None, int | None]:
    """'<token> <holder>' -> (holder, token)."""
    if not value:
        return None, None
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    token, _, holder = value.partition(" ")
    try:
        return holder or None, int(token)
    except ValueError:
        return value, None


class RedisLease(Lease):
    """A key in the broker's Redis: ``<prefix>celery-supervisor:<name>:leader`` = ``<token> <holder>``
    with a PX expiry; ``...:token`` is the fencing counter (INCR on each acquisition). Acquire, renew
    and release are Lua scripts: check-and-set in one atomic step."""

    kind = "redis"

    def __init__(self, url: str, name: str, ttl: float, *, timeout: float = 3.0, key_prefix: str = "",
                 holder: str | None = None, clock: Callable[[], float] = time.monotonic,
                 transport_options: dict | None = None):
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        from supervisor.redis_client import redis_client

        super().__init__(ttl, holder, clock)
        self.name = name
        self.key = f"{key_prefix}celery-supervisor:{name}:leader"
        self.token_key = f"{self.key}:token"
        self._display = ";".join(redact.redact_url(u) for u in url.split(";"))
        timeout = max(0.2, min(float(timeout), self.ttl / 3))
        try:
            # the broker's own Redis, however the fleet reaches it: TCP, TLS, a unix socket, or the
            # master its sentinels name (resolved again on every reconnect: a failover moves the lease)
            self.redis = redis_client(
                url, transport_options, timeout=timeout, health_check_interval=0,
                retry=Retry(NoBackoff(), 1),  # one retry: a pooled connection the server closed
            )
        except Exception as e:
            raise LeaseError(f"cannot use {self._display} as the lease store: {_err(e)}") from None
        self._acquire = self.redis.register_script(_ACQUIRE)
        self._renew = self.redis.register_script(_RENEW)
        self._release_script = self.redis.register_script(_RELEASE)
        self._value: str | None = None  # "<token> <holder>" while we hold it

    def where(self) -> str:
        return f"redis key {self.key} on {self._display}"

    def _follow_master(self) -> None:
        """With Sentinel: ask the sentinels where the master is on every round. A pooled connection
        to a master that a failover demoted (still up, still writable for a while) would otherwise
        keep renewing the lease there, while the other replicas, connected to the new master, see
        it free. A changed address closes the idle connections: the next command goes to the new
        master. Raises (a store error) when no sentinel names a master."""
        pool = self.redis.connection_pool
        if hasattr(pool, "get_master_address"):
            pool.get_master_address()

    def _acquire_or_renew(self):
        self._follow_master()
        px = int(self.ttl * 1000)
        if self._value is not None:
            ok, cur = self._renew(keys=[self.key], args=[self._value, px])
            cur = cur.decode() if isinstance(cur, bytes) else cur
            if ok:
                holder, token = _parse_value(cur)
                return True, token, holder
            self._value = None
            if cur:  # someone else's now: not ours to take back
                return False, None, _parse_value(cur)[0]
            # gone (expired, deleted, a Redis that restarted empty): take it again now if still free,
            # with a new token (a leadership gap would lose the alerts decided in it)
        ok, cur = self._acquire(keys=[self.key, self.token_key], args=[self.holder, px])
        cur = cur.decode() if isinstance(cur, bytes) else cur
        holder, token = _parse_value(cur)
        if ok:
            self._value = cur
            return True, token, holder
        if holder == self.holder and cur:
            # ours: an earlier attempt whose reply was lost, or this replica before a crash (the holder
            # id persists in its state file): renew it now rather than wait for it to expire
            self._value = cur
            ok, cur2 = self._renew(keys=[self.key], args=[self._value, px])
            cur2 = cur2.decode() if isinstance(cur2, bytes) else cur2
            if ok:
                return True, token, holder
            self._value = None
            holder = _parse_value(cur2)[0]
        return False, None, holder

    def _current(self):
        self._follow_master()
        return _parse_value(self.redis.get(self.key))

    def _release(self) -> None:
        if self._value is not None:
            self._release_script(keys=[self.key], args=[self._value])
        self._value = None

    def stop(self, release: bool = True, timeout: float = 5.0) -> None:
        super().stop(release, timeout)
        try:
            self.redis.close()
        except Exception:
            pass

    def _lost(self, why: str) -> None:
        self._value = None
        super()._lost(why)


# ==================================================================== Kubernetes
def _micro_time(t: float | None = None) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(time.time() if t is None else t, dt.timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%S.%fZ")


def kube_api_client(platform):
    """An ApiClient from platforms.kubernetes (in-cluster, or a kubeconfig and context), without
    touching the library's global default configuration."""
    from kubernetes import client, config

    in_cluster = platform.in_cluster if platform is not None and platform.in_cluster is not None else bool(
        os.environ.get("KUBERNETES_SERVICE_HOST"))
    try:
        if in_cluster:
            c = client.Configuration()
            config.load_incluster_config(client_configuration=c)
            return client.ApiClient(c)
        return config.new_client_from_config(
            config_file=platform.kubeconfig if platform is not None else None,
            context=platform.context if platform is not None else None)
    except Exception as e:
        raise LeaseError(f"cannot configure the kubernetes client for the lease: {_err(e)}") from None


class KubernetesLease(Lease):
    """A coordination.k8s.io/v1 Lease, as client-go's leader election keeps it: holderIdentity,
    leaseDurationSeconds, acquireTime, renewTime, and leaseTransitions as the fencing token.

    Every write carries the resourceVersion we read (optimistic concurrency): a 409 Conflict means
    another replica wrote first, and we lost the race. Expiry is judged on our own clock, as
    client-go does: the lease is free when its record has not changed for leaseDurationSeconds since
    *we* first saw it so (never by comparing renewTime with our clock: replicas' clocks differ)."""

    kind = "kubernetes"

    def __init__(self, api_client, name: str, namespace: str, ttl: float, *, timeout: float = 10.0,
                 holder: str | None = None, clock: Callable[[], float] = time.monotonic):
        from kubernetes import client

        super().__init__(ttl, holder, clock)
        self.api = client.CoordinationV1Api(api_client)
        self.name = name if name.startswith("celery-supervisor") else f"celery-supervisor-{name}"
        self.namespace = namespace
        self.timeout = max(0.5, min(float(timeout), self.ttl / 3))
        self.duration = max(1, int(-(-self.ttl // 1)))  # whole seconds, never shorter than the ttl
        self._observed: tuple | None = None  # (holder, renewTime, transitions) last seen
        self._observed_at = 0.0

    def where(self) -> str:
        return f"kubernetes lease {self.namespace}/{self.name}"

    def _read(self):
        from kubernetes.client.exceptions import ApiException

        try:
            return self.api.read_namespaced_lease(self.name, self.namespace, _request_timeout=self.timeout)
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def _spec_body(self, transitions: int, acquire: bool) -> dict:
        now = _micro_time()
        spec = {"holderIdentity": self.holder, "leaseDurationSeconds": self.duration, "renewTime": now,
                "leaseTransitions": transitions}
        if acquire:
            spec["acquireTime"] = now
        return spec

    def _acquire_or_renew(self):
        from kubernetes.client.exceptions import ApiException

        t0 = self.clock()
        lease = self._read()
        if lease is None:
            body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": self.name, "namespace": self.namespace},
                    "spec": self._spec_body(0, acquire=True)}
            try:
                self.api.create_namespaced_lease(self.namespace, body, _request_timeout=self.timeout)
            except ApiException as e:
                if e.status == 409:  # another replica created it first
                    return False, None, None
                raise
            self._observed, self._observed_at = (self.holder, None, 0), t0
            return True, 0, self.holder
        spec = lease.spec
        holder = (spec.holder_identity or None) if spec is not None else None
        transitions = (spec.lease_transitions or 0) if spec is not None else 0
        duration = (spec.lease_duration_seconds or self.duration) if spec is not None else self.duration
        record = (holder, spec.renew_time if spec is not None else None, transitions)
        if record != self._observed:
            self._observed, self._observed_at = record, t0
        if holder is not None and holder != self.holder and t0 < self._observed_at + duration:
            return False, None, holder  # held, and renewed within its duration as far as we saw
        ours = holder == self.holder
        if not ours:
            transitions += 1
        patch = {"metadata": {"resourceVersion": lease.metadata.resource_version},
                 "spec": self._spec_body(transitions, acquire=not ours)}
        if not patch["metadata"]["resourceVersion"]:
            del patch["metadata"]
        try:
            self.api.patch_namespaced_lease(self.name, self.namespace, patch, _request_timeout=self.timeout,
                                            _content_type="application/merge-patch+json")
        except ApiException as e:
            if e.status == 409:  # someone wrote since our read: lost the race
                return False, None, holder
            raise
        return True, transitions, self.holder

    def _current(self):
        lease = self._read()
        if lease is None or lease.spec is None:
            return None, None
        return lease.spec.holder_identity or None, lease.spec.lease_transitions or 0

    def _release(self) -> None:
        lease = self._read()
        if lease is None or lease.spec is None or lease.spec.holder_identity != self.holder:
            return
        patch = {"metadata": {"resourceVersion": lease.metadata.resource_version},
                 "spec": {"holderIdentity": "", "leaseDurationSeconds": 1, "renewTime": _micro_time()}}
        if not patch["metadata"]["resourceVersion"]:
            del patch["metadata"]
        self.api.patch_namespaced_lease(self.name, self.namespace, patch, _request_timeout=self.timeout,
                                        _content_type="application/merge-patch+json")


# ==================================================================== factory
def make_lease(cfg, holder: str | None = None) -> Lease | None:
    """The lease ``ha`` asks for, or None (act alone). LeaseError when it cannot be set up."""
    ha = cfg.ha
    if ha.lease == "off":
        return None
    name = lease_name(cfg)
    if ha.lease == "kubernetes":
        k8s = cfg.platforms.kubernetes
        namespace = ha.namespace or (k8s.namespace if k8s is not None else "default")
        timeout = k8s.timeout if k8s is not None else 10.0
        try:
            import kubernetes  # noqa: F401
        except ImportError:
            raise LeaseError("ha.lease kubernetes needs the 'kubernetes' package: "
                             "pip install 'celery-supervisor[kubernetes]'") from None
        return KubernetesLease(kube_api_client(k8s), name, namespace, ha.lease_ttl, timeout=timeout,
                               holder=holder)
    # auto
    broker = cfg.broker
    if broker.is_redis:
        prefix = str((broker.transport_options or {}).get("global_keyprefix") or "")
        return RedisLease(broker.url.get_secret_value(), name, ha.lease_ttl, timeout=broker.connect_timeout,
                          key_prefix=prefix, holder=holder, transport_options=broker.transport_options)
    if broker.scheme in ("amqp", "amqps", "pyamqp"):
        log.warning("ha.lease auto: a RabbitMQ broker offers no lease store, so this replica acts alone; "
                    "run a single replica, or set ha.lease: kubernetes (a Lease object), "
                    "or ha.lease: off to silence this")
    else:
        log.info("ha.lease auto: no lease store on a %s:// broker; acting alone", broker.scheme)
    return None


def lease_for_one_pass(cfg) -> Lease | None:
    """`once` without --dry-run: hold the lease for the pass, or plan only if another replica holds
    it. The caller stops (and releases) it after the pass."""
    lease = make_lease(cfg)
    if lease is not None:
        # a pass remembers nothing of earlier ones: when the store (with ha.lease auto: the broker)
        # is unreachable it is the outage pager, restarts are refused by confirm(), and the pass still
        # says that the broker is down (a cron `once` may be all there is)
        lease.start()
    return lease
