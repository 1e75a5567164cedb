/**
 * smoke-test.sh for real: a stand-in `aws` (EC2 state in a file; run-instances
 * authorizes the key from the user data's cloud-config on a real sshd on
 * 127.0.0.1 that plays the smoke-test instance), and the stand-in aarch64
 * guest booted once under TCG by run-vm.sh (start-vm.sh) with its SSH
 * forwarded to a loopback port: the script reaches it through the "instance"
 * (ssh -W), runs the check there, and on failure takes the VM's screenshot
 * through the instance over QMP.
 */
import { expect } from "chai";
import { ChildProcess, execFileSync, spawn, spawnSync } from "child_process";
import * as crypto from "crypto";
import * as fs from "fs";
import * as net from "net";
import * as os from "os";
import * as path from "path";
import { ensureStandinGuest, makeFirmware, makeOverlay, READY_LINE, StandinGuest } from "../fixtures/standin";
import { freePort, readPid, repoRoot, run, RunResult, runOk, runScript } from "../support/run";

const ID = "i-0123456789abcdef0";
const AMI = "ami-0fedcba9876543210";

/** The stand-in EC2: one instance, its state in $FAKE_AWS_DIR/state. */
const FAKE_AWS = String.raw`#!/usr/bin/env bash
set -euo pipefail
d=$FAKE_AWS_DIR
printf '%s\n' "$*" >>"$d/calls"
[[ $1 == ec2 ]] || { echo "fake aws: $1 is not supported" >&2; exit 2; }
notfound() { echo "An error occurred (InvalidInstanceID.NotFound) when calling the $1 operation: The instance ID '${ID}' does not exist" >&2; exit 254; }
case $2 in
  describe-images) echo /dev/xvda ;;
  run-instances)
    [[ -z ${"${FAKE_RUN_FAIL:-}"} ]] || { echo "$FAKE_RUN_FAIL" >&2; exit 254; }
    printf '%s\n' "$@" >"$d/run-args"
    prev=; for a in "$@"; do [[ $prev != --user-data ]] || cp "${"${a#file://}"}" "$d/user-data-sent"; prev=$a; done
    # cloud-init's part: the user data's key authorized for the instance's user.
    sed -n 's/^  - //p' "$d/user-data-sent" >"$FAKE_AUTHORIZED_KEYS"
    echo pending >"$d/state"; echo ${ID} ;;
  describe-instances)
    if [[ $* == *client-token* ]]; then [[ -e $d/state ]] && echo ${ID}; exit 0; fi
    [[ -e $d/state ]] || notfound DescribeInstances
    if [[ $* == *StateReason* ]]; then echo "Client.InstanceInitiatedShutdown: Instance initiated shutdown"; exit 0; fi
    s=$(cat "$d/state")
    if [[ $* == *PublicIpAddress* ]]; then echo 127.0.0.1; exit 0; fi
    echo "$s"
    case $s in
      pending) if [[ ${"${FAKE_SMOKE:-ok}"} == die ]]; then echo terminated >"$d/state"; else echo running >"$d/state"; fi ;;
      shutting-down) echo terminated >"$d/state" ;;
    esac ;;
  terminate-instances)
    [[ -e $d/state ]] || notfound TerminateInstances
    echo shutting-down >"$d/state"; echo '{"TerminatingInstances": []}' ;;
  get-console-output) printf '%s\r\n' "[  OK  ] Reached target Cloud-init target." "Ubuntu 24.04 LTS ip-10-0-0-5 ttyS0" ;;
  *) echo "unexpected: $*" >&2; exit 1 ;;
esac
`;

/** A real sshd on 127.0.0.1 playing the instance: root logs in with whatever key the user data authorized. */
class InstanceSshd {
  readonly config: string;
  readonly authorizedKeys: string;
  private proc?: ChildProcess;
  private log = "";

