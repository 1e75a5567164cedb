/**
 * Runs CrossGuard policies the way the policy SDK's server calls them, without
 * a PolicyPack (constructing one starts a gRPC server and owns the process):
 * resource policies get ResourceValidationArgs, stack policies get
 * StackValidationArgs with parents and property dependencies resolved.
 * Also turns the registrations recorded by mocks.ts into policy resources, and
 * talks to the real pack (policy/index.ts) served by run-policy-pack in a child
 * process, over the analyzer's gRPC protocol.
 */
import * as grpc from "@grpc/grpc-js";
import type {
  Policies,
  PolicyResource,
  PolicyResourceOptions,
  ResourceValidationArgs,
  ResourceValidationPolicy,
  StackValidationArgs,
  StackValidationPolicy,
} from "@pulumi/policy";
import { ChildProcess, spawn } from "child_process";
import * as path from "path";
import { PROJECT, Registered } from "./mocks";

export interface ResourceInput {
  type: string;
  name: string;
  props: Record<string, unknown>;
  opts?: Partial<PolicyResourceOptions>;
  /** For stack policies: input property -> names of the resources its value came from. */
  propertyDependencies?: Record<string, string[]>;
}

export interface Violation {
  policy: string;
  message: string;
  /** The resource the violation is reported against (stack policies may omit it). */
  urn?: string;
  /** From the served pack only: the enforcement level it reported ("advisory", "mandatory", ...). */
  level?: string;
}

export function urnOf(type: string, name: string): string {
  return `urn:pulumi:test::${PROJECT}::${type}::${name}`;
}

function options(o: Partial<PolicyResourceOptions> = {}): PolicyResourceOptions {
  return {
    protect: false,
    ignoreChanges: [],
    aliases: [],
    customTimeouts: { createSeconds: 0, updateSeconds: 0, deleteSeconds: 0 },
    additionalSecretOutputs: [],
    ...o,
  };
}

class NotApplicable extends Error {}

function isTypeOf(type: string, resourceClass: unknown): boolean {
  return (resourceClass as { __pulumiType?: string }).__pulumiType === type;
}

export function isStackPolicy(p: Policies[number]): p is StackValidationPolicy {
  return typeof (p as StackValidationPolicy).validateStack === "function";
}

export function isResourcePolicy(p: Policies[number]): p is ResourceValidationPolicy {
  return (p as ResourceValidationPolicy).validateResource !== undefined;
}

/** The messages a resource policy reports for one resource. */
export async function checkResource(policy: ResourceValidationPolicy, r: ResourceInput): Promise<string[]> {
  const messages: string[] = [];
  const v = policy.validateResource;
  const validations = v === undefined ? [] : Array.isArray(v) ? v : [v];
  for (const validate of validations) {
    const args: ResourceValidationArgs = {
      type: r.type,
      name: r.name,
      urn: urnOf(r.type, r.name),
      props: r.props,
      opts: options(r.opts),
      stackTags: new Map(),
      isType: (cls) => isTypeOf(r.type, cls),
      asType: (cls) => (isTypeOf(r.type, cls) ? (r.props as any) : undefined),
      getConfig: () => ({}) as any,
      notApplicable: (reason?: string) => {
        throw new NotApplicable(reason);
      },
    };
    try {
      await validate(args, (message) => messages.push(message));
    } catch (e) {
      if (!(e instanceof NotApplicable)) throw e;
    }
  }
  return messages;
}

/** Policy resources as the SDK builds them for a stack policy, links resolved by name. */
export function stackResources(inputs: ResourceInput[]): PolicyResource[] {
  const byName = new Map<string, PolicyResource>();
  const resources = inputs.map((r) => {
    const res: PolicyResource = {
      type: r.type,
      name: r.name,
      urn: urnOf(r.type, r.name),
      props: r.props,
      opts: options(r.opts),
      dependencies: [],
      propertyDependencies: {},
      isType: (cls) => isTypeOf(r.type, cls),
      asType: (cls) => (isTypeOf(r.type, cls) ? (r.props as any) : undefined),
    };
    byName.set(r.name, res);
    return res;
  });
  inputs.forEach((r, i) => {
    for (const [prop, names] of Object.entries(r.propertyDependencies ?? {})) {
      const deps = names.map((n) => {
        const d = byName.get(n);
        if (!d) throw new Error(`${r.name}.${prop} depends on ${n}, which is not among the resources`);
        return d;
      });
      resources[i].propertyDependencies[prop] = deps;
      for (const d of deps) if (!resources[i].dependencies.includes(d)) resources[i].dependencies.push(d);
    }
  });
  return resources;
}

