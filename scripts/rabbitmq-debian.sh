#!/usr/bin/env bash
# A RabbitMQ of a Debian release beside the host's broker, from Debian's packages only:
# that release's rabbitmq-server in a root made with debootstrap (itself unpacked from
# Debian's package with `apt-get download` + `dpkg-deb -x`, not installed), run under
# chroot in a private mount namespace, on its own node name and loopback ports, with
# upstream 4.3's defaults for deprecated features whatever the version (Debian's 4.3
# package permits transient non-exclusive queues again; upstream does not; 4.0 permits
# them with a warning): the gateway must not need them.
#
#   scripts/rabbitmq-debian.sh SUITE start     build the root if absent, start, wait for it
#   scripts/rabbitmq-debian.sh SUITE stop      stop the node
#   scripts/rabbitmq-debian.sh SUITE status    exit 0 if the node answers
#   scripts/rabbitmq-debian.sh SUITE url       its AMQP URL (guest/guest on loopback)
#   scripts/rabbitmq-debian.sh SUITE ctl ARGS  its own rabbitmqctl
#   scripts/rabbitmq-debian.sh SUITE haproxy ARGS
#                                     the release's HAProxy in the same root, installed there
#                                     the first time: deploy/check.sh checks the shipped
#                                     affinity configuration with forky's (3.2)
#                                     (`-c -f /dev/stdin`; HAPROXY_* and NAMESPACE pass in)
#
# SUITE          RabbitMQ  AMQP  distribution  epmd  node                 wrappers
# forky          4.3.x     5673  25673         4370  rabbit43@localhost   scripts/rabbitmq-4.3.sh, rabbitmqctl-4.3
# trixie         4.0.x     5674  25674         4371  rabbit40@localhost   scripts/rabbitmq-4.0.sh, rabbitmqctl-4.0
#
# All on 127.0.0.1; the host's broker keeps 5672, 25672 and 4369. Needs root (chroot,
# mount namespaces). A root (about 350 MB) is kept in /var/cache/events-gateway/
# (RABBITMQ43_ROOT or RABBITMQ40_ROOT to move it) and reused; building one takes a few
# minutes and needs Debian's package mirror (the one apt is configured with;
# RABBITMQ_DEBIAN_MIRROR to choose another).
set -euo pipefail

SUITE=${1:-}
shift || true
case "$SUITE" in
  forky)
    VERSION=4.3
    ROOT=${RABBITMQ43_ROOT:-/var/cache/events-gateway/rabbitmq-4.3-root}
    AMQP_PORT=5673 DIST_PORT=25673 EPMD_PORT=4370
    ;;
  trixie)
    VERSION=4.0
    ROOT=${RABBITMQ40_ROOT:-/var/cache/events-gateway/rabbitmq-4.0-root}
    AMQP_PORT=5674 DIST_PORT=25674 EPMD_PORT=4371
    ;;
  *)
    echo "usage: $0 forky|trixie start|stop|status|url|ctl ARGS|haproxy ARGS" >&2
    exit 1
    ;;