  constructor(
    readonly dir: string,
    readonly port: number,
    binDir: string,
  ) {
    fs.mkdirSync(dir, { recursive: true });
    execFileSync("ssh-keygen", ["-q", "-t", "ed25519", "-N", "", "-f", path.join(dir, "host_key")]);
    this.authorizedKeys = path.join(dir, "authorized_keys");
    fs.writeFileSync(this.authorizedKeys, "");
    this.config = path.join(dir, "sshd_config");
    fs.writeFileSync(
      this.config,
      [
        "ListenAddress 127.0.0.1",
        `HostKey ${path.join(dir, "host_key")}`,
        `AuthorizedKeysFile ${this.authorizedKeys}`,
        `PidFile ${path.join(dir, "sshd.pid")}`,
        "StrictModes no",
        "UsePAM no",
        "PermitRootLogin prohibit-password",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "AllowTcpForwarding yes",
        "LogLevel ERROR",
        `SetEnv PATH=${binDir}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin`,
      ].join("\n") + "\n",
    );
    fs.mkdirSync("/run/sshd", { recursive: true, mode: 0o755 });
  }

  async start(): Promise<void> {
    const proc = spawn("/usr/sbin/sshd", ["-D", "-e", "-f", this.config, "-p", String(this.port)], {
      stdio: ["ignore", "ignore", "pipe"],
    });
    proc.stderr!.on("data", (d: Buffer) => (this.log += d.toString()));
    this.proc = proc;
    for (let i = 0; i < 100; i++) {
      const r = await run("bash", ["-c", `exec 3<>/dev/tcp/127.0.0.1/${this.port}`]);
      if (r.code === 0) return;
      if (proc.exitCode !== null) break;
      await new Promise((res) => setTimeout(res, 100));
    }
    throw new Error(`sshd did not start: ${this.log}`);
  }

  async stop(): Promise<void> {
    const proc = this.proc;
    if (!proc || proc.exitCode !== null || proc.signalCode !== null) return;
    const exited = new Promise((r) => proc.once("exit", r));
    proc.kill("SIGKILL");
    await exited;
  }
}

const sha256 = (s: string) => crypto.createHash("sha256").update(s).digest("hex");
const isPng = (f: string) =>
  fs
    .readFileSync(f)
    .subarray(0, 8)
    .equals(Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]));

