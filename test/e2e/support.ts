/**
 * Drives the pipeline plan on this machine for the end-to-end test: copies the
 * host files the way the uploadFiles stage does, runs each host stage's exact
 * command with `bash -c` and the stdin the component would give it, runs the
 * guest stage over SSH against the stand-in guest, times every stage, and on
 * a failure says which stage, what it ran and what the VM was doing.
 */
import { spawn } from "child_process";
import { sha256, sha256File } from "../support/disk";
import * as fs from "fs";
import * as net from "net";
import * as os from "os";
import * as path from "path";
import { RawConfig } from "../../infra/config";
import { hostFiles, HostLayout, Plan, resolveCommand, RuntimeValues, Stage, StageId } from "../../infra/pipeline/plan";
import { StandinGuest, sshArgs } from "../fixtures/standin";
import { readPid, repoRoot, run } from "../support/run";
import { awsEnv } from "../support/s3";

export interface StageResult {
  id: StageId | string;
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
  seconds: number;
  /** The command as run (runtime tokens resolved). */
  command: string;
}

export interface Timing {
  id: string;
  seconds: number;
  ok: boolean;
}

/** Hash helpers live in test/support; the e2e files import them from here too. */
export { sha256, sha256File };

/** Copies every host file of the plan (provisioning/, assets/) under layout.home, as uploadFiles does. */
export function uploadFiles(layout: HostLayout): string[] {
  const files = hostFiles();
  for (const f of files) {
    const dest = path.join(layout.home, f);
    fs.mkdirSync(path.dirname(dest), { recursive: true });
    fs.copyFileSync(path.join(repoRoot, f), dest);
    fs.chmodSync(dest, 0o644);
  }
  return files;
}

/** sha256 of every file a stage uses, by repo-relative path (buildPlan's fileHashes). */
export function repoFileHashes(): Record<string, string> {
  const out: Record<string, string> = {};
  for (const f of hostFiles()) out[f] = sha256File(path.join(repoRoot, f));
  return out;
}

/** A small stand-in for the virtio-win ISO: the ARM64 driver folders, one .inf each. */
export async function makeDriversIso(dir: string): Promise<{ iso: string; sha256: string }> {
  const tree = path.join(dir, "virtio-tree");
  for (const d of ["NetKVM", "viostor", "vioscsi"]) {
    const sub = path.join(tree, d, "w11", "ARM64");
    fs.mkdirSync(sub, { recursive: true });
    fs.writeFileSync(path.join(sub, `${d.toLowerCase()}.inf`), `; stand-in ${d} driver\n`);
  }
  const iso = path.join(dir, "virtio-win.iso");
  const res = await run("xorriso", ["-as", "mkisofs", "-quiet", "-J", "-R", "-V", "virtio-win", "-o", iso, tree], {
    timeoutMs: 60_000,
  });
  if (res.code !== 0) throw new Error(`xorriso failed: ${res.stderr}`);
  fs.rmSync(tree, { recursive: true, force: true });
  return { iso, sha256: sha256File(iso) };
}

/** The raw (string) stack config of the local target, as Pulumi would store it. */
export function localRawConfig(p: {
  guest: StandinGuest;
  driversIso: { iso: string; sha256: string };
  artifactUri: string;
  endpointUrl: string;
}): RawConfig {
  return {
    target: "local",
    windowsImageUrl: `file://${p.guest.disk}`,
    windowsImageSha256: p.guest.digest,
    windowsVersion: "11-23h2",
    virtioIsoUrl: `file://${p.driversIso.iso}`,
    virtioIsoSha256: p.driversIso.sha256,
    guestInstallBuildlet: "false",
    guestInstallLlvmMingw: "false",
    guestInstallVsBuildTools: "false",
    vmCpus: "2",
    vmMemoryGiB: "4",
    artifactUri: p.artifactUri,
    artifactEndpointUrl: p.endpointUrl,
  };
}

/** Environment for stage commands: no inherited VM_* or S3_ENDPOINT_URL (the plan must set what it needs). */
export function stageEnv(s3Dir: string, endpoint: string): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(process.env)) {
    if (k.startsWith("VM_") || k === "S3_ENDPOINT_URL" || k === "AWS_ENDPOINT_URL") continue;
    env[k] = v;
  }
  const creds = awsEnv(endpoint, s3Dir);
  delete creds.S3_ENDPOINT_URL;
  return { ...env, ...creds };
}

