# Static checks of the guest scripts: no secrets or URLs in the code, Windows
# PowerShell 5.1 compatible syntax, and provision/check/catalogue agreement.

BeforeDiscovery {
    $guestDir = Join-Path $PSScriptRoot '../../provisioning/windows'
    $guestFiles = @(Get-ChildItem -LiteralPath $guestDir -File | Where-Object { $_.Extension -in '.ps1', '.psm1', '.psd1' } |
            ForEach-Object { @{ Name = $_.Name; Path = $_.FullName } })
    # The two settings-driven scripts (other guest scripts only get the checks above).
    $scriptFiles = @($guestFiles | Where-Object { $_.Name -in 'provision.ps1', 'check.ps1' })
}

BeforeAll {
    $script:GuestDir = (Resolve-Path (Join-Path $PSScriptRoot '../../provisioning/windows')).Path
    Import-Module (Join-Path $GuestDir 'common.psm1') -Force -DisableNameChecking

    function Get-Ast {
        param([string]$Path)
        $tokens = $null
        $errors = $null
        $ast = [System.Management.Automation.Language.Parser]::ParseFile($Path, [ref]$tokens, [ref]$errors)
        $errors | Should -BeNullOrEmpty
        return $ast
    }

    function Find-Ast {
        param($Ast, [scriptblock]$Predicate)
        @($Ast.FindAll($Predicate, $true))
    }

    function Get-ConstantString {
        param($Ast)
        if ($Ast -is [System.Management.Automation.Language.StringConstantExpressionAst]) { return $Ast.Value }
        if ($Ast -is [System.Management.Automation.Language.CommandExpressionAst]) { return Get-ConstantString $Ast.Expression }
        if ($Ast -is [System.Management.Automation.Language.PipelineAst] -and $Ast.PipelineElements.Count -eq 1) { return Get-ConstantString $Ast.PipelineElements[0] }
        return $null
    }
}

Describe 'guest script <Name>' -ForEach $guestFiles {
    BeforeAll {
        $script:text = Get-Content -LiteralPath $Path -Raw
        $script:ast = Get-Ast $Path
    }

    It 'holds no http(s) URL' {
        $text | Should -Not -Match 'https?://[A-Za-z0-9]'
    }

    It 'holds no user name of the original builders' {
        $text | Should -Not -Match '(?i)gopher'
    }

    It 'holds no literal password' {
        $text | Should -Not -Match '(?i)password\s*=\s*[''"][^''"]+[''"]'
        # A variable named like a password assigned a literal string.
        $assigned = Find-Ast $ast {
            param($n)
            $n -is [System.Management.Automation.Language.AssignmentStatementAst] -and
            $n.Left -is [System.Management.Automation.Language.VariableExpressionAst] -and
            $n.Left.VariablePath.UserPath -match '(?i)pass|secret|pwd' -and
            -not [string]::IsNullOrEmpty((Get-ConstantString $n.Right))
        }
        $assigned | ForEach-Object { $_.Extent.Text } | Should -BeNullOrEmpty
        # A literal string given to a password parameter or to ConvertTo-SecureString.
        $passed = Find-Ast $ast {
            param($n)
            if ($n -isnot [System.Management.Automation.Language.CommandAst]) { return $false }
            $elements = $n.CommandElements
            for ($i = 1; $i -lt $elements.Count - 1; $i++) {
                if ($elements[$i] -is [System.Management.Automation.Language.CommandParameterAst] -and
                    $elements[$i].ParameterName -match '(?i)password|^String$' -and
                    $elements[$i + 1] -is [System.Management.Automation.Language.StringConstantExpressionAst]) { return $true }
            }
            return $false
        }
        $passed | ForEach-Object { $_.Extent.Text } | Should -BeNullOrEmpty
        # A hashtable entry named like a password with a literal value.
        $entries = Find-Ast $ast {
            param($n)
            if ($n -isnot [System.Management.Automation.Language.HashtableAst]) { return $false }
            foreach ($pair in $n.KeyValuePairs) {
                $key = Get-ConstantString $pair.Item1
                $value = Get-ConstantString $pair.Item2
                if ($key -match '(?i)password' -and -not [string]::IsNullOrEmpty($value)) { return $true }
            }
            return $false
        }
        $entries | ForEach-Object { $_.Extent.Text } | Should -BeNullOrEmpty
    }

    It 'is ASCII only (Windows PowerShell 5.1 reads BOM-less files as ANSI)' {
        $bytes = [System.IO.File]::ReadAllBytes($Path)
        @($bytes | Where-Object { $_ -gt 127 }) | Should -HaveCount 0
    }

    It 'uses no syntax that Windows PowerShell 5.1 lacks' {
        $lang = 'System.Management.Automation.Language'
        $bad = Find-Ast $ast {
            param($n)
            $n.GetType().Name -in 'TernaryExpressionAst', 'PipelineChainAst' -or
            ($n -is [System.Management.Automation.Language.BinaryExpressionAst] -and "$($n.Operator)" -eq 'QuestionQuestion') -or
            ($n -is [System.Management.Automation.Language.AssignmentStatementAst] -and "$($n.Operator)" -eq 'QuestionQuestionEquals') -or
            ($n -is [System.Management.Automation.Language.MemberExpressionAst] -and $n.NullConditional) -or
            ($n -is [System.Management.Automation.Language.IndexExpressionAst] -and $n.NullConditional)
        }
        $bad | ForEach-Object { $_.Extent.Text } | Should -BeNullOrEmpty
        $commands = Find-Ast $ast { param($n) $n -is [System.Management.Automation.Language.CommandAst] }
        foreach ($command in $commands) {
            $name = $command.GetCommandName()
            $params = @($command.CommandElements | Where-Object { $_ -is [System.Management.Automation.Language.CommandParameterAst] } | ForEach-Object { $_.ParameterName })
            $positional = @($command.CommandElements | Select-Object -Skip 1 | Where-Object { $_ -isnot [System.Management.Automation.Language.CommandParameterAst] }).Count
            if ($name -eq 'Join-Path') {
                $params | Should -Not -Contain 'AdditionalChildPath'
                $positional | Should -BeLessOrEqual 2 -Because "$($command.Extent.Text): Join-Path takes one child path on 5.1"
            }
            if ($name -eq 'ConvertFrom-Json') { $params | Should -Not -Contain 'AsHashtable' }
            if ($name -in 'ForEach-Object', '%') { $params | Should -Not -Contain 'Parallel' }
        }
    }
}

