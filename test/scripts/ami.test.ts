import { expect } from "chai";
import { ChildProcess, spawn } from "child_process";
import * as fs from "fs";
import * as http from "http";
import * as net from "net";
import * as os from "os";
import * as path from "path";
import { pathWithout, repoRoot, run, runScript } from "../support/run";

const UNIT = path.join(repoRoot, "assets", "windows-vm.service");
const LAUNCHER = path.join(repoRoot, "provisioning", "run-vm.sh");
const PIPELINE_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPipelinePipelinePipelinePipelinePipeline0 pulumi-pipeline";
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
    mk("root/.ssh/authorized_keys", `${PIPELINE_KEY}\n`, 0o600);
    mk("home/ubuntu/.ssh/authorized_keys", `${ADMIN_KEY}\nno-pty ${PIPELINE_KEY}\n`, 0o600);
    mk("var/lib/cloud/instances/i-0123/user-data.txt", "secret user data");
    mk("var/lib/cloud/seed/nocloud/meta-data", "seed");
    mk("var/log/cloud-init.log", "log");
    mk("srv/vm/config.iso", "answer file with passwords");
    mk("srv/vm/config/autounattend.xml", "<Password>secret</Password>", 0o600);
    mk("srv/vm/config/authorized_keys", `${PIPELINE_KEY}\n`, 0o600);
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
    expect(fs.readFileSync(file("root/.ssh/authorized_keys"), "utf8")).to.contain(PIPELINE_KEY);
    expect(fs.existsSync(file("var/lib/cloud/instances/i-0123/user-data.txt"))).to.equal(true);
    expect(fs.readFileSync(file("etc/machine-id"), "utf8")).to.not.equal("");
  });

  it("is idempotent", async () => {
    expect((await runScript("prepare-ami.sh", [root, envFile])).code).to.equal(0);
    const before = fs.statSync(file("etc/windows-vm/vm.env"));
    const r = await runScript("prepare-ami.sh", [root, envFile]);
    expect(r.code, r.stderr).to.equal(0);
    expect(r.stderr.match(/is up to date/g)).to.have.length(3);
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

  it("--generalize removes host keys, cloud-init state, machine-id and only the pipeline key", async () => {
    const r = await runScript("prepare-ami.sh", ["--generalize", root, envFile], {
      env: { PIPELINE_PUBLIC_KEY: PIPELINE_KEY },
    });
    expect(r.code, r.stderr).to.equal(0);
    expectInstalled();
    expect(fs.readdirSync(file("etc/ssh"))).to.deep.equal(["sshd_config"]);
    expect(fs.readFileSync(file("root/.ssh/authorized_keys"), "utf8")).to.equal("");
    const home = file("home/ubuntu/.ssh/authorized_keys");
    expect(fs.readFileSync(home, "utf8")).to.equal(`${ADMIN_KEY}\n`);
    expect(fs.statSync(home).mode & 0o777).to.equal(0o600);
    expect(fs.readdirSync(file("var/lib/cloud"))).to.deep.equal(["seed"]);
    expect(fs.existsSync(file("var/log/cloud-init.log"))).to.equal(false);
    expect(fs.readFileSync(file("etc/machine-id"), "utf8")).to.equal("");

    const again = await runScript("prepare-ami.sh", ["--generalize", root, envFile], {
      env: { PIPELINE_PUBLIC_KEY: PIPELINE_KEY },
    });
    expect(again.code, again.stderr).to.equal(0);
    expect(again.stderr).to.contain("the pipeline key is in no authorized_keys file");
    expect(fs.readFileSync(home, "utf8")).to.equal(`${ADMIN_KEY}\n`);
  });

  it("--generalize without PIPELINE_PUBLIC_KEY warns and keeps all keys", async () => {
    const r = await runScript("prepare-ami.sh", ["--generalize", root, envFile], {
      env: { PIPELINE_PUBLIC_KEY: "" },
    });
    expect(r.code, r.stderr).to.equal(0);
    expect(r.stderr).to.contain("PIPELINE_PUBLIC_KEY is not set");
    expect(fs.readFileSync(file("root/.ssh/authorized_keys"), "utf8")).to.contain(PIPELINE_KEY);
  });

  it("enables the unit by hand when systemctl is not installed", async () => {
    const bin = pathWithout(["systemctl"], path.join(dir, "bin"));
    const r = await runScript("prepare-ami.sh", [root, envFile], { env: { PATH: bin } });
    expect(r.code, r.stderr).to.equal(0);
    expect(r.stderr).to.contain("systemctl not found");
    expectInstalled();
  });

  it("records BUILD_INSTANCE_ID for the unit's ExecCondition, and refuses a malformed one", async () => {
    const r = await runScript("prepare-ami.sh", [root, envFile], { env: { BUILD_INSTANCE_ID: "i-0123456789abcdef0" } });
    expect(r.code, r.stderr).to.equal(0);
    expect(fs.readFileSync(file("etc/windows-vm/build-instance-id"), "utf8")).to.equal("i-0123456789abcdef0\n");
    const bad = await runScript("prepare-ami.sh", [root, envFile], { env: { BUILD_INSTANCE_ID: "local" } });
    expect(bad.code).to.equal(1);
    expect(bad.stderr).to.include("BUILD_INSTANCE_ID 'local' is not an EC2 instance id");
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
      "ExecCondition=/usr/local/lib/windows-vm/run-vm.sh --not-build-host",
      "Restart=no",
      "WantedBy=multi-user.target",
    ]);
    const timeout = /^TimeoutStopSec=(\d+)$/m.exec(unit);
    expect(Number(timeout?.[1])).to.be.at.least(120);
  });

  it("its ExecCondition skips the VM on the build host only (IMDSv2 instance id vs build-instance-id)", async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), "imds-"));
    let instanceId = "i-0aaaaaaaaaaaaaaa1";
    const seen: string[] = [];
    const imds = http.createServer((req, res) => {
      seen.push(`${req.method} ${req.url} ${req.headers["x-aws-ec2-metadata-token"] ?? ""}`);
      if (req.method === "PUT" && req.url === "/latest/api/token") {
        res.end("tok123");
      } else if (req.url === "/latest/meta-data/instance-id" && req.headers["x-aws-ec2-metadata-token"] === "tok123") {
        res.end(instanceId);
      } else {
        res.statusCode = 401;
        res.end();
      }
    });
    await new Promise<void>((r) => imds.listen(0, "127.0.0.1", r));
    const url = `http://127.0.0.1:${(imds.address() as net.AddressInfo).port}`;
    const idFile = path.join(dir, "build-instance-id");
    const check = (env: NodeJS.ProcessEnv) =>
      run("bash", [LAUNCHER, "--not-build-host"], {
        env: { RUN_VM_BUILD_ID_FILE: idFile, RUN_VM_IMDS_URL: url, ...env },
      });
    try {
      // No build-instance-id (an image from before, or a test root): the VM starts.
      expect((await check({})).code).to.equal(0);
      fs.writeFileSync(idFile, "i-0aaaaaaaaaaaaaaa1\n");
      const onBuildHost = await check({});
      expect(onBuildHost.code).to.equal(1);
      expect(onBuildHost.stderr).to.include("i-0aaaaaaaaaaaaaaa1 is the build host of this image");
      expect(seen).to.include("GET /latest/meta-data/instance-id tok123");
      instanceId = "i-0bbbbbbbbbbbbbbb2";
      expect((await check({})).code, "an instance launched from the AMI starts the VM").to.equal(0);
      // Metadata unreachable: start (an image instance must not stay dark).
      expect((await check({ RUN_VM_IMDS_URL: "http://127.0.0.1:9" })).code).to.equal(0);
    } finally {
      imds.close();
      fs.rmSync(dir, { recursive: true, force: true });
    }
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