/** The violations a stack policy reports for a whole stack. */
export async function checkStack(policy: StackValidationPolicy, inputs: ResourceInput[]): Promise<Violation[]> {
  const found: Violation[] = [];
  const args: StackValidationArgs = {
    resources: stackResources(inputs),
    stackTags: new Map(),
    getConfig: () => ({}) as any,
    notApplicable: (reason?: string) => {
      throw new NotApplicable(reason);
    },
  };
  try {
    await policy.validateStack(args, (message, urn) => found.push({ policy: policy.name, message, urn }));
  } catch (e) {
    if (!(e instanceof NotApplicable)) throw e;
  }
  return found;
}

/** Every violation of every policy: each resource through each resource policy, the stack through each stack policy. */
export async function checkAll(policies: Policies, inputs: ResourceInput[]): Promise<Violation[]> {
  const found: Violation[] = [];
  for (const p of policies) {
    if (isStackPolicy(p)) found.push(...(await checkStack(p, inputs)));
    else if (isResourcePolicy(p))
      for (const r of inputs)
        for (const message of await checkResource(p, r))
          found.push({ policy: p.name, message, urn: urnOf(r.type, r.name) });
  }
  return found;
}

/**
 * The id mocks.ts gives a registered resource (its newResource answer): the
 * value another resource's input holds when it was given `<resource>.id`.
 */
function mockId(r: Registered): string {
  return r.type === "aws:ec2/amiFromInstance:AmiFromInstance" ? "ami-0123456789abcdef0" : `${r.name}-id`;
}

/**
 * The program's registrations as policy inputs: the props are the inputs plus
 * the id (a bridged provider's outputs carry it), and an input property whose
 * value is another resource's id depends on that resource, as the engine
 * records it. No resource name is assumed.
 */
export function fromRegistered(registered: Registered[]): ResourceInput[] {
  const byId = new Map<string, string>();
  for (const r of registered) byId.set(mockId(r), r.name);
  return registered.map((r) => {
    const propertyDependencies: Record<string, string[]> = {};
    for (const [k, v] of Object.entries(r.inputs)) {
      const from = typeof v === "string" ? byId.get(v) : undefined;
      if (from !== undefined && from !== r.name) propertyDependencies[k] = [from];
    }
    return { type: r.type, name: r.name, props: { ...r.inputs, id: mockId(r) }, propertyDependencies };
  });
}

// ---------------------------------------------------------------------------
// The real pack, served by run-policy-pack in a child process
// ---------------------------------------------------------------------------

/* eslint-disable @typescript-eslint/no-require-imports */
const analyzerRpc = require("@pulumi/pulumi/proto/analyzer_grpc_pb");
const analyzerPb = require("@pulumi/pulumi/proto/analyzer_pb");
const structPb = require("google-protobuf/google/protobuf/struct_pb");
const emptyPb = require("google-protobuf/google/protobuf/empty_pb");
/* eslint-enable @typescript-eslint/no-require-imports */

export const POLICY_DIR = path.resolve(__dirname, "..", "..", "policy");

export interface ServedPack {
  info(): Promise<{ name: string; version: string; policies: string[] }>;
  analyze(r: ResourceInput): Promise<Violation[]>;
  analyzeStack(inputs: ResourceInput[]): Promise<Violation[]>;
  stop(): void;
}

function unary<Req, Res>(client: any, method: string, req: Req): Promise<Res> {
  return new Promise((resolve, reject) =>
    client[method](req, (err: grpc.ServiceError | null, res: Res) => (err ? reject(err) : resolve(res))),
  );
}

function resourceOptions(o: Partial<PolicyResourceOptions> = {}): any {
  const opts = new analyzerPb.AnalyzerResourceOptions();
  opts.setProtect(o.protect ?? false);
  opts.setIgnorechangesList(o.ignoreChanges ?? []);
  return opts;
}

const LEVELS: Record<number, string> = { 0: "advisory", 1: "mandatory", 2: "disabled", 3: "remediate" };

/** What the engine sends for a value not known yet (during preview). */
export const UNKNOWN = "04da6b54-80e4-46f7-96ec-b56ff0331ba9";

