import { expect } from "chai";
import * as fs from "fs";
import * as os from "os";
import * as path from "path";
import {
  AnswerFileInput,
  CONFIG_MEDIA_MARKER,
  DEFAULT_DRIVER_NAMES,
  authorizedKeysFile,
  firstLogonCommands,
  renderAnswerFile,
} from "../../infra/answerFile";
import { GUEST_CHECK_FILES, GUEST_PROVISION_SCRIPT, SOFTWARE_REPORT_TAG } from "../../infra/pipeline/guest";
import { sha256File } from "../support/disk";
import { repoRoot, run, runScript } from "../support/run";

const SCRIPT = "build-config-iso.sh";
const FIRSTLOGON = path.join(repoRoot, "provisioning", "windows", "firstlogon.ps1");
const PASSWORD = "iso-test-pw-5521<&>";
const KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHRlc3Qta2V5LWZvci1jb25maWctaXNvLXRlc3Rz test@config-iso";

const answerInput: AnswerFileInput = {
  sourceKind: "iso",
  adminUser: "gopher",
  adminPassword: PASSWORD,
  locale: "en-US",
  timeZone: "UTC",
  windowsEdition: "Windows 11 Pro",
  authorizedKey: KEY,
  driverFolder: "w11",
  driverNames: [...DEFAULT_DRIVER_NAMES],
  configMediaLabel: "WINCONFIG",
};

/** Files in the ISO as Windows sees them (the Joliet tree). */
async function isoFiles(iso: string): Promise<string[]> {
  const r = await run("xorriso", ["-read_fs", "norock", "-indev", iso, "-find", "/", "-type", "f"]);
  expect(r.code, r.stderr).to.equal(0);
  return r.stdout
    .split("\n")
    .filter((l) => l.startsWith("'"))
    .map((l) => l.replace(/^'\//, "").replace(/'$/, ""))
    .sort();
}

async function isoLabel(iso: string): Promise<string> {
  const r = await run("xorriso", ["-indev", iso, "-pvd_info"]);
  expect(r.code, r.stderr).to.equal(0);
  const m = /^Volume Id\s*:\s*(.*)$/m.exec(r.stdout + r.stderr);
  expect(m, "Volume Id line").to.not.equal(null);
  return m![1].trim();
}

async function isoRead(iso: string, inner: string, dir: string): Promise<string> {
  const dest = path.join(dir, `extract-${Math.random().toString(36).slice(2)}`);
  const r = await run("xorriso", ["-osirrox", "on", "-indev", iso, "-extract", inner, dest]);
  expect(r.code, r.stderr).to.equal(0);
  const text = fs.readFileSync(dest, "utf8");
  fs.chmodSync(dest, 0o600);
  return text;
}

function mode(file: string): number {
  return fs.statSync(file).mode & 0o777;
}

