import { expect } from "chai";
import { ChildProcess, execFileSync, spawn } from "child_process";
import * as crypto from "crypto";
import * as fs from "fs";
import * as os from "os";
import * as path from "path";
import { waitForSshBanner } from "../fixtures/standin";
import { freePort, readPid, repoRoot, run, RunResult, runOk, script } from "../support/run";

/**
 * The transport every pipeline stage runs through, against real tools: stage.sh
 * (the host-side bound, output hygiene, the idle-guard marker), host-exec.sh
 * (OpenSSH from where Pulumi runs, against a real sshd on 127.0.0.1) and
 * guest-run.sh (the guest provisioning over SSH, a real sshd playing the guest).
 */

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Polls until `check` holds; fails naming `what` after timeoutMs. */
async function until(what: string, check: () => boolean, timeoutMs = 30000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(50);
  }
}

/** The process exists and is not a zombie. */
function alive(pid: number): boolean {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, "utf8");
    const state = stat.slice(stat.lastIndexOf(")") + 2, stat.lastIndexOf(")") + 3);
    return state !== "Z" && state !== "X";
  } catch {
    return false;
  }
}

/** Every descendant of PID (children first, then theirs). */
function descendants(pid: number): number[] {
  const kids = new Map<number, number[]>();
  for (const line of execFileSync("ps", ["-e", "-o", "pid=,ppid="]).toString().trim().split("\n")) {
    const [p, pp] = line.trim().split(/\s+/).map(Number);
    kids.set(pp, [...(kids.get(pp) ?? []), p]);
  }
  const out: number[] = [];
  const todo = [...(kids.get(pid) ?? [])];
  while (todo.length) {
    const p = todo.shift()!;
    out.push(p);
    todo.push(...(kids.get(p) ?? []));
  }
  return out;
}

function killQuietly(pid: number | undefined, signal: NodeJS.Signals = "SIGKILL"): void {
  if (pid === undefined) return;
  try {
    process.kill(pid, signal);
  } catch {
    // already gone
  }
}

/** A script started in the background: its output as it comes, its result when it ends. */
interface Running {
  child: ChildProcess;
  stdout: () => string;
  stderr: () => string;
  result: Promise<RunResult>;
}

function start(name: string, args: string[], env: NodeJS.ProcessEnv, input: string | Buffer = ""): Running {
  const child = spawn("bash", [script(name), ...args], {
    cwd: repoRoot,
    env: { ...process.env, ...env },
    stdio: ["pipe", "pipe", "pipe"],
  });
  let out = "";
  let err = "";
  child.stdout!.on("data", (d: Buffer) => (out += d.toString()));
  child.stderr!.on("data", (d: Buffer) => (err += d.toString()));
  child.stdin!.on("error", () => undefined);
  child.stdin!.end(input);
  const result = new Promise<RunResult>((resolve, reject) => {
    child.on("error", reject);
    child.on("close", (code, signal) => resolve({ code, signal, stdout: out, stderr: err }));
  });
  return { child, stdout: () => out, stderr: () => err, result };
}

/** A real sshd on 127.0.0.1 (run as root, root logs in with the test key). */
class Sshd {
  readonly config: string;
  private proc?: ChildProcess;
  private log = "";

  constructor(
    readonly dir: string,
    readonly port: number,
    authorizedKey: string,
    binDir: string,
  ) {
    fs.mkdirSync(dir, { recursive: true });
    execFileSync("ssh-keygen", ["-q", "-t", "ed25519", "-N", "", "-f", path.join(dir, "host_key")]);
    fs.writeFileSync(path.join(dir, "authorized_keys"), authorizedKey);
    this.config = path.join(dir, "sshd_config");
    fs.writeFileSync(
      this.config,
      [
        "ListenAddress 127.0.0.1",
        `HostKey ${path.join(dir, "host_key")}`,
        `AuthorizedKeysFile ${path.join(dir, "authorized_keys")}`,
        `PidFile ${path.join(dir, "sshd.pid")}`,
        "StrictModes no",
        "UsePAM no",
        "PermitRootLogin prohibit-password",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "LogLevel ERROR",
        // The stand-in sudo (this machine has none) comes first on the session's PATH.
        `SetEnv PATH=${binDir}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin`,
      ].join("\n") + "\n",
    );
    // sshd's privilege separation directory.
    fs.mkdirSync("/run/sshd", { recursive: true, mode: 0o755 });
  }

