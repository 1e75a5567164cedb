/**
 * The one shared Pulumi mocks module: runs infra/index.ts under
 * pulumi.runtime.setMocks with a given config and records every resource
 * registration (type, name, inputs, order) and every provider function call.
 */
import * as pulumi from "@pulumi/pulumi";
import * as path from "path";

export interface Registered {
  type: string;
  name: string;
  inputs: Record<string, unknown>;
  /** Order in which the engine saw the registration. */
  seq: number;
}

export interface ProgramRun {
  resources: Registered[];
  calls: Array<{ token: string; inputs: Record<string, unknown> }>;
  outputs: Record<string, unknown>;
  /** All resources of a type (token), in registration order. */
  ofType(type: string): Registered[];
  /** The single resource of a type and (optional) name suffix; throws if not exactly one. */
  one(type: string, nameSuffix?: string): Registered;
}

export const PROJECT = "windows-arm64-image";

/** The registrations of the latest runProgram, even when the program threw. */
export let lastRunResources: Registered[] = [];

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
      // The auto-assigned address, lost at each stop: nothing may connect to it.
      return { publicIp: "203.0.113.250", publicDns: "ec2-203-0-113-250.us-east-2.compute.amazonaws.com" };
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
      return {
        privateKeyOpenssh:
          "-----BEGIN OPENSSH PRIVATE KEY-----\nMOCKPRIVATEKEYDATA\n-----END OPENSSH PRIVATE KEY-----\n",
        publicKeyOpenssh: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMockPublicKey pipeline",
      };
    case "random:index/randomPassword:RandomPassword":
      return { result: "Mock-Guest-Passw0rd!xyz" };
    case "command:remote:Command":
    case "command:local:Command":
      return { stdout: mockStdout(name, inputs), stderr: "" };
    case "aws:ec2/amiFromInstance:AmiFromInstance":
      return { arn: "arn:aws:ec2:us-east-2::image/ami-0123456789abcdef0" };
    default:
      return {};
  }
}

/** What a command prints: the publish step prints its manifest as one JSON line. */
function mockStdout(name: string, _inputs: Record<string, unknown>): string {
  if (/publish/.test(name)) {
    const sha = "c".repeat(64);
    return JSON.stringify({
      sha256: sha,
      size: 12345,
      imageUri: `s3://artifacts-bucket-123/windows-arm64/${sha}/disk.qcow2`,
      manifestUri: `s3://artifacts-bucket-123/windows-arm64/${sha}/manifest.json`,
      createdAt: "2026-11-26T08:00:00Z",
    });
  }
  return "";
}

function callResult(token: string, inputs: Record<string, unknown>): Record<string, unknown> {
  switch (token) {
    case "aws:ec2/getAmi:getAmi":
      return { id: "ami-0ubuntu2404arm64", name: "ubuntu-noble-24.04-arm64-server-20261101" };
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
  const resources: Registered[] = [];
  lastRunResources = resources;
  const calls: ProgramRun["calls"] = [];
  let seq = 0;
  const delay = opts.asyncDelayMs ?? 0;

  pulumi.runtime.setMocks(
    {
      newResource: async (args: pulumi.runtime.MockResourceArgs) => {
        resources.push({ type: args.type, name: args.name, inputs: args.inputs, seq: seq++ });
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
  for (const [k, v] of Object.entries(program)) outputs[k] = await resolve(v);
  // Resources declared inside apply() callbacks register later: wait until none arrive.
  let last = -1;
  while (last !== resources.length) {
    last = resources.length;
    await new Promise((r) => setTimeout(r, 50 + delay * 2));
  }
  return {
    resources,
    calls,
    outputs,
    ofType: (type) => resources.filter((r) => r.type === type),
    one: (type, suffix) => {
      const found = resources.filter((r) => r.type === type && (!suffix || r.name.endsWith(suffix)));
      if (found.length !== 1)
        throw new Error(`expected one ${type}${suffix ? ` *${suffix}` : ""}, found ${found.length}`);
      return found[0];
    },
  };
}

/** The value of an Output (or plain value); undefined for unknowns. */
export function resolve<T>(v: T | pulumi.Output<T>): Promise<T | undefined> {
  if (pulumi.Output.isInstance(v))
    return new Promise((r) =>
      (v as pulumi.Output<T>).apply((x) => {
        r(x);
        return x;
      }),
    );
  return Promise.resolve(v as T);
}

/** Every string anywhere inside a value (for secret-leak checks). */
export function allStrings(v: unknown, out: string[] = []): string[] {
  if (typeof v === "string") out.push(v);
  else if (Array.isArray(v)) v.forEach((x) => allStrings(x, out));
  else if (v && typeof v === "object") Object.values(v).forEach((x) => allStrings(x, out));
  return out;
}
