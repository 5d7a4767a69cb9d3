#!/usr/bin/env bash
# Build a local Kubernetes control plane for the operator's tests, from the Go module proxy only.
#
# Why: GitHub releases, dl.k8s.io and container registries are out of reach here, so envtest's
# binary download and kind images cannot be used. The Go module proxy is reachable, so we build
# etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, kwok and helm from source
# into a cache outside the repository, keyed by version. A second run is a no-op.
#
# k8s.io/kubernetes replaces its staging modules (k8s.io/api, k8s.io/client-go, ...) with local
# folders, so `go install k8s.io/kubernetes/cmd/...@v1.x` is refused; we build from a small wrapper
# module that requires k8s.io/kubernetes and replaces each staging module with its published
# v0.x.y. kwok, helm and etcd are chosen at releases that use the same k8s.io/* and etcd modules,
# so they share one module graph and one build (everything compiles once).
#
# Usage: scripts/k8s-build.sh            build (or confirm) the cache, print the bin dir last
#        scripts/k8s-build.sh --bin-dir  only print the bin dir (exit 1 if not built)
# Output: <bin dir>/{etcd,kube-apiserver,kube-controller-manager,kube-scheduler,kubectl,kwok,helm}
#         and <bin dir>/kwok-stages.yaml (kwok's fast node/pod stages, for `kwok --config`).
# Env:   SPLITSERVE_K8S_CACHE (default ~/.cache/splitserve/k8s), GOFLAGS/GOPROXY as usual.
set -euo pipefail

K8S_VERSION=v1.36.3      # upstream builds it with Go 1.26 (our toolchain)
STAGING_VERSION=v0.36.3  # k8s.io/* staging modules published for K8S_VERSION
ETCD_VERSION=v3.6.8      # the etcd release k8s.io/kubernetes v1.36.3 itself requires
KWOK_VERSION=v0.8.0      # uses k8s.io/* v0.36.x
HELM_VERSION=v3.21.4     # uses k8s.io/* v0.36.x (v3.22 moved to v0.37)
KEY="${K8S_VERSION}"
STAMP_TEXT="k8s=${K8S_VERSION} staging=${STAGING_VERSION} etcd=${ETCD_VERSION} kwok=${KWOK_VERSION} helm=${HELM_VERSION}"

CACHE_ROOT="${SPLITSERVE_K8S_CACHE:-${HOME}/.cache/splitserve/k8s}"
ROOT="${CACHE_ROOT}/${KEY}"
BIN="${ROOT}/bin"
SRC="${ROOT}/src"
BINARIES=(etcd kube-apiserver kube-controller-manager kube-scheduler kubectl kwok helm)

is_built() {
  [[ -f "${BIN}/.stamp" && "$(cat "${BIN}/.stamp")" == "${STAMP_TEXT}" ]] || return 1
  local b
  for b in "${BINARIES[@]}"; do [[ -x "${BIN}/${b}" ]] || return 1; done
}

