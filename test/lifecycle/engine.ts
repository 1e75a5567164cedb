/**
 * A small stand-in for the Pulumi engine and the command provider, for the
 * lifecycle test: runs the real program (infra/index.ts, from a copy of the
 * repository) under pulumi.runtime.setMocks, keeps state between runs, and
 * applies the semantics REFERENCE.md documents from their sources:
 *
 * - a resource whose create fails is not recorded; an update that fails keeps
 *   the old state; after the first failure no other step starts (the engine
 *   stops scheduling), so what did not run is not recorded either;
 * - `ignoreChanges` paths take their old values before the diff;
 * - a changed `triggers` replaces (create runs again); any other changed input
 *   runs `update`, or `create` when `update` is unset; unchanged inputs run
 *   nothing and keep the recorded outputs;
 * - local commands run for real (their interpreter, environment, stdin, the
 *   program's working directory) and are killed (SIGKILL, the process only, as
 *   Go's exec.CommandContext does) at their customTimeouts; remote commands
 *   are refused here (the program has none: their timeouts are not enforced);
 * - stdout and stderr are secret only when additionalSecretOutputs names them;
 * - after a successful run, resources the program no longer declares are
 *   dropped from the state.
 * Cloud resources are recorded with stable ids (an AMI's id follows its name:
 * a new name is a new AMI); tls keys and random passwords are generated once
 * and kept, as their providers do.
 */
import { spawn, spawnSync } from "child_process";
import * as crypto from "crypto";
import * as fs from "fs";
import * as os from "os";
import * as path from "path";
import * as pulumi from "@pulumi/pulumi";
import { callResult } from "../support/mocks";
// eslint-disable-next-line @typescript-eslint/no-require-imports
const mocksModule = require("@pulumi/pulumi/runtime/mocks") as {
  MockMonitor: { prototype: { registerResource: (req: unknown, cb: unknown) => Promise<void> } };
};

export const PROJECT = "windows-arm64-image";

export interface Options {
  ignoreChanges: string[];
  customTimeouts: { create?: string; update?: string };
  additionalSecretOutputs: string[];
}

export interface Recorded {
  type: string;
  name: string;
  id: string;
  inputs: Record<string, unknown>;
  outputs: Record<string, unknown>;
  options: Options;
  /** Input paths that arrived as secrets. */
  secretInputs?: string[];
}

export interface Executed {
  name: string;
  type: string;
  op: "create" | "update" | "replace";
  ok: boolean;
  seconds: number;
  error?: string;
}

export interface RunResult {
  ok: boolean;
  errors: string[];
  /** Commands run (and cloud resources created or replaced), in completion order. */
  executed: Executed[];
  seconds: number;
  outputs: Record<string, unknown>;
  /** Output lines longer than 4 KiB (name: length). */
  longLines: string[];
}

export interface KeyPair {
  privateKey: string;
  publicKey: string;
}

// The mock monitor passes no resource options to newResource: keep them, by type and name.
const optionsByResource = new Map<string, Options>();
let patched = false;
function patchMonitor(): void {
  if (patched) return;
  patched = true;
  const original = mocksModule.MockMonitor.prototype.registerResource;
  mocksModule.MockMonitor.prototype.registerResource = function (req: unknown, cb: unknown) {
    const r = req as {
      getType(): string;
      getName(): string;
      getIgnorechangesList(): string[];
      getCustomtimeouts(): { getCreate(): string; getUpdate(): string } | undefined;
      getAdditionalsecretoutputsList(): string[];
    };
    const t = r.getCustomtimeouts();
    optionsByResource.set(`${r.getType()}::${r.getName()}`, {
      ignoreChanges: r.getIgnorechangesList(),
      customTimeouts: t ? { create: t.getCreate() || undefined, update: t.getUpdate() || undefined } : {},
      additionalSecretOutputs: r.getAdditionalsecretoutputsList(),
    });
    return original.call(this, req, cb);
  };
}

