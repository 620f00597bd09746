#!/usr/bin/env bash
# Idempotent set-up on a fresh Debian machine: system packages, the Python venv, npm tools.
# Used by `make dev`, `make test` and CI. Safe to run again: each step is skipped when done.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PKGS=(qemu-system-x86 qemu-utils busybox-static e2fsprogs cpio zstd lz4 xz-utils kmod nodejs npm
          mmdebstrap dosfstools mtools openssh-client iproute2 nftables procps)
need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v qemu-img >/dev/null || need+=(qemu-utils)
[ -x /bin/busybox ] || command -v busybox >/dev/null || need+=(busybox-static)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
command -v cpio >/dev/null || need+=(cpio)
command -v zstd >/dev/null || need+=(zstd)
command -v lz4 >/dev/null || need+=(lz4)
command -v xz >/dev/null || need+=(xz-utils)
# the `debian` image (mmdebstrap), config drives (mkfs.vfat + mcopy), `vms ssh` and the SSH tests
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
command -v mkfs.vfat >/dev/null || [ -x /usr/sbin/mkfs.vfat ] || [ -x /sbin/mkfs.vfat ] || need+=(dosfstools)
command -v mcopy >/dev/null || need+=(mtools)
command -v ssh >/dev/null && command -v ssh-keygen >/dev/null || need+=(openssh-client)
# MICROVM_NETWORK=bridge (DESIGN.md §10): `ip` for namespaces, veth and TAP, `nft` for the rules,
# `sysctl` run inside each VM's namespace
command -v ip >/dev/null || [ -x /usr/sbin/ip ] || [ -x /sbin/ip ] || need+=(iproute2)
command -v nft >/dev/null || [ -x /usr/sbin/nft ] || need+=(nftables)
command -v sysctl >/dev/null || [ -x /usr/sbin/sysctl ] || [ -x /sbin/sysctl ] || need+=(procps)
command -v node >/dev/null || need+=(nodejs)
command -v npm >/dev/null || need+=(npm)
# The dashboard's browser test (tests/integration/test_dashboard_browser.py) drives Debian's chromium over
# the DevTools protocol. ~100 MB, so only when asked (MICROVM_BROWSER_TESTS=1) or in CI (CI=true); without
# it that test skips and says why.
if [ "${MICROVM_BROWSER_TESTS:-}" = 1 ] || [ "${CI:-}" = true ]; then
  command -v chromium >/dev/null || need+=(chromium)
fi
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
# Guest images are built from Debian packages with `apt-get download`: the package lists must exist.
if [ ${#need[@]} -gt 0 ] || [ -z "$(ls -A /var/lib/apt/lists 2>/dev/null | grep -v -e lock -e partial || true)" ]; then
  echo "bootstrap: apt-get update${need:+ and install ${need[*]}}" >&2
  $SUDO apt-get update -qq
  if [ ${#need[@]} -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  fi
fi
: "${APT_PKGS[@]}"

# The unprivileged user QEMU runs as (MICROVM_VMM_USER, DESIGN.md §9): only when root (a non-root operator's
# VMMs run as the operator itself). It joins the kvm group where there is one, for /dev/kvm.
if [ "$(id -u)" = 0 ] && ! getent passwd microvm >/dev/null; then
  echo "bootstrap: creating the system user microvm (the VMM user)" >&2
  useradd --system --no-create-home --shell /usr/sbin/nologin microvm
fi
if [ "$(id -u)" = 0 ] && getent group kvm >/dev/null && ! id -nG microvm | grep -qw kvm; then
  usermod -aG kvm microvm
fi
# bridge networking (DESIGN.md §10): the unprivileged QEMU opens its TAP through /dev/net/tun, which some
# hosts leave root-only (0600): give it to a `tun` group the VMM user is in (Debian's udev default is 0666)
if [ "$(id -u)" = 0 ] && [ -c /dev/net/tun ]; then
  getent group tun >/dev/null || groupadd --system tun
  id -nG microvm | grep -qw tun || usermod -aG tun microvm
  if [ "$(stat -c %a /dev/net/tun)" = 600 ]; then
    chgrp tun /dev/net/tun && chmod 0660 /dev/net/tun
  fi
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating .venv" >&2
  "$PY" -m venv .venv
fi
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ]; then
  echo "bootstrap: installing Python packages" >&2
  .venv/bin/pip install -q --disable-pip-version-check -e ".[dev]"
  rm -f .venv/.installed-* && touch "$stamp"
fi
nstamp=node_modules/.installed-$(sha256sum package-lock.json | cut -c1-16)
if [ ! -f "$nstamp" ]; then
  echo "bootstrap: installing npm tools (anvil, solc)" >&2
  npm ci --no-audit --no-fund --loglevel=error
  touch "$nstamp"
fi