describe("build-config-iso.sh", function () {
  this.timeout(120000);
  let dir: string;
  let answer: string;
  let keys: string;
  let driverDir: string;
  let virtioIso: string;

  before(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), "config-iso-test-"));
    answer = path.join(dir, "answer.xml");
    fs.writeFileSync(answer, renderAnswerFile(answerInput));
    keys = path.join(dir, "authorized_keys");
    fs.writeFileSync(keys, authorizedKeysFile(answerInput));
    driverDir = path.join(dir, "extra-driver");
    fs.mkdirSync(path.join(driverDir, "sub"), { recursive: true });
    fs.writeFileSync(path.join(driverDir, "extra.inf"), "[Version]\n");
    fs.writeFileSync(path.join(driverDir, "sub", "extra.sys"), "sys");
    // A small stand-in for the virtio-win ISO: <driver>/<folder>/ARM64 trees.
    const tree = path.join(dir, "virtio-tree");
    for (const drv of ["viostor", "vioscsi", "NetKVM"]) {
      for (const folder of ["w10", "w11"]) {
        const d = path.join(tree, drv, folder, "ARM64");
        fs.mkdirSync(d, { recursive: true });
        fs.writeFileSync(path.join(d, `${drv.toLowerCase()}.inf`), `${drv} ${folder}\n`);
      }
      fs.mkdirSync(path.join(tree, drv, "w11", "amd64"), { recursive: true });
      fs.writeFileSync(path.join(tree, drv, "w11", "amd64", "x64.inf"), "x64\n");
    }
    virtioIso = path.join(dir, "virtio-win.iso");
    const r = await run("xorriso", ["-as", "mkisofs", "-V", "virtio-win-test", "-J", "-r", "-o", virtioIso, tree]);
    expect(r.code, r.stderr).to.equal(0);
  });

  after(() => {
    fs.rmSync(dir, { recursive: true, force: true });
  });

  const args = (out: string) => [
    out,
    `${answer}=autounattend.xml`,
    keys,
    FIRSTLOGON,
    `${driverDir}=$WinPEDriver$/extra`,
  ];

  it("builds the ISO with the files at their places, the label and the marker", async () => {
    const out = path.join(dir, "out", "config.iso");
    const r = await runScript(SCRIPT, args(out));
    expect(r.code, r.stderr).to.equal(0);
    expect(await isoFiles(out)).to.deep.equal(
      [
        "$WinPEDriver$/extra/extra.inf",
        "$WinPEDriver$/extra/sub/extra.sys",
        "authorized_keys",
        "autounattend.xml",
        "firstlogon.ps1",
        CONFIG_MEDIA_MARKER,
      ].sort(),
    );
    expect(await isoLabel(out)).to.equal("WINCONFIG");
    expect(await isoRead(out, "/autounattend.xml", dir)).to.equal(fs.readFileSync(answer, "utf8"));
    expect(await isoRead(out, "/authorized_keys", dir)).to.equal(KEY + "\n");
    expect(mode(out)).to.equal(0o600);
    expect(mode(`${out}.stamp`)).to.equal(0o600);
    expect(r.stdout + r.stderr).to.not.contain(PASSWORD);
    expect(r.stdout + r.stderr).to.not.contain("AAAAC3Nza");
  });

  it("reads the answer file from stdin ('-=autounattend.xml'), and leaves only the ISO and its stamp", async () => {
    const out = path.join(dir, "stdin", "config.iso");
    const text = fs.readFileSync(answer, "utf8");
    const r = await run("bash", [path.join(repoRoot, "provisioning", SCRIPT), out, "-=autounattend.xml", keys], {
      input: text,
    });
    expect(r.code, r.stderr).to.equal(0);
    expect(await isoRead(out, "/autounattend.xml", dir)).to.equal(text);
    expect(fs.readdirSync(path.dirname(out)).sort()).to.deep.equal(["config.iso", "config.iso.stamp"]);
    const twice = await runScript(SCRIPT, [out, "-=autounattend.xml", "-=unattend.xml"]);
    expect(twice.code).to.equal(1);
    expect(twice.stderr).to.contain("standard input given twice");
    const bare = await runScript(SCRIPT, [out, "-"]);
    expect(bare.code).to.equal(1);
    expect(bare.stderr).to.contain("standard input needs a destination: -=PATH");
  });

  it("does nothing on a rerun with the same inputs", async () => {
    const out = path.join(dir, "rerun", "config.iso");
    expect((await runScript(SCRIPT, args(out))).code).to.equal(0);
    const before = { hash: sha256File(out), mtime: fs.statSync(out).mtimeMs };
    await new Promise((r) => setTimeout(r, 1100));
    const again = await runScript(SCRIPT, args(out));
    expect(again.code, again.stderr).to.equal(0);
    expect(again.stderr).to.contain("up to date");
    expect(sha256File(out)).to.equal(before.hash);
    expect(fs.statSync(out).mtimeMs).to.equal(before.mtime);
  });

  it("rebuilds when an input changes or the ISO was damaged", async () => {
    const out = path.join(dir, "change", "config.iso");
    const k = path.join(dir, "change-keys");
    fs.writeFileSync(k, "ssh-ed25519 AAAAone\n");
    expect((await runScript(SCRIPT, [out, `${k}=authorized_keys`])).code).to.equal(0);
    fs.writeFileSync(k, "ssh-ed25519 AAAAtwo\n");
    const changed = await runScript(SCRIPT, [out, `${k}=authorized_keys`]);
    expect(changed.code, changed.stderr).to.equal(0);
    expect(changed.stderr).to.contain("building");
    expect(await isoRead(out, "/authorized_keys", dir)).to.equal("ssh-ed25519 AAAAtwo\n");
    fs.truncateSync(out, 4096);
    const repaired = await runScript(SCRIPT, [out, `${k}=authorized_keys`]);
    expect(repaired.code, repaired.stderr).to.equal(0);
    expect(repaired.stderr).to.contain("building");
    expect(await isoFiles(out)).to.deep.equal(["authorized_keys", CONFIG_MEDIA_MARKER]);
  });

  it("honours CONFIG_ISO_LABEL", async () => {
    const out = path.join(dir, "label", "config.iso");
    const r = await runScript(SCRIPT, [out, keys], { env: { CONFIG_ISO_LABEL: "CFG_2" } });
    expect(r.code, r.stderr).to.equal(0);
    expect(await isoLabel(out)).to.equal("CFG_2");
  });

  it("copies the WinPE drivers from the virtio-win ISO into $WinPEDriver$", async () => {
    const out = path.join(dir, "drivers", "config.iso");
    const r = await runScript(SCRIPT, [out, `${answer}=autounattend.xml`], {
      env: { CONFIG_ISO_DRIVERS_ISO: virtioIso, CONFIG_ISO_DRIVER_FOLDER: "w10" },
    });
    expect(r.code, r.stderr).to.equal(0);
    expect(await isoFiles(out)).to.deep.equal(
      [
        "$WinPEDriver$/NetKVM/netkvm.inf",
        "$WinPEDriver$/vioscsi/vioscsi.inf",
        "$WinPEDriver$/viostor/viostor.inf",
        "autounattend.xml",
        CONFIG_MEDIA_MARKER,
      ].sort(),
    );
    expect(await isoRead(out, "/$WinPEDriver$/viostor/viostor.inf", dir)).to.equal("viostor w10\n");
  });

  it("names a driver missing from the virtio-win ISO", async () => {
    const out = path.join(dir, "nodriver", "config.iso");
    const r = await runScript(SCRIPT, [out, keys], {
      env: { CONFIG_ISO_DRIVERS_ISO: virtioIso, CONFIG_ISO_WINPE_DRIVERS: "viostor Balloon" },
    });
    expect(r.code).to.equal(1);
    expect(r.stderr).to.contain("/Balloon/w11/ARM64");
    expect(fs.existsSync(out)).to.equal(false);
  });

  it("fails naming a missing input and writes nothing", async () => {
    const out = path.join(dir, "missing", "config.iso");
    const missing = path.join(dir, "no-such-file.xml");
    const r = await runScript(SCRIPT, [out, keys, `${missing}=autounattend.xml`]);
    expect(r.code).to.equal(1);
    expect(r.stderr).to.contain(`build-config-iso: input not found: ${missing}`);
    expect(fs.existsSync(out)).to.equal(false);
  });

  it("rejects destinations that clash, escape the ISO or use the marker name", async () => {
    const out = path.join(dir, "bad", "config.iso");
    const clash = await runScript(SCRIPT, [out, `${keys}=Autounattend.xml`, `${answer}=autounattend.xml`]);
    expect(clash.code).to.equal(1);
    expect(clash.stderr).to.contain("given twice");
    const escape = await runScript(SCRIPT, [out, `${keys}=../x`]);
    expect(escape.code).to.equal(1);
    expect(escape.stderr).to.contain("'..'");
    const marker = await runScript(SCRIPT, [out, `${keys}=${CONFIG_MEDIA_MARKER}`]);
    expect(marker.code).to.equal(1);
    expect(marker.stderr).to.contain("reserved");
    const label = await runScript(SCRIPT, [out, keys], { env: { CONFIG_ISO_LABEL: "much-too-long-label" } });
    expect(label.code).to.equal(1);
    expect(label.stderr).to.contain("CONFIG_ISO_LABEL");
    const usage = await runScript(SCRIPT, [out]);
    expect(usage.code).to.equal(2);
    expect(fs.existsSync(out)).to.equal(false);
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

describe("config media PowerShell", function () {
  this.timeout(60000);
  let pwsh: string;
  before(() => {
    pwsh = findPwsh();
  });

  const parseCheck = `
    $errs = $null
    if ($env:PS_FILE) {
      [void][System.Management.Automation.Language.Parser]::ParseFile($env:PS_FILE, [ref]$null, [ref]$errs)
    } else {
      [void][System.Management.Automation.Language.Parser]::ParseInput($env:PS_SRC, [ref]$null, [ref]$errs)
    }
    if ($errs) { $errs | ForEach-Object { "$($_.Extent.StartLineNumber): $($_.Message)" }; exit 1 }
  `;

  it("firstlogon.ps1 parses", async function () {
    const r = await run(pwsh, ["-NoProfile", "-NonInteractive", "-Command", parseCheck], {
      env: { PS_FILE: FIRSTLOGON },
    });
    expect(r.code, r.stdout + r.stderr).to.equal(0);
  });

  it("the first-logon command lines parse as PowerShell", async function () {
    for (const c of firstLogonCommands(answerInput)) {
      const m = /-Command "(.*)"$/.exec(c.commandLine);
      expect(m, c.commandLine).to.not.equal(null);
      const r = await run(pwsh, ["-NoProfile", "-NonInteractive", "-Command", parseCheck], {
        env: { PS_SRC: m![1] },
      });
      expect(r.code, `command ${c.order}: ${r.stdout}${r.stderr}`).to.equal(0);
    }
  });

  it("firstlogon.ps1 uses the names the answer file and the ISO provide", () => {
    const text = fs.readFileSync(FIRSTLOGON, "utf8");
    for (const s of [
      "'authorized_keys'",
      "'OpenSSH-ARM64.zip'",
      "OpenSSH.Server~~~~0.0.1.0",
      "administrators_authorized_keys",
      "/inheritance:r",
      "*S-1-5-32-544:F",
      "install-sshd.ps1",
      "firstlogon.log",
    ]) {
      expect(text, s).to.contain(s);
    }
  });
});

describe("guest provisioning wrapper (GUEST_PROVISION_SCRIPT) run by pwsh", function () {
  /** The software report the check.ps1 stand-in writes. */
  const REPORT_JSON = '{"reportVersion":1,"windows":{"edition":"Professional","build":"22631.2861"}}';
  this.timeout(60000);
  let pwsh: string;
  let dir: string;
  before(() => {
    pwsh = findPwsh();
  });
  beforeEach(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), "guest-wrapper-"));
  });
  afterEach(() => fs.rmSync(dir, { recursive: true, force: true }));

  /**
   * Runs the wrapper with stand-ins for icacls.exe and powershell.exe (which log
   * their calls and whether settings.json had content), config media mounted as
   * a PowerShell drive, and ProgramData in the temp folder.
   */
  async function runWrapper(provisionExit: number, withMedia = true, writeReport = true) {
    const bin = path.join(dir, "bin");
    const media = path.join(dir, "media");
    const data = path.join(dir, "ProgramData");
    fs.mkdirSync(bin);
    fs.mkdirSync(media);
    fs.mkdirSync(data);
    if (withMedia) fs.writeFileSync(path.join(media, "windows-arm64-image.marker"), "");
    // The check's files on the media (the wrapper keeps them for the smoke test).
    for (const f of GUEST_CHECK_FILES) fs.writeFileSync(path.join(media, f), `# ${f} stand-in\n`);
    const calls = path.join(dir, "calls");
    fs.writeFileSync(path.join(bin, "icacls.exe"), `#!/bin/sh\necho "icacls size=$(wc -c <"$1")" >>'${calls}'\n`, {
      mode: 0o755,
    });
    fs.writeFileSync(
      path.join(bin, "powershell.exe"),
      [
        "#!/bin/sh",
        `cfg=""; rep=""; while [ $# -gt 0 ]; do [ "$1" = -ConfigPath ] && cfg=$2; [ "$1" = -ReportPath ] && rep=$2; [ "$1" = -File ] && f=$(basename "$2"); shift; done`,
        `echo "$f settings=$(cat "$cfg" | tr -d '\\r\\n')\${rep:+ report=$(basename "$rep")}" >>'${calls}'`,
        // check.ps1 writes the software report where -ReportPath says.
        writeReport ? `[ -n "$rep" ] && printf '%s' '${REPORT_JSON}' >"$rep"` : ":",
        `echo "stderr noise from $f" >&2`,
        `[ "$f" = provision.ps1 ] && exit ${provisionExit}`,
        "exit 0",
      ].join("\n") + "\n",
      { mode: 0o755 },
    );
    const driver = `New-PSDrive -Name CFG -PSProvider FileSystem -Root '${media}' | Out-Null; & ([scriptblock]::Create($env:WRAPPER))`;
    const r = await run(pwsh, ["-NoProfile", "-NonInteractive", "-Command", driver], {
      env: { PATH: `${bin}:${process.env.PATH}`, ProgramData: data, WRAPPER: GUEST_PROVISION_SCRIPT },
      input: '{"disableUac":true}',
    });
    const log = fs.existsSync(calls) ? fs.readFileSync(calls, "utf8").trim().split("\n") : [];
    const left = fs.existsSync(path.join(data, "windows-arm64-image", "settings.json"));
    const keep = path.join(data, "windows-arm64-image", "check");
    const kept = fs.existsSync(keep) ? fs.readdirSync(keep).sort() : [];
    return { r, log, left, kept };
  }

  it("restricts settings.json before writing it, runs provision then check, and removes it", async () => {
    const { r, log, left, kept } = await runWrapper(0);
    expect(r.code, r.stdout + r.stderr).to.equal(0);
    expect(kept, "the check's files kept for the smoke test").to.deep.equal([...GUEST_CHECK_FILES].sort());
    expect(log).to.deep.equal([
      "icacls size=0",
      'provision.ps1 settings={"disableUac":true}',
      'check.ps1 settings={"disableUac":true} report=software-report.json',
    ]);
    expect(left, "settings.json removed").to.equal(false);
    // The report check.ps1 wrote goes to the host as one tagged base64 line on stdout.
    const b64 = Buffer.from(REPORT_JSON).toString("base64");
    expect(r.stdout.split(/\r?\n/)).to.include(`${SOFTWARE_REPORT_TAG}${b64}`);
  });

  it("exits 6 naming the file when check.ps1 wrote no software report", async () => {
    const { r, log, left } = await runWrapper(0, true, false);
    expect(r.code, r.stdout + r.stderr).to.equal(6);
    expect(r.stderr).to.contain("provision: check.ps1 wrote no software report (");
    expect(log.some((l) => l.startsWith("check.ps1"))).to.equal(true);
    expect(r.stdout).to.not.contain(SOFTWARE_REPORT_TAG);
    expect(left).to.equal(false);
  });

  it("exits with provision.ps1's code and says so on stderr (its stderr noise is not fatal)", async () => {
    const { r, log, left } = await runWrapper(7);
    expect(r.code).to.equal(7);
    expect(r.stderr).to.contain("provision: provision.ps1 failed with exit code 7");
    expect(log.some((l) => l.startsWith("check.ps1"))).to.equal(false);
    expect(left).to.equal(false);
  });

  it("exits 3 naming the marker when the config media is not attached", async () => {
    const { r, log } = await runWrapper(0, false);
    expect(r.code).to.equal(3);
    expect(r.stderr).to.contain("provision: the config media (windows-arm64-image.marker) is not attached");
    expect(log).to.deep.equal([]);
  });
});
