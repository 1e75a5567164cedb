/**
 * What the guest provisioning stage sends to Windows: the settings JSON that
 * provision.ps1 and check.ps1 read (a secret: it holds the builder password),
 * and the one PowerShell command run over SSH that feeds it to them.
 */
import { StackConfig } from "../config";
import { CONFIG_MEDIA_MARKER, GUEST_LOG_DIR } from "../answerFile";

export const SERVICES_TO_DISABLE = Object.freeze([
  "NlaSvc",
  "LanmanServer",
  "BITS",
  "DPS",
  "MSDTC",
  "IKEEXT",
  "RemoteRegistry",
  "lmhosts",
]);

/** The settings provision.ps1 and check.ps1 read (see provisioning/windows/README in the main README). */
export function guestSettings(c: StackConfig, builderPassword: string): Record<string, unknown> {
  const g = c.guest;
  return {
    logPath: `${GUEST_LOG_DIR}\\provision.log`,
    disableWindowsUpdate: g.disableWindowsUpdate,
    disableErrorReportingUi: g.disableErrorReportingUi,
    disableUac: g.disableUac,
    disableFirewall: g.disableFirewall,
    disableDefenderRealtime: g.disableDefenderRealtime,
    disableServices: g.disableServices,
    servicesToDisable: [...SERVICES_TO_DISABLE],
    installBuildlet: g.buildlet !== undefined,
    buildletStage0Url: g.buildlet?.url ?? null,
    buildletStage0Sha256: g.buildlet?.sha256 ?? null,
    // GO_BUILDER_ENV for stage0, set machine-wide (stage0 panics on windows/arm64 without it).
    buildletEnv: g.buildletEnv ?? null,
    installLlvmMingw: g.llvmMingw !== undefined,
    llvmMingwUrl: g.llvmMingw?.url ?? null,
    llvmMingwSha256: g.llvmMingw?.sha256 ?? null,
    installVsBuildTools: g.vsBuildTools !== undefined,
    vsBuildToolsUrl: g.vsBuildTools?.url ?? null,
    vsBuildToolsSha256: g.vsBuildTools?.sha256 ?? null,
    // Picks the components (2026 has no 32-bit ARM VC tools) and the version vswhere must find.
    vsVersion: g.vsVersion,
    createBuilderUser: true,
    builderUser: g.adminUser,
    builderPassword,
    autoLogon: g.autoLogon,
  };
}

/**
 * PowerShell that reads all of stdin as bytes and decodes them as UTF-8 into
 * `$json` (a byte order mark dropped). The command provider sends the settings
 * as UTF-8, and `[Console]::In` in Windows PowerShell 5.1 would decode them with
 * the console's OEM code page (437, 850, ...), garbling any non-ASCII value.
 */
export const GUEST_READ_STDIN_UTF8: readonly string[] = Object.freeze([
  "$stdin = [Console]::OpenStandardInput()",
  "$buffer = New-Object System.IO.MemoryStream",
  "$stdin.CopyTo($buffer)",
  "$json = [Text.Encoding]::UTF8.GetString($buffer.ToArray()).TrimStart([char]0xFEFF)",
]);

/**
 * The PowerShell run in the guest: reads the settings JSON from stdin (as
 * UTF-8 bytes) into a file only Administrators can read (UTF-8, no byte order
 * mark), runs provision.ps1 and then check.ps1 from the config media, deletes
 * the file, and exits with the first failure.
 */
export const GUEST_PROVISION_SCRIPT = [
  "$ErrorActionPreference = 'Stop'",
  ...GUEST_READ_STDIN_UTF8,
  `$media = Get-PSDrive -PSProvider FileSystem | Where-Object { Test-Path (Join-Path $_.Root '${CONFIG_MEDIA_MARKER}') } | Select-Object -First 1`,
  // Messages go to stderr and the exit code is ours (Write-Error would throw under 'Stop' and exit 1).
  "function Fail([string]$m, [int]$code) { [Console]::Error.WriteLine('provision: ' + $m); exit $code }",
  "if (-not $media) { Fail 'the config media (windows-arm64-image.marker) is not attached' 3 }",
  "$dir = Join-Path $env:ProgramData 'windows-arm64-image'",
  "New-Item -ItemType Directory -Force -Path $dir | Out-Null",
  "$cfg = Join-Path $dir 'settings.json'",
  // The settings hold a password: only Administrators and SYSTEM may read the file, before it is written.
  "New-Item -ItemType File -Force -Path $cfg | Out-Null",
  "& icacls.exe $cfg /inheritance:r /grant '*S-1-5-32-544:F' /grant '*S-1-5-18:F' | Out-Null",
  'if ($LASTEXITCODE -ne 0) { Fail "icacls on $cfg failed with exit code $LASTEXITCODE" 4 }',
  // Native commands' stderr must not turn into terminating errors: their exit codes decide.
  "$ErrorActionPreference = 'Continue'",
  "try {",
  "  [IO.File]::WriteAllText($cfg, $json, (New-Object System.Text.UTF8Encoding($false)))",
  "  & powershell.exe -NoProfile -NonInteractive -ExecutionPolicy Bypass -File (Join-Path $media.Root 'provision.ps1') -ConfigPath $cfg",
  '  if ($LASTEXITCODE -ne 0) { Fail "provision.ps1 failed with exit code $LASTEXITCODE (log: $dir\\provision.log)" $LASTEXITCODE }',
  "  & powershell.exe -NoProfile -NonInteractive -ExecutionPolicy Bypass -File (Join-Path $media.Root 'check.ps1') -ConfigPath $cfg",
  '  if ($LASTEXITCODE -ne 0) { Fail "check.ps1 found settings that are not as configured (exit $LASTEXITCODE)" $LASTEXITCODE }',
  "} finally { Remove-Item -LiteralPath $cfg -Force -ErrorAction SilentlyContinue }",
].join("\n");

/** `powershell -EncodedCommand` form (base64 of UTF-16LE), for cmd.exe, Windows' default SSH shell. */
export function encodedPowerShell(script: string): string {
  return `powershell -NoProfile -NonInteractive -ExecutionPolicy Bypass -EncodedCommand ${Buffer.from(script, "utf16le").toString("base64")}`;
}

export function guestProvisionCommand(): string {
  return encodedPowerShell(GUEST_PROVISION_SCRIPT);
}
