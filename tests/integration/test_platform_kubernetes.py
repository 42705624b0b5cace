"""The kubernetes adapter through the real `kubernetes` client, over real HTTP, against kmock's
Kubernetes API emulator (tests/support/kube.py). No mocks of the client or the adapter.

kmock has no controllers and no kubelet: where a scenario needs them the test plays them (a pod's
container terminated after its worker was SIGKILLed; the pod re-created after the supervisor deleted
it) and says so. The loop tests run supervisor.loop.Supervisor in this process against a private
Redis, with real Celery workers (hostname celery@<pod name>) really killed.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from platforms import PlatformError
from platforms.kubernetes import Adapter, parse_time
from supervisor.config import parse_config
from tests.support.brokers import free_port
from tests.support.cli import run_cli, write_config
from tests.support.kube import (
    DEPLOYMENTS,
    PODS,
    REPLICASETS,
    KubeApi,
    deployment,
    iso,
    pod,
    replicaset,
    terminated,
)
from tests.support.workers import Worker, celery_app, wait_ping

NS = "workers"


@pytest.fixture
def kube():
    with KubeApi() as api:
        yield api



def config(tmp_path, kube: KubeApi, broker: str = "redis://127.0.0.1:1/0", *, mode: str = "delete",
           workers=(), hostnames=("celery@*",), context: str | None = "kmock", kubeconfig=None,
           notify=None, **restart) -> dict:
    kc = kubeconfig or kube.write_kubeconfig(tmp_path / "kubeconfig", namespace="elsewhere")
    plat = {"kubeconfig": str(kc), "namespace": "unused-default", "timeout": "5s"}
    if context:
        plat["context"] = context
    r = {"platform": "kubernetes", "namespace": NS, "selector": {"app": "celery"}, "mode": mode,
         "stop_timeout": "7s", "backoff": "1s", "grace": "20s", "max_restarts": 3, **restart}
    data = {"broker": {"url": broker}, "loop": {"state_path": str(tmp_path / "state.db"), "interval": "1s"},
            "platforms": {"kubernetes": plat},
            "groups": [{"name": "g", "hostnames": list(hostnames), "workers": list(workers),
                        "heartbeat_timeout": "4s", "restart": r}]}
    if notify:
        data["notify"] = notify
    return data


def adapter(tmp_path, kube, **kw) -> tuple[Adapter, object]:
    cfg = parse_config(config(tmp_path, kube, **kw), env={})
    return Adapter(cfg), cfg.groups[0]


def by_id(targets) -> dict:
    return {t.id: t for t in targets}


# ---------------------------------------------------------------- inventory
def test_inventory_lists_by_selector_and_reads_each_pods_state(kube, tmp_path):
    crashed_at = kube_time = float(int(time.time()) - 30)
    loop_at = float(int(time.time()) - 90)
    app = {"app": "celery"}
    kube.put_pod(NS, pod("w-run", app))
    kube.put_pod(NS, pod("w-notready", app, ready=False))
    kube.put_pod(NS, pod("w-dead", app, ready=False, restart_count=2, state=terminated(137, "Error", crashed_at)))
    kube.put_pod(NS, pod("w-oom", app, ready=False, restart_count=4,
                         state={"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s"}},
                         last_state=terminated(137, "OOMKilled", loop_at)))
    kube.put_pod(NS, pod("w-pending", app, phase="Pending", ready=False))
    leaving = pod("w-leaving", app)
    leaving["metadata"]["deletionTimestamp"] = iso()
    kube.put_pod(NS, leaving)
    evicted = pod("w-evicted", app, phase="Failed", ready=False, state=terminated(143, "Error", kube_time))
    evicted["status"].update(reason="Evicted", message="The node was low on resource: memory.")
    kube.put_pod(NS, evicted)
    kube.put_pod(NS, pod("web-1", {"app": "web"}))  # another app's pod: not ours
    kube.put_pod("other-ns", pod("w-elsewhere", app))  # another namespace

    a, g = adapter(tmp_path, kube)
    ts = by_id(a.inventory(g, ["celery@w-run", "celery@w-gone"]))
    lists = kube.requests("GET", f"/api/v1/namespaces/{NS}/pods")
    assert len(lists) == 1 and lists[0].params.get("labelSelector") == "app=celery"
    assert lists[0].headers.get("Authorization") == "Bearer test-token-not-secret"  # the kubeconfig's user

    assert set(ts) == {"w-run", "w-notready", "w-dead", "w-oom", "w-pending", "w-leaving", "w-evicted", "w-gone"}
    assert {i: t.state for i, t in ts.items()} == {
        "w-run": "running", "w-notready": "running", "w-dead": "crashed", "w-oom": "crashed",
        "w-pending": "restarting", "w-leaving": "stopping", "w-evicted": "exited", "w-gone": "missing"}
    # a Celery hostname maps to its pod by name; pods nobody heard of get the hostname the globs imply
    assert ts["w-run"].hostname == "celery@w-run" and ts["w-oom"].hostname == "celery@w-oom"
    assert ts["w-gone"].hostname == "celery@w-gone" and "no pod w-gone in namespace workers" in ts["w-gone"].detail
    dead = ts["w-dead"]
    assert dead.since == crashed_at and "Error" in dead.detail and "exit code 137" in dead.detail
    assert "2 restart(s)" in dead.detail
    oom = ts["w-oom"]
    assert oom.since == loop_at and "CrashLoopBackOff" in oom.detail and "OOMKilled" in oom.detail
    assert "4 restart(s)" in oom.detail
    assert "Evicted" in ts["w-evicted"].detail and ts["w-evicted"].since == kube_time
    assert ts["w-run"].since is None and ts["w-run"].detail == ""
    assert ts["w-notready"].detail == "running, not ready"


def test_the_worker_container_alone_decides_with_a_sidecar(kube, tmp_path):
    p = pod("w-0", {"app": "celery"}, extra_containers=["proxy"])
    p["status"]["containerStatuses"][1]["state"] = terminated(1, "Error")
    kube.put_pod(NS, p)
    a, g = adapter(tmp_path, kube, container="worker")
    assert by_id(a.inventory(g))["w-0"].state == "running"
    b, g2 = adapter(tmp_path, kube)  # without `container`, any container of the pod counts
    assert by_id(b.inventory(g2))["w-0"].state == "crashed"


def test_target_template_maps_hostnames_to_pod_names(kube, tmp_path):
    kube.put_pod(NS, pod("celery-w-0", {"app": "celery"}))
    a, g = adapter(tmp_path, kube, target="celery-{node}")
    assert a.target_for(g, "celery@w-0").id == "celery-w-0"
    ts = by_id(a.inventory(g, ["celery@w-0"]))
    assert ts["celery-w-0"].hostname == "celery@w-0" and ts["celery-w-0"].state == "running"


# ---------------------------------------------------------------- restart: delete
def test_delete_sends_grace_period_and_uid_precondition(kube, tmp_path):
    kube.put_pod(NS, pod("w-0", {"app": "celery"}, uid="uid-first", state=terminated()))
    a, g = adapter(tmp_path, kube)
    t = by_id(a.inventory(g))["w-0"]
    res = a.restart(t, "test")
    assert res.ok and not res.in_progress and "deleted pod w-0" in res.message, res
    [req] = kube.requests("DELETE", f"/api/v1/namespaces/{NS}/pods/w-0")
    assert req.params.get("gracePeriodSeconds") == "7"
    assert req.data == {"gracePeriodSeconds": 7, "preconditions": {"uid": "uid-first"}}
    assert kube.get(PODS, NS, "w-0") is None

    again = a.restart(t, "test")  # already gone (404): the controller's job now, not a failure
    assert again.ok and again.in_progress and "already gone" in again.message, again

    kube.put_pod(NS, pod("w-0", {"app": "celery"}, uid="uid-second"))
    kube.deny("DELETE", f"/api/v1/namespaces/{NS}/pods/w-0", 409,
              "Precondition failed: UID in precondition: uid-first, UID in object meta: uid-second")
    replaced = a.restart(t, "test")
    assert replaced.ok and replaced.in_progress and "already replaced" in replaced.message, replaced


def test_a_pod_being_deleted_is_a_restart_in_progress(kube, tmp_path):
    p = pod("w-0", {"app": "celery"})
    p["metadata"]["deletionTimestamp"] = iso()
    kube.put_pod(NS, p)
    a, g = adapter(tmp_path, kube)
    res = a.restart(by_id(a.inventory(g))["w-0"], "test")
    assert res.ok and res.in_progress, res
    assert kube.requests("DELETE") == []


# ---------------------------------------------------------------- restart: evict
def test_evict_creates_an_eviction_and_a_pdb_refusal_means_later(kube, tmp_path):
    kube.put_pod(NS, pod("w-0", {"app": "celery"}, uid="uid-0"))
    kube.put_pod(NS, pod("w-1", {"app": "celery"}, uid="uid-1"))
    a, g = adapter(tmp_path, kube, mode="evict")
    ts = by_id(a.inventory(g))
    res = a.restart(ts["w-0"], "test")
    assert res.ok and "evicted pod w-0" in res.message, res
    [req] = kube.requests("POST", f"/api/v1/namespaces/{NS}/pods/w-0/eviction")
    assert req.data["apiVersion"] == "policy/v1" and req.data["kind"] == "Eviction"
    assert req.data["metadata"] == {"name": "w-0", "namespace": NS}
    assert req.data["deleteOptions"] == {"gracePeriodSeconds": 7, "preconditions": {"uid": "uid-0"}}
    assert kube.get(PODS, NS, "w-0") is None  # the API server deleted it (kmock's eviction in kube.py)

    kube.deny("POST", f"/api/v1/namespaces/{NS}/pods/w-1/eviction", 429,
              "Cannot evict pod as it would violate the pod's disruption budget.",
              causes=[{"reason": "DisruptionBudget",
                       "message": "The disruption budget celery-pdb needs 2 healthy pods and has 2 currently"}])
    blocked = a.restart(ts["w-1"], "test")
    assert not blocked.ok and not blocked.in_progress, blocked
    assert "blocked by a PodDisruptionBudget; will retry" in blocked.message
    assert "disruption budget" in blocked.message  # the API's own words
    assert kube.get(PODS, NS, "w-1") is not None


# ---------------------------------------------------------------- restart: rollout
def test_rollout_restart_patches_the_deployment_found_through_owners(kube, tmp_path):
    kube.put(DEPLOYMENTS, NS, deployment("celery-worker"))
    kube.put(REPLICASETS, NS, replicaset("celery-worker-7d9f8", "celery-worker"))
    kube.put_pod(NS, pod("celery-worker-7d9f8-abcde", {"app": "celery"}, owner=("ReplicaSet", "celery-worker-7d9f8"),
                         state=terminated()))
    a, g = adapter(tmp_path, kube, mode="rollout")
    t = by_id(a.inventory(g))["celery-worker-7d9f8-abcde"]
    assert a.describe(t) == f"kubectl rollout restart deployment/celery-worker -n {NS} --context kmock"
    before = time.time()
    res = a.restart(t, "test")
    assert res.ok and not res.in_progress and "rollout restart of deployment/celery-worker" in res.message, res
    [patch] = kube.requests("PATCH", f"/apis/apps/v1/namespaces/{NS}/deployments/celery-worker")
    assert patch.headers["Content-Type"] == "application/strategic-merge-patch+json"
    stamp = patch.data["spec"]["template"]["metadata"]["annotations"]["kubectl.kubernetes.io/restartedAt"]
    assert before - 1 <= parse_time(stamp) <= time.time() + 1
    assert patch.data == {"spec": {"template": {"metadata": {"annotations": {
        "kubectl.kubernetes.io/restartedAt": stamp}}}}}
    assert kube.get(DEPLOYMENTS, NS, "celery-worker")["spec"]["template"]["metadata"]["annotations"] == {
        "kubectl.kubernetes.io/restartedAt": stamp}
    # the pod, its ReplicaSet and its Deployment were read, nothing else was written
    assert [r.method for r in kube.requests() if r.method != "GET"] == ["PATCH"]

    # a rollout under way (kmock never moves observedGeneration: the test sets what a controller would)
    kube.put(DEPLOYMENTS, NS, deployment("celery-worker", generation=5, observed=4))
    busy = a.restart(t, "test")
    assert busy.ok and busy.in_progress and "already in progress" in busy.message, busy
    kube.put(DEPLOYMENTS, NS, deployment("celery-worker", replicas=3, updated=1))
    assert a.restart(t, "test").in_progress

    kube.put(DEPLOYMENTS, NS, deployment("celery-worker", paused=True))
    paused = a.restart(t, "test")
    assert not paused.ok and "is paused" in paused.message and "rollout resume" in paused.message, paused
    assert len(kube.requests("PATCH")) == 1, "no patch while in progress or paused"


def test_rollout_of_a_pod_without_a_deployment_says_so(kube, tmp_path):
    kube.put_pod(NS, pod("w-0", {"app": "celery"}, owner=("StatefulSet", "w")))
    a, g = adapter(tmp_path, kube, mode="rollout")
    t = by_id(a.inventory(g))["w-0"]
    res = a.restart(t, "test")
    assert not res.ok and "not managed by a Deployment" in res.message and "StatefulSet w" in res.message, res
    assert "<the Deployment of pod w-0>" in a.describe(t)  # describe() guesses nothing it has not seen


# ---------------------------------------------------------------- errors
def test_rbac_denials_and_bad_credentials_are_clear_errors(kube, tmp_path):
    kube.put_pod(NS, pod("w-0", {"app": "celery"}, state=terminated()))
    a, g = adapter(tmp_path, kube)
    t = by_id(a.inventory(g))["w-0"]

    undo = kube.deny("GET", f"/api/v1/namespaces/{NS}/pods")
    with pytest.raises(PlatformError) as e:
        a.inventory(g)
    msg = str(e.value)
    assert "denied list pods in namespace workers" in msg and "403 Forbidden" in msg, msg
    assert "cannot list resource" in msg and "deploy/kubernetes/rbac.yaml" in msg, msg
    undo()

    kube.deny("DELETE", f"/api/v1/namespaces/{NS}/pods/w-0", message='pods "w-0" is forbidden: User '
              '"system:serviceaccount:ops:celery-supervisor" cannot delete resource "pods"')
    res = a.restart(t, "test")
    assert not res.ok and "denied delete pod w-0" in res.message and "rbac.yaml" in res.message, res

    kube.deny("*", r"/api/.*", code=401)
    with pytest.raises(PlatformError) as e:
        a.inventory(g)
    assert "401 Unauthorized" in str(e.value) and "kubeconfig user" in str(e.value), str(e.value)
    assert "test-token-not-secret" not in str(e.value)


def test_unreachable_api_and_a_bad_kubeconfig_are_platform_errors(kube, tmp_path):
    dead = tmp_path / "dead.kubeconfig"
    dead.write_text(kube.write_kubeconfig(tmp_path / "k", namespace=NS).read_text()
                    .replace(kube.url, f"http://127.0.0.1:{free_port()}"))
    a, g = adapter(tmp_path, kube, kubeconfig=dead)
    t0 = time.monotonic()
    with pytest.raises(PlatformError) as e:
        a.inventory(g)
    assert "cannot reach the Kubernetes API" in str(e.value) and "list pods" in str(e.value), str(e.value)
    assert time.monotonic() - t0 < 30  # no retries inside one tick (generous: a shared machine)
    res = a.restart(a.target_for(g, "celery@w-0"), "test")
    assert not res.ok and "cannot reach the Kubernetes API" in res.message

    b, g2 = adapter(tmp_path, kube, kubeconfig=tmp_path / "missing.yaml")
    with pytest.raises(PlatformError) as e:
        b.inventory(g2)
    assert "cannot load the Kubernetes config" in str(e.value) and "missing.yaml" in str(e.value)
    # describe() needs no cluster at all
    assert b.describe(b.target_for(g2, "celery@w-0")) == f"kubectl delete pod w-0 -n {NS} --context kmock"

    c, g3 = adapter(tmp_path, kube, context="no-such-context")
    with pytest.raises(PlatformError) as e:
        c.inventory(g3)
    assert "no-such-context" in str(e.value)


def test_in_cluster_outside_a_pod_says_what_is_missing(kube, tmp_path, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    data = config(tmp_path, kube)
    data["platforms"]["kubernetes"] = {"in_cluster": True, "namespace": NS}
    a = Adapter(parse_config(data, env={}))
    g = a.config.groups[0]
    with pytest.raises(PlatformError) as e:
        a.inventory(g)
    assert "cannot load the Kubernetes config (in-cluster (service account))" in str(e.value), str(e.value)
    assert "Service host/port is not set" in str(e.value)
    assert a.describe(a.target_for(g, "celery@w-0")) == f"kubectl delete pod w-0 -n {NS}"


# ---------------------------------------------------------------- logs
def test_logs_prefer_the_previous_container_and_fall_back_to_the_current(kube, tmp_path):
    kube.put_pod(NS, pod("w-0", {"app": "celery"}))
    kube.put_pod(NS, pod("w-1", {"app": "celery"}))
    kube.set_log(NS, "w-0", "".join(f"crash line {i}\n" for i in range(100)), previous=True)
    kube.set_log(NS, "w-0", "the new container\n")
    kube.set_log(NS, "w-1", "only a current container\n")
    a, g = adapter(tmp_path, kube, container="worker")
    ts = by_id(a.inventory(g))
    assert a.logs(ts["w-0"], 3) == "crash line 97\ncrash line 98\ncrash line 99\n"
    [req] = kube.requests("GET", f"/api/v1/namespaces/{NS}/pods/w-0/log")
    assert req.params == {"previous": "true", "tailLines": "3", "container": "worker"}
    # no terminated container yet: the API server answers 400 to --previous; the current one is shown
    assert a.logs(ts["w-1"], 5) == "only a current container\n"
    assert [r.params.get("previous") for r in kube.requests("GET", f"/api/v1/namespaces/{NS}/pods/w-1/log")] \
        == ["true", None]
    assert a.logs(a.target_for(g, "celery@gone"), 5) == ""  # no such pod


# ---------------------------------------------------------------- describe
def test_describe_commands(kube, tmp_path):
    a, g = adapter(tmp_path, kube)
    t = a.target_for(g, "celery@w-0")
    assert a.describe(t) == f"kubectl delete pod w-0 -n {NS} --context kmock"
    b, g2 = adapter(tmp_path, kube, context=None)
    assert b.describe(b.target_for(g2, "celery@w-0")) == f"kubectl delete pod w-0 -n {NS}"
    c, g3 = adapter(tmp_path, kube, mode="evict")
    text = c.describe(c.target_for(g3, "celery@w-0"))
    assert text.startswith("echo '{\"apiVersion\":\"policy/v1\",\"kind\":\"Eviction\"")
    assert text.endswith(f"kubectl --context kmock create --raw /api/v1/namespaces/{NS}/pods/w-0/eviction -f -")
    assert kube.requests() == [], "describe() makes no API call"


# ---------------------------------------------------------------- the loop, end to end
def ticks_until(sup, cond, timeout: float, what: str, pause: float = 0.3):
    """Run the real loop's ticks until cond(report) holds; returns (report, seconds)."""
    t0 = time.monotonic()
    while True:
        report = sup.tick()
        if cond(report):
            return report, time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            verdicts = [(v.hostname, v.status, v.reason) for v in report.decision.verdicts]
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last verdicts {verdicts}, "
                                 f"platform errors {report.platform_errors}, actions {report.actions}")
        time.sleep(pause)


