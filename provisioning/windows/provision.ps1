#Requires -Version 5.1

<#
.SYNOPSIS
    Provisions a Windows ARM64 VM as a CI builder (runs inside the guest, elevated).
.DESCRIPTION
    Reads the JSON settings file given by -ConfigPath (keys and defaults: see
    Get-SettingSchema in common.psm1) and runs these steps in order, each
    switched by one setting but the last, which always runs:
      disable-windows-update      disableWindowsUpdate     AU policy NoAutoUpdate=1
      disable-error-reporting-ui  disableErrorReportingUi  WER DontShowUI=1
      disable-uac                 disableUac               EnableLUA=0
      disable-firewall            disableFirewall          all firewall profiles off
      disable-defender-realtime   disableDefenderRealtime  Defender real-time monitoring off; under Tamper
                                                           Protection, the build folders excluded instead
      disable-services            disableServices          servicesToDisable: startup type Disabled
      install-buildlet            installBuildlet          stage0 -> buildletPath, HKLM Run entry that
                                                           starts it in its folder, GO_BUILDER_ENV =
                                                           buildletEnv (machine-wide)
      install-llvm-mingw          installLlvmMingw         zip unpacked to llvmMingwDir
      install-vs-build-tools      installVsBuildTools      VS Build Tools vsVersion (2019, 2022, 2026) with
                                                           the ARM64 VC tools (and ARM, but for 2026)
      create-builder-user         createBuilderUser        local administrator, password never expires
      configure-autologon         autoLogon                Winlogon autologon as builderUser
      remove-answer-files         (always on, runs last)   deletes every unattend.xml and autounattend.xml
                                                           (any case) under C:\Windows\Panther and
                                                           C:\Windows\System32\Sysprep, with their
                                                           subfolders: Setup's cached answer files hold the
                                                           administrator and autologon passwords, and the
                                                           image is published
    After the steps, the free space of C: is released (Optimize-Volume
    -DriveLetter C -ReTrim: TRIM reaches the VM's qcow2, so the published
    image carries no deleted data; a disk that cannot trim only warns).
    Every step checks the machine first and changes only what differs, so a
    second run changes nothing. Every download is checked against its SHA-256
    before use. Every step is logged with a UTC timestamp to the host and to
    logPath; passwords are never logged. Service, UAC and autologon changes
    take effect after the next reboot.
.PARAMETER ConfigPath
    Path of the JSON settings file. It holds the builder password: delete it
    after the run.
.OUTPUTS
    Log lines on the host. Exit code 0 when every enabled step succeeded;
    1 when a step failed (the log names the step and the cause); 2 when the
    settings are invalid or the process is not elevated.
.EXAMPLE
    powershell -NoProfile -ExecutionPolicy Bypass -File C:\provisioning\provision.ps1 -ConfigPath C:\Windows\Temp\settings.json
#>
[CmdletBinding()]
param(
    [Parameter(Mandatory = $true)][string]$ConfigPath
)
Set-StrictMode -Version Latest
$ErrorActionPreference = 'Stop'
# Progress bars slow downloads and archive work a lot on Windows PowerShell 5.1.
$ProgressPreference = 'SilentlyContinue'

Import-Module (Join-Path $PSScriptRoot 'common.psm1') -DisableNameChecking

# ---------------------------------------------------------------------------
# Step actions. Each checks the current state and changes only what differs.
# ---------------------------------------------------------------------------

function Set-StepRegistryValues {
    param([Parameter(Mandatory = $true)]$Settings, [Parameter(Mandatory = $true)][string]$Step)
    foreach ($value in @(Get-DesiredRegistryValues -Settings $Settings -Step $Step)) {
        [void](Set-RegistryValue -Path $value.Path -Name $value.Name -Value $value.Value -Type $value.Type -Secret:$value.Secret)
    }
    foreach ($value in @(Get-AbsentRegistryValues -Step $Step)) {
        [void](Remove-RegistryValue -Path $value.Path -Name $value.Name)
    }
}

