# Sourced by ./run: Debian packages (apt-get, only when missing) and the .venv.
APT_PACKAGES=(qemu-utils qemu-system-x86 libnbd-bin python3-libnbd nbdkit fio
  busybox-static linux-image-cloud-amd64 etcd-server iproute2 nftables e2fsprogs cpio openssl bc)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "virtua: installing Debian packages: ${missing[*]}" >&2
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >&2
fi
PY="${PYTHON:-python3}"
stamp=.venv/.installed-$(sha1sum pyproject.toml | cut -c1-12)
if [ ! -f "$stamp" ]; then
  echo "virtua: preparing .venv" >&2
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  .venv/bin/pip install -q --upgrade pip >&2
  .venv/bin/pip install -q -e '.[dev]' >&2
  rm -f .venv/.installed-*; touch "$stamp"
fi
# Byte-compile our own code (pip does it for the packages it installs, not for an editable
# one): with PYTHONDONTWRITEBYTECODE set, every CLI call compiled ~25 modules, ~40 ms of
# its ~180 ms. Up-to-date files are skipped, so this costs ~50 ms when nothing changed.
.venv/bin/python -m compileall -q virtua bench tests >/dev/null