  get pid(): number | undefined {
    return this.proc?.pid;
  }

  async start(): Promise<void> {
    const proc = spawn("/usr/sbin/sshd", ["-D", "-e", "-f", this.config, "-p", String(this.port)], {
      stdio: ["ignore", "ignore", "pipe"],
    });
    proc.stderr!.on("data", (d: Buffer) => (this.log += d.toString()));
    this.proc = proc;
    try {
      await waitForSshBanner(this.port, 30000, () => proc.exitCode === null);
    } catch (e) {
      throw new Error(`sshd did not start: ${String(e)}\n${this.log}`);
    }
  }

  /** Kills the sessions (and what they run) only: every connection drops. */
  dropSessions(): void {
    if (this.proc?.pid === undefined) return;
    for (const p of descendants(this.proc.pid)) killQuietly(p);
  }

  async stop(): Promise<void> {
    const proc = this.proc;
    if (!proc || proc.exitCode !== null || proc.signalCode !== null) return;
    this.dropSessions();
    const exited = new Promise((r) => proc.once("exit", r));
    proc.kill("SIGKILL");
    await exited;
    this.proc = undefined;
  }
}

/** A shell script file with mode 0755. */
function writeScript(file: string, lines: string[]): void {
  fs.writeFileSync(file, ["#!/usr/bin/env bash", ...lines].join("\n") + "\n", { mode: 0o755 });
}

/** A process that passes for QEMU (lib.sh's qemu_pid_of looks for qemu-system in its command line). */
async function fakeQemu(pidFile: string): Promise<number> {
  const p = spawn("bash", ["-c", "exec -a qemu-system-aarch64 sleep 1000"], { stdio: "ignore", detached: true });
  p.unref();
  const pid = p.pid!;
  const looksLikeQemu = () => {
    try {
      return fs.readFileSync(`/proc/${pid}/cmdline`, "utf8").startsWith("qemu-system");
    } catch {
      return false;
    }
  };
  await until("the stand-in QEMU", looksLikeQemu);
  fs.writeFileSync(pidFile, `${pid}\n`);
  return pid;
}