function Disable-Firewall {
    $profiles = @(Get-NetFirewallProfile)
    if ($profiles.Count -eq 0) { throw 'Get-NetFirewallProfile returned no firewall profiles' }
    $enabled = @($profiles | Where-Object { [string]$_.Enabled -ne 'False' } | ForEach-Object { [string]$_.Name })
    if ($enabled.Count -eq 0) {
        Write-Log ('firewall profiles {0} are already off' -f (($profiles | ForEach-Object { $_.Name }) -join ', '))
        return
    }
    Set-NetFirewallProfile -Name $enabled -Enabled False
    Add-ChangeRecord ('firewall profiles {0}: on -> off' -f ($enabled -join ', '))
}

function Add-DefenderExclusions {
    <# Excludes the build folders from scanning (each only once), then checks Defender kept them. #>
    param([Parameter(Mandatory = $true)]$Settings)
    $paths = @(Get-DefenderExclusionPaths -Settings $Settings)
    $current = @((Get-MpPreference).ExclusionPath)
    $missing = @($paths | Where-Object { -not (Test-DefenderExclusion -Path $_ -Excluded $current) })
    if ($missing.Count -eq 0) {
        Write-Log ('Defender already excludes {0}' -f ($paths -join ', '))
        return
    }
    Add-MpPreference -ExclusionPath $missing
    $after = @((Get-MpPreference).ExclusionPath)
    $kept = @($missing | Where-Object { -not (Test-DefenderExclusion -Path $_ -Excluded $after) })
    if ($kept.Count -gt 0) {
        throw ('Defender did not keep the exclusions {0} after Add-MpPreference (are exclusions managed by policy?)' -f ($kept -join ', '))
    }
    foreach ($path in $missing) { Add-ChangeRecord ('Defender exclusion added: {0}' -f $path) }
}

function Disable-DefenderRealtime {
    param([Parameter(Mandatory = $true)]$Settings)
    $preference = Get-MpPreference
    if ($preference.DisableRealtimeMonitoring -eq $true) {
        Write-Log 'Defender real-time monitoring is already off'
        return
    }
    # Tamper Protection (on by default on Windows 10 and 11) keeps real-time scanning on
    # whatever a script does; exclusions still apply, so the build folders are excluded.
    if (Test-TamperProtected) {
        Write-Log -Level WARN ('Defender Tamper Protection is on: real-time monitoring stays on; excluding the build folders from scanning instead (turn Tamper Protection off in Windows Security to have it off)')
        Add-DefenderExclusions -Settings $Settings
        return
    }
    Set-MpPreference -DisableRealtimeMonitoring $true
    $after = Get-MpPreference
    if ($after.DisableRealtimeMonitoring -ne $true) {
        throw 'Defender kept real-time monitoring on after Set-MpPreference (is Tamper Protection on?)'
    }
    Add-ChangeRecord 'Defender real-time monitoring: on -> off'
}

function Disable-ServiceList {
    param([Parameter(Mandatory = $true)][string[]]$Names)
    foreach ($name in $Names) {
        $service = Get-Service -Name $name -ErrorAction SilentlyContinue
        if ($null -eq $service) {
            Write-Log -Level WARN ("service {0} is not installed; nothing to disable" -f $name)
            continue
        }
        if ([string]$service.StartType -eq 'Disabled') {
            Write-Log ("service {0} is already disabled" -f $name)
            continue
        }
        Set-Service -Name $name -StartupType Disabled
        Add-ChangeRecord ("service {0} startup type: {1} -> Disabled" -f $name, $service.StartType)
    }
}

