/**
 * The one shared Pulumi mocks module: runs infra/index.ts under
 * pulumi.runtime.setMocks with a given config and records every resource
 * registration (type, name, URN, inputs, resource options, order) and every
 * provider function call.
 */
import * as pulumi from "@pulumi/pulumi";
import * as path from "path";
import { sampleManifest } from "./manifest";
// eslint-disable-next-line @typescript-eslint/no-require-imports
const mocksModule = require("@pulumi/pulumi/runtime/mocks") as {
  MockMonitor: { prototype: { registerResource: (req: unknown, cb: unknown) => Promise<void> } };
};

/** The resource options the engine receives with a registration (the mock's newResource does not see them). */
export interface RegisteredOptions {
  ignoreChanges: string[];
  customTimeouts: { create?: string; update?: string; delete?: string };
  additionalSecretOutputs: string[];
  /** undefined when the program did not set it. */
  retainOnDelete?: boolean;
  /** URNs of the resources this one waits for (dependsOn, components expanded, and its inputs' resources). */
  dependencies: string[];
  /** URN of the parent ("" for the stack's direct children). */
  parent: string;
}

export interface Registered {
  type: string;
  name: string;
  /** The URN the mock monitor gives it (parent types folded in). */
  urn: string;
  inputs: Record<string, unknown>;
  options: RegisteredOptions;
  /** Order in which the engine saw the registration. */
  seq: number;
}

export interface ProgramRun {
  resources: Registered[];
  calls: Array<{ token: string; inputs: Record<string, unknown> }>;
  outputs: Record<string, unknown>;
  /** The names of the stack outputs that are secrets. */
  secretOutputs: string[];
  /** All resources of a type (token), in registration order. */
  ofType(type: string): Registered[];
  /** The single resource of a type and (optional) name suffix; throws if not exactly one. */
  one(type: string, nameSuffix?: string): Registered;
  /** The resource with this URN; throws when there is none. */
  byUrn(urn: string): Registered;
  /** Whether `later` waits for `earlier`, directly or through other resources. */
  waitsFor(later: Registered, earlier: Registered): boolean;
}

export const PROJECT = "windows-arm64-image";

/** The registrations of the latest runProgram, even when the program threw. */
export let lastRunResources: Registered[] = [];

/** Pulumi's wire form of a secret input is an object holding this key (and `value`). */
export const SECRET_SIG = "4dabf18193072939515e22adb298388d";

/** Whether a registered input value arrived as a secret. */
export function isSecret(v: unknown): boolean {
  return typeof v === "object" && v !== null && SECRET_SIG in (v as Record<string, unknown>);
}

/** The value inside a secret-wrapped input (other values as they are). */
export function unwrap(v: unknown): unknown {
  return isSecret(v) ? (v as { value: unknown }).value : v;
}

/** The key pairs the tls mock returns: "guest-key" (and a variant's "<name>-guest-key") gets the guest's, any other the pipeline's. */
export const MOCK_KEYS = {
  pipeline: {
    privateKey: "-----BEGIN OPENSSH PRIVATE KEY-----\nMOCKPRIVATEKEYDATA\n-----END OPENSSH PRIVATE KEY-----\n",
    privateMaterial: "MOCKPRIVATEKEYDATA",
    publicKey: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMockPublicKey pipeline",
  },
  guest: {
    privateKey: "-----BEGIN OPENSSH PRIVATE KEY-----\nMOCKGUESTONLYKEYDATA\n-----END OPENSSH PRIVATE KEY-----\n",
    privateMaterial: "MOCKGUESTONLYKEYDATA",
    publicKey: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMockGuestOnlyKey guest",
  },
} as const;

/** The password the random mock returns. */
export const MOCK_PASSWORD = "Mock-Guest-Passw0rd!xyz";

/** What the bake command prints on success (bake-instance.sh's status line). */
/** The Ubuntu AMI getAmi finds (shaped as AWS shapes ids: the scripts check them). */
export const MOCK_HOST_AMI_ID = "ami-0a1b2c3d4e5f60718";
export const MOCK_BAKE_INSTANCE_ID = "i-0bac0000000000001";
/** The subnet an instance without subnetId lands in (the default VPC's). */
export const MOCK_DEFAULT_SUBNET_ID = "subnet-0defa0170000000001";
/** The smoke-test instance the smoke command reports. */
export const MOCK_SMOKE_INSTANCE_ID = "i-05e0ce0000000000a";

/**
 * runProgram loads infra/ afresh each time (its modules read the config when
 * they load): ts-node would transpile every file again. Keep each file's
 * JavaScript for the exact source text it came from, so an edited file is
 * transpiled again and the program runs the same code it always did.
 */
