#!/usr/bin/env bash
# Inside the nested rig's L1: a real registry (Debian's docker-registry) on 127.0.0.1:5000
# holding the demo image as 127.0.0.1:5000/demo/busybox:1. Used by scripts/demo-nested.sh
# and scripts/nested-start-loop.sh.
#   scripts/l1-registry.sh IMAGE_LAYOUT
set -euo pipefail
layout=$1
mkdir -p /tmp/registry
cat >/tmp/registry/config.yml <<YML
version: 0.1
log:
  level: error
storage:
  filesystem:
    rootdirectory: /tmp/registry/data
http:
  addr: 127.0.0.1:5000
YML
docker-registry serve /tmp/registry/config.yml >/tmp/registry/log 2>&1 &
for _ in $(seq 100); do (echo >/dev/tcp/127.0.0.1/5000) 2>/dev/null && break; sleep 0.1; done
skopeo copy --quiet --dest-tls-verify=false "oci:$layout:v1" docker://127.0.0.1:5000/demo/busybox:1