/** "35m", "1h30m", "90s" -> milliseconds (Go's time.ParseDuration for what Pulumi writes). */
export function durationMs(s: string | undefined): number | undefined {
  if (!s) return undefined;
  let ms = 0;
  const re = /(\d+(?:\.\d+)?)(h|m|s)/g;
  let m: RegExpExecArray | null;
  let seen = false;
  while ((m = re.exec(s))) {
    seen = true;
    ms += Number(m[1]) * { h: 3_600_000, m: 60_000, s: 1000 }[m[2] as "h" | "m" | "s"];
  }
  return seen ? ms : undefined;
}

function getPath(obj: Record<string, unknown>, p: string[]): { found: boolean; value?: unknown } {
  let cur: unknown = obj;
  for (const k of p) {
    if (!cur || typeof cur !== "object" || !(k in (cur as object))) return { found: false };
    cur = (cur as Record<string, unknown>)[k];
  }
  return { found: true, value: cur };
}

/** Sets each ignored path of `inputs` to its old value (processIgnoreChanges). */
export function applyIgnoreChanges(
  inputs: Record<string, unknown>,
  old: Record<string, unknown>,
  paths: string[],
): Record<string, unknown> {
  const out = JSON.parse(JSON.stringify(inputs)) as Record<string, unknown>;
  for (const p of paths) {
    const parts = p.split(".");
    const was = getPath(old, parts);
    if (!was.found) continue;
    let cur = out;
    for (const k of parts.slice(0, -1)) {
      if (!cur[k] || typeof cur[k] !== "object") cur[k] = {};
      cur = cur[k] as Record<string, unknown>;
    }
    cur[parts[parts.length - 1]] = was.value;
  }
  return out;
}

/** Pulumi's wire form of a secret: { <sig>: <secret sig>, value }. */
const SIG = "4dabf18193072939515e22adb298388d";
const SECRET_SIG = "1b47061264138c4ac30d75fd1eb44270";

/** Inputs with secrets unwrapped to their values, and the paths that were secret. */
export function unwrapSecrets(v: unknown, at = "", secrets: string[] = []): unknown {
  if (Array.isArray(v)) return v.map((x, i) => unwrapSecrets(x, `${at}[${i}]`, secrets));
  if (v && typeof v === "object") {
    const o = v as Record<string, unknown>;
    if (o[SIG] === SECRET_SIG) {
      secrets.push(at);
      return unwrapSecrets(o.value, at, secrets);
    }
    return Object.fromEntries(Object.entries(o).map(([k, x]) => [k, unwrapSecrets(x, at ? `${at}.${k}` : k, secrets)]));
  }
  return v;
}

function same(a: unknown, b: unknown): boolean {
  return JSON.stringify(canon(a)) === JSON.stringify(canon(b));
}
function canon(v: unknown): unknown {
  if (Array.isArray(v)) return v.map(canon);
  if (v && typeof v === "object") {
    const o: Record<string, unknown> = {};
    for (const k of Object.keys(v as object).sort()) {
      const x = (v as Record<string, unknown>)[k];
      if (x !== undefined) o[k] = canon(x);
    }
    return o;
  }
  return v;
}

/** A real ed25519 key pair in OpenSSH format (ssh-keygen). */
export function generateKey(dir: string, name: string): KeyPair {
  const file = path.join(dir, `${name}-${crypto.randomBytes(4).toString("hex")}`);
  const r = spawnSync("ssh-keygen", ["-q", "-t", "ed25519", "-N", "", "-f", file]);
  if (r.status !== 0) throw new Error(`ssh-keygen failed: ${r.stderr}`);
  const kp = { privateKey: fs.readFileSync(file, "utf8"), publicKey: fs.readFileSync(`${file}.pub`, "utf8").trim() };
  fs.rmSync(file);
  fs.rmSync(`${file}.pub`);
  return kp;
}

export interface EngineConfig {
  /** The program's root (a copy of the repository with node_modules linked). */
  root: string;
  /** Keys the tls mock returns, by resource name (others are generated once). */
  keys?: Record<string, KeyPair>;
  /** Extra environment for every command. */
  env?: NodeJS.ProcessEnv;
  /** Prints each command's output lines as they arrive. */
  verbose?: boolean;
  /** Called when a cloud resource is created or changed (a stand-in can act, e.g. store an S3 object). */
  onCloudResource?: (type: string, name: string, inputs: Record<string, unknown>) => Promise<void>;
}

export class Engine {
  readonly state = new Map<string, Recorded>();

