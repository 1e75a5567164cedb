# Tests of provisioning/windows/provision.ps1 against an in-memory Windows
# (FakeWindows.ps1): registry, services, Defender, firewall, local users and
# the VS installer are fakes; files, hashes, zips and logs are real.

BeforeDiscovery {
    Import-Module (Join-Path $PSScriptRoot '../../provisioning/windows/common.psm1') -Force -DisableNameChecking
    # Steps with a switch (remove-answer-files has none: it always runs).
    $switchCases = @(Get-StepCatalog | Where-Object { $_.Switch } | ForEach-Object { @{ Step = $_.Name; Switch = $_.Switch } })
    $downloadCases = @(
        @{ Step = 'install-buildlet'; ShaKey = 'buildletStage0Sha256'; UrlKey = 'buildletStage0Url' }
        @{ Step = 'install-llvm-mingw'; ShaKey = 'llvmMingwSha256'; UrlKey = 'llvmMingwUrl' }
        @{ Step = 'install-vs-build-tools'; ShaKey = 'vsBuildToolsSha256'; UrlKey = 'vsBuildToolsUrl' }
    )
}

BeforeAll {
    . (Join-Path $PSScriptRoot 'FakeWindows.ps1')
    Import-Module $global:CommonModule -Force -DisableNameChecking

    $script:WU = 'HKLM:\SOFTWARE\Policies\Microsoft\Windows\WindowsUpdate\AU'
    $script:WER = 'HKLM:\SOFTWARE\Microsoft\Windows\Windows Error Reporting'
    $script:SYS = 'HKLM:\SOFTWARE\Microsoft\Windows\CurrentVersion\Policies\System'
    $script:RUN = 'HKLM:\SOFTWARE\Microsoft\Windows\CurrentVersion\Run'
    $script:WINLOGON = 'HKLM:\SOFTWARE\Microsoft\Windows NT\CurrentVersion\Winlogon'

    function Get-LogText { Get-Content -LiteralPath $script:t.LogPath -Raw }

    # The part of the fake machine each step owns, to show a switched-off step left it alone.
    function Get-StepState {
        param([string]$Step)
        $s = $script:t.Settings
        switch ($Step) {
            'disable-windows-update' { "$(Get-FakeRegistryValue $script:WU 'NoAutoUpdate')" }
            'disable-error-reporting-ui' { "$(Get-FakeRegistryValue $script:WER 'DontShowUI')" }
            'disable-uac' { "$(Get-FakeRegistryValue $script:SYS 'EnableLUA')" }
            'disable-firewall' { ($global:FakeWin.Firewall.Values | ForEach-Object { "$_" }) -join ',' }
            'disable-defender-realtime' { "$($global:FakeWin.Defender.DisableRealtimeMonitoring)|$($global:FakeWin.Defender.Exclusions -join ',')" }
            'disable-services' { ($global:FakeWin.Services.Keys | Sort-Object | ForEach-Object { "$_=$($global:FakeWin.Services[$_])" }) -join ',' }
            'install-buildlet' { "$(Test-Path -LiteralPath $s.buildletPath)|$(Get-FakeRegistryValue $script:RUN 'buildlet')|$($global:FakeWin.MachineEnv['GO_BUILDER_ENV'])" }
            'install-llvm-mingw' { "$(Test-Path -LiteralPath $s.llvmMingwDir)" }
            'install-vs-build-tools' { "$($global:FakeWin.Processes.Count)|$($global:FakeWin.VsInstalled)" }
            'create-builder-user' { "$($global:FakeWin.Users.Count)|$($global:FakeWin.Admins.Count)" }
            'configure-autologon' { "$(Get-FakeRegistryValue $script:WINLOGON 'AutoAdminLogon')|$(Get-FakeRegistryValue $script:WINLOGON 'DefaultUserName')" }
            default { throw "no state probe for step $Step" }
        }
    }
}