function Install-Buildlet {
    param([Parameter(Mandatory = $true)]$Settings)
    [void](Save-VerifiedDownload -Url $Settings.buildletStage0Url -Sha256 $Settings.buildletStage0Sha256 -Destination $Settings.buildletPath)
    Set-StepRegistryValues -Settings $Settings -Step 'install-buildlet'
    # stage0 panics on windows/arm64 without GO_BUILDER_ENV; the logon session that runs
    # the Run entry reads machine-wide variables at logon.
    $name = Get-BuildletEnvName
    $current = Get-MachineEnvironmentVariable -Name $name
    if ($current -ceq $Settings.buildletEnv) {
        Write-Log ("machine environment variable {0} is already {1}" -f $name, $current)
        return
    }
    Set-MachineEnvironmentVariable -Name $name -Value $Settings.buildletEnv
    $shown = '(unset)'
    if ($null -ne $current) { $shown = $current }
    Add-ChangeRecord ("machine environment variable {0}: {1} -> {2}" -f $name, $shown, $Settings.buildletEnv)
}

function Install-LlvmMingw {
    param([Parameter(Mandatory = $true)]$Settings)
    $dir = $Settings.llvmMingwDir
    $expected = $Settings.llvmMingwSha256.ToLowerInvariant()
    $stamp = Join-Path $dir '.source-sha256'
    if (Test-Path -LiteralPath $stamp -PathType Leaf) {
        $installed = (Get-Content -LiteralPath $stamp -Raw).Trim()
        if ($installed -eq $expected) {
            Write-Log ("llvm-mingw from the archive with SHA-256 {0} is already in {1}" -f $expected, $dir)
            return
        }
        Write-Log ("{0} holds llvm-mingw from archive {1}; replacing it with {2}" -f $dir, $installed, $expected)
    }
    $zip = Join-Path $Settings.downloadDir 'llvm-mingw.zip'
    [void](Save-VerifiedDownload -Url $Settings.llvmMingwUrl -Sha256 $expected -Destination $zip)

    $staging = $dir + '.partial'
    if (Test-Path -LiteralPath $staging) { Remove-Item -LiteralPath $staging -Recurse -Force }
    Write-Log ("unpacking {0} to {1}" -f $zip, $dir)
    Expand-ZipArchive -Path $zip -Destination $staging
    # Release archives hold one top-level folder (llvm-mingw-<version>-ucrt-aarch64): use its content.
    $entries = @(Get-ChildItem -LiteralPath $staging -Force)
    $root = $staging
    if ($entries.Count -eq 1 -and $entries[0].PSIsContainer) { $root = $entries[0].FullName }
    $clang = Join-Path (Join-Path $root 'bin') 'clang.exe'
    if (-not (Test-Path -LiteralPath $clang -PathType Leaf)) {
        Remove-Item -LiteralPath $staging -Recurse -Force
        throw ("the llvm-mingw archive has no bin\clang.exe (under its top-level folder); is llvmMingwUrl an llvm-mingw aarch64 build?")
    }
    if (Test-Path -LiteralPath $dir) { Remove-Item -LiteralPath $dir -Recurse -Force }
    $parent = Split-Path -Parent $dir
    if ($parent -and -not (Test-Path -LiteralPath $parent -PathType Container)) {
        New-Item -ItemType Directory -Path $parent -Force | Out-Null
    }
    Move-Item -LiteralPath $root -Destination $dir
    if (Test-Path -LiteralPath $staging) { Remove-Item -LiteralPath $staging -Recurse -Force }
    Set-Content -LiteralPath $stamp -Value $expected -Encoding ASCII
    Remove-Item -LiteralPath $zip -Force
    Add-ChangeRecord ("llvm-mingw unpacked to {0}" -f $dir)
}