  constructor(readonly cfg: EngineConfig) {
    patchMonitor();
  }

  /** One `pulumi up` with this config (keys without the project prefix unless they contain ":"). */
  async up(
    config: Record<string, string>,
    opts: { env?: NodeJS.ProcessEnv; stack?: string; secretKeys?: string[] } = {},
  ): Promise<RunResult> {
    const started = Date.now();
    const errors: string[] = [];
    const executed: Executed[] = [];
    const longLines: string[] = [];
    const registered = new Set<string>();
    let failed = false;
    let inflight = 0;
    let lastActivity = Date.now();
    const env = { ...process.env, ...this.cfg.env, ...opts.env };

    const onRejection = (e: unknown) => {
      const msg = e instanceof Error ? e.message : String(e);
      if (!errors.includes(msg)) errors.push(msg);
    };
    process.on("unhandledRejection", onRejection);

    pulumi.runtime.setMocks(
      {
        newResource: async (args: pulumi.runtime.MockResourceArgs) => {
          inflight++;
          lastActivity = Date.now();
          try {
            const key = `${args.type}::${args.name}`;
            registered.add(key);
            const options = optionsByResource.get(key) ?? {
              ignoreChanges: [],
              customTimeouts: {},
              additionalSecretOutputs: [],
            };
            const old = this.state.get(key);
            const secretPaths: string[] = [];
            const plain = unwrapSecrets(args.inputs, "", secretPaths) as Record<string, unknown>;
            const inputs = old
              ? applyIgnoreChanges(plain, old.inputs, options.ignoreChanges)
              : (JSON.parse(JSON.stringify(plain)) as Record<string, unknown>);
            const diff = this.diff(args.type, old, inputs);
            if (diff === "same" && old) {
              old.options = options;
              return { id: old.id, state: old.outputs };
            }
            const op = diff === "same" ? "create" : diff;
            if (failed) throw new Error(`${args.name}: not run (an earlier step failed)`);
            const t0 = Date.now();
            try {
              const { id, outputs } = await this.apply(args.type, args.name, inputs, op, old, options, env, longLines);
              executed.push({ name: args.name, type: args.type, op, ok: true, seconds: (Date.now() - t0) / 1000 });
              this.state.set(key, {
                type: args.type,
                name: args.name,
                id,
                inputs,
                outputs,
                options,
                secretInputs: secretPaths,
              });
              return { id, state: outputs };
            } catch (e) {
              failed = true;
              const msg = e instanceof Error ? e.message : String(e);
              executed.push({
                name: args.name,
                type: args.type,
                op,
                ok: false,
                seconds: (Date.now() - t0) / 1000,
                error: msg,
              });
              if (!errors.includes(msg)) errors.push(msg);
              throw e;
            }
          } finally {
            inflight--;
            lastActivity = Date.now();
          }
        },
        call: async (args: pulumi.runtime.MockCallArgs) => callResult(args.token, args.inputs),
      },
      PROJECT,
      opts.stack ?? "lifecycle",
      false,
    );
    const full: Record<string, string> = {};
    for (const [k, v] of Object.entries(config)) full[k.includes(":") ? k : `${PROJECT}:${k}`] = v;
    pulumi.runtime.setAllConfig(
      full,
      (opts.secretKeys ?? []).map((k) => (k.includes(":") ? k : `${PROJECT}:${k}`)),
    );

    const infraDir = path.join(fs.realpathSync(this.cfg.root), "infra");
    for (const k of Object.keys(require.cache)) if (k.startsWith(infraDir)) delete require.cache[k];
    const cwd = process.cwd();
    process.chdir(this.cfg.root);
    const outputs: Record<string, unknown> = {};
    try {
      // eslint-disable-next-line @typescript-eslint/no-require-imports
      const program = require(path.join(infraDir, "index")) as Record<string, unknown>;
      const pending = new Set(Object.keys(program));
      for (const [k, v] of Object.entries(program)) {
        resolveOutput(v).then((x) => {
          outputs[k] = x;
          pending.delete(k);
        }, onRejection);
      }
      // Settled: nothing in flight for a while, and every output known (or the run failed).
      for (;;) {
        await new Promise((r) => setTimeout(r, 100));
        const quiet = Date.now() - lastActivity;
        if (inflight > 0 || quiet < 500) continue;
        if (pending.size === 0 || errors.length > 0) break;
        if (quiet > 10_000) {
          errors.push(`outputs never resolved: ${[...pending].join(", ")}`);
          break;
        }
      }
    } catch (e) {
      onRejection(e);
    } finally {
      process.chdir(cwd);
      process.off("unhandledRejection", onRejection);
    }
    const ok = errors.length === 0;
    if (ok) for (const k of [...this.state.keys()]) if (!registered.has(k)) this.state.delete(k);
    return { ok, errors, executed, seconds: (Date.now() - started) / 1000, outputs, longLines };
  }

