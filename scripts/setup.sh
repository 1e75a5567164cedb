#!/usr/bin/env bash
# Sets up a fresh Debian machine to build and test this project:
# the host tools the provisioning scripts use (Debian packages), the arm64
# packages the stand-in guest is built from, PowerShell 7 and Pester (from
# NuGet) for the guest scripts (pwsh's assemblies precompiled with crossgen2,
# also from NuGet), and the Node.js dependencies (npm ci).
# Run as root from the repository root:  bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PWSH_VERSION=7.6.9
PESTER_VERSION=6.2.0

echo "==> Debian packages"
export DEBIAN_FRONTEND=noninteractive
dpkg --add-architecture arm64
apt-get update -q
apt-get install -y -q --no-install-recommends \
  qemu-system-arm qemu-efi-aarch64 qemu-utils xorriso awscli shellcheck \
  openssh-client openssh-server mtools dosfstools cpio socat netcat-openbsd \
  ca-certificates curl jq xxd nftables ntfs-3g fdisk

echo "==> PowerShell ${PWSH_VERSION} (.NET tool) and Pester ${PESTER_VERSION}"
export PATH="$HOME/.dotnet/tools:$PATH"
# shellcheck disable=SC2016 # PowerShell code, not shell
if ! pwsh -NoProfile -Command '$PSVersionTable.PSVersion.ToString()' 2>/dev/null | grep -qx "$PWSH_VERSION"; then
  dotnet tool update --global PowerShell --version "$PWSH_VERSION" \
    || dotnet tool install --global PowerShell --version "$PWSH_VERSION"
fi
# The tool's assemblies are JIT-compiled at every pwsh start; compiled ahead of time (as
# Microsoft's release packages are) a start takes half the CPU. Best effort: pwsh works either way.
bash scripts/precompile-pwsh.sh
bash scripts/install-pester.sh "$PESTER_VERSION"

echo "==> npm ci"
npm ci --no-audit --no-fund

echo "setup done"