function diagnostics(res: any): Violation[] {
  return res.getDiagnosticsList().map((d: any) => ({
    policy: d.getPolicyname(),
    message: d.getMessage(),
    urn: d.getUrn() || undefined,
    level: LEVELS[d.getEnforcementlevel()] ?? String(d.getEnforcementlevel()),
  }));
}

/**
 * Starts policy/ the way the Pulumi CLI does (`node run-policy-pack <engine> <pack dir>`
 * in the pack's folder, TypeScript type-checked with policy/tsconfig.json), waits
 * for the port it prints, and returns a client. `stop()` ends that child process.
 */
export async function servePack(timeoutMs: number): Promise<ServedPack> {
  // The pack's own @pulumi/pulumi once `npm install` ran in policy/ (as the CLI does), else the project's.
  const runner = require.resolve("@pulumi/pulumi/cmd/run-policy-pack", { paths: [POLICY_DIR] });
  const child: ChildProcess = spawn(process.execPath, [runner, "127.0.0.1:0", "."], {
    cwd: POLICY_DIR,
    stdio: ["ignore", "pipe", "pipe"],
  });
  let stderr = "";
  child.stderr!.on("data", (d: Buffer) => (stderr = (stderr + d.toString()).slice(-4000)));
  const port = await new Promise<number>((resolve, reject) => {
    let out = "";
    const timer = setTimeout(() => {
      child.kill("SIGKILL");
      reject(new Error(`the policy pack printed no port within ${timeoutMs} ms; stderr: ${stderr}`));
    }, timeoutMs);
    child.stdout!.on("data", (d: Buffer) => {
      out += d.toString();
      const m = /^(\d+)\s*$/m.exec(out);
      if (m) {
        clearTimeout(timer);
        resolve(Number(m[1]));
      }
    });
    child.on("exit", (code, signal) => {
      clearTimeout(timer);
      reject(new Error(`the policy pack exited (${code ?? signal}) before serving; stdout: ${out}; stderr: ${stderr}`));
    });
  });
  const client = new analyzerRpc.AnalyzerClient(`127.0.0.1:${port}`, grpc.credentials.createInsecure());

  return {
    info: async () => {
      const res: any = await unary(client, "getAnalyzerInfo", new emptyPb.Empty());
      return {
        name: res.getName(),
        version: res.getVersion(),
        policies: res.getPoliciesList().map((p: any) => p.getName()),
      };
    },
    analyze: async (r) => {
      const req = new analyzerPb.AnalyzeRequest();
      req.setType(r.type);
      req.setName(r.name);
      req.setUrn(urnOf(r.type, r.name));
      req.setProperties(structPb.Struct.fromJavaScript(r.props));
      req.setOptions(resourceOptions(r.opts));
      // A resource policy's diagnostic is about the resource analyzed: the engine fills in its URN.
      return diagnostics(await unary(client, "analyze", req)).map((d) => ({
        ...d,
        urn: d.urn ?? urnOf(r.type, r.name),
      }));
    },
    analyzeStack: async (inputs) => {
      const req = new analyzerPb.AnalyzeStackRequest();
      req.setResourcesList(
        inputs.map((r) => {
          const res = new analyzerPb.AnalyzerResource();
          res.setType(r.type);
          res.setName(r.name);
          res.setUrn(urnOf(r.type, r.name));
          res.setProperties(structPb.Struct.fromJavaScript(r.props));
          res.setOptions(resourceOptions(r.opts));
          const deps = new Set<string>();
          for (const [prop, names] of Object.entries(r.propertyDependencies ?? {})) {
            const pd = new analyzerPb.AnalyzerPropertyDependencies();
            const urns = names.map((n) => {
              const d = inputs.find((x) => x.name === n);
              if (!d) throw new Error(`${r.name}.${prop} depends on ${n}, which is not among the resources`);
              return urnOf(d.type, d.name);
            });
            pd.setUrnsList(urns);
            res.getPropertydependenciesMap().set(prop, pd);
            urns.forEach((u) => deps.add(u));
          }
          res.setDependenciesList([...deps]);
          return res;
        }),
      );
      return diagnostics(await unary(client, "analyzeStack", req));
    },
    stop: () => {
      client.close();
      if (child.exitCode === null && child.signalCode === null) child.kill("SIGTERM");
    },
  };
}