  private diff(type: string, old: Recorded | undefined, inputs: Record<string, unknown>) {
    if (!old) return "create" as const;
    if (type.startsWith("command:")) {
      if (!same(old.inputs.triggers, inputs.triggers)) return "replace" as const;
      return same(old.inputs, inputs) ? ("same" as const) : ("update" as const);
    }
    if (type === "aws:ec2/amiFromInstance:AmiFromInstance") {
      // name, sourceInstanceId and snapshotWithoutReboot force a new AMI.
      for (const k of ["name", "sourceInstanceId", "snapshotWithoutReboot"])
        if (!same(old.inputs[k], inputs[k])) return "replace" as const;
    }
    return same(old.inputs, inputs) ? ("same" as const) : ("update" as const);
  }

  private async apply(
    type: string,
    name: string,
    inputs: Record<string, unknown>,
    op: "create" | "update" | "replace",
    old: Recorded | undefined,
    options: Options,
    env: NodeJS.ProcessEnv,
    longLines: string[],
  ): Promise<{ id: string; outputs: Record<string, unknown> }> {
    if (type === "command:remote:Command" || type === "command:remote:CopyToRemote")
      throw new Error(`${name}: remote commands cannot run here (and their timeouts are not enforced)`);
    if (type === "command:local:Command") {
      const script = (op === "update" && typeof inputs.update === "string" ? inputs.update : inputs.create) as string;
      const timeout = durationMs(op === "update" ? options.customTimeouts.update : options.customTimeouts.create);
      const res = await runLocal(name, script, inputs, { ...env }, this.cfg.root, timeout, this.cfg.verbose);
      for (const [stream, text] of [
        ["stdout", res.stdout],
        ["stderr", res.stderr],
      ] as const)
        for (const line of text.split("\n"))
          if (Buffer.byteLength(line) > 4096) longLines.push(`${name} ${stream}: ${Buffer.byteLength(line)} bytes`);
      if (res.error) throw new Error(`${name}: ${res.error}\n${tail(res.stdout + res.stderr)}`);
      return {
        id: old?.id ?? `${name}-${crypto.randomBytes(4).toString("hex")}`,
        outputs: { ...inputs, stdout: res.stdout, stderr: res.stderr },
      };
    }
    await this.cfg.onCloudResource?.(type, name, inputs);
    return {
      id: old?.id && op !== "replace" ? old.id : cloudId(type, name, inputs),
      outputs: { ...inputs, ...this.computed(type, name, inputs, old) },
    };
  }

  private computed(type: string, name: string, inputs: Record<string, unknown>, old?: Recorded) {
    const keep = (k: string) => old?.outputs[k];
    switch (type) {
      case "tls:index/privateKey:PrivateKey": {
        if (keep("privateKeyOpenssh"))
          return { privateKeyOpenssh: keep("privateKeyOpenssh"), publicKeyOpenssh: keep("publicKeyOpenssh") };
        const kp = this.cfg.keys?.[name] ?? generateKey(os.tmpdir(), name);
        return { privateKeyOpenssh: kp.privateKey, publicKeyOpenssh: `${kp.publicKey}\n` };
      }
      case "random:index/randomPassword:RandomPassword":
        return { result: keep("result") ?? `Lc-${crypto.randomBytes(9).toString("base64url")}-9a!` };
      case "aws:s3/bucket:Bucket":
        return { bucket: `${name}-bucket`, arn: `arn:aws:s3:::${name}-bucket` };
      case "aws:ec2/instance:Instance":
        return { publicIp: "203.0.113.250", publicDns: "ec2-203-0-113-250.compute.amazonaws.com" };
      case "aws:ec2/eip:Eip":
        return { publicIp: "127.0.0.1", publicDns: "localhost", allocationId: "eipalloc-0123" };
      case "aws:iam/role:Role":
        return { arn: `arn:aws:iam::123456789012:role/${name}`, name };
      case "aws:iam/instanceProfile:InstanceProfile":
        return { name, arn: `arn:aws:iam::123456789012:instance-profile/${name}` };
      case "aws:ec2/keyPair:KeyPair":
        return { keyName: name };
      case "aws:ec2/amiFromInstance:AmiFromInstance":
        return { arn: `arn:aws:ec2:us-east-2::image/${cloudId(type, name, inputs)}` };
      default:
        return {};
    }
  }
}

