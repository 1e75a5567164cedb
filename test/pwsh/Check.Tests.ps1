# Tests of provisioning/windows/check.ps1 against the in-memory Windows of
# FakeWindows.ps1, after a real provision.ps1 run.

BeforeDiscovery {
    Import-Module (Join-Path $PSScriptRoot '../../provisioning/windows/common.psm1') -Force -DisableNameChecking
    # Steps with a switch (remove-answer-files has none: it is always checked).
    $switchCases = @(Get-StepCatalog | Where-Object { $_.Switch } | ForEach-Object { @{ Step = $_.Name; Switch = $_.Switch } })

    $winlogon = 'HKLM:\SOFTWARE\Microsoft\Windows NT\CurrentVersion\Winlogon'
    # One way to undo each setting, and the row that must then fail.
    $breakCases = @(
        @{ Label = 'Windows Update policy missing'; Row = 'WindowsUpdate\AU\NoAutoUpdate'; Break = { Remove-FakeRegistryValue 'HKLM:\SOFTWARE\Policies\Microsoft\Windows\WindowsUpdate\AU' 'NoAutoUpdate' } }
        @{ Label = 'error reporting UI shown'; Row = 'Windows Error Reporting\DontShowUI'; Break = { Set-FakeRegistryValue 'HKLM:\SOFTWARE\Microsoft\Windows\Windows Error Reporting' 'DontShowUI' 0 DWord } }
        @{ Label = 'UAC on'; Row = 'Policies\System\EnableLUA'; Break = { Set-FakeRegistryValue 'HKLM:\SOFTWARE\Microsoft\Windows\CurrentVersion\Policies\System' 'EnableLUA' 1 DWord } }
        @{ Label = 'a firewall profile on'; Row = 'firewall profile Public Enabled'; Break = { $global:FakeWin.Firewall['Public'] = $true } }
        @{ Label = 'Defender real-time on'; Row = 'Defender DisableRealtimeMonitoring'; Break = { $global:FakeWin.Defender.DisableRealtimeMonitoring = $false } }
        @{ Label = 'a service not disabled'; Row = 'service BITS StartType'; Break = { $global:FakeWin.Services['BITS'] = 'Manual' } }
        @{ Label = 'buildlet binary changed'; Row = 'bootstrap.exe SHA-256'; Break = { Set-Content -LiteralPath $global:TestEnv.Settings.buildletPath -Value 'tampered' } }
        @{ Label = 'buildlet binary missing'; Row = 'bootstrap.exe SHA-256'; Break = { Remove-Item -LiteralPath $global:TestEnv.Settings.buildletPath } }
        @{ Label = 'buildlet Run entry wrong'; Row = 'CurrentVersion\Run\buildlet'; Break = { Set-FakeRegistryValue 'HKLM:\SOFTWARE\Microsoft\Windows\CurrentVersion\Run' 'buildlet' 'C:\elsewhere.exe' } }
        @{ Label = 'buildlet Run entry starting in System32'; Row = 'CurrentVersion\Run\buildlet'; Break = { Set-FakeRegistryValue 'HKLM:\SOFTWARE\Microsoft\Windows\CurrentVersion\Run' 'buildlet' $global:TestEnv.Settings.buildletPath } }
        @{ Label = 'GO_BUILDER_ENV unset'; Row = 'machine environment variable GO_BUILDER_ENV'; Break = { $global:FakeWin.MachineEnv.Remove('GO_BUILDER_ENV') } }
        @{ Label = 'GO_BUILDER_ENV another value'; Row = 'machine environment variable GO_BUILDER_ENV'; Break = { $global:FakeWin.MachineEnv['GO_BUILDER_ENV'] = 'host-windows-amd64' } }
        @{ Label = 'llvm-mingw from another archive'; Row = 'source archive SHA-256'; Break = { Set-Content -LiteralPath (Join-Path $global:TestEnv.Settings.llvmMingwDir '.source-sha256') -Value ('12' * 32) } }
        @{ Label = 'clang.exe missing'; Row = 'clang.exe'; Break = { Remove-Item -LiteralPath (Join-Path (Join-Path $global:TestEnv.Settings.llvmMingwDir 'bin') 'clang.exe') } }
        @{ Label = 'VS Build Tools missing'; Row = 'VS 2022 instance'; Break = { $global:FakeWin.VsInstalled = $false } }
        @{ Label = 'VS Build Tools of another version'; Row = 'VS 2022 instance'; Break = { $global:FakeWin.VsInstalledVersion = '2019' } }
        @{ Label = 'builder user missing'; Row = 'local user ci-builder'; Break = { $global:FakeWin.Users.Remove('ci-builder') } }
        @{ Label = 'builder user disabled'; Row = 'local user ci-builder Enabled'; Break = { $global:FakeWin.Users['ci-builder'].Enabled = $false } }
        @{ Label = 'builder password expires'; Row = 'local user ci-builder password expires'; Break = { $global:FakeWin.Users['ci-builder'].PasswordExpires = [DateTime]'2031-01-01' } }
        @{ Label = 'builder not an administrator'; Row = 'local user ci-builder in Administrators'; Break = { [void]$global:FakeWin.Admins.Remove($global:FakeWin.Users['ci-builder'].SID) } }
        @{ Label = 'builder password changed'; Row = 'local user ci-builder password'; Break = { $global:FakeWin.Users['ci-builder'].Password = 'changed-elsewhere' } }
        @{ Label = 'autologon off'; Row = 'Winlogon\AutoAdminLogon'; Break = { Set-FakeRegistryValue $winlogon 'AutoAdminLogon' '0' } }
        @{ Label = 'autologon user wrong'; Row = 'Winlogon\DefaultUserName'; Break = { Set-FakeRegistryValue $winlogon 'DefaultUserName' 'Administrator' } }
        @{ Label = 'autologon password wrong'; Row = 'Winlogon\DefaultPassword'; Break = { Set-FakeRegistryValue $winlogon 'DefaultPassword' 'not-it' } }
        @{ Label = 'AutoLogonCount set'; Row = 'Winlogon\AutoLogonCount'; Break = { Set-FakeRegistryValue $winlogon 'AutoLogonCount' 2 DWord } }
        @{ Label = 'Setup''s cached answer file back'; Row = 'answer files'; Break = { [void](Add-FakeWindowsFile 'Panther\unattend.xml') } }
        @{ Label = 'an answer file in Panther\Unattend'; Row = 'answer files'; Break = { [void](Add-FakeWindowsFile 'Panther\Unattend\AutoUnattend.xml') } }
        @{ Label = 'an answer file in Sysprep'; Row = 'answer files'; Break = { [void](Add-FakeWindowsFile 'System32\Sysprep\UNATTEND.XML') } }
        @{ Label = 'an answer file deeper in Sysprep'; Row = 'answer files'; Break = { [void](Add-FakeWindowsFile 'System32\Sysprep\Panther\unattend.xml') } }
    )
    foreach ($case in $breakCases) { $case.Winlogon = $winlogon }
}

