<#
    Test support for the guest scripts (dot-source it in BeforeAll).

    An in-memory stand-in for the Windows state that provision.ps1 and
    check.ps1 read and change: HKLM registry keys and values, services,
    Defender, firewall profiles, local users and Administrators, the Visual
    Studio installer, machine environment variables and downloads.
    Enable-FakeWindows (call it in the Describe's BeforeAll, and
    Disable-FakeWindows in its AfterAll) replaces the Windows-only commands by
    plain functions that act on $global:FakeWin (New-FakeWindows makes a fresh
    one); file system commands stay real (tests use $TestDrive).
    Save-FakeMachine and Restore-FakeMachine let tests start from the same
    state (say, a provisioned machine) without redoing it.
    The Windows folder (C:\Windows) is a real folder under the test's root
    ($global:FakeWin.WindowsDir, set by New-TestEnvironment): Get-WindowsFolder
    answers with it; Get-FakeWindowsPath and Add-FakeWindowsFile reach into it.
    Every change to the fake state is appended to $global:FakeWin.Changes, so
    "a second run changes nothing" is a real assertion.
#>

$global:RepoRoot = (Resolve-Path (Join-Path $PSScriptRoot '../..')).Path
$global:GuestDir = Join-Path (Join-Path $global:RepoRoot 'provisioning') 'windows'
$global:ProvisionScript = Join-Path $global:GuestDir 'provision.ps1'
$global:CheckScript = Join-Path $global:GuestDir 'check.ps1'
$global:CommonModule = Join-Path $global:GuestDir 'common.psm1'

# Windows-only cmdlets do not exist in PowerShell on Linux: give Pester a
# command (with the parameters the scripts use) to mock.
. (Join-Path $PSScriptRoot 'Stubs.ps1')
Add-CommandStubs @{
    'Get-Service'            = '[CmdletBinding()] param([Parameter(Position = 0)][string[]]$Name)'
    'Set-Service'            = '[CmdletBinding()] param([Parameter(Position = 0)][string]$Name, [string]$StartupType)'
    'Get-MpPreference'       = '[CmdletBinding()] param()'
    'Get-MpComputerStatus'   = '[CmdletBinding()] param()'
    'Set-MpPreference'       = '[CmdletBinding()] param([bool]$DisableRealtimeMonitoring)'
    'Add-MpPreference'       = '[CmdletBinding()] param([string[]]$ExclusionPath)'
    'Get-NetFirewallProfile' = '[CmdletBinding()] param([string[]]$Name)'
    'Set-NetFirewallProfile' = '[CmdletBinding()] param([string[]]$Name, [string]$Enabled)'
    'Get-LocalUser'          = '[CmdletBinding()] param([Parameter(Position = 0)][string]$Name)'
    'New-LocalUser'          = '[CmdletBinding()] param([string]$Name, [securestring]$Password, [switch]$PasswordNeverExpires, [switch]$AccountNeverExpires, [string]$Description)'
    'Set-LocalUser'          = '[CmdletBinding()] param([string]$Name, [securestring]$Password, [bool]$PasswordNeverExpires)'
    'Enable-LocalUser'       = '[CmdletBinding()] param([string]$Name)'
    'Get-LocalGroupMember'   = '[CmdletBinding()] param([string]$SID, [string]$Group)'
    'Add-LocalGroupMember'   = '[CmdletBinding()] param([string]$SID, [string]$Group, [string[]]$Member)'
    'Optimize-Volume'        = '[CmdletBinding()] param([string]$DriveLetter, [switch]$ReTrim)'
}