function Install-VsBuildTools {
    param([Parameter(Mandatory = $true)]$Settings)
    $version = $Settings.vsVersion
    $components = (Get-VsBuildToolsRequiredComponents -Version $version) -join ', '
    $existing = Get-VsBuildToolsPath -Version $version
    if ($existing) {
        Write-Log ("Visual Studio {0} Build Tools with {1} are already installed in {2}" -f $version, $components, $existing)
        return
    }
    $bootstrapper = Join-Path $Settings.downloadDir 'vs_BuildTools.exe'
    [void](Save-VerifiedDownload -Url $Settings.vsBuildToolsUrl -Sha256 $Settings.vsBuildToolsSha256 -Destination $bootstrapper)
    $arguments = @(Get-VsBuildToolsArguments -Version $version)
    Write-Log ("running {0} {1} (this takes a while; at most {2} minutes)" -f $bootstrapper, ($arguments -join ' '), $script:VsInstallTimeoutMinutes)
    # --wait makes the bootstrapper itself last until the install is done. Wait for that
    # process only: -Wait would also wait for any child it leaves running.
    $process = Start-Process -FilePath $bootstrapper -ArgumentList $arguments -PassThru
    $code = Wait-ProcessExit -Process $process -TimeoutSeconds ($script:VsInstallTimeoutMinutes * 60) -Name 'the Visual Studio Build Tools installer'
    if ($code -eq 3010) {
        Write-Log 'Visual Studio Build Tools installer finished with 3010: success, a reboot is required'
    }
    elseif ($code -ne 0) {
        throw ("Visual Studio Build Tools installer exited with code {0} (logs: %TEMP%\dd_*.log)" -f $code)
    }
    $installed = Get-VsBuildToolsPath -Version $version
    if (-not $installed) {
        throw ("the installer exited with {0} but vswhere finds no Visual Studio {1} instance ({2}) with {3} (is vsBuildToolsUrl the VS {1} bootstrapper?)" -f $code, $version, (Get-VsBuildToolsVersionRange -Version $version), $components)
    }
    Remove-Item -LiteralPath $bootstrapper -Force
    Add-ChangeRecord ("Visual Studio {0} Build Tools installed in {1}" -f $version, $installed)
}

function Install-BuilderUser {
    param([Parameter(Mandatory = $true)]$Settings)
    $name = $Settings.builderUser
    $password = $Settings.builderPassword
    $user = Get-LocalUser -Name $name -ErrorAction SilentlyContinue
    if ($null -eq $user) {
        $secure = ConvertTo-SecureString -String $password -AsPlainText -Force
        New-LocalUser -Name $name -Password $secure -PasswordNeverExpires -AccountNeverExpires -Description 'CI builder account' | Out-Null
        Add-ChangeRecord ("local user {0} created (password never expires)" -f $name)
        $user = Get-LocalUser -Name $name
    }
    else {
        Write-Log ("local user {0} exists" -f $name)
        if (-not $user.Enabled) {
            Enable-LocalUser -Name $name
            Add-ChangeRecord ("local user {0}: disabled -> enabled" -f $name)
        }
        if ($null -ne $user.PasswordExpires) {
            Set-LocalUser -Name $name -PasswordNeverExpires $true
            Add-ChangeRecord ("local user {0}: password expiry -> never" -f $name)
        }
        if (Test-LocalCredential -UserName $name -Password $password) {
            Write-Log ("local user {0} already has the configured password" -f $name)
        }
        else {
            $secure = ConvertTo-SecureString -String $password -AsPlainText -Force
            Set-LocalUser -Name $name -Password $secure
            Add-ChangeRecord ("local user {0}: password reset to the configured one" -f $name)
        }
    }
    $sid = [string]$user.SID
    $isAdmin = @(Get-LocalGroupMember -SID $script:AdministratorsSid | Where-Object { [string]$_.SID -eq $sid }).Count -gt 0
    if ($isAdmin) {
        Write-Log ("local user {0} is already in Administrators" -f $name)
    }
    else {
        Add-LocalGroupMember -SID $script:AdministratorsSid -Member $name
        Add-ChangeRecord ("local user {0} added to Administrators" -f $name)
    }
}

# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------

$script:AdministratorsSid = 'S-1-5-32-544'
# The VS Build Tools install is bounded (it usually takes 15 to 60 minutes).
$script:VsInstallTimeoutMinutes = 180

