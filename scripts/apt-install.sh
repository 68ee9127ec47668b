#!/bin/sh
# Install the Debian packages given as arguments that are not installed yet
# (as root; apt-get). Run again, it only checks.
#
# etcd-server enables and starts a system-wide etcd when installed. Nobody
# asked for one (the tests start their own on free loopback ports), so it is
# installed with service starts denied (policy-rc.d) and left disabled, with
# or without systemd (e.g. in a container).
set -eu

missing=""
for p in "$@"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
[ -z "$missing" ] && exit 0

echo "installing system packages:$missing"
if [ "$(id -u)" != 0 ]; then
  echo "need root to apt-get install:$missing" >&2
  exit 1
fi

policy=/usr/sbin/policy-rc.d
own_policy=""
case " $missing " in
  *" etcd-server "*)
    if [ ! -e "$policy" ]; then
      printf '#!/bin/sh\n# written by litefspy scripts/apt-install.sh while installing\nexit 101\n' >"$policy"
      chmod 755 "$policy"
      own_policy=1
    fi
    ;;
esac
cleanup() { if [ -n "$own_policy" ]; then rm -f "$policy"; fi; }
trap cleanup EXIT INT TERM

apt-get update -qq
# shellcheck disable=SC2086 # one word per package
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null

case " $missing " in
  *" etcd-server "*)
    if [ -d /run/systemd/system ]; then
      systemctl disable --now etcd.service >/dev/null 2>&1 || true
      if systemctl is-active --quiet etcd.service; then
        echo "the etcd service that etcd-server installed is still running; stop it: systemctl disable --now etcd" >&2
        exit 1
      fi
    else
      # No systemd running (a container): only the boot links to remove.
      deb-systemd-helper disable etcd.service >/dev/null 2>&1 || true
      update-rc.d etcd disable >/dev/null 2>&1 || true
    fi
    ;;
esac
