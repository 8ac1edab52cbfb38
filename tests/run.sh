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
for p in openssh-server openssh-client rsync zstd libcap2-bin systemd passwd lintian rpm; do
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

# The packages, built as docs/deployment.md says, then installed on this
# machine and used (tests/packages.rs): it changes the machine (packages,
# users, /etc/ssh/sshd_config.d), which CI's fresh machine is for.
# SHELLTRAIL_SKIP_PACKAGES=1 leaves them out elsewhere.
if [ "${SHELLTRAIL_SKIP_PACKAGES:-}" != 1 ]; then
  for tool in cargo-deb; do
    if ! command -v "$tool" >/dev/null 2>&1; then
      echo "== installing $tool from crates.io"
      cargo install --locked --quiet "$tool"
    fi
  done
  echo "== building the packages"
  cargo build --profile dist --bins --quiet
  rm -rf target/deb target/deb-upgrade target/rpmbuild
  cargo deb -p shelltrail --no-build --profile dist --quiet -o target/deb/
  # The same software as a newer version, to upgrade to during a live session.
  version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
  cargo deb -p shelltrail --no-build --profile dist --quiet --deb-version "$version-99" -o target/deb-upgrade/
  rpmbuild -bb --quiet --define "repo $PWD" --define "_topdir $PWD/target/rpmbuild" packaging/rpm/shelltrail.spec
  echo "== testing the packages"
  cargo test -p shelltrail-tests --test packages -- --ignored
fi
