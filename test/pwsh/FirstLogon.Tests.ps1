# Tests of provisioning/windows/firstlogon.ps1 with the Windows cmdlets it
# calls replaced by mocks over a small in-memory state ($global:FL).

BeforeAll {
    $script:Script = Join-Path $PSScriptRoot '../../provisioning/windows/firstlogon.ps1'
    # Windows-only commands: stubs for Pester to mock (they throw if a test forgets one).
    . (Join-Path $PSScriptRoot 'Stubs.ps1')
    Add-CommandStubs @{
        'Get-Service'              = '[CmdletBinding()] param([string]$Name)'
        'Set-Service'              = '[CmdletBinding()] param([string]$Name, [string]$StartupType)'
        'Start-Service'            = '[CmdletBinding()] param([string]$Name)'
        'Get-WindowsCapability'    = '[CmdletBinding()] param([switch]$Online, [string]$Name)'
        'Add-WindowsCapability'    = '[CmdletBinding()] param([switch]$Online, [string]$Name)'
        'Get-NetIPAddress'         = '[CmdletBinding()] param([string]$AddressFamily)'
        'Get-NetFirewallRule'      = '[CmdletBinding()] param([string]$Name)'
        'Set-NetFirewallRule'      = '[CmdletBinding()] param([string]$Name, [string]$Enabled, [string]$Action, [string]$Profile)'
        'New-NetFirewallRule'      = '[CmdletBinding()] param([string]$Name, [string]$DisplayName, [string]$Enabled, [string]$Direction, [string]$Protocol, [string]$LocalPort, [string]$Action, [string]$Profile)'
        'New-ScheduledTaskAction'  = '[CmdletBinding()] param([string]$Execute, [string]$Argument)'
        'New-ScheduledTaskTrigger' = '[CmdletBinding()] param([switch]$Once, [datetime]$At, [timespan]$RepetitionInterval)'
        'Register-ScheduledTask'   = '[CmdletBinding()] param([string]$TaskName, $Action, $Trigger, [string]$User, [string]$RunLevel, [switch]$Force)'
        'Get-ScheduledTask'        = '[CmdletBinding()] param([string]$TaskName)'
        'Unregister-ScheduledTask' = '[CmdletBinding()] param([string]$TaskName, [switch]$Confirm)'
        'icacls.exe'               = 'param()'
    }

    function script:Invoke-FirstLogon {
        param([hashtable]$Params = @{})
        $global:LASTEXITCODE = 0
        & $script:Script -MediaRoot $script:Media -NetworkWaitSeconds 0 @Params *> $null
        if ($global:LASTEXITCODE -ne 0 -and (Test-Path -LiteralPath $script:Log)) { Write-Host (Get-Content -LiteralPath $script:Log -Raw) }
        return $global:LASTEXITCODE
    }
}