function global:ConvertTo-FakeRegistryKey {
    param([string]$Path)
    return $Path.TrimEnd('\').ToLowerInvariant()
}

function global:Add-FakeRegistryKey {
    param([string]$Path)
    $parts = $Path.TrimEnd('\').Split('\')
    for ($i = 1; $i -le $parts.Count; $i++) {
        $key = ConvertTo-FakeRegistryKey (($parts[0..($i - 1)]) -join '\')
        if (-not $global:FakeWin.Keys.ContainsKey($key)) { $global:FakeWin.Keys[$key] = $true }
    }
}

function global:Set-FakeRegistryValue {
    <# Sets a value directly in the fake (test setup; not recorded as a change). #>
    param([string]$Path, [string]$Name, $Value, [string]$Type = 'String')
    Add-FakeRegistryKey -Path $Path
    $global:FakeWin.Registry[(ConvertTo-FakeRegistryKey $Path) + '|' + $Name.ToLowerInvariant()] = @{ Path = $Path; Name = $Name; Value = $Value; Type = $Type }
}

function global:Get-FakeRegistryValue {
    param([string]$Path, [string]$Name)
    $entry = $global:FakeWin.Registry[(ConvertTo-FakeRegistryKey $Path) + '|' + $Name.ToLowerInvariant()]
    if ($null -eq $entry) { return $null }
    return $entry.Value
}

function global:Remove-FakeRegistryValue {
    param([string]$Path, [string]$Name)
    $global:FakeWin.Registry.Remove((ConvertTo-FakeRegistryKey $Path) + '|' + $Name.ToLowerInvariant())
}

function global:New-FakeWindows {
    <# A fresh machine as it looks after Windows Setup. #>
    $global:FakeWin = @{
        Registry    = @{}
        Keys        = @{}
        Services    = @{
            NlaSvc         = 'Automatic'
            LanmanServer   = 'Automatic'
            BITS           = 'Manual'
            DPS            = 'Automatic'
            MSDTC          = 'Manual'
            IKEEXT         = 'Manual'
            RemoteRegistry = 'Disabled'
            lmhosts        = 'Manual'
            sshd           = 'Automatic'
        }
        # Tamper Protection keeps real-time monitoring on; exclusions still apply unless ExclusionsBlocked.
        Defender    = @{ DisableRealtimeMonitoring = $false; TamperProtection = $false; TamperHidden = $false; Exclusions = (New-Object System.Collections.Generic.List[string]); ExclusionsBlocked = $false }
        MachineEnv  = @{}
        Firewall    = [ordered]@{ Domain = $true; Private = $true; Public = $true }
        Users       = @{}
        Admins      = New-Object System.Collections.Generic.List[string]
        NextRid     = 1001
        VsInstalled = $false
        # The VS version the installed instance has ($null: whichever version is asked for).
        VsInstalledVersion = $null
        # The version the served bootstrapper installs ($null: the one asked for).
        VsBootstrapperVersion = $null
        VsExitCode  = 0
        VsInstalls  = $true
        # The bootstrapper leaves a child running after it exits (as Windows installers may):
        # Start-Process -Wait, which waits for the process tree, would never return.
        VsLeavesChild = $false
        Served      = @{}
        Downloads   = New-Object System.Collections.Generic.List[string]
        Processes   = New-Object System.Collections.Generic.List[object]
        Changes     = New-Object System.Collections.Generic.List[string]
        IsAdmin     = $true
        # The folder standing in for C:\Windows (New-TestEnvironment makes it).
        WindowsDir  = $null
        # Win32_PnPSignedDriver rows (Microsoft's own among them, and a device listed twice).
        Drivers     = @(
            [pscustomobject]@{ DeviceName = 'Red Hat VirtIO Ethernet Adapter'; DriverProviderName = 'Red Hat, Inc.'; DriverVersion = '100.95.104.26200'; InfName = 'oem3.inf' }
            [pscustomobject]@{ DeviceName = 'Red Hat VirtIO Ethernet Adapter'; DriverProviderName = 'Red Hat, Inc.'; DriverVersion = '100.95.104.26200'; InfName = 'oem3.inf' }
            [pscustomobject]@{ DeviceName = 'Standard NVM Express Controller'; DriverProviderName = 'Microsoft'; DriverVersion = '10.0.22621.2506'; InfName = 'stornvme.inf' }
            [pscustomobject]@{ DeviceName = 'QEMU USB Tablet'; DriverProviderName = ''; DriverVersion = ''; InfName = '' }
            [pscustomobject]@{ DeviceName = 'Balloon Device'; DriverProviderName = 'Red Hat, Inc.'; DriverVersion = '100.95.104.26200'; InfName = 'oem5.inf' }
        )
        DriversFail = $false
        OpenSsh     = [ordered]@{ version = '9.5.0.0'; path = 'C:\Windows\System32\OpenSSH\sshd.exe' }
        # installationVersion vswhere reports for the installed instance.
        VsFullVersion = '17.9.34607.119'
        # Optimize-Volume -ReTrim calls (drive letters) and whether it fails.
        Trims       = New-Object System.Collections.Generic.List[string]
        TrimFails   = $false
    }
    $global:FakeWin.Admins.Add('S-1-5-21-1000-1000-1000-500')
    foreach ($key in @(
            'HKLM:\SOFTWARE\Microsoft\Windows\Windows Error Reporting',
            'HKLM:\SOFTWARE\Microsoft\Windows\CurrentVersion\Policies\System',
            'HKLM:\SOFTWARE\Microsoft\Windows\CurrentVersion\Run',
            'HKLM:\SOFTWARE\Microsoft\Windows NT\CurrentVersion\Winlogon',
            'HKLM:\SOFTWARE\Policies\Microsoft\Windows')) {
        Add-FakeRegistryKey -Path $key
    }
    Set-FakeRegistryValue -Path 'HKLM:\SOFTWARE\Microsoft\Windows\CurrentVersion\Policies\System' -Name 'EnableLUA' -Value 1 -Type 'DWord'
    Set-FakeRegistryValue -Path 'HKLM:\SOFTWARE\Microsoft\Windows NT\CurrentVersion\Winlogon' -Name 'AutoAdminLogon' -Value '0'
    Set-FakeRegistryValue -Path 'HKLM:\SOFTWARE\Microsoft\Windows NT\CurrentVersion\Winlogon' -Name 'Shell' -Value 'explorer.exe'
    $currentVersion = 'HKLM:\SOFTWARE\Microsoft\Windows NT\CurrentVersion'
    Add-FakeRegistryKey -Path $currentVersion
    Set-FakeRegistryValue -Path $currentVersion -Name 'ProductName' -Value 'Windows 10 Pro'
    Set-FakeRegistryValue -Path $currentVersion -Name 'EditionID' -Value 'Professional'
    Set-FakeRegistryValue -Path $currentVersion -Name 'DisplayVersion' -Value '23H2'
    Set-FakeRegistryValue -Path $currentVersion -Name 'CurrentBuild' -Value '22631'
    Set-FakeRegistryValue -Path $currentVersion -Name 'UBR' -Value 2861 -Type 'DWord'
}

function global:Add-FakeUser {
    <# Adds a local user directly (test setup). #>
    param([string]$Name, [string]$Password, [bool]$Enabled = $true, [bool]$NeverExpires = $false, [bool]$Admin = $false)
    $sid = 'S-1-5-21-1000-1000-1000-{0}' -f $global:FakeWin.NextRid
    $global:FakeWin.NextRid++
    $expires = $null
    if (-not $NeverExpires) { $expires = [DateTime]'2030-01-01' }
    $global:FakeWin.Users[$Name] = @{ Name = $Name; Password = $Password; Enabled = $Enabled; PasswordExpires = $expires; SID = $sid }
    if ($Admin) { $global:FakeWin.Admins.Add($sid) }
}

function global:Get-FakeRegistryPathArgument {
    param($Bound)
    if ($Bound.ContainsKey('LiteralPath')) { return [string](@($Bound['LiteralPath'])[0]) }
    if ($Bound.ContainsKey('Path')) { return [string](@($Bound['Path'])[0]) }
    return ''
}

function global:Add-FakeMock {
    <# Pester-mocks a command both where the scripts call it and inside common.psm1 (for a test's own mocks). #>
    param([string]$CommandName, [scriptblock]$MockWith, [scriptblock]$ParameterFilter)
    if ($ParameterFilter) {
        Mock -CommandName $CommandName -MockWith $MockWith -ParameterFilter $ParameterFilter
        Mock -CommandName $CommandName -MockWith $MockWith -ParameterFilter $ParameterFilter -ModuleName common
    }
    else {
        Mock -CommandName $CommandName -MockWith $MockWith
        Mock -CommandName $CommandName -MockWith $MockWith -ModuleName common
    }
}

# What Enable-FakeWindows replaced (name -> how to put it back), the fake bodies
# and the real cmdlets the fakes pass file system calls to.
if (-not (Get-Variable -Name FakeCommands -Scope Global -ErrorAction SilentlyContinue)) { $global:FakeCommands = @{ Saved = [ordered]@{}; Bodies = @{}; Cmdlets = @{} } }

function global:Set-FakeCommand {
    <#
    Replaces the command Name (a cmdlet, a global function such as a stub, or a
    function of common.psm1) by a plain function with the same parameters whose
    body is Body, dot-sourced: the parameters are variables and $FakeBound
    holds the bound ones ($PSBoundParameters). A cmdlet is shadowed by a global
    function; a global function is replaced; a common.psm1 function is replaced
    inside the module (for its own calls) and where it was imported. Plain
    functions, not Pester mocks: a Pester mock costs milliseconds per call and
    per definition, and the scripts make hundreds of these calls per run. A
    test can still Mock any of them on top. Disable-FakeWindows puts back what
    was there.
    #>
    param([Parameter(Mandatory = $true)][string]$Name, [Parameter(Mandatory = $true)][scriptblock]$Body)
    if ($global:FakeCommands.Saved.Contains($Name)) { throw "Set-FakeCommand: $Name is already faked" }
    $command = @(Get-Command -Name $Name -CommandType Cmdlet, Function)[0]
    $metadata = [System.Management.Automation.CommandMetadata]::new($command)
    $global:FakeCommands.Bodies[$Name] = $Body
    if ($command.CommandType -eq 'Cmdlet') {
        $global:FakeCommands.Cmdlets[$Name] = $command
        $global:FakeCommands.Saved[$Name] = @{ Kind = 'Cmdlet' }
    }
    else {
        $global:FakeCommands.Saved[$Name] = @{ Kind = 'Function'; Original = $command.ScriptBlock; Module = $command.Module }
    }
    # Defined by a dot-sourced function statement, so that the function belongs to
    # this session state, where the bodies live, whoever calls it (common.psm1,
    # or another module such as Microsoft.PowerShell.Archive calling Test-Path):
    # a body dot-sourced from another session state would not see the parameters.
    $definition = "function global:{0} {{`n{1}`nparam({2})`n`$FakeBound = `$PSBoundParameters`n. `$global:FakeCommands.Bodies['{0}']`n}}" -f $Name,
    [System.Management.Automation.ProxyCommand]::GetCmdletBindingAttribute($metadata),
    [System.Management.Automation.ProxyCommand]::GetParamBlock($metadata)
    . ([scriptblock]::Create($definition))
    # The definition updated the imported function in place ($command.Module is
    # now empty); inside the module its own copy is replaced here.
    $module = $global:FakeCommands.Saved[$Name]['Module']
    if ($module) {
        $fake = (Get-Command -Name $Name -CommandType Function).ScriptBlock
        & $module { param($n, $sb) Set-Item -Path "function:script:$n" -Value $sb } $Name $fake
    }
}

function global:Disable-FakeWindows {
    <# Puts back every command Enable-FakeWindows replaced (call it in AfterAll). #>
    foreach ($name in @($global:FakeCommands.Saved.Keys)) {
        $saved = $global:FakeCommands.Saved[$name]
        if ($saved.Kind -eq 'Cmdlet') {
            Remove-Item -LiteralPath "function:$name"
        }
        else {
            Set-Item -Path "function:global:$name" -Value $saved.Original
            if ($saved.Module) { & $saved.Module { param($n, $sb) Set-Item -Path "function:script:$n" -Value $sb } $name $saved.Original }
        }
        $global:FakeCommands.Saved.Remove($name)
    }
    $global:FakeCommands.Bodies.Clear()
    $global:FakeCommands.Cmdlets.Clear()
}

function global:Enable-FakeWindows {
    <#
    Makes the Windows-only commands act on $global:FakeWin (call it in BeforeAll
    after importing common.psm1, and Disable-FakeWindows in AfterAll; New-FakeWindows
    resets the state). Bodies run under the scripts' strict mode: read optional
    parameters through $FakeBound only.
    #>
    Disable-FakeWindows

    # Registry (HKLM only): each of these commands runs its registry body for an
    # HKLM:* path and the real cmdlet for any other path (the file system).
    $setValue = {
        $p = Get-FakeRegistryPathArgument $FakeBound
        if (-not $global:FakeWin.Keys.ContainsKey((ConvertTo-FakeRegistryKey $p))) {
            throw "Cannot find path '$p' because it does not exist."
        }
        $type = 'String'
        if ($FakeBound.ContainsKey('PropertyType')) { $type = $FakeBound['PropertyType'] }
        Set-FakeRegistryValue -Path $p -Name $Name -Value $Value -Type $type
        $global:FakeWin.Changes.Add("registry value set: $p\$Name")
    }
    $global:FakeCommands.Registry = @{
        'Test-Path'           = {
            $global:FakeWin.Keys.ContainsKey((ConvertTo-FakeRegistryKey (Get-FakeRegistryPathArgument $FakeBound)))
        }
        'New-Item'            = {
            $p = Get-FakeRegistryPathArgument $FakeBound
            Add-FakeRegistryKey -Path $p
            $global:FakeWin.Changes.Add("registry key created: $p")
            [pscustomobject]@{ PSPath = $p }
        }
        'Get-ItemProperty'    = {
            $entry = $global:FakeWin.Registry[(ConvertTo-FakeRegistryKey (Get-FakeRegistryPathArgument $FakeBound)) + '|' + "$Name".ToLowerInvariant()]
            if ($null -ne $entry) { [pscustomobject]@{ $entry.Name = $entry.Value } }
        }
        'New-ItemProperty'    = $setValue
        'Set-ItemProperty'    = $setValue
        'Remove-ItemProperty' = {
            $p = Get-FakeRegistryPathArgument $FakeBound
            Remove-FakeRegistryValue -Path $p -Name "$Name"
            $global:FakeWin.Changes.Add("registry value removed: $p\$Name")
        }
    }
    $global:FakeCommands.RegistryOrReal = {
        if ((Get-FakeRegistryPathArgument $FakeBound) -like 'HKLM:*') { . $global:FakeCommands.Registry[$FakeName] }
        else { & $global:FakeCommands.Cmdlets[$FakeName] @FakeBound }
    }
    foreach ($name in @($global:FakeCommands.Registry.Keys)) {
        Set-FakeCommand $name -Body ([scriptblock]::Create("`$FakeName = '$name'`n. `$global:FakeCommands.RegistryOrReal"))
    }

    # Services.
    Set-FakeCommand Get-Service {
        foreach ($n in $Name) {
            if ($global:FakeWin.Services.ContainsKey($n)) {
                [pscustomobject]@{ Name = $n; StartType = $global:FakeWin.Services[$n]; Status = 'Running' }
            }
        }
    }
    Set-FakeCommand Set-Service {
        if (-not $global:FakeWin.Services.ContainsKey($Name)) { throw "Service '$Name' was not found on computer '.'." }
        $global:FakeWin.Services[$Name] = $StartupType
        $global:FakeWin.Changes.Add("service $Name -> $StartupType")
    }

    # Defender (Tamper Protection silently ignores the change, as on Windows).
    Set-FakeCommand Get-MpPreference {
        # Defender reports no exclusions as $null, not as an empty list.
        $exclusions = $null
        if ($global:FakeWin.Defender.Exclusions.Count -gt 0) { $exclusions = [string[]]$global:FakeWin.Defender.Exclusions.ToArray() }
        [pscustomobject]@{ DisableRealtimeMonitoring = $global:FakeWin.Defender.DisableRealtimeMonitoring; ExclusionPath = $exclusions }
    }
    Set-FakeCommand Add-MpPreference {
        if ($global:FakeWin.Defender.ExclusionsBlocked) { return }
        foreach ($p in $ExclusionPath) {
            if (-not $global:FakeWin.Defender.Exclusions.Contains($p)) {
                $global:FakeWin.Defender.Exclusions.Add($p)
                $global:FakeWin.Changes.Add("defender exclusion added: $p")
            }
        }
    }
    Set-FakeCommand Get-MpComputerStatus {
        [pscustomobject]@{ IsTamperProtected = [bool]$global:FakeWin.Defender.TamperProtection -and -not $global:FakeWin.Defender.TamperHidden }
    }
    Set-FakeCommand Set-MpPreference {
        if (-not $global:FakeWin.Defender.TamperProtection) {
            $global:FakeWin.Defender.DisableRealtimeMonitoring = $DisableRealtimeMonitoring
            $global:FakeWin.Changes.Add("defender realtime disabled -> $DisableRealtimeMonitoring")
        }
    }

    # Firewall.
    Set-FakeCommand Get-NetFirewallProfile {
        foreach ($n in @($global:FakeWin.Firewall.Keys)) {
            [pscustomobject]@{ Name = $n; Enabled = $global:FakeWin.Firewall[$n] }
        }
    }
    Set-FakeCommand Set-NetFirewallProfile {
        foreach ($n in $Name) {
            $global:FakeWin.Firewall[$n] = ("$Enabled" -eq 'True')
            $global:FakeWin.Changes.Add("firewall $n -> $Enabled")
        }
    }

    # Local users and the Administrators group.
    Set-FakeCommand Get-LocalUser {
        $u = $global:FakeWin.Users[$Name]
        if ($null -ne $u) {
            [pscustomobject]@{ Name = $u.Name; Enabled = $u.Enabled; PasswordExpires = $u.PasswordExpires; SID = $u.SID }
        }
    }
    Set-FakeCommand New-LocalUser {
        if ($global:FakeWin.Users.ContainsKey($Name)) { throw "User $Name already exists." }
        $plain = (New-Object System.Net.NetworkCredential('', $Password)).Password
        Add-FakeUser -Name $Name -Password $plain -NeverExpires ([bool]$FakeBound['PasswordNeverExpires'])
        $global:FakeWin.Changes.Add("user created: $Name")
    }
    Set-FakeCommand Set-LocalUser {
        $u = $global:FakeWin.Users[$Name]
        if ($null -eq $u) { throw "User $Name was not found." }
        if ($FakeBound.ContainsKey('Password')) {
            $u.Password = (New-Object System.Net.NetworkCredential('', $Password)).Password
            $global:FakeWin.Changes.Add("user password set: $Name")
        }
        if ($FakeBound.ContainsKey('PasswordNeverExpires')) {
            if ($PasswordNeverExpires) { $u.PasswordExpires = $null } else { $u.PasswordExpires = [DateTime]'2030-01-01' }
            $global:FakeWin.Changes.Add("user password expiry set: $Name")
        }
    }
    Set-FakeCommand Enable-LocalUser {
        $global:FakeWin.Users[$Name].Enabled = $true
        $global:FakeWin.Changes.Add("user enabled: $Name")
    }
    Set-FakeCommand Get-LocalGroupMember {
        if ($FakeBound['SID'] -ne 'S-1-5-32-544') { throw 'the scripts must name Administrators by SID' }
        foreach ($memberSid in $global:FakeWin.Admins) {
            [pscustomobject]@{ Name = "FAKE\$memberSid"; SID = $memberSid }
        }
    }
    Set-FakeCommand Add-LocalGroupMember {
        if ($FakeBound['SID'] -ne 'S-1-5-32-544') { throw 'the scripts must name Administrators by SID' }
        foreach ($m in $Member) {
            $u = $global:FakeWin.Users[$m]
            if ($null -eq $u) { throw "Principal $m was not found." }
            if ($global:FakeWin.Admins.Contains($u.SID)) { throw "$m is already a member of group Administrators." }
            $global:FakeWin.Admins.Add($u.SID)
            $global:FakeWin.Changes.Add("admin added: $m")
        }
    }
    Set-FakeCommand Test-LocalCredential {
        $u = $global:FakeWin.Users[$UserName]
        ($null -ne $u) -and ($u.Password -ceq $Password)
    }
    Set-FakeCommand Test-IsAdministrator { $global:FakeWin.IsAdmin }
    Set-FakeCommand Get-WindowsFolder {
        if (-not $global:FakeWin.WindowsDir) { throw 'the fake machine has no Windows folder: set $global:FakeWin.WindowsDir' }
        $global:FakeWin.WindowsDir
    }

    # Machine-wide environment variables.
    Set-FakeCommand Get-MachineEnvironmentVariable {
        if ($global:FakeWin.MachineEnv.ContainsKey($Name)) { $global:FakeWin.MachineEnv[$Name] }
    }
    Set-FakeCommand Set-MachineEnvironmentVariable {
        $global:FakeWin.MachineEnv[$Name] = $Value
        $global:FakeWin.Changes.Add("machine environment variable set: $Name")
    }

    # Visual Studio installer.
    Set-FakeCommand Get-VsBuildToolsPath {
        $v = $global:FakeWin.VsInstalledVersion
        if ($global:FakeWin.VsInstalled -and ($null -eq $v -or $v -eq $Version)) {
            "C:\Program Files (x86)\Microsoft Visual Studio\$Version\BuildTools"
        }
    }
    Set-FakeCommand Start-Process {
        $wait = [bool]$FakeBound['Wait']
        $global:FakeWin.Processes.Add([pscustomobject]@{
                FilePath     = $FakeBound['FilePath']
                ArgumentList = @($FakeBound['ArgumentList'])
                Wait         = $wait
                PassThru     = [bool]$FakeBound['PassThru']
            })
        if ($wait -and $global:FakeWin.VsLeavesChild) {
            # What Windows does: -Wait waits for the whole tree, and the child outlives the installer.
            throw 'Start-Process -Wait is still waiting: the installer exited but a child it started is still running'
        }
        if ($global:FakeWin.VsInstalls) {
            $global:FakeWin.VsInstalled = $true
            $global:FakeWin.VsInstalledVersion = $global:FakeWin.VsBootstrapperVersion
            $global:FakeWin.Changes.Add('visual studio installed')
        }
        # A process that has exited: WaitForExit returns at once.
        $process = [pscustomobject]@{ ExitCode = $global:FakeWin.VsExitCode; Handle = [IntPtr]::new(4242); HasExited = $true }
        $process | Add-Member -MemberType ScriptMethod -Name WaitForExit -Value { param($Milliseconds) $true }
        $process | Add-Member -MemberType ScriptMethod -Name Kill -Value { throw 'the fake process has exited' }
        if ($FakeBound['PassThru']) { $process }
    }

    # What the software report reads.
    Set-FakeCommand Get-SignedDriverList {
        if ($global:FakeWin.DriversFail) { throw 'Invalid class (Win32_PnPSignedDriver)' }
        $global:FakeWin.Drivers
    }
    Set-FakeCommand Get-OpenSshServerInfo { $global:FakeWin.OpenSsh }
    Set-FakeCommand Get-VsBuildToolsVersion {
        $v = $global:FakeWin.VsInstalledVersion
        if ($global:FakeWin.VsInstalled -and ($null -eq $v -or $v -eq $Version)) { $global:FakeWin.VsFullVersion }
    }
    # TRIM of the free space.
    Set-FakeCommand Optimize-Volume {
        if ($global:FakeWin.TrimFails) { throw 'The volume optimization operation requested is not supported by the hardware backing the volume.' }
        if ($FakeBound['ReTrim']) { $global:FakeWin.Trims.Add([string]$FakeBound['DriveLetter']) }
    }

    # Downloads: serve local files registered in FakeWin.Served (URL -> path).
    Set-FakeCommand Invoke-WebRequest {
        $u = "$Uri"
        $global:FakeWin.Downloads.Add($u)
        if (-not $global:FakeWin.Served.ContainsKey($u)) { throw "Response status code does not indicate success: 404 (Not Found)." }
        Copy-Item -LiteralPath $global:FakeWin.Served[$u] -Destination $OutFile
    }
}

function global:Get-FakeWindowsPath {
    <# The real path of a path under the fake C:\Windows, given Windows-style: 'Panther\Unattend\Unattend.xml'. #>
    param([Parameter(Mandatory = $true)][string]$Relative)
    $path = $global:FakeWin.WindowsDir
    foreach ($part in $Relative.Split('\')) { $path = Join-Path $path $part }
    return $path
}

function global:Add-FakeWindowsFile {
    <# Writes a file under the fake C:\Windows (its folders made as needed); returns its real path. #>
    param([Parameter(Mandatory = $true)][string]$Relative, [string]$Content = '<unattend xmlns="urn:schemas-microsoft-com:unattend"/>')
    $path = Get-FakeWindowsPath $Relative
    New-Item -ItemType Directory -Path (Split-Path -Parent $path) -Force | Out-Null
    [System.IO.File]::WriteAllText($path, $Content)
    return $path
}

function global:Add-FakeSetupFiles {
    <#
    What Windows Setup leaves in C:\Windows on a generalized image's first boot:
    the cached answer file Panther\unattend.xml, Setup's logs, and Sysprep.
    #>
    [void](Add-FakeWindowsFile 'Panther\unattend.xml')
    [void](Add-FakeWindowsFile 'Panther\setupact.log' -Content 'setup actions')
    [void](Add-FakeWindowsFile 'Panther\setuperr.log' -Content '')
    [void](Add-FakeWindowsFile 'Panther\UnattendGC\setupact.log' -Content 'oobe actions')
    [void](Add-FakeWindowsFile 'System32\Sysprep\sysprep.exe' -Content 'MZ')
    [void](Add-FakeWindowsFile 'System32\Sysprep\Panther\setupact.log' -Content 'sysprep actions')
}

function global:New-RandomFile {
    param([string]$Path, [int]$Size = 4096)
    $bytes = New-Object byte[] $Size
    [System.Random]::new().NextBytes($bytes)
    [System.IO.File]::WriteAllBytes($Path, $bytes)
    return (Get-FileHash -LiteralPath $Path -Algorithm SHA256).Hash.ToLowerInvariant()
}

function global:New-TestEnvironment {
    <#
    Creates the files the downloads serve (a buildlet, an llvm-mingw-like zip,
    a VS bootstrapper), registers them in FakeWin.Served, makes the fake
    C:\Windows (Root\machine\Windows, with what Setup leaves there:
    Add-FakeSetupFiles), and writes a settings file with every switch on and
    every path under Root.
    Returns: ConfigPath, Settings (hashtable written), Root, LogPath,
    Password, User, WindowsDir and the hashes.
    #>
    param([Parameter(Mandatory = $true)][string]$Root, [hashtable]$Overrides = @{})
    $served = Join-Path $Root 'served'
    $machine = Join-Path $Root 'machine'
    New-Item -ItemType Directory -Path $served, $machine -Force | Out-Null
    $global:FakeWin.WindowsDir = Join-Path $machine 'Windows'
    Add-FakeSetupFiles

    $buildletSha = New-RandomFile -Path (Join-Path $served 'buildlet-stage0.exe') -Size 8192
    $vsSha = New-RandomFile -Path (Join-Path $served 'vs_BuildTools.exe') -Size 2048

    $tree = Join-Path $Root 'llvm-tree'
    $top = Join-Path $tree 'llvm-mingw-20990101-ucrt-aarch64'
    New-Item -ItemType Directory -Path (Join-Path $top 'bin'), (Join-Path $top 'include') -Force | Out-Null
    [void](New-RandomFile -Path (Join-Path (Join-Path $top 'bin') 'clang.exe') -Size 1024)
    Set-Content -LiteralPath (Join-Path (Join-Path $top 'include') 'stdio.h') -Value '/* test */'
    $zip = Join-Path $served 'llvm-mingw.zip'
    Compress-Archive -Path $top -DestinationPath $zip -Force
    $llvmSha = (Get-FileHash -LiteralPath $zip -Algorithm SHA256).Hash.ToLowerInvariant()

    $base = 'https://downloads.example.test/ci'
    $global:FakeWin.Served["$base/buildlet-stage0.exe"] = Join-Path $served 'buildlet-stage0.exe'
    $global:FakeWin.Served["$base/vs_BuildTools.exe?X-Amz-Signature=abc123"] = Join-Path $served 'vs_BuildTools.exe'
    $global:FakeWin.Served["$base/llvm-mingw.zip"] = $zip

    $password = 'Pw-' + [guid]::NewGuid().ToString('N')
    $settings = [ordered]@{
        logPath                 = Join-Path (Join-Path $machine 'log') 'provision.log'
        downloadDir             = Join-Path $machine 'downloads'
        disableWindowsUpdate    = $true
        disableErrorReportingUi = $true
        disableUac              = $true
        disableFirewall         = $true
        disableDefenderRealtime = $true
        disableServices         = $true
        installBuildlet         = $true
        buildletStage0Url       = "$base/buildlet-stage0.exe"
        buildletStage0Sha256    = $buildletSha
        buildletPath            = Join-Path (Join-Path $machine 'golang') 'bootstrap.exe'
        buildletEnv             = 'host-windows11-arm64-azure'
        installLlvmMingw        = $true
        llvmMingwUrl            = "$base/llvm-mingw.zip"
        llvmMingwSha256         = $llvmSha
        llvmMingwDir            = Join-Path (Join-Path $machine 'godep') 'llvm-aarch64'
        installVsBuildTools     = $true
        vsBuildToolsUrl         = "$base/vs_BuildTools.exe?X-Amz-Signature=abc123"
        vsBuildToolsSha256      = $vsSha
        vsVersion               = '2022'
        createBuilderUser       = $true
        builderUser             = 'ci-builder'
        builderPassword         = $password
        autoLogon               = $true
    }
    foreach ($key in $Overrides.Keys) {
        if ($null -eq $Overrides[$key]) { $settings.Remove($key) } else { $settings[$key] = $Overrides[$key] }
    }
    $configPath = Join-Path $Root 'settings.json'
    $settings | ConvertTo-Json -Depth 5 | Set-Content -LiteralPath $configPath -Encoding UTF8
    [pscustomobject]@{
        Root        = $Root
        ConfigPath  = $configPath
        Settings    = $settings
        LogPath     = $settings['logPath']
        Password    = $password
        User        = 'ci-builder'
        BuildletSha = $buildletSha
        LlvmSha     = $llvmSha
        VsSha       = $vsSha
        Served      = $served
        WindowsDir  = $global:FakeWin.WindowsDir
    }
}

function global:Save-TestSettings {
    <# Rewrites the settings file of a test environment after changing $Env.Settings. #>
    param([Parameter(Mandatory = $true)]$Environment)
    $Environment.Settings | ConvertTo-Json -Depth 5 | Set-Content -LiteralPath $Environment.ConfigPath -Encoding UTF8
}

function global:Copy-FakeValue {
    <# A deep copy of a fake state value: hashtables (keeping their key comparer), ordered dictionaries, lists, arrays and objects. #>
    param($Value)
    if ($null -eq $Value) { return $null }
    # (get_Keys(): $global:FakeWin has an entry named Keys.)
    if ($Value -is [hashtable]) {
        $copy = $Value.Clone()
        foreach ($key in @($Value.get_Keys())) { $copy[$key] = Copy-FakeValue $Value[$key] }
        return $copy
    }
    if ($Value -is [System.Collections.Specialized.OrderedDictionary]) {
        $copy = [ordered]@{}
        foreach ($key in @($Value.get_Keys())) { $copy[$key] = Copy-FakeValue $Value[$key] }
        return $copy
    }
    if ($Value -is [System.Collections.Generic.List[string]]) { return , [System.Collections.Generic.List[string]]::new($Value) }
    if ($Value -is [System.Collections.Generic.List[object]]) {
        $copy = [System.Collections.Generic.List[object]]::new()
        foreach ($item in $Value) { $copy.Add((Copy-FakeValue $item)) }
        return , $copy
    }
    if ($Value -is [array]) {
        $copy = $Value.Clone()
        for ($i = 0; $i -lt $copy.Length; $i++) { $copy[$i] = Copy-FakeValue $Value[$i] }
        return , $copy
    }
    if ($Value -is [System.Management.Automation.PSCustomObject]) { return $Value.psobject.Copy() }
    if ($Value -is [string] -or $Value -is [ValueType]) { return $Value }
    throw "Copy-FakeValue: no deep copy for a $($Value.GetType().FullName)"
}

function global:Save-FakeMachine {
    <#
    A snapshot of the fake machine and its test environment: $global:FakeWin
    (deep copy), the environment's settings and every file under its Root
    (copied to Root.saved). Restore-FakeMachine puts them back, so tests that
    start from the same state (a provisioned machine) need not redo it each time.
    #>
    param([Parameter(Mandatory = $true)]$Environment)
    $files = $Environment.Root + '.saved'
    if (Test-Path -LiteralPath $files) { Remove-Item -LiteralPath $files -Recurse -Force }
    Copy-Item -LiteralPath $Environment.Root -Destination $files -Recurse -Force
    [pscustomobject]@{
        FakeWin     = Copy-FakeValue $global:FakeWin
        Environment = $Environment.psobject.Copy()
        Settings    = Copy-FakeValue $Environment.Settings
        Files       = $files
    }
}

function global:Restore-FakeMachine {
    <# Puts back a Save-FakeMachine snapshot (state, settings, files); returns the test environment. #>
    param([Parameter(Mandatory = $true)]$Snapshot)
    $global:FakeWin = Copy-FakeValue $Snapshot.FakeWin
    $root = $Snapshot.Environment.Root
    if (Test-Path -LiteralPath $root) { Remove-Item -LiteralPath $root -Recurse -Force }
    Copy-Item -LiteralPath $Snapshot.Files -Destination $root -Recurse -Force
    $environment = $Snapshot.Environment.psobject.Copy()
    $environment.Settings = Copy-FakeValue $Snapshot.Settings
    return $environment
}

function global:Invoke-GuestScript {
    <#
    Runs provision.ps1 or check.ps1 in this process (so the mocks apply) and
    returns ExitCode and Output (every line it wrote: output and host).
    #>
    param([Parameter(Mandatory = $true)][ValidateSet('provision', 'check')][string]$Name, [Parameter(Mandatory = $true)][string]$ConfigPath)
    $path = $global:ProvisionScript
    if ($Name -eq 'check') { $path = $global:CheckScript }
    $global:LASTEXITCODE = -999
    $lines = & $path -ConfigPath $ConfigPath 6>&1 | ForEach-Object { "$_" }
    [pscustomobject]@{ ExitCode = $global:LASTEXITCODE; Output = @($lines); Text = (@($lines) -join "`n") }
}
