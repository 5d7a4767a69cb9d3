"""A real, local Kubernetes control plane for the operator's tests (no downloads, no containers).

etcd, kube-apiserver (TLS, client certificates, RBAC, service-account tokens),
kube-controller-manager, kube-scheduler and kwok (fake nodes that turn scheduled pods Running and
Ready; on one more node, ``PROCESS_NODE``, tests/pod_processes.py runs the pods as real processes
instead) run as local processes on free loopback ports, from binaries that
``scripts/k8s-build.sh`` builds once per machine into ``~/.cache/splitserve/k8s/<version>/bin``.
The ``k8s`` fixture starts it once per test session and tears it down at the end.

Import the fixture into a test module with ``from k8s_env import k8s_fixture  # noqa: F401``
(its pytest name is ``k8s``).
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import ipaddress
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml
from splitserve.launcher.up import free_port

REPO = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = REPO / "scripts" / "k8s-build.sh"
T = TypeVar("T")

# The project's CRDs go in before kube-controller-manager starts: its garbage collector only
# rediscovers API resources every 30 s, and until it has seen a kind it does not collect that
# kind's children (a delete test would wait ~30 s). Real clusters install CRDs long before.
PREINSTALL_CRDS = [REPO / "charts" / "splitserve" / "crds"]
FAKE_NODES = 2
NODE_ALLOCATABLE = {"cpu": "32", "memory": "256Gi", "pods": "110", "nvidia.com/gpu": "8"}

# Every address the test cluster hands out lies in 127.0.0.0/8: no server of ours is at any
# other address, and the tests must never send traffic there (the operator scrapes ready router
# pods at their pod IP; kubectl logs/exec follow the node IP). A pod no process backs then
# refuses a connection at once. The suite also runs in a loopback-only network namespace
# (scripts/test.sh), so a regression fails instead of reaching the network.
POD_CIDR = "127.244.0.0/16"
NODE_IP = "127.240.0.1"
SERVICE_CIDR = "127.96.0.0/24"
SERVICE_IP = "127.96.0.1"  # the `kubernetes` Service: the first address of SERVICE_CIDR

# One more kwok node whose pods kwok leaves alone: tests/pod_processes.py runs them as real
# processes. It is tainted, so only pods of namespaces that ask for it land there
# (``process_backed_namespace``: the PodNodeSelector and PodTolerationRestriction admission
# plugins give every pod of such a namespace the node selector and the toleration).
PROCESS_NODE = "proc-node-0"
PROCESS_NODE_LABEL = ("splitserve.io/test-node", "process")
PROCESS_NODE_TAINT = "splitserve.io/process-backed"


# ---------------------------------------------------------------- binaries ----------------------
def bin_dir() -> Path:
    """The built binaries; builds them (minutes to tens of minutes, once) when missing."""
    env_dir = os.environ.get("SPLITSERVE_K8S_BIN")
    if env_dir:
        return Path(env_dir)
    got = subprocess.run([str(BUILD_SCRIPT), "--bin-dir"], capture_output=True, text=True)
    if got.returncode != 0:
        print("building the Kubernetes test binaries (scripts/k8s-build.sh)...", file=sys.stderr)
        got = subprocess.run([str(BUILD_SCRIPT)], capture_output=True, text=True, timeout=7200)
        if got.returncode != 0:
            raise RuntimeError(f"scripts/k8s-build.sh failed:\n{got.stderr[-4000:]}")
    return Path(got.stdout.strip().splitlines()[-1])


def die_with_parent() -> None:
    """preexec_fn: the child gets SIGKILL when the test process dies, even by SIGKILL, so a
    killed test run never leaves a control plane behind (Linux prctl PR_SET_PDEATHSIG)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG




