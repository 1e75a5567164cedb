# Unit tests of provisioning/windows/common.psm1 (settings, logging, runner).

BeforeAll {
    Import-Module (Join-Path $PSScriptRoot '../../provisioning/windows/common.psm1') -Force -DisableNameChecking

    function Write-Settings {
        param([string]$Json)
        $path = Join-Path $TestDrive ('settings-{0}.json' -f [guid]::NewGuid().ToString('N'))
        Set-Content -LiteralPath $path -Value $Json -Encoding UTF8
        return $path
    }
    $script:offJson = '"disableWindowsUpdate": false, "disableErrorReportingUi": false, "disableUac": false, "disableFirewall": false, ' +
    '"disableDefenderRealtime": false, "disableServices": false, "installBuildlet": false, "installLlvmMingw": false, ' +
    '"installVsBuildTools": false, "createBuilderUser": false, "autoLogon": false'
}

Describe 'Read-ProvisionSettings' {
    It 'applies the documented defaults' {
        $s = Read-ProvisionSettings -Path (Write-Settings "{ $offJson }")
        $s.logPath | Should -Be 'C:\ProgramData\windows-arm64-image\provision.log'
        $s.downloadDir | Should -Be 'C:\ProgramData\windows-arm64-image\downloads'
        $s.buildletPath | Should -Be 'C:\golang\bootstrap.exe'
        $s.llvmMingwDir | Should -Be 'C:\godep\llvm-aarch64'
        $s.servicesToDisable | Should -Be @('NlaSvc', 'LanmanServer', 'BITS', 'DPS', 'MSDTC', 'IKEEXT', 'RemoteRegistry', 'lmhosts')
        $s.builderUser | Should -BeExactly ''
    }

    It 'switches every step on by default, so a missing URL is an error, not a silent skip' {
        { Read-ProvisionSettings -Path (Write-Settings '{}') } | Should -Throw -ExpectedMessage "*'buildletStage0Url' is required when 'installBuildlet' is true*'builderPassword' is required when 'createBuilderUser' is true*"
    }

    It 'ignores keys starting with _ and treats null as not given' {
        $s = Read-ProvisionSettings -Path (Write-Settings "{ `"_comment`": `"x`", `"logPath`": null, $offJson }")
        $s.logPath | Should -Be 'C:\ProgramData\windows-arm64-image\provision.log'
    }

    It 'keeps a one-element service list a list' {
        $s = Read-ProvisionSettings -Path (Write-Settings "{ `"servicesToDisable`": [`"BITS`"], $offJson }")
        , $s.servicesToDisable | Should -BeOfType [string[]]
        $s.servicesToDisable | Should -Be @('BITS')
    }

    It 'lists every problem at once' {
        { Read-ProvisionSettings -Path (Write-Settings '{ "nope": 1, "disableUac": 0, "llvmMingwSha256": "xyz", "installBuildlet": false, "installVsBuildTools": false, "createBuilderUser": false, "autoLogon": false }') } |
            Should -Throw -ExpectedMessage "*unknown setting 'nope'*'disableUac' must be true or false*'llvmMingwSha256' must be a SHA-256 hash*"
    }

    It 'defaults vsVersion to 2022 and needs buildletEnv when the buildlet is installed' {
        $s = Read-ProvisionSettings -Path (Write-Settings "{ $offJson }")
        $s.vsVersion | Should -BeExactly '2022'
        $s.buildletEnv | Should -BeExactly ''
        $on = $offJson.Replace('"installBuildlet": false', '"installBuildlet": true') + ', "buildletStage0Url": "https://h.test/s.exe", "buildletStage0Sha256": "' + ('a' * 64) + '"'
        { Read-ProvisionSettings -Path (Write-Settings "{ $on }") } | Should -Throw -ExpectedMessage "*'buildletEnv' is required when 'installBuildlet' is true*"
        (Read-ProvisionSettings -Path (Write-Settings "{ $on, `"buildletEnv`": `"host-windows11-arm64-azure`" }")).buildletEnv | Should -BeExactly 'host-windows11-arm64-azure'
    }

    It 'rejects a vsVersion it has no component list for, a buildletEnv that is not a name, and a buildletPath cmd.exe would interpret' {
        { Read-ProvisionSettings -Path (Write-Settings "{ $offJson, `"vsVersion`": `"2017`", `"buildletEnv`": `"a b`", `"buildletPath`": `"C:\\a|b.exe`" }") } |
            Should -Throw -ExpectedMessage "*'vsVersion' must be one of 2019, 2022, 2026*'buildletEnv' must be 1 to 100 letters*'buildletPath' must not contain*"
    }

    It 'reads a non-ASCII value from a UTF-8 file' {
        $path = Join-Path $TestDrive 'utf8.json'
        [System.IO.File]::WriteAllText($path, "{ $offJson, `"_note`": `"x`", `"logPath`": `"C:\\Protokoll-$([char]0xFC)ber\\p.log`" }", (New-Object System.Text.UTF8Encoding($false)))
        (Read-ProvisionSettings -Path $path).logPath | Should -BeExactly "C:\Protokoll-$([char]0xFC)ber\p.log"
    }

    It 'rejects a JSON array' {
        { Read-ProvisionSettings -Path (Write-Settings '[1, 2]') } | Should -Throw -ExpectedMessage '*must hold a JSON object*'
    }
}

Describe 'Format-SettingsForLog' {
    It 'redacts the password and the URL query' {
        $path = Write-Settings ('{ "builderUser": "ci", "builderPassword": "Sup3r-secret!", "buildletStage0Url": "https://user:pw@host.test/b.exe?sig=1", "buildletEnv": "host-x", ' +
            '"buildletStage0Sha256": "' + ('a' * 64) + '", "installLlvmMingw": false, "installVsBuildTools": false }')
        $line = Format-SettingsForLog -Settings (Read-ProvisionSettings -Path $path)
        $line | Should -Match 'builderPassword=<redacted>'
        $line | Should -Not -Match 'Sup3r-secret!'
        $line | Should -Match ([regex]::Escape('buildletStage0Url=https://host.test/b.exe?<query hidden>'))
        $line | Should -Not -Match 'pw@|sig=1'
    }
}

Describe 'Write-Log' {
    It 'writes timestamped lines to the file and replaces registered secrets' {
        $log = Join-Path $TestDrive 'sub/dir/log.txt'
        Initialize-Log -Path $log
        Add-LogSecret 'hunter2-long'
        Write-Log 'user set password hunter2-long' 6>$null
        Write-Log -Level WARN 'careful' 6>$null
        $lines = @(Get-Content -LiteralPath $log)
        $lines | Should -HaveCount 2
        $lines[0] | Should -Match '^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ \[INFO\] user set password <redacted>$'
        $lines[1] | Should -Match '\[WARN\] careful$'
    }

    It 'starts a fresh change count and secret list on Initialize-Log' {
        Initialize-Log
        Add-LogSecret 'abcdef'
        Add-ChangeRecord 'something' 6>$null
        Get-ChangeCount | Should -Be 1
        Initialize-Log
        Get-ChangeCount | Should -Be 0
        (Write-Log 'abcdef' 6>&1 | Out-String) | Should -Match 'abcdef'
    }
}

Describe 'Invoke-ProvisionSteps' {
    BeforeEach { Initialize-Log }

    It 'runs enabled steps in order, skips disabled ones and counts changes' {
        $script:order = @()
        $steps = @(
            New-ProvisionStep -Name 'one' -Enabled $true -Action { $script:order += 'one'; Add-ChangeRecord 'first' }
            New-ProvisionStep -Name 'two' -Enabled $false -Action { $script:order += 'two' }
            New-ProvisionStep -Name 'three' -Enabled $true -Action { $script:order += 'three' }
        )
        $result = Invoke-ProvisionSteps -Steps $steps 6>$null
        $result.Success | Should -BeTrue
        $script:order | Should -Be @('one', 'three')
        $result.Ran | Should -Be @('one', 'three')
        $result.Skipped | Should -Be @('two')
        $result.Changes | Should -Be 1
    }

    It 'stops at the first failing step and names it' {
        $script:order = @()
        $steps = @(
            New-ProvisionStep -Name 'one' -Enabled $true -Action { $script:order += 'one' }
            New-ProvisionStep -Name 'boom' -Enabled $true -Action { throw 'disk full' }
            New-ProvisionStep -Name 'three' -Enabled $true -Action { $script:order += 'three' }
        )
        $out = Invoke-ProvisionSteps -Steps $steps 6>&1
        $result = $out | Where-Object { $_ -isnot [System.Management.Automation.InformationRecord] }
        $result.Success | Should -BeFalse
        $result.FailedStep | Should -Be 'boom'
        $result.Error | Should -Be 'disk full'
        $script:order | Should -Be @('one')
        ($out | Out-String) | Should -Match "\[ERROR\] step 'boom' failed: disk full"
    }
}

Describe 'Assert-StepNames' {
    It 'accepts the catalogue and rejects anything else' {
        $names = @(Get-StepCatalog | ForEach-Object { $_.Name })
        { Assert-StepNames -Names $names -Source 'x' } | Should -Not -Throw
        { Assert-StepNames -Names ($names | Select-Object -Skip 1) -Source 'x.ps1' } | Should -Throw -ExpectedMessage 'x.ps1 declares steps*'
    }
}

Describe 'Test-RegistryValueEqual' {
    It 'compares DWords as numbers and strings exactly' {
        Test-RegistryValueEqual -Current 1 -Desired 1 -Type DWord | Should -BeTrue
        Test-RegistryValueEqual -Current '1' -Desired 1 -Type DWord | Should -BeTrue
        Test-RegistryValueEqual -Current 0 -Desired 1 -Type DWord | Should -BeFalse
        Test-RegistryValueEqual -Current 'x' -Desired 1 -Type DWord | Should -BeFalse
        Test-RegistryValueEqual -Current $null -Desired 0 -Type DWord | Should -BeFalse
        Test-RegistryValueEqual -Current 'Builder' -Desired 'builder' -Type String | Should -BeFalse
        Test-RegistryValueEqual -Current '1' -Desired '1' -Type String | Should -BeTrue
    }
}

Describe 'Get-BuildletRunCommand' {
    It 'starts stage0 in its own folder through cmd.exe, as a Run entry starts in System32' {
        Get-BuildletRunCommand -BuildletPath 'C:\golang\bootstrap.exe' | Should -BeExactly 'cmd.exe /c "cd /d C:\golang && C:\golang\bootstrap.exe"'
        Get-BuildletRunCommand -BuildletPath 'C:\bootstrap.exe' | Should -BeExactly 'cmd.exe /c "cd /d C:\ && C:\bootstrap.exe"'
    }

    It 'quotes a folder and a path with spaces inside the outer quotes' {
        Get-BuildletRunCommand -BuildletPath 'C:\Go Build\b.exe' | Should -BeExactly 'cmd.exe /c "cd /d "C:\Go Build" && "C:\Go Build\b.exe""'
    }

    It 'refuses a path that cmd.exe would interpret' {
        { Get-BuildletRunCommand -BuildletPath 'C:\a&b\bootstrap.exe' } | Should -Throw -ExpectedMessage '*cmd.exe would interpret*'
        { Get-BuildletRunCommand -BuildletPath 'C:\%TEMP%\bootstrap.exe' } | Should -Throw -ExpectedMessage '*cmd.exe would interpret*'
    }
}

Describe 'Get-ParentFolder' {
    It 'takes Windows paths apart the same way on any OS' {
        Get-ParentFolder -Path 'C:\golang\bootstrap.exe' | Should -BeExactly 'C:\golang'
        Get-ParentFolder -Path 'C:\godep\llvm-aarch64\' | Should -BeExactly 'C:\godep'
        Get-ParentFolder -Path 'C:\b.exe' | Should -BeExactly 'C:\'
        Get-ParentFolder -Path '/tmp/x/b.exe' | Should -BeExactly '/tmp/x'
        Get-ParentFolder -Path 'b.exe' | Should -BeExactly ''
    }
}

Describe 'Visual Studio Build Tools by version' {
    It 'installs and requires ARM64 and ARM VC tools for <Vs>, with vswhere range <Range>' -ForEach @(
        @{ Vs = '2019'; Range = '[16.0,17.0)' }
        @{ Vs = '2022'; Range = '[17.0,18.0)' }
    ) {
        Get-VsBuildToolsRequiredComponents -Version $Vs | Should -Be @('Microsoft.VisualStudio.Component.VC.Tools.ARM64', 'Microsoft.VisualStudio.Component.VC.Tools.ARM')
        Get-VsBuildToolsVersionRange -Version $Vs | Should -BeExactly $Range
    }

    It 'has no 32-bit ARM component for 2026 (VS 2026 ships no ARM VC tools)' {
        Get-VsBuildToolsRequiredComponents -Version '2026' | Should -Be @('Microsoft.VisualStudio.Component.VC.Tools.ARM64')
        Get-VsBuildToolsVersionRange -Version '2026' | Should -BeExactly '[18.0,19.0)'
        (Get-VsBuildToolsArguments -Version '2026') -join ' ' | Should -BeExactly ('--quiet --wait --norestart --nocache --add Microsoft.VisualStudio.Workload.VCTools ' +
            '--add Microsoft.VisualStudio.Component.VC.Tools.ARM64 --includeRecommended')
    }

    It 'refuses an unknown version' {
        { Get-VsBuildToolsArguments -Version '2017' } | Should -Throw -ExpectedMessage "*unknown Visual Studio version '2017' (known: 2019, 2022, 2026)*"
    }
}

Describe 'Wait-ProcessExit' {
    BeforeAll {
        $script:pidFile = Join-Path $TestDrive 'child.pid'
        function Start-Shell([string]$Script) {
            $file = Join-Path $TestDrive ('{0}.sh' -f [guid]::NewGuid().ToString('N'))
            [System.IO.File]::WriteAllText($file, $Script + "`n")
            Start-Process -FilePath '/bin/sh' -ArgumentList $file -PassThru
        }
    }

    AfterEach {
        if (Test-Path -LiteralPath $pidFile) {
            Stop-Process -Id ([int](Get-Content -LiteralPath $pidFile -Raw).Trim()) -ErrorAction SilentlyContinue
            Remove-Item -LiteralPath $pidFile
        }
    }

    It 'returns the exit code of a real process' {
        $p = Start-Shell 'exit 7'
        Wait-ProcessExit -Process $p -TimeoutSeconds 60 -Name 'sh' | Should -Be 7
    }

    It 'returns when the process exits, while a child it started still runs' {
        $p = Start-Shell "sleep 300 >/dev/null 2>&1 & echo `$! > $pidFile; exit 0"
        Wait-ProcessExit -Process $p -TimeoutSeconds 60 -Name 'sh' | Should -Be 0
        $child = [int](Get-Content -LiteralPath $pidFile -Raw).Trim()
        Get-Process -Id $child -ErrorAction SilentlyContinue | Should -Not -BeNullOrEmpty
    }

    It 'stops a process that outlasts the timeout and says so' {
        # exec: the shell becomes the sleep, so stopping it leaves nothing behind.
        $p = Start-Shell 'exec sleep 300'
        { Wait-ProcessExit -Process $p -TimeoutSeconds 1 -Name 'the stand-in installer' 6>$null } | Should -Throw -ExpectedMessage 'the stand-in installer did not exit within 1 s; stopped it'
        $p.WaitForExit(30000) | Should -BeTrue
        $p.HasExited | Should -BeTrue
    }
}

