"""A Kubernetes API server for the tests: kmock's KubernetesEmulator served over real HTTP on a free
port, in a thread with its own event loop, so that the real (synchronous) `kubernetes` client and
the supervisor talk to it as they would to an API server.

    with KubeApi() as api:
        api.put_pod("ns", pod("w-0", labels={"app": "celery"}))
        api.write_kubeconfig(tmp / "kubeconfig", namespace="ns")
        ...
        api.requests("DELETE", "/api/v1/namespaces/ns/pods/w-0")   # what arrived, in order

What kmock is (read its source): an in-memory object store behind the Kubernetes URL scheme. It
creates, lists, fetches, patches (recursive merge) and deletes objects. It has no controllers and
no kubelet: a deleted pod is not re-created, a container never changes state, a label selector is
not applied to a list, a Deployment's generation never moves, and subresources it does not know
(pods/eviction, pods/log) answer 404 unless a test serves them. This module serves those two the
way the API server does (an eviction deletes the pod and answers 201; logs come from `set_log`),
and `intercept` lets a test answer any request itself (403, 429, ...). The test plays the kubelet
(`crash`: a container terminated) and the controller (`put_pod` again) where a scenario needs it.
"""

from __future__ import annotations

import asyncio
import copy
import datetime as _dt
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

PODS = "v1/pods"
DEPLOYMENTS = "apps/v1/deployments"
REPLICASETS = "apps/v1/replicasets"

Handler = Callable[[Any], Any]  # (kmock request) -> payload; raise NotImplementedError to pass


def iso(t: float | None = None) -> str:
    """RFC 3339 (as the API server writes times) of an epoch time, default now."""
    t = time.time() if t is None else t
    return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def status(code: int, reason: str, message: str, **details) -> Exception:
    """An error the API server would send (a `Status` object with this HTTP code)."""
    import kmock

    return kmock.KubernetesError(status=code, reason=reason, message=message, details=details or {"causes": []})


def pod(name: str, labels: dict | None = None, *, phase: str = "Running", ready: bool = True,
        container: str = "worker", restart_count: int = 0, state: dict | None = None,
        last_state: dict | None = None, owner: tuple[str, str] | None = None,
        uid: str | None = None, extra_containers: list[str] = ()) -> dict:
    """A pod as the API server shows it (the fields the client's models require are all there).
    ``state``: the worker container's state, default running; ``owner``: (kind, name)."""
    started = iso(time.time() - 60)
    if state is None:
        state = {"running": {"startedAt": started}} if phase == "Running" else \
            {"waiting": {"reason": "ContainerCreating"}}
    statuses = [{"name": container, "image": "celery-worker:1", "imageID": "sha256:1", "ready": ready,
                 "restartCount": restart_count, "started": "running" in state, "state": state,
                 "lastState": last_state or {}}]
    for c in extra_containers:
        statuses.append({"name": c, "image": f"{c}:1", "imageID": "sha256:2", "ready": True,
                         "restartCount": 0, "started": True, "state": {"running": {"startedAt": started}},
                         "lastState": {}})
    meta: dict[str, Any] = {"name": name, "labels": dict(labels or {}), "uid": uid or f"uid-{name}-{time.time_ns()}",
                            "creationTimestamp": started, "resourceVersion": "1"}
    if owner is not None:
        meta["ownerReferences"] = [{"apiVersion": "apps/v1", "kind": owner[0], "name": owner[1],
                                    "uid": f"uid-{owner[1]}", "controller": True}]
    conditions = [{"type": "Ready", "status": "True" if ready and phase == "Running" else "False"}]
    return {
        "apiVersion": "v1", "kind": "Pod", "metadata": meta,
        "spec": {"containers": [{"name": c, "image": "celery-worker:1"} for c in (container, *extra_containers)],
                 "restartPolicy": "Always", "nodeName": "node-1"},
        "status": {"phase": phase, "conditions": conditions, "containerStatuses": statuses,
                   "startTime": started},
    }


def terminated(exit_code: int = 137, reason: str = "Error", at: float | None = None) -> dict:
    """A container state `terminated` as the kubelet writes it (finishedAt = ``at``, default now)."""
    t = time.time() if at is None else at
    return {"terminated": {"exitCode": exit_code, "reason": reason, "startedAt": iso(t - 60),
                           "finishedAt": iso(t)}}


def deployment(name: str, *, replicas: int = 2, paused: bool = False, generation: int = 3,
               observed: int | None = None, updated: int | None = None) -> dict:
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "uid": f"uid-{name}", "generation": generation},
        "spec": {"replicas": replicas, "paused": paused,
                 "selector": {"matchLabels": {"app": name}},
                 "template": {"metadata": {"labels": {"app": name}},
                              "spec": {"containers": [{"name": "worker", "image": "celery-worker:1"}]}}},
        "status": {"observedGeneration": generation if observed is None else observed,
                   "replicas": replicas, "updatedReplicas": replicas if updated is None else updated,
                   "readyReplicas": replicas, "availableReplicas": replicas},
    }