def status_of(report, hostname: str) -> str | None:
    return next((v.status for v in report.decision.verdicts if v.hostname == hostname), None)


def test_loop_restarts_a_killed_worker_by_deleting_its_pod(kube, tmp_path, redis_url, uid, catcher):
    from supervisor.loop import Supervisor

    name = f"{uid}-w-0"
    host = f"celery@{name}"
    queue = f"{uid}-q"
    kube.put_pod(NS, pod(name, {"app": "celery"}, uid="uid-before"))
    workers = [Worker(redis_url, host, queues=queue, log=tmp_path / "w0.log")]
    deletes: list[float] = []

    def note_delete(req):
        deletes.append(time.monotonic())
        raise NotImplementedError  # kmock's emulator deletes the pod
    kube.intercept("DELETE", f"/api/v1/namespaces/{NS}/pods/{name}", note_delete)
    crash_output = "".join(f"[2024-05-01 10:00:{i:02d}] worker output line {i}\n" for i in range(60))
    crash_output += "MemoryError: the last words of the crashed worker\n"
    kube.set_log(NS, name, crash_output, previous=True)

    channel = {"channels": [{"name": "ops", "url": f"json://127.0.0.1:{catcher.port}/alerts"}],
               "retry": ["200ms", "500ms"]}
    cfg = parse_config(config(tmp_path, kube, redis_url, workers=[host], hostnames=[f"celery@{uid}-*"],
                              notify=channel), env={})
    sup = Supervisor(cfg)
    app = celery_app(redis_url)
    try:
        wait_ping(app, host)
        sup.start()
        ticks_until(sup, lambda r: status_of(r, host) == "alive", 30, "the worker to be alive")
        # steady state: the core lets workers settle for a while after its stream connects (it
        # pings no one then); a death during that window waits out heartbeat_timeout instead
        ticks_until(sup, lambda r: (getattr(sup.core, "settle_until", None) or 0) < r.obs.now, 30,
                    "the settle period after start to end", pause=0.5)

        # the worker dies; the kubelet (played here) reports the container terminated
        workers[0].kill()
        killed = time.monotonic()
        workers[0].proc.wait(10)
        finished = kube.crash(NS, name, exit_code=137, reason="Error")
        report, _ = ticks_until(sup, lambda r: deletes, 30, "the DELETE of the pod")
        kill_to_delete = deletes[0] - killed
        [req] = kube.requests("DELETE", f"/api/v1/namespaces/{NS}/pods/{name}")
        assert req.data == {"gracePeriodSeconds": 7, "preconditions": {"uid": "uid-before"}}
        [act] = [a for a in report.actions if a.kind == "restart"]
        assert act.executed and act.target == name and act.result.startswith("ok"), act
        assert act.command == f"kubectl delete pod {name} -n {NS} --context kmock"

        # the controller (played here) re-creates the pod, and its worker starts
        time.sleep(0.5)
        assert kube.get(PODS, NS, name) is None
        kube.put_pod(NS, pod(name, {"app": "celery"}, uid="uid-after"))
        workers.append(Worker(redis_url, host, queues=queue, log=tmp_path / "w0b.log"))
        back, _ = ticks_until(sup, lambda r: status_of(r, host) == "alive" and not any(
            f.rule == "worker_lost" for f in r.decision.findings), 60, "the worker to be back")
        healthy_after = time.monotonic() - killed
        assert len(kube.requests("DELETE")) == 1, "restarted exactly once"
        resolved = catcher.wait_for(lambda r: r.json and "RESOLVED" in r.json["title"] and host in r.json["title"],
                                    timeout=30)
        assert resolved

        fired = [r.json for r in catcher.received() if r.json and "FIRING" in r.json["title"]
                 and "worker_lost" in r.json["title"]]
        assert fired, [r.json["title"] for r in catcher.received() if r.json]
        body = fired[0]["message"]
        assert f"kubectl delete pod {name}" in body and "deleted pod" in body, body
        assert "exit code 137" in body  # the platform's own view of the death
        assert "the last words of the crashed worker" in body  # kubectl logs --previous
        assert "worker output line 59" in body and "worker output line 0\n" not in body  # the tail only
        [log_req, *_] = kube.requests("GET", f"/api/v1/namespaces/{NS}/pods/{name}/log")
        assert log_req.params.get("previous") == "true" and log_req.params.get("tailLines") == "30"
        assert parse_time(iso(finished)) == finished
        print(f"\nkubernetes loop: SIGKILL -> DELETE received {kill_to_delete:.2f}s; "
              f"SIGKILL -> healthy again (new pod + worker) {healthy_after:.2f}s")
    finally:
        for w in workers:
            w.stop()
        sup.close(flush=3.0)
        app.close()