function keepTranspiles(): void {
  const service = (process as unknown as Record<symbol, unknown>)[Symbol.for("ts-node.register.instance")] as
    { compile(code: string, fileName: string, lineOffset?: number): string } | undefined;
  if (!service) return;
  const compile = service.compile.bind(service);
  const kept = new Map<string, { code: string; js: string }>();
  service.compile = (code, fileName, lineOffset = 0) => {
    const hit = kept.get(fileName);
    if (hit && hit.code === code && lineOffset === 0) return hit.js;
    const js = compile(code, fileName, lineOffset);
    if (lineOffset === 0) kept.set(fileName, { code, js });
    return js;
  };
}

/**
 * Two stack traces the Pulumi SDK takes that no test reads, and that cost most
 * of a mock run's CPU (ts-node's source-map-support maps every frame to the
 * TypeScript):
 * - debuggablePromise (four per output property of every resource) keeps one
 *   for its report of promises still pending at exit: taken without frames
 *   here; the report still names each promise's context (resource, property).
 * - Resource.callsites takes the whole stack for each resource's source
 *   position, which only the mock monitor receives: formatted without the
 *   mapping (positions in the transpiled JavaScript).
 * Every other error's stack is mapped as before.
 */
function cheapPulumiTraces(): void {
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  const debuggable = require("@pulumi/pulumi/runtime/debuggable") as {
    debuggablePromise: (p: Promise<unknown>, ctx: unknown) => Promise<unknown>;
  };
  const withStack = debuggable.debuggablePromise;
  debuggable.debuggablePromise = (p, ctx) => {
    const limit = Error.stackTraceLimit;
    Error.stackTraceLimit = 0;
    try {
      return withStack(p, ctx);
    } finally {
      Error.stackTraceLimit = limit;
    }
  };
  const mapped = Error.prepareStackTrace;
  if (!mapped) return;
  const resourceJs = path.join("@pulumi", "pulumi", "resource.js");
  Error.prepareStackTrace = (err, frames) =>
    frames[0]?.getFunctionName() === "callsites" && frames[0].getFileName()?.endsWith(resourceJs)
      ? [String(err), ...frames.map((f) => `    at ${String(f)}`)].join("\n")
      : mapped(err, frames);
}

let sped = false;
function speedUp(): void {
  if (sped) return;
  sped = true;
  keepTranspiles();
  cheapPulumiTraces();
}

// The mock monitor hands newResource no resource options: keep them per URN as requests arrive.
const optionsByUrn = new Map<string, RegisteredOptions>();
let patched = false;
function urnOf(parent: string, type: string, name: string): string {
  const t = parent ? `${parent.split("::")[2].split("$").pop()}$${type}` : type;
  return `urn:pulumi:${pulumi.getStack()}::${pulumi.getProject()}::${t}::${name}`;
}
function patchMonitor(): void {
  if (patched) return;
  patched = true;
  const original = mocksModule.MockMonitor.prototype.registerResource;
  mocksModule.MockMonitor.prototype.registerResource = function (req: unknown, cb: unknown) {
    const r = req as {
      getType(): string;
      getName(): string;
      getParent(): string;
      getIgnorechangesList(): string[];
      getCustomtimeouts(): { getCreate(): string; getUpdate(): string; getDelete(): string } | undefined;
      getAdditionalsecretoutputsList(): string[];
      hasRetainondelete(): boolean;
      getRetainondelete(): boolean | undefined;
      getDependenciesList(): string[];
    };
    const t = r.getCustomtimeouts();
    optionsByUrn.set(urnOf(r.getParent(), r.getType(), r.getName()), {
      ignoreChanges: r.getIgnorechangesList(),
      customTimeouts: t
        ? { create: t.getCreate() || undefined, update: t.getUpdate() || undefined, delete: t.getDelete() || undefined }
        : {},
      additionalSecretOutputs: r.getAdditionalsecretoutputsList(),
      retainOnDelete: r.hasRetainondelete() ? r.getRetainondelete() : undefined,
      dependencies: r.getDependenciesList(),
      parent: r.getParent(),
    });
    return original.call(this, req, cb);
  };
}

/** A config that validates for the aws target. */
export const BASE_CONFIG: Record<string, string> = {
  "aws:region": "us-east-2",
  sshAllowedCidrs: JSON.stringify(["203.0.113.7/32"]),
  windowsImageUrl: "s3://media-bucket/images/win11-23h2.vhdx",
  windowsImageSha256: "a".repeat(64),
  windowsVersion: "11-23h2",
  guestInstallBuildlet: "false",
  guestInstallLlvmMingw: "false",
  guestInstallVsBuildTools: "false",
};