# kwok does nothing without "stages" (what happens to a node or pod, and when). kwokctl embeds
# kwok's own fast stages; the plain binary needs them in a config file: copy them out of the
# kwok module so they always match the kwok we built.
STAGES="${BIN}/kwok-stages.yaml"
install_kwok_stages() {
  [[ -s "${STAGES}" ]] && return 0
  local dir
  dir=$(go mod download -json "sigs.k8s.io/kwok@${KWOK_VERSION}" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')
  local f first=1
  for f in node/fast/node-initialize.yaml node/heartbeat/node-heartbeat.yaml \
           pod/fast/pod-ready.yaml pod/fast/pod-complete.yaml pod/fast/pod-delete.yaml; do
    [[ ${first} == 1 ]] || echo "---"
    first=0
    cat "${dir}/kustomize/stage/${f}"
  done > "${STAGES}.tmp"
  mv "${STAGES}.tmp" "${STAGES}"
}

if [[ "${1:-}" == "--bin-dir" ]]; then
  is_built && [[ -s "${STAGES}" ]] || { echo "not built: run scripts/k8s-build.sh" >&2; exit 1; }
  echo "${BIN}"; exit 0
fi

if is_built; then
  install_kwok_stages
  echo "k8s binaries up to date (${STAMP_TEXT})" >&2
  echo "${BIN}"; exit 0
fi

command -v go >/dev/null || { echo "go is required (Go >= 1.26)" >&2; exit 1; }
START=$(date +%s)
mkdir -p "${SRC}" "${BIN}"
export CGO_ENABLED=0
export GOFLAGS="${GOFLAGS:-} -trimpath -buildvcs=false"
export GOTOOLCHAIN="${GOTOOLCHAIN:-local}"

# --- the wrapper module -------------------------------------------------------------------------
KMOD_JSON=$(go mod download -json "k8s.io/kubernetes@${K8S_VERSION}")
KGOMOD=$(printf '%s' "${KMOD_JSON}" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
STAGING=$(sed -n 's#^[[:space:]]*\(k8s.io/[a-z0-9-]*\) => ./staging/.*#\1#p' "${KGOMOD}")
{
  echo "module splitserve.local/k8sbuild"
  echo
  echo "go 1.26.0"
  echo
  echo "require ("
  echo "	k8s.io/kubernetes ${K8S_VERSION}"
  echo "	sigs.k8s.io/kwok ${KWOK_VERSION}"
  echo "	helm.sh/helm/v3 ${HELM_VERSION}"
  echo "	go.etcd.io/etcd/server/v3 ${ETCD_VERSION}"
  echo ")"
  echo
  echo "replace ("
  for m in ${STAGING}; do
    # the sample-* modules are examples, not published and not needed by any binary
    if go list -m "${m}@${STAGING_VERSION}" >/dev/null 2>&1; then
      echo "	${m} => ${m} ${STAGING_VERSION}"
    fi
  done
  echo ")"
} > "${SRC}/go.mod"
rm -f "${SRC}/go.sum"

PKGS_K8S=(k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager
          k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl)
PKG_KWOK=sigs.k8s.io/kwok/cmd/kwok
PKG_HELM=helm.sh/helm/v3/cmd/helm
PKG_ETCD=go.etcd.io/etcd/server/v3
cd "${SRC}"
echo "resolving modules..." >&2
# every package pinned: a bare `go get pkg` would upgrade its module to the latest release
go get "${PKGS_K8S[@]/%/@${K8S_VERSION}}" "${PKG_KWOK}@${KWOK_VERSION}" \
  "${PKG_HELM}@${HELM_VERSION}" "${PKG_ETCD}@${ETCD_VERSION}"

# --- versions stamped the way upstream release builds do (tools read --version) ----------------
MAJOR=${K8S_VERSION#v}; MAJOR=${MAJOR%%.*}
MINOR=${K8S_VERSION#v*.}; MINOR=${MINOR%%.*}
NOW=$(date -u +%Y-%m-%dT%H:%M:%SZ)
KV=""
for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  KV+=" -X ${p}.gitVersion=${K8S_VERSION} -X ${p}.gitMajor=${MAJOR} -X ${p}.gitMinor=${MINOR}"
  KV+=" -X ${p}.gitTreeState=clean -X ${p}.buildDate=${NOW}"
done
HV="-X helm.sh/helm/v3/internal/version.version=${HELM_VERSION}"
HV+=" -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=${MAJOR}"
HV+=" -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=${MINOR}"
HV+=" -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=${MAJOR}"
HV+=" -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=${MINOR}"
WV="-X sigs.k8s.io/kwok/pkg/consts.Version=${KWOK_VERSION}"

# One `go build` for everything: the packages share one module graph, so each dependency
# compiles once; -p follows the cores (2 in CI).
OUT="${SRC}/out"; mkdir -p "${OUT}"
echo "building (cold: tens of minutes on 2 cores)..." >&2
go build -p "$(nproc)" -ldflags "-s -w ${KV} ${HV} ${WV}" -o "${OUT}/" \
  "${PKGS_K8S[@]}" "${PKG_KWOK}" "${PKG_HELM}" "${PKG_ETCD}"
# the etcd main package is the module root go.etcd.io/etcd/server/v3 -> binary named "server"
mv "${OUT}/server" "${OUT}/etcd"
for b in "${BINARIES[@]}"; do install -m 0755 "${OUT}/${b}" "${BIN}/${b}"; done
rm -rf "${OUT}"
install_kwok_stages
echo "${STAMP_TEXT}" > "${BIN}/.stamp"
echo "built in $(( $(date +%s) - START ))s: ${STAMP_TEXT}" >&2
echo "${BIN}"
