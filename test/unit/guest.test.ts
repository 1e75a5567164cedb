/**
 * What the provisioning stage sends to Windows (infra/pipeline/guest.ts): the
 * settings keys, that every key is one the guest scripts know, and that the
 * settings JSON arrives as UTF-8 whatever the guest console's code page: the
 * wrapper's stdin decoding is run by pwsh with a code-page-437 console, as
 * Windows PowerShell 5.1 has on an en-US Windows.
 */
import { expect } from "chai";
import { spawnSync } from "child_process";
import * as fs from "fs";
import * as os from "os";
import * as path from "path";
import { parseConfig, RawConfig, StackConfig } from "../../infra/config";
import {
  GUEST_CHECK_FILES,
  GUEST_PROVISION_SCRIPT,
  GUEST_READ_STDIN_UTF8,
  GUEST_SMOKE_CHECK_SCRIPT,
  guestProvisionCommand,
  guestSmokeCheckCommand,
  guestSettings,
  SOFTWARE_REPORT_TAG,
} from "../../infra/pipeline/guest";
import { VALID_RAW } from "../support/config";
import { repoRoot } from "../support/run";

const RAW: RawConfig = VALID_RAW;

const WITH_BUILDLET_AND_VS: RawConfig = {
  ...RAW,
  guestInstallBuildlet: "true",
  buildletStage0Url: "https://example.com/stage0.exe",
  buildletStage0Sha256: "d".repeat(64),
  buildletEnv: "host-windows11-arm64-azure",
  guestInstallVsBuildTools: "true",
  vsBuildToolsUrl: "https://example.com/vs_BuildTools.exe",
  vsBuildToolsSha256: "e".repeat(64),
  vsVersion: "2026",
};