esac
MIRROR=${RABBITMQ_DEBIAN_MIRROR:-${RABBITMQ43_MIRROR:-}}
NODE=rabbit${VERSION/./}@localhost
LOG=${ROOT%/*}/rabbitmq-$VERSION.log

die() {
  echo "rabbitmq-$VERSION: $*" >&2
  exit 1
}

# The mirror apt uses on this machine (deb822 or one-line sources).
mirror() {
  if [ -n "$MIRROR" ]; then
    echo "$MIRROR"
    return
  fi
  local uri
  uri=$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | grep -v security | head -n 1 || true)
  if [ -z "$uri" ]; then
    uri=$(grep -hs '^deb ' /etc/apt/sources.list | awk '{print $2}' | head -n 1 || true)
  fi
  echo "${uri:-http://deb.debian.org/debian}"
}

build_root() {
  [ -x "$ROOT/usr/sbin/rabbitmq-server" ] && return
  [ "$(id -u)" = 0 ] || die "building the root needs root (debootstrap, chroot)"
  local work
  work=$(mktemp -d)
  echo "rabbitmq-$VERSION: building $ROOT from $(mirror) (Debian $SUITE; a few minutes)" >&2
  (cd "$work" && apt-get download -q debootstrap >/dev/null)
  dpkg-deb -x "$work"/debootstrap_*.deb "$work/x"
  rm -rf "$ROOT.partial"
  mkdir -p "$ROOT.partial"
  # debootstrap's script for both is sid's (forky is Debian testing, and bookworm's
  # debootstrap knows trixie as sid's too). Their Release files are signed with keys the
  # host's archive keyring has (bookworm's knows trixie's key).
  DEBOOTSTRAP_DIR="$work/x/usr/share/debootstrap" "$work/x/usr/sbin/debootstrap" \
    --variant=minbase --include=rabbitmq-server \
    --keyring=/usr/share/keyrings/debian-archive-keyring.gpg \
    "$SUITE" "$ROOT.partial" "$(mirror)" "$work/x/usr/share/debootstrap/scripts/sid" \
    >"$work/debootstrap.log" 2>&1 || {
    tail -n 30 "$work/debootstrap.log" >&2
    die "debootstrap failed (log above)"
  }
  printf '127.0.0.1 localhost\n::1 localhost\n' >"$ROOT.partial/etc/hosts"
  rm -rf "$work"
  mv "$ROOT.partial" "$ROOT"
}

configure() {
  mkdir -p "$ROOT/etc/rabbitmq"
  cat >"$ROOT/etc/rabbitmq/rabbitmq.conf" <<EOF
listeners.tcp.default = 127.0.0.1:$AMQP_PORT
# Upstream RabbitMQ 4.3's defaults (Debian's package patches the first back to true).
deprecated_features.permit.transient_nonexcl_queues = false
deprecated_features.permit.global_qos = false
EOF
  cat >"$ROOT/etc/rabbitmq/rabbitmq-env.conf" <<EOF
NODENAME=$NODE
DIST_PORT=$DIST_PORT
SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
EOF
}

# Runs a command inside the root, in a private mount namespace with /proc and /dev.
in_root() {
  unshare --mount --propagation private /bin/sh -c '
    root=$1; shift
    mount -t proc proc "$root/proc"
    mount --rbind /dev "$root/dev"
    mount -t tmpfs tmpfs "$root/tmp"
    exec chroot "$root" /usr/bin/env -i \
      PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
      ERL_EPMD_PORT='"$EPMD_PORT"' ERL_EPMD_ADDRESS=127.0.0.1 "$@"
  ' in_root "$ROOT" "$@"
}

ctl() {
  in_root /usr/sbin/rabbitmqctl -n "$NODE" "$@"
}

status() {
  [ -x "$ROOT/usr/sbin/rabbitmqctl" ] && ctl -q status >/dev/null 2>&1
}

start() {
  build_root
  configure
  if status; then
    return
  fi
  mkdir -p "${LOG%/*}"
  echo "rabbitmq-$VERSION: starting $NODE on 127.0.0.1:$AMQP_PORT (log: $LOG)" >&2
  setsid bash -c "$(declare -f in_root); ROOT='$ROOT'; EPMD_PORT='$EPMD_PORT'; in_root /usr/sbin/rabbitmq-server" \
    >"$LOG" 2>&1 </dev/null &
  for _ in $(seq 1 120); do
    if ctl -q await_startup >/dev/null 2>&1; then
      ctl -q await_startup
      return
    fi
    sleep 1
  done
  tail -n 40 "$LOG" >&2
  die "the node did not start within 2 minutes (log above)"
}

stop() {
  status || return 0
  ctl -q stop >/dev/null 2>&1 || true
  # Its epmd too (the host's, on 4369, is not touched).
  pkill -f "epmd.*-port $EPMD_PORT" 2>/dev/null || true
  in_root /usr/bin/epmd -port "$EPMD_PORT" -kill >/dev/null 2>&1 || true
}

# HAProxy from the root (installed into it the first time), reading its configuration
# from stdin when given `-f /dev/stdin`.
haproxy_in_root() {
  build_root
  if [ ! -x "$ROOT/usr/sbin/haproxy" ]; then
    echo "rabbitmq-$VERSION: installing $SUITE's haproxy into $ROOT" >&2
    in_root /usr/bin/env DEBIAN_FRONTEND=noninteractive \
      apt-get install -y -q --no-install-recommends haproxy >/dev/null
  fi
  # The configuration's own variables (HAPROXY_*, NAMESPACE) pass into the root.
  local vars=()
  while IFS= read -r var; do vars+=("$var"); done < <(env | grep -E '^(HAPROXY_[A-Z_]*|NAMESPACE)=' || true)
  in_root /usr/bin/env "${vars[@]}" /usr/sbin/haproxy "$@"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  url) echo "amqp://guest:guest@127.0.0.1:$AMQP_PORT/%2f" ;;
  ctl)
    shift
    ctl "$@"
    ;;
  haproxy)
    shift
    haproxy_in_root "$@"
    ;;
  *) die "usage: $0 $SUITE start|stop|status|url|ctl ARGS|haproxy ARGS" ;;
esac