/** Runs a program with streamed output; `onOutput` sees stdout and stderr as they arrive. */
export function spawnCapture(
  cmd: string,
  args: string[],
  opts: {
    env: NodeJS.ProcessEnv;
    input?: string;
    timeoutMs: number;
    onOutput?: (chunk: string) => void;
  },
): Promise<{ code: number | null; signal: NodeJS.Signals | null; stdout: string; stderr: string; timedOut: boolean }> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { cwd: os.tmpdir(), env: opts.env, stdio: ["pipe", "pipe", "pipe"] });
    let stdout = "";
    let stderr = "";
    let timedOut = false;
    child.stdout.on("data", (d: Buffer) => {
      stdout += d.toString();
      opts.onOutput?.(d.toString());
    });
    child.stderr.on("data", (d: Buffer) => {
      stderr += d.toString();
      opts.onOutput?.(d.toString());
    });
    const timer = setTimeout(() => {
      timedOut = true;
      child.kill("SIGKILL");
    }, opts.timeoutMs);
    child.on("error", reject);
    child.stdin.on("error", (e: NodeJS.ErrnoException) => {
      if (e.code !== "EPIPE") reject(e);
    });
    child.on("close", (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, stdout, stderr, timedOut });
    });
    child.stdin.end(opts.input ?? "");
  });
}

/** What the component feeds each kind of stdin. */
export interface StdinContents {
  vmBuildEnv: string;
  vmImageEnv: string;
  answerFile: string;
  guestSettings: string;
}

export interface RunOpts {
  /** Upper bound for this run (the stage's own timeoutMinutes is far longer on real hardware). */
  timeoutMs?: number;
  /** Rewrites the resolved command (fault tests shorten timeouts); the test asserts what it changed. */
  edit?: (command: string) => string;
  /** Another plan to take the stage from (e.g. the aws plan's prepareAmi). */
  plan?: Plan;
  stdin?: Partial<StdinContents>;
  env?: NodeJS.ProcessEnv;
  onOutput?: (chunk: string) => void;
  /** Name in the timing table (default: the stage id). */
  label?: string;
}

/** Runs the plan's stages like the components do, and keeps their wall times. */
export class PipelineDriver {
  readonly timings: Timing[] = [];

  constructor(
    readonly plan: Plan,
    readonly runtime: RuntimeValues,
    readonly stdin: StdinContents,
    readonly env: NodeJS.ProcessEnv,
    readonly guest: StandinGuest,
  ) {}

  get layout(): HostLayout {
    return this.plan.layout;
  }

  /** The stage's command with its runtime tokens resolved, exactly as a Command resource gets it. */
  command(stage: Stage): string {
    if (stage.command === undefined) throw new Error(`stage ${stage.id} has no host command`);
    const values: Partial<RuntimeValues> = {};
    for (const r of stage.runtime) values[r] = this.runtime[r];
    return resolveCommand(stage.command, values);
  }

  /** Runs host stage `id` with `bash -c <command>` and the stage's stdin; never throws on a non-zero exit. */
  async runHost(id: StageId, opts: RunOpts = {}): Promise<StageResult> {
    const stage = (opts.plan ?? this.plan).stage(id);
    if (stage.site !== "host") throw new Error(`stage ${id} runs on ${stage.site}, not the host`);
    let command = this.command(stage);
    if (opts.edit) command = opts.edit(command);
    const stdinAll = { ...this.stdin, ...opts.stdin };
    const input = stage.stdin ? stdinAll[stage.stdin] : undefined;
    const t0 = Date.now();
    // Node gives a child a socket as stdin, where `/dev/stdin` cannot be opened (ENXIO);
    // sshd and Pulumi's local Command give a pipe. `cat |` makes it a pipe again.
    const res = await spawnCapture("bash", ["-c", 'cat | bash -c "$1"', "stage", command], {
      env: { ...this.env, ...opts.env },
      input,
      timeoutMs: opts.timeoutMs ?? 300_000,
      onOutput: opts.onOutput,
    });
    const seconds = (Date.now() - t0) / 1000;
    this.timings.push({ id: opts.label ?? id, seconds, ok: res.code === 0 });
    const stderr = res.timedOut ? `${res.stderr}\n(e2e: killed after ${opts.timeoutMs ?? 300_000} ms)` : res.stderr;
    const result = { id, code: res.code, signal: res.signal, stdout: res.stdout, stderr, seconds, command };
    verbose(opts.label ?? id, result);
    return result;
  }

