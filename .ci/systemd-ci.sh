#!/usr/bin/env bash
# Real systemd 252 (Debian bookworm) as PID 1 in a podman container, for the tests of the shipped units
# (systemd/celery-supervisor.service, systemd/celery-worker@.service) and of the systemd adapter against
# the real systemctl / journalctl (tests/integration/test_real_systemd_*.py, tests/support/systemd_real.py).
# Vendored from shared/systemd-ci.sh; changes: an image of its own (tag from the package list, so the
# shared image is never rebuilt or shadowed) with python3-venv (the README's install makes a venv) and
# polkitd (the README's polkit rule for a non-root supervisor); start takes a hostname, extra run
# arguments and a run label; teardown removes this container (and, with SD_RUN_ID, the containers of
# that run) and nothing else.
# Host: Debian 12, root, podman 4.3.1 + runc, cgroup v1 hybrid (name=systemd hierarchy mounted), no registry.
# Measured: cold setup (packages + image) ~40 s, image present: start ~0.7 s, selftest ~12 s.
#
#   bash systemd-ci.sh setup      # packages + containers.conf (via podman-ci.sh) + local image (idempotent)
#   bash systemd-ci.sh start      # (re)create container $SD_NAME and wait for systemd "running"
#   bash systemd-ci.sh selftest   # (a) restart/show/journal of a simple unit, (b) hardened Type=notify+watchdog
#   bash systemd-ci.sh teardown   # podman rm -f $SD_NAME (+ containers labelled with $SD_RUN_ID, if set)
#   bash systemd-ci.sh purge      # teardown + remove the image
#   bash systemd-ci.sh image      # print the image's name
# Or source it and call sd_setup / sd_start / sd_teardown. Inside: `podman exec $SD_NAME systemctl ...`.
# start reads: SD_NAME, SD_HOSTNAME (the container's hostname, systemd's %H; default: podman's),
# SD_RUN_ARGS (more `podman run` arguments, split at spaces, e.g. "-v /src:/mnt/src:ro"),
# SD_RUN_ID (a label value: `teardown` with the same SD_RUN_ID removes every container of that run).
# The image has python3 (3.11), python3-venv and polkitd but no pip packages: bind-mount what a test
# needs, or extend SD_PKGS (Debian package names; another list is another image).
#
# Why these run flags:
#  --cap-add=SYS_ADMIN  without it systemd cannot unshare a mount namespace and SILENTLY drops
#                       ProtectSystem=/PrivateDevices=/PrivateTmp= ("Failed to set up namespace, assuming
#                       containerized execution and ignoring", debug level only). Seccomp, MDWE,
#                       RestrictAddressFamilies, CapabilityBoundingSet, NoNewPrivileges work either way.
#  --cgroupns=private   with SYS_ADMIN + the host cgroupns (podman's default on cgroup v1), the container's
#                       systemd mounts the host's cgroup2 with "nsdelegate" (a host-wide superblock flag that
#                       stays after the container is gone) and attaches the net_cls,net_prio/hugetlb/perf_event
#                       v1 hierarchies host-wide while it runs. With a private cgroupns neither happens.
#  not --systemd=always (on a cgroup v1 host, added here): podman then bind-mounts the ROOT of the host's
#                       name=systemd hierarchy ("/../..") into the container, whose systemd makes init.scope,
#                       system.slice... at the host's root and, when it shuts down, removes every empty cgroup
#                       it finds there, among them the name=systemd cgroup of any other running systemd
#                       container (theirs are empty: their systemd moved out of it), whose `podman exec` then
#                       fails ("error adding pid ... to cgroups ... cgroup.procs: no such file"): two test
#                       modules in parallel (pytest -n) broke each other so. Instead each container gets a
#                       subtree of its own, $SD_CG_ROOT/$SD_NAME, as its /sys/fs/cgroup/systemd, and the rest
#                       of what --systemd=always does (tmpfs /run /run/lock /tmp /var/log/journal,
#                       container=podman, SIGRTMIN+3) is spelled out. teardown removes that subtree.
set -u
SD_DIR=${SD_DIR:-/tmp/systemd-ci}
# the Debian mirror this machine's apt already uses (first URIs: / deb line of its sources)
_sd_mirror() {
  local m
  m=$(grep -hE '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | grep -v security | head -1 | awk '{print $2}')
  [ -n "$m" ] || m=$(grep -hE '^deb ' /etc/apt/sources.list 2>/dev/null | grep -v security | head -1 | awk '{print $2}')
  echo "$m"
}
SD_MIRROR=${SD_MIRROR:-$(_sd_mirror)}
SD_SUITE=${SD_SUITE:-bookworm}
SD_PKGS=${SD_PKGS:-systemd,systemd-sysv,dbus,python3,python3-venv,procps,iproute2,polkitd}
# an image per package list: editing SD_PKGS builds a new one instead of reusing a stale one
SD_IMAGE=${SD_IMAGE:-localhost/celery-supervisor-systemd:$(echo "$SD_SUITE $SD_PKGS" | md5sum | cut -c1-10)}
SD_NAME=${SD_NAME:-celery-supervisor-systemd-ci}
SD_LABEL=celery-supervisor-systemd-ci
SD_CG_V1=/sys/fs/cgroup/systemd                     # the name=systemd hierarchy of a cgroup v1 (hybrid) host
SD_CG_ROOT=$SD_CG_V1/celery-supervisor-systemd-ci    # our containers' subtrees in it
PODMAN_CI=${PODMAN_CI:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/podman-ci.sh}

_log() { echo "[systemd-ci $(date +%T)] $*" >&2; }

sd_setup() {
  # shellcheck source=/dev/null
  source "$PODMAN_CI" || return 1
  podman_ci_install || return 1      # podman runc busybox-static (apt), only if missing
  podman_ci_config || return 1       # /etc/containers/containers.conf: runc, cgroupfs, ulimits <= our hard limits
  if ! command -v mmdebstrap >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mmdebstrap >/dev/null || return 1
  fi
  if podman image exists "$SD_IMAGE"; then _log "image $SD_IMAGE present"; return 0; fi
  mkdir -p "$SD_DIR"
  local tar="$SD_DIR/rootfs.$$.tar" rc=0
  _log "building $SD_IMAGE from $SD_MIRROR $SD_SUITE"
  mmdebstrap --variant=minbase --mode=root --include="$SD_PKGS" \
      --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
      --dpkgopt='path-exclude=/usr/share/locale/*' \
      "$SD_SUITE" "$tar" "$SD_MIRROR" > "$SD_DIR/mmdebstrap.log" 2>&1 || { rc=$?; tail -20 "$SD_DIR/mmdebstrap.log" >&2; }
  [ "$rc" = 0 ] && { podman import --quiet --change 'CMD ["/sbin/init"]' --change 'STOPSIGNAL SIGRTMIN+3' \
      "$tar" "$SD_IMAGE" >/dev/null || rc=$?; }
  rm -f "$tar"
  return "$rc"
}

_sd_cg_v1() { grep -qE "^[^ ]+ $SD_CG_V1 cgroup [^ ]*name=systemd" /proc/mounts 2>/dev/null; }

_sd_cg_clean() {  # the name=systemd subtree of container $1 (empty once it is gone), deepest first
  local d="$SD_CG_ROOT/$1"
  [ -n "$1" ] && [ -d "$d" ] || return 0
  find "$d" -depth -type d -exec rmdir {} \; 2>/dev/null || true
  rmdir "$SD_CG_ROOT" 2>/dev/null || true
  return 0
}

_sd_systemd_args() {  # what --systemd=always does, with a name=systemd subtree of this container's own
  if ! _sd_cg_v1; then echo "--systemd=always"; return 0; fi
  mkdir -p "$SD_CG_ROOT/$SD_NAME" || return 1
  echo "--systemd=false --env container=podman --stop-signal SIGRTMIN+3" \
       "--tmpfs /run:rw,nosuid,nodev --tmpfs /run/lock:rw,nosuid,nodev --tmpfs /tmp:rw,nosuid,nodev" \
       "--tmpfs /var/log/journal:rw,nosuid,nodev -v $SD_CG_ROOT/$SD_NAME:$SD_CG_V1:rw"
}

sd_start() {
  podman rm -f -t 0 "$SD_NAME" >/dev/null 2>&1 || true
  _sd_cg_clean "$SD_NAME"
  local extra=() mode
  mode=$(_sd_systemd_args) || return 1
  [ -n "${SD_HOSTNAME:-}" ] && extra+=(--hostname "$SD_HOSTNAME")
  # shellcheck disable=SC2206
  [ -n "${SD_RUN_ARGS:-}" ] && extra+=($SD_RUN_ARGS)
  # --cgroupns=private and --cap-add=SYS_ADMIN are not optional: see "Why these run flags" above
  # shellcheck disable=SC2086
  podman run -d $mode --cgroupns=private --cap-add=SYS_ADMIN --network=host \
      --label "$SD_LABEL=${SD_RUN_ID:-manual}" "${extra[@]}" \
      --name "$SD_NAME" "$SD_IMAGE" /sbin/init >/dev/null || return 1
  local i s=""
  for i in $(seq 1 100); do
    s=$(podman exec "$SD_NAME" systemctl is-system-running 2>/dev/null)
    case "$s" in running|degraded) _log "systemd is $s"; return 0;; esac
    sleep 0.3
  done
  _log "systemd did not come up (state '$s')"; podman exec "$SD_NAME" systemctl --failed --no-pager >&2; return 1
}

