"""Process-backed pods (tests only): a small kubelet that runs a node's pods as local processes.

kwok only marks pods Ready; nothing runs in them. For the pods the scheduler puts on the
process-backed node (``k8s_env.PROCESS_NODE``, whose pods kwok's stages skip), this does what a
kubelet and a container runtime would, with the machine left as it was:

- gives the pod an address of its own in the pod CIDR (127.244.200.0 up: every 127.x address
  works on Linux with no set-up) and starts each container's process there: the container's
  command and args (or, for images without one, the image's entrypoint: ``IMAGE_ENTRYPOINTS``),
  its env
  (values, ``$(VAR)`` references, fieldRefs such as status.podIP, ConfigMap/Secret keys), its
  volumes as host folders (ConfigMaps and Secrets written out, emptyDirs, PVCs through their
  PV's hostPath mapped by ``host_paths``), every mount path in argv and env rewritten to its
  folder. ``splitserve`` runs as ``python -P -m splitserve.cli`` of this checkout, and a
  container listening on 0.0.0.0 (or, as redis-server does by default, on every interface)
  listens on the pod's address (in a pod's network namespace the two are the same);
  ``podnet/sitecustomize.py`` gives Python processes cluster DNS;
- runs each container's readiness probe (HTTP GET or TCP, at most every ``probe_period``
  seconds, sooner than the probe's own period so tests wait less) and patches the pod status:
  phase, podIP, conditions, container states and restart counts; restarts a process that exits;
- on deletion runs the preStop hook (exec or sleep), sends SIGTERM, waits out the grace period,
  SIGKILLs what is left and removes the pod, as a kubelet does;
- keeps Services working (``service_net.ServiceNet``): DNS names and ClusterIP proxies.

``PodProcesses(k8s, host_paths=...)`` is a context manager: the loop runs in a thread.
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import json
import logging
import math
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from k8s_env import NODE_IP, PROCESS_NODE, SERVICE_IP, K8sEnv, die_with_parent, wait_until
from service_net import ServiceNet

log = logging.getLogger("pod_processes")
PODNET = Path(__file__).resolve().parent / "podnet"
FIRST_POD_IP = ipaddress.ip_address("127.244.200.0")  # kwok hands out the low end of the CIDR


# What an image runs when the container gives no command (its ENTRYPOINT/CMD).
IMAGE_ENTRYPOINTS = {"redis": ["redis-server"]}
# Servers that listen on every interface unless told otherwise: in a pod that means its own
# address (its network namespace's only one), so here they are told so.
POD_ADDRESS_ARGS = {"redis-server": ["--bind", "{pod_ip}", "--protected-mode", "no"]}


class PodSetupError(RuntimeError):
    """The pod cannot start yet (a volume or reference is missing); retried next tick."""


# ---------------------------------------------------------------- API client --------------------
class Api:
    """The few API calls a kubelet makes, over HTTPS with the admin client certificate."""

    def __init__(self, server: str, context: ssl.SSLContext) -> None:
        self.server, self.context = server, context

    def call(self, method: str, path: str, body: Any = None,
             content_type: str = "application/json") -> dict[str, Any]:  # fmt: skip
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.server + path, data=data, method=method,
                                     headers={"Content-Type": content_type})  # fmt: skip
        with urllib.request.urlopen(req, timeout=10, context=self.context) as resp:
            return json.load(resp)

    def get(self, path: str) -> dict[str, Any]:
        return self.call("GET", path)

    def items(self, path: str) -> list[dict[str, Any]]:
        return self.get(path)["items"]

    def patch_status(self, ns: str, name: str, status: dict[str, Any]) -> None:
        self.call("PATCH", f"/api/v1/namespaces/{ns}/pods/{name}/status", {"status": status},
                  "application/merge-patch+json")  # fmt: skip

    def remove_pod(self, ns: str, name: str, uid: str) -> None:
        """The kubelet's final delete (grace 0), for this very pod (uid precondition)."""
        body = {"gracePeriodSeconds": 0, "preconditions": {"uid": uid}}
        with contextlib.suppress(urllib.error.HTTPError):  # already gone or replaced
            self.call("DELETE", f"/api/v1/namespaces/{ns}/pods/{name}", body)