/** The setting keys common.psm1 declares (its schema refuses any other key). */
function guestSchemaKeys(): string[] {
  const text = fs.readFileSync(path.join(repoRoot, "provisioning", "windows", "common.psm1"), "utf8");
  const schema = text.slice(text.indexOf("$script:SettingSchema = @("), text.indexOf("$script:StepCatalog"));
  return [...schema.matchAll(/@\{ Key = '([A-Za-z0-9]+)'/g)].map((m) => m[1]);
}

describe("guest settings", () => {
  it("carry GO_BUILDER_ENV (buildletEnv) and the VS version to the guest", () => {
    const s = guestSettings(parseConfig(WITH_BUILDLET_AND_VS), "Pw-1");
    expect(s).to.include({
      installBuildlet: true,
      buildletEnv: "host-windows11-arm64-azure",
      installVsBuildTools: true,
      vsVersion: "2026",
    });
  });

  it("send buildletEnv as null without a buildlet, and the default VS version", () => {
    const s = guestSettings(parseConfig(RAW), "Pw-1");
    expect(s.installBuildlet).to.equal(false);
    expect(s.buildletEnv).to.equal(null);
    expect(s.vsVersion).to.equal("2022");
  });

  it("use only keys the guest scripts know (common.psm1 refuses unknown ones)", () => {
    const known = guestSchemaKeys();
    expect(known).to.include.members(["buildletEnv", "vsVersion", "builderPassword"]);
    for (const c of [RAW, WITH_BUILDLET_AND_VS]) {
      expect(known).to.include.members(Object.keys(guestSettings(parseConfig(c), "Pw-1")));
    }
  });

  it("are JSON whose non-ASCII characters become UTF-8 bytes on stdin", () => {
    const c = parseConfig(RAW);
    const json = JSON.stringify(guestSettings(c, "caf\u00e9-\u00fc"));
    // The command provider writes the stdin string as UTF-8, as Node does here.
    const bytes = Buffer.from(json, "utf8");
    expect(bytes.includes(Buffer.from([0x63, 0x61, 0x66, 0xc3, 0xa9, 0x2d, 0xc3, 0xbc]))).to.equal(true);
    expect(JSON.parse(bytes.toString("utf8")).builderPassword).to.equal("caf\u00e9-\u00fc");
  });

  it("hold the password as data, never in the command", () => {
    const s = guestSettings(parseConfig(WITH_BUILDLET_AND_VS), "Secret-Pw1!");
    expect(s).to.include({ builderUser: "gopher", builderPassword: "Secret-Pw1!" });
    expect(guestProvisionCommand()).to.not.contain("Secret-Pw1!");
  });

  it("go with powershell -EncodedCommand of the wrapper (UTF-16LE base64), for cmd.exe as the SSH shell", () => {
    const m = /^powershell -NoProfile -NonInteractive -ExecutionPolicy Bypass -EncodedCommand (\S+)$/.exec(
      guestProvisionCommand(),
    );
    expect(m).to.not.equal(null);
    expect(Buffer.from((m as RegExpExecArray)[1], "base64").toString("utf16le")).to.equal(GUEST_PROVISION_SCRIPT);
  });

  it("the wrapper has check.ps1 write the software report and sends it as the one tagged line guest-run.sh saves", () => {
    expect(GUEST_PROVISION_SCRIPT).to.contain("$report = Join-Path $dir 'software-report.json'");
    expect(GUEST_PROVISION_SCRIPT).to.match(/check\.ps1'\) -ConfigPath \$cfg -ReportPath \$report\n/);
    const send = `[Console]::Out.WriteLine('${SOFTWARE_REPORT_TAG}' + [Convert]::ToBase64String([IO.File]::ReadAllBytes($report)))`;
    // Only once the check passed.
    const lines = GUEST_PROVISION_SCRIPT.split("\n").map((l) => l.trim());
    expect(lines.indexOf(send)).to.be.above(lines.findIndex((l) => l.includes("check.ps1 found settings")));
    // guest-run.sh looks for the same tag.
    const guestRun = fs.readFileSync(path.join(repoRoot, "provisioning/guest-run.sh"), "utf8");
    expect(guestRun).to.contain(`readonly REPORT_TAG="${SOFTWARE_REPORT_TAG}"`);
  });

  it("the wrapper reads stdin as bytes and decodes UTF-8, not through [Console]::In", () => {
    expect(GUEST_PROVISION_SCRIPT).to.contain(GUEST_READ_STDIN_UTF8.join("\n"));
    expect(GUEST_PROVISION_SCRIPT).to.not.contain("[Console]::In.");
    expect(GUEST_PROVISION_SCRIPT).to.contain("UTF8Encoding($false)");
  });
});

/** pwsh from PATH or the .NET global tool folder; fails (never skips) when scripts/setup.sh has not installed it. */
function findPwsh(): string {
  const candidates = [
    ...(process.env.PATH ?? "").split(path.delimiter).map((d) => path.join(d, "pwsh")),
    path.join(os.homedir(), ".dotnet", "tools", "pwsh"),
  ];
  const found = candidates.find((c) => fs.existsSync(c));
  if (!found) throw new Error("pwsh not found on PATH or in ~/.dotnet/tools: run bash scripts/setup.sh");
  return found;
}

/** Runs PowerShell `script` in pwsh with an OEM (code page 437) console input encoding, `input` as stdin bytes. */
function pwshWithOemConsole(script: string, input: Buffer, env: NodeJS.ProcessEnv = {}) {
  const driver = [
    "$ErrorActionPreference = 'Stop'",
    "[Console]::InputEncoding = [Text.Encoding]::GetEncoding(437)",
    "if ([Console]::InputEncoding.CodePage -ne 437) { throw 'the console input encoding is not code page 437' }",
    "& ([scriptblock]::Create($env:GUEST_TEST_SCRIPT))",
  ].join("\n");
  const r = spawnSync(findPwsh(), ["-NoLogo", "-NoProfile", "-NonInteractive", "-Command", driver], {
    input,
    env: { ...process.env, ...env, GUEST_TEST_SCRIPT: script },
    timeout: 120000,
  });
  return { code: r.status, stdout: r.stdout.toString("utf8"), stderr: r.stderr.toString("utf8") };
}

/** The characters of $json as UTF-16 code units in hex, so the console's output encoding cannot blur them. */
const SHOW_JSON = "($json.ToCharArray() | ForEach-Object { '{0:x4}' -f [int]$_ }) -join ' '";
const codeUnits = (s: string) => [...s].map((ch) => ch.charCodeAt(0).toString(16).padStart(4, "0")).join(" ");

describe("guest settings over stdin, decoded by pwsh with an OEM console", function () {
  this.timeout(180000);
  let dir: string;
  beforeEach(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), "guest-utf8-"));
  });
  afterEach(() => fs.rmSync(dir, { recursive: true, force: true }));

  const value = '{"builderUser":"j\u00fcrgen","builderPassword":"caf\u00e9-\u00fc\u20ac"}';

  it("GUEST_READ_STDIN_UTF8 gets every character back (and [Console]::In would not)", () => {
    const bytes = Buffer.from(value, "utf8");
    const ours = pwshWithOemConsole([...GUEST_READ_STDIN_UTF8, SHOW_JSON].join("\n"), bytes);
    expect(ours.code, ours.stderr).to.equal(0);
    expect(ours.stdout.trim()).to.equal(codeUnits(value));
    // The console path garbles the same bytes under this code page: the setup is the one that bites.
    const consoleIn = pwshWithOemConsole(["$json = [Console]::In.ReadToEnd()", SHOW_JSON].join("\n"), bytes);
    expect(consoleIn.code, consoleIn.stderr).to.equal(0);
    expect(consoleIn.stdout.trim()).to.not.equal(codeUnits(value));
  });

  it("drops a UTF-8 byte order mark", () => {
    const bytes = Buffer.concat([Buffer.from([0xef, 0xbb, 0xbf]), Buffer.from(value, "utf8")]);
    const r = pwshWithOemConsole([...GUEST_READ_STDIN_UTF8, SHOW_JSON].join("\n"), bytes);
    expect(r.code, r.stderr).to.equal(0);
    expect(r.stdout.trim()).to.equal(codeUnits(value));
  });

  it("the whole wrapper hands provision.ps1 the settings file in UTF-8, non-ASCII values intact", () => {
    // Stand-ins for icacls.exe and powershell.exe (which keeps a copy of the settings file it is given),
    // the config media as a PowerShell drive, ProgramData in the temp folder.
    const bin = path.join(dir, "bin");
    const media = path.join(dir, "media");
    const data = path.join(dir, "ProgramData");
    for (const d of [bin, media, data]) fs.mkdirSync(d);
    fs.writeFileSync(path.join(media, "windows-arm64-image.marker"), "");
    fs.writeFileSync(path.join(media, "check.ps1"), "# check.ps1 from the media\n");
    fs.writeFileSync(path.join(media, "common.psm1"), "# common.psm1 from the media\n");
    const seen = path.join(dir, "seen.json");
    fs.writeFileSync(path.join(bin, "icacls.exe"), "#!/bin/sh\nexit 0\n", { mode: 0o755 });
    fs.writeFileSync(
      path.join(bin, "powershell.exe"),
      [
        "#!/bin/sh",
        `cfg=""; f=""; rp=""; while [ $# -gt 0 ]; do [ "$1" = -ConfigPath ] && cfg=$2; [ "$1" = -ReportPath ] && rp=$2; [ "$1" = -File ] && f=$(basename "$2"); shift; done`,
        `[ "$f" = provision.ps1 ] && cp "$cfg" '${seen}'`,
        `[ "$f" = check.ps1 ] && [ -z "$NO_REPORT" ] && printf '{"reportVersion":1}' >"$rp"`,
        "exit 0",
      ].join("\n") + "\n",
      { mode: 0o755 },
    );
    const base = parseConfig(WITH_BUILDLET_AND_VS);
    // Not a user name the stack accepts today (config.ts keeps it ASCII): the transport must not care.
    const c: StackConfig = { ...base, guest: { ...base.guest, adminUser: "j\u00fcrgen" } };
    const settings = guestSettings(c, "caf\u00e9-\u00fc\u20ac-Pw1");
    const script = `New-PSDrive -Name CFG -PSProvider FileSystem -Root '${media}' | Out-Null\n${GUEST_PROVISION_SCRIPT}`;
    const r = pwshWithOemConsole(script, Buffer.from(JSON.stringify(settings), "utf8"), {
      PATH: `${bin}:${process.env.PATH}`,
      ProgramData: data,
    });
    expect(r.code, r.stdout + r.stderr).to.equal(0);
    const written = fs.readFileSync(seen);
    expect(written.subarray(0, 3).equals(Buffer.from([0xef, 0xbb, 0xbf])), "no byte order mark").to.equal(false);
    expect(JSON.parse(written.toString("utf8"))).to.deep.equal(settings);
    expect(fs.existsSync(path.join(data, "windows-arm64-image", "settings.json")), "settings.json removed").to.equal(
      false,
    );
    // The check scripts stay in the image for the smoke test.
    for (const f of GUEST_CHECK_FILES) {
      expect(fs.readFileSync(path.join(data, "windows-arm64-image", "check", f), "utf8")).to.equal(
        `# ${f} from the media\n`,
      );
    }
    // The report check.ps1 wrote, as the one tagged line on stdout.
    expect(r.stdout).to.contain(`${SOFTWARE_REPORT_TAG}${Buffer.from('{"reportVersion":1}').toString("base64")}`);
    // A check that passed but wrote no report fails the run.
    fs.rmSync(path.join(data, "windows-arm64-image", "software-report.json"));
    const none = pwshWithOemConsole(script, Buffer.from(JSON.stringify(settings), "utf8"), {
      PATH: `${bin}:${process.env.PATH}`,
      ProgramData: data,
      NO_REPORT: "1",
    });
    expect(none.code, none.stdout + none.stderr).to.equal(6);
    expect(none.stderr).to.contain("provision: check.ps1 wrote no software report");
  });
  it("the smoke check runs the kept check.ps1 with the settings (UTF-8), deletes them, and exits with its code", () => {
    const bin = path.join(dir, "bin");
    const data = path.join(dir, "ProgramData");
    const kept = path.join(data, "windows-arm64-image", "check");
    for (const d of [bin, kept]) fs.mkdirSync(d, { recursive: true });
    const seen = path.join(dir, "seen.json");
    fs.writeFileSync(path.join(bin, "icacls.exe"), "#!/bin/sh\nexit 0\n", { mode: 0o755 });
    fs.writeFileSync(
      path.join(bin, "powershell.exe"),
      [
        "#!/bin/sh",
        `cfg=""; f=""; while [ $# -gt 0 ]; do [ "$1" = -ConfigPath ] && cfg=$2; [ "$1" = -File ] && f=$2; shift; done`,
        `[ "$f" = '${path.join(kept, "check.ps1")}' ] || { echo "ran $f" >&2; exit 9; }`,
        `cp "$cfg" '${seen}'; echo 'Step | Setting | Result'; exit "\${CHECK_EXIT:-0}"`,
      ].join("\n") + "\n",
      { mode: 0o755 },
    );
    const env = { PATH: `${bin}:${process.env.PATH}`, ProgramData: data };
    const settings = '{"builderUser":"j\u00fcrgen","builderPassword":"caf\u00e9-Pw1"}';
    const missing = pwshWithOemConsole(GUEST_SMOKE_CHECK_SCRIPT, Buffer.from(settings, "utf8"), env);
    expect(missing.code).to.equal(3);
    expect(missing.stderr).to.include("check.ps1 is not in the image: the guest provisioning keeps it there");
    fs.writeFileSync(path.join(kept, "check.ps1"), "# kept\n");
    const ok = pwshWithOemConsole(GUEST_SMOKE_CHECK_SCRIPT, Buffer.from(settings, "utf8"), env);
    expect(ok.code, ok.stdout + ok.stderr).to.equal(0);
    expect(ok.stdout).to.include("Step | Setting | Result");
    expect(fs.readFileSync(seen, "utf8")).to.equal(settings);
    expect(fs.existsSync(path.join(data, "windows-arm64-image", "smoke-settings.json"))).to.equal(false);
    const failed = pwshWithOemConsole(GUEST_SMOKE_CHECK_SCRIPT, Buffer.from(settings, "utf8"), {
      ...env,
      CHECK_EXIT: "1",
    });
    expect(failed.code).to.equal(1);
    expect(failed.stderr).to.include("smoke-check: check.ps1 found settings that are not as configured (exit 1)");
    expect(fs.existsSync(path.join(data, "windows-arm64-image", "smoke-settings.json"))).to.equal(false);
    expect(guestSmokeCheckCommand()).to.equal(
      `powershell -NoProfile -NonInteractive -ExecutionPolicy Bypass -EncodedCommand ${Buffer.from(GUEST_SMOKE_CHECK_SCRIPT, "utf16le").toString("base64")}`,
    );
  });
});
