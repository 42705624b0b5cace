"""The ``kubernetes`` platform: Celery workers run in pods, one worker per pod.

A worker started with ``-n celery@$(POD_NAME)`` (the downward API) has the pod's name as the node
part of its Celery hostname: ``restart.target`` (default ``{node}``) renders a hostname into its pod's
name. Pods are listed by ``restart.selector`` (labels) in ``restart.namespace`` (default
``platforms.kubernetes.namespace``).

What the platform says of a pod (its phase, and the worker container's state):

- ``deletionTimestamp`` set -> ``stopping`` (it is being deleted or evicted);
- Running, the container running -> ``running`` (ready or not: the process lives);
- a container terminated, or waiting in ``CrashLoopBackOff`` (or another failure such as
  ``ImagePullBackOff``) -> ``crashed``, with the reason, exit code and restart count, and ``since`` =
  the ``finishedAt`` of its last termination (the core acts at once on a death the platform saw);
- Pending (scheduling, pulling, creating) -> ``restarting``;
- Failed or Succeeded (the pod is over; e.g. evicted by the kubelet) -> ``exited``;
- a hostname the supervisor knows whose pod does not exist -> ``missing`` (a Deployment already
  replaced it under another name: the core retires a glob-matched hostname quietly).

A restart (``restart.mode``):

- ``delete`` (default): delete the pod with ``grace_period_seconds = stop_timeout`` and the UID seen
  last as a precondition (a pod re-created under the same name by a StatefulSet is not deleted by
  mistake); its controller creates the replacement. 404 or a UID mismatch: already replaced, nothing
  to do (in progress).
- ``evict``: the Eviction API (``policy/v1``), which honours PodDisruptionBudgets: 429 means a budget
  forbids it now; the restart fails with a message saying so and is retried after the backoff.
- ``rollout``: what ``kubectl rollout restart`` does to the pod's Deployment (found through
  ownerReferences: Pod -> ReplicaSet -> Deployment): the pod template's annotation
  ``kubectl.kubernetes.io/restartedAt`` set to now. Not done when the Deployment is paused; a
  rollout already under way counts as the restart in progress.

Responses are read as JSON (``_preload_content=False``), not through the client's models: a server's
quirk (a Status in place of an Eviction, a field the models reject) must not fail a restart. Every
call has a timeout (``platforms.kubernetes.timeout``, longer than any grace period it asks for).
Nothing here does I/O before the first API call: ``describe()`` works without a cluster.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import shlex
import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from platforms import Platform, PlatformError, render
from supervisor import redact
from supervisor.config import KubernetesPlatform, KubernetesRestart
from supervisor.hostnames import resource_name_problem
from supervisor.hostnames import shown as shown_hostname
from supervisor.model import RestartResult, Target

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from supervisor.config import Config, GroupConfig

RBAC_HINT = "see deploy/kubernetes/rbac.yaml for the rights the supervisor needs"
RESTARTED_AT = "kubectl.kubernetes.io/restartedAt"
SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
CONNECT_TIMEOUT = 5.0
# a container waiting for one of these will not start by itself: the pod has failed
FAILED_WAITING = frozenset({
    "CrashLoopBackOff", "Error", "OOMKilled", "ImagePullBackOff", "ErrImagePull", "InvalidImageName",
    "CreateContainerConfigError", "CreateContainerError", "RunContainerError", "ContainerCannotRun",
})


def parse_time(value: str | None) -> float | None:
    """An API time (RFC 3339, ``2024-05-01T10:00:00Z``) as epoch seconds, or None."""
    if not value:
        return None
    try:
        return _dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def selector_text(selector: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(selector.items()))


def _api_message(body: Any) -> str:
    """The message of a Kubernetes ``Status`` error body (else the body's first line)."""
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    if not body:
        return ""
    try:
        doc = json.loads(body)
    except ValueError:
        return str(body).strip().splitlines()[0][:300] if str(body).strip() else ""
    if isinstance(doc, dict):
        return str(doc.get("message") or doc.get("reason") or "")[:500]
    return ""


class ApiError(PlatformError):
    """An API call answered with an error status (``status`` 0: no answer at all)."""

    def __init__(self, message: str, status: int = 0, api_message: str = ""):
        super().__init__(message)
        self.status = status
        self.api_message = api_message


def _state_of(pod: dict, container: str | None) -> tuple[str, str, float | None]:
    """(platform state, detail, since) of one pod (see the module's docstring)."""
    meta, st = pod.get("metadata") or {}, pod.get("status") or {}
    phase = st.get("phase") or "Unknown"
    if meta.get("deletionTimestamp"):
        return "stopping", f"being deleted (since {meta['deletionTimestamp']})", None
    statuses = st.get("containerStatuses") or []
    mine = statuses if container is None else [c for c in statuses if c.get("name") == container]
    crashed = []
    for c in mine:
        state, last = c.get("state") or {}, c.get("lastState") or {}
        restarts = c.get("restartCount", 0)
        term, wait = state.get("terminated"), state.get("waiting")
        if term:
            crashed.append((c, term, f"container {c.get('name')} terminated: {term.get('reason') or 'exited'}, "
                                     f"exit code {term.get('exitCode')}, {restarts} restart(s)"))
        elif wait and wait.get("reason") in FAILED_WAITING:
            lt = last.get("terminated") or {}
            why = f"{wait['reason']}"
            if lt:
                why += f" (last exit: {lt.get('reason') or 'exited'}, exit code {lt.get('exitCode')})"
            msg = (wait.get("message") or "").strip()
            if msg and not lt:
                why += f": {msg[:200]}"
            crashed.append((c, lt, f"container {c.get('name')} {why}, {restarts} restart(s)"))
    if phase in ("Failed", "Succeeded"):
        ends = [parse_time(((c.get("state") or {}).get("terminated") or {}).get("finishedAt")) for c in mine]
        ends = [e for e in ends if e is not None]
        why = st.get("reason") or phase
        msg = (st.get("message") or "").strip()
        detail = f"pod {phase}" + (f": {why}" if why != phase else "") + (f" ({msg[:200]})" if msg else "")
        return "exited", detail, max(ends) if ends else None
    if crashed:
        since = [parse_time(t.get("finishedAt")) for _, t, _ in crashed if t]
        since = [s for s in since if s is not None]
        return "crashed", "; ".join(d for _, _, d in crashed), (max(since) if since else None)
    if phase == "Running":
        if mine and all((c.get("state") or {}).get("running") for c in mine):
            ready = all(c.get("ready") for c in mine)
            return "running", "" if ready else "running, not ready", None
        if not mine and container is not None:
            return "unknown", f"pod has no container named {container!r}", None
        waiting = [((c.get("state") or {}).get("waiting") or {}).get("reason") or "waiting" for c in mine]
        return "restarting", ", ".join(waiting) or "starting", None
    if phase == "Pending":
        why = [((c.get("state") or {}).get("waiting") or {}).get("reason") for c in mine]
        why = [w for w in why if w]
        if not why:
            cond = next((c for c in st.get("conditions") or [] if c.get("type") == "PodScheduled"
                         and c.get("status") == "False"), None)
            if cond:
                why = [f"{cond.get('reason') or 'not scheduled'}: {(cond.get('message') or '')[:200]}"]
        return "restarting", "pending" + (f" ({', '.join(why)})" if why else ""), None
    return "unknown", f"pod phase {phase}", None


class Adapter(Platform):
    kind = "kubernetes"

    def __init__(self, config: Config):
        super().__init__(config)
        self.pcfg = config.platforms.kubernetes or KubernetesPlatform()
        self._lock = threading.Lock()
        self._client = None  # kubernetes.client.ApiClient, built at the first call
        self._in_cluster: bool | None = None
        # per group, from its last inventory (replaced whole each time: pods come and go):
        self._uids: dict[str, dict[str, str]] = {}  # pod -> its UID
        self._owners: dict[str, dict[str, str]] = {}  # pod -> its Deployment (for describe())
        self._watch_stop = threading.Event()
        self._watchers: list[threading.Thread] = []
        self._watch_lock = threading.Lock()
        self._watches: dict[str, Any] = {}  # namespace -> its open kubernetes.watch.Watch

    # ------------------------------------------------------------ config
    def _restart_cfg(self, group: GroupConfig) -> KubernetesRestart:
        r = group.restart
        if not isinstance(r, KubernetesRestart):
            raise PlatformError(f"group {group.name} does not restart through kubernetes")
        return r

    def namespace(self, group: GroupConfig) -> str:
        return self._restart_cfg(group).namespace or self.pcfg.namespace

    def pod_name(self, group: GroupConfig, hostname: str) -> str:
        """The pod a hostname names (restart.target filled); PlatformError when that is no valid
        pod name: nothing is asked of the API server for it."""
        template = self._restart_cfg(group).target
        try:
            name = render(template, hostname)
        except (KeyError, IndexError, ValueError) as e:
            raise PlatformError(f"cannot fill {template!r} for {shown_hostname(hostname)}: {e}") from None
        problem = resource_name_problem("kubernetes pod", name)
        if problem:
            raise PlatformError(f"refused {shown_hostname(hostname)}: {problem}")
        return name

    def _want_in_cluster(self) -> bool:
        if self.pcfg.in_cluster is not None:
            return self.pcfg.in_cluster
        if self.pcfg.kubeconfig or self.pcfg.context:
            return False
        return bool(os.environ.get("KUBERNETES_SERVICE_HOST")) and os.path.isfile(f"{SA_DIR}/token")

    def _api_client(self):
        with self._lock:
            if self._client is not None:
                return self._client
            try:
                from kubernetes import client, config
            except ImportError as e:  # pragma: no cover (checked by check-config)
                raise PlatformError(f"the kubernetes client is not installed ({e}): "
                                    "pip install 'celery-supervisor[kubernetes]'") from None
            conf = client.Configuration()
            in_cluster = self._want_in_cluster()
            try:
                if in_cluster:
                    config.load_incluster_config(client_configuration=conf)
                else:
                    path = os.path.expanduser(self.pcfg.kubeconfig) if self.pcfg.kubeconfig else None
                    if path is not None and not os.path.isfile(path):
                        raise FileNotFoundError(f"{path} does not exist or is not a file")
                    config.load_kube_config(config_file=path, context=self.pcfg.context,
                                            client_configuration=conf, persist_config=False)
            except Exception as e:  # ConfigException, a missing or unreadable file, bad YAML
                where = "in-cluster (service account)" if in_cluster else (
                    f"kubeconfig {self.pcfg.kubeconfig or os.environ.get('KUBECONFIG') or '~/.kube/config'}"
                    + (f", context {self.pcfg.context}" if self.pcfg.context else ""))
                raise PlatformError(redact.scrub(f"cannot load the Kubernetes config ({where}): {e}")) from None
            for v in (conf.api_key or {}).values():  # a bearer token must never reach a log or an alert
                if isinstance(v, str):
                    redact.register_secret(v.split(" ", 1)[-1] if v.lower().startswith("bearer ") else v)
            conf.retries = 0  # a failing call is retried on the next tick, not inside this one
            self._in_cluster = in_cluster
            self._client = client.ApiClient(configuration=conf)
            return self._client

    def _timeout(self, grace: float = 0.0) -> tuple[float, float]:
        read = max(self.pcfg.timeout, grace + 10.0)
        return (min(CONNECT_TIMEOUT, read), read)

    # ------------------------------------------------------------ calls
    def _call(self, what: str, fn, *args, grace: float = 0.0, **kw) -> tuple[int, bytes]:
        """One API call: (HTTP status, body). ApiError on an error status or no answer, with a
        message naming the verb and resource (``what``: "list pods in namespace ns")."""
        import urllib3
        from kubernetes.client import ApiException

        try:
            resp = fn(*args, _preload_content=False, _request_timeout=self._timeout(grace), **kw)
            return resp.status, resp.data
        except ApiException as e:
            status = int(e.status or 0)
            msg = _api_message(e.body)
            if status == 403:
                text = (f"Kubernetes API denied {what} (403 Forbidden: {msg or e.reason}); the supervisor's "
                        f"account lacks this right: {RBAC_HINT}")
            elif status == 401:
                who = "the pod's service account token" if self._in_cluster else "the kubeconfig user's credentials"
                text = (f"Kubernetes API rejected {who} while trying to {what} (401 Unauthorized"
                        f"{': ' + msg if msg and msg != 'Unauthorized' else ''}): missing, expired or wrong")
            elif status:
                text = f"Kubernetes API: {what} failed ({status} {e.reason or ''}: {msg})".replace(" :", ":")
            else:
                text = f"Kubernetes API: {what} failed ({e.reason or e})"
            raise ApiError(redact.scrub(text), status, msg) from None
        except (urllib3.exceptions.HTTPError, OSError) as e:  # refused, DNS, TLS, timeouts
            reason = getattr(e, "reason", None) or e
            host = getattr(getattr(self._client, "configuration", None), "host", "?")
            raise ApiError(redact.scrub(f"cannot reach the Kubernetes API at {host} to {what}: "
                                        f"{type(e).__name__}: {reason}")) from None
        except Exception as e:  # the client refused the call itself (e.g. its argument validation)
            raise ApiError(redact.scrub(f"Kubernetes client: {what} failed: {type(e).__name__}: {e}")) from None

    def _json(self, what: str, fn, *args, **kw) -> dict:
        _, data = self._call(what, fn, *args, **kw)
        try:
            doc = json.loads(data or b"{}")
        except ValueError as e:
            raise ApiError(f"Kubernetes API: {what}: the answer is not JSON ({e})") from None
        if not isinstance(doc, dict):
            raise ApiError(f"Kubernetes API: {what}: unexpected answer {str(doc)[:100]!r}")
        return doc

    def _core(self):
        from kubernetes import client

        return client.CoreV1Api(self._api_client())

    def _apps(self):
        from kubernetes import client

        return client.AppsV1Api(self._api_client())

    # ------------------------------------------------------------ inventory
    def list_pods(self, group: GroupConfig) -> list[dict]:
        r = self._restart_cfg(group)
        ns = self.namespace(group)
        kw = {"label_selector": selector_text(r.selector)} if r.selector else {}
        doc = self._json(f"list pods in namespace {ns}", self._core().list_namespaced_pod, ns, **kw)
        pods = [p for p in doc.get("items") or [] if isinstance(p, dict)]
        # the API server applies the selector; applied again here in case a proxy or a mock did not
        want = r.selector.items()
        return [p for p in pods if want <= ((p.get("metadata") or {}).get("labels") or {}).items()]

    def _guess_hostname(self, group: GroupConfig, pod_name: str) -> str | None:
        """The Celery hostname of a pod no known hostname maps to: <worker>@<pod> for the worker names
        the group's globs spell out (celery@web-* -> celery), when the template is the pod name."""
        if self._restart_cfg(group).target.replace("{node}", "") != "":
            return None
        workers = []
        for pattern in [*group.hostnames, *group.workers]:
            w, at, _ = pattern.partition("@")
            if at and w and not any(c in w for c in "*?[") and w not in workers:
                workers.append(w)
        for w in workers or ["celery"]:
            h = f"{w}@{pod_name}"
            if group.matches(h):
                return h
        return None

    def inventory(self, group: GroupConfig, known: Iterable[str] = (), *, seen=None) -> list[Target]:
        r = self._restart_cfg(group)
        ns = self.namespace(group)
        pods = self.list_pods(group)
        by_name = {(p.get("metadata") or {}).get("name"): p for p in pods}
        hostnames: dict[str, str] = {}
        refused: list[Target] = []
        for h in dict.fromkeys([*group.workers, *known]):
            try:
                hostnames.setdefault(self.pod_name(group, h), h)
            except PlatformError as e:  # a hostname no pod can be named after
                refused.append(Target(f"<{h}>", group.name, h, "unknown", str(e)))
        out: list[Target] = []
        uids: dict[str, str] = {}
        owners: dict[str, str] = {}
        known_owners = self._owners.get(group.name, {})
        for name, p in by_name.items():
            if not name:
                continue
            meta = p.get("metadata") or {}
            if meta.get("uid"):
                uids[name] = meta["uid"]
            owner = next((o for o in meta.get("ownerReferences") or [] if o.get("controller")), None)
            if name in known_owners:  # found through the ReplicaSet by a rollout
                owners[name] = known_owners[name]
            elif owner and owner.get("kind") == "ReplicaSet" and "-" in owner.get("name", ""):
                # a Deployment names its ReplicaSets <deployment>-<hash>: a guess for describe() only
                owners[name] = owner["name"].rsplit("-", 1)[0]
            state, detail, since = _state_of(p, r.container)
            hostname = hostnames.get(name) or self._guess_hostname(group, name)
            out.append(Target(name, group.name, hostname, state, detail, since))
        self._uids[group.name], self._owners[group.name] = uids, owners
        for pod_name, h in hostnames.items():
            if pod_name not in by_name:
                out.append(Target(pod_name, group.name, h, "missing",
                                  f"no pod {pod_name} in namespace {ns}"
                                  + (f" with labels {selector_text(r.selector)}" if r.selector else "")))
        return out + refused

    def target_for(self, group: GroupConfig, hostname: str) -> Target:
        return Target(self.pod_name(group, hostname), group.name, hostname, "unknown")

    # ------------------------------------------------------------ restart
    def restart(self, target: Target, reason: str) -> RestartResult:
        group = self.group(target.group)
        r = self._restart_cfg(group)
        ns = self.namespace(group)
        problem = resource_name_problem("kubernetes pod", target.id)
        if problem:  # never sent to the API server
            return RestartResult(False, f"refused: {problem}")
        if target.state == "stopping":
            return RestartResult(True, f"pod {target.id} is already being deleted; its controller replaces it",
                                 in_progress=True)
        try:
            if r.mode == "evict":
                return self._evict(group.name, target.id, ns, r)
            if r.mode == "rollout":
                return self._rollout(group.name, target.id, ns)
            return self._delete(group.name, target.id, ns, r)
        except ApiError as e:
            return RestartResult(False, str(e))

    def _delete_options(self, group: str, name: str, r: KubernetesRestart):
        from kubernetes import client

        uid = self._uids.get(group, {}).get(name)
        return client.V1DeleteOptions(grace_period_seconds=int(r.stop_timeout),
                                      preconditions=client.V1Preconditions(uid=uid) if uid else None)

    def _delete(self, group: str, name: str, ns: str, r: KubernetesRestart) -> RestartResult:
        grace = int(r.stop_timeout)
        try:
            self._call(f"delete pod {name} in namespace {ns}", self._core().delete_namespaced_pod, name, ns,
                       grace_period_seconds=grace, body=self._delete_options(group, name, r), grace=grace)
        except ApiError as e:
            if e.status == 404:
                return RestartResult(True, f"pod {name} is already gone; its controller creates a new one",
                                     in_progress=True)
            if e.status == 409:  # the UID precondition: a new pod of that name already replaced it
                return RestartResult(True, f"pod {name} was already replaced by a new pod of that name "
                                           f"({e.api_message})", in_progress=True)
            raise
        return RestartResult(True, f"deleted pod {name} in namespace {ns} (grace period {grace}s); "
                                   "its controller creates the replacement")

    def _evict(self, group: str, name: str, ns: str, r: KubernetesRestart) -> RestartResult:
        from kubernetes import client

        grace = int(r.stop_timeout)
        body = client.V1Eviction(api_version="policy/v1", kind="Eviction",
                                 metadata=client.V1ObjectMeta(name=name, namespace=ns),
                                 delete_options=self._delete_options(group, name, r))
        try:
            self._call(f"create pods/eviction for pod {name} in namespace {ns}",
                       self._core().create_namespaced_pod_eviction, name, ns, body, grace=grace)
        except ApiError as e:
            if e.status == 429:
                return RestartResult(False, f"eviction of pod {name} blocked by a PodDisruptionBudget; will retry "
                                            f"(not a failure of the pod: the budget allows no disruption now"
                                            f"{': ' + e.api_message if e.api_message else ''})")
            if e.status == 404:
                return RestartResult(True, f"pod {name} is already gone; its controller creates a new one",
                                     in_progress=True)
            if e.status == 409:
                return RestartResult(True, f"pod {name} was already replaced by a new pod of that name "
                                           f"({e.api_message})", in_progress=True)
            raise
        return RestartResult(True, f"evicted pod {name} in namespace {ns} (grace period {grace}s); "
                                   "its controller creates the replacement")

    def owning_deployment(self, group: str, name: str, ns: str) -> str:
        """Pod -> ReplicaSet -> Deployment, through the controller ownerReferences (two GETs)."""
        pod = self._json(f"get pod {name} in namespace {ns}", self._core().read_namespaced_pod, name, ns)
        owner = next((o for o in (pod.get("metadata") or {}).get("ownerReferences") or []
                      if o.get("controller")), None)
        if owner is None or owner.get("kind") != "ReplicaSet":
            what = f"{owner.get('kind')} {owner.get('name')}" if owner else "no controller"
            raise ApiError(f"pod {name} is not managed by a Deployment (its owner: {what}): "
                           "restart.mode rollout needs one; use mode delete or evict")
        rs = self._json(f"get replicasets {owner['name']} in namespace {ns}",
                        self._apps().read_namespaced_replica_set, owner["name"], ns)
        dep = next((o for o in (rs.get("metadata") or {}).get("ownerReferences") or []
                    if o.get("controller") and o.get("kind") == "Deployment"), None)
        if dep is None:
            raise ApiError(f"ReplicaSet {owner['name']} of pod {name} has no Deployment: "
                           "restart.mode rollout needs one; use mode delete or evict")
        self._owners.setdefault(group, {})[name] = dep["name"]
        return dep["name"]

    def _rollout(self, group: str, name: str, ns: str) -> RestartResult:
        try:
            dep_name = self.owning_deployment(group, name, ns)
        except ApiError as e:
            if e.status == 404:
                return RestartResult(True, f"pod {name} is already gone; its controller creates a new one",
                                     in_progress=True)
            raise
        what = f"deployment/{dep_name}"
        dep = self._json(f"get deployments {dep_name} in namespace {ns}",
                         self._apps().read_namespaced_deployment, dep_name, ns)
        spec, st, meta = dep.get("spec") or {}, dep.get("status") or {}, dep.get("metadata") or {}
        if spec.get("paused"):
            return RestartResult(False, f"{what} is paused (spec.paused): rollout restart skipped; resume it "
                                        f"with `kubectl rollout resume {what} -n {ns}` or restart the pod by hand")
        failed = next((c for c in st.get("conditions") or [] if c.get("type") == "Progressing"
                       and c.get("reason") == "ProgressDeadlineExceeded"), None)
        if failed is not None:
            return RestartResult(False, f"the last rollout of {what} failed (ProgressDeadlineExceeded: "
                                        f"{failed.get('message', '')}); not starting another")
        gen, observed = meta.get("generation") or 0, st.get("observedGeneration") or 0
        want, updated, have = spec.get("replicas", 1), st.get("updatedReplicas") or 0, st.get("replicas") or 0
        if observed < gen or updated < want or have > updated:
            return RestartResult(True, f"a rollout of {what} is already in progress (generation {gen}, observed "
                                       f"{observed}; {updated}/{want} replicas updated, {have} in all)",
                                 in_progress=True)
        now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        patch = {"spec": {"template": {"metadata": {"annotations": {RESTARTED_AT: now}}}}}
        self._call(f"patch deployments {dep_name} in namespace {ns}",
                   self._apps().patch_namespaced_deployment, dep_name, ns, patch)
        return RestartResult(True, f"rollout restart of {what} in namespace {ns} (for pod {name}): "
                                   f"{RESTARTED_AT}={now}")

    # ------------------------------------------------------------ logs
    def logs(self, target: Target, lines: int = 50) -> str:
        """``kubectl logs --previous --tail N``: the crashed container's last output; the current
        container's when none terminated (HTTP 400 from the API server) or its pod is gone."""
        if lines <= 0:
            return ""
        problem = resource_name_problem("kubernetes pod", target.id)
        if problem:
            raise PlatformError(f"refused: {problem}")
        group = self.group(target.group)
        r = self._restart_cfg(group)
        ns = self.namespace(group)
        kw: dict[str, Any] = {"tail_lines": int(lines)}
        if r.container:
            kw["container"] = r.container
        fn = self._core().read_namespaced_pod_log
        what = f"get pods/log of pod {target.id} in namespace {ns}"
        try:
            _, data = self._call(what, fn, target.id, ns, previous=True, **kw)
            text = data.decode("utf-8", "replace")
            if text.strip():
                return redact.scrub(text)
        except ApiError as e:
            if e.status == 404:
                return ""
            if e.status != 400:  # 400: "previous terminated container ... not found"
                raise
        try:
            _, data = self._call(what, fn, target.id, ns, **kw)
        except ApiError as e:
            if e.status in (400, 404):  # the container is not running yet, or the pod is gone
                return ""
            raise
        return redact.scrub(data.decode("utf-8", "replace"))

    # ------------------------------------------------------------ describe
    def describe(self, target: Target) -> str:
        group = self.group(target.group)
        r = self._restart_cfg(group)
        ns = self.namespace(group)
        ctx = f" --context {shlex.quote(self.pcfg.context)}" if self.pcfg.context else ""
        pod = shlex.quote(target.id)
        if r.mode == "rollout":
            dep = self._owners.get(target.group, {}).get(target.id)
            if dep is not None:
                return f"kubectl rollout restart deployment/{shlex.quote(dep)} -n {shlex.quote(ns)}{ctx}"
            return (f"kubectl rollout restart deployment/<the Deployment of pod {target.id}> -n {shlex.quote(ns)}"
                    f"{ctx}  # its name is in the pod's ownerReferences (ReplicaSet <deployment>-<hash>)")
        if r.mode == "evict":
            # kubectl has no command that evicts one pod (drain evicts a whole node's): POST the Eviction
            body = json.dumps({"apiVersion": "policy/v1", "kind": "Eviction",
                               "metadata": {"name": target.id, "namespace": ns}}, separators=(",", ":"))
            return (f"echo {shlex.quote(body)} | kubectl{ctx} create --raw "
                    f"/api/v1/namespaces/{ns}/pods/{target.id}/eviction -f -")
        return f"kubectl delete pod {pod} -n {shlex.quote(ns)}{ctx}"

    # ------------------------------------------------------------ deaths wake the loop (supervisor/wake.py)
    WATCH_SECONDS = 60  # one watch request lasts this long on the API server, then it is made again

    def watch(self, wake) -> None:
        """A pod watch per namespace of our groups (``GET .../pods?watch=true``, a thread each, with an
        API client of its own; made again after every end or error, with a capped backoff): a pod of
        ours deleted, or going from alive to dead (a container terminated or in back-off, the pod
        Failed or Succeeded) calls ``wake`` at once. The regular tick still reconciles: a change while
        no watch is open (between two watches) is seen by the tick, or by the next watch's ADDED
        events when the pod was alive at the last event seen."""
        if self._watchers:
            return
        spaces: dict[str, list[KubernetesRestart]] = {}
        for g in self.config.groups:
            if isinstance(g.restart, KubernetesRestart):
                spaces.setdefault(self.namespace(g), []).append(g.restart)
        for ns, restarts in spaces.items():
            t = threading.Thread(target=self._follow_pods, args=(ns, restarts, wake), name=f"kubernetes:watch:{ns}",
                                 daemon=True)
            self._watchers.append(t)
            t.start()

    def _follow_pods(self, ns: str, restarts: list[KubernetesRestart], wake) -> None:
        from supervisor.model import DEAD_STATES

        # one selector for the API server only when every group of the namespace has the same one; the
        # labels are checked here again in any case (a server or proxy may not apply it)
        selectors = {selector_text(r.selector) for r in restarts}
        kw = {"label_selector": selectors.pop()} if len(selectors) == 1 and "" not in selectors else {}
        dead: dict[str, bool] = {}  # pod (uid, else name) -> dead at its last event
        api = None
        backoff, denied = 0.5, False
        try:
            while not self._watch_stop.is_set():
                began, ended_cleanly = time.monotonic(), False
                before, dead = dead, {}  # a new watch lists every pod again (ADDED)
                try:
                    from kubernetes import client
                    from kubernetes import watch as k8s_watch

                    if api is None:
                        api = client.ApiClient(configuration=self._api_client().configuration)
                    w = k8s_watch.Watch()
                    with self._watch_lock:
                        if self._watch_stop.is_set():
                            break
                        self._watches[ns] = w  # close() stops it (shuts its socket down)
                    # deserialize=False: events are read as JSON, as every other answer here (an ERROR
                    # event, e.g. 410 Gone, then fails inside the client: this loop watches again)
                    for ev in w.stream(client.CoreV1Api(api).list_namespaced_pod, ns,
                                       timeout_seconds=self.WATCH_SECONDS, deserialize=False,
                                       _request_timeout=(CONNECT_TIMEOUT, self.WATCH_SECONDS + 10), **kw):
                        backoff = 0.5
                        if self._watch_stop.is_set():
                            break
                        kind = ev.get("type") if isinstance(ev, dict) else None
                        pod = ev.get("raw_object", ev.get("object")) if isinstance(ev, dict) else None
                        if kind not in ("ADDED", "MODIFIED", "DELETED") or not isinstance(pod, dict):
                            continue  # BOOKMARK
                        meta = pod.get("metadata") or {}
                        labels = meta.get("labels") or {}
                        mine = [r for r in restarts if all(labels.get(k) == v for k, v in r.selector.items())]
                        if not mine:
                            continue
                        key = str(meta.get("uid") or meta.get("name") or "")
                        name = redact.scrub(str(meta.get("name") or "?"))
                        if kind == "DELETED":
                            dead.pop(key, None)
                            wake(f"kubernetes: pod {name} in namespace {ns} deleted")
                            continue
                        states = [_state_of(pod, r.container) for r in mine]
                        now_dead = any(st in DEAD_STATES for st, _, _ in states)
                        # ADDED: wake only for a pod seen alive by the previous watch (the first one
                        # only learns the states); MODIFIED: for a pod that was not dead already
                        was = before.get(key) if kind == "ADDED" else dead.get(key, False)
                        dead[key] = now_dead
                        if now_dead and was is False:
                            why = next(d for st, d, _ in states if st in DEAD_STATES)
                            wake(f"kubernetes: pod {name} in namespace {ns}: {redact.scrub(why)}")
                    else:
                        ended_cleanly = True
                except Exception as e:  # the API server went away, a watch expired (410): watch again
                    if not self._watch_stop.is_set():
                        code = getattr(e, "status", 0)
                        if code in (401, 403):  # the tick goes on polling; say once what is missing
                            if not denied:
                                log.warning("pod watch in namespace %s refused (%s %s): deaths are seen at the "
                                            "next tick only; grant watch on pods: %s", ns, code,
                                            redact.scrub(str(getattr(e, "reason", "") or "")), RBAC_HINT)
                            denied, backoff = True, 60.0
                        else:
                            log.debug("pod watch in %s: %s: %s; watching again", ns, type(e).__name__,
                                      redact.scrub(str(e)))
                finally:
                    with self._watch_lock:
                        self._watches.pop(ns, None)
                if ended_cleanly and time.monotonic() - began > 1.0:
                    continue  # the server ended the watch (timeout_seconds): at once, a new one
                if self._watch_stop.wait(backoff):
                    break
                backoff = min(backoff * 2, 60.0 if denied else 10.0)
        finally:
            if api is not None:
                try:
                    api.close()
                except Exception:  # closing must not fail the thread
                    pass

    def close(self) -> None:
        self._watch_stop.set()
        # Watch.stop() shuts the socket of an open watch down, which unblocks its thread's read at once;
        # a watch whose request is not out yet cannot be stopped so: stop again until the threads end
        deadline = time.monotonic() + 5.0
        for t in self._watchers:
            while t.is_alive() and t is not threading.current_thread() and time.monotonic() < deadline:
                with self._watch_lock:
                    watches = list(self._watches.values())
                for w in watches:
                    try:
                        w.stop()
                    except Exception:
                        pass
                t.join(0.05)
        with self._lock:
            if self._client is not None:
                try:
                    self._client.close()
                except Exception:  # closing must not fail the shutdown
                    pass
                self._client = None