def test_loop_survives_rbac_denial_and_reports_a_platform_error(kube, tmp_path, redis_url, uid):
    from supervisor.loop import Supervisor

    name = f"{uid}-w-0"
    host = f"celery@{name}"
    kube.put_pod(NS, pod(name, {"app": "celery"}))
    w = Worker(redis_url, host, queues=f"{uid}-q", log=tmp_path / "w.log")
    undo = kube.deny("GET", f"/api/v1/namespaces/{NS}/pods")
    cfg = parse_config(config(tmp_path, kube, redis_url, workers=[host], hostnames=[f"celery@{uid}-*"]), env={})
    sup = Supervisor(cfg)
    app = celery_app(redis_url)
    try:
        wait_ping(app, host)
        sup.start()
        report, _ = ticks_until(sup, lambda r: r.platform_errors and any(
            f.rule == "platform_error" for f in r.decision.findings), 20, "a platform_error finding")
        err = report.platform_errors["g"]
        assert "denied list pods" in err and "rbac.yaml" in err, err
        # the loop goes on and still judges the worker from its heartbeats
        report, _ = ticks_until(sup, lambda r: status_of(r, host) == "alive", 20, "the worker judged alive")
        assert report.platform_errors and not [a for a in report.actions if a.kind == "restart"]
        undo()
        ticks_until(sup, lambda r: not r.platform_errors and not any(
            f.rule == "platform_error" for f in r.decision.findings), 20, "the platform error to clear")
    finally:
        w.stop()
        sup.close(flush=1.0)
        app.close()


