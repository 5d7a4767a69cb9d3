#!/usr/bin/env bash
# Run a command in a network namespace of its own that has only a loopback interface, so that
# anything it starts (tests, redis-server, the Kubernetes control plane, workers) can reach
# 127.0.0.0/8 and nothing else: a connection to any other address fails at once
# (ENETUNREACH), and the test that made it fails instead of sending traffic off the machine.
#
#   bash scripts/loopback-netns.sh COMMAND [ARG...]
#
# As root: `unshare --net`; otherwise a user namespace too (`unshare -rn`). Where the machine
# cannot make one, it says so loudly and runs the command as it is.
set -euo pipefail

if [ "${SPLITSERVE_IN_LOOPBACK_NETNS:-}" = "1" ]; then exec "$@"; fi

bring_lo_up='
if command -v ip >/dev/null 2>&1; then ip link set lo up
else python3 -c "
import fcntl, socket, struct
s = socket.socket(); req = struct.pack(\"16sH\", b\"lo\", 0)
flags = struct.unpack(\"16sH\", fcntl.ioctl(s, 0x8913, req))[1]  # SIOCGIFFLAGS
fcntl.ioctl(s, 0x8914, struct.pack(\"16sH\", b\"lo\", flags | 1))  # SIOCSIFFLAGS |= IFF_UP
"
fi
export SPLITSERVE_IN_LOOPBACK_NETNS=1
exec "$@"'

if [ "$(id -u)" -eq 0 ]; then ns=(unshare --net); else ns=(unshare --map-root-user --net); fi
if command -v unshare >/dev/null 2>&1 && "${ns[@]}" true 2>/dev/null; then
  echo "running in a loopback-only network namespace (${ns[*]})" >&2
  exec "${ns[@]}" bash -c "$bring_lo_up" bash "$@"
fi
{
  echo "################################################################################"
  echo "# WARNING: cannot create a network namespace here (${ns[*]} failed);"
  echo "# running WITHOUT the loopback-only guard: a test that connects off loopback will"
  echo "# not be caught."
  echo "################################################################################"
} >&2
exec "$@"
