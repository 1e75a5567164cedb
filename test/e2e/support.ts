/**
 * Drives the pipeline plan on this machine for the end-to-end test, the way
 * the local target's components do: the files copied with LocalRunner's
 * upload command, then each host stage's `hostCommand` (stage.sh-wrapped,
 * runtime tokens resolved as `stageCommand` does) run with `/bin/bash -c` in
 * the project folder, with the stdin its component gives it. Every stage is
 * timed, and a failure says which stage, what it ran and what the VM was
 * doing.
 */
import { spawn } from "child_process";
import { sha256, sha256File } from "../support/disk";
import * as fs from "fs";
import * as net from "net";
import * as path from "path";
import { RawConfig } from "../../infra/config";
import {
  bounded,
  hostFiles,
  HostLayout,
  Plan,
  resolveCommand,
  RuntimeValues,
  shq,
  Stage,
  StageId,
} from "../../infra/pipeline/plan";
import { StandinGuest } from "../fixtures/standin";
import { readPid, repoRoot, run } from "../support/run";
import { awsEnv, S3Http } from "../support/s3";

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

/** sha256 of every file a stage uses, by repo-relative path (buildPlan's fileHashes). */
export function repoFileHashes(): Record<string, string> {
  const out: Record<string, string> = {};
  for (const f of hostFiles()) out[f] = sha256File(path.join(repoRoot, f));
  return out;
}

/**
 * The local target's upload command (LocalRunner.upload in
 * infra/pipeline/runner.ts): one `install -D` per file, relative to the
 * project folder, where Pulumi runs its local commands.
 */
