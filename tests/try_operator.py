"""Try the operator on this machine: the local control plane, with process-backed pods.

``bash scripts/try-operator.sh`` runs this. It starts what the tests use (tests/k8s_env.py:
etcd, kube-apiserver, controller-manager, scheduler, kwok; tests/pod_processes.py: pods of the
``demo`` namespace run as real processes at 127.244.200.x, Services at their ClusterIPs), the
operator for that namespace, a PersistentVolume ``models`` holding a small random-weight model at
``tiny-qwen2/``, and prints how to reach it all with kubectl and curl. Ctrl-C stops everything and
removes its temp folder. Nothing on the machine changes: every address is on loopback.

``--apply`` also applies ``charts/splitserve/examples/inferenceservice.yaml`` and waits for it;
``--check`` does that, sends one completion through the router Service and exits (a smoke test).
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from k8s_env import K8sEnv, bin_dir, wait_until
from pod_processes import PodProcesses
from splitserve.engine.demo_model import DemoModelSpec, init_demo_model
from test_operator_k8s import EXAMPLE, OperatorProcess, make_model_volume, wait_ready

NAMESPACE = "demo"


def instructions(k8s: K8sEnv) -> str:
    return f"""
The control plane is up; pods in namespace {NAMESPACE!r} run as real processes.

  export KUBECONFIG={k8s.kubeconfig} PATH={k8s.bins}:$PATH
  kubectl apply -n {NAMESPACE} -f {EXAMPLE}
  kubectl get infsvc -n {NAMESPACE} -w          # Ready True, then TTFT/TPOT once traffic flows
  IP=$(kubectl get svc tiny-router -n {NAMESPACE} -o jsonpath='{{.spec.clusterIP}}')
  curl -s http://$IP:8000/v1/completions -H 'Content-Type: application/json' \\
    -d '{{"model": "tiny-qwen2", "prompt": "hello world", "max_tokens": 16}}'

Pod logs: {k8s.root}/pods-*/<namespace>_<pod>/logs/; the operator's: {k8s.root}/operator-*.log
Ctrl-C stops everything.
"""


def complete(router_ip: str, prompt: str) -> dict:
    body = json.dumps({"model": "tiny-qwen2", "prompt": prompt, "max_tokens": 16}).encode()
    req = urllib.request.Request(f"http://{router_ip}:8000/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.load(resp)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--apply", action="store_true", help="apply the chart's example too")
    parser.add_argument("--check", action="store_true",
                        help="apply, send one completion, exit")  # fmt: skip
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="ss-try-"))
    k8s = K8sEnv(root, bin_dir())
    # Ctrl-C and SIGTERM both clean up (SIGINT explicitly: a shell's background job starts
    # with it ignored)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        print(f"starting the control plane in {root} ...", flush=True)
        k8s.start()
        models = root / "srv-models"
        init_demo_model(models / "tiny-qwen2", DemoModelSpec(model_type="qwen2", seed=1))
        k8s.process_backed_namespace(NAMESPACE)
        make_model_volume(k8s, NAMESPACE)
        op = OperatorProcess(k8s, NAMESPACE, env={"SPLITSERVE_SLO_TICK_SECONDS": "5"}).start()
        with PodProcesses(k8s, {"/srv/models": models}) as node:
            if args.apply or args.check:
                k8s.kubectl("apply", "-n", NAMESPACE, "-f", str(EXAMPLE))
                wait_ready(k8s, op, NAMESPACE, "tiny", timeout=300)
            if args.check:
                ip = k8s.get_json("service", "tiny-router", "-n", NAMESPACE)["spec"]["clusterIP"]
                node.wait_reachable(ip, 8000)
                got = complete(ip, "hello world")
                print(json.dumps(got["choices"][0], indent=1))
                k8s.kubectl("delete", "infsvc", "tiny", "-n", NAMESPACE, "--wait=true",
                            timeout=200)  # fmt: skip
                wait_until("pods stopped", lambda: not k8s.get_json(
                    "pods", "-n", NAMESPACE)["items"], 120)  # fmt: skip
                return 0
            print(instructions(k8s), flush=True)
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        print("stopping ...", file=sys.stderr)
        if "op" in locals():
            op.stop()
        k8s.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
