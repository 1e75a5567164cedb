<#
.SYNOPSIS
    Shared code for provision.ps1 and check.ps1 (Windows ARM64 CI builder guest).
.DESCRIPTION
    - The settings schema (keys, types, defaults) and Read-ProvisionSettings,
      which loads and validates the JSON settings file.
    - The step catalogue: the names of the provisioning steps and the switch
      that turns each on; provision.ps1 and check.ps1 both declare exactly
      these steps (Assert-StepNames).
    - The registry values each step sets (Get-DesiredRegistryValues), so the
      check verifies exactly what provisioning writes.
    - Logging with timestamps and secret redaction (Write-Log), a change
      counter (Add-ChangeRecord), the step runner (Invoke-ProvisionSteps).
    - Idempotent helpers: registry get/set/remove, download + SHA-256 check.
    - Small wrappers around Windows-only calls (administrator test, local
      credential test, vswhere, machine environment variables, the Windows
      folder), so tests can mock them.
    - The answer files Windows Setup leaves behind: found and deleted
      (Find-AnswerFileCopies, Remove-AnswerFileCopies).
    Compatible with Windows PowerShell 5.1 and PowerShell 7; ASCII only.
#>
Set-StrictMode -Version Latest
$ErrorActionPreference = 'Stop'

# ---------------------------------------------------------------------------
# Settings schema
# ---------------------------------------------------------------------------

$script:DefaultServicesToDisable = @('NlaSvc', 'LanmanServer', 'BITS', 'DPS', 'MSDTC', 'IKEEXT', 'RemoteRegistry', 'lmhosts')

# Type: bool | string | path | cmdpath | url | sha256 | username | secret | token | vsversion | string[]
#   cmdpath: a path that cmd.exe runs (no " % & ^ | < >); token: letters, digits, . _ - (an env name);
#   vsversion: one of the keys of $script:VsVersions.
# RequiredBy: switches that, when true, need a non-empty value here.
$script:SettingSchema = @(
    @{ Key = 'logPath'; Type = 'path'; Default = 'C:\ProgramData\windows-arm64-image\provision.log'; RequiredBy = @() }
    @{ Key = 'downloadDir'; Type = 'path'; Default = 'C:\ProgramData\windows-arm64-image\downloads'; RequiredBy = @() }
    @{ Key = 'disableWindowsUpdate'; Type = 'bool'; Default = $true; RequiredBy = @() }
    @{ Key = 'disableErrorReportingUi'; Type = 'bool'; Default = $true; RequiredBy = @() }
    @{ Key = 'disableUac'; Type = 'bool'; Default = $true; RequiredBy = @() }
    @{ Key = 'disableFirewall'; Type = 'bool'; Default = $true; RequiredBy = @() }
    @{ Key = 'disableDefenderRealtime'; Type = 'bool'; Default = $true; RequiredBy = @() }
    @{ Key = 'disableServices'; Type = 'bool'; Default = $true; RequiredBy = @() }
    @{ Key = 'servicesToDisable'; Type = 'string[]'; Default = $script:DefaultServicesToDisable; RequiredBy = @() }
    @{ Key = 'installBuildlet'; Type = 'bool'; Default = $true; RequiredBy = @() }
    @{ Key = 'buildletStage0Url'; Type = 'url'; Default = ''; RequiredBy = @('installBuildlet') }
    @{ Key = 'buildletStage0Sha256'; Type = 'sha256'; Default = ''; RequiredBy = @('installBuildlet') }
    @{ Key = 'buildletPath'; Type = 'cmdpath'; Default = 'C:\golang\bootstrap.exe'; RequiredBy = @() }
    @{ Key = 'buildletEnv'; Type = 'token'; Default = ''; RequiredBy = @('installBuildlet') }
    @{ Key = 'installLlvmMingw'; Type = 'bool'; Default = $true; RequiredBy = @() }
    @{ Key = 'llvmMingwUrl'; Type = 'url'; Default = ''; RequiredBy = @('installLlvmMingw') }
    @{ Key = 'llvmMingwSha256'; Type = 'sha256'; Default = ''; RequiredBy = @('installLlvmMingw') }
    @{ Key = 'llvmMingwDir'; Type = 'path'; Default = 'C:\godep\llvm-aarch64'; RequiredBy = @() }
    @{ Key = 'installVsBuildTools'; Type = 'bool'; Default = $true; RequiredBy = @() }
    @{ Key = 'vsBuildToolsUrl'; Type = 'url'; Default = ''; RequiredBy = @('installVsBuildTools') }
    @{ Key = 'vsBuildToolsSha256'; Type = 'sha256'; Default = ''; RequiredBy = @('installVsBuildTools') }
    @{ Key = 'vsVersion'; Type = 'vsversion'; Default = '2022'; RequiredBy = @() }
    @{ Key = 'createBuilderUser'; Type = 'bool'; Default = $true; RequiredBy = @() }
    @{ Key = 'builderUser'; Type = 'username'; Default = ''; RequiredBy = @('createBuilderUser', 'autoLogon') }
    @{ Key = 'builderPassword'; Type = 'secret'; Default = ''; RequiredBy = @('createBuilderUser', 'autoLogon') }
    @{ Key = 'autoLogon'; Type = 'bool'; Default = $true; RequiredBy = @() }
)

# The provisioning steps, in the order they run, and the switch for each.
$script:StepCatalog = @(
    @{ Name = 'disable-windows-update'; Switch = 'disableWindowsUpdate' }
    @{ Name = 'disable-error-reporting-ui'; Switch = 'disableErrorReportingUi' }
    @{ Name = 'disable-uac'; Switch = 'disableUac' }
    @{ Name = 'disable-firewall'; Switch = 'disableFirewall' }
    @{ Name = 'disable-defender-realtime'; Switch = 'disableDefenderRealtime' }
    @{ Name = 'disable-services'; Switch = 'disableServices' }
    @{ Name = 'install-buildlet'; Switch = 'installBuildlet' }
    @{ Name = 'install-llvm-mingw'; Switch = 'installLlvmMingw' }
    @{ Name = 'install-vs-build-tools'; Switch = 'installVsBuildTools' }
    @{ Name = 'create-builder-user'; Switch = 'createBuilderUser' }
    @{ Name = 'configure-autologon'; Switch = 'autoLogon' }
    # No switch: always runs, and last, once no step needs Setup's files any more (the
    # published image must not carry the answer files: see Remove-AnswerFileCopies).
    @{ Name = 'remove-answer-files'; Switch = $null }
)

# Visual Studio Build Tools by version: the product's major version (vswhere -version)
# and the components installed and required. VS 2026 has no 32-bit ARM VC tools; VS 2022
# and later do not support Windows 10 on ARM64 (the stack refuses that pairing).
$script:VsVersions = [ordered]@{
    '2019' = @{ Major = 16; Components = @('Microsoft.VisualStudio.Component.VC.Tools.ARM64', 'Microsoft.VisualStudio.Component.VC.Tools.ARM') }
    '2022' = @{ Major = 17; Components = @('Microsoft.VisualStudio.Component.VC.Tools.ARM64', 'Microsoft.VisualStudio.Component.VC.Tools.ARM') }
    '2026' = @{ Major = 18; Components = @('Microsoft.VisualStudio.Component.VC.Tools.ARM64') }
}
$script:VsWorkload = 'Microsoft.VisualStudio.Workload.VCTools'

