import { expect } from "chai";
import { ChildProcess, spawn } from "child_process";
import * as fs from "fs";
import * as net from "net";
import * as os from "os";
import * as path from "path";
import { pathWithout, repoRoot, run, runScript } from "../support/run";

const UNIT = path.join(repoRoot, "assets", "windows-vm.service");
const LAUNCHER = path.join(repoRoot, "provisioning", "run-vm.sh");
const ADMIN_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAdminAdminAdminAdminAdminAdminAdminAdmin00 admin@example";

describe("prepare-ami.sh", function () {
  this.timeout(60000);
  let dir: string;
  let root: string;
  let envFile: string;

  beforeEach(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), "ami-"));
    root = path.join(dir, "root");
    const mk = (p: string, content = "", mode = 0o644) => {
      const f = path.join(root, p);
      fs.mkdirSync(path.dirname(f), { recursive: true });
      fs.writeFileSync(f, content);
      fs.chmodSync(f, mode);
    };
    mk("etc/ssh/ssh_host_ed25519_key", "private", 0o600);
    mk("etc/ssh/ssh_host_ed25519_key.pub", "public");
    mk("etc/ssh/ssh_host_rsa_key", "private", 0o600);
    mk("etc/ssh/sshd_config", "PermitRootLogin no\n");
    mk("etc/machine-id", "0123456789abcdef0123456789abcdef\n", 0o444);
    mk("home/ubuntu/.ssh/authorized_keys", `${ADMIN_KEY}\n`, 0o600);
    mk("var/lib/cloud/instances/i-0123/user-data.txt", "the bake instance's user data");
    mk("var/lib/cloud/instances/i-0123/cloud-config.txt", "the bake instance's cloud-config");
    mk("var/lib/cloud/seed/nocloud/meta-data", "seed");
    mk("var/lib/cloud/seed/nocloud/user-data", "seeded user data");
    mk("var/log/cloud-init.log", "log");
    mk("var/log/journal/0123456789abcdef/system.journal", "journal");
    mk("srv/vm/config.iso", "answer file with passwords");
    mk("srv/vm/config/autounattend.xml", "<Password>secret</Password>", 0o600);
    mk("srv/vm/disk.qcow2", "disk");
    envFile = path.join(dir, "vm.env");
    fs.writeFileSync(envFile, "# image settings\nVM_DIR=/srv/vm\nVM_CPUS=4\nVM_MEMORY_GIB=24\nVM_HALT_ON_EXIT=0\n");
  });
  afterEach(() => fs.rmSync(dir, { recursive: true, force: true }));

  const file = (p: string) => path.join(root, p);
  const wants = () => file("etc/systemd/system/multi-user.target.wants/windows-vm.service");

  function expectInstalled() {
    const launcher = file("usr/local/lib/windows-vm/run-vm.sh");
    expect(fs.readFileSync(launcher).equals(fs.readFileSync(LAUNCHER))).to.equal(true);
    expect(fs.statSync(launcher).mode & 0o777).to.equal(0o755);
    const proxy = file("usr/local/lib/windows-vm/imds-proxy.py");
    expect(
      fs.readFileSync(proxy).equals(fs.readFileSync(path.join(repoRoot, "provisioning", "imds-proxy.py"))),
    ).to.equal(true);
    expect(fs.statSync(proxy).mode & 0o777).to.equal(0o755);
    expect(fs.readFileSync(file("etc/systemd/system/windows-vm.service")).equals(fs.readFileSync(UNIT))).to.equal(true);
    expect(fs.readlinkSync(wants())).to.equal("/etc/systemd/system/windows-vm.service");
    const env = fs.readFileSync(file("etc/windows-vm/vm.env"), "utf8");
    expect(env).to.contain("VM_DIR=/srv/vm\n");
    expect(env).to.contain("VM_MEMORY_GIB=24\n");
    expect(env.match(/^VM_HALT_ON_EXIT=.*$/gm)).to.deep.equal(["VM_HALT_ON_EXIT=1"]);
    expect(fs.existsSync(file("srv/vm/config.iso"))).to.equal(false);
    expect(fs.existsSync(file("srv/vm/config")), "the answer file's staging folder is gone").to.equal(false);
    expect(fs.existsSync(file("srv/vm/disk.qcow2"))).to.equal(true);
  }

  it("installs launcher, env file and unit, enables the unit and removes the config ISO", async () => {
    const r = await runScript("prepare-ami.sh", [root, envFile]);
    expect(r.code, r.stderr).to.equal(0);
    expect(r.stdout).to.equal("");
    expectInstalled();
    // Not generalized.
    expect(fs.existsSync(file("etc/ssh/ssh_host_ed25519_key"))).to.equal(true);
    expect(fs.existsSync(file("var/lib/cloud/instances/i-0123/user-data.txt"))).to.equal(true);
    expect(fs.existsSync(file("var/log/journal/0123456789abcdef/system.journal"))).to.equal(true);
    expect(fs.readFileSync(file("etc/machine-id"), "utf8")).to.not.equal("");
  });

  it("is idempotent", async () => {
    expect((await runScript("prepare-ami.sh", [root, envFile])).code).to.equal(0);
    const before = fs.statSync(file("etc/windows-vm/vm.env"));
    const r = await runScript("prepare-ami.sh", [root, envFile]);
    expect(r.code, r.stderr).to.equal(0);
    expect(r.stderr.match(/is up to date/g)).to.have.length(4);
    expect(fs.statSync(file("etc/windows-vm/vm.env")).ino).to.equal(before.ino);
    expectInstalled();
  });

  it("refuses an env file that sets VM_CONFIG_ISO, installing nothing", async () => {
    fs.appendFileSync(envFile, "VM_CONFIG_ISO=/srv/vm/config.iso\n");
    const r = await runScript("prepare-ami.sh", [root, envFile]);
    expect(r.code).to.not.equal(0);
    expect(r.stderr).to.match(/sets VM_CONFIG_ISO \(line 6\).*must not ship/);
    expect(fs.existsSync(file("etc/windows-vm"))).to.equal(false);
    expect(fs.existsSync(file("usr/local/lib/windows-vm"))).to.equal(false);
  });

  it("refuses an env file with a line that is not KEY=value", async () => {
    fs.appendFileSync(envFile, "export VM_CPUS=8\n");
    const r = await runScript("prepare-ami.sh", [root, envFile]);
    expect(r.code).to.not.equal(0);
    expect(r.stderr).to.contain("line 6 is not KEY=value");
  });

  it("--generalize removes host keys, cloud-init state with the bake's user data, machine-id and the journal", async () => {
    const r = await runScript("prepare-ami.sh", ["--generalize", root, envFile]);
    expect(r.code, r.stderr).to.equal(0);
    expectInstalled();
    expect(fs.readdirSync(file("etc/ssh"))).to.deep.equal(["sshd_config"]);
    expect(fs.readdirSync(file("var/lib/cloud"))).to.deep.equal(["seed"]);
    // No user data copy stays, even under seed/.
    expect(fs.readdirSync(file("var/lib/cloud/seed/nocloud"))).to.deep.equal(["meta-data"]);
    expect(r.stderr).to.contain("removed 1 user-data/vendor-data file(s) left under /var/lib/cloud");
    expect(fs.existsSync(file("var/log/cloud-init.log"))).to.equal(false);
    expect(fs.readdirSync(file("var/log/journal"))).to.deep.equal([]);
    expect(fs.readFileSync(file("etc/machine-id"), "utf8")).to.equal("");
    // Authorized keys are not the bake's business: no pipeline key reaches a bake instance.
    const home = file("home/ubuntu/.ssh/authorized_keys");
    expect(fs.readFileSync(home, "utf8")).to.equal(`${ADMIN_KEY}\n`);
    expect(fs.statSync(home).mode & 0o777).to.equal(0o600);

    const again = await runScript("prepare-ami.sh", ["--generalize", root, envFile]);
    expect(again.code, again.stderr).to.equal(0);
    expect(again.stderr.match(/is up to date/g)).to.have.length(4);
    expect(again.stderr).to.contain("done (generalized)");
  });

  it("--check validates the env file and prints VM_DIR, changing nothing", async () => {
    const r = await runScript("prepare-ami.sh", ["--check", root, envFile]);
    expect(r.code, r.stderr).to.equal(0);
    expect(r.stdout).to.equal("/srv/vm\n");
    expect(fs.existsSync(file("etc/windows-vm"))).to.equal(false);
    expect(fs.existsSync(file("srv/vm/config.iso"))).to.equal(true);
    fs.writeFileSync(envFile, "VM_CPUS=4\n");
    expect((await runScript("prepare-ami.sh", ["--check", root, envFile])).stdout).to.equal("/var/lib/windows-vm\n");
    fs.writeFileSync(envFile, "VM_DIR=relative/dir\n");
    const bad = await runScript("prepare-ami.sh", ["--check", root, envFile]);
    expect(bad.code).to.equal(1);
    expect(bad.stderr).to.contain("it must be an absolute path");
  });

  it("enables the unit by hand when systemctl is not installed", async () => {
    const bin = pathWithout(["systemctl"], path.join(dir, "bin"));
    const r = await runScript("prepare-ami.sh", [root, envFile], { env: { PATH: bin } });
    expect(r.code, r.stderr).to.equal(0);
    expect(r.stderr).to.contain("systemctl not found");
    expectInstalled();
  });

  it("fails clearly when ROOT is missing", async () => {
    const r = await runScript("prepare-ami.sh", [path.join(dir, "nope"), envFile]);
    expect(r.code).to.not.equal(0);
    expect(r.stderr).to.match(/prepare-ami: error: ROOT .*nope is not a directory/);
  });
});