export function localUploadCommand(layout: HostLayout, files: string[]): string {
  return files.map((f) => `install -D -m 0644 ${shq(f)} ${shq(`${layout.home}/${f}`)}`).join(" && ");
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

/**
 * The raw (string) stack config of the local target, as Pulumi would store
 * it. The guest user is root: the stand-in authorizes its key for root only.
 */
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
    guestAdminUser: "root",
    // The stand-in's disk is FAT, with no Windows partition to write an answer file into.
    answerFileInImage: "false",
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

export interface Captured {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
  /** The harness's own safety bound was reached (the process group was killed). */
  timedOut: boolean;
  pid: number;
}

/**
 * Runs `/bin/bash -c COMMAND` (the local command provider's interpreter) in
 * its own process group, output streamed to `onOutput` (stdout and stderr
 * together, as they arrive). At `timeoutMs` (a safety net of the test, far
 * beyond what a stage needs here) the group gets SIGTERM, then SIGKILL.
 */
export function spawnBash(
  command: string,
  opts: {
    env: NodeJS.ProcessEnv;
    input?: string;
    timeoutMs: number;
    onOutput?: (chunk: string) => void;
  },
): Promise<Captured> {
  return new Promise((resolve, reject) => {
    const child = spawn("/bin/bash", ["-c", command], {
      cwd: repoRoot,
      env: opts.env,
      stdio: ["pipe", "pipe", "pipe"],
      detached: true,
    });
    const pid = child.pid ?? -1;
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
    const signalGroup = (sig: NodeJS.Signals) => {
      try {
        process.kill(-pid, sig);
      } catch {
        /* the group is gone */
      }
    };
    let killTimer: NodeJS.Timeout | undefined;
    const timer = setTimeout(() => {
      timedOut = true;
      signalGroup("SIGTERM");
      killTimer = setTimeout(() => signalGroup("SIGKILL"), 15_000);
    }, opts.timeoutMs);
    child.on("error", reject);
    child.stdin.on("error", (e: NodeJS.ErrnoException) => {
      if (e.code !== "EPIPE") reject(e);
    });
    child.on("close", (code, signal) => {
      clearTimeout(timer);
      if (killTimer) clearTimeout(killTimer);
      resolve({ code, signal, stdout, stderr, timedOut, pid });
    });
    child.stdin.end(opts.input ?? "");
  });
}

/** What the components feed the stages' stdin (infra/components/*.ts). */
export interface ComponentInputs {
  /** The build VM's env file (WindowsVm: renderEnv). */
  buildEnv: string;
  /** The rendered answer file (WindowsVm: configMedia). */
  answerFile: string;
  /** The guest-only private key (GuestProvisioning). */
  guestPrivateKey: string;
  /** The settings JSON (GuestProvisioning, after the key). */
  settings: string;
}

export interface RunOpts {
  /** The harness's safety bound for this run (the stage's own bound is far longer on real hardware). */
  timeoutMs?: number;
  /**
   * Rewrites the stage's inner command (Stage.command; fault tests shorten a
   * script's own timeout); the result is wrapped with plan.ts's `bounded()`
   * as buildPlan wraps it. The test asserts what it changed.
   */
  edit?: (command: string) => string;
  /** The host-side bound in minutes (default: the stage's timeoutMinutes), also through `bounded()`. */
  boundMinutes?: number;
  env?: NodeJS.ProcessEnv;
  /** Sees the output (stdout and stderr) as it comes. */
  onOutput?: (chunk: string) => void;
  /** Name in the timing table (default: the stage id). */
  label?: string;
}

/** Runs the plan's stages like the local target's components do, and keeps their wall times. */
export class PipelineDriver {
  readonly timings: Timing[] = [];

  constructor(
    readonly plan: Plan,
    readonly runtime: RuntimeValues,
    readonly inputs: ComponentInputs,
    readonly env: NodeJS.ProcessEnv,
  ) {}

  get layout(): HostLayout {
    return this.plan.layout;
  }

  /**
   * The command a stage's Command resource gets: its hostCommand with the
   * runtime tokens it uses resolved (runner.ts `stageCommand`), or, with
   * `edit`/`boundMinutes`, its inner command re-wrapped by `bounded()`.
   */
  command(stage: Stage, opts: Pick<RunOpts, "edit" | "boundMinutes"> = {}): string {
    if (stage.hostCommand === undefined || stage.command === undefined) {
      throw new Error(`stage ${stage.id} has no host command`);
    }
    const cmd =
      opts.edit === undefined && opts.boundMinutes === undefined
        ? stage.hostCommand
        : bounded(
            this.layout,
            stage.id,
            opts.boundMinutes ?? stage.timeoutMinutes,
            stage.waitsFor,
            (opts.edit ?? ((c: string) => c))(stage.command),
          );
    const values: Partial<RuntimeValues> = {};
    for (const r of stage.runtime) values[r] = this.runtime[r];
    return resolveCommand(cmd, values);
  }

  /** The stdin the stage's component gives it. */
  stdin(stage: Stage): string | undefined {
    switch (stage.stdin) {
      case undefined:
        return undefined;
      case "vmBuildEnv":
        return this.inputs.buildEnv;
      case "answerFile":
        return this.inputs.answerFile;
      case "guestKeyAndSettings":
        // GuestProvisioning: the key, a newline, then the settings.
        return `${this.inputs.guestPrivateKey.trim()}\n${this.inputs.settings}`;
      case "hostReadyScript":
        throw new Error(`stage ${stage.id} runs on the AWS host only`);
    }
  }

  /** uploadFiles: LocalRunner's upload command, run as the provider runs it. */
  async upload(opts: { label?: string } = {}): Promise<StageResult> {
    const stage = this.plan.stage("uploadFiles");
    const command = localUploadCommand(this.layout, stage.files);
    const t0 = Date.now();
    const res = await spawnBash(command, { env: this.env, timeoutMs: 60_000 });
    return this.finish(opts.label ?? stage.id, stage.id, command, t0, res);
  }

  /** Runs host stage `id` as its Command resource would; never throws on a non-zero exit. */
  async runHost(id: StageId, opts: RunOpts = {}): Promise<StageResult> {
    const stage = this.plan.stage(id);
    if (stage.site !== "host") throw new Error(`stage ${id} runs on ${stage.site}, not the host`);
    const command = this.command(stage, opts);
    const t0 = Date.now();
    const timeoutMs = opts.timeoutMs ?? 600_000;
    const res = await spawnBash(command, {
      env: { ...this.env, ...opts.env },
      input: this.stdin(stage),
      timeoutMs,
      onOutput: opts.onOutput,
    });
    if (res.timedOut) res.stderr += `\n(e2e: the harness stopped the stage after ${timeoutMs} ms)`;
    return this.finish(opts.label ?? id, id, command, t0, res);
  }

  private finish(label: string, id: StageId, command: string, t0: number, res: Captured): StageResult {
    const seconds = (Date.now() - t0) / 1000;
    this.timings.push({ id: label, seconds, ok: res.code === 0 });
    let stderr = res.stderr;
    if (res.code !== 0 && VM_STAGES.includes(id)) stderr += "\n" + this.diagnoseVm(id);
    const result = { id, code: res.code, signal: res.signal, stdout: res.stdout, stderr, seconds, command };
    verbose(label, result);
    return result;
  }

  /** One paragraph on the build VM's state: is QEMU alive, and the serial log's tail. */
  diagnoseVm(id: StageId): string {
    const L = this.layout;
    const pid = readPid(path.join(L.vmDir, "qemu.pid"));
    const state =
      pid !== undefined && isQemu(pid)
        ? `the VM ${L.buildUnit} (QEMU pid ${pid}, ${L.vmDir}) is still running`
        : `the VM ${L.buildUnit} (${L.vmDir}) is not running${pid !== undefined ? `: QEMU pid ${pid} is gone` : ""}`;
    const runLog = path.join(L.vmDir, "run-vm.log");
    return (
      `(e2e) after ${id}: ${state}\n` +
      `last lines of the serial log ${L.vmDir}/serial.log:\n${serialTail(path.join(L.vmDir, "serial.log"), 15)}\n` +
      `last lines of the launcher's log ${runLog}:\n${serialTail(runLog, 10)}`
    );
  }

  /** Runs a stage and throws (with its command and output) unless it exits 0. */
  async mustHost(id: StageId, opts: RunOpts = {}): Promise<StageResult> {
    return must(await this.runHost(id, opts));
  }
}

/** Stages whose failure is explained by the VM's state. */
const VM_STAGES: StageId[] = ["startVm", "waitGuest", "provisionGuest", "stopVm"];

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

/** Live (not zombie) processes whose command line contains `needle`. */
export function processesMatching(needle: string): Array<{ pid: number; cmdline: string }> {
  const out: Array<{ pid: number; cmdline: string }> = [];
  for (const d of fs.readdirSync("/proc")) {
    if (!/^\d+$/.test(d)) continue;
    try {
      const cmdline = fs.readFileSync(`/proc/${d}/cmdline`, "utf8").split("\0").join(" ").trim();
      if (!cmdline.includes(needle)) continue;
      const stat = fs.readFileSync(`/proc/${d}/stat`, "utf8");
      const state = stat.slice(stat.lastIndexOf(")") + 2).split(" ")[0];
      if (state !== "Z" && state !== "X") out.push({ pid: Number(d), cmdline });
    } catch {
      /* gone meanwhile */
    }
  }
  return out;
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
  /** In-process reads of the bucket (the server keeps its port across restarts). */
  readonly http: S3Http;

  private constructor(
    readonly port: number,
    readonly directory: string,
    readonly bucket: string,
  ) {
    this.endpoint = `http://127.0.0.1:${port}`;
    this.http = new S3Http(this.endpoint, bucket);
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

  /** Keys under prefix (in-process, see S3Http). */
  async keys(prefix: string): Promise<string[]> {
    return (await this.http.list(prefix)).map((o) => o.key);
  }

  /** Downloads s3://bucket/key to file with `aws s3 cp`; false when it does not exist. */
  async download(key: string, file: string): Promise<boolean> {
    const r = await this.aws(["s3", "cp", "--only-show-errors", `s3://${this.bucket}/${key}`, file]);
    return r.code === 0;
  }

  /** Body of s3://bucket/key as text (in-process); undefined when it does not exist. */
  async text(key: string): Promise<string | undefined> {
    return (await this.http.get(key))?.toString("utf8");
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