# The buildlet: stage0 (bootstrap.exe) saves buildlet.exe in its working directory and, on
# windows/arm64, panics unless GO_BUILDER_ENV is set.
$script:BuildletEnvName = 'GO_BUILDER_ENV'
# The buildlet's work folder on Windows (hard-coded in golang/build cmd/buildlet): its builds,
# GOCACHE and goplscache live there.
$script:BuildletWorkDir = 'C:\workdir'
# Where Windows keeps profiles (the builder's %TEMP%, where go build puts its WORK folders).
$script:ProfilesRoot = 'C:\Users'

# Registry locations.
$script:RegWindowsUpdateAU = 'HKLM:\SOFTWARE\Policies\Microsoft\Windows\WindowsUpdate\AU'
$script:RegErrorReporting = 'HKLM:\SOFTWARE\Microsoft\Windows\Windows Error Reporting'
$script:RegSystemPolicies = 'HKLM:\SOFTWARE\Microsoft\Windows\CurrentVersion\Policies\System'
$script:RegRun = 'HKLM:\SOFTWARE\Microsoft\Windows\CurrentVersion\Run'
$script:RegWinlogon = 'HKLM:\SOFTWARE\Microsoft\Windows NT\CurrentVersion\Winlogon'
$script:BuildletRunValueName = 'buildlet'
$script:AdministratorsSid = 'S-1-5-32-544'

function Get-SettingSchema {
    <# Returns the settings schema: Key, Type, Default, RequiredBy, Secret. #>
    foreach ($entry in $script:SettingSchema) {
        [pscustomobject]@{
            Key        = $entry.Key
            Type       = $entry.Type
            Default    = $entry.Default
            RequiredBy = @($entry.RequiredBy)
            Secret     = ($entry.Type -eq 'secret')
        }
    }
}

function Get-StepCatalog {
    <# Returns the provisioning steps in order: Name, Switch (the setting that turns it on; $null: it always runs). #>
    foreach ($entry in $script:StepCatalog) {
        [pscustomobject]@{ Name = $entry.Name; Switch = $entry.Switch }
    }
}

function Assert-StepNames {
    <# Throws unless Names are exactly the catalogue's step names, in order. #>
    param([Parameter(Mandatory = $true)][string[]]$Names, [Parameter(Mandatory = $true)][string]$Source)
    $expected = @(Get-StepCatalog | ForEach-Object { $_.Name })
    if (($expected -join ',') -ne ($Names -join ',')) {
        throw ("{0} declares steps [{1}] but the catalogue in common.psm1 has [{2}]" -f $Source, ($Names -join ', '), ($expected -join ', '))
    }
}

function Test-SettingValue {
    <# Returns an error message for a value of the wrong type, or $null. #>
    param([string]$Key, [string]$Type, $Value)
    switch ($Type) {
        'bool' {
            if ($Value -isnot [bool]) { return "'$Key' must be true or false" }
        }
        'string[]' {
            $items = @($Value)
            if ($Value -isnot [array]) { return "'$Key' must be an array of strings" }
            foreach ($item in $items) {
                if ($item -isnot [string] -or [string]::IsNullOrWhiteSpace($item)) {
                    return "'$Key' must be an array of non-empty strings"
                }
            }
        }
        default {
            if ($Value -isnot [string]) { return "'$Key' must be a string" }
            if ($Value -eq '' -and $Type -ne 'vsversion') { return $null }
            switch ($Type) {
                'url' {
                    if ($Value -notmatch '^https?://[^\s/]+\S*$') { return "'$Key' must be an http(s) URL" }
                }
                'sha256' {
                    if ($Value -notmatch '^[0-9A-Fa-f]{64}$') { return "'$Key' must be a SHA-256 hash (64 hex digits)" }
                }
                'cmdpath' {
                    if ($Value -match '["%&^|<>]') { return "'$Key' must not contain any of `" % & ^ | < > (cmd.exe runs it at logon)" }
                }
                'token' {
                    if ($Value -notmatch '^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$') { return "'$Key' must be 1 to 100 letters, digits, '.', '_' or '-' (e.g. host-windows11-arm64-azure)" }
                }
                'vsversion' {
                    if (-not $script:VsVersions.Contains($Value)) { return ("'{0}' must be one of {1}" -f $Key, (@($script:VsVersions.Keys) -join ', ')) }
                }
                'username' {
                    if ($Value.Length -gt 20 -or $Value -match '["/\\\[\]:;|=,+*?<>@]' -or $Value.Trim() -ne $Value) {
                        return "'$Key' is not a valid local user name (at most 20 characters, none of `"/\[]:;|=,+*?<>@, no surrounding spaces)"
                    }
                }
            }
        }
    }
    return $null
}

function Read-ProvisionSettings {
    <#
    .SYNOPSIS
        Loads the JSON settings file, applies defaults, validates every key.
    .OUTPUTS
        An ordered hashtable with every schema key. Throws one message listing
        every problem (unknown keys, wrong types, missing required values).
        Keys starting with "_" are comments and ignored.
    #>
    param([Parameter(Mandatory = $true)][string]$Path)
    if (-not (Test-Path -LiteralPath $Path -PathType Leaf)) {
        throw "settings file '$Path' does not exist"
    }
    $raw = Get-Content -LiteralPath $Path -Raw -Encoding UTF8
    if ([string]::IsNullOrWhiteSpace($raw)) { throw "settings file '$Path' is empty" }
    try {
        $json = $raw | ConvertFrom-Json
    }
    catch {
        throw "settings file '$Path' is not valid JSON: $($_.Exception.Message)"
    }
    if ($json -isnot [System.Management.Automation.PSCustomObject]) {
        throw "settings file '$Path' must hold a JSON object"
    }

    $schema = @(Get-SettingSchema)
    $known = @{}
    foreach ($entry in $schema) { $known[$entry.Key] = $entry }

    $problems = New-Object System.Collections.Generic.List[string]
    $given = @{}
    foreach ($prop in $json.PSObject.Properties) {
        if ($prop.Name.StartsWith('_')) { continue }
        if (-not $known.ContainsKey($prop.Name)) {
            # Case-sensitive match only: a near miss is most likely a typo.
            $problems.Add("unknown setting '$($prop.Name)'")
            continue
        }
        $entry = $known[$prop.Name]
        if ($entry.Key -cne $prop.Name) {
            $problems.Add("unknown setting '$($prop.Name)' (did you mean '$($entry.Key)'?)")
            continue
        }
        if ($null -eq $prop.Value) { continue }
        $problem = Test-SettingValue -Key $prop.Name -Type $entry.Type -Value $prop.Value
        if ($problem) { $problems.Add($problem); continue }
        $given[$prop.Name] = $prop.Value
    }

    $settings = [ordered]@{}
    foreach ($entry in $schema) {
        if ($given.ContainsKey($entry.Key)) {
            if ($entry.Type -eq 'string[]') { $settings[$entry.Key] = [string[]]@($given[$entry.Key]) }
            else { $settings[$entry.Key] = $given[$entry.Key] }
        }
        elseif ($entry.Type -eq 'string[]') {
            $settings[$entry.Key] = [string[]]@($entry.Default)
        }
        else {
            $settings[$entry.Key] = $entry.Default
        }
    }
    foreach ($entry in $schema) {
        foreach ($switch in $entry.RequiredBy) {
            if ($settings[$switch] -eq $true -and [string]::IsNullOrEmpty([string]$settings[$entry.Key])) {
                $problems.Add("'$($entry.Key)' is required when '$switch' is true")
                break
            }
        }
        if ($entry.Type -eq 'path' -and [string]::IsNullOrWhiteSpace([string]$settings[$entry.Key])) {
            $problems.Add("'$($entry.Key)' must not be empty")
        }
    }
    if ($problems.Count -gt 0) {
        throw ("settings file '{0}': {1}" -f $Path, ($problems -join '; '))
    }
    return $settings
}