Describe 'Get-DefenderExclusionPaths' {
    It 'excludes the buildlet and toolchain folders, the buildlet work folder and the builder''s TEMP' {
        $paths = Get-DefenderExclusionPaths -Settings @{ buildletPath = 'C:\golang\bootstrap.exe'; llvmMingwDir = 'C:\godep\llvm-aarch64'; builderUser = 'ci' }
        $paths | Should -Be @('C:\golang', 'C:\godep', 'C:\workdir', 'C:\Users\ci\AppData\Local\Temp')
    }

    It 'never excludes a whole volume, lists each folder once and leaves out TEMP with no builder' {
        $paths = Get-DefenderExclusionPaths -Settings @{ buildletPath = 'C:\bootstrap.exe'; llvmMingwDir = 'C:\WorkDir\llvm'; builderUser = '' }
        $paths | Should -Be @('C:\WorkDir')
    }

    It 'matches Defender''s list case-insensitively, ignoring a trailing backslash' {
        Test-DefenderExclusion -Path 'C:\workdir' -Excluded @('D:\x', 'c:\WORKDIR\') | Should -BeTrue
        Test-DefenderExclusion -Path 'C:\workdir' -Excluded $null | Should -BeFalse
        Test-DefenderExclusion -Path 'C:\workdir' -Excluded @('C:\workdir2') | Should -BeFalse
    }
}

Describe 'Expand-ZipArchive' {
    It 'unpacks a zip, keeping folders' {
        $src = Join-Path $TestDrive 'src'
        New-Item -ItemType Directory -Path (Join-Path $src 'top/bin') -Force | Out-Null
        Set-Content -LiteralPath (Join-Path $src 'top/bin/tool.txt') -Value 'x'
        Compress-Archive -Path (Join-Path $src 'top') -DestinationPath (Join-Path $TestDrive 'a.zip')
        Expand-ZipArchive -Path (Join-Path $TestDrive 'a.zip') -Destination (Join-Path $TestDrive 'out')
        Join-Path $TestDrive 'out/top/bin/tool.txt' | Should -Exist
    }

    It 'refuses an entry that would land outside the destination' {
        Add-Type -AssemblyName System.IO.Compression
        $zipPath = Join-Path $TestDrive 'evil.zip'
        $stream = [System.IO.File]::Create($zipPath)
        $archive = New-Object System.IO.Compression.ZipArchive($stream, [System.IO.Compression.ZipArchiveMode]::Create)
        $writer = New-Object System.IO.StreamWriter($archive.CreateEntry('../escaped.txt').Open())
        $writer.Write('x')
        $writer.Dispose()
        $archive.Dispose()
        $stream.Dispose()
        { Expand-ZipArchive -Path $zipPath -Destination (Join-Path $TestDrive 'inside') } | Should -Throw
        Join-Path $TestDrive 'escaped.txt' | Should -Not -Exist
    }
}