/** The argv[2] script of ExecStop=/bin/sh -c "...", unescaped the way systemd does. */
function execStopScript(unit: string): string {
  const line = unit.split("\n").find((l) => l.startsWith("ExecStop="));
  if (!line) throw new Error("no ExecStop=");
  const m = /^ExecStop=\/bin\/sh -c "((?:[^"\\]|\\.)*)"$/.exec(line);
  if (!m) throw new Error(`unexpected ExecStop form: ${line}`);
  return m[1].replace(/\\(.)/g, "$1").replace(/\$\$/g, "$").replace(/%%/g, "%");
}

describe("assets/windows-vm.service", function () {
  this.timeout(60000);
  const unit = fs.readFileSync(UNIT, "utf8");

  it("has the expected dependencies, command and install target", () => {
    const lines = unit.split("\n");
    expect(lines).to.include.members([
      "After=network-online.target",
      "Wants=network-online.target",
      "EnvironmentFile=/etc/windows-vm/vm.env",
      "ExecStart=/usr/local/lib/windows-vm/run-vm.sh /etc/windows-vm/vm.env",
      "Restart=no",
      "WantedBy=multi-user.target",
    ]);
    const timeout = /^TimeoutStopSec=(\d+)$/m.exec(unit);
    expect(Number(timeout?.[1])).to.be.at.least(120);
  });

  it("starts the VM wherever the image boots: no condition, no build-host id", async () => {
    expect(unit).to.not.match(/^Exec(Condition|StartPre)=/m);
    expect(unit).to.not.include("build-instance-id");
    const r = await run("bash", [LAUNCHER, "--not-build-host"]);
    expect(r.code).to.equal(2);
    expect(r.stderr).to.include("unknown option '--not-build-host'");
  });

  it("passes systemd-analyze verify", async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), "unit-"));
    try {
      // verify wants ExecStart to exist here: point it at the repository's launcher.
      const copy = path.join(dir, "windows-vm.service");
      fs.writeFileSync(copy, unit.replaceAll("/usr/local/lib/windows-vm/run-vm.sh", LAUNCHER));
      const r = await run("systemd-analyze", ["verify", copy]);
      expect(r.code, r.stderr).to.equal(0);
      expect(r.stderr).to.not.match(/windows-vm\.service:/);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  it("ExecStop sends system_powerdown over QMP and waits for QEMU to exit", async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), "qmp-"));
    const sock = path.join(dir, "qmp.sock");
    // Stands in for QEMU: the main process, ended by the fake QMP server on system_powerdown.
    const main: ChildProcess = spawn("sleep", ["60"], { stdio: "ignore" });
    const received: string[] = [];
    let poweredDownAt = 0;
    const server = net.createServer((c) => {
      c.write('{"QMP": {"version": {}, "capabilities": []}}\r\n');
      let buf = "";
      c.on("data", (d: Buffer) => {
        buf += d.toString();
        let i: number;
        while ((i = buf.indexOf("\n")) >= 0) {
          const msg = JSON.parse(buf.slice(0, i)) as { execute: string };
          buf = buf.slice(i + 1);
          received.push(msg.execute);
          c.write('{"return": {}}\r\n');
          if (msg.execute === "system_powerdown") {
            // The guest takes a moment to shut down.
            setTimeout(() => {
              poweredDownAt = Date.now();
              main.kill("SIGTERM");
            }, 1500);
          }
        }
      });
      c.on("error", () => undefined);
    });
    await new Promise<void>((resolve) => server.listen(sock, resolve));
    try {
      const r = await run("/bin/sh", ["-c", execStopScript(unit)], {
        env: { VM_QMP_SOCKET: sock, MAINPID: String(main.pid) },
        timeoutMs: 30000,
      });
      expect(r.code, r.stderr).to.equal(0);
      expect(received).to.deep.equal(["qmp_capabilities", "system_powerdown"]);
      // It returned only after the main process was gone.
      expect(poweredDownAt).to.be.greaterThan(0);
      expect(main.exitCode !== null || main.signalCode !== null).to.equal(true);
    } finally {
      main.kill("SIGKILL");
      await new Promise<void>((resolve) => server.close(() => resolve()));
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  it("ExecStop returns at once when the VM is not running", async () => {
    const r = await run("/bin/sh", ["-c", execStopScript(unit)], {
      env: { VM_QMP_SOCKET: "/nonexistent/qmp.sock", MAINPID: "" },
      timeoutMs: 10000,
    });
    expect(r.code).to.equal(0);
  });
});