function Format-SettingsForLog {
    <# One line "key=value, ..." with secrets shown as <redacted>. #>
    param([Parameter(Mandatory = $true)]$Settings)
    $parts = foreach ($entry in Get-SettingSchema) {
        $value = $Settings[$entry.Key]
        if ($entry.Secret) {
            if ([string]::IsNullOrEmpty([string]$value)) { $shown = '<not set>' } else { $shown = '<redacted>' }
        }
        elseif ($entry.Type -eq 'url' -and -not [string]::IsNullOrEmpty([string]$value)) {
            $shown = ConvertTo-LogUrl -Url $value
        }
        elseif ($entry.Type -eq 'string[]') {
            $shown = '[' + (@($value) -join ',') + ']'
        }
        else {
            $shown = [string]$value
        }
        '{0}={1}' -f $entry.Key, $shown
    }
    return ($parts -join ', ')
}

# ---------------------------------------------------------------------------
# Logging and change tracking
# ---------------------------------------------------------------------------

$script:LogPath = $null
$script:LogSecrets = New-Object System.Collections.Generic.List[string]
$script:ChangeCount = 0

function Initialize-Log {
    <#
    .SYNOPSIS
        Starts a run: resets the change counter and the secrets list; with a
        Path, appends log lines to that file from now on (creates its folder).
    #>
    param([string]$Path)
    $script:ChangeCount = 0
    $script:LogSecrets.Clear()
    $script:LogPath = $null
    if ($Path) {
        $dir = Split-Path -Parent $Path
        if ($dir -and -not (Test-Path -LiteralPath $dir -PathType Container)) {
            New-Item -ItemType Directory -Path $dir -Force | Out-Null
        }
        $script:LogPath = $Path
    }
}

function Add-LogSecret {
    <# Registers a value that Write-Log replaces with <redacted> wherever it appears. #>
    param([string]$Value)
    if (-not [string]::IsNullOrEmpty($Value) -and $Value.Length -ge 4) { $script:LogSecrets.Add($Value) }
}

function Write-Log {
    <# Writes "<UTC timestamp> [LEVEL] message" to the host and to the log file. #>
    param(
        [Parameter(Mandatory = $true, Position = 0)][AllowEmptyString()][string]$Message,
        [ValidateSet('INFO', 'WARN', 'ERROR')][string]$Level = 'INFO'
    )
    foreach ($secret in $script:LogSecrets) { $Message = $Message.Replace($secret, '<redacted>') }
    $line = '{0} [{1}] {2}' -f [DateTime]::UtcNow.ToString('yyyy-MM-ddTHH:mm:ssZ'), $Level, $Message
    Write-Host $line
    if ($script:LogPath) {
        Add-Content -LiteralPath $script:LogPath -Value $line -Encoding UTF8
    }
}

function Add-ChangeRecord {
    <# Counts and logs one change made to the machine. #>
    param([Parameter(Mandatory = $true)][string]$Description)
    $script:ChangeCount++
    Write-Log "changed: $Description"
}

function Get-ChangeCount { return $script:ChangeCount }

function ConvertTo-LogUrl {
    <# A URL fit for logs: scheme, host and path only (no user info, query or fragment, which may hold tokens). #>
    param([Parameter(Mandatory = $true)][string]$Url)
    try {
        $uri = New-Object System.Uri($Url)
        $shown = '{0}://{1}{2}' -f $uri.Scheme, $uri.Authority, $uri.AbsolutePath
        if ($uri.Query) { $shown += '?<query hidden>' }
        return $shown
    }
    catch {
        return '<unparsable URL>'
    }
}

# ---------------------------------------------------------------------------
# Step runner
# ---------------------------------------------------------------------------

function New-ProvisionStep {
    <# A named step: Enabled says whether its switch is on; Action does the work (and checks first). #>
    param(
        [Parameter(Mandatory = $true)][string]$Name,
        [Parameter(Mandatory = $true)][bool]$Enabled,
        [Parameter(Mandatory = $true)][scriptblock]$Action
    )
    [pscustomobject]@{ Name = $Name; Enabled = $Enabled; Action = $Action }
}

function Invoke-ProvisionSteps {
    <#
    .SYNOPSIS
        Runs the steps in order, stopping at the first that throws.
    .OUTPUTS
        An object: Success, FailedStep (name or $null), Error (message),
        Changes (number of changes made), Ran, Skipped (step names).
    #>
    param([Parameter(Mandatory = $true)][object[]]$Steps)
    $ran = New-Object System.Collections.Generic.List[string]
    $skipped = New-Object System.Collections.Generic.List[string]
    foreach ($step in $Steps) {
        if (-not $step.Enabled) {
            Write-Log ("step '{0}': skipped (switched off)" -f $step.Name)
            $skipped.Add($step.Name)
            continue
        }
        Write-Log ("step '{0}': start" -f $step.Name)
        $before = $script:ChangeCount
        try {
            & $step.Action | Out-Null
        }
        catch {
            $where = ''
            if ($_.InvocationInfo -and $_.InvocationInfo.ScriptName) {
                $where = ' (at {0}:{1})' -f (Split-Path -Leaf $_.InvocationInfo.ScriptName), $_.InvocationInfo.ScriptLineNumber
            }
            Write-Log -Level ERROR ("step '{0}' failed: {1}{2}" -f $step.Name, $_.Exception.Message, $where)
            return [pscustomobject]@{
                Success = $false; FailedStep = $step.Name; Error = $_.Exception.Message
                Changes = $script:ChangeCount; Ran = $ran.ToArray(); Skipped = $skipped.ToArray()
            }
        }
        $ran.Add($step.Name)
        $made = $script:ChangeCount - $before
        if ($made -eq 0) { Write-Log ("step '{0}': already in place, nothing changed" -f $step.Name) }
        else { Write-Log ("step '{0}': done, {1} change(s)" -f $step.Name, $made) }
    }
    return [pscustomobject]@{
        Success = $true; FailedStep = $null; Error = $null
        Changes = $script:ChangeCount; Ran = $ran.ToArray(); Skipped = $skipped.ToArray()
    }
}

# ---------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------

function New-RegistrySetting {
    param([string]$Path, [string]$Name, $Value, [ValidateSet('DWord', 'String')][string]$Type, [bool]$Secret = $false)
    [pscustomobject]@{ Path = $Path; Name = $Name; Value = $Value; Type = $Type; Secret = $Secret }
}