/** Provider-computed state the real providers would return. */
function computedState(type: string, name: string, inputs: Record<string, unknown>): Record<string, unknown> {
  switch (type) {
    case "aws:s3/bucket:Bucket":
      return { bucket: `${name}-bucket-123`, arn: `arn:aws:s3:::${name}-bucket-123` };
    case "aws:ec2/instance:Instance":
      // The auto-assigned address, lost at each stop: nothing may connect to it. Without a subnet, the default VPC's.
      return {
        publicIp: "203.0.113.250",
        publicDns: "ec2-203-0-113-250.us-east-2.compute.amazonaws.com",
        subnetId: inputs.subnetId ?? MOCK_DEFAULT_SUBNET_ID,
      };
    case "aws:ec2/eip:Eip":
      return {
        publicIp: "198.51.100.10",
        publicDns: "ec2-198-51-100-10.us-east-2.compute.amazonaws.com",
        allocationId: "eipalloc-0123",
      };
    case "aws:iam/role:Role":
      return { arn: `arn:aws:iam::123456789012:role/${name}`, name };
    case "aws:iam/instanceProfile:InstanceProfile":
      return { name, arn: `arn:aws:iam::123456789012:instance-profile/${name}` };
    case "aws:ec2/keyPair:KeyPair":
      return { keyName: name };
    case "tls:index/privateKey:PrivateKey":
      // Each key its own material, so a test can tell the pipeline's key from the guest's.
      return name === "guest-key" || name.endsWith("-guest-key")
        ? { privateKeyOpenssh: MOCK_KEYS.guest.privateKey, publicKeyOpenssh: `${MOCK_KEYS.guest.publicKey}\n` }
        : { privateKeyOpenssh: MOCK_KEYS.pipeline.privateKey, publicKeyOpenssh: MOCK_KEYS.pipeline.publicKey };
    case "random:index/randomPassword:RandomPassword":
      return { result: MOCK_PASSWORD };
    case "command:local:Command":
      return { stdout: mockStdout(inputs), stderr: "" };
    case "aws:ec2/amiFromInstance:AmiFromInstance":
      return { arn: "arn:aws:ec2:us-east-2::image/ami-0123456789abcdef0" };
    default:
      return {};
  }
}

/**
 * What a command prints: the publish stage its manifestVersion 2 manifest as
 * one JSON line (under the URI its command publishes to), the bake its status
 * line with the bake instance's id.
 */
