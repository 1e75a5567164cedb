#Requires -Version 5.1

<#
.SYNOPSIS
    Verifies what provision.ps1 set up (runs inside the guest, elevated).
.DESCRIPTION
    Reads the same JSON settings file as provision.ps1 and, for every step
    that is switched on, reads the machine's state and compares it with what
    the step sets. Prints a table with one row per setting:
        Step | Setting | Expected | Actual | Result
    followed by a summary line. Passwords are never printed: the autologon
    password row shows only whether it matches. Defender shows which applied:
    real-time monitoring off, or, when Tamper Protection keeps it on, one row
    per build folder that must be excluded from scanning. The answer-file row
    (always checked) lists every unattend.xml or autounattend.xml still under
    C:\Windows\Panther or C:\Windows\System32\Sysprep. Changes nothing
    but ReportPath.
    Then writes the software report to ReportPath (JSON, UTF-8): Windows
    edition and build, the drivers not from Microsoft with their versions,
    the OpenSSH server's version, every installed tool with its version and
    the SHA-256 of its download, each step on or off and the rows of the
    table (the settings applied; passwords only as matching or not). The
    publish stage puts it next to the image's manifest.
.PARAMETER ConfigPath
    Path of the JSON settings file given to provision.ps1.
.PARAMETER ReportPath
    Where the software report goes; default software-report.json in the
    folder of the settings' logPath.
.OUTPUTS
    The table (strings on the output stream). Exit code 0 when every check
    passed; 1 when any failed or the report could not be written; 2 when the
    settings are invalid.
.EXAMPLE
    powershell -NoProfile -ExecutionPolicy Bypass -File C:\provisioning\check.ps1 -ConfigPath C:\Windows\Temp\settings.json
#>
[CmdletBinding()]
param(
    [Parameter(Mandatory = $true)][string]$ConfigPath,
    [string]$ReportPath = ''
)
Set-StrictMode -Version Latest
$ErrorActionPreference = 'Stop'

Import-Module (Join-Path $PSScriptRoot 'common.psm1') -DisableNameChecking

$script:AdministratorsSid = 'S-1-5-32-544'

function New-CheckRow {
    param([string]$Step, [string]$Setting, [string]$Expected, [string]$Actual, [bool]$Pass)
    $result = 'FAIL'
    if ($Pass) { $result = 'PASS' }
    [pscustomobject]@{ Step = $Step; Setting = $Setting; Expected = $Expected; Actual = $Actual; Result = $result }
}

function Get-RegistryRows {
    param([Parameter(Mandatory = $true)]$Settings, [Parameter(Mandatory = $true)][string]$Step)
    foreach ($value in @(Get-DesiredRegistryValues -Settings $Settings -Step $Step)) {
        $actual = Get-RegistryValue -Path $value.Path -Name $value.Name
        $pass = Test-RegistryValueEqual -Current $actual -Desired $value.Value -Type $value.Type
        $setting = '{0}\{1}' -f $value.Path, $value.Name
        if ($value.Secret) {
            $shownActual = '(missing)'
            if ($null -ne $actual) { if ($pass) { $shownActual = '(matches)' } else { $shownActual = '(differs)' } }
            New-CheckRow -Step $Step -Setting $setting -Expected '(configured password)' -Actual $shownActual -Pass $pass
        }
        else {
            $shownActual = '(missing)'
            if ($null -ne $actual) { $shownActual = [string]$actual }
            New-CheckRow -Step $Step -Setting $setting -Expected ([string]$value.Value) -Actual $shownActual -Pass $pass
        }
    }
    foreach ($value in @(Get-AbsentRegistryValues -Step $Step)) {
        $actual = Get-RegistryValue -Path $value.Path -Name $value.Name
        $shownActual = '(absent)'
        if ($null -ne $actual) { $shownActual = [string]$actual }
        New-CheckRow -Step $Step -Setting ('{0}\{1}' -f $value.Path, $value.Name) -Expected '(absent)' -Actual $shownActual -Pass ($null -eq $actual)
    }
}

function Get-FileHashRow {
    param([string]$Step, [string]$Path, [string]$Sha256)
    $expected = $Sha256.ToLowerInvariant()
    $actual = '(missing)'
    if (Test-Path -LiteralPath $Path -PathType Leaf) { $actual = Get-FileSha256 -Path $Path }
    New-CheckRow -Step $Step -Setting ('{0} SHA-256' -f $Path) -Expected $expected -Actual $actual -Pass ($actual -eq $expected)
}