sd_teardown() {
  command -v podman >/dev/null || return 0
  podman rm -f -t 2 "$SD_NAME" >/dev/null 2>&1 || true
  _sd_cg_clean "$SD_NAME"
  if [ -n "${SD_RUN_ID:-}" ]; then   # the containers of this run (tests start their own), only those
    local c
    for c in $(podman ps -a --filter "label=$SD_LABEL=$SD_RUN_ID" --format '{{.Names}}' 2>/dev/null); do
      podman rm -f -t 2 "$c" >/dev/null 2>&1 || true
      _sd_cg_clean "$c"
    done
  fi
  # guard: a container run WITHOUT --cgroupns=private may have set nsdelegate on the host cgroup2; undo it
  if grep -q '^cgroup2 /sys/fs/cgroup/unified .*nsdelegate' /proc/mounts; then
    _log "host cgroup2 has nsdelegate: clearing it (remount from the init cgroup namespace)"
    python3 -c 'import ctypes; l=ctypes.CDLL(None); print(l.mount(b"cgroup2", b"/sys/fs/cgroup/unified", b"cgroup2", 32 | (1 << 21), b""))' >/dev/null
  fi
  return 0
}

sd_purge() { sd_teardown; podman rmi -f "$SD_IMAGE" >/dev/null 2>&1 || true; }