# ---------------------------------------------------------------- certificates ------------------
@dataclass
class Pki:
    """CA, apiserver serving cert, admin client cert, service-account keys, as PEM files."""

    dir: Path
    ca_crt: Path = field(init=False)
    ca_key: Path = field(init=False)
    server_crt: Path = field(init=False)
    server_key: Path = field(init=False)
    admin_crt: Path = field(init=False)
    admin_key: Path = field(init=False)
    sa_key: Path = field(init=False)
    sa_pub: Path = field(init=False)

    def __post_init__(self) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec, rsa
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        def key_pem(key: Any) -> bytes:
            return key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )

        def name(cn: str, org: str | None = None) -> x509.Name:
            attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
            if org:
                attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
            return x509.Name(attrs)

        now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
        later = now + dt.timedelta(days=2)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = (
            x509.CertificateBuilder()
            .subject_name(name("splitserve-test-ca"))
            .issuer_name(name("splitserve-test-ca"))
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(later)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(True, False, False, False, False, True, True, False, False), True
            )
            .sign(ca_key, hashes.SHA256())
        )

        def leaf(subject: x509.Name, usage: Any, sans: list[Any] | None) -> tuple[bytes, bytes]:
            key = ec.generate_private_key(ec.SECP256R1())
            builder = (
                x509.CertificateBuilder()
                .subject_name(subject)
                .issuer_name(ca.subject)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now)
                .not_valid_after(later)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
                .add_extension(x509.ExtendedKeyUsage([usage]), False)
            )
            if sans:
                builder = builder.add_extension(x509.SubjectAlternativeName(sans), False)
            cert = builder.sign(ca_key, hashes.SHA256())
            return cert.public_bytes(serialization.Encoding.PEM), key_pem(key)

        dns = ["localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
               "kubernetes.default.svc.cluster.local"]  # fmt: skip
        sans = [x509.DNSName(d) for d in dns] + [
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address(SERVICE_IP)),
        ]
        server = leaf(name("kube-apiserver"), ExtendedKeyUsageOID.SERVER_AUTH, sans)
        admin = leaf(name("admin", "system:masters"), ExtendedKeyUsageOID.CLIENT_AUTH, None)
        sa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        files = {
            "ca_crt": ("ca.crt", ca.public_bytes(serialization.Encoding.PEM)),
            "ca_key": ("ca.key", key_pem(ca_key)),
            "server_crt": ("server.crt", server[0]),
            "server_key": ("server.key", server[1]),
            "admin_crt": ("admin.crt", admin[0]),
            "admin_key": ("admin.key", admin[1]),
            "sa_key": ("sa.key", key_pem(sa)),
            "sa_pub": (
                "sa.pub",
                sa.public_key().public_bytes(
                    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
                ),
            ),
        }
        self.dir.mkdir(parents=True, exist_ok=True)
        for attr, (fname, data) in files.items():
            path = self.dir / fname
            path.write_bytes(data)
            path.chmod(0o600)
            setattr(self, attr, path)


def kubeconfig(server: str, ca: Path, user: dict[str, str], context_ns: str = "default") -> str:
    """A kubeconfig (YAML text) for one user entry (client cert data or a token)."""
    return yaml.safe_dump(
        {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "local",
                    "cluster": {
                        "server": server,
                        "certificate-authority-data": base64.b64encode(ca.read_bytes()).decode(),
                    },
                }
            ],
            "users": [{"name": "user", "user": user}],
            "contexts": [
                {
                    "name": "local",
                    "context": {"cluster": "local", "user": "user", "namespace": context_ns},
                }
            ],  # fmt: skip
            "current-context": "local",
        }
    )


# ---------------------------------------------------------------- processes ---------------------
class Proc:
    """One control-plane process with its log file; stopped with SIGTERM then SIGKILL."""

    def __init__(self, name: str, argv: list[str], logdir: Path, env: dict[str, str]) -> None:
        self.name = name
        self.log_path = logdir / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, n: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-n:]
        return ""

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self._log.close()


