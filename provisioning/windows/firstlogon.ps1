<#
.SYNOPSIS
  First-logon setup of the Windows ARM64 guest: OpenSSH server reachable with
  the build pipeline's key.

.DESCRIPTION
  Run once by the answer file (FirstLogonCommands, order 2) from the root of
  the config media, after the virtio drivers were installed (order 1).

  About order 1: it runs pnputil /add-driver /install on virtio-win's
  <driver>\w11\ARM64 (or w10) folders, each run bounded to 5 minutes, after
  adding each package's catalog signer to the machine's TrustedPublisher
  store. virtio-win's drivers for Windows 10 and later are Microsoft
  attestation-signed, so pnputil installs them without any "install this
  device software?" prompt, and trusting a publisher does not make an
  unsigned or self-signed driver load on Windows 11 ARM64 (kernel drivers
  need Microsoft's signature there). The trust step is kept because it is
  harmless: it adds no root certificate, only the leaf certificate that
  signs the catalog (Microsoft's, for attestation-signed packages), and
  nothing this image runs relies on that store (its scripts run with
  -ExecutionPolicy Bypass). It only matters for a package signed by
  another publisher whose chain Windows already trusts.

  Steps of this script:
    1. install the OpenSSH server: the Windows capability
       OpenSSH.Server~~~~0.0.1.0 (served by Windows Update, so it waits for
       the network first); if that fails and OpenSSH-ARM64.zip (a
       Win32-OpenSSH release) is on the config media, expand it to
       C:\Program Files\OpenSSH and run its install-sshd.ps1;
    2. close TCP 22 in the firewall, set sshd to start automatically and
       start it (its first start creates C:\ProgramData\ssh with the right
       permissions and the host keys);
    3. copy the config media's authorized_keys to
       C:\ProgramData\ssh\administrators_authorized_keys, readable only by
       Administrators and SYSTEM (SIDs, so it works on any display language);
    4. allow inbound TCP 22 in the firewall (rule OpenSSH-Server-In-TCP), so
       the pipeline, which connects once it sees the SSH banner, finds its key.
  First-logon commands run once: when a step fails (Windows Update not
  reachable yet, say), a scheduled task (windows-arm64-image-firstlogon, as
  SYSTEM) runs this script again every 5 minutes until it succeeds; a success
  removes the task.
  The OpenSSH default shell is left alone (cmd.exe): the pipeline runs
  PowerShell as `powershell -NoProfile -NonInteractive -EncodedCommand ...`.

  Idempotent: each step checks the current state first, so a rerun only
  repairs what is missing. Logs to
  C:\ProgramData\windows-arm64-image\firstlogon.log. Never logs key material.

.PARAMETER MediaRoot
  Folder holding authorized_keys (and optionally OpenSSH-ARM64.zip).
  Default: the folder of this script (the config media root).

.PARAMETER OpenSshSource
  Auto (default): the Windows capability, then the zip. Capability or Zip:
  only that source.

.PARAMETER NetworkWaitSeconds
  How long to wait for an IPv4 address before asking Windows Update for the
  capability (default 180).

.OUTPUTS
  Exit code 0 when sshd runs with the key installed; 1 otherwise, with the
  cause in the log.
#>
[CmdletBinding()]
param(
  [string]$MediaRoot = $PSScriptRoot,
  [ValidateSet('Auto', 'Capability', 'Zip')]
  [string]$OpenSshSource = 'Auto',
  [int]$NetworkWaitSeconds = 180
)

Set-StrictMode -Version 3.0
$ErrorActionPreference = 'Stop'

$LogDir = Join-Path $env:ProgramData 'windows-arm64-image'
$LogFile = Join-Path $LogDir 'firstlogon.log'
$CapabilityName = 'OpenSSH.Server~~~~0.0.1.0'
$ZipInstallDir = Join-Path $env:ProgramFiles 'OpenSSH'
$SshDataDir = Join-Path $env:ProgramData 'ssh'
$AdminKeysFile = Join-Path $SshDataDir 'administrators_authorized_keys'
$FirewallRuleName = 'OpenSSH-Server-In-TCP'
$RetryTaskName = 'windows-arm64-image-firstlogon'
$RetryMinutes = 5

function Write-Log([string]$Message) {
  $line = '{0} firstlogon: {1}' -f (Get-Date -Format 'yyyy-MM-ddTHH:mm:ssK'), $Message
  Add-Content -Path $LogFile -Value $line -Encoding UTF8
  Write-Host $line
}

function Test-Sshd {
  return $null -ne (Get-Service -Name sshd -ErrorAction SilentlyContinue)
}

function Wait-Network([int]$Seconds) {
  $deadline = (Get-Date).AddSeconds($Seconds)
  while ((Get-Date) -lt $deadline) {
    $addr = Get-NetIPAddress -AddressFamily IPv4 -ErrorAction SilentlyContinue |
      Where-Object { $_.IPAddress -ne '127.0.0.1' -and $_.IPAddress -notlike '169.254.*' }
    if ($addr) { return $true }
    Start-Sleep -Seconds 5
  }
  return $false
}

function Install-FromCapability {
  $cap = Get-WindowsCapability -Online -Name $CapabilityName
  if ($cap -and $cap.State -eq 'Installed' -and (Test-Sshd)) { return }
  if (-not (Wait-Network $NetworkWaitSeconds)) {
    Write-Log "no IPv4 address after $NetworkWaitSeconds s; trying Windows Update anyway"
  }
  Write-Log "installing capability $CapabilityName (Windows Update)"
  Add-WindowsCapability -Online -Name $CapabilityName | Out-Null
}

function Install-FromZip {
  $zip = Join-Path $MediaRoot 'OpenSSH-ARM64.zip'
  if (-not (Test-Path -LiteralPath $zip)) { throw "OpenSSH-ARM64.zip not found in $MediaRoot" }
  Write-Log "installing Win32-OpenSSH from $zip to $ZipInstallDir"
  $tmp = Join-Path $env:TEMP ('openssh-' + [guid]::NewGuid())
  Expand-Archive -LiteralPath $zip -DestinationPath $tmp -Force
  # The release zip holds one folder (OpenSSH-ARM64); accept a flat zip too.
  $script = Get-ChildItem -Path $tmp -Filter 'install-sshd.ps1' -Recurse | Select-Object -First 1
  if (-not $script) { throw "install-sshd.ps1 not found in $zip" }
  New-Item -ItemType Directory -Force -Path $ZipInstallDir | Out-Null
  Copy-Item -Path (Join-Path $script.DirectoryName '*') -Destination $ZipInstallDir -Recurse -Force
  Remove-Item -LiteralPath $tmp -Recurse -Force
  & powershell.exe -NoProfile -NonInteractive -ExecutionPolicy Bypass -File (Join-Path $ZipInstallDir 'install-sshd.ps1')
  if ($LASTEXITCODE -ne 0) { throw "install-sshd.ps1 failed with exit code $LASTEXITCODE" }
  $machinePath = [Environment]::GetEnvironmentVariable('Path', 'Machine')
  if (($machinePath -split ';') -notcontains $ZipInstallDir) {
    [Environment]::SetEnvironmentVariable('Path', "$machinePath;$ZipInstallDir", 'Machine')
  }
}

function Install-OpenSshServer {
  if (Test-Sshd) {
    Write-Log 'sshd service already present'
    return
  }
  $problems = @()
  if ($OpenSshSource -ne 'Zip') {
    try { Install-FromCapability } catch { $problems += "capability: $($_.Exception.Message)" }
    if (Test-Sshd) { Write-Log 'OpenSSH server installed from the Windows capability'; return }
  }
  if ($OpenSshSource -ne 'Capability') {
    try { Install-FromZip } catch { $problems += "zip: $($_.Exception.Message)" }
    if (Test-Sshd) { Write-Log 'OpenSSH server installed from OpenSSH-ARM64.zip'; return }
  }
  throw ('OpenSSH server could not be installed: ' + ($problems -join '; '))
}

function Install-AuthorizedKeys {
  $source = Join-Path $MediaRoot 'authorized_keys'
  if (-not (Test-Path -LiteralPath $source)) { throw "authorized_keys not found in $MediaRoot" }
  $keys = @(Get-Content -LiteralPath $source | ForEach-Object { $_.Trim() } | Where-Object { $_ -ne '' -and -not $_.StartsWith('#') })
  if ($keys.Count -eq 0) { throw "authorized_keys in $MediaRoot holds no key" }
  New-Item -ItemType Directory -Force -Path $SshDataDir | Out-Null
  # ASCII, LF line ends, no byte order mark: what sshd expects.
  [IO.File]::WriteAllText($AdminKeysFile, (($keys -join "`n") + "`n"), (New-Object Text.UTF8Encoding($false)))
  & icacls.exe $AdminKeysFile /inheritance:r /grant '*S-1-5-32-544:F' /grant '*S-1-5-18:F' | Out-Null
  if ($LASTEXITCODE -ne 0) { throw "icacls on $AdminKeysFile failed with exit code $LASTEXITCODE" }
  Write-Log "installed $($keys.Count) key(s) in $AdminKeysFile"
}

function Start-Sshd {
  Set-Service -Name sshd -StartupType Automatic
  if ((Get-Service -Name sshd).Status -ne 'Running') { Start-Service -Name sshd }
  Write-Log 'sshd is running and starts automatically'
}

function Close-SshPort {
  if (Get-NetFirewallRule -Name $FirewallRuleName -ErrorAction SilentlyContinue) {
    Set-NetFirewallRule -Name $FirewallRuleName -Enabled False
  }
}

function Open-SshPort {
  $rule = Get-NetFirewallRule -Name $FirewallRuleName -ErrorAction SilentlyContinue
  if ($rule) {
    Set-NetFirewallRule -Name $FirewallRuleName -Enabled True -Action Allow -Profile Any
  } else {
    New-NetFirewallRule -Name $FirewallRuleName -DisplayName 'OpenSSH Server (sshd)' -Enabled True `
      -Direction Inbound -Protocol TCP -LocalPort 22 -Action Allow -Profile Any | Out-Null
  }
  Write-Log "firewall rule $FirewallRuleName allows inbound TCP 22"
}

function Register-Retry {
  try {
    # "E:\" would end in \" (an escaped quote on a command line): pass "E:\." instead.
    $root = $MediaRoot.TrimEnd('\')
    if ($root -match ':$') { $root += '\.' }
    $arguments = '-NoProfile -NonInteractive -ExecutionPolicy Bypass -File "{0}" -MediaRoot "{1}" -OpenSshSource {2}' -f $PSCommandPath, $root, $OpenSshSource
    $action = New-ScheduledTaskAction -Execute 'powershell.exe' -Argument $arguments
    $trigger = New-ScheduledTaskTrigger -Once -At ((Get-Date).AddMinutes($RetryMinutes)) -RepetitionInterval (New-TimeSpan -Minutes $RetryMinutes)
    Register-ScheduledTask -TaskName $RetryTaskName -Action $action -Trigger $trigger -User 'SYSTEM' -RunLevel Highest -Force | Out-Null
    Write-Log "retrying every $RetryMinutes minutes (scheduled task $RetryTaskName) until it succeeds"
  } catch {
    Write-Log "could not schedule a retry: $($_.Exception.Message)"
  }
}

function Unregister-Retry {
  try {
    if (Get-ScheduledTask -TaskName $RetryTaskName -ErrorAction SilentlyContinue) {
      Unregister-ScheduledTask -TaskName $RetryTaskName -Confirm:$false
      Write-Log "removed the retry task $RetryTaskName"
    }
  } catch {
    Write-Log "could not remove the retry task ${RetryTaskName}: $($_.Exception.Message)"
  }
}

New-Item -ItemType Directory -Force -Path $LogDir | Out-Null
try {
  Write-Log "start (media $MediaRoot, source $OpenSshSource)"
  Install-OpenSshServer
  # sshd's first start makes C:\ProgramData\ssh (restricted) and the host keys; the port stays
  # closed until the key is in place, as the pipeline connects once it sees the SSH banner.
  Close-SshPort
  Start-Sshd
  Install-AuthorizedKeys
  Open-SshPort
  Write-Log 'done'
  Unregister-Retry
  exit 0
} catch {
  Write-Log "FAILED: $($_.Exception.Message)"
  Register-Retry
  exit 1
}
