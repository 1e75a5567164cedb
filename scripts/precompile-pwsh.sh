#!/usr/bin/env bash
# precompile-pwsh.sh - compile the PowerShell .NET tool's main assemblies ahead of time
# (ReadyToRun, as Microsoft's own pwsh release packages are), so each pwsh start stops
# JIT-compiling PowerShell itself: about 0.55 s of CPU a start instead of about 1.3 s.
# The test suites start pwsh about a hundred times.
#
# Usage:   bash scripts/precompile-pwsh.sh          (after `dotnet tool install --global PowerShell`)
# Env:     PWSH_TOOL_ROOT     the tool's store folder (default ~/.dotnet/tools/.store/powershell)
#          CROSSGEN_HOME      where the crossgen2 package is restored (default ~/.cache/pwsh-crossgen)
# Needs:   dotnet (the SDK; NuGet must be reachable the first time: the compiler comes from
#          the Microsoft.NETCore.App.Crossgen2.<rid> package of the runtime pwsh runs on).
# Does:    for each assembly below that is not compiled yet, crossgen2 writes a ReadyToRun
#          copy (the same IL plus native code), which replaces the original only when
#          crossgen2 succeeded; then `pwsh -Command` must still print its version, or every
#          original is put back. The IL is unchanged, so PowerShell behaves the same.
# Idempotent: a stamp (.r2r-stamp beside the assemblies: runtime version and list) skips
#          work already done.
# Exit:    0 also when it cannot precompile (no crossgen2 package, an unknown runtime): it
#          says why in a "precompile-pwsh: warning: ..." line, and pwsh stays as installed,
#          only slower to start. 1 when pwsh is not installed.
set -euo pipefail

PROG=precompile-pwsh
TOOL_ROOT=${PWSH_TOOL_ROOT:-$HOME/.dotnet/tools/.store/powershell}
CROSSGEN_HOME=${CROSSGEN_HOME:-$HOME/.cache/pwsh-crossgen}
# The assemblies a pwsh start and a Pester run load (AppDomain.GetAssemblies()).
ASSEMBLIES=(
  System.Management.Automation pwsh Microsoft.PowerShell.ConsoleHost
  Microsoft.PowerShell.Commands.Utility Microsoft.PowerShell.Commands.Management
  Microsoft.PowerShell.Security Microsoft.PowerShell.MarkdownRender
  Microsoft.ApplicationInsights Newtonsoft.Json
)

log() { echo "$PROG: $*" >&2; }
warn() {
  log "warning: $*; pwsh stays as installed (slower to start)"
  exit 0
}

unix=$(find "$TOOL_ROOT" -path '*/tools/net*/any/unix/pwsh.dll' -printf '%h\n' 2>/dev/null | sort | tail -n 1)
[[ -n $unix ]] || {
  log "error: no PowerShell .NET tool under $TOOL_ROOT (install it first: dotnet tool install --global PowerShell)"
  exit 1
}
command -v dotnet >/dev/null || warn "dotnet not found"

# The runtime pwsh runs on: the newest installed Microsoft.NETCore.App of its major version.
major=$(sed -n 's/.*"version": *"\([0-9]*\)\..*/\1/p' "$unix/pwsh.runtimeconfig.json" | head -n 1)
[[ $major =~ ^[0-9]+$ ]] || warn "cannot read the runtime version from $unix/pwsh.runtimeconfig.json"
read -r runtime fw_dir < <(dotnet --list-runtimes |
  sed -n "s/^Microsoft\.NETCore\.App \($major\.[0-9.]*\) \[\(.*\)\]$/\1 \2/p" | sort -V | tail -n 1) || true
[[ -n ${runtime:-} && -d $fw_dir/$runtime ]] || warn "no Microsoft.NETCore.App $major.x runtime found"
fw=$fw_dir/$runtime

case $(uname -m) in
  x86_64) rid=linux-x64 arch=x64 ;;
  aarch64) rid=linux-arm64 arch=arm64 ;;
  *) warn "no crossgen2 for $(uname -m)" ;;
esac

stamp="$unix/.r2r-stamp"
want="runtime $runtime ${ASSEMBLIES[*]}"
if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then
  log "already precompiled for Microsoft.NETCore.App $runtime"
  exit 0
fi

# crossgen2 of exactly that runtime version, restored by a throw-away project.
pkg=microsoft.netcore.app.crossgen2.$rid
crossgen=$CROSSGEN_HOME/packages/$pkg/$runtime/tools/crossgen2
if [[ ! -x $crossgen ]]; then
  log "restoring Microsoft.NETCore.App.Crossgen2.$rid $runtime from NuGet"
  proj=$(mktemp -d)
  trap 'rm -rf -- "$proj"' EXIT
  cat >"$proj/crossgen.csproj" <<EOF
<Project Sdk="Microsoft.NET.Sdk">
  <PropertyGroup><TargetFramework>net$major.0</TargetFramework></PropertyGroup>
  <ItemGroup><PackageDownload Include="Microsoft.NETCore.App.Crossgen2.$rid" Version="[$runtime]" /></ItemGroup>
</Project>
EOF
  timeout 600 dotnet restore "$proj/crossgen.csproj" --packages "$CROSSGEN_HOME/packages" >"$proj/restore.log" 2>&1 ||
    warn "dotnet restore of Microsoft.NETCore.App.Crossgen2.$rid $runtime failed: $(grep -m1 -E 'error|NU1' "$proj/restore.log" | cut -c1-300)"
  [[ -x $crossgen ]] || warn "the crossgen2 package has no $crossgen"
fi

work=$(mktemp -d "$unix/.r2r.XXXXXX")
backup=$work/original
mkdir -p "$backup"
restore_all() {
  local f
  for f in "$backup"/*.dll; do [[ -e $f ]] && mv -f -- "$f" "$unix/"; done
}
t0=$SECONDS
for a in "${ASSEMBLIES[@]}"; do
  dll=$unix/$a.dll
  [[ -f $dll ]] || continue
  if timeout 600 "$crossgen" "$dll" -o "$work/$a.dll" -r "$fw/*.dll" -r "$unix/*.dll" \
    --targetos linux --targetarch "$arch" -O >"$work/$a.log" 2>&1; then
    cp -p -- "$dll" "$backup/$a.dll"
    mv -f -- "$work/$a.dll" "$dll"
  else
    log "warning: crossgen2 could not compile $a.dll (left as it was): $(tail -n 1 "$work/$a.log" | cut -c1-300)"
  fi
done
# shellcheck disable=SC2016 # PowerShell code, not shell
if ! out=$(timeout 120 dotnet "$unix/pwsh.dll" -NoLogo -NoProfile -NonInteractive -Command '$PSVersionTable.PSVersion.ToString()' 2>&1); then
  restore_all
  rm -rf -- "$work"
  warn "pwsh failed after precompiling ($(tr '\n' ' ' <<<"$out" | cut -c1-300)); the originals are back"
fi
rm -rf -- "$work"
printf '%s\n' "$want" >"$stamp"
log "precompiled PowerShell $out for Microsoft.NETCore.App $runtime in $((SECONDS - t0)) s"