  /**
   * The guest stage against the stand-in: test/fixtures/standin-provision.sh
   * is the SSH command (as the encoded PowerShell is for Windows) and the
   * settings JSON goes on stdin. On failure the result's stderr says whether
   * the VM is still running, with the tail of its serial log.
   */
  async runGuest(
    opts: { env?: Record<string, string>; timeoutMs?: number; onOutput?: (c: string) => void; label?: string } = {},
  ): Promise<StageResult> {
    const stage = this.plan.stage("provisionGuest");
    const script = fs.readFileSync(path.join(repoRoot, "test", "fixtures", "standin-provision.sh"), "utf8");
    const exports = Object.entries(opts.env ?? {})
      .map(([k, v]) => `export ${k}=${v}\n`)
      .join("");
    const command = exports + script;
    const t0 = Date.now();
    const res = await spawnCapture("ssh", [...sshArgs(this.guest, this.layout.sshPort), command], {
      env: this.env,
      input: this.stdin[stage.stdin ?? "guestSettings"],
      timeoutMs: opts.timeoutMs ?? 120_000,
      onOutput: opts.onOutput,
    });
    const seconds = (Date.now() - t0) / 1000;
    this.timings.push({ id: opts.label ?? stage.id, seconds, ok: res.code === 0 });
    let stderr = res.stderr;
    if (res.code !== 0) stderr += "\n" + this.diagnoseVm(`ssh root@127.0.0.1:${this.layout.sshPort}`);
    const result = { id: stage.id, code: res.code, signal: res.signal, stdout: res.stdout, stderr, seconds, command };
    verbose(opts.label ?? stage.id, { ...result, command: "(standin-provision.sh)" });
    return result;
  }

  /** One paragraph on the build VM's state: is QEMU alive, and the serial log's tail. */
  diagnoseVm(what: string): string {
    const L = this.layout;
    const pid = readPid(path.join(L.vmDir, "qemu.pid"));
    const state =
      pid !== undefined && isQemu(pid)
        ? `the VM ${L.buildUnit} (QEMU pid ${pid}, ${L.vmDir}) is still running`
        : `the VM ${L.buildUnit} (${L.vmDir}) is not running: QEMU${pid !== undefined ? ` pid ${pid}` : ""} is gone`;
    return `provisionGuest: ${what} failed; ${state}\nlast lines of the serial log ${L.vmDir}/serial.log:\n${serialTail(path.join(L.vmDir, "serial.log"), 15)}`;
  }

  /** Runs a stage and throws (with its command and output) unless it exits 0. */
  async mustHost(id: StageId, opts: RunOpts = {}): Promise<StageResult> {
    return must(await this.runHost(id, opts));
  }
}

/** E2E_VERBOSE=1: print every stage's command and output as it finishes. */
function verbose(label: string, r: StageResult): void {
  if (process.env.E2E_VERBOSE !== "1") return;
  const indent = (t: string) => t.trim().replace(/^/gm, "        ");
  console.log(`      [${label}] exit ${r.code ?? r.signal} in ${r.seconds.toFixed(1)} s: ${r.command.slice(0, 300)}`);
  if (r.stdout.trim()) console.log(indent(r.stdout));
  if (r.stderr.trim()) console.log(indent(r.stderr));
}

export function must<T extends StageResult>(r: T): T {
  if (r.code !== 0) {
    throw new Error(
      `stage ${r.id} failed (exit ${r.code ?? r.signal}) after ${r.seconds.toFixed(1)} s\n` +
        `command: ${r.command.length > 600 ? r.command.slice(0, 600) + "..." : r.command}\n` +
        `stdout:\n${r.stdout.trim()}\nstderr:\n${r.stderr.trim()}`,
    );
  }
  return r;
}

/** True when pid is a live (not zombie) qemu-system process. */
export function isQemu(pid: number): boolean {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, "utf8");
    const state = stat.slice(stat.lastIndexOf(")") + 2).split(" ")[0];
    if (state === "Z" || state === "X") return false;
    return fs.readFileSync(`/proc/${pid}/cmdline`, "utf8").includes("qemu-system");
  } catch {
    return false;
  }
}

/** Kills the QEMU of a VM dir (cleanup after a test), waiting until it is gone. */
export async function killVm(vmDir: string): Promise<boolean> {
  const pid = readPid(path.join(vmDir, "qemu.pid"));
  if (pid === undefined || !isQemu(pid)) return false;
  process.kill(pid, "SIGKILL");
  for (let i = 0; i < 50 && isQemu(pid); i++) await new Promise((r) => setTimeout(r, 100));
  return true;
}

