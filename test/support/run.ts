import { spawn } from "child_process";
import * as fs from "fs";
import * as net from "net";
import * as path from "path";

/** Repository root, resolved from this file. */
export const repoRoot = path.resolve(__dirname, "..", "..");

/** Absolute path of a host script under provisioning/. */
export function script(name: string): string {
  return path.join(repoRoot, "provisioning", name);
}

export interface RunResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

export interface RunOptions {
  env?: NodeJS.ProcessEnv;
  cwd?: string;
  input?: string;
  timeoutMs?: number;
}

/**
 * Runs a program to completion and captures its output. Never rejects on a
 * non-zero exit: tests assert on `code`, `stdout` and `stderr` themselves.
 */
export function run(cmd: string, args: string[], opts: RunOptions = {}): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, {
      cwd: opts.cwd ?? repoRoot,
      env: { ...process.env, ...opts.env },
      stdio: ["pipe", "pipe", "pipe"],
    });
    let stdout = "";
    let stderr = "";
    child.stdout.on("data", (d: Buffer) => (stdout += d.toString()));
    child.stderr.on("data", (d: Buffer) => (stderr += d.toString()));
    const timer = opts.timeoutMs === undefined ? undefined : setTimeout(() => child.kill("SIGKILL"), opts.timeoutMs);
    child.on("error", reject);
    // A program that exits without reading its input closes the pipe first:
    // that EPIPE is not an error of the run.
    child.stdin.on("error", (e: NodeJS.ErrnoException) => {
      if (e.code !== "EPIPE") reject(e);
    });
    child.on("close", (code, signal) => {
      if (timer) clearTimeout(timer);
      resolve({ code, signal, stdout, stderr });
    });
    child.stdin.end(opts.input ?? "");
  });
}

/** Runs provisioning/<name> with bash. */
export function runScript(name: string, args: string[], opts: RunOptions = {}): Promise<RunResult> {
  return run("bash", [script(name), ...args], opts);
}

/**
 * Fills BIN_DIR with links to every program on this machine's usual PATH
 * except those named in EXCLUDE, and returns BIN_DIR for use as PATH: runs a
 * script as if those programs were not installed.
 */
export function pathWithout(exclude: string[], binDir: string): string {
  fs.mkdirSync(binDir, { recursive: true });
  for (const d of ["/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"]) {
    if (!fs.existsSync(d)) continue;
    for (const name of fs.readdirSync(d)) {
      if (exclude.includes(name) || fs.existsSync(path.join(binDir, name))) continue;
      fs.symlinkSync(path.join(d, name), path.join(binDir, name));
    }
  }
  return binDir;
}

/** A TCP port on 127.0.0.1 that was free a moment ago. */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.once("error", reject);
    srv.listen(0, "127.0.0.1", () => {
      const addr = srv.address();
      const port = typeof addr === "object" && addr ? addr.port : 0;
      srv.close(() => (port ? resolve(port) : reject(new Error("no free port"))));
    });
  });
}

/** The pid recorded in FILE, or undefined when it is missing or not a pid. */
export function readPid(file: string): number | undefined {
  try {
    const n = Number(fs.readFileSync(file, "utf8").trim());
    return Number.isInteger(n) && n > 0 ? n : undefined;
  } catch {
    return undefined;
  }
}

/** Runs a program and returns its stdout; throws with its stderr unless it exits 0 (test set-up steps). */
export async function runOk(cmd: string, args: string[], opts: RunOptions = {}): Promise<string> {
  const r = await run(cmd, args, opts);
  if (r.code !== 0) throw new Error(`${cmd} ${args.join(" ")} failed (${r.code ?? r.signal}): ${r.stderr}`);
  return r.stdout;
}