function cloudId(type: string, name: string, inputs: Record<string, unknown>): string {
  if (type === "aws:ec2/amiFromInstance:AmiFromInstance")
    return `ami-${crypto.createHash("sha256").update(String(inputs.name)).digest("hex").slice(0, 17)}`;
  if (type === "aws:ec2/instance:Instance") return "i-0123456789abcdef0";
  // Ids shaped as AWS shapes them (the scripts check them).
  const hex = crypto.createHash("sha256").update(name).digest("hex");
  if (type === "aws:ec2/securityGroup:SecurityGroup") return `sg-${hex.slice(0, 17)}`;
  if (type === "aws:ec2/keyPair:KeyPair") return `key-${hex.slice(0, 17)}`;
  if (type === "aws:ec2/eip:Eip") return `eipalloc-${hex.slice(0, 17)}`;
  return `${name}-id`;
}

function tail(s: string, lines = 30): string {
  return s.trim().split("\n").slice(-lines).join("\n");
}

function runLocal(
  name: string,
  script: string,
  inputs: Record<string, unknown>,
  env: NodeJS.ProcessEnv,
  cwd: string,
  timeoutMs: number | undefined,
  verbose?: boolean,
): Promise<{ stdout: string; stderr: string; error?: string }> {
  const interp = (inputs.interpreter as string[] | undefined) ?? ["/bin/sh", "-c"];
  const cmdEnv = { ...env, ...((inputs.environment as Record<string, string> | undefined) ?? {}) };
  return new Promise((resolve) => {
    const child = spawn(interp[0], [...interp.slice(1), script], {
      cwd: typeof inputs.dir === "string" ? inputs.dir : cwd,
      env: cmdEnv,
      stdio: ["pipe", "pipe", "pipe"],
    });
    let stdout = "";
    let stderr = "";
    let timedOut = false;
    const show = (chunk: string) => {
      if (verbose)
        for (const l of chunk.split("\n").filter(Boolean)) console.log(`        ${name}: ${l.slice(0, 300)}`);
    };
    child.stdout.on("data", (d: Buffer) => {
      stdout += d.toString();
      show(d.toString());
    });
    child.stderr.on("data", (d: Buffer) => {
      stderr += d.toString();
      show(d.toString());
    });
    child.stdin.on("error", () => undefined);
    child.stdin.end(typeof inputs.stdin === "string" ? inputs.stdin : "");
    const timer =
      timeoutMs === undefined
        ? undefined
        : setTimeout(() => {
            timedOut = true;
            child.kill("SIGKILL");
          }, timeoutMs);
    child.on("close", (code, signal) => {
      if (timer) clearTimeout(timer);
      const trimmed = (s: string) => s.replace(/\n$/, "");
      if (timedOut) resolve({ stdout, stderr, error: "context deadline exceeded (customTimeouts)" });
      else if (code !== 0)
        resolve({ stdout: trimmed(stdout), stderr: trimmed(stderr), error: `exit status ${code ?? signal}` });
      else resolve({ stdout: trimmed(stdout), stderr: trimmed(stderr) });
    });
  });
}

function resolveOutput(v: unknown): Promise<unknown> {
  if (pulumi.Output.isInstance(v))
    return new Promise((res) => {
      (v as pulumi.Output<unknown>).apply((x) => {
        res(x);
        return x;
      });
    });
  return Promise.resolve(v);
}
