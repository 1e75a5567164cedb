// The guest cannot reach the host's credentials: provisioning/imds-proxy.py
// (the 10.0.2.100:8173 guestfwd, and its gate) against a stand-in IMDSv2
// service, run-vm.sh's VM_USER checks, and the stand-in aarch64 guest booted
// by run-vm.sh as an unprivileged user inside a network namespace that holds
// a stand-in metadata service on 169.254.169.254:80.
import { ChildProcess, spawn } from "child_process";
import { expect } from "chai";
import * as crypto from "crypto";
import * as fs from "fs";
import * as net from "net";
import * as os from "os";
import * as path from "path";
import {
  ensureStandinGuest,
  makeFirmware,
  makeOverlay,
  qmp,
  READY_LINE,
  sshArgs,
  StandinGuest,
} from "../fixtures/standin";
import { INSTANCE_ID, ImdsRequest, ImdsStandin, ROLE, startImdsStandin } from "../support/imds";
import { freePort, pathWithout, readPid, repoRoot, run, RunResult, runOk, script } from "../support/run";

const PYTHON = "/usr/bin/python3";
/**
 * Copies of run-vm.sh and imds-proxy.py in a folder every account can read:
 * QEMU runs the proxy as the VM's account and the gate runs as nobody, which
 * may not reach a checkout under a private home.
 */
const shared = path.join(os.tmpdir(), `imds-scripts-${process.pid}`);
const RUN_VM = path.join(shared, "run-vm.sh");
const PROXY = path.join(shared, "imds-proxy.py");
function copyScripts(): void {
  fs.mkdirSync(shared, { recursive: true, mode: 0o755 });
  fs.chmodSync(shared, 0o755);
  for (const [from, to] of [
    [script("run-vm.sh"), RUN_VM],
    [script("imds-proxy.py"), PROXY],
  ]) {
    fs.copyFileSync(from, to);
    fs.chmodSync(to, 0o755);
  }
}
const runVm = (args: string[], env: NodeJS.ProcessEnv) => run("bash", [RUN_VM, ...args], { env });
/** The unprivileged account the tests run QEMU (and the proxy) as; created when missing. */
const ACCOUNT = "windows-vm-test";
const CREDS_PATH = `/latest/meta-data/iam/security-credentials/${ROLE}`;

interface HttpReply {
  status: number;
  headers: Record<string, string>;
  body: string;
}

function parseHttp(text: string): HttpReply | undefined {
  const sep = text.indexOf("\r\n\r\n");
  if (sep < 0) return undefined;
  const [statusLine, ...lines] = text.slice(0, sep).split("\r\n");
  const m = /^HTTP\/1\.[01] (\d{3})/.exec(statusLine);
  if (!m) return undefined;
  const headers: Record<string, string> = {};
  for (const l of lines) {
    const i = l.indexOf(":");
    headers[l.slice(0, i).trim().toLowerCase()] = l.slice(i + 1).trim();
  }
  return { status: Number(m[1]), headers, body: text.slice(sep + 4) };
}

const get = (p: string, extra = "") => `GET ${p} HTTP/1.1\r\nHost: 10.0.2.100:8173\r\n${extra}\r\n`;

function runProxy(request: string, args: string[], prefix: string[] = []): Promise<RunResult> {
  const argv = [...prefix, PYTHON, "-I", "-S", PROXY, ...args];
  return run(argv[0], argv.slice(1), { input: request, timeoutMs: 30000 });
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function waitFor(what: string, cond: () => boolean | Promise<boolean>, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await cond())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(200);
  }
}

/** The process is gone (or a zombie waiting for its reaper). */
function gone(pid: number): boolean {
  try {
    return /\) [ZX] /.test(fs.readFileSync(`/proc/${pid}/stat`, "utf8"));
  } catch {
    return true;
  }
}

/** Pids of the processes whose command line holds every one of `parts`. */
function pidsWith(...parts: string[]): number[] {
  const out: number[] = [];
  for (const d of fs.readdirSync("/proc")) {
    if (!/^\d+$/.test(d)) continue;
    try {
      const cmdline = fs.readFileSync(`/proc/${d}/cmdline`, "utf8").split("\0");
      if (parts.every((p) => cmdline.includes(p)) && !gone(Number(d))) out.push(Number(d));
    } catch {
      // the process ended meanwhile
    }
  }
  return out;
}

