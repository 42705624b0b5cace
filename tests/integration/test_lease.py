"""The leader lease against real stores: RedisLease on a private redis-server, KubernetesLease with
the real `kubernetes` client against kmock over HTTP.

kmock 0.8's emulator keeps no resourceVersion and checks none (an update just merges the patch), so
the API server's optimistic concurrency is added here (``LeaseEmulator``): every write gets a new
resourceVersion, and a write that names an older one answers 409 Conflict, as the API server does.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time

import pytest
import redis

from supervisor.lease import KubernetesLease, RedisLease, kube_api_client, make_lease
from tests.support.fleet import wait_until

TTL = 1.5


def held(leases) -> list:
    return [x for x in leases if x.is_leader()]


class Watch:
    """Samples is_leader() of every lease every few ms in a thread: two leaders at once is the bug."""

    def __init__(self, leases):
        self.leases = leases
        self.overlaps: list[tuple] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop.wait(0.005):
            now = [x.holder for x in self.leases if x.is_leader()]
            if len(now) > 1:
                self.overlaps.append(tuple(now))

    def stop(self) -> list:
        self._stop.set()
        self._t.join(5)
        return self.overlaps


@pytest.fixture
def leases():
    made: list = []
    yield made
    for x in made:
        x.stop(release=True)


@pytest.fixture
def redis_lease(redis_url, uid, leases):
    def make(ttl: float = TTL, url: str | None = None, name: str | None = None) -> RedisLease:
        x = RedisLease(url or redis_url, name or uid, ttl, timeout=1.0)
        leases.append(x)
        return x
    return make


# ====================================================================== Redis
def test_only_one_leads_and_renewing_keeps_it(redis_lease, redis_url):
    a, b = redis_lease(), redis_lease()
    assert a.start() is True
    assert b.start() is False
    assert held([a, b]) == [a] and a.token is not None
    assert a.confirm() and not b.confirm()
    assert b.seen_holder == a.holder
    r = redis.Redis.from_url(redis_url)
    assert r.get(a.key).decode() == f"{a.token} {a.holder}"
    token = a.token
    time.sleep(3 * TTL)  # several ttls: only the renewals keep the key
    assert held([a, b]) == [a] and a.token == token and a.confirm()
    assert 0 < r.pttl(a.key) <= TTL * 1000


def test_dead_holder_is_taken_over_after_its_ttl_with_a_higher_token(redis_lease, redis_url):
    a, b = redis_lease(), redis_lease()
    a.start()
    b.start()
    watch = Watch([a, b])
    first = a.token
    a.stop(release=False)  # a dead process: no more renewals, no release
    t0 = time.monotonic()
    wait_until(b.is_leader, 10 * TTL, 0.01, what="the standby to take over")
    took = time.monotonic() - t0
    assert watch.stop() == [], "two leaders at once"
    assert b.token > first
    assert not a.is_leader() and not a.confirm()
    # the key expired on the server before b could take it: never earlier than the ttl minus a renew period
    assert took > TTL - TTL / 3 - 0.05, took
    print(f"takeover after a dead holder: {took:.2f}s (ttl {TTL}s, renew every {TTL / 3:.2f}s)")


def test_a_clean_release_hands_over_at_once(redis_lease, redis_url):
    a, b = redis_lease(ttl=30), redis_lease(ttl=30)  # a long ttl: only the release can explain a takeover
    a.start()
    b.start()
    first = a.token
    a.stop(release=True)
    assert not redis.Redis.from_url(redis_url).exists(a.key)
    assert b.step() is True
    assert b.token == first + 1 and not a.is_leader()


def test_a_restarted_leader_with_the_same_holder_id_takes_its_lease_back_at_once(redis_lease, redis_url, uid):
    """The daemon keeps its holder id in its state file: after a crash it resumes, no ttl to wait."""
    a = redis_lease(ttl=30)
    a.start()
    a.stop(release=False)  # crashed
    again = RedisLease(redis_url, uid, 30, timeout=1.0, holder=a.holder)
    try:
        assert again.start() is True and again.token == a.token and again.confirm()
        other = redis_lease(ttl=30)
        assert other.start() is False
    finally:
        again.stop(release=True)


def test_a_release_never_deletes_someone_elses_lease(redis_lease, redis_url):
    a = redis_lease(ttl=30)
    a.start()
    r = redis.Redis.from_url(redis_url)
    r.set(a.key, "99 intruder:1:x", px=30000)
    a.stop(release=True)  # compare-and-delete: not ours any more
    assert r.get(a.key) == b"99 intruder:1:x"


def test_overwritten_key_confirm_fails_at_once_and_the_next_renew_lets_go(redis_lease, redis_url):
    a = redis_lease(ttl=30)
    a.start()
    a.stop(release=False)  # no background renewals: the test drives them
    r = redis.Redis.from_url(redis_url)
    r.set(a.key, "99 intruder:1:x", px=30000)
    assert a.is_leader(), "a local check: it cannot know before it asks"
    assert a.confirm() is False  # one round trip, before a restart
    assert not a.is_leader()
    b = redis_lease(ttl=30)
    b.start()
    b.stop(release=False)
    r.set(b.key, "98 intruder:1:x", px=30000)
    assert b.step() is False, "the renew finds someone else's value: not the leader any more"
    assert not b.is_leader() and b.seen_holder == "intruder:1:x"
    assert r.get(b.key) == b"98 intruder:1:x", "and it left that value alone"


def test_deleted_key_is_taken_again_at_the_next_renew_with_a_new_token(redis_lease, redis_url, caplog):
    a = redis_lease(ttl=30)
    a.start()
    a.stop(release=False)
    first = a.token
    redis.Redis.from_url(redis_url).delete(a.key)  # or a Redis that restarted empty
    with caplog.at_level(logging.WARNING, "supervisor.lease"):
        assert a.step() is True, "free again: taken at once (a gap would lose alerts)"
    assert a.token > first and a.confirm()
    assert any("lost and taken again" in r.message for r in caplog.records)


def test_redis_unreachable_means_no_leader_and_no_crash(own_redis, uid, leases, caplog):
    url = f"{own_redis.url}/0"
    a = RedisLease(url, uid, TTL, timeout=0.5)
    b = RedisLease(url, uid, TTL, timeout=0.5)
    leases += [a, b]
    a.start()
    b.start()
    assert a.is_leader() and not b.is_leader()
    own_redis.stop()
    with caplog.at_level(logging.WARNING, "supervisor.lease"):
        wait_until(lambda: not a.is_leader(), 5 * TTL, 0.01, what="the leader to stop leading")
    assert a.confirm() is False and b.confirm() is False
    assert a.store_error and a.role == "unknown" and a._thread is not None and a._thread.is_alive()
    # the broker (= the store) is down: the last leader still alerts (that the broker is down), nobody restarts
    assert a.may_alert() and not b.may_alert()
    assert any("cannot reach" in r.message for r in caplog.records)
    assert sum("cannot reach" in r.message for r in caplog.records if r.name == "supervisor.lease") == 2, \
        "once per lease, not once per attempt"
    c = RedisLease(url, uid, TTL, timeout=0.5)  # started while the store is down
    leases.append(c)
    assert c.start() is False and c.store_error
    own_redis.start()  # an empty Redis again (no persistence): somebody takes it, only one
    wait_until(lambda: len(held([a, b, c])) == 1, 10 * TTL, 0.02, what="a leader after the outage")
    time.sleep(TTL)
    assert len(held([a, b, c])) == 1 and not any(x.store_error for x in (a, b, c))


def test_many_contenders_one_leader_at_a_time(redis_lease):
    """Holders die one after another (no release): the lease passes on, never to two at once."""
    ls = [redis_lease(ttl=1.0) for _ in range(4)]
    for x in ls:
        x.start()
    watch = Watch(ls)
    tokens = []
    for _ in range(3):
        leader = wait_until(lambda: next(iter(held(ls)), None), 15, 0.01, what="a leader")
        tokens.append(leader.token)
        leader.stop(release=False)
        ls.remove(leader)
    assert watch.stop() == []
    assert tokens == sorted(tokens) and len(set(tokens)) == 3


def test_lease_keys_follow_the_name_and_the_transport_prefix(redis_url, tmp_path):
    from supervisor.config import Config

    cfg = Config.model_validate({"broker": {"url": redis_url, "transport_options": {"global_keyprefix": "app1:"}},
                                 "ha": {"name": "web"}})
    x = make_lease(cfg)
    try:
        assert isinstance(x, RedisLease)
        assert x.key == "app1:celery-supervisor:web:leader"
    finally:
        x.stop(release=False)
    a = Config.model_validate({"broker": {"url": redis_url}, "groups": [{"name": "a", "hostnames": ["x@*"]}]})
    b = Config.model_validate({"broker": {"url": redis_url}, "groups": [{"name": "b", "hostnames": ["x@*"]}]})
    ka, kb = make_lease(a), make_lease(b)
    assert ka.key != kb.key, "different fleets on one broker do not stand by for each other"
    assert "secret" not in ka.key
    for x in (ka, kb):
        x.stop(release=False)


def test_factory_off_and_rabbitmq(caplog):
    from supervisor.config import Config

    off = Config.model_validate({"broker": {"url": "redis://127.0.0.1:1/0"}, "ha": {"lease": "off"}})
    assert make_lease(off) is None
    amqp = Config.model_validate({"broker": {"url": "amqp://guest:guest@127.0.0.1:5672//"}})
    with caplog.at_level(logging.WARNING, "supervisor.lease"):
        assert make_lease(amqp) is None
    assert any("RabbitMQ broker offers no lease store" in r.message and "ha.lease: kubernetes" in r.message
               for r in caplog.records)


# ====================================================================== Kubernetes (kmock)
LEASES = "coordination.k8s.io/v1/leases"


def _lease_emulator_cls():
    import kmock
    from kmock import KubernetesError

    class LeaseEmulator(kmock.KubernetesEmulator):
        """kmock's emulator plus the API server's optimistic concurrency on every write."""

        def __attrs_post_init__(self) -> None:
            super().__attrs_post_init__()
            self._rv = itertools.count(100)
            self._write_lock = None

        async def _handle(self, request):
            import asyncio

            if self._write_lock is None:
                self._write_lock = asyncio.Lock()
            action = str(getattr(request.action, "value", request.action) or "")
            if request.resource is None or action not in ("CREATE", "UPDATE"):
                return await super()._handle(request)
            async with self._write_lock:  # the check and the write are one step
                data = request.data if isinstance(request.data, dict) else {}
                meta = data.setdefault("metadata", {})
                if action == "UPDATE":
                    try:
                        obj = self.objects[request.resource, request.namespace, request.name]
                        have = None if obj.deleted else obj.raw.get("metadata", {}).get("resourceVersion")
                    except KeyError:
                        have = None
                    want = meta.get("resourceVersion")
                    if want is not None and have is not None and want != have:
                        raise KubernetesError(
                            status=409, reason="Conflict",
                            message=f'Operation cannot be fulfilled on leases.coordination.k8s.io "{request.name}": '
                                    "the object has been modified; please apply your changes to the latest "
                                    "version and try again")
                meta["resourceVersion"] = str(next(self._rv))
                return await super()._handle(request)

    return LeaseEmulator


@pytest.fixture
def kube(tmp_path):
    try:
        import kmock  # noqa: F401
        import kubernetes  # noqa: F401
    except ImportError:
        from tests.support.brokers import need

        need("kmock and kubernetes (pip install -e '.[test,kubernetes]')")
    import kmock

    from tests.support.kube import KubeApi

    cls = _lease_emulator_cls()

    class LeaseApi(KubeApi):
        async def _serve(self) -> None:
            import asyncio

            self._stop = asyncio.Event()
            async with cls() as handler, kmock.Server(handler) as server:
                self.kmock, self.server = handler, server
                handler.resources[LEASES] = kmock.ResourceInfo(namespaced=True)
                handler[lambda req: True] << self._dispatch
                self._ready.set()
                await self._stop.wait()

    with LeaseApi() as api:
        api.kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig", namespace="ops")
        yield api


@pytest.fixture
def kube_lease(kube, uid, leases):
    from supervisor.config import KubernetesPlatform

    def make(ttl: float = 2.0) -> KubernetesLease:
        client = kube_api_client(KubernetesPlatform(kubeconfig=str(kube.kubeconfig), in_cluster=False))
        x = KubernetesLease(client, uid, "ops", ttl, timeout=2.0)
        leases.append(x)
        return x
    return make


def lease_obj(kube, x: KubernetesLease) -> dict:
    return kube.get(LEASES, x.namespace, x.name)


def test_kubernetes_acquire_and_renew(kube, kube_lease):
    a, b = kube_lease(), kube_lease()
    assert a.start() is True and b.start() is False
    obj = lease_obj(kube, a)
    spec = obj["spec"]
    assert spec["holderIdentity"] == a.holder and spec["leaseDurationSeconds"] == 2
    assert spec["leaseTransitions"] == 0 and a.token == 0
    assert spec["acquireTime"] and spec["renewTime"]
    assert a.confirm() and not b.confirm() and b.seen_holder == a.holder
    first_renew, rv = spec["renewTime"], obj["metadata"]["resourceVersion"]
    time.sleep(2.5)  # beyond the duration: only the renewals keep a in charge
    obj = lease_obj(kube, a)
    assert obj["spec"]["holderIdentity"] == a.holder and obj["spec"]["leaseTransitions"] == 0
    assert obj["spec"]["renewTime"] != first_renew and obj["metadata"]["resourceVersion"] != rv
    assert held([a, b]) == [a]


def test_kubernetes_takeover_after_expiry_increments_transitions(kube, kube_lease):
    a, b = kube_lease(), kube_lease()
    a.start()
    b.start()
    watch = Watch([a, b])
    a.stop(release=False)  # dead: stops renewing
    t0 = time.monotonic()
    wait_until(b.is_leader, 20, 0.01, what="the standby to take over")
    took = time.monotonic() - t0
    assert watch.stop() == []
    spec = lease_obj(kube, b)["spec"]
    assert spec["holderIdentity"] == b.holder and spec["leaseTransitions"] == 1 and b.token == 1
    assert not a.confirm()
    # expiry is judged on b's clock from when it last saw the record change: at least the duration
    assert took > 2.0 - 2.0 / 3 - 0.05, took
    print(f"kubernetes takeover after a dead holder: {took:.2f}s (duration 2s)")


def test_kubernetes_release_hands_over_at_once(kube, kube_lease):
    a, b = kube_lease(ttl=30), kube_lease(ttl=30)
    a.start()
    b.start()
    a.stop(release=True)
    assert lease_obj(kube, a)["spec"]["holderIdentity"] == ""
    assert b.step() is True and b.token == 1


def test_kubernetes_conflict_loses_the_race(kube, kube_lease):
    """A write based on an older resourceVersion answers 409: the writer did not get the lease."""
    a, b = kube_lease(ttl=30), kube_lease(ttl=30)
    a.start()
    a.stop(release=True)  # free
    stale = lease_obj(kube, a)  # what a slow reader saw: free, at this resourceVersion
    assert b.start() is True  # b takes it (a new resourceVersion)

    undo = kube.intercept("GET", rf"/apis/coordination\.k8s\.io/v1/namespaces/ops/leases/{a.name}",
                          lambda req: stale)
    try:
        assert a.step() is False, "its write named an old resourceVersion: 409, not the leader"
    finally:
        undo()
    last = kube.requests("PATCH")[-1]
    assert last.data["metadata"]["resourceVersion"] == stale["metadata"]["resourceVersion"]
    assert last.data["spec"]["holderIdentity"] == a.holder
    spec = lease_obj(kube, b)["spec"]
    assert spec["holderIdentity"] == b.holder and spec["leaseTransitions"] == 1
    assert b.is_leader() and b.confirm() and not a.is_leader()


def test_the_emulator_answers_409_to_a_stale_write(kube, kube_lease):
    """The fixture's own check: the concurrency above is the API server's, not a test artefact."""
    from kubernetes.client.exceptions import ApiException

    a = kube_lease(ttl=30)
    a.start()
    rv = lease_obj(kube, a)["metadata"]["resourceVersion"]
    a.api.patch_namespaced_lease(a.name, "ops", {"metadata": {"resourceVersion": rv}, "spec": {"leaseTransitions": 5}},
                                 _content_type="application/merge-patch+json")
    with pytest.raises(ApiException) as e:
        a.api.patch_namespaced_lease(a.name, "ops", {"metadata": {"resourceVersion": rv},
                                                     "spec": {"leaseTransitions": 6}},
                                     _content_type="application/merge-patch+json")
    assert e.value.status == 409
    assert lease_obj(kube, a)["spec"]["leaseTransitions"] == 5
    assert a.confirm() is False, "the fencing token moved on"


def test_kubernetes_api_unreachable(kube, kube_lease):
    a = kube_lease()
    a.start()
    kube.close()  # the API server is gone
    wait_until(lambda: not a.is_leader(), 15, 0.02, what="the leader to stop leading")
    # unlike a Redis lease (whose store is the broker: somebody must report it down), a replica cut
    # off from the API server while the broker works must not page beside the new leader
    assert a.store_error and not a.confirm() and not a.may_alert()
