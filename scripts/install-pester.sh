#!/usr/bin/env bash
# install-pester.sh - install the Pester PowerShell module from its NuGet package.
#
# Usage:   bash scripts/install-pester.sh [VERSION]        (default VERSION: 6.2.0)
# Env:     PESTER_HOME  install root (default: ${XDG_DATA_HOME:-$HOME/.local/share}/pester)
# Needs:   dotnet (any SDK; NuGet must be reachable the first time).
# Output:  the module lands in $PESTER_HOME/<VERSION>/ (Pester.psd1 and the rest of the
#          package's tools/ folder); the path of Pester.psd1 is printed on stdout,
#          progress on stderr. Import it with: Import-Module <that path>
# Idempotent: when $PESTER_HOME/<VERSION>/Pester.psd1 already declares that version,
#          nothing is downloaded. A partial install never replaces a good one (the
#          module is staged in a temporary folder and moved in place at the end).
# Exit:    0 on success; non-zero with an "install-pester: ..." message otherwise.
#
# How: the PowerShell Gallery is not reachable here, but NuGet is, and Pester is
# published there as a package whose tools/ folder is the module. A throw-away
# project with a <PackageDownload> item makes `dotnet restore` fetch exactly that
# package into a private packages folder.
set -euo pipefail

VERSION="${1:-6.2.0}"
PESTER_HOME="${PESTER_HOME:-${XDG_DATA_HOME:-$HOME/.local/share}/pester}"
DEST="$PESTER_HOME/$VERSION"

die() {
  echo "install-pester: $*" >&2
  exit 1
}

[[ "$VERSION" =~ ^[0-9]+\.[0-9]+\.[0-9]+(-[0-9A-Za-z.-]+)?$ ]] || die "'$VERSION' is not a version number (expected e.g. 6.2.0)"

installed_version() {
  # Prints the ModuleVersion declared by an installed manifest, if any.
  [[ -f "$1/Pester.psd1" ]] || return 0
  sed -n "s/^[[:space:]]*ModuleVersion[[:space:]]*=[[:space:]]*'\([^']*\)'.*/\1/p" "$1/Pester.psd1" | head -n 1
}

if [[ "$(installed_version "$DEST")" == "${VERSION%%-*}" ]]; then
  echo "install-pester: Pester $VERSION already installed in $DEST" >&2
  echo "$DEST/Pester.psd1"
  exit 0
fi

command -v dotnet >/dev/null 2>&1 || die "dotnet not found on PATH (install a .NET SDK first)"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/install-pester.XXXXXX")"
STAGE=""
cleanup() {
  rm -rf "$WORK"
  if [[ -n "$STAGE" && -d "$STAGE" ]]; then rm -rf "$STAGE"; fi
}
trap cleanup EXIT

cat >"$WORK/pester-download.csproj" <<EOF
<Project Sdk="Microsoft.NET.Sdk">
  <PropertyGroup>
    <TargetFramework>netstandard2.0</TargetFramework>
  </PropertyGroup>
  <ItemGroup>
    <PackageDownload Include="Pester" Version="[$VERSION]" />
  </ItemGroup>
</Project>
EOF

echo "install-pester: downloading Pester $VERSION from NuGet" >&2
export DOTNET_CLI_TELEMETRY_OPTOUT=1 DOTNET_NOLOGO=1 DOTNET_SKIP_FIRST_TIME_EXPERIENCE=1
if ! dotnet restore "$WORK/pester-download.csproj" --packages "$WORK/packages" >"$WORK/restore.log" 2>&1; then
  cat "$WORK/restore.log" >&2
  die "dotnet restore of NuGet package Pester $VERSION failed (see above)"
fi

# NuGet lower-cases package folder names.
TOOLS="$WORK/packages/pester/$VERSION/tools"
[[ -f "$TOOLS/Pester.psd1" ]] || die "the Pester $VERSION package has no tools/Pester.psd1 (unexpected package layout)"
[[ "$(installed_version "$TOOLS")" == "${VERSION%%-*}" ]] ||
  die "the downloaded Pester.psd1 declares version '$(installed_version "$TOOLS")', expected ${VERSION%%-*}"

mkdir -p "$PESTER_HOME"
STAGE="$(mktemp -d "$PESTER_HOME/.staging.XXXXXX")"
cp -R "$TOOLS/." "$STAGE/"
rm -rf "$DEST"
mv "$STAGE" "$DEST"
chmod 755 "$DEST"

echo "install-pester: installed Pester $VERSION in $DEST" >&2
echo "$DEST/Pester.psd1"
