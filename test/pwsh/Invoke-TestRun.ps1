<#
.SYNOPSIS
    Parses every PowerShell file of the project, then runs the Pester tests.
.DESCRIPTION
    Called by test/pwsh/run.sh. Step 1 parses each .ps1/.psm1/.psd1 under
    provisioning/ and test/ and stops on any syntax error. Step 2 runs Pester on
    test/pwsh (every *.Tests.ps1). The last line written is
    "N passed, N failed" (plus ", N skipped" when tests were skipped).
    Exit code 0 only when everything parsed and no test, block or file failed.
#>
[CmdletBinding()]
param(
    [Parameter(Mandatory = $true)][string]$RepoRoot,
    [Parameter(Mandatory = $true)][string]$PesterPath,
    # Test files or folders to run (default: test/pwsh).
    [string[]]$Path
)
Set-StrictMode -Version Latest
$ErrorActionPreference = 'Stop'

# 1) Syntax check of every PowerShell file.
$files = @(foreach ($dir in 'provisioning', 'test') {
        $full = Join-Path $RepoRoot $dir
        if (Test-Path -LiteralPath $full) {
            Get-ChildItem -LiteralPath $full -Recurse -File -Include '*.ps1', '*.psm1', '*.psd1' |
                Where-Object { $_.FullName -notmatch '[\\/](node_modules|\.cache)[\\/]' }
        }
    })
$parseFailures = 0
foreach ($file in $files) {
    $tokens = $null
    $errors = $null
    [void][System.Management.Automation.Language.Parser]::ParseFile($file.FullName, [ref]$tokens, [ref]$errors)
    if ($errors -and $errors.Count -gt 0) {
        $parseFailures++
        foreach ($e in $errors) {
            Write-Host ('parse error: {0}:{1}:{2}: {3}' -f $file.FullName, $e.Extent.StartLineNumber, $e.Extent.StartColumnNumber, $e.Message)
        }
    }
}
Write-Host ('parsed {0} PowerShell file(s), {1} with errors' -f $files.Count, $parseFailures)
if ($parseFailures -gt 0) {
    Write-Host ('0 passed, {0} failed' -f $parseFailures)
    exit 1
}

# 2) Pester.
Import-Module $PesterPath -Force
$config = New-PesterConfiguration
if ($Path) { $config.Run.Path = $Path } else { $config.Run.Path = (Join-Path $RepoRoot 'test/pwsh') }
$config.Run.PassThru = $true
$config.Run.Exit = $false
$config.Output.Verbosity = 'Detailed'
if ($env:CI -or [Console]::IsOutputRedirected) { $config.Output.RenderMode = 'Plaintext' }
$result = Invoke-Pester -Configuration $config

$failed = $result.FailedCount + $result.FailedBlocksCount + $result.FailedContainersCount
# The failures again, together at the end, where a log cut to its last part still shows them.
if ($failed -gt 0) {
    Write-Host 'failed tests:'
    $items = @($result.Failed) + @($result.FailedBlocks) + @($result.FailedContainers)
    foreach ($item in $items) {
        $name = if ($item.PSObject.Properties['ExpandedPath']) { $item.ExpandedPath } else { "$($item.Name)" }
        # Where the test is (Pester's stack trace names its own assertion code, not the test).
        $where = if ($item.PSObject.Properties['ScriptBlock'] -and $item.ScriptBlock.File) {
            ' ({0}:{1})' -f $item.ScriptBlock.File, $item.StartLine
        } else { '' }
        Write-Host ('  [-] {0}{1}' -f $name, $where)
        foreach ($err in @($item.ErrorRecord)) {
            foreach ($l in (("$err" -split "`n") | Select-Object -First 12)) {
                $l = $l.TrimEnd()
                if ($l.Length -gt 400) { $l = $l.Substring(0, 400) + ' ...' }
                Write-Host ('      {0}' -f $l)
            }
        }
    }
}
$line = '{0} passed, {1} failed' -f $result.PassedCount, $failed
if ($result.SkippedCount -gt 0) { $line += (', {0} skipped' -f $result.SkippedCount) }
if ($result.TotalCount -eq 0) {
    Write-Host 'test:pwsh: no test ran'
    $failed++
}
Write-Host $line
if ($failed -gt 0 -or $result.Result -ne 'Passed') { exit 1 }
exit 0