Initialize-Log
try {
    $settings = Read-ProvisionSettings -Path $ConfigPath
}
catch {
    Write-Log -Level ERROR ("provision: invalid settings: {0}" -f $_.Exception.Message)
    exit 2
}
Add-LogSecret $settings.builderPassword
try {
    Initialize-Log -Path $settings.logPath
    Add-LogSecret $settings.builderPassword
}
catch {
    Write-Log -Level ERROR ("provision: cannot write the log file {0}: {1}" -f $settings.logPath, $_.Exception.Message)
    exit 2
}

Write-Log ("provision: start; settings from {0}; log {1}" -f $ConfigPath, $settings.logPath)
Write-Log ("provision: settings: {0}" -f (Format-SettingsForLog -Settings $settings))

$elevated = $false
try { $elevated = Test-IsAdministrator } catch { $elevated = $false }
if (-not $elevated) {
    Write-Log -Level ERROR 'provision: this script must run elevated (as an administrator)'
    exit 2
}

$s = $settings
$steps = @(
    New-ProvisionStep -Name 'disable-windows-update' -Enabled $s.disableWindowsUpdate -Action { Set-StepRegistryValues -Settings $s -Step 'disable-windows-update' }
    New-ProvisionStep -Name 'disable-error-reporting-ui' -Enabled $s.disableErrorReportingUi -Action { Set-StepRegistryValues -Settings $s -Step 'disable-error-reporting-ui' }
    New-ProvisionStep -Name 'disable-uac' -Enabled $s.disableUac -Action { Set-StepRegistryValues -Settings $s -Step 'disable-uac' }
    New-ProvisionStep -Name 'disable-firewall' -Enabled $s.disableFirewall -Action { Disable-Firewall }
    New-ProvisionStep -Name 'disable-defender-realtime' -Enabled $s.disableDefenderRealtime -Action { Disable-DefenderRealtime -Settings $s }
    New-ProvisionStep -Name 'disable-services' -Enabled $s.disableServices -Action { Disable-ServiceList -Names $s.servicesToDisable }
    New-ProvisionStep -Name 'install-buildlet' -Enabled $s.installBuildlet -Action { Install-Buildlet -Settings $s }
    New-ProvisionStep -Name 'install-llvm-mingw' -Enabled $s.installLlvmMingw -Action { Install-LlvmMingw -Settings $s }
    New-ProvisionStep -Name 'install-vs-build-tools' -Enabled $s.installVsBuildTools -Action { Install-VsBuildTools -Settings $s }
    New-ProvisionStep -Name 'create-builder-user' -Enabled $s.createBuilderUser -Action { Install-BuilderUser -Settings $s }
    New-ProvisionStep -Name 'configure-autologon' -Enabled $s.autoLogon -Action { Set-StepRegistryValues -Settings $s -Step 'configure-autologon' }
    # Last, and always: Windows has run every pass of its answer file long before SSH answers
    # (firstlogon.ps1 opens it), and no step above reads Setup's files.
    New-ProvisionStep -Name 'remove-answer-files' -Enabled $true -Action { Remove-AnswerFileCopies -WindowsFolder (Get-WindowsFolder) }
)
Assert-StepNames -Names @($steps | ForEach-Object { $_.Name }) -Source 'provision.ps1'

$result = Invoke-ProvisionSteps -Steps $steps
if (-not $result.Success) {
    Write-Log -Level ERROR ("provision: FAILED at step '{0}': {1}" -f $result.FailedStep, $result.Error)
    exit 1
}
# Last, before the VM is shut down: TRIM every free block, so the published image holds only data.
[void](Invoke-FreeSpaceRelease)
Write-Log ("provision: done; {0} step(s) ran, {1} switched off, {2} change(s) made" -f $result.Ran.Count, $result.Skipped.Count, $result.Changes)
exit 0
