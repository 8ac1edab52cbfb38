#!/usr/bin/env bash
# The test command (README): installs what the end-to-end tests need on a
# fresh Debian machine, then builds and runs every test.
#
# The end-to-end tests start a real OpenSSH sshd on a loopback port, create a
# test user, and drive real ssh/scp/sftp/rsync clients: run this as root (CI
# does) or with sudo available.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=
if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; fi

need=()
for p in openssh-server openssh-client rsync zstd libcap2-bin systemd passwd; do
  dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "== installing ${need[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

# asciinema 3 (crates.io) renders the recordings in the tests: a player that
# nobody here wrote. Debian's asciinema is 2.x and cannot read asciicast v3.
if ! asciinema --version 2>/dev/null | grep -q '^asciinema 3'; then
  echo "== installing asciinema 3 from crates.io (a few minutes)"
  cargo install --locked --quiet asciinema --version '^3'
fi
export PATH="$HOME/.cargo/bin:$PATH"

echo "== building"
cargo build --bins --quiet
echo "== testing"
cargo test "$@"