Describe 'firstlogon.ps1' {
    BeforeAll {
        # The mocks act on $global:FL, which BeforeEach makes anew.
        Mock Get-Service {
            if ($global:FL.SshdInstalled) { [pscustomobject]@{ Name = 'sshd'; Status = $(if ($global:FL.SshdRunning) { 'Running' } else { 'Stopped' }) } }
        }
        Mock Set-Service { $global:FL.Events.Add("set-service $StartupType") }
        Mock Start-Service {
            $global:FL.Events.Add("start-sshd port-open=$($global:FL.FirewallOpen) key-present=$(Test-Path -LiteralPath $global:FL.KeysFile)")
            $global:FL.SshdRunning = $true
        }
        Mock Get-WindowsCapability { [pscustomobject]@{ Name = $Name; State = $(if ($global:FL.SshdInstalled) { 'Installed' } else { 'NotPresent' }) } }
        Mock Add-WindowsCapability {
            $global:FL.Events.Add('add-capability')
            if ($global:FL.CapabilityFails) { throw 'Add-WindowsCapability failed. Error code = 0x800f0954' }
            $global:FL.SshdInstalled = $true
        }
        Mock Get-NetIPAddress { [pscustomobject]@{ IPAddress = '10.0.2.15' } }
        Mock Get-NetFirewallRule { if ($global:FL.FirewallRule) { [pscustomobject]@{ Name = $Name } } }
        Mock Set-NetFirewallRule {
            $global:FL.Events.Add("firewall-set $Enabled key-present=$(Test-Path -LiteralPath $global:FL.KeysFile)")
            $global:FL.FirewallOpen = ($Enabled -eq 'True')
        }
        Mock New-NetFirewallRule {
            $global:FL.Events.Add("firewall-new key-present=$(Test-Path -LiteralPath $global:FL.KeysFile)")
            $global:FL.FirewallRule = $true; $global:FL.FirewallOpen = $true
        }
        Mock icacls.exe { $global:FL.Events.Add("icacls $($args[0])"); $global:LASTEXITCODE = 0 }
        Mock New-ScheduledTaskAction { [pscustomobject]@{ Execute = $Execute; Argument = $Argument } }
        Mock New-ScheduledTaskTrigger { [pscustomobject]@{ Interval = $RepetitionInterval } }
        Mock Register-ScheduledTask { $global:FL.Task = [pscustomobject]@{ Name = $TaskName; Action = $Action; Trigger = $Trigger; User = $User } }
        Mock Get-ScheduledTask { if ($global:FL.Task -and $global:FL.Task.Name -eq $TaskName) { $global:FL.Task } }
        Mock Unregister-ScheduledTask { $global:FL.Events.Add("unregister $TaskName"); $global:FL.Task = $null }
    }

    BeforeEach {
        $root = Join-Path $TestDrive ([guid]::NewGuid().ToString('N'))
        $env:ProgramData = Join-Path $root 'ProgramData'
        $env:ProgramFiles = Join-Path $root 'ProgramFiles'
        $env:TEMP = Join-Path $root 'Temp'
        $script:Media = Join-Path $root 'media'
        New-Item -ItemType Directory -Force -Path $script:Media, $env:TEMP | Out-Null
        Set-Content -LiteralPath (Join-Path $script:Media 'authorized_keys') -Value "# pipeline`nssh-ed25519 AAAAC3Nza pipeline`n"
        $script:KeysFile = Join-Path $env:ProgramData 'ssh/administrators_authorized_keys'
        $script:Log = Join-Path $env:ProgramData 'windows-arm64-image/firstlogon.log'

        $global:FL = @{
            SshdInstalled = $false; SshdRunning = $false; CapabilityFails = $false
            Events = [Collections.Generic.List[string]]::new(); Task = $null; FirewallRule = $false; FirewallOpen = $false
            KeysFile = $script:KeysFile
        }
    }

    It 'installs OpenSSH, starts sshd first (it makes its own folder), opens TCP 22 only once the key is in place' {
        # The capability install makes the firewall rule, enabled.
        $global:FL.FirewallRule = $true; $global:FL.FirewallOpen = $true
        Invoke-FirstLogon | Should -Be 0
        $global:FL.Events | Should -Contain 'add-capability'
        $global:FL.Events | Should -Contain 'start-sshd port-open=False key-present=False'
        $global:FL.Events[-1] | Should -Be 'firewall-set True key-present=True'
        $global:FL.FirewallOpen | Should -BeTrue
        (Get-Content -LiteralPath $script:KeysFile -Raw) | Should -Be "ssh-ed25519 AAAAC3Nza pipeline`n"
        $global:FL.Task | Should -BeNullOrEmpty
    }

    It 'gives the retry task a media root that survives the command line ("E:\" would end in an escaped quote)' {
        $global:FL.CapabilityFails = $true
        $global:LASTEXITCODE = 0
        & $script:Script -MediaRoot 'E:\' -NetworkWaitSeconds 0 *> $null
        $global:LASTEXITCODE | Should -Be 1
        $global:FL.Task.Action.Argument | Should -Match ([regex]::Escape('-MediaRoot "E:\." -OpenSshSource Auto'))
    }

    It 'a failure schedules a retry of itself as SYSTEM; the retry that succeeds removes the task' {
        $global:FL.CapabilityFails = $true
        Invoke-FirstLogon | Should -Be 1
        (Get-Content -LiteralPath $script:Log -Raw) | Should -Match 'FAILED: OpenSSH server could not be installed: capability: Add-WindowsCapability failed'
        $global:FL.Task.Name | Should -Be 'windows-arm64-image-firstlogon'
        $global:FL.Task.User | Should -Be 'SYSTEM'
        $global:FL.Task.Action.Execute | Should -Be 'powershell.exe'
        $global:FL.Task.Action.Argument | Should -Match ([regex]::Escape('firstlogon.ps1" -MediaRoot "' + $script:Media + '"'))
        $global:FL.Task.Trigger.Interval | Should -Be (New-TimeSpan -Minutes 5)
        $global:FL.Events | Should -Not -Match '^start-sshd'

        # Windows Update answers now: the scheduled run succeeds and removes its task.
        $global:FL.CapabilityFails = $false
        Invoke-FirstLogon | Should -Be 0
        $global:FL.Events | Should -Contain 'unregister windows-arm64-image-firstlogon'
        $global:FL.Task | Should -BeNullOrEmpty
    }

    It 'a rerun on a finished machine changes nothing but the firewall rule it re-asserts' {
        Invoke-FirstLogon | Should -Be 0
        $global:FL.Events.Clear()
        Invoke-FirstLogon | Should -Be 0
        $global:FL.Events | Should -Not -Contain 'add-capability'
        $global:FL.Events | Should -Not -Match '^start-sshd'
        $global:FL.Events | Should -Contain 'firewall-set True key-present=True'
    }
}