BeforeAll {
    . (Join-Path $PSScriptRoot 'FakeWindows.ps1')
    Import-Module $global:CommonModule -Force -DisableNameChecking

    # Rows of the printed table as objects (header and separator skipped).
    function ConvertFrom-CheckTable {
        param([string[]]$Lines)
        $header = [array]::IndexOf($Lines, ($Lines | Where-Object { $_ -match '^Step\s+\| Setting\s+\| Expected\s+\| Actual\s+\| Result$' } | Select-Object -First 1))
        if ($header -lt 0) { return @() }
        foreach ($line in $Lines[($header + 2)..($Lines.Count - 1)]) {
            if ($line -notmatch ' \| ') { break }
            $cells = $line -split ' \| '
            [pscustomobject]@{
                Step = $cells[0].Trim(); Setting = $cells[1].Trim(); Expected = $cells[2].Trim(); Actual = $cells[3].Trim(); Result = $cells[4].Trim()
            }
        }
    }
}

Describe 'check.ps1' {
    BeforeAll {
        Enable-FakeWindows
        # One provisioned machine; each test starts from a copy of it (state, settings and files).
        New-FakeWindows
        $environment = New-TestEnvironment -Root (Join-Path $TestDrive 'provisioned')
        $provisioned = Invoke-GuestScript provision $environment.ConfigPath
        $provisioned.ExitCode | Should -Be 0 -Because $provisioned.Text
        $script:provisionedMachine = Save-FakeMachine $environment
    }
    AfterAll { Disable-FakeWindows }

    BeforeEach {
        $global:TestEnv = Restore-FakeMachine $provisionedMachine
        $script:t = $global:TestEnv
    }

    It 'passes after provisioning, with a PASS row per setting of every step' {
        $r = Invoke-GuestScript check $t.ConfigPath
        $r.ExitCode | Should -Be 0 -Because $r.Text
        $rows = @(ConvertFrom-CheckTable $r.Output)
        # 3 policies, 3 firewall profiles, Defender, 8 services, buildlet 3,
        # llvm-mingw 2, VS 1, user 5, autologon 4, answer files 1.
        $rows | Should -HaveCount 31
        $rows | Where-Object { $_.Result -ne 'PASS' } | Should -BeNullOrEmpty
        foreach ($step in Get-StepCatalog) {
            @($rows | Where-Object { $_.Step -eq $step.Name }).Count | Should -BeGreaterThan 0 -Because "step $($step.Name) needs a check"
        }
        foreach ($name in (Get-SettingSchema | Where-Object { $_.Key -eq 'servicesToDisable' }).Default) {
            $rows.Setting | Should -Contain "service $name StartType"
        }
        $r.Output[-1] | Should -Be 'check: 31 of 31 checks passed, 0 failed'
    }

    It 'never prints the password' {
        $r = Invoke-GuestScript check $t.ConfigPath
        $r.Text | Should -Not -Match ([regex]::Escape($t.Password))
        $row = ConvertFrom-CheckTable $r.Output | Where-Object { $_.Setting -like '*\DefaultPassword' }
        $row.Expected | Should -Be '(configured password)'
        $row.Actual | Should -Be '(matches)'
    }

    It 'changes nothing on the machine' {
        $changes = $global:FakeWin.Changes.Count
        [void](Invoke-GuestScript check $t.ConfigPath)
        $global:FakeWin.Changes.Count | Should -Be $changes
        $global:FakeWin.Downloads | Should -HaveCount 3
    }

    It 'reports "<Label>" in its row and exits 1' -ForEach $breakCases {
        . $Break
        $r = Invoke-GuestScript check $t.ConfigPath
        $r.ExitCode | Should -Be 1
        $failed = @(ConvertFrom-CheckTable $r.Output | Where-Object { $_.Result -eq 'FAIL' })
        $failed | Should -HaveCount 1 -Because ($failed | Out-String)
        $failed[0].Setting | Should -BeLike "*$Row*"
        $r.Output | Where-Object { $_ -match '^check: \d+ of \d+ checks passed, 1 failed$' } | Should -HaveCount 1
        $r.Output[-1] | Should -Match ('^check: FAILED: .*' + [regex]::Escape($Row))
        $r.Text | Should -Not -Match ([regex]::Escape($t.Password))
    }

    It 'fails when any change provisioning made is undone (every change is covered by a check)' {
        # Replays each change recorded by the fake during provisioning, undoes
        # it, and expects the check to fail. A new kind of change without an
        # undo here fails this test, so a new setting cannot go unchecked.
        $fresh = $global:FakeWin.Changes.ToArray()
        $fresh | Should -Not -BeNullOrEmpty
        foreach ($change in $fresh) {
            $undo = $null
            switch -Regex ($change) {
                '^registry key created: ' { continue }
                '^registry value set: (.+)\\([^\\]+)$' {
                    $path = $Matches[1]; $name = $Matches[2]
                    $saved = $global:FakeWin.Registry[(ConvertTo-FakeRegistryKey $path) + '|' + $name.ToLowerInvariant()]
                    Remove-FakeRegistryValue $path $name
                    $undo = { $global:FakeWin.Registry[(ConvertTo-FakeRegistryKey $path) + '|' + $name.ToLowerInvariant()] = $saved }.GetNewClosure()
                }
                '^service (\S+) -> Disabled$' {
                    $svc = $Matches[1]
                    $global:FakeWin.Services[$svc] = 'Manual'
                    $undo = { $global:FakeWin.Services[$svc] = 'Disabled' }.GetNewClosure()
                }
                '^firewall (\S+) -> False$' {
                    $fw = $Matches[1]
                    $global:FakeWin.Firewall[$fw] = $true
                    $undo = { $global:FakeWin.Firewall[$fw] = $false }.GetNewClosure()
                }
                '^defender realtime disabled -> True$' {
                    $global:FakeWin.Defender.DisableRealtimeMonitoring = $false
                    $undo = { $global:FakeWin.Defender.DisableRealtimeMonitoring = $true }
                }
                '^user created: (.+)$' {
                    $user = $Matches[1]
                    $savedUser = $global:FakeWin.Users[$user]
                    $global:FakeWin.Users.Remove($user)
                    $undo = { $global:FakeWin.Users[$user] = $savedUser }.GetNewClosure()
                }
                '^admin added: (.+)$' {
                    $sid = $global:FakeWin.Users[$Matches[1]].SID
                    [void]$global:FakeWin.Admins.Remove($sid)
                    $undo = { $global:FakeWin.Admins.Add($sid) }.GetNewClosure()
                }
                '^machine environment variable set: (\S+)$' {
                    $envName = $Matches[1]
                    $savedValue = $global:FakeWin.MachineEnv[$envName]
                    $global:FakeWin.MachineEnv.Remove($envName)
                    $undo = { $global:FakeWin.MachineEnv[$envName] = $savedValue }.GetNewClosure()
                }
                '^defender exclusion added: (.+)$' {
                    $excluded = $Matches[1]
                    [void]$global:FakeWin.Defender.Exclusions.Remove($excluded)
                    $undo = { $global:FakeWin.Defender.Exclusions.Add($excluded) }.GetNewClosure()
                }
                '^visual studio installed$' {
                    $global:FakeWin.VsInstalled = $false
                    $undo = { $global:FakeWin.VsInstalled = $true }
                }
                default { throw "no undo for the change '$change': teach this test (and check.ps1) about it" }
            }
            if ($null -eq $undo) { continue }
            $r = Invoke-GuestScript check $t.ConfigPath
            $r.ExitCode | Should -Be 1 -Because "undoing '$change' must fail the check"
            & $undo
            (Invoke-GuestScript check $t.ConfigPath).ExitCode | Should -Be 0 -Because "restoring '$change' must pass again"
        }
    }

    It 'fails every row on a machine that was never provisioned' {
        New-FakeWindows
        Remove-Item -LiteralPath (Join-Path $t.Root 'machine') -Recurse -Force
        $global:FakeWin.WindowsDir = $t.WindowsDir
        Add-FakeSetupFiles
        $r = Invoke-GuestScript check $t.ConfigPath
        $r.ExitCode | Should -Be 1
        $rows = @(ConvertFrom-CheckTable $r.Output)
        $passing = @($rows | Where-Object { $_.Result -eq 'PASS' } | ForEach-Object { $_.Setting })
        # Only what a fresh machine already has passes: RemoteRegistry is
        # disabled out of the box and there is no AutoLogonCount.
        $passing | Should -Be @('service RemoteRegistry StartType', 'HKLM:\SOFTWARE\Microsoft\Windows NT\CurrentVersion\Winlogon\AutoLogonCount')
        foreach ($step in Get-StepCatalog) {
            @($rows | Where-Object { $_.Step -eq $step.Name -and $_.Result -eq 'FAIL' }).Count | Should -BeGreaterThan 0
        }
    }

    It 'checks nothing of <Step> when <Switch> is false' -ForEach $switchCases {
        $t.Settings[$Switch] = $false
        Save-TestSettings $t
        # Undo everything so that only the steps still switched on can pass.
        New-FakeWindows
        Remove-Item -LiteralPath (Join-Path $t.Root 'machine') -Recurse -Force
        $global:FakeWin.WindowsDir = $t.WindowsDir
        Add-FakeSetupFiles
        $r = Invoke-GuestScript check $t.ConfigPath
        $rows = @(ConvertFrom-CheckTable $r.Output)
        $rows | Where-Object { $_.Step -eq $Step } | Should -BeNullOrEmpty
        $r.Output | Should -Contain "check: switched off, not checked: $Step"
    }

    It 'checks the answer files whatever the switches' {
        foreach ($step in Get-StepCatalog | Where-Object { $_.Switch }) { $t.Settings[$step.Switch] = $false }
        Save-TestSettings $t
        $r = Invoke-GuestScript check $t.ConfigPath
        $r.ExitCode | Should -Be 0 -Because $r.Text
        $rows = @(ConvertFrom-CheckTable $r.Output)
        $rows | Should -HaveCount 1
        $rows[0].Step | Should -Be 'remove-answer-files'
        $rows[0].Setting | Should -Be ('answer files (unattend.xml, autounattend.xml) under {0}, {1}' -f (Get-FakeWindowsPath 'Panther'), (Get-FakeWindowsPath 'System32\Sysprep'))
        $rows[0].Actual | Should -Be '(none)'

        $left = Add-FakeWindowsFile 'Panther\Unattend\Unattend.xml'
        $r = Invoke-GuestScript check $t.ConfigPath
        $r.ExitCode | Should -Be 1
        (ConvertFrom-CheckTable $r.Output)[0].Actual | Should -Be $left
    }

    It 'names every answer file left in its row' {
        $left = @(
            (Add-FakeWindowsFile 'Panther\unattend.xml'),
            (Add-FakeWindowsFile 'Panther\Unattend\AUTOUNATTEND.xml'),
            (Add-FakeWindowsFile 'System32\Sysprep\Unattend.xml')
        )
        [void](Add-FakeWindowsFile 'Panther\unattend.xml.bak')
        $r = Invoke-GuestScript check $t.ConfigPath
        $r.ExitCode | Should -Be 1
        $row = ConvertFrom-CheckTable $r.Output | Where-Object { $_.Step -eq 'remove-answer-files' }
        $row.Result | Should -Be 'FAIL'
        $row.Expected | Should -Be '(none)'
        $row.Actual | Should -Be ($left -join ', ')
    }

    It 'reports a folder it cannot list as a FAIL row naming it' {
        $global:LockedFolder = Get-FakeWindowsPath 'Panther'
        Add-FakeMock Get-ChildItem -MockWith { & (Get-Command -Name Get-ChildItem -CommandType Cmdlet) @PesterBoundParameters }
        Add-FakeMock Get-ChildItem -ParameterFilter { [string](@($PesterBoundParameters['LiteralPath'])[0]) -eq $global:LockedFolder } -MockWith {
            throw ("Access to the path '{0}' is denied." -f $global:LockedFolder)
        }
        $r = Invoke-GuestScript check $t.ConfigPath
        $r.ExitCode | Should -Be 1
        $row = ConvertFrom-CheckTable $r.Output | Where-Object { $_.Step -eq 'remove-answer-files' }
        $row.Result | Should -Be 'FAIL'
        $row.Actual | Should -Be ("error: cannot list {0}: Access to the path '{0}' is denied." -f $global:LockedFolder)
    }

    It 'passes with a switched-off step left undone' {
        $t.Settings.disableFirewall = $false
        Save-TestSettings $t
        $global:FakeWin.Firewall['Domain'] = $true
        $r = Invoke-GuestScript check $t.ConfigPath
        $r.ExitCode | Should -Be 0 -Because $r.Text
    }

    It 'reports a check that throws as a FAIL row with the error' {
        Mock Get-MpPreference { throw 'The service cannot be started' }
        $r = Invoke-GuestScript check $t.ConfigPath
        $r.ExitCode | Should -Be 1
        $row = ConvertFrom-CheckTable $r.Output | Where-Object { $_.Step -eq 'disable-defender-realtime' }
        $row.Result | Should -Be 'FAIL'
        $row.Actual | Should -Be 'error: The service cannot be started'
    }

    Context 'Defender under Tamper Protection' {
        BeforeEach {
            # Provisioned again once Tamper Protection keeps real-time monitoring on.
            $global:FakeWin.Defender.DisableRealtimeMonitoring = $false
            $global:FakeWin.Defender.TamperProtection = $true
            $again = Invoke-GuestScript provision $t.ConfigPath
            $again.ExitCode | Should -Be 0 -Because $again.Text
        }

        It 'reports that the exclusions apply instead, one PASS row per build folder' {
            $r = Invoke-GuestScript check $t.ConfigPath
            $r.ExitCode | Should -Be 0 -Because $r.Text
            $rows = @(ConvertFrom-CheckTable $r.Output | Where-Object { $_.Step -eq 'disable-defender-realtime' })
            $rows[0].Actual | Should -Be 'False (Tamper Protection on: exclusions apply)'
            $excluded = @($rows | Select-Object -Skip 1)
            $excluded.Setting | Should -Be @(Get-DefenderExclusionPaths -Settings (Read-ProvisionSettings -Path $t.ConfigPath) | ForEach-Object { "Defender ExclusionPath $_" })
            $excluded.Setting | Should -Contain 'Defender ExclusionPath C:\workdir'
            $excluded | Where-Object { $_.Result -ne 'PASS' -or $_.Actual -ne 'excluded' } | Should -BeNullOrEmpty
        }

        It 'fails the row of an exclusion that is missing' {
            [void]$global:FakeWin.Defender.Exclusions.Remove('C:\workdir')
            $r = Invoke-GuestScript check $t.ConfigPath
            $r.ExitCode | Should -Be 1
            $failed = @(ConvertFrom-CheckTable $r.Output | Where-Object { $_.Result -eq 'FAIL' })
            $failed | Should -HaveCount 1
            $failed[0].Setting | Should -Be 'Defender ExclusionPath C:\workdir'
            $failed[0].Actual | Should -Be '(missing)'
        }

        It 'reports real-time monitoring off, with no exclusion rows, once it is off' {
            $global:FakeWin.Defender.DisableRealtimeMonitoring = $true
            $r = Invoke-GuestScript check $t.ConfigPath
            $r.ExitCode | Should -Be 0 -Because $r.Text
            $rows = @(ConvertFrom-CheckTable $r.Output | Where-Object { $_.Step -eq 'disable-defender-realtime' })
            $rows | Should -HaveCount 1
            $rows[0].Actual | Should -Be 'True'
        }
    }

    It 'treats a listed service that is not installed as passing' {
        $global:FakeWin.Services.Remove('MSDTC')
        $r = Invoke-GuestScript check $t.ConfigPath
        $r.ExitCode | Should -Be 0 -Because $r.Text
        (ConvertFrom-CheckTable $r.Output | Where-Object { $_.Setting -eq 'service MSDTC StartType' }).Actual | Should -Be '(not installed)'
    }

    Context 'software report' {
        BeforeEach {
            $script:reportPath = Join-Path (Split-Path -Parent $t.LogPath) 'software-report.json'
        }

        It 'writes software-report.json next to the log: Windows, drivers, OpenSSH, tools with their download SHA-256, the settings applied' {
            $r = Invoke-GuestScript check $t.ConfigPath
            $r.ExitCode | Should -Be 0 -Because $r.Text
            $r.Output | Should -Contain ('check: software report written to {0}' -f $reportPath)
            $raw = [IO.File]::ReadAllBytes($reportPath)
            # UTF-8 without a byte order mark (jq and the manifest's SHA-256 read the bytes).
            $raw[0] | Should -Be ([byte][char]'{')
            $report = Get-Content -LiteralPath $reportPath -Raw | ConvertFrom-Json
            $report.reportVersion | Should -Be 1
            $report.windows.edition | Should -Be 'Professional'
            $report.windows.productName | Should -Be 'Windows 10 Pro'
            $report.windows.displayVersion | Should -Be '23H2'
            $report.windows.build | Should -Be '22631.2861'
            # Not Microsoft's own, nor a device without a driver package; each device and INF once, sorted.
            @($report.drivers | ForEach-Object { '{0}|{1}|{2}|{3}' -f $_.device, $_.provider, $_.version, $_.inf }) | Should -Be @(
                'Balloon Device|Red Hat, Inc.|100.95.104.26200|oem5.inf',
                'Red Hat VirtIO Ethernet Adapter|Red Hat, Inc.|100.95.104.26200|oem3.inf'
            )
            $report.openSsh.version | Should -Be '9.5.0.0'
            $tools = @{}
            foreach ($tool in $report.tools) { $tools[$tool.name] = $tool }
            @($report.tools.name) | Should -Be @('buildlet-stage0', 'llvm-mingw', 'vs-build-tools-2022')
            $tools['buildlet-stage0'].downloadSha256 | Should -Be $t.BuildletSha
            $tools['buildlet-stage0'].installedSha256 | Should -Be $t.BuildletSha
            $tools['buildlet-stage0'].path | Should -Be $t.Settings.buildletPath
            $tools['llvm-mingw'].downloadSha256 | Should -Be $t.LlvmSha
            $tools['llvm-mingw'].installedSha256 | Should -Be $t.LlvmSha
            $tools['vs-build-tools-2022'].version | Should -Be '17.9.34607.119'
            $tools['vs-build-tools-2022'].downloadSha256 | Should -Be $t.VsSha
            # The bootstrapper's URL without its query (a signature).
            $tools['vs-build-tools-2022'].url | Should -Be 'https://downloads.example.test/ci/vs_BuildTools.exe?<query hidden>'
            @($report.steps | Where-Object { -not $_.applied }) | Should -BeNullOrEmpty
            @($report.steps.step) | Should -Be @(Get-StepCatalog | ForEach-Object { $_.Name })
            @($report.settings) | Should -HaveCount 31
            ($report.settings | Where-Object { $_.setting -eq 'service BITS StartType' }).actual | Should -Be 'Disabled'
            (Get-Content -LiteralPath $reportPath -Raw) | Should -Not -Match ([regex]::Escape($t.Password))
        }

        It 'lists only the tools that were installed, and the steps switched off as not applied' {
            $t.Settings.installLlvmMingw = $false
            $t.Settings.installVsBuildTools = $false
            Save-TestSettings $t
            $r = Invoke-GuestScript check $t.ConfigPath
            $r.ExitCode | Should -Be 0 -Because $r.Text
            $report = Get-Content -LiteralPath $reportPath -Raw | ConvertFrom-Json
            @($report.tools.name) | Should -Be @('buildlet-stage0')
            @($report.steps | Where-Object { -not $_.applied } | ForEach-Object { $_.step }) | Should -Be @('install-llvm-mingw', 'install-vs-build-tools')
        }

        It 'records a part it cannot read as its error and still reports the rest' {
            $global:FakeWin.DriversFail = $true
            $r = Invoke-GuestScript check $t.ConfigPath
            $r.ExitCode | Should -Be 0 -Because $r.Text
            $report = Get-Content -LiteralPath $reportPath -Raw | ConvertFrom-Json
            $report.drivers.error | Should -Match 'Win32_PnPSignedDriver'
            $report.windows.build | Should -Be '22631.2861'
            @($report.tools) | Should -HaveCount 3
        }

        It 'writes to -ReportPath, and fails (exit 1) when it cannot write the report' {
            $elsewhere = Join-Path $t.Root 'out/report.json'
            $global:LASTEXITCODE = -999
            $lines = & $global:CheckScript -ConfigPath $t.ConfigPath -ReportPath $elsewhere 6>&1 | ForEach-Object { "$_" }
            $global:LASTEXITCODE | Should -Be 0 -Because ($lines -join "`n")
            (Get-Content -LiteralPath $elsewhere -Raw | ConvertFrom-Json).windows.edition | Should -Be 'Professional'
            # A file where its folder should be.
            $blocked = Join-Path $t.Root 'blocked'
            Set-Content -LiteralPath $blocked -Value 'a file'
            $global:LASTEXITCODE = -999
            $lines = & $global:CheckScript -ConfigPath $t.ConfigPath -ReportPath (Join-Path $blocked 'report.json') 6>&1 | ForEach-Object { "$_" }
            $global:LASTEXITCODE | Should -Be 1
            ($lines -join "`n") | Should -Match 'check: could not write the software report'
            # A folder where the file should be.
            New-Item -ItemType Directory -Path (Join-Path $t.Root 'taken/report.json') -Force | Out-Null
            $lines = & $global:CheckScript -ConfigPath $t.ConfigPath -ReportPath (Join-Path $t.Root 'taken/report.json') 6>&1 | ForEach-Object { "$_" }
            $global:LASTEXITCODE | Should -Be 1
            ($lines -join "`n") | Should -Match 'report\.json is a folder'
        }
    }

    It 'exits 2 on invalid settings' {
        Set-Content -LiteralPath $t.ConfigPath -Value '{ "installBuildlet": "yes" }'
        $r = Invoke-GuestScript check $t.ConfigPath
        $r.ExitCode | Should -Be 2
        $r.Text | Should -Match "'installBuildlet' must be true or false"
    }
}