# ------------------------------------------------------------------ self-test
sd_selftest() {
  local P="podman exec -i $SD_NAME"
  $P mkdir -p /opt/app /etc/systemd/system
  $P sh -c 'cat > /opt/app/worker.py' <<'EOF'
import os, sys, time
print(f"worker: ready pid={os.getpid()}", flush=True)
while True:
    if os.path.exists("/tmp/crash-now"):
        os.unlink("/tmp/crash-now"); print("worker: crashing with exit 3", flush=True); sys.exit(3)
    time.sleep(0.2)
EOF
  $P sh -c 'cat > /etc/systemd/system/celery-worker.service' <<'EOF'
[Service]
Type=simple
ExecStart=/usr/bin/python3 -u /opt/app/worker.py
Restart=on-failure
RestartSec=3
EOF
  $P sh -c 'cat > /opt/app/notifyd.py' <<'EOF'
import os, socket, time
def notify(msg):
    a = os.environ["NOTIFY_SOCKET"]; a = "\0" + a[1:] if a.startswith("@") else a
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s: s.sendto(msg.encode(), a)
try: open("/etc/x", "w"); print("notifyd: /etc WRITABLE", flush=True)
except OSError as e: print("notifyd: /etc read-only:", e.strerror, flush=True)
notify("READY=1\nSTATUS=serving")
while True:
    if not os.path.exists("/tmp/stop-watchdog"): notify("WATCHDOG=1")
    time.sleep(int(os.environ["WATCHDOG_USEC"]) / 3e6)
EOF
  $P sh -c 'cat > /etc/systemd/system/notifyd.service' <<'EOF'
[Service]
Type=notify
ExecStart=/usr/bin/python3 -u /opt/app/notifyd.py
WatchdogSec=2
Restart=on-failure
RestartSec=1
ProtectSystem=strict
MemoryDenyWriteExecute=yes
SystemCallFilter=@system-service
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
PrivateDevices=yes
CapabilityBoundingSet=
EOF
  $P systemctl daemon-reload || return 1
  local show="systemctl show -p ActiveState,SubState,NRestarts,ExecMainStatus"
  # (a)
  $P systemctl start celery-worker && $P systemctl restart celery-worker || return 1
  $P $show celery-worker | tr '\n' ' '; echo
  $P touch /tmp/crash-now; sleep 1
  local st; st=$($P $show celery-worker | sort | tr '\n' ' '); echo "after crash: $st"
  case "$st" in *"ExecMainStatus=3"*"NRestarts=0"*"SubState=auto-restart"*) ;; *) _log "FAIL (a): $st"; return 1;; esac
  sleep 3; $P $show celery-worker | grep -qx NRestarts=1 || { _log "FAIL (a): no restart"; return 1; }
  $P journalctl -u celery-worker -n 20 --no-pager | grep -q 'status=3/NOTIMPLEMENTED' || { _log "FAIL (a): journal"; return 1; }
  # (b)
  $P systemctl start notifyd || { $P journalctl -u notifyd -n 20 --no-pager; return 1; }
  $P systemctl show -p ActiveState,SubState,StatusText,WatchdogUSec notifyd | tr '\n' ' '; echo
  $P journalctl -u notifyd --no-pager | grep -q '/etc read-only' || { _log "FAIL (b): ProtectSystem not applied"; return 1; }
  $P touch /tmp/stop-watchdog; sleep 3.5; $P rm -f /tmp/stop-watchdog; sleep 1.5
  $P journalctl -u notifyd --no-pager | grep -q "Failed with result 'watchdog'" || { _log "FAIL (b): watchdog"; return 1; }
  $P $show notifyd | grep -qx NRestarts=1 || { _log "FAIL (b): no restart after watchdog"; return 1; }
  $P systemctl is-active notifyd >/dev/null || return 1
  _log "selftest OK"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  case "${1:-}" in
    setup) sd_setup ;; start) sd_start ;; selftest) sd_selftest ;;
    teardown) sd_teardown ;; purge) sd_purge ;; image) echo "$SD_IMAGE" ;;
    *) echo "usage: $0 setup|start|selftest|teardown|purge|image" >&2; exit 2 ;;
  esac
fi