# ---------------------------------------------------------------- the CLI
def test_once_dry_run_json_shows_the_kubectl_command(kube, tmp_path, redis_url, uid):
    name = f"{uid}-w-0"
    host = f"celery@{name}"
    kube.put_pod(NS, pod(name, {"app": "celery"}, state=terminated(137, "OOMKilled")))
    path = write_config(tmp_path / "supervisor.yaml",
                        config(tmp_path, kube, redis_url, workers=[host], hostnames=[f"celery@{uid}-*"]))
    # the same with the API server down: the plan and the command are still shown, beside the error
    dead = tmp_path / "dead.kubeconfig"
    dead.write_text((tmp_path / "kubeconfig").read_text().replace(kube.url, f"http://127.0.0.1:{free_port()}"))
    path2 = write_config(tmp_path / "down.yaml", config(tmp_path, kube, redis_url, workers=[host],
                                                         hostnames=[f"celery@{uid}-*"], kubeconfig=dead))
    with ThreadPoolExecutor(2) as pool:
        runs = [pool.submit(run_cli, "once", "-c", p, "--dry-run", "--json", timeout=60) for p in (path, path2)]
        r, r2 = (f.result() for f in runs)
    assert r.rc == 2, str(r)
    doc = r.json
    [act] = [a for a in doc["actions"] if a["kind"] == "restart"]
    assert act["command"] == f"kubectl delete pod {name} -n {NS} --context kmock", str(r)
    assert act["executed"] is False and act["hostname"] == host and act["target"] == name, str(r)
    [w] = [x for x in doc["workers"] if x["hostname"] == host]
    assert w["platform_state"] == "crashed" and w["alive"] is False, str(r)
    assert kube.requests("DELETE") == [] and kube.requests("POST") == [], "--dry-run deleted nothing"
    assert "test-token-not-secret" not in r.output

    doc2 = r2.json
    assert "cannot reach the Kubernetes API" in doc2["platform_errors"]["g"], str(r2)
    [act2] = [a for a in doc2["actions"] if a["kind"] == "restart"]
    assert act2["command"] == f"kubectl delete pod {name} -n {NS} --context kmock", str(r2)