describe("transport: stage.sh, host-exec.sh, guest-run.sh", function () {
  this.timeout(120000);
  let dir: string;

  before(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), "transport-"));
  });
  after(() => fs.rmSync(dir, { recursive: true, force: true }));

  it("the scripts pass shellcheck", async () => {
    const files = ["stage.sh", "host-exec.sh", "guest-run.sh", "ssh-key.sh"].map((f) => `provisioning/${f}`);
    const r = await run("shellcheck", ["-x", ...files]);
    expect(r.code, r.stdout + r.stderr).to.equal(0);
  });

  describe("stage.sh", () => {
    let runDir: string;
    let stateDir: string;
    let env: NodeJS.ProcessEnv;

    beforeEach(() => {
      const d = fs.mkdtempSync(path.join(dir, "stage-"));
      runDir = path.join(d, "run", "stages");
      stateDir = path.join(d, "state");
      env = { STAGE_RUN_DIR: runDir, STAGE_STATE_DIR: stateDir };
    });
    const markers = () => (fs.existsSync(runDir) ? fs.readdirSync(runDir) : []);

    it("a command that succeeds: output passed through in order, marker while it runs, last-activity written", async () => {
      const before = Date.now() - 1000;
      const r = await start(
        "stage.sh",
        [
          "fetchImage",
          "60",
          "the image download",
          [
            "echo one",
            "echo err-one >&2",
            'for f in "$STAGE_RUN_DIR"/*; do echo "marker ${f##*/} holds $(cat "$f")"; done',
            "echo two",
            "echo err-two >&2",
            "printf three",
          ].join("; "),
        ],
        env,
      ).result;
      expect(r.code, r.stderr).to.equal(0);
      const lines = r.stdout.split("\n");
      expect(lines[0]).to.equal("one");
      const m = /^marker fetchImage\.(\d+) holds (\d+)$/.exec(lines[1]);
      expect(m, r.stdout).to.not.equal(null);
      expect(m![1]).to.equal(m![2]);
      expect(lines.slice(2)).to.deep.equal(["two", "three", ""]);
      expect(r.stderr.split("\n")).to.deep.equal([
        "stage fetchImage: start (bound 1 min)",
        "err-one",
        "err-two",
        r.stderr.split("\n")[3],
        "",
      ]);
      expect(r.stderr.split("\n")[3]).to.match(/^stage fetchImage: done in \d+\.\d s$/);
      expect(markers()).to.deep.equal([]);
      expect(fs.statSync(runDir).mode & 0o777).to.equal(0o755);
      const activity = path.join(stateDir, "last-activity");
      expect(fs.statSync(activity).mtimeMs).to.be.greaterThan(before);
      expect(fs.readFileSync(activity, "utf8")).to.equal("fetchImage\n");
    });

    it("streams each line as it comes (a progress line reaches the reader while the command still runs)", async () => {
      const go = path.join(dir, "go-signal");
      const s = start(
        "stage.sh",
        [
          "streamTest",
          "60",
          "the test",
          [
            "echo first",
            "echo progress >&2",
            `for i in $(seq 600); do [ -e ${go} ] && break; sleep 0.1; done`,
            `[ -e ${go} ] && echo saw-the-reply`,
          ].join("; "),
        ],
        env,
      );
      // The command waits for a reply to its first lines: they must arrive before it ends.
      await until("the first lines", () => s.stdout().includes("first\n") && s.stderr().includes("progress\n"));
      fs.writeFileSync(go, "");
      const r = await s.result;
      expect(r.code, r.stderr).to.equal(0);
      expect(r.stdout).to.equal("first\nsaw-the-reply\n");
    });

    it("a command that fails: its exit code, the message naming the stage after the command's own", async () => {
      const r = await start(
        "stage.sh",
        ["prepareDisk", "60", "the disk", "echo 'qemu-img: no space left' >&2; exit 7"],
        env,
      ).result;
      expect(r.code).to.equal(7);
      expect(r.stderr).to.match(/qemu-img: no space left\nstage prepareDisk: failed with exit code 7\n$/);
      expect(markers()).to.deep.equal([]);
    });

    it("a command that hangs: exit 124 at the bound, naming the stage and what it waited for, the whole tree gone", async () => {
      const pidFile = path.join(dir, "hang.pid");
      const r = await start(
        "stage.sh",
        ["waitGuest", "2", "Windows to answer SSH", `sleep 1000 & echo $! > ${pidFile}; wait`],
        env,
      ).result;
      expect(r.code).to.equal(124);
      expect(r.stderr).to.include(
        "stage waitGuest: timed out after 0.03 min (host-side bound) waiting for Windows to answer SSH",
      );
      const grandchild = readPid(pidFile);
      expect(grandchild).to.be.a("number");
      await until("the grandchild to be killed", () => !alive(grandchild!), 10000);
      expect(markers()).to.deep.equal([]);
    });

    it("cuts a 100 KiB line to 4000 bytes plus a marker, on stdout and on stderr, the streams kept apart", async () => {
      const r = await start(
        "stage.sh",
        [
          "publish",
          "60",
          "the upload",
          [
            "head -c 102400 /dev/zero | tr '\\0' a; echo",
            "head -c 102400 /dev/zero | tr '\\0' b >&2; echo >&2",
            // 2000 three-byte characters: the cut must not split one.
            "for i in $(seq 2000); do printf '\\342\\202\\254'; done; echo",
            "echo after",
          ].join("; "),
        ],
        env,
      ).result;
      expect(r.code, r.stderr).to.equal(0);
      const out = r.stdout.split("\n");
      expect(out[0]).to.equal("a".repeat(4000) + " …[cut 98400 bytes]");
      expect(out[1]).to.equal("€".repeat(1333) + " …[cut 2001 bytes]");
      expect(out.slice(2)).to.deep.equal(["after", ""]);
      const err = r.stderr.split("\n");
      expect(err[1]).to.equal("b".repeat(4000) + " …[cut 98400 bytes]");
      expect(r.stdout).to.not.include("bbbb");
      expect(r.stderr).to.not.include("aaaa");
      for (const line of [...out, ...err]) expect(Buffer.byteLength(line)).to.be.at.most(4100);
    });

    it("passes stdin to the command byte for byte", async () => {
      const input = Buffer.concat([crypto.randomBytes(200 * 1024), Buffer.from("\0\n\r\n-----END-----\n\n")]);
      const r = await start("stage.sh", ["configMedia", "60", "the ISO", "sha256sum | cut -d' ' -f1"], env, input)
        .result;
      expect(r.code, r.stderr).to.equal(0);
      expect(r.stdout.trim()).to.equal(crypto.createHash("sha256").update(input).digest("hex"));
    });

    it("SIGTERM to stage.sh kills the command's whole tree and removes the marker", async () => {
      const pidFile = path.join(dir, "term.pid");
      const s = start("stage.sh", ["startVm", "600", "the VM", `sleep 1000 & echo $! > ${pidFile}; wait`], env);
      await until("the grandchild", () => readPid(pidFile) !== undefined && markers().length === 1);
      s.child.kill("SIGTERM");
      const r = await s.result;
      expect(r.code).to.equal(143);
      expect(r.stderr).to.include("stage startVm: stopped by SIGTERM");
      await until("the grandchild to be killed", () => !alive(readPid(pidFile)!), 15000);
      expect(markers()).to.deep.equal([]);
    });

    it("stage.sh killed outright (SIGKILL): its watcher ends the command's tree and removes the marker", async () => {
      const pidFile = path.join(dir, "kill.pid");
      const s = start("stage.sh", ["stopVm", "600", "the VM to stop", `sleep 1000 & echo $! > ${pidFile}; wait`], env);
      await until("the grandchild", () => readPid(pidFile) !== undefined && markers().length === 1);
      s.child.kill("SIGKILL");
      await s.result;
      await until("the grandchild to be killed", () => !alive(readPid(pidFile)!), 20000);
      await until("the marker to go", () => markers().length === 0, 20000);
    });

    it("output that can no longer be written (the session went away) ends the stage", async () => {
      const pidFile = path.join(dir, "lost.pid");
      const s = start("stage.sh", ["fetchDrivers", "600", "the drivers", `sleep 1000 & echo $! > ${pidFile}; wait`], {
        ...env,
        STAGE_PROGRESS_S: "1",
      });
      await until("the grandchild", () => readPid(pidFile) !== undefined);
      // Close the reading ends: the next progress line meets a broken pipe.
      s.child.stdout!.destroy();
      s.child.stderr!.destroy();
      const r = await s.result;
      expect(r.code).to.equal(129);
      await until("the grandchild to be killed", () => !alive(readPid(pidFile)!), 15000);
      expect(markers()).to.deep.equal([]);
    });

    it("refuses bad arguments with exit 2", async () => {
      for (const args of [
        ["fetch-image", "60", "x", "true"],
        ["fetchImage", "0", "x", "true"],
        ["fetchImage", "60", "", "true"],
        ["fetchImage", "60", "x"],
      ]) {
        const r = await start("stage.sh", args, env).result;
        expect(r.code, args.join(" ")).to.equal(2);
        expect(r.stderr).to.include("usage: stage.sh STAGE_ID TIMEOUT_S WHAT COMMAND");
      }
    });
  });

  describe("host-exec.sh and guest-run.sh over a real sshd", () => {
    let keyDir: string;
    let privateKey: string;
    let publicKey: string;
    let binDir: string;
    let tmpDir: string;

    before(async () => {
      keyDir = path.join(dir, "keys");
      fs.mkdirSync(keyDir);
      await runOk("ssh-keygen", [
        "-q",
        "-t",
        "ed25519",
        "-N",
        "",
        "-C",
        "transport-test",
        "-f",
        path.join(keyDir, "id"),
      ]);
      privateKey = fs.readFileSync(path.join(keyDir, "id"), "utf8");
      publicKey = fs.readFileSync(path.join(keyDir, "id.pub"), "utf8");
      binDir = path.join(dir, "bin");
      fs.mkdirSync(binDir);
      // This machine has no sudo: a stand-in that records its calls and runs the command.
      writeScript(path.join(binDir, "sudo"), [
        `echo "$*" >> ${path.join(dir, "sudo.calls")}`,
        "[[ ${1:-} == -n ]] && shift",
        'exec "$@"',
      ]);
      tmpDir = path.join(dir, "tmp");
      fs.mkdirSync(tmpDir);
    });

    describe("host-exec.sh", () => {
      let sshd: Sshd;
      let env: NodeJS.ProcessEnv;

      before(async () => {
        sshd = new Sshd(path.join(dir, "host-sshd"), await freePort(), publicKey, binDir);
        await sshd.start();
        env = {
          HOST_EXEC_ADDRESS: "127.0.0.1",
          HOST_EXEC_USER: "root",
          HOST_EXEC_PORT: String(sshd.port),
          HOST_EXEC_SSH_OPTS: "-F /dev/null",
          HOST_EXEC_PROBE_DELAY_S: "1",
          TMPDIR: tmpDir,
        };
      });
      after(() => sshd.stop());

      it("runs the command with the payload on its stdin, passes its output and exit code through, leaves no key behind", async () => {
        const marker = path.join(dir, "host-exec.start");
        fs.writeFileSync(marker, "");
        const keyLine = privateKey.split("\n")[1];
        // Files newer than the marker holding this key's text under /tmp and the home (3 levels deep),
        // or any private key at all under host-exec's TMPDIR.
        const scan =
          `{ find /tmp "$HOME" -xdev -maxdepth 3 -type f -size -64k -newer ${marker} -print0 2>/dev/null` +
          ` | xargs -0 -r grep -l -F -e ${keyLine} 2>/dev/null;` +
          ` grep -rl -e 'PRIVATE KEY' ${tmpDir} 2>/dev/null; true; }`;
        const r = await start(
          "host-exec.sh",
          ["run", `printf 'got:'; cat; echo; echo on-stderr >&2; echo "found: $(${scan} | tr '\\n' ' ')"; exit 42`],
          env,
          `${privateKey}secret-payload\nsecond line`,
        ).result;
        expect(r.code, r.stderr).to.equal(42);
        expect(r.stdout.split("\n").slice(0, 2)).to.deep.equal(["got:secret-payload", "second line"]);
        // While host-exec held the key in its agent, no file had it.
        expect(r.stdout).to.include("found: \n");
        expect(r.stderr).to.include("on-stderr");
        expect(r.stderr).to.not.include(keyLine);
        // And afterwards: no file with the key, the agent's folder gone, no agent left running.
        const after = await run("bash", ["-c", scan]);
        expect(after.stdout.trim()).to.equal("");
        expect(fs.readdirSync(tmpDir)).to.deep.equal([]);
        const agents = (await run("pgrep", ["-f", `ssh-agent -s -a ${tmpDir}`])).stdout.trim().split("\n");
        expect(agents.filter((p) => p && alive(Number(p)))).to.deep.equal([]);
      });

      it("upload puts the files under DEST_DIR on the host, through sudo -n", async () => {
        const src = path.join(dir, "upload-src");
        fs.mkdirSync(path.join(src, "provisioning", "windows"), { recursive: true });
        fs.writeFileSync(path.join(src, "provisioning", "stage.sh"), "echo stage\n");
        fs.writeFileSync(path.join(src, "provisioning", "windows", "check.ps1"), "Write-Output ok\n");
        fs.writeFileSync(path.join(src, "not-sent.txt"), "no\n");
        const dest = path.join(dir, "upload-dest", "opt", "windows-arm64-image");
        const files = ["provisioning/stage.sh", "provisioning/windows/check.ps1"];
        const r = await start("host-exec.sh", ["upload", src, dest, ...files], env, privateKey).result;
        expect(r.code, r.stderr).to.equal(0);
        expect(r.stderr).to.include(`host-exec: uploaded 2 file(s) to root@127.0.0.1:${sshd.port}:${dest}`);
        for (const f of files)
          expect(fs.readFileSync(path.join(dest, f), "utf8")).to.equal(fs.readFileSync(path.join(src, f), "utf8"));
        expect(fs.existsSync(path.join(dest, "not-sent.txt"))).to.equal(false);
        const calls = fs.readFileSync(path.join(dir, "sudo.calls"), "utf8");
        expect(calls).to.include(`-n mkdir -p ${dest}\n`);
        expect(calls).to.include(`-n tar -x --no-same-owner`);
        // A second upload (the files changed) replaces them.
        fs.writeFileSync(path.join(src, "provisioning", "stage.sh"), "echo stage v2\n");
        const again = await start("host-exec.sh", ["upload", src, dest, ...files], env, privateKey).result;
        expect(again.code, again.stderr).to.equal(0);
        expect(fs.readFileSync(path.join(dest, "provisioning", "stage.sh"), "utf8")).to.equal("echo stage v2\n");
      });

      it("a connection lost mid-command is reported as lost (exit 255)", async () => {
        const s = start("host-exec.sh", ["run", "echo started; sleep 60"], env, privateKey);
        await until("the remote command", () => s.stdout().includes("started"));
        sshd.dropSessions();
        const r = await s.result;
        expect(r.code).to.equal(255);
        expect(r.stderr).to.include(
          "host-exec: the SSH connection to root@127.0.0.1 was lost while the command ran (the stage is not recorded; the next pulumi up runs it again)",
        );
      });

      it("without an instance id, a host that does not answer fails naming the address", async () => {
        const port = await freePort();
        const r = await start("host-exec.sh", ["run", "true"], { ...env, HOST_EXEC_PORT: String(port) }, privateKey)
          .result;
        expect(r.code).to.equal(3);
        expect(r.stderr).to.include(`host-exec: cannot reach root@127.0.0.1:${port} over SSH`);
        expect(r.stderr).to.include("Connection refused");
        expect(r.stderr).to.include("no HOST_EXEC_INSTANCE_ID");
      });

      it("refuses stdin that does not start with a private key, without echoing it", async () => {
        const r = await start(
          "host-exec.sh",
          ["run", "true"],
          env,
          "not-a-key-line\n-----END OPENSSH PRIVATE KEY-----\n",
        ).result;
        expect(r.code).to.not.equal(0);
        expect(r.stderr).to.include("stdin does not start with an SSH private key");
        expect(r.stderr).to.not.include("not-a-key-line");
      });

      it("a stopped host with HOST_EXEC_INSTANCE_ID: started through host-power.sh, then the command runs", async () => {
        const ID = "i-0123456789abcdef0";
        const awsDir = path.join(dir, "fake-aws");
        const awsBin = path.join(awsDir, "bin");
        fs.mkdirSync(awsBin, { recursive: true });
        // The "host": an sshd that the stand-in EC2 starts with start-instances (it daemonizes).
        const host = new Sshd(path.join(awsDir, "sshd"), await freePort(), publicKey, binDir);
        fs.writeFileSync(path.join(awsDir, "state"), "stopped\n");
        writeScript(path.join(awsBin, "aws"), [
          `d=${awsDir}; echo "$*" >>"$d/calls"`,
          's=$(cat "$d/state")',
          'case "$1 $2" in',
          '  "ec2 describe-instances") echo "$s"; [[ $s != pending ]] || echo running >"$d/state" ;;',
          `  "ec2 start-instances") echo pending >"$d/state"; /usr/sbin/sshd -f ${host.config} -p ${host.port} ;;`,
          '  *) echo "unexpected: $*" >&2; exit 1 ;;',
          "esac",
        ]);
        try {
          const r = await start(
            "host-exec.sh",
            ["run", "echo ran on the woken host; cat"],
            {
              ...env,
              HOST_EXEC_PORT: String(host.port),
              HOST_EXEC_INSTANCE_ID: ID,
              HOST_EXEC_BOOT_TIMEOUT_S: "90",
              HOST_POWER_POLL_S: "1",
              PATH: `${awsBin}:${process.env.PATH}`,
            },
            `${privateKey}payload after the wake`,
          ).result;
          expect(r.code, r.stderr).to.equal(0);
          expect(r.stdout).to.equal("ran on the woken host\npayload after the wake");
          expect(r.stderr).to.include(`host-exec: starting the host ${ID} if it is stopped`);
          const calls = fs.readFileSync(path.join(awsDir, "calls"), "utf8").trim().split("\n");
          expect(calls.filter((c) => c.startsWith("ec2 start-instances"))).to.deep.equal([
            `ec2 start-instances --instance-ids ${ID}`,
          ]);
        } finally {
          killQuietly(readPid(path.join(host.dir, "sshd.pid")), "SIGTERM");
        }
      });
    });

    describe("guest-run.sh", () => {
      let guest: Sshd;
      let vmDir: string;
      let envFile: string;
      let qemuPid: number | undefined;
      let env: NodeJS.ProcessEnv;
      const unit = "windows-vm-build";

      before(async () => {
        guest = new Sshd(path.join(dir, "guest-sshd"), await freePort(), publicKey, binDir);
        await guest.start();
        env = { GUEST_RUN_BOOT_TIMEOUT_S: "60", TMPDIR: tmpDir };
      });
      after(() => guest.stop());

      beforeEach(async () => {
        vmDir = fs.mkdtempSync(path.join(dir, "vm-"));
        envFile = path.join(vmDir, "vm-build.env");
        fs.writeFileSync(envFile, `VM_DIR=${vmDir}\nVM_SSH_PORT=${guest.port}\n`);
        qemuPid = await fakeQemu(path.join(vmDir, "qemu.pid"));
      });
      afterEach(() => killQuietly(qemuPid));

      const args = (command: string) => [envFile, unit, String(guest.port), "root", command];

      it("the VM runs: no start; the payload (trailing newlines and all) reaches the guest command", async () => {
        const payload = '{"disableUac": true, "password": "s3cret"}\n\n';
        const r = await start("guest-run.sh", args("sha256sum | cut -d' ' -f1"), env, privateKey + payload).result;
        expect(r.code, r.stderr).to.equal(0);
        expect(r.stdout.trim()).to.equal(crypto.createHash("sha256").update(payload).digest("hex"));
        expect(r.stderr).to.include(`guest-run: the build VM runs (QEMU pid ${qemuPid})`);
        expect(r.stderr).to.include("guest-run: attempt 1/3: running the guest command");
        expect(r.stderr).to.not.include("s3cret");
        expect(fs.readdirSync(tmpDir)).to.deep.equal([]);
      });

      it("a guest sshd that drops and restarts during the command: waited for and retried, with the same payload", async () => {
        const first = path.join(vmDir, "first-attempt");
        const command = [
          `echo "attempt with: $(cat)"`,
          `if [ -e ${first} ]; then echo second-run-done; exit 0; fi`,
          `touch ${first}; sleep 60`,
        ].join("; ");
        const s = start("guest-run.sh", args(command), env, `${privateKey}the-settings`);
        await until("the first attempt", () => fs.existsSync(first));
        await guest.stop();
        await until("guest-run waiting for SSH", () => s.stderr().includes("waiting for its SSH again"));
        await guest.start();
        const r = await s.result;
        expect(r.code, r.stderr).to.equal(0);
        expect(r.stdout).to.equal("attempt with: the-settings\nattempt with: the-settings\nsecond-run-done\n");
        expect(r.stderr).to.include(
          "guest-run: attempt 1/3: the SSH connection to the guest was refused or lost (exit 255)",
        );
        expect(r.stderr).to.include("guest-run: attempt 2/3: running the guest command");
        expect(r.stderr).to.include("guest-run: the guest command succeeded (attempt 2/3)");
      });

      it("GUEST_RUN_REPORT: the tagged report line is saved (decoded, not printed); none, or not JSON, fails with 4", async () => {
        const report = path.join(vmDir, "software-report.json");
        const json = '{"windows":{"edition":"Professional","build":"22631.2861"},"drivers":[]}';
        const b64 = Buffer.from(json).toString("base64");
        // A stale report from an earlier run must not survive.
        fs.writeFileSync(report, '{"stale":true}');
        const tag = "windows-arm64-image-software-report: ";
        const send = (line: string) => `cat >/dev/null; echo provisioned; printf '%s\\r\\n' '${line}'; echo checked`;
        const rEnv = { ...env, GUEST_RUN_REPORT: report };
        const r = await start("guest-run.sh", args(send(tag + b64)), rEnv, `${privateKey}{}`).result;
        expect(r.code, r.stderr).to.equal(0);
        expect(r.stdout).to.equal("provisioned\nchecked\n");
        expect(fs.readFileSync(report, "utf8")).to.equal(json);
        expect(r.stderr).to.include(`guest-run: software report saved to ${report} (${json.length} bytes)`);
        // The output is passed through as it came: a last line without a newline gets none.
        const bare = await start("guest-run.sh", args(`${send(tag + b64)}; printf last`), rEnv, `${privateKey}{}`)
          .result;
        expect(bare.code, bare.stderr).to.equal(0);
        expect(bare.stdout).to.equal("provisioned\nchecked\nlast");
        // Without GUEST_RUN_REPORT the line is passed through as any other.
        const plain = await start("guest-run.sh", args(send(tag + b64)), env, `${privateKey}{}`).result;
        expect(plain.code, plain.stderr).to.equal(0);
        expect(plain.stdout).to.contain(tag + b64);

        const none = await start("guest-run.sh", args(send("no report here")), rEnv, `${privateKey}{}`).result;
        expect(none.code, none.stderr).to.equal(4);
        expect(none.stderr).to.include("the guest command sent no software report");
        expect(fs.existsSync(report), "the earlier report is gone").to.equal(false);
        const bad = Buffer.from("[1, 2").toString("base64");
        const notJson = await start("guest-run.sh", args(send(tag + bad)), rEnv, `${privateKey}{}`).result;
        expect(notJson.code, notJson.stderr).to.equal(4);
        expect(notJson.stderr).to.include("the software report the guest sent is not a JSON object");
        expect(fs.readdirSync(vmDir).filter((f) => f.startsWith("software-report"))).to.deep.equal([]);
      });

      it("a failing guest command (exit 7) is not retried and is reported", async () => {
        const r = await start("guest-run.sh", args("echo check failed >&2; exit 7"), env, `${privateKey}{}`).result;
        expect(r.code).to.equal(7);
        expect(r.stderr).to.include("check failed\nguest-run: the guest command failed with exit code 7");
        expect(r.stderr).to.not.include("attempt 2/3");
      });

      it("the VM exiting while the command runs fails the stage (the next run starts it again)", async () => {
        const started = path.join(vmDir, "started");
        const s = start("guest-run.sh", args(`touch ${started}; sleep 60`), env, `${privateKey}{}`);
        await until("the command", () => fs.existsSync(started));
        killQuietly(qemuPid);
        await until("the stand-in QEMU to exit", () => !alive(qemuPid!));
        guest.dropSessions();
        const r = await s.result;
        expect(r.code).to.equal(3);
        expect(r.stderr).to.include("guest-run: the VM exited while the guest command ran");
      });

      it("the VM not running: started with start-vm.sh and awaited with wait-for-guest.sh, then the command runs", async () => {
        // guest-run.sh from a copy of provisioning/ whose start-vm.sh and wait-for-guest.sh are stand-ins.
        const prov = path.join(vmDir, "provisioning");
        fs.mkdirSync(prov);
        for (const f of ["guest-run.sh", "lib.sh", "ssh-key.sh", "run-vm.sh"]) {
          fs.copyFileSync(script(f), path.join(prov, f));
        }
        const calls = path.join(vmDir, "calls");
        writeScript(path.join(prov, "start-vm.sh"), [
          `echo "start-vm $*" >> ${calls}`,
          `setsid bash -c 'exec -a qemu-system-aarch64 sleep 300' </dev/null >/dev/null 2>&1 &`,
          `echo $! > ${path.join(vmDir, "qemu.pid")}`,
          'echo "start-vm: VM started (stand-in)"',
        ]);
        writeScript(path.join(prov, "wait-for-guest.sh"), [
          `echo "wait-for-guest $* VM_PID_FILE=$VM_PID_FILE" >> ${calls}`,
          "echo SSH-2.0-stand-in",
        ]);
        killQuietly(qemuPid);
        await until("the stand-in QEMU to exit", () => !alive(qemuPid!));
        const r = await run("bash", [path.join(prov, "guest-run.sh"), ...args("echo provisioned; cat")], {
          env,
          input: `${privateKey}{"x": 1}`,
          timeoutMs: 60000,
        });
        qemuPid = readPid(path.join(vmDir, "qemu.pid"));
        expect(r.code, r.stderr).to.equal(0);
        expect(r.stdout).to.equal('provisioned\n{"x": 1}');
        expect(r.stderr).to.include("guest-run: the build VM is not running");
        expect(r.stderr).to.include("start-vm: VM started (stand-in)");
        expect(fs.readFileSync(calls, "utf8").trim().split("\n")).to.deep.equal([
          `start-vm ${envFile} ${unit}`,
          `wait-for-guest 127.0.0.1 ${guest.port} 60 VM_PID_FILE=${path.join(vmDir, "qemu.pid")}`,
        ]);
      });
    });
  });
});