function mockStdout(inputs: Record<string, unknown>): string {
  const create = String(unwrap(inputs.create) ?? "");
  // The stage's command: publish-image.sh VM_DIR URI (quoted once, or twice inside host-exec.sh's).
  const uri = /publish-image\.sh \S+ \S*?((?:s3|file):\/\/[^'\s\\]+)/.exec(create)?.[1];
  if (uri) return JSON.stringify(sampleManifest(uri.replace(/\/$/, "")));
  if (/bake-instance\.sh run/.test(create)) {
    return JSON.stringify({ instanceId: MOCK_BAKE_INSTANCE_ID, status: "ok", imageSha256: "c".repeat(64) });
  }
  if (/smoke-test\.sh run/.test(create)) {
    const env = unwrap(inputs.environment) as Record<string, unknown> | undefined;
    return JSON.stringify({
      amiId: unwrap(env?.SMOKE_AMI_ID),
      instanceId: MOCK_SMOKE_INSTANCE_ID,
      guest: `127.0.0.1:${String(unwrap(env?.SMOKE_GUEST_PORT))}`,
      passedAt: "2026-12-01T00:00:00Z",
    });
  }
  return "";
}

/** What the provider functions the program calls return (the lifecycle engine uses the same). */
export function callResult(token: string, inputs: Record<string, unknown>): Record<string, unknown> {
  switch (token) {
    case "aws:ec2/getAmi:getAmi":
      return { id: MOCK_HOST_AMI_ID, name: "ubuntu-noble-24.04-arm64-server-20261101" };
    case "aws:ec2/getVpc:getVpc":
      return { id: "vpc-0default" };
    case "aws:ec2/getSubnet:getSubnet":
      return { id: inputs.id, vpcId: "vpc-0fromsubnet" };
    case "aws:index/getRegion:getRegion":
      return { region: "us-east-2", name: "us-east-2" };
    case "aws:index/getPartition:getPartition":
      return { partition: "aws", dnsSuffix: "amazonaws.com" };
    case "aws:s3/getBucket:getBucket":
      return { id: inputs.bucket, bucket: inputs.bucket, arn: `arn:aws:s3:::${inputs.bucket}` };
    case "tls:index/getPublicKey:getPublicKey":
      return { publicKeyOpenssh: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGivenKey given" };
    default:
      return {};
  }
}

/**
 * Runs the program with `config` (keys without the project prefix unless they
 * contain ":") and waits until registrations settle. `asyncDelayMs` makes the
 * mock answer each registration asynchronously, so ordering bugs show.
 */
export async function runProgram(
  config: Record<string, string>,
  opts: { secretKeys?: string[]; asyncDelayMs?: number; stack?: string } = {},
): Promise<ProgramRun> {
  patchMonitor();
  speedUp();
  const resources: Registered[] = [];
  lastRunResources = resources;
  const calls: ProgramRun["calls"] = [];
  let seq = 0;
  const delay = opts.asyncDelayMs ?? 0;

  pulumi.runtime.setMocks(
    {
      newResource: async (args: pulumi.runtime.MockResourceArgs) => {
        // The monitor registered it just now: the last URN with this type and name.
        const urn = [...optionsByUrn.keys()].filter((u) => u.endsWith(`${args.type}::${args.name}`)).pop() ?? "";
        const options = optionsByUrn.get(urn) ?? {
          ignoreChanges: [],
          customTimeouts: {},
          additionalSecretOutputs: [],
          dependencies: [],
          parent: "",
        };
        resources.push({ type: args.type, name: args.name, urn, inputs: args.inputs, options, seq: seq++ });
        if (delay > 0) await new Promise((r) => setTimeout(r, delay * Math.random()));
        const id =
          args.type === "aws:ec2/amiFromInstance:AmiFromInstance" ? "ami-0123456789abcdef0" : `${args.name}-id`;
        return { id, state: { ...args.inputs, ...computedState(args.type, args.name, args.inputs) } };
      },
      call: async (args: pulumi.runtime.MockCallArgs) => {
        calls.push({ token: args.token, inputs: args.inputs });
        return callResult(args.token, args.inputs);
      },
    },
    PROJECT,
    opts.stack ?? "test",
    false,
  );
  const full: Record<string, string> = {};
  for (const [k, v] of Object.entries(config)) full[k.includes(":") ? k : `${PROJECT}:${k}`] = v;
  const secretKeys = (opts.secretKeys ?? []).map((k) => (k.includes(":") ? k : `${PROJECT}:${k}`));
  pulumi.runtime.setAllConfig(full, secretKeys);

  const infraDir = path.resolve(__dirname, "..", "..", "infra");
  for (const key of Object.keys(require.cache)) if (key.startsWith(infraDir)) delete require.cache[key];
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  const program = require(path.join(infraDir, "index")) as Record<string, unknown>;

  const outputs: Record<string, unknown> = {};
  const secretOutputs: string[] = [];
  for (const [k, v] of Object.entries(program)) {
    outputs[k] = await resolve(v);
    if (pulumi.Output.isInstance(v) && (await pulumi.isSecret(v as pulumi.Output<unknown>))) secretOutputs.push(k);
  }
  // Resources declared inside apply() callbacks register later: wait until none arrive.
  let last = -1;
  while (last !== resources.length) {
    last = resources.length;
    await new Promise((r) => setTimeout(r, 50 + delay * 2));
  }
  const byUrn = (urn: string) => {
    const r = resources.find((x) => x.urn === urn);
    if (!r) throw new Error(`no resource ${urn}`);
    return r;
  };
  const waitsFor = (later: Registered, earlier: Registered): boolean => {
    const seen = new Set<string>();
    const todo = [...later.options.dependencies];
    while (todo.length) {
      const u = todo.pop() as string;
      if (u === earlier.urn) return true;
      if (seen.has(u)) continue;
      seen.add(u);
      const r = resources.find((x) => x.urn === u);
      if (r) todo.push(...r.options.dependencies);
    }
    return false;
  };
  return {
    resources,
    calls,
    outputs,
    secretOutputs,
    byUrn,
    waitsFor,
    ofType: (type) => resources.filter((r) => r.type === type),
    one: (type, suffix) => {
      const found = resources.filter((r) => r.type === type && (!suffix || r.name.endsWith(suffix)));
      if (found.length !== 1)
        throw new Error(`expected one ${type}${suffix ? ` *${suffix}` : ""}, found ${found.length}`);
      return found[0];
    },
  };
}

/**
 * The value of an Output (or plain value); undefined for unknowns. Rejects
 * when the output failed (an apply threw), rather than waiting forever.
 */
export function resolve<T>(v: T | pulumi.Output<T>): Promise<T | undefined> {
  if (pulumi.Output.isInstance(v)) return (v as unknown as { promise(): Promise<T | undefined> }).promise();
  return Promise.resolve(v as T);
}

/** Every string anywhere inside a value (for secret-leak checks). */
export function allStrings(v: unknown, out: string[] = []): string[] {
  if (typeof v === "string") out.push(v);
  else if (Array.isArray(v)) v.forEach((x) => allStrings(x, out));
  else if (v && typeof v === "object") Object.values(v).forEach((x) => allStrings(x, out));
  return out;
}