def replicaset(name: str, deployment_name: str) -> dict:
    return {
        "apiVersion": "apps/v1", "kind": "ReplicaSet",
        "metadata": {"name": name, "uid": f"uid-{name}",
                     "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": deployment_name,
                                          "uid": f"uid-{deployment_name}", "controller": True}]},
        "spec": {"replicas": 2, "selector": {"matchLabels": {"app": deployment_name}}},
        "status": {"replicas": 2},
    }


class KubeApi:
    """kmock's Kubernetes emulator on 127.0.0.1:<free port>, in a thread of its own."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._intercepts: list[tuple[str, re.Pattern, Handler]] = []
        self._logs: dict[tuple[str, str, bool], str] = {}
        self.kmock = None
        self.server = None
        self._thread = threading.Thread(target=self._run, name="kmock", daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("kmock did not start within 30s")
        if self._error is not None:
            raise RuntimeError(f"kmock did not start: {self._error!r}")

    # ------------------------------------------------------------ the server thread
    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._serve())
        except BaseException as e:  # noqa: BLE001 (reported to the starting thread)
            self._error = e
            self._ready.set()
        finally:
            self._loop.close()

    async def _serve(self) -> None:
        import kmock

        self._stop = asyncio.Event()
        async with kmock.KubernetesEmulator() as handler, kmock.Server(handler) as server:
            self.kmock, self.server = handler, server
            # the known resources (discovery; and lists answer before any object exists)
            for res in (PODS, DEPLOYMENTS, REPLICASETS):
                handler.resources[res] = kmock.ResourceInfo(namespaced=True)
            handler[lambda req: True] << self._dispatch  # before kmock's own emulation
            self._ready.set()
            await self._stop.wait()

    def _dispatch(self, req):
        path, method = req.url.path, str(req.method.value if hasattr(req.method, "value") else req.method)
        for m, pattern, handler in list(self._intercepts):
            if m in ("*", method) and pattern.fullmatch(path):
                try:
                    return handler(req)
                except NotImplementedError:
                    continue
        if method == "POST" and path.endswith("/eviction"):
            return self._evict(req)
        if method == "GET" and path.endswith("/log"):
            return self._log(req)
        raise NotImplementedError  # kmock's emulator answers

    def _obj(self, resource: str, ns: str, name: str):
        """kmock's stored object, or None when absent or deleted (server thread only)."""
        try:
            obj = self.kmock.objects[resource, ns, name]
        except KeyError:
            return None
        return None if obj.deleted else obj

    def _pod_path(self, req) -> tuple[str, str]:
        m = re.fullmatch(r"/api/v1/namespaces/([^/]+)/pods/([^/]+)/[a-z]+", req.url.path)
        assert m, req.url.path
        return m.group(1), m.group(2)

    def _evict(self, req):
        """The eviction subresource: the pod is deleted (the API server honours its grace period; a
        kubelet would then stop it) and the answer is 201 with a Status."""
        import kmock

        ns, name = self._pod_path(req)
        obj = self._obj(PODS, ns, name)
        if obj is None:
            raise status(404, "NotFound", f'pods "{name}" not found', name=name, kind="pods")
        obj.delete()
        return kmock.Response(status=201, payload={"kind": "Status", "apiVersion": "v1", "metadata": {},
                                                   "status": "Success", "code": 201})

    def _log(self, req):
        ns, name = self._pod_path(req)
        previous = req.params.get("previous") == "true"
        if self._obj(PODS, ns, name) is None:
            raise status(404, "NotFound", f'pods "{name}" not found', name=name, kind="pods")
        text = self._logs.get((ns, name, previous))
        if text is None:
            if previous:  # what the API server answers when no container has terminated yet
                raise status(400, "BadRequest",
                             f'previous terminated container "worker" in pod "{name}" not found')
            text = ""
        tail = req.params.get("tailLines")
        if tail is not None:
            lines = text.splitlines(keepends=True)
            text = "".join(lines[-int(tail):]) if int(tail) > 0 else ""
        import kmock

        return kmock.Response(payload=text.encode(), headers={"Content-Type": "text/plain"})

    # ------------------------------------------------------------ from the test thread
    def call(self, fn: Callable[[], Any], timeout: float = 10.0) -> Any:
        """Run ``fn`` in the server's thread (kmock's objects are not thread-safe) and return its result."""
        async def wrapper():
            return fn()
        return asyncio.run_coroutine_threadsafe(wrapper(), self._loop).result(timeout)

    @property
    def url(self) -> str:
        return str(self.server.url).rstrip("/")

    def intercept(self, method: str, path: str, handler: Handler) -> Callable[[], None]:
        """Answer requests whose path fully matches the regex ``path`` (method or "*") with
        ``handler(request)``: a payload (dict, bytes, kmock.Response), or raise ``status(...)``;
        raise NotImplementedError to let the emulator answer. Returns a function that removes it."""
        entry = (method.upper(), re.compile(path), handler)
        self._intercepts.insert(0, entry)
        return lambda: self._intercepts.remove(entry)

    def deny(self, method: str, path: str, code: int = 403, message: str | None = None,
             reason: str | None = None, **details) -> Callable[[], None]:
        """Every matching request fails with ``code`` as the API server would fail it: 403 (RBAC),
        401 (credentials), 409, 429 (a PodDisruptionBudget) ... Returns a function that stops it."""
        reason = reason or {401: "Unauthorized", 403: "Forbidden", 409: "Conflict",
                            429: "TooManyRequests"}.get(code, "InternalError")
        msg = message or ("Unauthorized" if code == 401 else
                          'pods is forbidden: User "system:serviceaccount:ops:celery-supervisor" cannot '
                          'list resource "pods" in API group "" in the namespace "ns"')

        def handler(req):
            raise status(code, reason, msg, **details)
        return self.intercept(method, path, handler)

    def put(self, resource: str, ns: str, obj: dict) -> None:
        """Create or replace an object (what a controller or kubectl apply would do)."""
        def do():
            self.kmock.objects[resource, ns, obj["metadata"]["name"]] = obj
        self.call(do)

    def put_pod(self, ns: str, obj: dict) -> None:
        self.put(PODS, ns, obj)

    def get(self, resource: str, ns: str, name: str) -> dict | None:
        """The current object, or None when it does not exist (or was deleted)."""
        def do():
            obj = self._obj(resource, ns, name)
            return None if obj is None else copy.deepcopy(obj.raw)
        return self.call(do)

    def patch(self, resource: str, ns: str, name: str, changes: dict) -> None:
        """Merge ``changes`` into the object, as the kubelet does when it writes a pod's status."""
        self.call(lambda: self.kmock.objects[resource, ns, name].patch(changes))

    def crash(self, ns: str, name: str, exit_code: int = 137, reason: str = "Error",
              container: str = "worker") -> float:
        """Play the kubelet after the container's process died: its state becomes terminated. Returns
        the finishedAt written (epoch seconds, whole: the API has second precision)."""
        at = float(int(time.time()))

        def do():
            obj = self.kmock.objects[PODS, ns, name]
            st = obj.raw["status"]
            statuses = [dict(c) for c in st["containerStatuses"]]
            for c in statuses:
                if c["name"] == container:
                    c.update(state=terminated(exit_code, reason, at), ready=False, started=False)
            conditions = [{"type": "Ready", "status": "False", "reason": "ContainersNotReady"}]
            obj.patch({"status": {"containerStatuses": statuses, "conditions": conditions}})
        self.call(do)
        return at

    def set_log(self, ns: str, name: str, text: str, previous: bool = False) -> None:
        self._logs[(ns, name, previous)] = text

    def requests(self, method: str | None = None, path: str | None = None) -> list:
        """Requests received so far, in order (kmock's Request objects: .method .url .params .data),
        filtered by method and by a regex the path must fully match."""
        pattern = re.compile(path) if path is not None else None

        def do():
            return [r for r in list(self.kmock)
                    if (method is None or str(getattr(r.method, "value", r.method)) == method.upper())
                    and (pattern is None or pattern.fullmatch(r.url.path))]
        return self.call(do)

    def wait_request(self, method: str, path: str, timeout: float = 30.0, after: int = 0):
        """The first matching request (beyond the first ``after`` ones), waiting up to ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.requests(method, path)
            if len(got) > after:
                return got[after]
            if time.monotonic() > deadline:
                raise AssertionError(f"no {method} {path} reached the API server within {timeout}s")
            time.sleep(0.02)

    def write_kubeconfig(self, path: Path, *, namespace: str | None = None, context: str = "kmock",
                         token: str = "test-token-not-secret") -> Path:
        """A kubeconfig whose context points at this server (plain HTTP, a bearer token)."""
        ctx: dict[str, Any] = {"cluster": "kmock", "user": "tester"}
        if namespace:
            ctx["namespace"] = namespace
        doc = {
            "apiVersion": "v1", "kind": "Config", "current-context": context,
            "clusters": [{"name": "kmock", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {"token": token}}],
            "contexts": [{"name": context, "context": ctx}],
        }
        path.write_text(yaml.safe_dump(doc), encoding="utf-8")
        return path

    def close(self) -> None:
        if self._stop is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def __enter__(self) -> KubeApi:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
