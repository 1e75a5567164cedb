#!/usr/bin/env bash
# run.sh - test entry for the guest-side PowerShell (npm run test:pwsh).
#
# Usage:   bash test/pwsh/run.sh [PESTER_ARGS...]
#          extra arguments are passed to test/pwsh/Invoke-TestRun.ps1, e.g.
#          -Path test/pwsh/Check.Tests.ps1 to run one file.
# Env:     PESTER_VERSION (default 6.2.0), PESTER_HOME (see scripts/install-pester.sh).
# Needs:   pwsh on PATH or in ~/.dotnet/tools (dotnet tool install --global PowerShell),
#          Pester (installed on first use by scripts/install-pester.sh if missing).
# Does:    1) parses every .ps1/.psm1/.psd1 under provisioning/ and test/ with the
#             PowerShell parser and fails on any syntax error;
#          2) runs Pester on test/pwsh/*.Tests.ps1.
#          The last line printed is "N passed, N failed" (", N skipped" when some were).
# Exit:    0 when everything parsed and every test passed; 1 otherwise.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/../.." && pwd)"
PESTER_VERSION="${PESTER_VERSION:-6.2.0}"

PWSH="$(command -v pwsh || true)"
if [[ -z "$PWSH" && -x "$HOME/.dotnet/tools/pwsh" ]]; then
  PWSH="$HOME/.dotnet/tools/pwsh"
fi
if [[ -z "$PWSH" ]]; then
  echo "test:pwsh: pwsh not found on PATH or in ~/.dotnet/tools;" \
    "install it with: dotnet tool install --global PowerShell --version 7.6.9" >&2
  exit 1
fi

PESTER_PSD1="$(bash "$REPO_ROOT/scripts/install-pester.sh" "$PESTER_VERSION")"
# The tests start child pwsh processes with this path.
export PWSH_PATH="$PWSH"

exec "$PWSH" -NoLogo -NoProfile -NonInteractive -File "$SCRIPT_DIR/Invoke-TestRun.ps1" \
  -RepoRoot "$REPO_ROOT" -PesterPath "$PESTER_PSD1" "$@"