function uidOf(pid: number): number {
  const m = /^Uid:\s+(\d+)/m.exec(fs.readFileSync(`/proc/${pid}/status`, "utf8"));
  return Number(m?.[1]);
}

/** A long-running child with its output collected. */
interface Proc {
  child: ChildProcess;
  out: () => string;
  err: () => string;
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
}

function start(cmd: string, args: string[], env: NodeJS.ProcessEnv = {}): Proc {
  const child = spawn(cmd, args, { env: { ...process.env, ...env }, stdio: ["pipe", "pipe", "pipe"] });
  let out = "";
  let err = "";
  child.stdout?.on("data", (d: Buffer) => (out += d.toString()));
  child.stderr?.on("data", (d: Buffer) => (err += d.toString()));
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((r) =>
    child.on("close", (code, signal) => r({ code, signal })),
  );
  return { child, out: () => out, err: () => err, exited };
}

async function stop(p: Proc | undefined): Promise<void> {
  if (!p || p.child.exitCode !== null || p.child.signalCode !== null) return;
  p.child.kill("SIGKILL");
  await p.exited;
}

describe("the guest cannot reach the host's credentials (imds-proxy.py, run-vm.sh VM_USER)", function () {
  let createdAccount = false;
  let accountUid: number;
  let nobodyUid: number;
  let work: string;
  const secret = `FAKE-SECRET-${crypto.randomBytes(8).toString("hex")}`;
  const userData = JSON.stringify({ TLSCert: "cert-from-user-data", TLSKey: "key-from-user-data" });

  before(async function () {
    const id = await run("id", ["-u", ACCOUNT]);
    if (id.code !== 0) {
      await runOk("useradd", ["--system", "--no-create-home", "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", ACCOUNT]); // prettier-ignore
      createdAccount = true;
    }
    accountUid = Number((await runOk("id", ["-u", ACCOUNT])).trim());
    nobodyUid = Number((await runOk("id", ["-u", "nobody"])).trim());
    work = fs.mkdtempSync(path.join(os.tmpdir(), "imds-test-"));
    copyScripts();
  });

  after(async function () {
    fs.rmSync(work, { recursive: true, force: true });
    fs.rmSync(shared, { recursive: true, force: true });
    if (createdAccount) await run("userdel", [ACCOUNT]);
  });

  describe("imds-proxy.py: one request on stdin, as QEMU's guestfwd runs it", function () {
    let imds: ImdsStandin;
    let upstream: string[];

    beforeEach(async function () {
      imds = await startImdsStandin({ userData, secret });
      upstream = ["--upstream", `tcp:127.0.0.1:${imds.port}`, "--timeout", "5"];
    });
    afterEach(async () => imds.close());

    it("serves the user data with a token of its own; the guest's headers are not passed on", async function () {
      const r = await runProxy(get("/latest/user-data", "X-aws-ec2-metadata-token: guest-made-this-up\r\n"), upstream);
      expect(r.code).to.equal(0);
      expect(r.stderr, "nothing on stderr (it is the guest's stream)").to.equal("");
      const reply = parseHttp(r.stdout);
      expect(reply?.status, r.stdout).to.equal(200);
      expect(reply?.body).to.equal(userData);
      expect(reply?.headers["content-length"]).to.equal(String(Buffer.byteLength(userData)));
      expect(reply?.headers["connection"]).to.equal("close");
      expect(imds.requests.map((q) => `${q.method} ${q.path}`)).to.deep.equal([
        "PUT /latest/api/token",
        "GET /latest/user-data",
      ]);
      expect(imds.requests[1].validToken, "the GET carried the proxy's token").to.equal(true);
      expect(imds.requests.some((q) => q.tokenHeader.includes("guest-made-this-up"))).to.equal(false);
    });

    it("serves non-credential meta-data keys (instance-id, placement/region)", async function () {
      const id = parseHttp((await runProxy(get("/latest/meta-data/instance-id"), upstream)).stdout);
      expect(id?.status).to.equal(200);
      expect(id?.body).to.equal(INSTANCE_ID);
      const region = parseHttp((await runProxy(get("/latest/meta-data/placement/region"), upstream)).stdout);
      expect(region?.status).to.equal(200);
      expect(region?.body).to.equal("us-east-2");
    });

    it("refuses credentials, tokens, dynamic data, listings, odd paths and other methods with 403, asking nothing upstream", async function () {
      this.timeout(60000);
      const refused = [
        get("/latest/meta-data/iam/security-credentials/"),
        get(CREDS_PATH),
        get("/latest/meta-data/iam/info"),
        get("/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance"),
        get("/latest/api/token"),
        "PUT /latest/api/token HTTP/1.1\r\nX-aws-ec2-metadata-token-ttl-seconds: 21600\r\n\r\n",
        get("/latest/dynamic/instance-identity/document"),
        get("/latest/meta-data/"),
        get("/latest/meta-data"),
        get("/latest"),
        get("/latest/meta-data/instance-id?x=1"),
        get(`/latest/meta-data/../meta-data/iam/security-credentials/${ROLE}`),
        get(`/latest/meta-data/%69am/security-credentials/${ROLE}`),
        get("//latest/user-data"),
        get("/latest/user-data/"),
        get("http://169.254.169.254/latest/user-data"),
        "POST /latest/user-data HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
        "HEAD /latest/user-data HTTP/1.1\r\n\r\n",
      ];
      for (const request of refused) {
        const r = await runProxy(request, upstream);
        const what = JSON.stringify(request.split("\r\n")[0]);
        expect(r.code, what).to.equal(0);
        expect(r.stderr, what).to.equal("");
        expect(parseHttp(r.stdout)?.status, `${what}: ${r.stdout}`).to.equal(403);
        expect(r.stdout).to.not.include(secret);
      }
      expect(imds.requests, "nothing refused reached the metadata service").to.deep.equal([]);
    });

    it("answers a malformed request with 400 and exits 1 without a word when the guest sends nothing", async function () {
      for (const bad of ["hello\r\n\r\n", "GET /latest/user-data\r\n\r\n", "GET /latest/user-data HTTP/2\r\n\r\n"]) {
        const r = await runProxy(bad, upstream);
        expect(parseHttp(r.stdout)?.status, JSON.stringify(bad)).to.equal(400);
      }
      const empty = await runProxy("", upstream);
      expect(empty.code).to.equal(1);
      expect(empty.stdout + empty.stderr).to.equal("");
      expect(imds.requests).to.deep.equal([]);
    });

    it("a guest that connects and sends nothing is dropped at the bound, with no output", async function () {
      this.timeout(30000);
      const p = start(PYTHON, ["-I", "-S", PROXY, "--upstream", `tcp:127.0.0.1:${imds.port}`, "--timeout", "1"]);
      const ended = await p.exited; // stdin stays open: only the bound ends it
      expect(ended.code).to.equal(1);
      expect(p.out() + p.err()).to.equal("");
      p.child.stdin?.destroy();
    });

    it("an IMDSv1-only service (no token endpoint) is asked without a token", async function () {
      const v1 = await startImdsStandin({ userData, secret, v1Only: true });
      try {
        const r = await runProxy(get("/latest/user-data"), ["--upstream", `tcp:127.0.0.1:${v1.port}`]);
        const reply = parseHttp(r.stdout);
        expect(reply?.status, r.stdout).to.equal(200);
        expect(reply?.body).to.equal(userData);
        expect(v1.requests.map((q) => `${q.method} ${q.path} ${q.tokenHeader}`)).to.deep.equal([
          "PUT /latest/api/token ",
          "GET /latest/user-data ",
        ]);
      } finally {
        await v1.close();
      }
    });

    it("502 when the metadata service is unreachable, 504 when it does not answer within the bound", async function () {
      this.timeout(30000);
      const closed = await freePort();
      const down = parseHttp(
        (await runProxy(get("/latest/user-data"), ["--upstream", `tcp:127.0.0.1:${closed}`])).stdout,
      );
      expect(down?.status).to.equal(502);

      const sockets: net.Socket[] = [];
      const silent = net.createServer((s) => sockets.push(s));
      await new Promise<void>((r) => silent.listen(0, "127.0.0.1", () => r()));
      try {
        const port = (silent.address() as net.AddressInfo).port;
        const r = await runProxy(get("/latest/user-data"), ["--upstream", `tcp:127.0.0.1:${port}`, "--timeout", "2"]);
        expect(parseHttp(r.stdout)?.status, r.stdout).to.equal(504);
        expect(r.stderr).to.equal("");
      } finally {
        sockets.forEach((s) => s.destroy());
        await new Promise((r) => silent.close(r));
      }
    });

    it("refuses bad arguments with exit 2", async function () {
      const r = await runProxy("", ["--upstream", "ftp://x"]);
      expect(r.code).to.equal(2);
      expect(r.stderr).to.match(/--upstream must be tcp:HOST:PORT or unix:@NAME/);
      expect((await runProxy("", ["--bogus", "1"])).code).to.equal(2);
    });
  });

  describe("imds-proxy.py --gate: the proxy's only way to the metadata service when QEMU is unprivileged", function () {
    let imds: ImdsStandin;
    let wrapper: Proc | undefined;
    let gatePid: number;
    let name: string;

    /** Starts the gate as the child of a bash that lives until its stdin closes. */
    async function startGate(vmUid: number): Promise<void> {
      name = `imds-test-${process.pid}-${crypto.randomBytes(4).toString("hex")}`;
      wrapper = start("bash", [
        "-c",
        `"$0" -I -S "$1" --gate "$2" --vm-uid "$3" --parent $$ --imds "127.0.0.1:$4" --timeout 5 & echo "gate=$!"; read -r _`,
        PYTHON, PROXY, name, String(vmUid), String(imds.port),
      ]); // prettier-ignore
      const w = wrapper;
      await waitFor("the gate to listen", () => /gate=\d+/.test(w.out()) && w.out().includes("ready\n"), 15000);
      gatePid = Number(/gate=(\d+)/.exec(w.out())?.[1]);
    }

    /** Sends raw bytes to the gate's abstract socket and returns the answer. */
    function rawToGate(request: string): Promise<RunResult> {
      const client =
        "import socket,sys\n" +
        "s=socket.socket(socket.AF_UNIX); s.connect('\\0'+sys.argv[1]); s.sendall(sys.stdin.buffer.read())\n" +
        "sys.stdout.buffer.write(b''.join(iter(lambda: s.recv(65536), b'')))\n";
      return run(PYTHON, ["-I", "-S", "-c", client, name], { input: request, timeoutMs: 20000 });
    }

    beforeEach(async function () {
      imds = await startImdsStandin({ userData, secret });
    });
    afterEach(async function () {
      await stop(wrapper);
      wrapper = undefined;
      await imds.close();
    });

    it("relays the proxy's token PUT and GET, logs each, and exits once its parent is gone", async function () {
      this.timeout(30000);
      await startGate(0); // the proxy below runs as root
      const r = await runProxy(get("/latest/user-data"), ["--upstream", `unix:@${name}`, "--upstream-uid", "0"]);
      expect(parseHttp(r.stdout)?.body, r.stdout).to.equal(userData);
      expect(imds.requests.map((q) => `${q.method} ${q.path} ${q.validToken}`)).to.deep.equal([
        "PUT /latest/api/token false",
        "GET /latest/user-data true",
      ]);
      const w = wrapper!;
      await waitFor("the gate's log", () => w.err().includes("GET /latest/user-data -> 200"), 5000);
      expect(w.err()).to.include("imds-gate: PUT /latest/api/token -> 200");

      expect(gone(gatePid)).to.equal(false);
      w.child.stdin?.end(); // the wrapper (the gate's parent) exits
      await w.exited;
      await waitFor("the gate to exit after its parent", () => gone(gatePid), 10000);
    });

    it("refuses what the proxy would never ask, even sent to it directly", async function () {
      this.timeout(30000);
      await startGate(0);
      const token = "PUT /latest/api/token HTTP/1.1\r\nX-aws-ec2-metadata-token-ttl-seconds: 60\r\n\r\n";
      const ok = parseHttp((await rawToGate(token)).stdout);
      expect(ok?.status, "a token is allowed").to.equal(200);
      for (const request of [
        get(CREDS_PATH, `X-aws-ec2-metadata-token: ${ok?.body}\r\n`),
        get("/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance"),
        get("/latest/dynamic/instance-identity/document"),
        "PUT /latest/api/token HTTP/1.1\r\n\r\n",
        "DELETE /latest/api/token HTTP/1.1\r\n\r\n",
      ]) {
        const r = await rawToGate(request);
        expect(parseHttp(r.stdout)?.status, request).to.equal(403);
        expect(r.stdout).to.not.include(secret);
      }
      expect(imds.requests.map((q) => `${q.method} ${q.path}`)).to.deep.equal(["PUT /latest/api/token"]);
      expect(wrapper!.err()).to.include(`imds-gate: refused GET ${CREDS_PATH}`);
    });

    it("serves only the VM's uid, and the proxy trusts only a gate of the expected uid", async function () {
      this.timeout(30000);
      await startGate(0);
      // The proxy as another account: the gate does not answer it.
      const setpriv = ["setpriv", `--reuid=${ACCOUNT}`, `--regid=${ACCOUNT}`, "--init-groups", "--"];
      const r = await runProxy(get("/latest/user-data"), ["--upstream", `unix:@${name}`], setpriv);
      expect(parseHttp(r.stdout)?.status, r.stdout).to.equal(502);
      await waitFor("the gate's refusal", () => wrapper!.err().includes(`refused a connection from uid ${accountUid}`), 5000); // prettier-ignore
      // A gate that does not run as the uid the proxy expects is not used.
      const wrongUid = await runProxy(get("/latest/user-data"), [
        "--upstream",
        `unix:@${name}`,
        "--upstream-uid",
        "4242",
      ]);
      expect(parseHttp(wrongUid.stdout)?.status).to.equal(502);
      expect(imds.requests).to.deep.equal([]);
    });
  });

  describe("run-vm.sh: who QEMU runs as (validation and --print, QEMU not started)", function () {
    let dir: string;
    let envFile: string;

    before(async function () {
      dir = fs.mkdtempSync(path.join(work, "print-"));
      makeFirmware(dir);
      await runOk("qemu-img", ["create", "-q", "-f", "qcow2", path.join(dir, "disk.qcow2"), "1G"]);
      envFile = path.join(dir, "vm.env");
      const lines = [`VM_DIR=${dir}`, "VM_ACCEL=tcg", "VM_MEMORY_GIB=1", "VM_CPUS=1"];
      lines.push(`VM_SSH_PORT=${await freePort()}`, `VM_BUILDLET_PORT=${await freePort()}`, "");
      fs.writeFileSync(envFile, lines.join("\n"));
    });

    const argsOf = (r: RunResult) => r.stdout.trimEnd().split("\n");
    const valuesOf = (args: string[], opt: string) => args.flatMap((a, i) => (a === opt ? [args[i + 1]] : []));

    it("VM_USER: QEMU drops to it (-runas) and the guestfwd runs the proxy through the gate as nobody", async function () {
      const r = await runVm(["--print", envFile], { VM_USER: ACCOUNT, VM_IMDS_PROXY: "1" });
      expect(r.code, r.stderr).to.equal(0);
      const args = argsOf(r);
      expect(valuesOf(args, "-runas")).to.deep.equal([ACCOUNT]);
      const netdev = valuesOf(args, "-netdev")[0];
      expect(netdev).to.match(
        new RegExp(
          `,guestfwd=tcp:10\\.0\\.2\\.100:8173-cmd:${PYTHON} -I -S ${PROXY} --upstream unix:@windows-vm-imds-\\d+ --upstream-uid ${nobodyUid}$`,
        ),
      );
      expect(netdev).to.not.include("169.254.169.254");
    });

    it("VM_USER=root: QEMU stays root, with a warning; the proxy then asks the metadata service itself", async function () {
      const r = await runVm(["--print", envFile], { VM_USER: "root", VM_IMDS_PROXY: "1" });
      expect(r.code, r.stderr).to.equal(0);
      expect(r.stderr).to.match(/WARNING: VM_USER=root: QEMU runs as root, and the guest can reach .*credentials/);
      const args = argsOf(r);
      expect(valuesOf(args, "-runas")).to.deep.equal([]);
      expect(valuesOf(args, "-netdev")[0]).to.match(new RegExp(`-cmd:${PYTHON} -I -S ${PROXY}$`));
    });

    it("VM_USER unset as root: windows-vm when that account exists, else root with a warning naming useradd", async function () {
      const r = await runVm(["--print", envFile], { VM_USER: "" });
      expect(r.code, r.stderr).to.equal(0);
      const resolved = await runVm(["--resolve", envFile], { VM_USER: "" });
      expect(resolved.stdout).to.match(/^VM_USER=windows-vm$/m);
      if ((await run("id", ["-u", "windows-vm"])).code === 0) {
        expect(valuesOf(argsOf(r), "-runas")).to.deep.equal(["windows-vm"]);
      } else {
        expect(valuesOf(argsOf(r), "-runas")).to.deep.equal([]);
        expect(r.stderr).to.include("WARNING: the account windows-vm does not exist, so QEMU runs as root");
        expect(r.stderr).to.include("useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin windows-vm"); // prettier-ignore
      }
    });

    it("refuses an explicit VM_USER that does not exist, is not an account name or is the gate's nobody, before starting anything", async function () {
      for (const [user, message] of [
        ["no-such-vm-user", "VM_USER=no-such-vm-user: no such account; create it (useradd --system"],
        ["Not A Name", "VM_USER=Not A Name is not an account name"],
        ["nobody", "VM_USER=nobody: the metadata gate runs as nobody"],
      ]) {
        const r = await runVm([envFile], { VM_USER: user });
        expect(r.code, user).to.equal(2);
        expect(r.stderr).to.include(message);
        expect(fs.existsSync(path.join(dir, "qemu.pid"))).to.equal(false);
      }
    });

    it("refuses to drop privileges without nft (nftables): the guest could reach the credentials", async function () {
      const bin = pathWithout(["nft"], path.join(dir, "bin-no-nft"));
      const r = await runVm(["--check", envFile], { VM_USER: ACCOUNT, PATH: bin });
      expect(r.code).to.equal(2);
      expect(r.stderr).to.include(`VM_USER=${ACCOUNT}: nft not found (install nftables)`);
    });

    it("uses -run-with user= where QEMU has it (9.1 and later)", async function () {
      const bin = path.join(dir, "bin-new-qemu");
      fs.mkdirSync(bin, { recursive: true });
      // This machine's QEMU, whose -help also lists QEMU 9.1's -run-with (as 9.1's does); all else
      // (-machine help, the disk probe) is answered by the real QEMU.
      const real = (await run("bash", ["-c", "command -v qemu-system-aarch64"])).stdout.trim();
      fs.writeFileSync(
        path.join(bin, "qemu-system-aarch64"),
        [
          "#!/bin/bash",
          "if [[ $# -eq 1 && $1 == -help ]]; then",
          `  ${real} -help || exit`,
          "  echo '-run-with [async-teardown=on|off][,chroot=dir][user=username|uid:gid]'",
          "  exit 0",
          "fi",
          `exec ${real} "$@"`,
          "",
        ].join("\n"),
        { mode: 0o755 },
      );
      const r = await runVm(["--print", envFile], { VM_USER: ACCOUNT, PATH: `${bin}:${process.env.PATH}` });
      expect(r.code, r.stderr).to.equal(0);
      expect(valuesOf(argsOf(r), "-run-with")).to.deep.equal([`user=${ACCOUNT}`]);
      expect(valuesOf(argsOf(r), "-runas")).to.deep.equal([]);
    });
  });

  describe("the stand-in guest under run-vm.sh as an unprivileged user, in a network namespace", function () {
    const ns = `wvm-imds-${process.pid}`;
    const inet = `wvm-inet-${process.pid}`;
    const vethIn = `wvi${process.pid % 100000}`;
    const vethOut = `wvo${process.pid % 100000}`;
    let guest: StandinGuest;
    let vmDir: string;
    let standin: Proc | undefined;
    let web: Proc | undefined;
    let vm: Proc | undefined;
    let sshPort: number;
    const requests = (): ImdsRequest[] =>
      (standin?.out() ?? "")
        .split("\n")
        .filter((l) => l.startsWith("{"))
        .map((l) => JSON.parse(l) as ImdsRequest);

    const inNs = (cmd: string[], input?: string, timeoutMs = 60000) =>
      run("ip", ["netns", "exec", ns, ...cmd], { input, timeoutMs });
    const guestSh = (command: string) => inNs(["ssh", ...sshArgs(guest, sshPort), command]);
    /** An HTTP request from the guest with busybox nc; the reply, and nc's exit status after "nc=". */
    const guestHttp = (host: string, port: number, request: string) =>
      guestSh(
        `printf '${request.replace(/\r/g, "\\r").replace(/\n/g, "\\n")}' | nc -w 10 ${host} ${port} 2>&1; ` +
          `rc=$?; echo; echo "nc=$rc"`,
      );
    /** The body of guestHttp's reply (without the "nc=" line). */
    const bodyOf = (r: RunResult) => parseHttp(r.stdout.replace(/\nnc=\d+\n$/, ""))?.body;

    before(async function () {
      this.timeout(20 * 60 * 1000);
      guest = await ensureStandinGuest();
      vmDir = fs.mkdtempSync(path.join(work, "vm-")); // 0700 root: QEMU opens its files before it drops to the account
      await runOk("ip", ["netns", "add", ns]);
      await runOk("ip", ["netns", "add", inet]);
      await runOk("ip", ["-n", ns, "link", "set", "lo", "up"]);
      await runOk("ip", ["-n", ns, "addr", "add", "169.254.169.254/32", "dev", "lo"]);
      // "The internet": another namespace behind a veth pair, with a web server.
      await runOk("ip", ["link", "add", vethIn, "netns", ns, "type", "veth", "peer", "name", vethOut, "netns", inet]);
      await runOk("ip", ["-n", ns, "addr", "add", "10.213.0.1/30", "dev", vethIn]);
      await runOk("ip", ["-n", ns, "link", "set", vethIn, "up"]);
      await runOk("ip", ["-n", inet, "addr", "add", "10.213.0.2/30", "dev", vethOut]);
      await runOk("ip", ["-n", inet, "link", "set", vethOut, "up"]);
      const site = path.join(work, "site");
      fs.mkdirSync(site, { recursive: true });
      fs.writeFileSync(path.join(site, "hello.txt"), "hello from the internet\n");
      web = start("ip", ["netns", "exec", inet, PYTHON, "-m", "http.server", "8080", "--bind", "10.213.0.2", "--directory", site]); // prettier-ignore
      standin = start(
        "ip",
        ["netns", "exec", ns, process.execPath, "-r", "ts-node/register/transpile-only", path.join(repoRoot, "test/support/imds.ts"), "169.254.169.254", "80"], // prettier-ignore
        { IMDS_USER_DATA: userData, IMDS_SECRET: secret },
      );
      await waitFor("the stand-in metadata service", () => standin!.out().includes("listening\n"), 60000);
      await waitFor(
        "the stand-in web server",
        async () => (await inNs(["bash", "-c", "exec 3<>/dev/tcp/10.213.0.2/8080"], undefined, 5000)).code === 0,
        30000,
      );
    });

    after(async function () {
      this.timeout(60000);
      // A QEMU left by a failed run (its pid file is stale once it exited).
      const qemuPid = vmDir ? readPid(path.join(vmDir, "qemu.pid")) : undefined;
      if (qemuPid && !gone(qemuPid) && fs.readFileSync(`/proc/${qemuPid}/cmdline`, "utf8").includes(vmDir)) {
        process.kill(qemuPid, "SIGKILL");
      }
      await stop(vm);
      await stop(standin);
      await stop(web);
      await run("ip", ["netns", "del", ns]);
      await run("ip", ["netns", "del", inet]);
    });

    it("QEMU runs as the account behind the firewall; the guest reads its user data through 10.0.2.100:8173 and no credential, by the proxy or directly", async function () {
      this.timeout(15 * 60 * 1000);
      const disk = path.join(vmDir, "disk.qcow2");
      await makeOverlay(guest, disk);
      const fw = makeFirmware(vmDir);
      sshPort = await freePort();
      const envFile = path.join(vmDir, "vm.env");
      fs.writeFileSync(
        envFile,
        [
          `VM_DIR=${vmDir}`,
          `VM_DISK=${disk}`,
          `VM_EFI_CODE=${fw.code}`,
          `VM_EFI_VARS=${fw.vars}`,
          "VM_ACCEL=tcg",
          "VM_MEMORY_GIB=1",
          "VM_CPUS=2",
          `VM_SSH_PORT=${sshPort}`,
          `VM_BUILDLET_PORT=${await freePort()}`,
          "VM_IMDS_PROXY=1",
          `VM_USER=${ACCOUNT}`,
          "",
        ].join("\n"),
      );
      const serial = path.join(vmDir, "serial.log");
      vm = start("ip", ["netns", "exec", ns, "bash", RUN_VM, envFile]);
      const current = vm;
      const thisBoot = () =>
        fs.existsSync(serial) ? fs.readFileSync(serial, "latin1").split("=== run-vm:").pop()! : "";
      const alive = () => current.child.exitCode === null && current.child.signalCode === null;
      try {
        await waitFor("the guest to boot", () => !alive() || thisBoot().includes(READY_LINE), 10 * 60 * 1000);
        expect(alive(), "run-vm.sh exited").to.equal(true);
        await waitFor("SSH into the guest", async () => (await guestSh("true")).code === 0, 120000);
      } catch (e) {
        throw new Error(`${(e as Error).message}\nrun-vm.sh: ${current.err()}\nserial:\n${thisBoot().slice(-2000)}`);
      }

      // QEMU runs as the account; the gate as nobody.
      const qemuPid = readPid(path.join(vmDir, "qemu.pid"))!;
      expect(uidOf(qemuPid), "QEMU's uid").to.equal(accountUid);
      const gates = pidsWith("--gate", `windows-vm-imds-${qemuPid}`);
      expect(gates, "one gate").to.have.length(1);
      expect(uidOf(gates[0]), "the gate's uid").to.equal(nobodyUid);
      expect(current.err()).to.include(`nftables table inet windows_vm_${accountUid}: ${ACCOUNT} (uid ${accountUid})`);

      // Through the proxy: user data and the instance id, nothing else.
      const ud = await guestHttp("10.0.2.100", 8173, get("/latest/user-data"));
      expect(ud.stdout, ud.stderr).to.include("nc=0");
      expect(bodyOf(ud)).to.equal(userData);
      const id = await guestHttp("10.0.2.100", 8173, get("/latest/meta-data/instance-id"));
      expect(bodyOf(id)).to.equal(INSTANCE_ID);
      for (const p of [CREDS_PATH, "/latest/meta-data/iam/security-credentials/", "/latest/api/token"]) {
        const r = await guestHttp("10.0.2.100", 8173, get(p));
        expect(parseHttp(r.stdout)?.status, `${p}: ${r.stdout}`).to.equal(403);
        expect(r.stdout).to.not.include(secret);
      }
      // Directly: refused by the host's firewall, for the token and for the credentials.
      const token = "PUT /latest/api/token HTTP/1.1\r\nX-aws-ec2-metadata-token-ttl-seconds: 60\r\n\r\n";
      for (const request of [token, get(CREDS_PATH)]) {
        const r = await guestHttp("169.254.169.254", 80, request);
        expect(r.stdout, r.stderr).to.match(/Connection refused/);
        expect(r.stdout).to.match(/nc=1\n$/);
        expect(r.stdout).to.not.include("HTTP/1.");
      }
      // ... while the internet stays reachable (no restrict=on).
      const hello = await guestHttp("10.213.0.2", 8080, get("/hello.txt"));
      expect(bodyOf(hello), hello.stdout).to.equal("hello from the internet\n");

      // What reached the metadata service: the proxy's token PUTs and its two GETs, with the token.
      const seen = requests();
      expect([...new Set(seen.map((q) => `${q.method} ${q.path}`))].sort()).to.deep.equal([
        "GET /latest/meta-data/instance-id",
        "GET /latest/user-data",
        "PUT /latest/api/token",
      ]);
      expect(seen.filter((q) => q.method === "GET").every((q) => q.validToken)).to.equal(true);
      expect(current.err()).to.include("imds-gate: GET /latest/user-data -> 200");
      // The rule counted the guest's direct attempts; the same connection as root goes through.
      const rules = await inNs(["nft", "list", "table", "inet", `windows_vm_${accountUid}`]);
      const packets = Number(/ip daddr 169\.254\.0\.0\/16 counter packets (\d+)/.exec(rules.stdout)?.[1]);
      expect(packets, rules.stdout).to.be.greaterThan(0);
      const connect = "import socket; socket.create_connection(('169.254.169.254', 80), timeout=5).close()";
      expect((await inNs([PYTHON, "-c", connect])).code, "root reaches the stand-in").to.equal(0);
      const asAccount = await inNs(["setpriv", `--reuid=${ACCOUNT}`, `--regid=${ACCOUNT}`, "--init-groups", PYTHON, "-c", connect]); // prettier-ignore
      expect(asAccount.stderr).to.match(/ConnectionRefusedError/);

      // Power off: QEMU exits cleanly, and the gate with it.
      await qmp(path.join(vmDir, "qmp.sock"), "system_powerdown");
      const ended = await Promise.race([current.exited, sleep(120000).then(() => "timeout" as const)]);
      expect(ended, "QEMU still running after system_powerdown").to.deep.equal({ code: 0, signal: null });
      await waitFor("the gate to exit with QEMU", () => gone(gates[0]), 10000);
    });
  });
});