function Get-ParentFolder {
    <# The folder holding Path ("C:\golang" for "C:\golang\bootstrap.exe"; "C:\" for "C:\b.exe"), whatever the OS running this. #>
    param([Parameter(Mandatory = $true)][string]$Path)
    $trimmed = $Path.TrimEnd([char[]]@('\', '/'))
    $i = $trimmed.LastIndexOfAny([char[]]@('\', '/'))
    if ($i -lt 0) { return '' }
    $parent = $trimmed.Substring(0, $i)
    if ($parent -eq '' -or $parent -match '^[A-Za-z]:$') { return $trimmed.Substring(0, $i + 1) }
    return $parent
}

function Get-BuildletRunCommand {
    <#
    .SYNOPSIS
        The command line registered under HKLM Run for the buildlet.
    .DESCRIPTION
        Programs started from the Run key start in C:\Windows\System32, but stage0
        saves buildlet.exe in its working directory: the entry changes to the
        stage0's folder first, as the original builders' startup did:
            cmd.exe /c "cd /d C:\golang && C:\golang\bootstrap.exe"
        (cmd /c drops the outer quotes; a path with spaces is quoted inside.)
    #>
    param([Parameter(Mandatory = $true)][string]$BuildletPath)
    if ($BuildletPath -match '["%&^|<>]') {
        throw ("buildletPath '{0}' holds a character cmd.exe would interpret (one of `" % & ^ | < >)" -f $BuildletPath)
    }
    $quote = { param([string]$p) if ($p -match '\s') { '"' + $p + '"' } else { $p } }
    $folder = Get-ParentFolder -Path $BuildletPath
    return ('cmd.exe /c "cd /d {0} && {1}"' -f (& $quote $folder), (& $quote $BuildletPath))
}

function Get-BuildletEnvName {
    <# The machine-wide environment variable that tells stage0 its builder env: GO_BUILDER_ENV. #>
    return $script:BuildletEnvName
}

function Get-DesiredRegistryValues {
    <#
    .SYNOPSIS
        The registry values a step sets (Path, Name, Value, Type, Secret).
        provision.ps1 writes these; check.ps1 verifies the same list.
    #>
    param([Parameter(Mandatory = $true)]$Settings, [Parameter(Mandatory = $true)][string]$Step)
    switch ($Step) {
        'disable-windows-update' {
            New-RegistrySetting -Path $script:RegWindowsUpdateAU -Name 'NoAutoUpdate' -Value 1 -Type DWord
        }
        'disable-error-reporting-ui' {
            New-RegistrySetting -Path $script:RegErrorReporting -Name 'DontShowUI' -Value 1 -Type DWord
        }
        'disable-uac' {
            New-RegistrySetting -Path $script:RegSystemPolicies -Name 'EnableLUA' -Value 0 -Type DWord
        }
        'install-buildlet' {
            New-RegistrySetting -Path $script:RegRun -Name $script:BuildletRunValueName -Value (Get-BuildletRunCommand -BuildletPath $Settings.buildletPath) -Type String
        }
        'configure-autologon' {
            New-RegistrySetting -Path $script:RegWinlogon -Name 'AutoAdminLogon' -Value '1' -Type String
            New-RegistrySetting -Path $script:RegWinlogon -Name 'DefaultUserName' -Value $Settings.builderUser -Type String
            New-RegistrySetting -Path $script:RegWinlogon -Name 'DefaultPassword' -Value $Settings.builderPassword -Type String -Secret $true
        }
        default { }
    }
}

function Get-AbsentRegistryValues {
    <# Registry values a step removes (AutoLogonCount would end autologon after N logons). #>
    param([Parameter(Mandatory = $true)][string]$Step)
    if ($Step -eq 'configure-autologon') {
        [pscustomobject]@{ Path = $script:RegWinlogon; Name = 'AutoLogonCount' }
    }
}

function Get-RegistryValue {
    <# The value of Name under registry key Path, or $null when the key or value is missing. #>
    param([Parameter(Mandatory = $true)][string]$Path, [Parameter(Mandatory = $true)][string]$Name)
    $item = Get-ItemProperty -LiteralPath $Path -Name $Name -ErrorAction SilentlyContinue
    if ($null -eq $item) { return $null }
    $prop = $item.PSObject.Properties[$Name]
    if ($null -eq $prop) { return $null }
    return $prop.Value
}

function Test-RegistryValueEqual {
    param($Current, $Desired, [string]$Type)
    if ($null -eq $Current) { return $false }
    if ($Type -eq 'DWord') {
        $number = 0L
        if (-not [long]::TryParse([string]$Current, [ref]$number)) { return $false }
        return ($number -eq [long]$Desired)
    }
    return ([string]$Current -ceq [string]$Desired)
}

function Format-RegistryShown {
    param($Value, [bool]$Secret)
    if ($null -eq $Value) { return '(missing)' }
    if ($Secret) { return '<redacted>' }
    return [string]$Value
}

function Set-RegistryValue {
    <# Sets Name under Path to Value (creating the key) unless it already has that value. Returns $true if it changed. #>
    param(
        [Parameter(Mandatory = $true)][string]$Path,
        [Parameter(Mandatory = $true)][string]$Name,
        [Parameter(Mandatory = $true)][AllowEmptyString()]$Value,
        [Parameter(Mandatory = $true)][ValidateSet('DWord', 'String')][string]$Type,
        [switch]$Secret
    )
    $current = Get-RegistryValue -Path $Path -Name $Name
    if (Test-RegistryValueEqual -Current $current -Desired $Value -Type $Type) {
        Write-Log ("registry {0}\{1} is already {2}" -f $Path, $Name, (Format-RegistryShown -Value $Value -Secret $Secret))
        return $false
    }
    if (-not (Test-Path -LiteralPath $Path)) {
        New-Item -Path $Path -Force | Out-Null
    }
    New-ItemProperty -LiteralPath $Path -Name $Name -Value $Value -PropertyType $Type -Force | Out-Null
    Add-ChangeRecord ("registry {0}\{1}: {2} -> {3}" -f $Path, $Name, (Format-RegistryShown -Value $current -Secret $Secret), (Format-RegistryShown -Value $Value -Secret $Secret))
    return $true
}

function Remove-RegistryValue {
    <# Removes Name under Path if present. Returns $true if it changed. #>
    param([Parameter(Mandatory = $true)][string]$Path, [Parameter(Mandatory = $true)][string]$Name)
    $current = Get-RegistryValue -Path $Path -Name $Name
    if ($null -eq $current) {
        Write-Log ("registry {0}\{1} is already absent" -f $Path, $Name)
        return $false
    }
    Remove-ItemProperty -LiteralPath $Path -Name $Name -Force
    Add-ChangeRecord ("registry {0}\{1}: {2} -> (removed)" -f $Path, $Name, $current)
    return $true
}

# ---------------------------------------------------------------------------
# Downloads
# ---------------------------------------------------------------------------

function Get-FileSha256 {
    param([Parameter(Mandatory = $true)][string]$Path)
    return (Get-FileHash -LiteralPath $Path -Algorithm SHA256).Hash.ToLowerInvariant()
}

function Save-VerifiedDownload {
    <#
    .SYNOPSIS
        Makes Destination hold the file at Url whose SHA-256 is Sha256.
    .DESCRIPTION
        Skips the download when Destination already has that hash. Otherwise
        downloads to "<Destination>.partial", checks the hash and only then
        moves it in place. A mismatch deletes the partial file and throws
        "SHA-256 mismatch ...: expected <hash>, actual <hash>".
        Returns $true when it downloaded.
    #>
    param(
        [Parameter(Mandatory = $true)][string]$Url,
        [Parameter(Mandatory = $true)][string]$Sha256,
        [Parameter(Mandatory = $true)][string]$Destination
    )
    $expected = $Sha256.ToLowerInvariant()
    $shownUrl = ConvertTo-LogUrl -Url $Url
    if (Test-Path -LiteralPath $Destination -PathType Leaf) {
        $actual = Get-FileSha256 -Path $Destination
        if ($actual -eq $expected) {
            Write-Log ("{0} is already present with SHA-256 {1}" -f $Destination, $expected)
            return $false
        }
        Write-Log -Level WARN ("{0} has SHA-256 {1}, expected {2}: downloading it again" -f $Destination, $actual, $expected)
    }
    $dir = Split-Path -Parent $Destination
    if ($dir -and -not (Test-Path -LiteralPath $dir -PathType Container)) {
        New-Item -ItemType Directory -Path $dir -Force | Out-Null
    }
    $partial = $Destination + '.partial'
    if (Test-Path -LiteralPath $partial) { Remove-Item -LiteralPath $partial -Force }

    Write-Log ("downloading {0} to {1}" -f $shownUrl, $Destination)
    if ($PSVersionTable.PSEdition -ne 'Core') {
        # Windows PowerShell 5.1 may default to TLS 1.0.
        [Net.ServicePointManager]::SecurityProtocol = [Net.ServicePointManager]::SecurityProtocol -bor [Net.SecurityProtocolType]::Tls12
    }
    # The progress bar makes Invoke-WebRequest many times slower on 5.1.
    $ProgressPreference = 'SilentlyContinue'
    try {
        Invoke-WebRequest -Uri $Url -OutFile $partial -UseBasicParsing
    }
    catch {
        if (Test-Path -LiteralPath $partial) { Remove-Item -LiteralPath $partial -Force }
        throw ("download of {0} failed: {1}" -f $shownUrl, $_.Exception.Message)
    }
    if (-not (Test-Path -LiteralPath $partial -PathType Leaf)) {
        throw ("download of {0} produced no file" -f $shownUrl)
    }
    $actual = Get-FileSha256 -Path $partial
    if ($actual -ne $expected) {
        Remove-Item -LiteralPath $partial -Force
        throw ("SHA-256 mismatch for {0}: expected {1}, actual {2}" -f $shownUrl, $expected, $actual)
    }
    Move-Item -LiteralPath $partial -Destination $Destination -Force
    Add-ChangeRecord ("downloaded {0} to {1} (SHA-256 {2} verified)" -f $shownUrl, $Destination, $expected)
    return $true
}

function Expand-ZipArchive {
    <#
    .SYNOPSIS
        Unpacks the zip at Path into the new folder Destination.
    .DESCRIPTION
        Uses System.IO.Compression.ZipFile: Expand-Archive on Windows
        PowerShell 5.1 takes many minutes for a toolchain of thousands of
        files. Entries that would land outside Destination make it throw.
    #>
    param([Parameter(Mandatory = $true)][string]$Path, [Parameter(Mandatory = $true)][string]$Destination)
    if (-not ('System.IO.Compression.ZipFile' -as [type])) {
        Add-Type -AssemblyName System.IO.Compression.FileSystem
    }
    $full = [System.IO.Path]::GetFullPath($Destination)
    [System.IO.Compression.ZipFile]::ExtractToDirectory([System.IO.Path]::GetFullPath($Path), $full)
}

# ---------------------------------------------------------------------------
# Windows-only probes (small so tests can mock them)
# ---------------------------------------------------------------------------

function Test-TamperProtected {
    <# True when Defender's Tamper Protection is on: scripts cannot then turn real-time monitoring off. #>
    $status = Get-MpComputerStatus -ErrorAction SilentlyContinue
    return ($null -ne $status -and $status.IsTamperProtected -eq $true)
}

function Test-IsAdministrator {
    <# True when the current process runs with an elevated administrator token. #>
    $identity = [Security.Principal.WindowsIdentity]::GetCurrent()
    $principal = New-Object Security.Principal.WindowsPrincipal($identity)
    return $principal.IsInRole([Security.Principal.WindowsBuiltInRole]::Administrator)
}

function Test-LocalCredential {
    <# True when the local account accepts the password (LogonUser, network logon type). #>
    param([Parameter(Mandatory = $true)][string]$UserName, [Parameter(Mandatory = $true)][string]$Password)
    $type = 'WindowsArm64Image.NativeLogon' -as [type]
    if (-not $type) {
        Add-Type -Namespace 'WindowsArm64Image' -Name 'NativeLogon' -MemberDefinition @'
[DllImport("advapi32.dll", SetLastError = true, CharSet = CharSet.Unicode)]
public static extern bool LogonUser(string user, string domain, string password, int logonType, int logonProvider, out IntPtr token);
[DllImport("kernel32.dll", SetLastError = true)]
public static extern bool CloseHandle(IntPtr handle);
'@
        $type = 'WindowsArm64Image.NativeLogon' -as [type]
    }
    $token = [IntPtr]::Zero
    # LOGON32_LOGON_NETWORK = 3, LOGON32_PROVIDER_DEFAULT = 0; "." is the local machine.
    $ok = $type::LogonUser($UserName, '.', $Password, 3, 0, [ref]$token)
    if ($ok) { [void]$type::CloseHandle($token) }
    return [bool]$ok
}

function Get-VsVersionEntry {
    param([Parameter(Mandatory = $true)][string]$Version)
    if (-not $script:VsVersions.Contains($Version)) {
        throw ("unknown Visual Studio version '{0}' (known: {1})" -f $Version, (@($script:VsVersions.Keys) -join ', '))
    }
    return $script:VsVersions[$Version]
}

function Get-VsBuildToolsRequiredComponents {
    <# The VC tools components installed and required for a VS version: ARM64 and ARM (2019, 2022), ARM64 only (2026). #>
    param([Parameter(Mandatory = $true)][string]$Version)
    return [string[]]@((Get-VsVersionEntry -Version $Version).Components)
}

function Get-VsBuildToolsVersionRange {
    <# The vswhere -version range of a VS version: "[17.0,18.0)" for 2022. #>
    param([Parameter(Mandatory = $true)][string]$Version)
    $major = (Get-VsVersionEntry -Version $Version).Major
    return ('[{0}.0,{1}.0)' -f $major, ($major + 1))
}

function Get-VsBuildToolsArguments {
    <# The bootstrapper's command line: a quiet install of the VC tools workload with the version's components. #>
    param([Parameter(Mandatory = $true)][string]$Version)
    $arguments = @('--quiet', '--wait', '--norestart', '--nocache', '--add', $script:VsWorkload)
    foreach ($component in (Get-VsBuildToolsRequiredComponents -Version $Version)) { $arguments += @('--add', $component) }
    $arguments += '--includeRecommended'
    return $arguments
}

function Get-VsBuildToolsPath {
    <# The installation path of a Visual Studio instance of that version with its required components (via vswhere), or $null. #>
    param([Parameter(Mandatory = $true)][string]$Version)
    $components = Get-VsBuildToolsRequiredComponents -Version $Version
    $range = Get-VsBuildToolsVersionRange -Version $Version
    $programFilesX86 = ${env:ProgramFiles(x86)}
    if (-not $programFilesX86) { return $null }
    $vswhere = Join-Path $programFilesX86 'Microsoft Visual Studio\Installer\vswhere.exe'
    if (-not (Test-Path -LiteralPath $vswhere -PathType Leaf)) { return $null }
    $found = & $vswhere -products '*' -version $range -requires $components -property installationPath -format value -nologo
    $first = @($found | Where-Object { $_ }) | Select-Object -First 1
    if ($first) { return [string]$first }
    return $null
}

function Wait-ProcessExit {
    <#
    .SYNOPSIS
        Waits for Process itself (not for children it leaves behind) and returns its exit code.
    .DESCRIPTION
        For a process from Start-Process -PassThru. Start-Process -Wait waits for the
        whole process tree on Windows, so a child that outlives the installer (an
        updater, a telemetry process) would hold the step forever. After
        TimeoutSeconds the process is killed and this throws, naming Name.
        The handle is read at once: Windows PowerShell 5.1 otherwise loses the exit
        code of a process started with -PassThru.
    #>
    param(
        [Parameter(Mandatory = $true)]$Process,
        [Parameter(Mandatory = $true)][int]$TimeoutSeconds,
        [Parameter(Mandatory = $true)][string]$Name
    )
    [void]$Process.Handle
    if (-not $Process.WaitForExit($TimeoutSeconds * 1000)) {
        try { $Process.Kill() } catch { Write-Log -Level WARN ("could not stop {0}: {1}" -f $Name, $_.Exception.Message) }
        throw ("{0} did not exit within {1} s; stopped it" -f $Name, $TimeoutSeconds)
    }
    return [int]$Process.ExitCode
}

function Get-MachineEnvironmentVariable {
    <# A machine-wide environment variable (HKLM Session Manager\Environment), or $null. #>
    param([Parameter(Mandatory = $true)][string]$Name)
    return [Environment]::GetEnvironmentVariable($Name, 'Machine')
}

function Set-MachineEnvironmentVariable {
    <# Sets a machine-wide environment variable; processes started after the next logon see it. #>
    param([Parameter(Mandatory = $true)][string]$Name, [Parameter(Mandatory = $true)][string]$Value)
    [Environment]::SetEnvironmentVariable($Name, $Value, 'Machine')
}

# ---------------------------------------------------------------------------
# Defender
# ---------------------------------------------------------------------------

function Test-IsVolumeRoot {
    param([string]$Path)
    return ($Path -match '^([A-Za-z]:)?[\\/]*$')
}

function Get-DefenderExclusionPaths {
    <#
    .SYNOPSIS
        The folders excluded from Defender scanning when Tamper Protection keeps
        real-time monitoring on: where the build reads and writes.
    .DESCRIPTION
        - the buildlet's folder (buildletPath's: stage0 and the buildlet.exe it downloads);
        - the toolchains' folder (llvmMingwDir's parent, C:\godep);
        - C:\workdir, the buildlet's work folder on Windows (checkouts, builds, GOCACHE);
        - the builder's %TEMP% (C:\Users\<builderUser>\AppData\Local\Temp): the buildlet
          sets TMPDIR, which Windows programs ignore, so go build's WORK folders and
          test temp files land in the user's TEMP.
        A folder that would be a whole volume (buildletPath directly under C:\) is
        left out. Defender takes only system environment variables in exclusions,
        so the builder's TEMP is spelled out.
    #>
    param([Parameter(Mandatory = $true)]$Settings)
    $candidates = @(
        (Get-ParentFolder -Path $Settings.buildletPath),
        (Get-ParentFolder -Path $Settings.llvmMingwDir),
        $script:BuildletWorkDir
    )
    if ($Settings.builderUser) {
        $candidates += ('{0}\{1}\AppData\Local\Temp' -f $script:ProfilesRoot, $Settings.builderUser)
    }
    $seen = @{}
    foreach ($candidate in $candidates) {
        if ([string]::IsNullOrEmpty($candidate) -or (Test-IsVolumeRoot -Path $candidate)) { continue }
        $key = $candidate.TrimEnd([char[]]@('\', '/')).ToLowerInvariant()
        if ($seen.ContainsKey($key)) { continue }
        $seen[$key] = $true
        $candidate
    }
}

function Test-DefenderExclusion {
    <# True when Path is in the list Defender reports (case-insensitive, trailing separator ignored). #>
    param([Parameter(Mandatory = $true)][string]$Path, [AllowNull()][AllowEmptyCollection()][object[]]$Excluded)
    $wanted = $Path.TrimEnd([char[]]@('\', '/'))
    foreach ($item in @($Excluded)) {
        if ($null -ne $item -and ([string]$item).TrimEnd([char[]]@('\', '/')) -eq $wanted) { return $true }
    }
    return $false
}

# ---------------------------------------------------------------------------
# Answer files Windows Setup leaves behind
# ---------------------------------------------------------------------------

# The answer file holds the administrator password (only base64-encoded, PlainText=false) and
# the autologon password. Windows Setup caches it in %WINDIR%\Panther, where it persists across
# reboots, and Microsoft says to delete that cached copy before a computer is handed on
# ("Windows Setup Automation Overview", section "Sensitive Data in Answer Files"). Setup also
# reads answer files in %WINDIR%\Panther\Unattend and %WINDIR%\System32\Sysprep, named
# Unattend.xml or Autounattend.xml. The image is published and baked into an AMI, so every such
# copy is deleted. (Setup says it strips sensitive data from its cached copy after each
# configuration pass; nothing here relies on that.)
#
# Setup's logs are kept: setupact.log and setuperr.log (in Panther, Panther\UnattendGC and
# System32\Sysprep\Panther) are documented as Setup's action and error logs, and Microsoft
# documents no answer value (no password) in them, in its pages on Setup's logs or on
# sensitive data in answer files. With nothing documented to justify it, no log is deleted;
# they stay for troubleshooting.
$script:AnswerFileNames = @('unattend.xml', 'autounattend.xml')

function Get-WindowsFolder {
    <# The Windows folder (C:\Windows), as the system reports it (not from an environment variable). #>
    $folder = [Environment]::GetFolderPath([Environment+SpecialFolder]::Windows)
    if ([string]::IsNullOrEmpty($folder)) { throw 'cannot find the Windows folder ([Environment]::GetFolderPath(Windows) is empty)' }
    return $folder
}

function Get-AnswerFileFolders {
    <# The folders searched for answer files, each with its subfolders: <Windows>\Panther and <Windows>\System32\Sysprep. #>
    param([Parameter(Mandatory = $true)][string]$WindowsFolder)
    Join-Path $WindowsFolder 'Panther'
    Join-Path (Join-Path $WindowsFolder 'System32') 'Sysprep'
}

function Find-AnswerFileCopies {
    <#
    .SYNOPSIS
        The full paths of every file named unattend.xml or autounattend.xml (in any
        case, as NTFS compares names) in the answer-file folders and their subfolders.
    .DESCRIPTION
        Hidden and system files are included. A folder junction or symbolic link is
        not followed (it leads out of these folders); a file link with such a name is
        listed (deleting it removes the link). A folder that does not exist is
        skipped; one that cannot be listed throws, naming it.
    #>
    param([Parameter(Mandatory = $true)][string]$WindowsFolder)
    foreach ($root in @(Get-AnswerFileFolders -WindowsFolder $WindowsFolder)) {
        if (-not (Test-Path -LiteralPath $root -PathType Container)) { continue }
        # Each folder, then its subfolders level by level (by name within a folder).
        $pending = New-Object System.Collections.Generic.Queue[string]
        $pending.Enqueue($root)
        while ($pending.Count -gt 0) {
            $folder = $pending.Dequeue()
            try {
                $items = @(Get-ChildItem -LiteralPath $folder -Force -ErrorAction Stop | Sort-Object -Property Name)
            }
            catch {
                throw ("cannot list {0}: {1}" -f $folder, $_.Exception.Message)
            }
            foreach ($item in $items) {
                $isLink = [bool]($item.Attributes -band [System.IO.FileAttributes]::ReparsePoint)
                if ($item.PSIsContainer) {
                    if (-not $isLink) { $pending.Enqueue($item.FullName) }
                }
                elseif ($script:AnswerFileNames -contains $item.Name) {
                    $item.FullName
                }
            }
        }
    }
}

function Remove-AnswerFileCopies {
    <#
    .SYNOPSIS
        Deletes every answer file Find-AnswerFileCopies finds (read-only and hidden ones too).
    .DESCRIPTION
        Each deletion is logged as a change with its path. Nothing found is not an
        error (a second run changes nothing). Every file is tried; then, if any could
        not be deleted (or is still there after Remove-Item), this throws naming each
        with the cause.
    #>
    param([Parameter(Mandatory = $true)][string]$WindowsFolder)
    $found = @(Find-AnswerFileCopies -WindowsFolder $WindowsFolder)
    if ($found.Count -eq 0) {
        Write-Log ("no answer file ({0}) is left under {1}" -f ($script:AnswerFileNames -join ', '), (@(Get-AnswerFileFolders -WindowsFolder $WindowsFolder) -join ', '))
        return
    }
    $failed = New-Object System.Collections.Generic.List[string]
    foreach ($path in $found) {
        try {
            Remove-Item -LiteralPath $path -Force -ErrorAction Stop
        }
        catch {
            $failed.Add(('{0} ({1})' -f $path, $_.Exception.Message))
            continue
        }
        if (Test-Path -LiteralPath $path) {
            $failed.Add(('{0} (still there after Remove-Item)' -f $path))
            continue
        }
        Add-ChangeRecord ("answer file removed: {0}" -f $path)
    }
    if ($failed.Count -gt 0) {
        throw ("could not delete {0} answer file(s): {1}" -f $failed.Count, ($failed -join '; '))
    }
}

# ---------------------------------------------------------------------------
# Free space
# ---------------------------------------------------------------------------

function Invoke-FreeSpaceRelease {
    <#
    .SYNOPSIS
        Tells the disk which blocks of C: are free (Optimize-Volume -DriveLetter C
        -ReTrim), so that TRIM reaches the qcow2 (the VM's drive discards, with
        discard=unmap and detect-zeroes=unmap) and the published image carries no
        deleted data. Returns $true when it ran; a volume or disk that cannot trim
        only warns (the image is then larger, not wrong), and returns $false.
    #>
    try {
        Optimize-Volume -DriveLetter C -ReTrim -ErrorAction Stop
        Write-Log 'provision: free space of C: released (Optimize-Volume -ReTrim)'
        return $true
    }
    catch {
        Write-Log -Level WARN ("provision: could not release the free space of C: (Optimize-Volume -ReTrim): {0}; the image keeps the deleted blocks" -f $_.Exception.Message)
        return $false
    }
}

# ---------------------------------------------------------------------------
# Software report (check.ps1 writes it; publish puts it next to the manifest)
# ---------------------------------------------------------------------------

$script:RegCurrentVersion = 'HKLM:\SOFTWARE\Microsoft\Windows NT\CurrentVersion'
$script:SoftwareReportVersion = 1

function Get-WindowsBuildInfo {
    <# Product name, edition, display version and build (CurrentBuild.UBR) of the running Windows, from the registry. #>
    $values = @{}
    foreach ($name in 'ProductName', 'EditionID', 'DisplayVersion', 'CurrentBuild', 'UBR') {
        $value = Get-RegistryValue -Path $script:RegCurrentVersion -Name $name
        if ($null -eq $value) { $values[$name] = $null } else { $values[$name] = [string]$value }
    }
    $build = $values['CurrentBuild']
    if ($build -and $values['UBR']) { $build = '{0}.{1}' -f $build, $values['UBR'] }
    return [ordered]@{
        productName    = $values['ProductName']
        edition        = $values['EditionID']
        displayVersion = $values['DisplayVersion']
        build          = $build
    }
}

function Get-SignedDriverList {
    <# Every signed PnP driver Windows knows (Win32_PnPSignedDriver). #>
    return @(Get-CimInstance -ClassName Win32_PnPSignedDriver -ErrorAction Stop)
}

function Get-InstalledDrivers {
    <#
    .SYNOPSIS
        The drivers that did not come with Windows (the virtio drivers): one entry per
        device and INF, with provider and version, sorted by device name.
    #>
    $seen = @{}
    $list = New-Object System.Collections.Generic.List[object]
    foreach ($driver in @(Get-SignedDriverList)) {
        $provider = [string]$driver.DriverProviderName
        $inf = [string]$driver.InfName
        if (-not $provider -or $provider -eq 'Microsoft' -or -not $inf) { continue }
        $device = [string]$driver.DeviceName
        $key = '{0}|{1}' -f $device, $inf
        if ($seen.ContainsKey($key)) { continue }
        $seen[$key] = $true
        $list.Add([ordered]@{ device = $device; provider = $provider; version = [string]$driver.DriverVersion; inf = $inf })
    }
    return @($list | Sort-Object -Property { $_.device }, { $_.inf })
}

function Get-OpenSshServerInfo {
    <# The sshd service's executable and its product version, or nulls when there is no sshd. #>
    $service = Get-CimInstance -ClassName Win32_Service -Filter "Name='sshd'" -ErrorAction SilentlyContinue
    $info = [ordered]@{ version = $null; path = $null }
    if ($null -eq $service -or -not $service.PathName) { return $info }
    $path = ([string]$service.PathName).Trim()
    if ($path.StartsWith('"')) { $path = $path.Substring(1, $path.IndexOf('"', 1) - 1) } else { $path = ($path -split ' ')[0] }
    $info.path = $path
    if (Test-Path -LiteralPath $path -PathType Leaf) { $info.version = [string](Get-Item -LiteralPath $path).VersionInfo.ProductVersion }
    return $info
}

function Get-VsBuildToolsVersion {
    <# installationVersion of the Visual Studio instance Get-VsBuildToolsPath finds, or $null. #>
    param([Parameter(Mandatory = $true)][string]$Version)
    $path = Get-VsBuildToolsPath -Version $Version
    if (-not $path) { return $null }
    $vswhere = Join-Path ${env:ProgramFiles(x86)} 'Microsoft Visual Studio\Installer\vswhere.exe'
    $found = & $vswhere -products '*' -path $path -property installationVersion -format value -nologo
    $first = @($found | Where-Object { $_ }) | Select-Object -First 1
    if ($first) { return [string]$first }
    return $null
}

function Get-InstalledTools {
    <#
    .SYNOPSIS
        Every tool provisioning installed (switched on): name, version, where it is,
        the download's URL (query hidden) and the SHA-256 it was verified against, and
        the SHA-256 of what is installed where that is a single file or a recorded stamp.
    #>
    param([Parameter(Mandatory = $true)]$Settings)
    $tools = New-Object System.Collections.Generic.List[object]
    if ($Settings.installBuildlet) {
        $installed = $null
        $version = $null
        if (Test-Path -LiteralPath $Settings.buildletPath -PathType Leaf) {
            $installed = Get-FileSha256 -Path $Settings.buildletPath
            $fileVersion = (Get-Item -LiteralPath $Settings.buildletPath).VersionInfo.FileVersion
            if ($fileVersion) { $version = [string]$fileVersion }
        }
        $tools.Add([ordered]@{
                name = 'buildlet-stage0'; version = $version; path = $Settings.buildletPath
                url = (ConvertTo-LogUrl -Url $Settings.buildletStage0Url); downloadSha256 = $Settings.buildletStage0Sha256.ToLowerInvariant()
                installedSha256 = $installed
            })
    }
    if ($Settings.installLlvmMingw) {
        $stamp = Join-Path $Settings.llvmMingwDir '.source-sha256'
        $installed = $null
        if (Test-Path -LiteralPath $stamp -PathType Leaf) { $installed = (Get-Content -LiteralPath $stamp -Raw).Trim() }
        # Releases are named llvm-mingw-<date>-<crt>-<arch>.zip; the date is the version.
        $version = $null
        if ($Settings.llvmMingwUrl -match 'llvm-mingw-([0-9]{8})') { $version = $Matches[1] }
        $tools.Add([ordered]@{
                name = 'llvm-mingw'; version = $version; path = $Settings.llvmMingwDir
                url = (ConvertTo-LogUrl -Url $Settings.llvmMingwUrl); downloadSha256 = $Settings.llvmMingwSha256.ToLowerInvariant()
                installedSha256 = $installed
            })
    }
    if ($Settings.installVsBuildTools) {
        $tools.Add([ordered]@{
                name = ('vs-build-tools-{0}' -f $Settings.vsVersion); version = (Get-VsBuildToolsVersion -Version $Settings.vsVersion)
                path = (Get-VsBuildToolsPath -Version $Settings.vsVersion)
                url = (ConvertTo-LogUrl -Url $Settings.vsBuildToolsUrl); downloadSha256 = $Settings.vsBuildToolsSha256.ToLowerInvariant()
                installedSha256 = $null
            })
    }
    return $tools.ToArray()
}

function New-SoftwareReport {
    <#
    .SYNOPSIS
        What the image holds, for software-report.json: Windows edition and build, the
        drivers with their versions, OpenSSH's version, every installed tool with its
        version and the SHA-256 of its download, and the settings applied (each step
        on or off, and check.ps1's rows, where passwords show only as matching or not).
        A part that cannot be read holds {error} instead, so the rest is still reported.
    #>
    param([Parameter(Mandatory = $true)]$Settings, [object[]]$Rows = @())
    $part = {
        param([scriptblock]$Read)
        try { & $Read } catch { [ordered]@{ error = $_.Exception.Message } }
    }
    $steps = @(foreach ($step in Get-StepCatalog) {
            $applied = $true
            if ($null -ne $step.Switch) { $applied = ($Settings[$step.Switch] -eq $true) }
            [ordered]@{ step = $step.Name; applied = $applied }
        })
    $checked = @(foreach ($row in $Rows) {
            [ordered]@{ step = $row.Step; setting = $row.Setting; expected = $row.Expected; actual = $row.Actual; result = $row.Result }
        })
    return [ordered]@{
        reportVersion = $script:SoftwareReportVersion
        windows       = (& $part { Get-WindowsBuildInfo })
        drivers       = (& $part { , @(Get-InstalledDrivers) })
        openSsh       = (& $part { Get-OpenSshServerInfo })
        tools         = (& $part { , @(Get-InstalledTools -Settings $Settings) })
        steps         = $steps
        settings      = $checked
    }
}

function Write-SoftwareReport {
    <# Writes the report as JSON (UTF-8, no byte order mark) to Path, through a temporary file. #>
    param([Parameter(Mandatory = $true)]$Report, [Parameter(Mandatory = $true)][string]$Path)
    if (Test-Path -LiteralPath $Path -PathType Container) { throw ("{0} is a folder" -f $Path) }
    $folder = Split-Path -Parent $Path
    if ($folder -and -not (Test-Path -LiteralPath $folder -PathType Container)) { New-Item -ItemType Directory -Path $folder -Force | Out-Null }
    $json = ConvertTo-Json -InputObject $Report -Depth 8
    $temp = '{0}.tmp' -f $Path
    [IO.File]::WriteAllText($temp, $json, (New-Object System.Text.UTF8Encoding($false)))
    Move-Item -LiteralPath $temp -Destination $Path -Force
}

Export-ModuleMember -Function @(
    'Get-SettingSchema', 'Get-StepCatalog', 'Assert-StepNames', 'Read-ProvisionSettings', 'Format-SettingsForLog',
    'Initialize-Log', 'Add-LogSecret', 'Write-Log', 'Add-ChangeRecord', 'Get-ChangeCount', 'ConvertTo-LogUrl',
    'New-ProvisionStep', 'Invoke-ProvisionSteps',
    'Get-ParentFolder', 'Get-BuildletRunCommand', 'Get-DesiredRegistryValues', 'Get-AbsentRegistryValues',
    'Get-RegistryValue', 'Set-RegistryValue', 'Remove-RegistryValue', 'Test-RegistryValueEqual',
    'Get-FileSha256', 'Save-VerifiedDownload', 'Expand-ZipArchive',
    'Test-IsAdministrator', 'Test-LocalCredential', 'Test-TamperProtected',
    'Get-VsBuildToolsRequiredComponents', 'Get-VsBuildToolsVersionRange', 'Get-VsBuildToolsArguments', 'Get-VsBuildToolsPath',
    'Wait-ProcessExit', 'Get-MachineEnvironmentVariable', 'Set-MachineEnvironmentVariable',
    'Get-DefenderExclusionPaths', 'Test-DefenderExclusion', 'Get-BuildletEnvName',
    'Get-WindowsFolder', 'Get-AnswerFileFolders', 'Find-AnswerFileCopies', 'Remove-AnswerFileCopies',
    'Get-WindowsBuildInfo', 'Get-SignedDriverList', 'Get-InstalledDrivers', 'Get-OpenSshServerInfo',
    'Get-VsBuildToolsVersion', 'Get-InstalledTools', 'New-SoftwareReport', 'Write-SoftwareReport',
    'Invoke-FreeSpaceRelease'
)