# ---------------------------------------------------------------- pod spec -> host --------------
_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion: known names replaced, unknown ones kept, ``$$`` -> ``$``."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return _REF.sub(sub, value)


def field_ref(pod: dict[str, Any], path: str, pod_ip: str) -> str:
    known = {
        "metadata.name": pod["metadata"]["name"],
        "metadata.namespace": pod["metadata"]["namespace"],
        "metadata.uid": pod["metadata"]["uid"],
        "spec.nodeName": pod["spec"].get("nodeName", ""),
        "spec.serviceAccountName": pod["spec"].get("serviceAccountName", "default"),
        "status.podIP": pod_ip,
        "status.hostIP": NODE_IP,
    }
    if path not in known:
        raise PodSetupError(f"fieldRef {path} is not supported by the test kubelet")
    return known[path]


def map_paths(value: str, mounts: list[tuple[str, Path]]) -> str:
    """Every mount path in ``value`` (at a path boundary) replaced by its host folder, in one
    pass (a host folder may itself contain a mount path such as /tmp)."""
    if not mounts:
        return value
    hosts = dict(mounts)
    alternatives = "|".join(re.escape(m) for m in sorted(hosts, key=len, reverse=True))
    pattern = rf"(?<![\w./-])({alternatives})(?=/|$|[^\w.-])"
    return re.sub(pattern, lambda m: str(hosts[m.group(1)]), value)


def cpu_threads(container: dict[str, Any]) -> int:
    """Threads a process gets: its CPU limit, else its request (a pod would get that share)."""
    resources = container.get("resources") or {}
    cpu = (resources.get("limits") or {}).get("cpu") or (resources.get("requests") or {}).get("cpu")
    if not cpu:
        return 1
    value = float(cpu[:-1]) / 1000 if str(cpu).endswith("m") else float(cpu)
    return max(1, math.ceil(value))


@dataclass
class Probe:
    """One container's readiness probe and its running state."""

    spec: dict[str, Any] | None
    ports: dict[str, int]
    next_at: float = 0.0
    failures: int = 0
    successes: int = 0
    ready: bool = False

    def port(self, action: dict[str, Any]) -> int:
        port = action["port"]
        return self.ports[port] if isinstance(port, str) else int(port)

    def check(self, pod_ip: str) -> bool:
        spec = self.spec or {}
        timeout = min(float(spec.get("timeoutSeconds", 1)), 3.0)
        try:
            if "httpGet" in spec:
                get = spec["httpGet"]
                url = f"http://{pod_ip}:{self.port(get)}{get.get('path', '/')}"
                with urllib.request.urlopen(url, timeout=timeout) as resp:
                    return 200 <= resp.status < 400
            if "tcpSocket" in spec:
                socket.create_connection((pod_ip, self.port(spec["tcpSocket"])), timeout).close()
                return True
        except (OSError, ValueError):
            return False
        return True  # no probe (or an exec probe, not run here): ready once running

    def tick(self, pod_ip: str, now: float, period: float) -> None:
        if now < self.next_at:
            return
        spec = self.spec or {}
        self.next_at = now + min(float(spec.get("periodSeconds", 10)), period)
        if self.check(pod_ip):
            self.successes, self.failures = self.successes + 1, 0
            if self.successes >= int(spec.get("successThreshold", 1)):
                self.ready = True
        else:
            self.successes, self.failures = 0, self.failures + 1
            if self.failures >= int(spec.get("failureThreshold", 3)):
                self.ready = False