Describe 'provision.ps1' {
    BeforeAll { Enable-FakeWindows }
    AfterAll { Disable-FakeWindows }

    BeforeEach {
        New-FakeWindows
        $script:t = New-TestEnvironment -Root (Join-Path $TestDrive ([guid]::NewGuid().ToString('N')))
    }

    It 'only warns when the disk cannot trim (the image is larger, not wrong)' {
        $global:FakeWin.TrimFails = $true
        $r = Invoke-GuestScript provision $t.ConfigPath
        $r.ExitCode | Should -Be 0 -Because $r.Text
        $r.Text | Should -Match 'could not release the free space of C: \(Optimize-Volume -ReTrim\): The volume optimization operation requested is not supported'
        @($global:FakeWin.Trims) | Should -BeNullOrEmpty
    }

    Context 'a full run on a fresh machine' {
        BeforeAll {
            # One run; each test starts from a copy of the machine it left (state, settings and files).
            New-FakeWindows
            $environment = New-TestEnvironment -Root (Join-Path $TestDrive 'full-run')
            $script:fullRun = Invoke-GuestScript provision $environment.ConfigPath
            $script:fullRunMachine = Save-FakeMachine $environment
        }

        BeforeEach {
            $script:t = Restore-FakeMachine $fullRunMachine
            $script:r = $fullRun
        }

        It 'exits 0' {
            $r.ExitCode | Should -Be 0 -Because $r.Text
        }

        It 'sets the Windows Update, error reporting and UAC policies' {
            Get-FakeRegistryValue $WU 'NoAutoUpdate' | Should -Be 1
            $global:FakeWin.Registry[(ConvertTo-FakeRegistryKey $WU) + '|noautoupdate'].Type | Should -Be 'DWord'
            Get-FakeRegistryValue $WER 'DontShowUI' | Should -Be 1
            Get-FakeRegistryValue $SYS 'EnableLUA' | Should -Be 0
        }

        It 'releases the free space of C: last (Optimize-Volume -DriveLetter C -ReTrim, once)' {
            @($global:FakeWin.Trims) | Should -Be @('C')
            $trimmed = [array]::FindIndex([string[]]$r.Output, [Predicate[string]] { param($l) $l -match 'free space of C: released' })
            $done = [array]::FindIndex([string[]]$r.Output, [Predicate[string]] { param($l) $l -match 'provision: done' })
            $trimmed | Should -BeGreaterThan -1 -Because $r.Text
            $trimmed | Should -BeLessThan $done
            $removed = [array]::FindIndex([string[]]$r.Output, [Predicate[string]] { param($l) $l -match "step 'remove-answer-files': " })
            $removed | Should -BeLessThan $trimmed -Because 'every step ran before'
            $removed | Should -BeGreaterThan -1
        }

        It 'turns off every firewall profile and Defender real-time monitoring' {
            $global:FakeWin.Firewall.Values | Should -Not -Contain $true
            $global:FakeWin.Defender.DisableRealtimeMonitoring | Should -BeTrue
        }

        It 'disables the listed services and no other' {
            foreach ($name in 'NlaSvc', 'LanmanServer', 'BITS', 'DPS', 'MSDTC', 'IKEEXT', 'RemoteRegistry', 'lmhosts') {
                $global:FakeWin.Services[$name] | Should -Be 'Disabled' -Because "$name is in servicesToDisable"
            }
            $global:FakeWin.Services['sshd'] | Should -Be 'Automatic'
        }

        It 'installs the verified buildlet and registers it under HKLM Run, started in its own folder' {
            (Get-FileHash -LiteralPath $t.Settings.buildletPath -Algorithm SHA256).Hash | Should -Be $t.BuildletSha
            $folder = Split-Path -Parent $t.Settings.buildletPath
            Get-FakeRegistryValue $RUN 'buildlet' | Should -BeExactly ('cmd.exe /c "cd /d {0} && {1}"' -f $folder, $t.Settings.buildletPath)
        }

        It 'sets GO_BUILDER_ENV machine-wide to buildletEnv, for stage0' {
            $global:FakeWin.MachineEnv['GO_BUILDER_ENV'] | Should -BeExactly 'host-windows11-arm64-azure'
            Get-LogText | Should -Match ([regex]::Escape('machine environment variable GO_BUILDER_ENV: (unset) -> host-windows11-arm64-azure'))
        }

        It 'unpacks llvm-mingw without its top-level folder and removes the zip' {
            $dir = $t.Settings.llvmMingwDir
            Join-Path (Join-Path $dir 'bin') 'clang.exe' | Should -Exist
            Join-Path (Join-Path $dir 'include') 'stdio.h' | Should -Exist
            (Get-Content -LiteralPath (Join-Path $dir '.source-sha256') -Raw).Trim() | Should -Be $t.LlvmSha
            Join-Path $t.Settings.downloadDir 'llvm-mingw.zip' | Should -Not -Exist
            "$dir.partial" | Should -Not -Exist
        }

        It 'runs the VS Build Tools bootstrapper once, quietly, with the ARM64 and ARM VC tools' {
            $global:FakeWin.Processes.Count | Should -Be 1
            $p = $global:FakeWin.Processes[0]
            $p.FilePath | Should -Be (Join-Path $t.Settings.downloadDir 'vs_BuildTools.exe')
            # The bootstrapper itself is waited for (-PassThru, WaitForExit), not its process tree (-Wait).
            $p.Wait | Should -BeFalse
            $p.PassThru | Should -BeTrue
            ($p.ArgumentList -join ' ') | Should -Be ('--quiet --wait --norestart --nocache --add Microsoft.VisualStudio.Workload.VCTools ' +
                '--add Microsoft.VisualStudio.Component.VC.Tools.ARM64 --add Microsoft.VisualStudio.Component.VC.Tools.ARM --includeRecommended')
            Join-Path $t.Settings.downloadDir 'vs_BuildTools.exe' | Should -Not -Exist
        }

        It 'creates the builder as a local administrator whose password never expires' {
            $u = $global:FakeWin.Users['ci-builder']
            $u | Should -Not -BeNullOrEmpty
            $u.Enabled | Should -BeTrue
            $u.PasswordExpires | Should -BeNullOrEmpty
            $u.Password | Should -BeExactly $t.Password
            $global:FakeWin.Admins | Should -Contain $u.SID
        }

        It 'configures Winlogon autologon for the builder' {
            Get-FakeRegistryValue $WINLOGON 'AutoAdminLogon' | Should -BeExactly '1'
            Get-FakeRegistryValue $WINLOGON 'DefaultUserName' | Should -BeExactly 'ci-builder'
            Get-FakeRegistryValue $WINLOGON 'DefaultPassword' | Should -BeExactly $t.Password
        }

        It 'downloads each file exactly once' {
            $global:FakeWin.Downloads | Should -HaveCount 3
            ($global:FakeWin.Downloads | Sort-Object -Unique) | Should -HaveCount 3
        }

        It 'logs every step with a UTC timestamp to logPath' {
            $t.LogPath | Should -Exist
            $lines = @(Get-Content -LiteralPath $t.LogPath)
            foreach ($line in $lines) {
                $line | Should -Match '^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ \[(INFO|WARN|ERROR)\] '
            }
            foreach ($step in Get-StepCatalog) {
                $lines | Where-Object { $_ -match [regex]::Escape("step '$($step.Name)': start") } | Should -HaveCount 1
                $lines | Where-Object { $_ -match [regex]::Escape("step '$($step.Name)': done") } | Should -HaveCount 1
            }
            $lines[-1] | Should -Match 'provision: done; 12 step\(s\) ran, 0 switched off'
        }

        It 'never writes the password to the log or the console' {
            Get-LogText | Should -Not -Match ([regex]::Escape($t.Password))
            $r.Text | Should -Not -Match ([regex]::Escape($t.Password))
            Get-LogText | Should -Match 'builderPassword=<redacted>'
        }

        It 'never logs the query string of a download URL' {
            Get-LogText | Should -Not -Match 'X-Amz-Signature'
            Get-LogText | Should -Match ([regex]::Escape('vs_BuildTools.exe?<query hidden>'))
        }

        It 'changes nothing on a second run' {
            $changes = $global:FakeWin.Changes.Count
            $buildletTime = (Get-Item -LiteralPath $t.Settings.buildletPath).LastWriteTimeUtc
            $stampTime = (Get-Item -Force -LiteralPath (Join-Path $t.Settings.llvmMingwDir '.source-sha256')).LastWriteTimeUtc

            $second = Invoke-GuestScript provision $t.ConfigPath

            $second.ExitCode | Should -Be 0 -Because $second.Text
            $global:FakeWin.Changes.Count | Should -Be $changes -Because (($global:FakeWin.Changes | Select-Object -Skip $changes) -join '; ')
            $global:FakeWin.Downloads | Should -HaveCount 3
            $global:FakeWin.Processes | Should -HaveCount 1
            (Get-Item -LiteralPath $t.Settings.buildletPath).LastWriteTimeUtc | Should -Be $buildletTime
            (Get-Item -Force -LiteralPath (Join-Path $t.Settings.llvmMingwDir '.source-sha256')).LastWriteTimeUtc | Should -Be $stampTime
            $second.Output[-1] | Should -Match 'provision: done; 12 step\(s\) ran, 0 switched off, 0 change\(s\) made'
            foreach ($step in Get-StepCatalog) {
                $second.Text | Should -Match ([regex]::Escape("step '$($step.Name)': already in place, nothing changed"))
            }
        }
    }

    Context 'download verification' {
        It 'stops <Step> with exit 1 when the download does not match its SHA-256' -ForEach $downloadCases {
            $realSha = $t.Settings[$ShaKey]
            $wrongSha = 'ab' * 32
            $t.Settings[$ShaKey] = $wrongSha
            Save-TestSettings $t

            $r = Invoke-GuestScript provision $t.ConfigPath

            $r.ExitCode | Should -Be 1
            $log = Get-LogText
            $log | Should -Match ([regex]::Escape("step '$Step' failed: SHA-256 mismatch"))
            $log | Should -Match ([regex]::Escape("expected $wrongSha, actual $realSha"))
            $log | Should -Match ([regex]::Escape("provision: FAILED at step '$Step'"))
            $global:FakeWin.Downloads | Should -Contain $t.Settings[$UrlKey]
            # Nothing unverified is left behind, and later steps did not run.
            @(Get-ChildItem -Path $t.Root -Recurse -Filter '*.partial') | Should -HaveCount 0
            $global:FakeWin.Users.Count | Should -Be 0
            $global:FakeWin.Processes.Count | Should -Be 0
            $log | Should -Not -Match "step 'create-builder-user': start"
        }

        It 'does not install a buildlet that fails verification' {
            $t.Settings.buildletStage0Sha256 = '00' * 32
            Save-TestSettings $t
            (Invoke-GuestScript provision $t.ConfigPath).ExitCode | Should -Be 1
            $t.Settings.buildletPath | Should -Not -Exist
            Get-FakeRegistryValue $RUN 'buildlet' | Should -BeNullOrEmpty
        }

        It 'downloads again and replaces a file whose SHA-256 is wrong' {
            New-Item -ItemType Directory -Path (Split-Path -Parent $t.Settings.buildletPath) -Force | Out-Null
            Set-Content -LiteralPath $t.Settings.buildletPath -Value 'an old buildlet'
            $r = Invoke-GuestScript provision $t.ConfigPath
            $r.ExitCode | Should -Be 0 -Because $r.Text
            (Get-FileHash -LiteralPath $t.Settings.buildletPath -Algorithm SHA256).Hash | Should -Be $t.BuildletSha
            Get-LogText | Should -Match 'downloading it again'
        }

        It 'does not download a file that is already there with the right SHA-256' {
            New-Item -ItemType Directory -Path (Split-Path -Parent $t.Settings.buildletPath) -Force | Out-Null
            Copy-Item -LiteralPath (Join-Path $t.Served 'buildlet-stage0.exe') -Destination $t.Settings.buildletPath
            $r = Invoke-GuestScript provision $t.ConfigPath
            $r.ExitCode | Should -Be 0 -Because $r.Text
            $global:FakeWin.Downloads | Should -Not -Contain $t.Settings.buildletStage0Url
        }

        It 'fails the step, naming the URL, when the server answers 404' {
            $global:FakeWin.Served.Remove($t.Settings.llvmMingwUrl)
            $r = Invoke-GuestScript provision $t.ConfigPath
            $r.ExitCode | Should -Be 1
            Get-LogText | Should -Match ([regex]::Escape("step 'install-llvm-mingw' failed: download of $($t.Settings.llvmMingwUrl) failed"))
        }
    }

    Context 'failing steps' {
        It 'exits 1 and logs the failing step when a command throws' {
            Mock Set-Service { throw 'Access is denied' }
            $r = Invoke-GuestScript provision $t.ConfigPath
            $r.ExitCode | Should -Be 1
            $log = Get-LogText
            $log | Should -Match "\[ERROR\] step 'disable-services' failed: Access is denied \(at [^)]+\.ps1:\d+\)"
            $log | Should -Match ([regex]::Escape("[ERROR] provision: FAILED at step 'disable-services': Access is denied"))
            $log | Should -Match "step 'disable-defender-realtime': done"
            $log | Should -Not -Match "step 'install-buildlet': start"
        }

        It 'with Tamper Protection on, warns, excludes the build folders instead and goes on; check passes it naming the exclusions' {
            $global:FakeWin.Defender.TamperProtection = $true
            $r = Invoke-GuestScript provision $t.ConfigPath
            $r.ExitCode | Should -Be 0 -Because $r.Text
            $global:FakeWin.Defender.DisableRealtimeMonitoring | Should -BeFalse
            Get-LogText | Should -Match '\[WARN\] Defender Tamper Protection is on: real-time monitoring stays on; excluding the build folders'
            Get-LogText | Should -Match "step 'disable-services': done"
            $expected = @(
                (Split-Path -Parent $t.Settings.buildletPath),
                (Split-Path -Parent $t.Settings.llvmMingwDir),
                'C:\workdir',
                'C:\Users\ci-builder\AppData\Local\Temp'
            )
            @($global:FakeWin.Defender.Exclusions) | Should -Be $expected
            foreach ($path in $expected) { Get-LogText | Should -Match ([regex]::Escape("changed: Defender exclusion added: $path")) }
            $c = Invoke-GuestScript check $t.ConfigPath
            $c.ExitCode | Should -Be 0 -Because $c.Text
            $c.Text | Should -Match 'False \(Tamper Protection on: exclusions apply\)'
            foreach ($path in $expected) { $c.Text | Should -Match ([regex]::Escape("Defender ExclusionPath $path")) }
        }

        It 'with Tamper Protection on, adds only the missing exclusions and nothing on a second run' {
            $global:FakeWin.Defender.TamperProtection = $true
            $global:FakeWin.Defender.Exclusions.Add('C:\workdir\')
            $global:FakeWin.Defender.Exclusions.Add('D:\other')
            (Invoke-GuestScript provision $t.ConfigPath).ExitCode | Should -Be 0
            @($global:FakeWin.Defender.Exclusions | Where-Object { $_ -like 'C:\workdir*' }) | Should -HaveCount 1
            $global:FakeWin.Defender.Exclusions | Should -Contain 'D:\other'
            $changes = $global:FakeWin.Changes.Count
            $second = Invoke-GuestScript provision $t.ConfigPath
            $second.ExitCode | Should -Be 0 -Because $second.Text
            $global:FakeWin.Changes.Count | Should -Be $changes
            Get-LogText | Should -Match 'Defender already excludes'
        }

        It 'fails, naming them, when Defender does not keep the exclusions' {
            $global:FakeWin.Defender.TamperProtection = $true
            $global:FakeWin.Defender.ExclusionsBlocked = $true
            $r = Invoke-GuestScript provision $t.ConfigPath
            $r.ExitCode | Should -Be 1
            Get-LogText | Should -Match ("step 'disable-defender-realtime' failed: Defender did not keep the exclusions .*" + [regex]::Escape('C:\workdir, C:\Users\ci-builder\AppData\Local\Temp'))
        }

        It 'fails when Defender silently keeps real-time monitoring on without reporting Tamper Protection' {
            $global:FakeWin.Defender.TamperProtection = $true
            $global:FakeWin.Defender.TamperHidden = $true
            $r = Invoke-GuestScript provision $t.ConfigPath
            $r.ExitCode | Should -Be 1
            Get-LogText | Should -Match "step 'disable-defender-realtime' failed: Defender kept real-time monitoring on"
        }

        It 'treats VS installer exit code 3010 as success (reboot needed)' {
            $global:FakeWin.VsExitCode = 3010
            $r = Invoke-GuestScript provision $t.ConfigPath
            $r.ExitCode | Should -Be 0 -Because $r.Text
            Get-LogText | Should -Match 'finished with 3010: success, a reboot is required'
        }

        It 'fails on any other VS installer exit code' {
            $global:FakeWin.VsExitCode = 1603
            $global:FakeWin.VsInstalls = $false
            $r = Invoke-GuestScript provision $t.ConfigPath
            $r.ExitCode | Should -Be 1
            Get-LogText | Should -Match "step 'install-vs-build-tools' failed: Visual Studio Build Tools installer exited with code 1603"
        }

        It 'fails when the VS installer exits 0 but vswhere finds no instance' {
            $global:FakeWin.VsInstalls = $false
            $r = Invoke-GuestScript provision $t.ConfigPath
            $r.ExitCode | Should -Be 1
            Get-LogText | Should -Match ([regex]::Escape("step 'install-vs-build-tools' failed: the installer exited with 0 but vswhere finds no Visual Studio 2022 instance ([17.0,18.0))"))
        }

        It 'fails, naming the version, when the bootstrapper installs another VS version than vsVersion' {
            $global:FakeWin.VsBootstrapperVersion = '2019'
            $r = Invoke-GuestScript provision $t.ConfigPath
            $r.ExitCode | Should -Be 1
            Get-LogText | Should -Match ([regex]::Escape('is vsBuildToolsUrl the VS 2022 bootstrapper?'))
        }

        It 'returns when the VS bootstrapper exits, even if a child it started is still running' {
            $global:FakeWin.VsLeavesChild = $true
            $r = Invoke-GuestScript provision $t.ConfigPath
            $r.ExitCode | Should -Be 0 -Because $r.Text
            $global:FakeWin.VsInstalled | Should -BeTrue
            Get-LogText | Should -Match "step 'install-vs-build-tools': done"
        }

        It 'fails when the llvm-mingw archive has no bin/clang.exe' {
            $other = Join-Path $t.Root 'not-llvm'
            New-Item -ItemType Directory -Path $other | Out-Null
            Set-Content -LiteralPath (Join-Path $other 'README') -Value 'not a toolchain'
            $zip = Join-Path $t.Served 'other.zip'
            Compress-Archive -Path (Join-Path $other 'README') -DestinationPath $zip
            $global:FakeWin.Served[$t.Settings.llvmMingwUrl] = $zip
            $t.Settings.llvmMingwSha256 = (Get-FileHash -LiteralPath $zip -Algorithm SHA256).Hash
            Save-TestSettings $t

            $r = Invoke-GuestScript provision $t.ConfigPath

            $r.ExitCode | Should -Be 1
            Get-LogText | Should -Match "step 'install-llvm-mingw' failed: the llvm-mingw archive has no bin\\clang\.exe"
            $t.Settings.llvmMingwDir | Should -Not -Exist
        }

        It 'exits 2 and changes nothing when not elevated' {
            $global:FakeWin.IsAdmin = $false
            $r = Invoke-GuestScript provision $t.ConfigPath
            $r.ExitCode | Should -Be 2
            $r.Text | Should -Match 'must run elevated'
            $global:FakeWin.Changes | Should -HaveCount 0
        }
    }

    Context 'switches' {
        It 'skips <Step> when <Switch> is false and runs the rest' -ForEach $switchCases {
            $before = Get-StepState $Step
            $t.Settings[$Switch] = $false
            Save-TestSettings $t

            $r = Invoke-GuestScript provision $t.ConfigPath

            $r.ExitCode | Should -Be 0 -Because $r.Text
            Get-StepState $Step | Should -Be $before
            $log = Get-LogText
            $log | Should -Match ([regex]::Escape("step '$Step': skipped (switched off)"))
            $log | Should -Match 'provision: done; 11 step\(s\) ran, 1 switched off'
            $log | Should -Not -Match ([regex]::Escape("step '$Step': start"))
        }

        It 'changes nothing but the answer files with every switch off, and then needs no URL, hash or user' {
            foreach ($step in Get-StepCatalog | Where-Object { $_.Switch }) { $t.Settings[$step.Switch] = $false }
            foreach ($key in 'buildletStage0Url', 'buildletStage0Sha256', 'llvmMingwUrl', 'llvmMingwSha256', 'vsBuildToolsUrl', 'vsBuildToolsSha256', 'builderUser', 'builderPassword') {
                $t.Settings.Remove($key)
            }
            Save-TestSettings $t

            $r = Invoke-GuestScript provision $t.ConfigPath

            $r.ExitCode | Should -Be 0 -Because $r.Text
            $global:FakeWin.Changes | Should -HaveCount 0
            $global:FakeWin.Downloads | Should -HaveCount 0
            @(Get-Content -LiteralPath $t.LogPath | Where-Object { $_ -match 'skipped \(switched off\)' }) | Should -HaveCount 11
            # The step without a switch still ran: Setup's cached answer file is gone, and it was the only change.
            Get-FakeWindowsPath 'Panther\unattend.xml' | Should -Not -Exist
            $changed = @(Get-Content -LiteralPath $t.LogPath | Where-Object { $_ -match '\] changed: ' })
            $changed | Should -HaveCount 1
            $changed[0] | Should -Match ('\] changed: answer file removed: ' + [regex]::Escape((Get-FakeWindowsPath 'Panther\unattend.xml')) + '$')
            $r.Output[-1] | Should -Match 'provision: done; 1 step\(s\) ran, 11 switched off, 1 change\(s\) made'
        }
    }

    Context 'a partly configured machine' {
        It 'fixes an existing builder account and leaves it alone on the next run' {
            Add-FakeUser -Name 'ci-builder' -Password 'an-older-password' -Enabled $false -NeverExpires $false -Admin $false
            $r = Invoke-GuestScript provision $t.ConfigPath
            $r.ExitCode | Should -Be 0 -Because $r.Text
            $u = $global:FakeWin.Users['ci-builder']
            $u.Password | Should -BeExactly $t.Password
            $u.Enabled | Should -BeTrue
            $u.PasswordExpires | Should -BeNullOrEmpty
            $global:FakeWin.Admins | Should -Contain $u.SID
            $global:FakeWin.Changes | Should -Contain 'user password set: ci-builder'

            $changes = $global:FakeWin.Changes.Count
            (Invoke-GuestScript provision $t.ConfigPath).ExitCode | Should -Be 0
            $global:FakeWin.Changes.Count | Should -Be $changes
        }

        It 'removes an AutoLogonCount that would end autologon' {
            Set-FakeRegistryValue -Path $WINLOGON -Name 'AutoLogonCount' -Value 1 -Type DWord
            (Invoke-GuestScript provision $t.ConfigPath).ExitCode | Should -Be 0
            Get-FakeRegistryValue $WINLOGON 'AutoLogonCount' | Should -BeNullOrEmpty
        }

        It 'warns about a listed service that is not installed and goes on' {
            $t.Settings.servicesToDisable = @('NoSuchService', 'BITS')
            Save-TestSettings $t
            $r = Invoke-GuestScript provision $t.ConfigPath
            $r.ExitCode | Should -Be 0 -Because $r.Text
            Get-LogText | Should -Match '\[WARN\] service NoSuchService is not installed'
            $global:FakeWin.Services['BITS'] | Should -Be 'Disabled'
            $global:FakeWin.Services['NlaSvc'] | Should -Be 'Automatic'
        }

        It 'replaces llvm-mingw that came from another archive' {
            $dir = $t.Settings.llvmMingwDir
            New-Item -ItemType Directory -Path $dir -Force | Out-Null
            Set-Content -LiteralPath (Join-Path $dir 'old-file') -Value 'old'
            Set-Content -LiteralPath (Join-Path $dir '.source-sha256') -Value ('cd' * 32)
            (Invoke-GuestScript provision $t.ConfigPath).ExitCode | Should -Be 0
            Join-Path $dir 'old-file' | Should -Not -Exist
            (Get-Content -LiteralPath (Join-Path $dir '.source-sha256') -Raw).Trim() | Should -Be $t.LlvmSha
        }

        It 'replaces a GO_BUILDER_ENV with another value' {
            $global:FakeWin.MachineEnv['GO_BUILDER_ENV'] = 'host-windows-amd64'
            (Invoke-GuestScript provision $t.ConfigPath).ExitCode | Should -Be 0
            $global:FakeWin.MachineEnv['GO_BUILDER_ENV'] | Should -BeExactly 'host-windows11-arm64-azure'
            Get-LogText | Should -Match ([regex]::Escape('GO_BUILDER_ENV: host-windows-amd64 -> host-windows11-arm64-azure'))
        }

        It 'does not run the VS installer when vswhere already finds the tools' {
            $global:FakeWin.VsInstalled = $true
            (Invoke-GuestScript provision $t.ConfigPath).ExitCode | Should -Be 0
            $global:FakeWin.Processes | Should -HaveCount 0
            $global:FakeWin.Downloads | Should -Not -Contain $t.Settings.vsBuildToolsUrl
        }
    }

    Context 'the answer files Windows Setup leaves behind' {
        BeforeAll {
            # Copies where Setup reads or caches them, spelled as Windows and tools spell them.
            $script:answerCopies = @(
                'Panther\unattend.xml',
                'Panther\Unattend\Unattend.xml',
                'Panther\Unattend\AUTOUNATTEND.XML',
                'Panther\UnattendGC\unattend.xml',
                'System32\Sysprep\unattend.xml',
                'System32\Sysprep\Panther\AutoUnattend.xml'
            )
            # Setup's logs, Sysprep and names that only look alike: kept.
            $script:keptFiles = @(
                'Panther\setupact.log',
                'Panther\setuperr.log',
                'Panther\UnattendGC\setupact.log',
                'Panther\unattend.xml.bak',
                'Panther\my-unattend.xml',
                'Panther\Unattend\unattend.txt',
                'System32\Sysprep\sysprep.exe',
                'System32\Sysprep\Panther\setupact.log',
                'System32\unattend.xml'
            )
            function Add-PassThroughMock {
                param([string]$Name)
                Add-FakeMock $Name -MockWith ([scriptblock]::Create("& (Get-Command -Name '$Name' -CommandType Cmdlet) @PesterBoundParameters"))
            }
        }

        It 'removes every copy, whatever the case of its name, and keeps the logs and look-alikes; check passes' {
            foreach ($relative in $answerCopies) { [void](Add-FakeWindowsFile $relative) }
            foreach ($relative in $keptFiles) { [void](Add-FakeWindowsFile $relative -Content 'kept') }
            # Hidden entries are searched too (a dot folder is hidden on Linux).
            $hidden = Add-FakeWindowsFile 'Panther\.hidden\unattend.xml'

            $r = Invoke-GuestScript provision $t.ConfigPath

            $r.ExitCode | Should -Be 0 -Because $r.Text
            foreach ($path in @($answerCopies | ForEach-Object { Get-FakeWindowsPath $_ }) + $hidden) {
                $path | Should -Not -Exist
                Get-LogText | Should -Match ([regex]::Escape("changed: answer file removed: $path") + '\r?\n')
            }
            foreach ($relative in $keptFiles) { Get-FakeWindowsPath $relative | Should -Exist }
            @(Get-Content -LiteralPath $t.LogPath | Where-Object { $_ -match 'changed: answer file removed: ' }) | Should -HaveCount ($answerCopies.Count + 1)
            $c = Invoke-GuestScript check $t.ConfigPath
            $c.ExitCode | Should -Be 0 -Because $c.Text
            $c.Text | Should -Match 'answer files \(unattend\.xml, autounattend\.xml\) under .* \| \(none\) +\| \(none\) +\| PASS'
        }

        It 'runs last, after every other step' {
            $r = Invoke-GuestScript provision $t.ConfigPath
            $r.ExitCode | Should -Be 0 -Because $r.Text
            $starts = @($r.Output | Where-Object { $_ -match "step '([a-z-]+)': start" } | ForEach-Object { $_ -replace "^.*step '([a-z-]+)': start.*$", '$1' })
            $starts[-1] | Should -Be 'remove-answer-files'
            $starts | Should -Be @(Get-StepCatalog | ForEach-Object { $_.Name })
        }

        It 'is fine when the folders do not exist' {
            Remove-Item -LiteralPath (Get-FakeWindowsPath 'Panther'), (Get-FakeWindowsPath 'System32') -Recurse -Force
            $r = Invoke-GuestScript provision $t.ConfigPath
            $r.ExitCode | Should -Be 0 -Because $r.Text
            Get-LogText | Should -Match ([regex]::Escape(('no answer file (unattend.xml, autounattend.xml) is left under {0}, {1}' -f (Get-FakeWindowsPath 'Panther'), (Get-FakeWindowsPath 'System32\Sysprep'))))
            Get-LogText | Should -Match "step 'remove-answer-files': already in place, nothing changed"
        }

        It 'fails naming a copy that cannot be deleted, after deleting the others; check fails naming it' {
            $other = Add-FakeWindowsFile 'Panther\Unattend\Unattend.xml'
            $global:StuckAnswerFile = Add-FakeWindowsFile 'System32\Sysprep\unattend.xml'
            Add-PassThroughMock Remove-Item
            Add-FakeMock Remove-Item -ParameterFilter { [string](@($PesterBoundParameters['LiteralPath'])[0]) -eq $global:StuckAnswerFile } -MockWith {
                throw ("The process cannot access the file '{0}' because it is being used by another process." -f $global:StuckAnswerFile)
            }

            $r = Invoke-GuestScript provision $t.ConfigPath

            $r.ExitCode | Should -Be 1
            $log = Get-LogText
            $log | Should -Match ([regex]::Escape("step 'remove-answer-files' failed: could not delete 1 answer file(s): $global:StuckAnswerFile (The process cannot access the file"))
            $log | Should -Match ([regex]::Escape("provision: FAILED at step 'remove-answer-files'"))
            $global:StuckAnswerFile | Should -Exist
            $other | Should -Not -Exist
            Get-FakeWindowsPath 'Panther\unattend.xml' | Should -Not -Exist

            $c = Invoke-GuestScript check $t.ConfigPath
            $c.ExitCode | Should -Be 1
            $c.Output[-1] | Should -Match ('^check: FAILED: answer files .*\(remove-answer-files\)$')
            $c.Text | Should -Match ('\| \(none\) +\| ' + [regex]::Escape($global:StuckAnswerFile) + ' +\| FAIL')
        }

        It 'fails naming a copy that is still there after Remove-Item' {
            $global:StuckAnswerFile = Add-FakeWindowsFile 'Panther\Unattend\autounattend.xml'
            Add-PassThroughMock Remove-Item
            Add-FakeMock Remove-Item -ParameterFilter { [string](@($PesterBoundParameters['LiteralPath'])[0]) -eq $global:StuckAnswerFile } -MockWith { }

            $r = Invoke-GuestScript provision $t.ConfigPath

            $r.ExitCode | Should -Be 1
            Get-LogText | Should -Match ([regex]::Escape("step 'remove-answer-files' failed: could not delete 1 answer file(s): $global:StuckAnswerFile (still there after Remove-Item)"))
            Get-LogText | Should -Not -Match ([regex]::Escape("answer file removed: $global:StuckAnswerFile"))
        }

        It 'fails naming a folder it cannot list' {
            $global:LockedFolder = Split-Path -Parent (Add-FakeWindowsFile 'Panther\Unattend\unattend.xml')
            Add-PassThroughMock Get-ChildItem
            Add-FakeMock Get-ChildItem -ParameterFilter { [string](@($PesterBoundParameters['LiteralPath'])[0]) -eq $global:LockedFolder } -MockWith {
                throw ("Access to the path '{0}' is denied." -f $global:LockedFolder)
            }

            $r = Invoke-GuestScript provision $t.ConfigPath

            $r.ExitCode | Should -Be 1
            Get-LogText | Should -Match ([regex]::Escape("step 'remove-answer-files' failed: cannot list $($global:LockedFolder): Access to the path"))
        }

        It 'does not follow a folder link out of Panther, and deletes a file link, not its target' {
            $elsewhere = Join-Path $t.Root 'elsewhere'
            New-Item -ItemType Directory -Path $elsewhere | Out-Null
            $outside = Join-Path $elsewhere 'unattend.xml'
            $target = Join-Path $elsewhere 'target.xml'
            Set-Content -LiteralPath $outside, $target -Value 'outside'
            New-Item -ItemType SymbolicLink -Path (Get-FakeWindowsPath 'Panther\linked') -Target $elsewhere | Out-Null
            $fileLink = Get-FakeWindowsPath 'Panther\Unattend\Unattend.xml'
            New-Item -ItemType Directory -Path (Split-Path -Parent $fileLink) -Force | Out-Null
            New-Item -ItemType SymbolicLink -Path $fileLink -Target $target | Out-Null

            $r = Invoke-GuestScript provision $t.ConfigPath

            $r.ExitCode | Should -Be 0 -Because $r.Text
            $outside | Should -Exist
            $target | Should -Exist
            Test-Path -LiteralPath $fileLink | Should -BeFalse
            Get-LogText | Should -Match ([regex]::Escape("changed: answer file removed: $fileLink"))
            Get-LogText | Should -Not -Match ([regex]::Escape($outside))
        }
    }

    Context 'Visual Studio versions' {
        It 'installs VS <Vs> Build Tools with <Expected> and checks for that version' -ForEach @(
            @{ Vs = '2019'; Expected = 'ARM64 and ARM'; Components = @('Microsoft.VisualStudio.Component.VC.Tools.ARM64', 'Microsoft.VisualStudio.Component.VC.Tools.ARM') }
            @{ Vs = '2022'; Expected = 'ARM64 and ARM'; Components = @('Microsoft.VisualStudio.Component.VC.Tools.ARM64', 'Microsoft.VisualStudio.Component.VC.Tools.ARM') }
            @{ Vs = '2026'; Expected = 'ARM64 only'; Components = @('Microsoft.VisualStudio.Component.VC.Tools.ARM64') }
        ) {
            $t.Settings.vsVersion = $Vs
            Save-TestSettings $t
            $r = Invoke-GuestScript provision $t.ConfigPath
            $r.ExitCode | Should -Be 0 -Because $r.Text
            $arguments = @($global:FakeWin.Processes[0].ArgumentList)
            $added = @(for ($i = 0; $i -lt $arguments.Count - 1; $i++) { if ($arguments[$i] -eq '--add') { $arguments[$i + 1] } })
            $added | Should -Be (@('Microsoft.VisualStudio.Workload.VCTools') + $Components)
            # The fake vswhere answers with the version it was asked for.
            Get-LogText | Should -Match ([regex]::Escape("Visual Studio $Vs Build Tools installed in C:\Program Files (x86)\Microsoft Visual Studio\$Vs\BuildTools"))
            $c = Invoke-GuestScript check $t.ConfigPath
            $c.ExitCode | Should -Be 0 -Because $c.Text
            $c.Text | Should -Match ([regex]::Escape("VS $Vs instance"))
        }
    }

    Context 'the VS bootstrapper as a real process' {
        BeforeEach {
            # A shell script stands in for vs_BuildTools.exe, already downloaded with the
            # configured SHA-256; the real Start-Process runs it; vswhere finds what it recorded.
            $global:VsMarker = Join-Path $t.Root 'vs-installed'
            $script:childPidFile = Join-Path $t.Root 'child.pid'
            $script:bootstrapper = Join-Path $t.Settings.downloadDir 'vs_BuildTools.exe'
            New-Item -ItemType Directory -Path $t.Settings.downloadDir -Force | Out-Null
            Mock Start-Process { & (Get-Command -Name Start-Process -CommandType Cmdlet) @PesterBoundParameters }
            Mock Get-VsBuildToolsPath { if (Test-Path -LiteralPath $global:VsMarker) { 'C:\VS\' + $Version } }
            function Set-StandInBootstrapper {
                param([int]$ExitCode)
                $text = "#!/bin/sh`n" +
                "sleep 300 >/dev/null 2>&1 &`n" +
                "echo `$! > '$childPidFile'`n" +
                "echo `"`$*`" > '$global:VsMarker'`n" +
                "exit $ExitCode`n"
                [System.IO.File]::WriteAllText($bootstrapper, $text)
                & chmod +x $bootstrapper
                $t.Settings.vsBuildToolsSha256 = (Get-FileHash -LiteralPath $bootstrapper -Algorithm SHA256).Hash.ToLowerInvariant()
                foreach ($step in Get-StepCatalog | Where-Object { $_.Switch }) { $t.Settings[$step.Switch] = ($step.Name -eq 'install-vs-build-tools') }
                Save-TestSettings $t
            }
        }

        AfterEach {
            if (Test-Path -LiteralPath $childPidFile) {
                Stop-Process -Id ([int](Get-Content -LiteralPath $childPidFile -Raw).Trim()) -ErrorAction SilentlyContinue
            }
        }

        It 'waits for the bootstrapper only: the step ends while a child it started still runs' {
            Set-StandInBootstrapper -ExitCode 0
            $r = Invoke-GuestScript provision $t.ConfigPath
            $r.ExitCode | Should -Be 0 -Because $r.Text
            Get-LogText | Should -Match ([regex]::Escape('Visual Studio 2022 Build Tools installed in C:\VS\2022'))
            (Get-Content -LiteralPath $global:VsMarker -Raw) | Should -Match '^--quiet --wait --norestart --nocache --add Microsoft\.VisualStudio\.Workload\.VCTools '
            $childPid = [int](Get-Content -LiteralPath $childPidFile -Raw).Trim()
            Get-Process -Id $childPid -ErrorAction SilentlyContinue | Should -Not -BeNullOrEmpty -Because 'the child outlives the bootstrapper, and the step did not wait for it'
            $bootstrapper | Should -Not -Exist
        }

        It 'fails with the exit code of the real bootstrapper process' {
            Set-StandInBootstrapper -ExitCode 5
            $r = Invoke-GuestScript provision $t.ConfigPath
            $r.ExitCode | Should -Be 1
            Get-LogText | Should -Match "step 'install-vs-build-tools' failed: Visual Studio Build Tools installer exited with code 5"
        }
    }

    Context 'invalid settings' {
        It 'exits 2 and names the problem: <Problem>' -ForEach @(
            @{ Problem = 'missing buildlet env'; Edit = { $t.Settings.Remove('buildletEnv') }; Message = "'buildletEnv' is required when 'installBuildlet' is true" }
            @{ Problem = 'buildlet env with a space'; Edit = { $t.Settings.buildletEnv = 'host windows' }; Message = "'buildletEnv' must be 1 to 100 letters, digits" }
            @{ Problem = 'unknown VS version'; Edit = { $t.Settings.vsVersion = '2017' }; Message = "'vsVersion' must be one of 2019, 2022, 2026" }
            @{ Problem = 'empty VS version'; Edit = { $t.Settings.vsVersion = '' }; Message = "'vsVersion' must be one of 2019, 2022, 2026" }
            @{ Problem = 'buildlet path cmd.exe would interpret'; Edit = { $t.Settings.buildletPath = 'C:\go&lang\bootstrap.exe' }; Message = "'buildletPath' must not contain any of" }
            @{ Problem = 'unknown key'; Edit = { $t.Settings['disableUAC'] = $true }; Message = "unknown setting 'disableUAC' (did you mean 'disableUac'?)" }
            @{ Problem = 'missing URL'; Edit = { $t.Settings.Remove('buildletStage0Url') }; Message = "'buildletStage0Url' is required when 'installBuildlet' is true" }
            @{ Problem = 'missing password'; Edit = { $t.Settings.Remove('builderPassword') }; Message = "'builderPassword' is required when 'createBuilderUser' is true" }
            @{ Problem = 'bad hash'; Edit = { $t.Settings.llvmMingwSha256 = 'abc' }; Message = "'llvmMingwSha256' must be a SHA-256 hash" }
            @{ Problem = 'string for bool'; Edit = { $t.Settings.disableFirewall = 'yes' }; Message = "'disableFirewall' must be true or false" }
            @{ Problem = 'not a URL'; Edit = { $t.Settings.vsBuildToolsUrl = 'vs_BuildTools.exe' }; Message = "'vsBuildToolsUrl' must be an http(s) URL" }
            @{ Problem = 'bad user name'; Edit = { $t.Settings.builderUser = 'ci/builder' }; Message = "'builderUser' is not a valid local user name" }
            @{ Problem = 'services not a list'; Edit = { $t.Settings.servicesToDisable = 'BITS' }; Message = "'servicesToDisable' must be an array of strings" }
        ) {
            . $Edit
            Save-TestSettings $t
            $r = Invoke-GuestScript provision $t.ConfigPath
            $r.ExitCode | Should -Be 2
            $r.Text | Should -Match ([regex]::Escape($Message))
            $r.Text | Should -Not -Match ([regex]::Escape($t.Password))
            $global:FakeWin.Changes | Should -HaveCount 0
        }

        It 'exits 2 when the settings file is missing or not JSON' {
            $r = Invoke-GuestScript provision (Join-Path $t.Root 'nope.json')
            $r.ExitCode | Should -Be 2
            $r.Text | Should -Match 'does not exist'
            Set-Content -LiteralPath $t.ConfigPath -Value '{ "disableUac": '
            $r = Invoke-GuestScript provision $t.ConfigPath
            $r.ExitCode | Should -Be 2
            $r.Text | Should -Match 'is not valid JSON'
        }
    }
}

Describe 'provision.ps1 in its own pwsh process, downloading over HTTP' {
    # Runs the real script in a child pwsh with real Invoke-WebRequest against a
    # loopback HTTP server. Only Test-IsAdministrator (Windows API),
    # Set-RegistryValue (no HKLM on Linux), the machine environment and
    # Get-WindowsFolder (a folder under the test's root) are replaced, by
    # functions defined in the child's calling scope; the answer files in that
    # folder are deleted for real.
    BeforeAll {
        $script:pwsh = $env:PWSH_PATH
        if (-not $pwsh) { $script:pwsh = (Get-Command pwsh -ErrorAction SilentlyContinue).Source }
        if (-not $pwsh) { $script:pwsh = Join-Path $HOME '.dotnet/tools/pwsh' }
        $script:node = (Get-Command node -ErrorAction SilentlyContinue).Source
        $script:root = Join-Path $TestDrive 'http'
        $served = Join-Path $root 'served'
        New-Item -ItemType Directory -Path $served -Force | Out-Null
        $script:sha = New-RandomFile -Path (Join-Path $served 'stage0.exe') -Size 65536
        $script:requestLog = Join-Path $root 'requests.log'
        $portFile = Join-Path $root 'port'
        $server = Join-Path $root 'serve.js'
        Set-Content -LiteralPath $server -Value @'
const http = require("http"), fs = require("fs"), path = require("path");
const [root, portFile, requestLog] = process.argv.slice(2);
const server = http.createServer((req, res) => {
  fs.appendFileSync(requestLog, req.url + "\n");
  const file = path.join(root, path.basename(new URL(req.url, "http://localhost").pathname));
  fs.readFile(file, (err, data) => {
    if (err) { res.writeHead(404); res.end("not found"); return; }
    res.writeHead(200, { "content-type": "application/octet-stream" });
    res.end(data);
  });
});
server.listen(0, "127.0.0.1", () => fs.writeFileSync(portFile, String(server.address().port)));
setTimeout(() => process.exit(0), 10 * 60 * 1000);
'@
        $script:serverProcess = Start-Process -FilePath $node -ArgumentList @($server, $served, $portFile, $requestLog) -PassThru `
            -RedirectStandardOutput (Join-Path $root 'server.out') -RedirectStandardError (Join-Path $root 'server.err')
        # Generous: node starts slowly while the other test lanes keep both cores busy.
        $deadline = [DateTime]::UtcNow.AddSeconds(120)
        while (-not (Test-Path -LiteralPath $portFile) -and [DateTime]::UtcNow -lt $deadline) { Start-Sleep -Milliseconds 100 }
        if (-not (Test-Path -LiteralPath $portFile)) {
            throw "the test's HTTP server ($node $server) wrote no port file within 120 s: $(Get-Content -Raw -LiteralPath (Join-Path $root 'server.err') -ErrorAction SilentlyContinue)"
        }
        $script:baseUrl = 'http://127.0.0.1:{0}' -f (Get-Content -LiteralPath $portFile -Raw).Trim()
        $script:windowsDir = Join-Path $root 'Windows'
        function Add-ChildWindowsFile {
            param([string[]]$Parts)
            $path = $windowsDir
            foreach ($part in $Parts) { $path = Join-Path $path $part }
            New-Item -ItemType Directory -Path (Split-Path -Parent $path) -Force | Out-Null
            Set-Content -LiteralPath $path -Value '<unattend/>'
            return $path
        }

        function Invoke-ChildProvision {
            param([string]$Sha)
            $machine = Join-Path $root 'machine'
            $settings = [ordered]@{ logPath = Join-Path $machine 'provision.log'; downloadDir = Join-Path $machine 'downloads' }
            foreach ($step in Get-StepCatalog | Where-Object { $_.Switch }) { $settings[$step.Switch] = $false }
            $settings.installBuildlet = $true
            $settings.buildletEnv = 'host-windows11-arm64-azure'
            $settings.buildletStage0Url = "$baseUrl/stage0.exe"
            $settings.buildletStage0Sha256 = $Sha
            $settings.buildletPath = Join-Path $machine 'bootstrap.exe'
            $config = Join-Path $root 'settings.json'
            $settings | ConvertTo-Json | Set-Content -LiteralPath $config -Encoding UTF8
            $registryLog = Join-Path $root 'registry.log'
            $command = @"
& {
function Test-IsAdministrator { `$true }
function Get-WindowsFolder { '$windowsDir' }
function Set-RegistryValue { param(`$Path, `$Name, `$Value, `$Type, [switch]`$Secret) Add-Content -LiteralPath '$registryLog' -Value "`$Path\`$Name=`$Value" }
function Get-MachineEnvironmentVariable { param(`$Name) `$null }
function Set-MachineEnvironmentVariable { param(`$Name, `$Value) Add-Content -LiteralPath '$registryLog' -Value "env:`$Name=`$Value" }
& '$global:ProvisionScript' -ConfigPath '$config'
}
exit `$LASTEXITCODE
"@
            $output = & $pwsh -NoLogo -NoProfile -NonInteractive -Command $command 2>&1 | ForEach-Object { "$_" }
            [pscustomobject]@{ ExitCode = $LASTEXITCODE; Text = ($output -join "`n"); Settings = $settings; RegistryLog = $registryLog }
        }
    }

    AfterAll {
        if ($script:serverProcess -and -not $script:serverProcess.HasExited) { Stop-Process -Id $script:serverProcess.Id }
    }

    It 'exits 1 naming expected and actual hashes when the download does not match' {
        $cached = Add-ChildWindowsFile 'Panther', 'unattend.xml'
        $wrong = 'ef' * 32
        $r = Invoke-ChildProvision -Sha $wrong
        $r.ExitCode | Should -Be 1 -Because $r.Text
        $r.Text | Should -Match ([regex]::Escape("step 'install-buildlet' failed: SHA-256 mismatch for $baseUrl/stage0.exe: expected $wrong, actual $sha"))
        $r.Settings.buildletPath | Should -Not -Exist
        "$($r.Settings.buildletPath).partial" | Should -Not -Exist
        $r.RegistryLog | Should -Not -Exist
        # The run stopped before its last step.
        $r.Text | Should -Not -Match "step 'remove-answer-files': start"
        $cached | Should -Exist
    }

    It 'exits 0 with the verified file and the answer files deleted, and a second run does not download it again' {
        $copies = @(
            (Add-ChildWindowsFile 'Panther', 'unattend.xml'),
            (Add-ChildWindowsFile 'Panther', 'Unattend', 'Unattend.xml'),
            (Add-ChildWindowsFile 'System32', 'Sysprep', 'AutoUnattend.xml')
        )
        $log = Add-ChildWindowsFile 'Panther', 'setupact.log'
        $r = Invoke-ChildProvision -Sha $sha
        $r.ExitCode | Should -Be 0 -Because $r.Text
        foreach ($copy in $copies) {
            $copy | Should -Not -Exist
            $r.Text | Should -Match ([regex]::Escape("changed: answer file removed: $copy"))
        }
        $log | Should -Exist
        (Get-FileHash -LiteralPath $r.Settings.buildletPath -Algorithm SHA256).Hash | Should -Be $sha
        $folder = Split-Path -Parent $r.Settings.buildletPath
        Get-Content -LiteralPath $r.RegistryLog | Should -Contain ('HKLM:\SOFTWARE\Microsoft\Windows\CurrentVersion\Run\buildlet=cmd.exe /c "cd /d {0} && {1}"' -f $folder, $r.Settings.buildletPath)
        Get-Content -LiteralPath $r.RegistryLog | Should -Contain 'env:GO_BUILDER_ENV=host-windows11-arm64-azure'
        $requests = @(Get-Content -LiteralPath $requestLog).Count

        $again = Invoke-ChildProvision -Sha $sha
        $again.ExitCode | Should -Be 0 -Because $again.Text
        @(Get-Content -LiteralPath $requestLog).Count | Should -Be $requests
        $again.Text | Should -Match 'already present with SHA-256'
        $again.Text | Should -Match "step 'remove-answer-files': already in place, nothing changed"
    }
}