describe("smoke-test.sh (boot the baked AMI, reach the VM through the instance, check, terminate)", function () {
  this.timeout(120000);
  let work: string;
  let bin: string;
  let awsDir: string;
  let shots: string;
  let vmDir: string;
  let guest: StandinGuest;
  let guestPort: number;
  let sshd: InstanceSshd;
  let smokeKey: string;
  let smokePub: string;
  const payload = '{"builderUser":"gopher","builderPassword":"Secret-Pw1!"}\n';

  before(async function () {
    this.timeout(15 * 60 * 1000);
    work = fs.mkdtempSync(path.join(os.tmpdir(), "smoke-test-"));
    bin = path.join(work, "bin");
    fs.mkdirSync(bin);
    fs.writeFileSync(path.join(bin, "aws"), FAKE_AWS, { mode: 0o755 });
    fs.copyFileSync(path.join(repoRoot, "test/lifecycle/aws/sudo"), path.join(bin, "sudo"));
    fs.chmodSync(path.join(bin, "sudo"), 0o755);
    execFileSync("ssh-keygen", ["-q", "-t", "ed25519", "-N", "", "-C", "smoke", "-f", path.join(work, "smoke")]);
    smokeKey = fs.readFileSync(path.join(work, "smoke"), "utf8");
    smokePub = fs.readFileSync(path.join(work, "smoke.pub"), "utf8").trim();
    sshd = new InstanceSshd(path.join(work, "instance"), await freePort(), bin);
    await sshd.start();

    // The baked image's VM: the stand-in guest under run-vm.sh, as windows-vm.service runs it.
    guest = await ensureStandinGuest();
    vmDir = path.join(work, "vm");
    fs.mkdirSync(vmDir, { mode: 0o700 });
    const disk = path.join(vmDir, "disk.qcow2");
    await makeOverlay(guest, disk);
    const fw = makeFirmware(vmDir);
    guestPort = await freePort();
    let buildletPort = await freePort();
    while (buildletPort === guestPort) buildletPort = await freePort();
    const envFile = path.join(vmDir, "vm.env");
    fs.writeFileSync(
      envFile,
      [
        `VM_DIR=${vmDir}`,
        `VM_DISK=${disk}`,
        `VM_EFI_CODE=${fw.code}`,
        `VM_EFI_VARS=${fw.vars}`,
        "VM_ACCEL=tcg",
        "VM_CPUS=2",
        "VM_MEMORY_GIB=1",
        `VM_SSH_PORT=${guestPort}`,
        `VM_BUILDLET_PORT=${buildletPort}`,
        "VM_IMDS_PROXY=0",
        "VM_USER=root",
        "",
      ].join("\n"),
    );
    const s = await runScript("start-vm.sh", [envFile], { env: { START_VM_SYSTEMD: "0" }, timeoutMs: 60000 });
    expect(s.code, s.stderr).to.equal(0);
  });

  after(async function () {
    this.timeout(60000);
    const pid = vmDir ? readPid(path.join(vmDir, "qemu.pid")) : undefined;
    if (pid) {
      try {
        if (fs.readFileSync(`/proc/${pid}/cmdline`, "utf8").includes(vmDir)) process.kill(pid, "SIGKILL");
      } catch {
        // already gone
      }
    }
    if (sshd) await sshd.stop();
    fs.rmSync(work, { recursive: true, force: true });
  });

  beforeEach(() => {
    awsDir = fs.mkdtempSync(path.join(work, "aws-"));
    shots = path.join(awsDir, "shots");
    fs.writeFileSync(sshd.authorizedKeys, "");
  });

  function env(extra: NodeJS.ProcessEnv = {}): NodeJS.ProcessEnv {
    return {
      PATH: `${bin}:${process.env.PATH}`,
      FAKE_AWS_DIR: awsDir,
      FAKE_AUTHORIZED_KEYS: sshd.authorizedKeys,
      SMOKE_AMI_ID: AMI,
      SMOKE_INSTANCE_TYPE: "a1.metal",
      SMOKE_SUBNET_ID: "subnet-0123456789abcdef0",
      SMOKE_SECURITY_GROUP_ID: "sg-0123456789abcdef0",
      SMOKE_GUEST_USER: "root",
      SMOKE_GUEST_COMMAND: "sha256sum && echo 'check: all PASS'",
      SMOKE_GUEST_PORT: String(guestPort),
      SMOKE_VM_DIR: vmDir,
      SMOKE_INSTANCE_USER: "root",
      SMOKE_SSH_PORT: String(sshd.port),
      SMOKE_TIMEOUT_S: "300",
      SMOKE_POLL_S: "1",
      SMOKE_CONNECT_TIMEOUT_S: "10",
      SMOKE_SCREENSHOT_DIR: shots,
      SMOKE_TAGS_JSON: '[{"Key":"Stack","Value":"dev"},{"Key":"Name","Value":"smoke"}]',
      ...extra,
    };
  }
  const input = () => smokeKey + fs.readFileSync(guest.privateKey, "utf8") + payload;
  const smoke = (extra: NodeJS.ProcessEnv = {}) =>
    runScript("smoke-test.sh", ["run"], { env: env(extra), input: input(), timeoutMs: 110000 });
  const calls = () =>
    fs.existsSync(path.join(awsDir, "calls")) ? fs.readFileSync(path.join(awsDir, "calls"), "utf8").trim().split("\n") : []; // prettier-ignore
  const terminations = () => calls().filter((c) => c.startsWith("ec2 terminate-instances"));
  const state = () => fs.readFileSync(path.join(awsDir, "state"), "utf8").trim();
  const noSecrets = (r: RunResult) => {
    for (const s of [r.stdout, r.stderr]) {
      expect(s).to.not.include("Secret-Pw1!");
      expect(s).to.not.include("PRIVATE KEY");
    }
    for (const line of r.stderr.split("\n")) expect(line.length).to.be.below(4096);
  };
  const screenshotOf = (r: RunResult) => {
    const m = /the VM's screen when it failed: (\S+)/.exec(r.stderr);
    expect(m, r.stderr).to.not.equal(null);
    const file = (m as RegExpExecArray)[1];
    expect(file).to.equal(path.join(shots, `${ID}.png`));
    expect(isPng(file), "a PNG").to.equal(true);
    return file;
  };

  it("passes once the guest answers through the instance and the check passes there; terminates the instance", async () => {
    const r = await smoke();
    expect(r.code, r.stderr).to.equal(0);
    const lines = r.stdout.split("\n");
    expect(lines).to.have.length(2);
    const out = JSON.parse(lines[0]) as Record<string, string>;
    expect(out).to.include({ amiId: AMI, instanceId: ID, guest: `127.0.0.1:${guestPort}` });
    expect(out.passedAt).to.match(/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$/);
    // The check ran in the guest with the payload on its stdin.
    expect(r.stderr).to.include(`  | ${sha256(payload)}  -`);
    expect(r.stderr).to.include("  | check: all PASS");
    // The smoke key reached the instance through the user data (public half only).
    const ud = fs.readFileSync(path.join(awsDir, "user-data-sent"), "utf8");
    expect(ud.startsWith("#cloud-config\n")).to.equal(true);
    expect(ud).to.include(`ssh_authorized_keys:\n  - ${smokePub.split(" ").slice(0, 2).join(" ")}`);
    expect(ud).to.not.include("PRIVATE");
    const args = fs.readFileSync(path.join(awsDir, "run-args"), "utf8").trim().split("\n");
    const arg = (name: string) => args[args.indexOf(name) + 1];
    expect(arg("--image-id")).to.equal(AMI);
    expect(arg("--instance-type")).to.equal("a1.metal");
    expect(arg("--metadata-options")).to.include("HttpTokens=required");
    expect(arg("--instance-initiated-shutdown-behavior")).to.equal("terminate");
    expect(JSON.parse(arg("--network-interfaces"))).to.deep.equal([
      {
        DeviceIndex: 0,
        SubnetId: "subnet-0123456789abcdef0",
        Groups: ["sg-0123456789abcdef0"],
        AssociatePublicIpAddress: true,
        DeleteOnTermination: true,
      },
    ]);
    expect(JSON.parse(arg("--block-device-mappings"))).to.deep.equal([
      { DeviceName: "/dev/xvda", Ebs: { VolumeType: "gp3", Encrypted: true, DeleteOnTermination: true } },
    ]);
    expect(args).to.not.include("--key-name");
    expect(args).to.not.include("--iam-instance-profile");
    expect(arg("--client-token")).to.match(/^smoke-/);
    expect(terminations()).to.deep.equal([`ec2 terminate-instances --instance-ids ${ID}`]);
    expect(["shutting-down", "terminated"]).to.include(state());
    expect(fs.existsSync(shots), "no screenshot on success").to.equal(false);
    noSecrets(r);
    // The watcher leaves a finished run alone.
    await new Promise((res) => setTimeout(res, 3000));
    expect(terminations()).to.have.length(1);
  });

  it("a failing check fails naming its exit code, with its output, the VM's screenshot and serial log; terminates", async () => {
    const r = await smoke({
      SMOKE_GUEST_COMMAND: "cat >/dev/null; echo 'disable-uac | EnableLUA | 0 | 1 | FAIL'; exit 3",
    });
    expect(r.code).to.equal(1);
    expect(r.stdout).to.equal("");
    expect(r.stderr).to.include("  | disable-uac | EnableLUA | 0 | 1 | FAIL");
    expect(r.stderr).to.match(
      new RegExp(
        `error: the check in the guest \\(root@127\\.0\\.0\\.1:${guestPort} on ${ID}\\) failed with exit code 3\\n$`,
      ),
    );
    screenshotOf(r);
    expect(r.stderr).to.include(`last lines of the VM's serial log (${vmDir}/serial.log on ${ID}):`);
    expect(r.stderr).to.include(`  | ${READY_LINE}`);
    expect(terminations()).to.deep.equal([`ec2 terminate-instances --instance-ids ${ID}`]);
    noSecrets(r);
  });

  it("a guest that never answers: bounded, names the guest's host:port, fetches the screenshot, terminates", async () => {
    const silent = await freePort();
    // The bound covers the launch and the instance's SSH too: enough for those on a busy machine.
    const r = await smoke({ SMOKE_GUEST_PORT: String(silent), SMOKE_TIMEOUT_S: "30" });
    expect(r.code, r.stderr).to.equal(1);
    expect(r.stderr, r.stderr).to.include(
      `error: the VM in ${ID} did not answer on the guest's SSH at 127.0.0.1:${silent} (the instance's loopback forward to the guest's port 22) within 30 s (SMOKE_TIMEOUT_S; last: `,
    );
    expect(r.stderr).to.include(`the guest at 127.0.0.1:${silent} on ${ID} does not answer yet`);
    const file = screenshotOf(r);
    expect(fs.statSync(file).size).to.be.above(100);
    expect(terminations()).to.deep.equal([`ec2 terminate-instances --instance-ids ${ID}`]);
    noSecrets(r);
  });

  it("a guest port that accepts but never speaks SSH: the bound ends the connection, reported as no answer (not as the check)", async () => {
    // Accepts TCP and says nothing: ssh waits for the banner (its ConnectTimeout set longer than
    // the bound), so the bound, not ssh, ends the session that is still connecting.
    // Half-open allowed, like a hung guest sshd: an ssh -W whose client went away stays, sending
    // its EOF, for as long as the guest keeps its side open.
    const open = new Set<net.Socket>();
    const mute = net.createServer({ allowHalfOpen: true }, (socket) => {
      open.add(socket);
      socket.on("error", () => undefined);
      socket.on("close", () => open.delete(socket));
      socket.resume();
    });
    await new Promise<void>((resolve) => mute.listen(0, "127.0.0.1", resolve));
    const port = (mute.address() as net.AddressInfo).port;
    const proxy = `W 127[.]0[.]0[.]1:${port} `; // pgrep -f's pattern for the ssh -W to it
    const proxies = () => spawnSync("pgrep", ["-f", proxy], { encoding: "utf8" }).stdout.trim();
    try {
      const r = await smoke({ SMOKE_GUEST_PORT: String(port), SMOKE_TIMEOUT_S: "30", SMOKE_CONNECT_TIMEOUT_S: "600" });
      expect(r.code, r.stderr).to.equal(1);
      expect(r.stderr, r.stderr).to.include(
        `error: the VM in ${ID} did not answer on the guest's SSH at 127.0.0.1:${port} (the instance's loopback forward to the guest's port 22) within 30 s`,
      );
      expect(r.stderr).to.not.include("the check's output");
      expect(terminations()).to.deep.equal([`ec2 terminate-instances --instance-ids ${ID}`]);
      // Nothing left holding the guest's port: the ProxyCommand (ssh -W) ends with its ssh.
      const until = Date.now() + 10000;
      while (proxies() !== "" && Date.now() < until) await new Promise((resolve) => setTimeout(resolve, 200));
      expect(proxies(), "an ssh -W to the guest's port still runs after smoke-test.sh ended").to.equal("");
    } finally {
      spawnSync("pkill", ["-f", proxy]);
      for (const socket of open) socket.destroy();
      mute.close();
    }
  });

  it("an instance that halts (its VM exited) fails naming the state reason, with its console", async () => {
    const r = await smoke({ FAKE_SMOKE: "die" });
    expect(r.code).to.equal(1);
    expect(r.stderr).to.include(
      `${ID} was terminated before the smoke test passed (state reason: Client.InstanceInitiatedShutdown: Instance initiated shutdown;`,
    );
    expect(r.stderr).to.include("  | [  OK  ] Reached target Cloud-init target.");
    expect(r.stderr).to.include("no screenshot of the VM: the instance's SSH never answered");
  });

  it("run-instances refused: fails naming the cause, nothing to terminate", async () => {
    const r = await smoke({
      FAKE_RUN_FAIL:
        "An error occurred (InsufficientInstanceCapacity) when calling the RunInstances operation: no a1.metal",
    });
    expect(r.code).to.equal(1);
    expect(r.stderr).to.include(
      "run-instances refused the smoke-test instance: An error occurred (InsufficientInstanceCapacity)",
    );
    expect(terminations()).to.deep.equal([]);
  });

  /** Live processes whose environment names this test's stand-in EC2 folder. */
  function processesOfRun(): string[] {
    const mark = Buffer.from(`FAKE_AWS_DIR=${awsDir}\0`);
    const found: string[] = [];
    for (const pid of fs.readdirSync("/proc").filter((p) => /^\d+$/.test(p))) {
      try {
        if (fs.readFileSync(`/proc/${pid}/stat`, "utf8").split(") ")[1]?.startsWith("Z")) continue;
        if (fs.readFileSync(`/proc/${pid}/environ`).includes(mark))
          found.push(`${pid} ${fs.readFileSync(`/proc/${pid}/cmdline`, "utf8").replace(/\0/g, " ")}`);
      } catch {
        // gone meanwhile
      }
    }
    return found;
  }

  async function startAndSignal(signal: NodeJS.Signals): Promise<{ code: number | null; stderr: string }> {
    const silent = await freePort();
    const child = spawn("bash", [path.join(repoRoot, "provisioning/smoke-test.sh"), "run"], {
      env: { ...process.env, ...env({ SMOKE_GUEST_PORT: String(silent) }) },
      stdio: ["pipe", "pipe", "pipe"],
    });
    child.stdin.end(input());
    let stderr = "";
    child.stderr.on("data", (d: Buffer) => (stderr += d.toString()));
    child.stdout.resume();
    const done = new Promise<number | null>((resolve) => child.on("close", (code) => resolve(code)));
    for (let i = 0; i < 300 && !stderr.includes("waiting for the VM's guest"); i++) {
      await new Promise((res) => setTimeout(res, 100));
    }
    expect(stderr).to.include("waiting for the VM's guest");
    child.kill(signal);
    const timer = setTimeout(() => child.kill("SIGKILL"), 30000);
    const code = await done;
    clearTimeout(timer);
    return { code, stderr };
  }

  it("SIGTERM (Pulumi's cancel) while waiting for the guest: terminates the instance", async () => {
    const r = await startAndSignal("SIGTERM");
    expect(r.code).to.equal(143);
    expect(r.stderr).to.include("interrupted by SIGTERM");
    expect(terminations()).to.deep.equal([`ec2 terminate-instances --instance-ids ${ID}`]);
    for (let i = 0; i < 150 && processesOfRun().length > 0; i++) await new Promise((res) => setTimeout(res, 100));
    expect(processesOfRun()).to.deep.equal([]);
  });

  it("SIGKILL: the watcher terminates the instance once the script is gone, and nothing of the run stays", async () => {
    await startAndSignal("SIGKILL");
    for (let i = 0; i < 100 && terminations().length === 0; i++) await new Promise((res) => setTimeout(res, 100));
    expect(terminations()).to.deep.equal([`ec2 terminate-instances --instance-ids ${ID}`]);
    // Every process of the run (watchers, the bounded ssh and its watchdog, the agent) ends soon after.
    for (let i = 0; i < 150 && processesOfRun().length > 0; i++) await new Promise((res) => setTimeout(res, 100));
    expect(processesOfRun()).to.deep.equal([]);
  });

  it("rejects bad arguments, environment and stdin before calling EC2", async () => {
    const cases: Array<[string[], NodeJS.ProcessEnv, string, string]> = [
      [["run"], { SMOKE_AMI_ID: "" }, input(), "SMOKE_AMI_ID is not set"],
      [["run"], { SMOKE_SUBNET_ID: "default" }, input(), "SMOKE_SUBNET_ID='default' is not a subnet id"],
      [["run"], { SMOKE_GUEST_PORT: "70000" }, input(), "SMOKE_GUEST_PORT='70000' is not a TCP port"],
      [["run"], { SMOKE_TIMEOUT_S: "0" }, input(), "SMOKE_TIMEOUT_S='0' is not a positive number"],
      [["bake"], {}, input(), "expected the single argument 'run'"],
      [["run"], {}, smokeKey + payload, "stdin does not start with an SSH private key"],
    ];
    for (const [args, extra, stdin, message] of cases) {
      const r = await runScript("smoke-test.sh", args, { env: env(extra), input: stdin, timeoutMs: 30000 });
      expect(r.code, message).to.be.oneOf([1, 2]);
      expect(r.stderr).to.include(message);
    }
    expect(calls()).to.deep.equal([]);
  });

  it("passes shellcheck", async () => {
    const r = await runOk("shellcheck", ["-x", "provisioning/smoke-test.sh"]).then(
      () => 0,
      (e: Error) => e.message,
    );
    expect(r).to.equal(0);
  });
});