class Container:
    """One container as a process group, restarted when it exits (restartPolicy Always)."""

    def __init__(self, spec: dict[str, Any], argv: list[str], env: dict[str, str],
                 mounts: list[tuple[str, Path]], cwd: Path, log_path: Path,
                 pod_ip: str) -> None:  # fmt: skip
        self.spec, self.argv, self.env, self.cwd = spec, argv, env, cwd
        self.mounts = mounts  # hooks run with the same paths mapped
        self.name = spec["name"]
        self.log_path = log_path
        self.pod_ip = pod_ip
        ports = {p["name"]: int(p["containerPort"]) for p in spec.get("ports") or [] if "name" in p}
        self.probe = Probe(spec.get("readinessProbe"), ports)
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self.started_at = ""
        self.restart_at = 0.0

    def start(self) -> None:
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                self.argv, env=self.env, cwd=self.cwd, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=die_with_parent,
            )  # fmt: skip
        self.started_at = now_rfc3339()
        self.probe = Probe(self.probe.spec, self.probe.ports, next_at=time.monotonic()
                           + float((self.probe.spec or {}).get("initialDelaySeconds", 0)))  # fmt: skip

    def supervise(self, probe_period: float) -> None:
        """Restart an exited process (with a growing back-off), probe a running one."""
        now = time.monotonic()
        if self.proc is not None and self.proc.poll() is not None:
            log.warning("container %s at %s exited with %s (log: %s)", self.name, self.pod_ip,
                        self.proc.returncode, self.log_path)  # fmt: skip
            self.proc, self.probe.ready = None, False
            self.restarts += 1
            self.restart_at = now + min(10.0, 0.5 * 2**self.restarts)
        if self.proc is None:
            if now >= self.restart_at:
                self.start()
            return
        self.probe.tick(self.pod_ip, now, probe_period)

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)

    def wait(self, timeout: float) -> bool:
        if self.proc is None:
            return True
        try:
            self.proc.wait(max(0.0, timeout))
            return True
        except subprocess.TimeoutExpired:
            return False

    def status(self) -> dict[str, Any]:
        running = self.proc is not None and self.proc.poll() is None
        state = ({"running": {"startedAt": self.started_at}} if running
                 else {"waiting": {"reason": "CrashLoopBackOff" if self.restarts else
                                   "ContainerCreating"}})  # fmt: skip
        return {
            "name": self.name, "image": self.spec.get("image", ""), "imageID": "",
            "containerID": f"process://{self.proc.pid}" if running and self.proc else "",
            "ready": running and self.probe.ready, "started": running,
            "restartCount": self.restarts, "state": state,
        }  # fmt: skip