Describe 'guest script <Name> header' -ForEach $scriptFiles {
    It 'declares #Requires -Version 5.1 and documents itself' {
        $text = Get-Content -LiteralPath $Path -Raw
        $text | Should -Match '(?m)^#Requires -Version 5\.1'
        $help = Get-Help $Path -Full
        $help.Synopsis | Should -Not -BeNullOrEmpty
        ($help.Parameters.Parameter | Where-Object { $_.Name -eq 'ConfigPath' }) | Should -Not -BeNullOrEmpty
    }
}

Describe 'settings and steps agree across the scripts' {
    BeforeAll {
        $script:catalog = @(Get-StepCatalog)
        $script:schema = @(Get-SettingSchema)
        $script:provisionAst = Get-Ast (Join-Path $GuestDir 'provision.ps1')
        $script:checkAst = Get-Ast (Join-Path $GuestDir 'check.ps1')
        $script:commonAst = Get-Ast (Join-Path $GuestDir 'common.psm1')
    }

    It 'provision.ps1 declares exactly the catalogue steps, in order' {
        $names = Find-Ast $provisionAst {
            param($n) $n -is [System.Management.Automation.Language.CommandAst] -and $n.GetCommandName() -eq 'New-ProvisionStep'
        } | ForEach-Object {
            $elements = $_.CommandElements
            for ($i = 1; $i -lt $elements.Count - 1; $i++) {
                if ($elements[$i] -is [System.Management.Automation.Language.CommandParameterAst] -and $elements[$i].ParameterName -eq 'Name') { $elements[$i + 1].Value }
            }
        }
        $names | Should -Be @($catalog.Name)
    }

    It 'check.ps1 has a check for exactly the catalogue steps' {
        $checks = Find-Ast $checkAst {
            param($n)
            $n -is [System.Management.Automation.Language.AssignmentStatementAst] -and "$($n.Left)" -eq '$checks'
        }
        $checks | Should -HaveCount 1
        $hashtable = Find-Ast $checks[0] { param($n) $n -is [System.Management.Automation.Language.HashtableAst] } | Select-Object -First 1
        $keys = @($hashtable.KeyValuePairs | ForEach-Object { $_.Item1.Value })
        $keys | Should -Be @($catalog.Name)
    }

    It 'each step but remove-answer-files is switched by a boolean setting, and each boolean setting switches a step' {
        $bools = @($schema | Where-Object { $_.Type -eq 'bool' } | ForEach-Object { $_.Key })
        @($catalog | Where-Object { $null -ne $_.Switch } | ForEach-Object { $_.Switch } | Sort-Object) | Should -Be @($bools | Sort-Object)
    }

    It 'remove-answer-files has no switch and comes last, after every step that could need Setup''s files' {
        @($catalog | Where-Object { $null -eq $_.Switch } | ForEach-Object { $_.Name }) | Should -Be @('remove-answer-files')
        $catalog[-1].Name | Should -Be 'remove-answer-files'
        # provision.ps1 turns it on unconditionally.
        $step = Find-Ast $provisionAst {
            param($n) $n -is [System.Management.Automation.Language.CommandAst] -and $n.GetCommandName() -eq 'New-ProvisionStep' -and $n.Extent.Text -match "-Name 'remove-answer-files'"
        }
        $step | Should -HaveCount 1
        $step[0].Extent.Text | Should -Match '-Enabled \$true '
    }

    It 'every setting is used by provision.ps1 or common.psm1' {
        $used = @(
            foreach ($tree in $provisionAst, $commonAst) {
                Find-Ast $tree { param($n) $n -is [System.Management.Automation.Language.MemberExpressionAst] } |
                    ForEach-Object { "$($_.Member)" }
                Find-Ast $tree { param($n) $n -is [System.Management.Automation.Language.StringConstantExpressionAst] } |
                    ForEach-Object { $_.Value }
            }
        )
        foreach ($entry in $schema) {
            $used | Should -Contain $entry.Key -Because "setting '$($entry.Key)' must do something"
        }
    }

    It 'no default names a user or holds a password or URL' {
        foreach ($entry in $schema | Where-Object { $_.Type -in 'username', 'secret', 'url', 'sha256' }) {
            $entry.Default | Should -BeNullOrEmpty -Because "'$($entry.Key)' must come from the settings file"
        }
    }

    It 'both scripts use the shared registry list, so the check reads what provisioning writes' {
        foreach ($tree in $provisionAst, $checkAst) {
            @(Find-Ast $tree {
                    param($n) $n -is [System.Management.Automation.Language.CommandAst] -and $n.GetCommandName() -eq 'Get-DesiredRegistryValues'
                }).Count | Should -BeGreaterThan 0
        }
        # No registry path is hard-coded in the scripts themselves.
        foreach ($name in 'provision.ps1', 'check.ps1') {
            Get-Content -LiteralPath (Join-Path $GuestDir $name) -Raw | Should -Not -Match 'HKLM:'
        }
    }
}
