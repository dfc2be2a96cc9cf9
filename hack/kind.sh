#!/usr/bin/env bash
# kind cluster and Helm release helpers behind the Makefile.
#   hack/kind.sh check | up | load IMAGE | deploy RELEASE | scale RELEASE N | watch RELEASE | undeploy RELEASE | down
# Exits 77 with the reason when kind (or a Docker engine) is not available, so callers can skip.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cluster="fsdp-train"
shared="/tmp/fsdp-train-kind-shared"
tools="$("$root/hack/tools.sh")"
helm="$tools/helm"
kubectl="$tools/kubectl"
node_image="${KIND_NODE_IMAGE:-}"

skip() { echo "SKIP: $*" >&2; exit 77; }

check() {
  command -v kind >/dev/null 2>&1 || skip "kind is not installed (see https://kind.sigs.k8s.io); install it to run the kind targets"
  "$root/hack/docker-engine.sh" 2>/dev/null || skip "no Docker engine available for kind"
}

case "${1:-}" in
  check) check ;;
  up)
    check
    mkdir -p "$shared/checkpoints" && chmod 0777 "$shared/checkpoints"
    if ! kind get clusters 2>/dev/null | grep -qx "$cluster"; then
      kind create cluster --config "$root/k8s/kind-cluster.yaml" ${node_image:+--image "$node_image"} --wait 120s \
        || skip "kind could not create the cluster (its node image must be pullable or preloaded; set KIND_NODE_IMAGE)"
    fi
    "$kubectl" --context "kind-$cluster" apply -f "$root/k8s/storage.yaml"
    ;;
  load) check; kind load docker-image --name "$cluster" "${2:?image}" ;;
  deploy)
    "$helm" upgrade --install "${2:?release}" "$root/helm/fsdp-train" -f "$root/k8s/values-kind.yaml" \
      --kube-context "kind-$cluster" --wait=false
    ;;
  scale)
    "$helm" upgrade "${2:?release}" "$root/helm/fsdp-train" --reuse-values --set "replicas=${3:?replicas}" \
      --kube-context "kind-$cluster"
    ;;
  watch)
    "$kubectl" --context "kind-$cluster" logs -f --max-log-requests 16 --prefix \
      -l "app.kubernetes.io/instance=${2:?release},app.kubernetes.io/component=worker"
    ;;
  undeploy) "$helm" uninstall "${2:?release}" --kube-context "kind-$cluster" ;;
  down) check; kind delete cluster --name "$cluster" ;;
  *) echo "usage: $0 check|up|load IMAGE|deploy RELEASE|scale RELEASE N|watch RELEASE|undeploy RELEASE|down" >&2; exit 2 ;;
esac