$checks = [ordered]@{
    'disable-windows-update'     = { param($s) Get-RegistryRows -Settings $s -Step 'disable-windows-update' }
    'disable-error-reporting-ui' = { param($s) Get-RegistryRows -Settings $s -Step 'disable-error-reporting-ui' }
    'disable-uac'                = { param($s) Get-RegistryRows -Settings $s -Step 'disable-uac' }
    'disable-firewall'           = {
        param($s)
        $profiles = @(Get-NetFirewallProfile)
        if ($profiles.Count -eq 0) {
            New-CheckRow -Step 'disable-firewall' -Setting 'firewall profiles' -Expected 'Enabled=False' -Actual '(none found)' -Pass $false
        }
        foreach ($fwProfile in $profiles) {
            $enabled = [string]$fwProfile.Enabled
            New-CheckRow -Step 'disable-firewall' -Setting ('firewall profile {0} Enabled' -f $fwProfile.Name) -Expected 'False' -Actual $enabled -Pass ($enabled -eq 'False')
        }
    }
    'disable-defender-realtime'  = {
        param($s)
        $step = 'disable-defender-realtime'
        $preference = Get-MpPreference
        $actual = [string]$preference.DisableRealtimeMonitoring
        if ($actual -ne 'True' -and (Test-TamperProtected)) {
            # Real-time monitoring cannot be turned off from a script: the build folders are excluded instead.
            New-CheckRow -Step $step -Setting 'Defender DisableRealtimeMonitoring' -Expected 'True (or exclusions under Tamper Protection)' -Actual ('{0} (Tamper Protection on: exclusions apply)' -f $actual) -Pass $true
            $excluded = @($preference.ExclusionPath)
            foreach ($path in @(Get-DefenderExclusionPaths -Settings $s)) {
                $present = Test-DefenderExclusion -Path $path -Excluded $excluded
                $shown = '(missing)'
                if ($present) { $shown = 'excluded' }
                New-CheckRow -Step $step -Setting ('Defender ExclusionPath {0}' -f $path) -Expected 'excluded' -Actual $shown -Pass $present
            }
        } else {
            New-CheckRow -Step $step -Setting 'Defender DisableRealtimeMonitoring' -Expected 'True' -Actual $actual -Pass ($actual -eq 'True')
        }
    }
    'disable-services'           = {
        param($s)
        foreach ($name in $s.servicesToDisable) {
            $service = Get-Service -Name $name -ErrorAction SilentlyContinue
            if ($null -eq $service) {
                New-CheckRow -Step 'disable-services' -Setting ('service {0} StartType' -f $name) -Expected 'Disabled' -Actual '(not installed)' -Pass $true
            }
            else {
                $startType = [string]$service.StartType
                New-CheckRow -Step 'disable-services' -Setting ('service {0} StartType' -f $name) -Expected 'Disabled' -Actual $startType -Pass ($startType -eq 'Disabled')
            }
        }
    }
    'install-buildlet'           = {
        param($s)
        Get-FileHashRow -Step 'install-buildlet' -Path $s.buildletPath -Sha256 $s.buildletStage0Sha256
        Get-RegistryRows -Settings $s -Step 'install-buildlet'
        $name = Get-BuildletEnvName
        $actual = Get-MachineEnvironmentVariable -Name $name
        $shown = '(unset)'
        if ($null -ne $actual) { $shown = [string]$actual }
        New-CheckRow -Step 'install-buildlet' -Setting ('machine environment variable {0}' -f $name) -Expected $s.buildletEnv -Actual $shown -Pass ($actual -ceq $s.buildletEnv)
    }
    'install-llvm-mingw'         = {
        param($s)
        $stamp = Join-Path $s.llvmMingwDir '.source-sha256'
        $actual = '(missing)'
        if (Test-Path -LiteralPath $stamp -PathType Leaf) { $actual = (Get-Content -LiteralPath $stamp -Raw).Trim() }
        $expected = $s.llvmMingwSha256.ToLowerInvariant()
        New-CheckRow -Step 'install-llvm-mingw' -Setting ('{0} source archive SHA-256' -f $s.llvmMingwDir) -Expected $expected -Actual $actual -Pass ($actual -eq $expected)
        $clang = Join-Path (Join-Path $s.llvmMingwDir 'bin') 'clang.exe'
        $present = Test-Path -LiteralPath $clang -PathType Leaf
        $shown = 'missing'
        if ($present) { $shown = 'present' }
        New-CheckRow -Step 'install-llvm-mingw' -Setting $clang -Expected 'present' -Actual $shown -Pass $present
    }
    'install-vs-build-tools'     = {
        param($s)
        $path = Get-VsBuildToolsPath -Version $s.vsVersion
        $shown = '(not found)'
        if ($path) { $shown = $path }
        New-CheckRow -Step 'install-vs-build-tools' -Setting ('VS {0} instance {1} with {2}' -f $s.vsVersion, (Get-VsBuildToolsVersionRange -Version $s.vsVersion), ((Get-VsBuildToolsRequiredComponents -Version $s.vsVersion) -join ', ')) -Expected '(installed)' -Actual $shown -Pass ([bool]$path)
    }
    'create-builder-user'        = {
        param($s)
        $step = 'create-builder-user'
        $name = $s.builderUser
        $user = Get-LocalUser -Name $name -ErrorAction SilentlyContinue
        if ($null -eq $user) {
            New-CheckRow -Step $step -Setting ('local user {0}' -f $name) -Expected 'exists' -Actual '(missing)' -Pass $false
            return
        }
        New-CheckRow -Step $step -Setting ('local user {0}' -f $name) -Expected 'exists' -Actual 'exists' -Pass $true
        New-CheckRow -Step $step -Setting ('local user {0} Enabled' -f $name) -Expected 'True' -Actual ([string]$user.Enabled) -Pass ($user.Enabled -eq $true)
        $expires = 'never'
        if ($null -ne $user.PasswordExpires) { $expires = [string]$user.PasswordExpires }
        New-CheckRow -Step $step -Setting ('local user {0} password expires' -f $name) -Expected 'never' -Actual $expires -Pass ($null -eq $user.PasswordExpires)
        $sid = [string]$user.SID
        $isAdmin = @(Get-LocalGroupMember -SID $script:AdministratorsSid | Where-Object { [string]$_.SID -eq $sid }).Count -gt 0
        New-CheckRow -Step $step -Setting ('local user {0} in Administrators' -f $name) -Expected 'True' -Actual ([string]$isAdmin) -Pass $isAdmin
        $accepted = [bool](Test-LocalCredential -UserName $name -Password $s.builderPassword)
        New-CheckRow -Step $step -Setting ('local user {0} password' -f $name) -Expected '(configured password accepted)' -Actual ([string]$accepted) -Pass $accepted
    }
    'configure-autologon'        = { param($s) Get-RegistryRows -Settings $s -Step 'configure-autologon' }
    'remove-answer-files'        = {
        param($s)
        $windows = Get-WindowsFolder
        $left = @(Find-AnswerFileCopies -WindowsFolder $windows)
        $shown = '(none)'
        if ($left.Count -gt 0) { $shown = $left -join ', ' }
        $setting = 'answer files (unattend.xml, autounattend.xml) under {0}' -f (@(Get-AnswerFileFolders -WindowsFolder $windows) -join ', ')
        New-CheckRow -Step 'remove-answer-files' -Setting $setting -Expected '(none)' -Actual $shown -Pass ($left.Count -eq 0)
    }
}

