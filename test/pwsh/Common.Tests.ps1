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

    It 'rejects a JSON array' {
        { Read-ProvisionSettings -Path (Write-Settings '[1, 2]') } | Should -Throw -ExpectedMessage '*must hold a JSON object*'
    }
}

Describe 'Format-SettingsForLog' {
    It 'redacts the password and the URL query' {
        $path = Write-Settings ('{ "builderUser": "ci", "builderPassword": "Sup3r-secret!", "buildletStage0Url": "https://user:pw@host.test/b.exe?sig=1", ' +
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
    It 'quotes a path with spaces only' {
        Get-BuildletRunCommand -BuildletPath 'C:\golang\bootstrap.exe' | Should -BeExactly 'C:\golang\bootstrap.exe'
        Get-BuildletRunCommand -BuildletPath 'C:\Program Files\b.exe' | Should -BeExactly '"C:\Program Files\b.exe"'
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
