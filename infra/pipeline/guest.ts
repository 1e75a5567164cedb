/**
 * What the guest provisioning stage sends to Windows: the settings JSON that
 * provision.ps1 and check.ps1 read (a secret: it holds the builder password),
 * and the one PowerShell command run over SSH that feeds it to them.
 */
import { StackConfig } from "../config";
import { CONFIG_MEDIA_MARKER, GUEST_LOG_DIR } from "../answerFile";
import { SOFTWARE_REPORT_FILE } from "../manifest";

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
 * Where the guest keeps check.ps1 and common.psm1 (copied from the config
 * media once the check passed): the baked image's smoke test runs the same
 * check there, with no config media attached.
 */
export const GUEST_CHECK_DIR = `${GUEST_LOG_DIR}\\check`;
/** The files kept in GUEST_CHECK_DIR. */
export const GUEST_CHECK_FILES = Object.freeze(["check.ps1", "common.psm1"]);

/** PowerShell that writes $json to $cfg, a file only Administrators and SYSTEM can read (created before it is written). */
const WRITE_SETTINGS_FILE: readonly string[] = Object.freeze([
  "New-Item -ItemType File -Force -Path $cfg | Out-Null",
  "& icacls.exe $cfg /inheritance:r /grant '*S-1-5-32-544:F' /grant '*S-1-5-18:F' | Out-Null",
  'if ($LASTEXITCODE -ne 0) { Fail "icacls on $cfg failed with exit code $LASTEXITCODE" 4 }',
]);

/**
 * The prefix of the stdout line that carries the guest's software report
 * (base64 of software-report.json) to the host: guest-run.sh with
 * GUEST_RUN_REPORT saves it there and does not print the line.
 */
export const SOFTWARE_REPORT_TAG = "windows-arm64-image-software-report: ";

/**
 * The PowerShell run in the guest: reads the settings JSON from stdin (as
 * UTF-8 bytes) into a file only Administrators can read (UTF-8, no byte order
 * mark), runs provision.ps1 and then check.ps1 from the config media, keeps
 * check.ps1 and common.psm1 in GUEST_CHECK_DIR (for the smoke test), deletes
 * the file, and exits with the first failure. Once the check passed it prints
 * the software report check.ps1 wrote as one SOFTWARE_REPORT_TAG line.
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
  ...WRITE_SETTINGS_FILE,
  // Native commands' stderr must not turn into terminating errors: their exit codes decide.
  "$ErrorActionPreference = 'Continue'",
  "try {",
  "  [IO.File]::WriteAllText($cfg, $json, (New-Object System.Text.UTF8Encoding($false)))",
  "  & powershell.exe -NoProfile -NonInteractive -ExecutionPolicy Bypass -File (Join-Path $media.Root 'provision.ps1') -ConfigPath $cfg",
  '  if ($LASTEXITCODE -ne 0) { Fail "provision.ps1 failed with exit code $LASTEXITCODE (log: $dir\\provision.log)" $LASTEXITCODE }',
  `  $report = Join-Path $dir '${SOFTWARE_REPORT_FILE}'`,
  "  & powershell.exe -NoProfile -NonInteractive -ExecutionPolicy Bypass -File (Join-Path $media.Root 'check.ps1') -ConfigPath $cfg -ReportPath $report",
  '  if ($LASTEXITCODE -ne 0) { Fail "check.ps1 found settings that are not as configured (exit $LASTEXITCODE)" $LASTEXITCODE }',
  // The software report travels to the host on stdout, as one tagged base64 line (guest-run.sh saves it).
  '  if (-not (Test-Path -LiteralPath $report -PathType Leaf)) { Fail "check.ps1 wrote no software report ($report)" 6 }',
  `  [Console]::Out.WriteLine('${SOFTWARE_REPORT_TAG}' + [Convert]::ToBase64String([IO.File]::ReadAllBytes($report)))`,
  // The smoke test of the baked image runs the same check from here.
  "  $keep = Join-Path $dir 'check'",
  "  try {",
  "    New-Item -ItemType Directory -Force -Path $keep -ErrorAction Stop | Out-Null",
  `    foreach ($f in ${GUEST_CHECK_FILES.map((f) => `'${f}'`).join(", ")}) { Copy-Item -LiteralPath (Join-Path $media.Root $f) -Destination (Join-Path $keep $f) -Force -ErrorAction Stop }`,
  '  } catch { Fail "cannot keep the check scripts in ${keep} for the smoke test: $($_.Exception.Message)" 5 }',
  "} finally { Remove-Item -LiteralPath $cfg -Force -ErrorAction SilentlyContinue }",
].join("\n");

/**
 * The smoke test's check, run in the baked image's guest over SSH: reads the
 * settings JSON from stdin (UTF-8 bytes) into a file only Administrators can
 * read, runs the kept GUEST_CHECK_DIR\\check.ps1 with it, deletes the file,
 * and exits with check.ps1's exit code (3: the check is not kept in the
 * image; 4: icacls failed). The check's table goes to stdout.
 */
export const GUEST_SMOKE_CHECK_SCRIPT = [
  "$ErrorActionPreference = 'Stop'",
  ...GUEST_READ_STDIN_UTF8,
  "function Fail([string]$m, [int]$code) { [Console]::Error.WriteLine('smoke-check: ' + $m); exit $code }",
  "$dir = Join-Path $env:ProgramData 'windows-arm64-image'",
  "$check = Join-Path (Join-Path $dir 'check') 'check.ps1'",
  'if (-not (Test-Path -LiteralPath $check -PathType Leaf)) { Fail "$check is not in the image: the guest provisioning keeps it there" 3 }',
  "$cfg = Join-Path $dir 'smoke-settings.json'",
  ...WRITE_SETTINGS_FILE,
  "$ErrorActionPreference = 'Continue'",
  "try {",
  "  [IO.File]::WriteAllText($cfg, $json, (New-Object System.Text.UTF8Encoding($false)))",
  "  & powershell.exe -NoProfile -NonInteractive -ExecutionPolicy Bypass -File $check -ConfigPath $cfg",
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

/** The smoke test's guest command (cmd.exe runs it). */
export function guestSmokeCheckCommand(): string {
  return encodedPowerShell(GUEST_SMOKE_CHECK_SCRIPT);
}