/** Last lines of a serial log, terminal escapes removed. */
export function serialTail(file: string, lines = 20): string {
  if (!fs.existsSync(file)) return `  (no ${file})`;
  const text = fs
    .readFileSync(file, "latin1")
    .replace(/\x1b\[[0-9;=?]*[A-Za-z]/g, "")
    .replace(/\r/g, "\n");
  return text
    .split("\n")
    .filter((l) => l.trim() !== "")
    .slice(-lines)
    .map((l) => `  | ${l.slice(0, 200)}`)
    .join("\n");
}

/** Two adjacent free TCP ports on 127.0.0.1 (the build VM uses sshPort and sshPort + 1). */
export async function freePortPair(): Promise<number> {
  for (let i = 0; i < 50; i++) {
    const port = 20000 + Math.floor(Math.random() * 30000);
    if ((await portFree(port)) && (await portFree(port + 1))) return port;
  }
  throw new Error("no two adjacent free ports found");
}

export function portFree(port: number, host = "127.0.0.1"): Promise<boolean> {
  return new Promise((resolve) => {
    const srv = net.createServer();
    srv.once("error", () => resolve(false));
    srv.listen(port, host, () => srv.close(() => resolve(true)));
  });
}

// s3rver ships no type declarations; this is the part of its API used here.
interface S3rverInstance {
  run(): Promise<unknown>;
  close(): Promise<void>;
}
// eslint-disable-next-line @typescript-eslint/no-require-imports
const S3rver: new (opts: object) => S3rverInstance = require("s3rver");

/**
 * A local S3 server (s3rver) that can be stopped and started again on the
 * same port with the same objects: "S3 is down" for a while, then back.
 */
export class RestartableS3 {
  private server?: S3rverInstance;
  readonly endpoint: string;

  private constructor(
    readonly port: number,
    readonly directory: string,
    readonly bucket: string,
  ) {
    this.endpoint = `http://127.0.0.1:${port}`;
  }

  static async create(directory: string, bucket: string): Promise<RestartableS3> {
    fs.mkdirSync(directory, { recursive: true });
    const s3 = new RestartableS3(await freePortPair(), directory, bucket);
    await s3.start();
    return s3;
  }

  get running(): boolean {
    return this.server !== undefined;
  }

  async start(): Promise<void> {
    if (this.server) return;
    const server = new S3rver({
      port: this.port,
      address: "127.0.0.1",
      silent: true,
      directory: this.directory,
      configureBuckets: [{ name: this.bucket }],
    });
    await server.run();
    this.server = server;
  }

  async stop(): Promise<void> {
    const s = this.server;
    this.server = undefined;
    if (s) await s.close();
  }

  /** Runs the aws CLI against this server (v2 at /usr/bin/aws when present, like an operator would). */
  aws(args: string[]) {
    const bin = fs.existsSync("/usr/bin/aws") ? "/usr/bin/aws" : "aws";
    return run(bin, ["--endpoint-url", this.endpoint, ...args], {
      env: awsEnv(this.endpoint, this.directory),
      timeoutMs: 120_000,
    });
  }

  /** Keys under prefix. */
  async keys(prefix: string): Promise<string[]> {
    const r = await this.aws([
      "s3api", "list-objects-v2", "--bucket", this.bucket, "--prefix", prefix,
      "--query", "Contents[].Key", "--output", "json",
    ]); // prettier-ignore
    if (r.code !== 0) throw new Error(`list-objects-v2 failed: ${r.stderr}`);
    return ((JSON.parse(r.stdout || "null") as string[] | null) ?? []).sort();
  }

  /** Downloads s3://bucket/key to file with `aws s3 cp`; false when it does not exist. */
  async download(key: string, file: string): Promise<boolean> {
    const r = await this.aws(["s3", "cp", "--only-show-errors", `s3://${this.bucket}/${key}`, file]);
    return r.code === 0;
  }

  async text(key: string, workDir: string): Promise<string | undefined> {
    const f = path.join(workDir, `get-${Date.now()}-${Math.random().toString(36).slice(2)}`);
    try {
      return (await this.download(key, f)) ? fs.readFileSync(f, "utf8") : undefined;
    } finally {
      fs.rmSync(f, { force: true });
    }
  }
}

/** A markdown table of stage wall times with a total row. */
export function timingTable(title: string, rows: Timing[]): string {
  const total = rows.reduce((a, t) => a + t.seconds, 0);
  return [
    title,
    "",
    "| stage | seconds |",
    "| --- | ---: |",
    ...rows.map((t) => `| ${t.id}${t.ok ? "" : " (failed)"} | ${t.seconds.toFixed(1)} |`),
    `| **total** | **${total.toFixed(1)}** |`,
    "",
  ].join("\n");
}