# ---------------------------------------------------------------- deploy/kubernetes/rbac.yaml
def _rbac_need(req) -> tuple[str, str, str]:
    """(apiGroup, resource[/subresource], verb) an API request needs, as RBAC authorizes it."""
    import re

    m = re.fullmatch(r"/(?:api/v1|apis/([^/]+)/[^/]+)/namespaces/[^/]+/([^/]+)(?:/([^/]+)(?:/([^/]+))?)?",
                     req.url.path)
    assert m, req.url.path
    group, resource, name, sub = m.group(1) or "", m.group(2), m.group(3), m.group(4)
    verb = {"GET": "get" if name else "watch" if req.params.get("watch") == "true" else "list", "DELETE": "delete",
            "PATCH": "patch", "POST": "create", "PUT": "update"}[str(getattr(req.method, "value", req.method))]
    return group, f"{resource}/{sub}" if sub else resource, verb


def test_rbac_manifest_grants_exactly_what_the_adapter_uses(kube, tmp_path):
    import yaml

    from tests.support.cli import REPO

    docs = list(yaml.safe_load_all((REPO / "deploy/kubernetes/rbac.yaml").read_text()))
    role = next(d for d in docs if d["kind"] == "Role")
    binding = next(d for d in docs if d["kind"] == "RoleBinding")
    sa = next(d for d in docs if d["kind"] == "ServiceAccount")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"],
                                    "namespace": sa["metadata"]["namespace"]}]
    granted = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
               for v in rule["verbs"]}

    # every operation of every mode, against kmock
    kube.put(DEPLOYMENTS, NS, deployment("dep"))
    kube.put(REPLICASETS, NS, replicaset("dep-1", "dep"))
    for n in ("dep-1-a", "dep-1-b", "dep-1-c"):
        kube.put_pod(NS, pod(n, {"app": "celery"}, owner=("ReplicaSet", "dep-1")))
    kube.set_log(NS, "dep-1-a", "x\n", previous=True)
    for mode, victim in (("delete", "dep-1-a"), ("evict", "dep-1-b"), ("rollout", "dep-1-c")):
        a, g = adapter(tmp_path, kube, mode=mode)
        t = by_id(a.inventory(g))[victim]
        a.logs(t, 5)
        assert a.restart(t, "rbac test").ok
    a.logs(a.target_for(g, "celery@dep-1-c"), 5)  # no previous container: the current one's log too
    a.watch(lambda reason: None)  # deaths wake the loop: a watch of the groups' pods
    try:
        _watching(kube, NS)
    finally:
        a.close()
    used = {_rbac_need(r) for r in kube.requests()}
    assert used <= granted, f"the adapter needs rights rbac.yaml does not grant: {used - granted}"
    lease = {x for x in granted if x[0] == "coordination.k8s.io"}
    # supervisor/lease.py (ha.lease: kubernetes) reads, creates and merge-patches its Lease
    assert lease == {("coordination.k8s.io", "leases", v) for v in ("get", "create", "patch")}
    assert granted - lease == used, f"rbac.yaml grants rights the adapter never uses: {granted - lease - used}"