def now_rfc3339() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# ---------------------------------------------------------------- one pod -----------------------
class PodRuntime:
    """One pod on this node: its folders, address and container processes."""

    def __init__(self, pod: dict[str, Any], pod_ip: str, root: Path, api: Api,
                 host_paths: dict[str, Path], dns_map: Path) -> None:  # fmt: skip
        meta = pod["metadata"]
        self.pod, self.ns, self.name, self.uid = pod, meta["namespace"], meta["name"], meta["uid"]
        self.ip, self.api, self.host_paths, self.dns_map = pod_ip, api, host_paths, dns_map
        self.dir = root / f"{self.ns}_{self.name}"
        self.containers: list[Container] = []
        self.terminating: threading.Thread | None = None
        self.posted: dict[str, Any] | None = None
        self.started = now_rfc3339()

    # -- setup --
    def _volume(self, vol: dict[str, Any]) -> Path:
        """A pod volume as a host folder."""
        path = self.dir / "volumes" / vol["name"]
        path.mkdir(parents=True, exist_ok=True)
        if "configMap" in vol or "secret" in vol:
            kind, name = (("configmaps", vol["configMap"]["name"]) if "configMap" in vol
                          else ("secrets", vol["secret"]["secretName"]))  # fmt: skip
            try:
                obj = self.api.get(f"/api/v1/namespaces/{self.ns}/{kind}/{name}")
            except urllib.error.HTTPError as exc:
                raise PodSetupError(f"volume {vol['name']}: {kind} {name}: {exc}") from exc
            source = vol.get("configMap") or vol["secret"]
            data = obj.get("data") or {}
            items = source.get("items") or [{"key": k, "path": k} for k in data]
            for item in items:
                if item["key"] not in data:
                    raise PodSetupError(f"volume {vol['name']}: {name} has no key {item['key']}")
                text = data[item["key"]]
                target = path / item["path"]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(base64.b64decode(text) if kind == "secrets" else text.encode())
                target.chmod(item.get("mode", source.get("defaultMode", 0o644)))
            return path
        if "persistentVolumeClaim" in vol:
            return self._host_path(self._claim_path(vol["persistentVolumeClaim"]["claimName"]))
        if "hostPath" in vol:
            return self._host_path(vol["hostPath"]["path"])
        if "emptyDir" in vol:
            return path
        raise PodSetupError(f"volume {vol['name']}: type not supported by the test kubelet")

    def _claim_path(self, claim: str) -> str:
        try:
            pvc = self.api.get(f"/api/v1/namespaces/{self.ns}/persistentvolumeclaims/{claim}")
            pv = self.api.get(f"/api/v1/persistentvolumes/{pvc['spec']['volumeName']}")
        except (urllib.error.HTTPError, KeyError) as exc:
            raise PodSetupError(f"PVC {claim} is not bound: {exc}") from exc
        if "hostPath" not in pv["spec"]:
            raise PodSetupError(f"PVC {claim}: only hostPath volumes can be mapped")
        return pv["spec"]["hostPath"]["path"]

    def _host_path(self, path: str) -> Path:
        for prefix, host in sorted(self.host_paths.items(), key=lambda kv: -len(kv[0])):
            if path == prefix or path.startswith(prefix.rstrip("/") + "/"):
                return host / path[len(prefix):].lstrip("/")
        raise PodSetupError(f"hostPath {path} has no host folder (PodProcesses host_paths)")

    def _mounts(self, container: dict[str, Any], volumes: dict[str, Path]) -> list[tuple[str, Path]]:
        mounts = [(m["mountPath"], volumes[m["name"]] / m.get("subPath", ""))
                  for m in container.get("volumeMounts") or []]  # fmt: skip
        return sorted(mounts, key=lambda m: -len(m[0]))

    def _env(self, container: dict[str, Any], mounts: list[tuple[str, Path]]) -> dict[str, str]:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PYTHONPATH": os.pathsep.join(
                [str(PODNET), *filter(None, [os.environ.get("PYTHONPATH")])]
            ),
            "PYTHONSAFEPATH": "1",
            "HOSTNAME": self.name,
            "KUBERNETES_SERVICE_HOST": SERVICE_IP,
            "KUBERNETES_SERVICE_PORT": "443",
            "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": str(cpu_threads(container)),
            "SPLITSERVE_PODNET_MAP": str(self.dns_map),
            "SPLITSERVE_PODNET_NAMESPACE": self.ns,
            "SPLITSERVE_PODNET_POD_IP": self.ip,
        }
        for var in container.get("env") or []:
            env[var["name"]] = map_paths(self._env_value(var, env), mounts)
        return env

    def _env_value(self, var: dict[str, Any], env: dict[str, str]) -> str:
        if "value" in var:
            return expand(var["value"], env)
        source = var.get("valueFrom") or {}
        if "fieldRef" in source:
            return field_ref(self.pod, source["fieldRef"]["fieldPath"], self.ip)
        for key, kind in (("configMapKeyRef", "configmaps"), ("secretKeyRef", "secrets")):
            if key in source:
                ref = source[key]
                try:
                    obj = self.api.get(f"/api/v1/namespaces/{self.ns}/{kind}/{ref['name']}")
                    text = (obj.get("data") or {})[ref["key"]]
                except (urllib.error.HTTPError, KeyError) as exc:
                    if ref.get("optional"):
                        return ""
                    raise PodSetupError(f"env {var['name']}: {exc}") from exc
                return base64.b64decode(text).decode() if kind == "secrets" else text
        raise PodSetupError(f"env {var['name']}: source not supported by the test kubelet")

    def argv(self, container: dict[str, Any], env: dict[str, str],
             mounts: list[tuple[str, Path]], command: list[str] | None = None) -> list[str]:  # fmt: skip
        """The host command line of a container (or of a hook's ``command``)."""
        if command is None:
            image = container.get("image", "").rsplit("/", 1)[-1].split(":")[0]
            entry = container.get("command") or IMAGE_ENTRYPOINTS.get(image, [])
            command = [*entry, *(container.get("args") or [])]
            if not command:
                raise PodSetupError(f"container {container['name']}: no command and no known image")
            extra = POD_ADDRESS_ARGS.get(Path(command[0]).name, [])
            command += [a.format(pod_ip=self.ip) for a in extra]
        argv = [map_paths(expand(a, env), mounts) for a in command]
        argv = [self.ip if a == "0.0.0.0" else a for a in argv]
        if argv and argv[0] == "splitserve":
            argv = [sys.executable, "-P", "-m", "splitserve.cli", *argv[1:]]
        return argv

    def start(self) -> None:
        """Make the volumes and start every container (raises PodSetupError: retry later)."""
        volumes = {v["name"]: self._volume(v) for v in self.pod["spec"].get("volumes") or []}
        (self.dir / "logs").mkdir(parents=True, exist_ok=True)
        for spec in self.pod["spec"]["containers"]:
            mounts = self._mounts(spec, volumes)
            env = self._env(spec, mounts)
            self.containers.append(Container(
                spec, self.argv(spec, env, mounts), env, mounts, self.dir,
                self.dir / "logs" / f"{spec['name']}.log", self.ip,
            ))  # fmt: skip
        for container in self.containers:
            container.start()
        log.info("pod %s/%s started at %s", self.ns, self.name, self.ip)

    # -- running --
    def supervise(self, probe_period: float) -> None:
        for container in self.containers:
            container.supervise(probe_period)

    def status(self) -> dict[str, Any]:
        statuses = [c.status() for c in self.containers]
        ready = "True" if statuses and all(s["ready"] for s in statuses) else "False"
        conditions = [{"type": t, "status": s} for t, s in (
            ("PodScheduled", "True"), ("Initialized", "True"),
            ("ContainersReady", ready), ("Ready", ready))]  # fmt: skip
        return {
            "phase": "Running", "startTime": self.started,
            "podIP": self.ip, "podIPs": [{"ip": self.ip}],
            "hostIP": NODE_IP, "hostIPs": [{"ip": NODE_IP}],
            "conditions": conditions, "containerStatuses": statuses,
        }  # fmt: skip

    def post_status(self) -> None:
        status = self.status()
        if status == self.posted:
            return
        stamp = now_rfc3339()
        for cond in status["conditions"]:
            cond["lastTransitionTime"] = stamp
        with contextlib.suppress(urllib.error.HTTPError):  # deleted meanwhile: next tick sees it
            self.api.patch_status(self.ns, self.name, status)
            self.posted = self.status()

    # -- stopping --
    def _pre_stop(self, container: Container, budget: float) -> None:
        hook = ((container.spec.get("lifecycle") or {}).get("preStop")) or {}
        if "sleep" in hook:
            time.sleep(min(budget, float(hook["sleep"]["seconds"])))
        elif "exec" in hook:
            argv = self.argv(container.spec, container.env, container.mounts,
                             hook["exec"]["command"])
            with open(container.log_path, "ab") as out, contextlib.suppress(
                subprocess.TimeoutExpired
            ):
                subprocess.run(argv, env=container.env, cwd=self.dir, stdout=out,
                               stderr=subprocess.STDOUT, timeout=budget)  # fmt: skip

    def terminate(self, grace: float) -> None:
        """preStop, SIGTERM, the rest of the grace period, SIGKILL; then remove the pod."""
        deadline = time.monotonic() + grace
        hooks = [threading.Thread(target=self._pre_stop, args=(c, grace)) for c in self.containers]
        for hook in hooks:
            hook.start()
        for hook in hooks:
            hook.join(max(0.0, deadline - time.monotonic()))
        self.kill(max(0.0, deadline - time.monotonic()))
        self.api.remove_pod(self.ns, self.name, self.uid)
        log.info("pod %s/%s stopped", self.ns, self.name)

    def kill(self, grace: float) -> None:
        deadline = time.monotonic() + grace
        for container in self.containers:
            container.signal(signal.SIGTERM)
        for container in self.containers:
            if not container.wait(deadline - time.monotonic()):
                container.signal(signal.SIGKILL)
                container.wait(5)

    def logs(self) -> str:
        return "".join(f"--- {c.log_path}\n{c.log_path.read_text(errors='replace')[-4000:]}\n"
                       for c in self.containers if c.log_path.exists())  # fmt: skip


