import { spawn } from "child_process";
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
    const timer =
      opts.timeoutMs === undefined ? undefined : setTimeout(() => child.kill("SIGKILL"), opts.timeoutMs);
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