# ---------------------------------------------------------------- deaths wake the loop (Platform.watch)
def _pod_in(ns: str, name: str, labels: dict) -> dict:
    """A pod as the API server stores it, with metadata.namespace (the API server always writes it; kmock
    matches a watch's events to the watch's namespace by that field: kmock/_internal/k8s.py _serve_watch)."""
    p = pod(name, labels)
    p["metadata"]["namespace"] = ns
    return p


def _core(kube: KubeApi):
    """The real client against kmock, for what the kubelet and kubectl do over HTTP (kmock streams watch
    events only for writes that arrive over HTTP, not for the in-process put/patch of tests/support/kube.py)."""
    from kubernetes import client

    conf = client.Configuration()
    conf.host = kube.url
    conf.retries = 0
    return client.CoreV1Api(client.ApiClient(conf))


def _kubelet_terminates(core, ns: str, name: str, exit_code: int = 137) -> None:
    """What the kubelet does when a container's process dies: PATCH pods/NAME/status, the container
    terminated and not ready."""
    c = pod(name)["status"]["containerStatuses"][0]
    c.update(state=terminated(exit_code, "Error"), ready=False, started=False)
    core.patch_namespaced_pod_status(name, ns, {"status": {"containerStatuses": [c]}}, _request_timeout=5)