# ---------------------------------------------------------------- the node ----------------------
class PodProcesses:
    """The kubelet loop for ``node`` (a thread), with its Services; a context manager."""

    def __init__(self, k8s: K8sEnv, host_paths: dict[str, Path], node: str = PROCESS_NODE,
                 probe_period: float = 1.0, tick: float = 0.3) -> None:  # fmt: skip
        self.api = Api(k8s.server, k8s.ssl_context())
        self.node, self.host_paths = node, host_paths
        self.probe_period, self.tick = probe_period, tick
        self.root = k8s.root / f"pods-{node}"
        self.root.mkdir(exist_ok=True)
        self.net = ServiceNet(self.root / "dns.json")
        self.pods: dict[str, PodRuntime] = {}
        self.gone: list[PodRuntime] = []
        self._next_ip = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"kubelet {node}", daemon=True)
        self.errors: list[str] = []

    def __enter__(self) -> PodProcesses:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        for runtime in [*self.pods.values(), *self.gone]:
            runtime.kill(3)
        self.net.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._sync()
            except (OSError, ValueError, KeyError) as exc:  # API restarts, races: next tick
                log.warning("kubelet tick failed: %r", exc)
                self.errors.append(repr(exc))
            self._stop.wait(self.tick)

    def _allocate_ip(self) -> str:
        self._next_ip += 1
        return str(FIRST_POD_IP + self._next_ip)

    def _sync(self) -> None:
        selector = urllib.parse.quote(f"spec.nodeName={self.node}")
        pods = self.api.items(f"/api/v1/pods?fieldSelector={selector}")
        seen = set()
        for pod in pods:
            uid = pod["metadata"]["uid"]
            seen.add(uid)
            runtime = self.pods.get(uid)
            if pod["metadata"].get("deletionTimestamp"):
                self._delete(pod, runtime)
                continue
            if runtime is None:
                runtime = self._start(pod)
                if runtime is None:
                    continue
            runtime.supervise(self.probe_period)
            runtime.post_status()
        for uid in set(self.pods) - seen:  # removed without us (force delete): stop at once
            runtime = self.pods.pop(uid)
            if runtime.terminating is None:
                runtime.kill(2)
        self.net.sync(self.api.items("/api/v1/services"), pods)

    def _start(self, pod: dict[str, Any]) -> PodRuntime | None:
        runtime = PodRuntime(pod, self._allocate_ip(), self.root, self.api, self.host_paths,
                             self.net.map_path)  # fmt: skip
        try:
            runtime.start()
        except PodSetupError as exc:
            log.warning("pod %s/%s cannot start yet: %s", runtime.ns, runtime.name, exc)
            runtime.kill(1)
            return None
        self.pods[runtime.uid] = runtime
        return runtime

    def _delete(self, pod: dict[str, Any], runtime: PodRuntime | None) -> None:
        meta = pod["metadata"]
        if runtime is None:  # never started here: nothing to stop
            self.api.remove_pod(meta["namespace"], meta["name"], meta["uid"])
            return
        if runtime.terminating is None:
            grace = float(meta.get("deletionGracePeriodSeconds")
                          or pod["spec"].get("terminationGracePeriodSeconds", 30))  # fmt: skip
            runtime.terminating = threading.Thread(target=runtime.terminate, args=(grace,),
                                                   daemon=True)  # fmt: skip
            runtime.terminating.start()
            self.gone.append(runtime)

    # -- for tests --
    def wait_reachable(self, ip: str, port: int, timeout: float = 30) -> None:
        """Wait until ``ip:port`` (a ClusterIP) accepts connections: its proxy follows the pods'
        readiness one tick later, as kube-proxy follows EndpointSlices."""

        def accepts() -> bool:
            socket.create_connection((ip, port), timeout=1).close()
            return True

        wait_until(f"{ip}:{port} reachable", accepts, timeout)

    def runtime(self, ns: str, name: str) -> PodRuntime | None:
        return next((r for r in [*self.pods.values(), *self.gone]
                     if (r.ns, r.name) == (ns, name)), None)  # fmt: skip

    def logs(self, ns: str | None = None) -> str:
        return "".join(r.logs() for r in {id(r): r for r in [*self.pods.values(), *self.gone]}
                       .values() if ns is None or r.ns == ns)  # fmt: skip