def wait_until(what: str, fn: Callable[[], T], timeout: float, interval: float = 0.25) -> T:
    """Poll ``fn`` until it returns a truthy value; raise TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = fn()
            if value:
                return value
        except (OSError, ValueError, RuntimeError, subprocess.SubprocessError) as exc:
            last_exc = exc
        time.sleep(interval)
    raise TimeoutError(
        f"timed out after {timeout:.0f}s waiting for {what} (last error: {last_exc})"
    )


# ---------------------------------------------------------------- the cluster -------------------
class K8sEnv:
    """The running control plane: kubeconfig, kubectl/helm helpers and process handles."""

    def __init__(self, root: Path, bins: Path) -> None:
        self.root = root
        self.bins = bins
        self.pki = Pki(root / "pki")
        self.procs: list[Proc] = []
        self.api_port = free_port()
        self.server = f"https://127.0.0.1:{self.api_port}"
        self.kubeconfig = root / "admin.kubeconfig"
        self.kubeconfig.write_text(
            kubeconfig(
                self.server,
                self.pki.ca_crt,
                {
                    "client-certificate-data": base64.b64encode(
                        self.pki.admin_crt.read_bytes()
                    ).decode(),
                    "client-key-data": base64.b64encode(self.pki.admin_key.read_bytes()).decode(),
                },
            )
        )
        self.kubeconfig.chmod(0o600)
        self.env = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "PATH": f"{bins}{os.pathsep}{os.environ.get('PATH', '')}",
            "HOME": str(root / "home"),  # helm/kubectl caches stay inside the temp dir
            "HELM_CACHE_HOME": str(root / "helm-cache"),
            "HELM_CONFIG_HOME": str(root / "helm-config"),
            "HELM_DATA_HOME": str(root / "helm-data"),
        }
        (root / "home").mkdir(exist_ok=True)

    # -- lifecycle --
    def _start(self, name: str, argv: list[str]) -> Proc:
        proc = Proc(name, argv, self.root, self.env)
        self.procs.append(proc)
        return proc

    def start(self) -> None:
        b = self.bins
        client, peer = free_port(), free_port()
        etcd = self._start("etcd", [
            str(b / "etcd"), "--name", "default", "--data-dir", str(self.root / "etcd"),
            "--listen-client-urls", f"http://127.0.0.1:{client}",
            "--advertise-client-urls", f"http://127.0.0.1:{client}",
            "--listen-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-cluster", f"default=http://127.0.0.1:{peer}",
            "--listen-metrics-urls", f"http://127.0.0.1:{free_port()}",
            "--unsafe-no-fsync", "--log-level", "warn",
        ])  # fmt: skip
        wait_until("etcd", lambda: self._http_ok(f"http://127.0.0.1:{client}/health", etcd), 30)
        p = self.pki
        api = self._start("kube-apiserver", [
            str(b / "kube-apiserver"),
            f"--etcd-servers=http://127.0.0.1:{client}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
            f"--secure-port={self.api_port}",
            f"--tls-cert-file={p.server_crt}", f"--tls-private-key-file={p.server_key}",
            f"--client-ca-file={p.ca_crt}",
            f"--service-account-key-file={p.sa_pub}",
            f"--service-account-signing-key-file={p.sa_key}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            "--api-audiences=https://kubernetes.default.svc.cluster.local",
            "--authorization-mode=RBAC",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--endpoint-reconciler-type=none",
            "--allow-privileged=true",
            "--profiling=false",
            f"--cert-dir={self.root / 'apiserver-certs'}",
            "--enable-admission-plugins=PodNodeSelector,PodTolerationRestriction",
        ])  # fmt: skip
        wait_until("kube-apiserver /readyz", lambda: self._readyz(api), 90)
        for crds in PREINSTALL_CRDS:
            self.kubectl("apply", "--server-side", "-f", str(crds))
        kc = f"--kubeconfig={self.kubeconfig}"
        self._start("kube-controller-manager", [
            str(b / "kube-controller-manager"), kc, "--leader-elect=false",
            f"--service-account-private-key-file={p.sa_key}", f"--root-ca-file={p.ca_crt}",
            "--secure-port=0", "--controllers=*",
            "--concurrent-deployment-syncs=5", "--concurrent-replicaset-syncs=5",
        ])  # fmt: skip
        self._start("kube-scheduler", [
            str(b / "kube-scheduler"), kc, "--leader-elect=false", "--secure-port=0",
        ])  # fmt: skip
        self._start("kwok", [
            str(b / "kwok"), kc, f"--config={self.kwok_stages()}",
            "--manage-all-nodes=false",
            "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
            f"--node-ip={NODE_IP}", f"--cidr={POD_CIDR}",
            f"--server-address=127.0.0.1:{free_port()}",
        ])  # fmt: skip
        self.create_fake_nodes()
        wait_until("fake nodes Ready", self._nodes_ready, 60)
        wait_until(
            "default ServiceAccount",
            lambda: (
                self.kubectl(
                    "get", "serviceaccount", "default", "-n", "default", check=False
                ).returncode
                == 0
            ),
            60,
        )

    def kwok_stages(self) -> Path:
        """The built stage config, with every pod stage skipping the process-backed node (its
        pods' status and deletion belong to tests/pod_processes.py), written under the root."""
        docs = list(yaml.safe_load_all((self.bins / "kwok-stages.yaml").read_text()))
        for doc in docs:
            if doc and doc["spec"]["resourceRef"]["kind"] == "Pod":
                exprs = doc["spec"].setdefault("selector", {}).setdefault("matchExpressions", [])
                exprs.append({"key": ".spec.nodeName", "operator": "NotIn",
                              "values": [PROCESS_NODE]})  # fmt: skip
        path = self.root / "kwok-stages.yaml"
        path.write_text(yaml.safe_dump_all(docs))
        return path

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()

    def check_alive(self) -> None:
        dead = [p for p in self.procs if not p.alive()]
        if dead:
            raise RuntimeError(
                "control-plane process exited: "
                + "; ".join(f"{p.name} rc={p.proc.returncode}: {p.tail(1500)}" for p in dead)
            )

    # -- probes --
    def _http_ok(self, url: str, proc: Proc) -> bool:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited: {proc.tail()}")
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200

    def ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.pki.ca_crt))
        ctx.load_cert_chain(str(self.pki.admin_crt), str(self.pki.admin_key))
        return ctx

    def _readyz(self, api: Proc) -> bool:
        if not api.alive():
            raise RuntimeError(f"kube-apiserver exited: {api.tail()}")
        req = urllib.request.Request(f"{self.server}/readyz")
        with urllib.request.urlopen(req, timeout=3, context=self.ssl_context()) as resp:
            return resp.status == 200

    def _nodes_ready(self) -> bool:
        self.check_alive()
        nodes = self.get_json("nodes")["items"]
        ready = [
            n for n in nodes
            if any(c["type"] == "Ready" and c["status"] == "True"
                   for c in n.get("status", {}).get("conditions", []))
        ]  # fmt: skip
        return len(ready) >= FAKE_NODES + 1

    def create_fake_nodes(self) -> None:
        docs = []
        for i in range(FAKE_NODES + 1):
            docs.append({
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": f"kwok-node-{i}",
                    "annotations": {"kwok.x-k8s.io/node": "fake",
                                    "node.alpha.kubernetes.io/ttl": "0"},
                    "labels": {"type": "kwok", "kubernetes.io/hostname": f"kwok-node-{i}",
                               "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
                               "nvidia.com/gpu.present": "true"},
                },
                "status": {"allocatable": NODE_ALLOCATABLE, "capacity": NODE_ALLOCATABLE},
            })  # fmt: skip
        proc_node = docs[-1]  # the last one runs real processes
        proc_node["metadata"]["name"] = PROCESS_NODE
        proc_node["metadata"]["labels"] |= {"kubernetes.io/hostname": PROCESS_NODE,
                                            PROCESS_NODE_LABEL[0]: PROCESS_NODE_LABEL[1]}
        proc_node["spec"] = {"taints": [{"key": PROCESS_NODE_TAINT, "value": "true",
                                         "effect": "NoSchedule"}]}  # fmt: skip
        self.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs))

    # -- clients --
    def run(
        self,
        tool: str,
        *args: str,
        input: str | None = None,
        check: bool = True,
        timeout: float = 60,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess:
        argv = [str(self.bins / tool), *args]
        got = subprocess.run(argv, input=input, capture_output=True, text=True,
                             env=env or self.env, timeout=timeout)  # fmt: skip
        if check and got.returncode != 0:
            raise RuntimeError(f"{tool} {' '.join(args)} failed ({got.returncode}):\n"
                               f"{got.stdout[-2000:]}\n{got.stderr[-3000:]}")  # fmt: skip
        return got

    def kubectl(self, *args: str, **kw: Any) -> subprocess.CompletedProcess:
        return self.run("kubectl", *args, **kw)

    def helm(self, *args: str, **kw: Any) -> subprocess.CompletedProcess:
        return self.run("helm", *args, **kw)

    def get_json(self, *args: str) -> dict[str, Any]:
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)

    def apply(self, docs: list[dict[str, Any]] | dict[str, Any], namespace: str | None = None,
              check: bool = True) -> subprocess.CompletedProcess:  # fmt: skip
        docs = docs if isinstance(docs, list) else [docs]
        ns = ["-n", namespace] if namespace else []
        return self.kubectl("apply", *ns, "-f", "-", input=yaml.safe_dump_all(docs), check=check)

    def create_namespace(self, name: str) -> str:
        self.kubectl("create", "namespace", name)
        self._wait_default_serviceaccount(name)
        return name

    def _wait_default_serviceaccount(self, namespace: str) -> None:
        """Pods are refused until the controller-manager made the namespace's account."""
        wait_until(
            f"default ServiceAccount in {namespace}",
            lambda: self.kubectl("get", "serviceaccount", "default", "-n", namespace,
                                 check=False).returncode == 0,
            30,
        )  # fmt: skip

    def process_backed_namespace(self, name: str) -> str:
        """A namespace whose pods all land on the process-backed node (and run for real once a
        ``pod_processes.PodProcesses`` runs for that node)."""
        toleration = [{"key": PROCESS_NODE_TAINT, "operator": "Exists", "effect": "NoSchedule"}]
        self.apply({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "annotations": {
                "scheduler.alpha.kubernetes.io/node-selector": "=".join(PROCESS_NODE_LABEL),
                "scheduler.alpha.kubernetes.io/defaultTolerations": json.dumps(toleration),
            }},
        })  # fmt: skip
        self._wait_default_serviceaccount(name)
        return name

    def token_kubeconfig(self, namespace: str, serviceaccount: str, path: Path) -> Path:
        """A kubeconfig acting as a ServiceAccount (TokenRequest), to exercise real RBAC."""
        token = self.kubectl("create", "token", serviceaccount, "-n", namespace,
                             "--duration=2h").stdout.strip()  # fmt: skip
        path.write_text(kubeconfig(self.server, self.pki.ca_crt, {"token": token}, namespace))
        path.chmod(0o600)
        return path


_ENV: K8sEnv | None = None


@pytest.fixture(scope="session", name="k8s")
def k8s_fixture() -> Iterator[K8sEnv]:
    """The control plane, started once per session (skip: SPLITSERVE_SKIP_K8S=1)."""
    global _ENV
    if os.environ.get("SPLITSERVE_SKIP_K8S") == "1":
        pytest.skip("SPLITSERVE_SKIP_K8S=1")
    if _ENV is not None:  # imported into several modules: still one cluster
        yield _ENV
        return
    bins = bin_dir()
    # short path: unix sockets and long argv stay well inside limits
    root = Path(tempfile.mkdtemp(prefix="ss-k8s-"))
    env = K8sEnv(root, bins)
    try:
        env.start()
    except BaseException:
        env.stop()
        for p in env.procs:
            sys.stderr.write(f"--- {p.name}\n{p.tail()}\n")
        raise
    _ENV = env
    try:
        yield env
    finally:
        _ENV = None
        env.stop()
        if os.environ.get("SPLITSERVE_KEEP_K8S_LOGS") != "1":
            shutil.rmtree(root, ignore_errors=True)