def _watching(kube: KubeApi, ns: str, after: int = 0) -> None:
    """Until the adapter's watch request reached the API server."""
    deadline = time.monotonic() + 15
    while not [r for r in kube.requests("GET", f"/api/v1/namespaces/{ns}/pods")
               if r.params.get("watch") == "true"][after:]:
        assert time.monotonic() < deadline, f"no watch of pods in namespace {ns} reached the API server"
        time.sleep(0.02)


class _Wakes:
    def __init__(self) -> None:
        import threading

        self._lock = threading.Lock()
        self.reasons: list[str] = []

    def __call__(self, reason: str) -> None:
        with self._lock:
            self.reasons.append(reason)

    def wait_for(self, text: str, timeout: float = 10.0) -> list[str]:
        """The reasons so far, once one of them holds ``text`` (AssertionError after ``timeout``)."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                got = list(self.reasons)
            if any(text in r for r in got):
                return got
            assert time.monotonic() < deadline, f"no wake about {text!r} within {timeout}s; wakes: {got}"
            time.sleep(0.01)


def test_watch_wakes_on_a_death_of_our_pods_only(kube, tmp_path):
    app, web = {"app": "celery"}, {"app": "web"}
    for name, labels in (("w-0", app), ("w-1", app), ("web-1", web)):
        kube.put_pod(NS, _pod_in(NS, name, labels))
    already = _pod_in(NS, "w-old", app)  # crashed before the supervisor started: the tick's business
    already["status"]["containerStatuses"][0].update(state=terminated(1, "Error"), ready=False)
    kube.put_pod(NS, already)
    core = _core(kube)
    a, _ = adapter(tmp_path, kube)
    wakes = _Wakes()
    try:
        a.watch(wakes)
        _watching(kube, NS)
        # another selector's pod dies and goes: not ours, no wake (kmock ignores the labelSelector of a
        # watch: the adapter's own label check decides)
        _kubelet_terminates(core, NS, "web-1")
        core.delete_namespaced_pod("web-1", NS, _request_timeout=5)
        # ours: the kubelet writes a terminated container; then `kubectl delete pod`
        _kubelet_terminates(core, NS, "w-0")
        got = wakes.wait_for("pod w-0 ")
        core.delete_namespaced_pod("w-1", NS, _request_timeout=5)
        got = wakes.wait_for("pod w-1 ")
    finally:
        a.close()
    # events come in order on one stream: web-1's were read before w-0's
    assert [r for r in got if "web-1" in r] == [], got
    assert [r for r in got if "w-old" in r] == [], got  # the watch's first ADDED events only learn states
    [w0] = [r for r in got if "pod w-0 " in r]
    assert f"namespace {NS}" in w0 and "terminated" in w0 and "exit code 137" in w0, w0
    [w1] = [r for r in got if "pod w-1 " in r]
    assert w1.endswith("deleted"), w1


def test_watch_again_after_the_stream_ends_and_close_stops_it(kube, tmp_path):
    import threading

    kube.put_pod(NS, _pod_in(NS, "w-0", {"app": "celery"}))
    core = _core(kube)
    a, _ = adapter(tmp_path, kube)
    wakes = _Wakes()
    a.watch(wakes)
    try:
        _watching(kube, NS)
        # the API server drops every open connection (as at a restart or a proxy's idle cut): the
        # adapter watches again, and a death after that still wakes
        kube.call(lambda: [r._raw_request.transport.close() for r in kube.kmock
                           if r.params.get("watch") == "true" and r._raw_request.transport is not None])
        _watching(kube, NS, after=1)
        _kubelet_terminates(core, NS, "w-0")
        wakes.wait_for("pod w-0 ")
    finally:
        threads = [t for t in threading.enumerate() if t.name.startswith("kubernetes:watch:")]
        assert threads, "no watch thread ran"
        a.close()
    assert [t.name for t in threads if t.is_alive()] == []
    n = len(wakes.reasons)
    core.delete_namespaced_pod("w-0", NS, _request_timeout=5)  # after close(): nobody watches
    time.sleep(0.5)
    assert len(wakes.reasons) == n, wakes.reasons
