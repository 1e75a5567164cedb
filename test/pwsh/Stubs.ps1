<#
    Test support (dot-source it): Add-CommandStubs defines a global function for
    each Windows-only command that does not exist here (PowerShell on Linux), with
    the parameters the scripts use, so Pester can mock it. A stub that a test
    forgot to mock throws, naming itself.
#>
function global:Add-CommandStubs {
    param([Parameter(Mandatory = $true)][hashtable]$Stubs)
    foreach ($name in $Stubs.Keys) {
        if (-not (Get-Command $name -ErrorAction SilentlyContinue)) {
            $body = $Stubs[$name] + " throw '$name is a test stub: it must be mocked'"
            Set-Item -Path "function:global:$name" -Value ([scriptblock]::Create($body))
        }
    }
}