function Format-CheckTable {
    <# Fixed-width text table (no truncation, whatever the console width). #>
    param([Parameter(Mandatory = $true)][object[]]$Rows)
    $columns = @('Step', 'Setting', 'Expected', 'Actual', 'Result')
    $widths = @{}
    foreach ($column in $columns) {
        $widths[$column] = $column.Length
        foreach ($row in $Rows) {
            $length = ([string]$row.$column).Length
            if ($length -gt $widths[$column]) { $widths[$column] = $length }
        }
    }
    $format = { param($values) (($columns | ForEach-Object { ([string]$values[$_]).PadRight($widths[$_]) }) -join ' | ').TrimEnd() }
    $header = @{}
    foreach ($column in $columns) { $header[$column] = $column }
    & $format $header
    (($columns | ForEach-Object { '-' * $widths[$_] }) -join '-+-')
    foreach ($row in $Rows) {
        $values = @{}
        foreach ($column in $columns) { $values[$column] = $row.$column }
        & $format $values
    }
}

# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------

Initialize-Log
try {
    $settings = Read-ProvisionSettings -Path $ConfigPath
}
catch {
    Write-Output ("check: invalid settings: {0}" -f $_.Exception.Message)
    exit 2
}

Assert-StepNames -Names @($checks.Keys) -Source 'check.ps1'

$rows = New-Object System.Collections.Generic.List[object]
$skipped = New-Object System.Collections.Generic.List[string]
foreach ($step in Get-StepCatalog) {
    # A step without a switch always runs, so it is always checked.
    if ($null -ne $step.Switch -and $settings[$step.Switch] -ne $true) {
        $skipped.Add($step.Name)
        continue
    }
    try {
        foreach ($row in @(& $checks[$step.Name] $settings)) { $rows.Add($row) }
    }
    catch {
        $rows.Add((New-CheckRow -Step $step.Name -Setting '(check)' -Expected '(runs)' -Actual ('error: {0}' -f $_.Exception.Message) -Pass $false))
    }
}

if ($rows.Count -gt 0) { Format-CheckTable -Rows $rows.ToArray() }
if (-not $ReportPath) { $ReportPath = Join-Path (Split-Path -Parent $settings.logPath) 'software-report.json' }
$reportWritten = $false
try {
    Write-SoftwareReport -Report (New-SoftwareReport -Settings $settings -Rows $rows.ToArray()) -Path $ReportPath
    $reportWritten = $true
    Write-Output ('check: software report written to {0}' -f $ReportPath)
}
catch {
    Write-Output ('check: could not write the software report {0}: {1}' -f $ReportPath, $_.Exception.Message)
}
$failedRows = @($rows | Where-Object { $_.Result -ne 'PASS' })
if ($skipped.Count -gt 0) { Write-Output ('check: switched off, not checked: {0}' -f ($skipped -join ', ')) }
Write-Output ('check: {0} of {1} checks passed, {2} failed' -f ($rows.Count - $failedRows.Count), $rows.Count, $failedRows.Count)
if ($failedRows.Count -gt 0) {
    Write-Output ('check: FAILED: {0}' -f (($failedRows | ForEach-Object { '{0} ({1})' -f $_.Setting, $_.Step }) -join '; '))
    exit 1
}
if (-not $reportWritten) { exit 1 }
exit 0
