import * as aws from "@pulumi/aws";
import * as command from "@pulumi/command";
import * as pulumi from "@pulumi/pulumi";
import * as fs from "fs";
import {
  BAKE_FILES,
  bakeKitKey,
  bakePolicyDocument,
  bakeStatusUri,
  DEFAULT_BAKE_TIMEOUT_S,
  defaultAmiVolumeGiB,
  renderBakeKit,
  renderBakeUserData,
} from "../bake";
import { WindowsVersion } from "../config";
import { EC2_ASSUME_ROLE_POLICY, HOST_PACKAGES } from "../hostSetup";
import { repoPath } from "../paths";
import { PipelineContext } from "../pipeline/context";
import { awsCommand, IGNORED_INPUTS, LOCAL_MARGIN_MINUTES } from "../pipeline/runner";
import { Manifest } from "../manifest";

export interface AmiBakeArgs {
  ctx: PipelineContext;
  /** The published image's manifest, and the exact JSON line publish printed. */
  manifest: pulumi.Output<Manifest>;
  manifestJson: pulumi.Output<string>;
  /** The baked image's VM env file (no config ISO; halts the instance on exit). */
  imageEnv: string;
  bucketArn: pulumi.Input<string>;
  bucketName: pulumi.Input<string>;
  artifactPrefix: string;
  /** s3://bucket/prefix/ the image was published to. */
  artifactUri: pulumi.Input<string>;
  /** The host AMI (Ubuntu arm64) the bake instance starts from. */
  amiId: pulumi.Input<string>;
  subnetId?: string;
  vpcId: pulumi.Input<string>;
  instanceType: string;
  /** Root volume of the AMI; undefined: derived from the image's virtual size. */
  volumeGiB?: number;
  windowsVersion: WindowsVersion;
  sourceImageUrl: string;
  stack: string;
  /** The image matrix variant this AMI is of (its name goes into the AMI name after the stack's). */
  variant?: string;
  retainOnDelete: boolean;
  /** AWS_REGION (and AWS_PROFILE when set) for the AWS CLI where Pulumi runs. */
  awsEnv: pulumi.Input<Record<string, string>>;
  tags: Record<string, string>;
}

/**
 * The AMI name: the image's SHA-256 and publication date, and the digest of
 * what the bake installs around it (launcher, unit, env, bake scripts):
 * stable across reruns, new when either changes.
 */
export function amiName(
  stack: string,
  version: string,
  m: Pick<Manifest, "sha256" | "createdAt">,
  bakeDigest: string,
): string {
  const date = m.createdAt.slice(0, 10).replace(/-/g, "");
  return `windows-arm64-${version}-${stack}-${date}-${m.sha256.slice(0, 16)}-${bakeDigest.slice(0, 8)}`;
}

/** bake-instance.sh's result line (the last line of its stdout). */
export function parseBakeResult(stdout: string): { instanceId: string } {
  const line = stdout.trim().split("\n").filter(Boolean).pop() ?? "";
  let r: { instanceId?: unknown };
  try {
    r = JSON.parse(line) as { instanceId?: unknown };
  } catch {
    throw new Error(`bake-instance.sh did not print its result (last line: ${JSON.stringify(line.slice(0, 200))})`);
  }
  if (typeof r.instanceId !== "string" || !/^i-[0-9a-f]{8,17}$/.test(r.instanceId))
    throw new Error(`bake-instance.sh printed no instance id (${JSON.stringify(line.slice(0, 200))})`);
  return { instanceId: r.instanceId };
}

/**
 * The clean bake: a short-lived, small Graviton instance from the host AMI
 * fetches the published disk, EFI vars and firmware, verifies each against
 * the manifest, installs the VM unit, generalizes itself and powers off
 * (bake-image.sh, in its user data); the AMI is taken from it while it is
 * stopped; then it is terminated. The build host is not involved.
 */
export class AmiBake extends pulumi.ComponentResource {
  readonly ami: aws.ec2.AmiFromInstance;
  readonly amiId: pulumi.Output<string>;
  readonly amiName: pulumi.Output<string>;

  constructor(name: string, args: AmiBakeArgs, opts?: pulumi.ComponentResourceOptions) {
    super("windows-arm64-image:pipeline:AmiBake", name, {}, opts);
    const { ctx } = args;
    const child = { parent: this };
    const tags = (suffix: string) => ({ ...args.tags, Name: `${name}-${suffix}` });

    // Its own role: read the published files, write its status; nothing else.
    const role = new aws.iam.Role(
      `${name}-role`,
      { assumeRolePolicy: JSON.stringify(EC2_ASSUME_ROLE_POLICY), tags: tags("role") },
      child,
    );
    const policy = new aws.iam.RolePolicy(
      `${name}-artifacts`,
      {
        role: role.id,
        policy: pulumi
          .output(args.bucketArn)
          .apply((arn) => JSON.stringify(bakePolicyDocument(arn, args.artifactPrefix))),
      },
      child,
    );
    const profile = new aws.iam.InstanceProfile(`${name}-profile`, { role: role.name, tags: tags("profile") }, child);
    // No inbound rule at all: nothing logs in to a bake instance.
    const sg = new aws.ec2.SecurityGroup(
      `${name}-egress`,
      {
        description: "windows-arm64-image bake instance: no inbound access",
        vpcId: args.vpcId,
        egress: [
          {
            description: "Packages and the published image (S3)",
            protocol: "-1",
            fromPort: 0,
            toPort: 0,
            cidrBlocks: ["0.0.0.0/0"],
            ipv6CidrBlocks: ["::/0"],
          },
        ],
        tags: tags("egress"),
      },
      child,
    );

    const bakeStage = ctx.plan.stage("bakeImage");
    // The scripts the bake instance runs travel as one content-addressed object (the user data is small).
    const kit = renderBakeKit(Object.fromEntries(BAKE_FILES.map((f) => [f, fs.readFileSync(repoPath(f), "utf8")])));
    const kitKey = bakeKitKey(args.artifactPrefix, kit.sha256);
    const kitObject = new aws.s3.BucketObjectv2(
      `${name}-kit`,
      {
        bucket: args.bucketName,
        key: kitKey,
        contentBase64: kit.body.toString("base64"),
        contentType: "application/gzip",
        tags: tags("kit"),
      },
      child,
    );
    const kitUri = pulumi.interpolate`s3://${args.bucketName}/${kitKey}`;
    const statusUri = pulumi
      .all([args.artifactUri, args.manifest])
      .apply(([uri, m]) => bakeStatusUri(uri, `${m.sha256.slice(0, 16)}-${bakeStage.digest.slice(0, 8)}`));
    const userData = pulumi
      .all([args.manifestJson, statusUri, args.awsEnv, kitUri])
      .apply(([manifestJson, status, env, uri]) =>
        renderBakeUserData({
          manifestJson,
          imageEnv: args.imageEnv,
          statusUri: status,
          kit: { uri, sha256: kit.sha256 },
          packages: HOST_PACKAGES,
          region: env.AWS_REGION,
        }).toString("base64"),
      );
    const volumeGiB = args.manifest.apply((m) => String(args.volumeGiB ?? defaultAmiVolumeGiB(Number(m.virtualSize))));
    const bakeTags = JSON.stringify(Object.entries(tags("bake")).map(([Key, Value]) => ({ Key, Value })));
    const bake = new command.local.Command(
      `${name}-instance`,
      {
        create: awsCommand("exec bash provisioning/bake-instance.sh run"),
        // The user data (no secret in it) as base64 on stdin.
        stdin: userData,
        environment: pulumi.all([args.awsEnv, volumeGiB, statusUri]).apply(([env, vol, status]) => ({
          AWS_PROFILE: "",
          ...env,
          BAKE_AMI_ID: args.amiId,
          BAKE_INSTANCE_TYPE: args.instanceType,
          BAKE_VOLUME_GIB: vol,
          ...(args.subnetId ? { BAKE_SUBNET_ID: args.subnetId } : {}),
          BAKE_SECURITY_GROUP_ID: sg.id,
          BAKE_INSTANCE_PROFILE: profile.name,
          BAKE_STATUS_URI: status,
          BAKE_TAGS_JSON: bakeTags,
          BAKE_TIMEOUT_S: String(DEFAULT_BAKE_TIMEOUT_S),
        })),
        // A new image or a change to what the bake installs bakes again; nothing else does.
        triggers: [bakeStage.digest, args.manifest.apply((m) => m.sha256)],
        logging: "stdoutAndStderr",
        interpreter: ["/bin/bash", "-c"],
        addPreviousOutputInEnv: false,
      },
      {
        parent: this,
        dependsOn: [...ctx.dependencies(bakeStage), policy, profile, kitObject],
        customTimeouts: {
          create: `${bakeStage.timeoutMinutes + LOCAL_MARGIN_MINUTES}m`,
          update: `${bakeStage.timeoutMinutes + LOCAL_MARGIN_MINUTES}m`,
        },
        ignoreChanges: IGNORED_INPUTS,
      },
    );
    ctx.record("bakeImage", bake);
    const instanceId = bake.stdout.apply((out) => parseBakeResult(out).instanceId);

    const amiStage = ctx.plan.stage("bakeAmi");
    const amiStack = args.variant ? `${args.stack}-${args.variant}` : args.stack;
    const nameOut = args.manifest.apply((m) => amiName(amiStack, args.windowsVersion, m, bakeStage.digest));
    this.ami = new aws.ec2.AmiFromInstance(
      `${name}-ami`,
      {
        name: nameOut,
        sourceInstanceId: instanceId,
        // The instance is stopped: nothing to reboot, a consistent snapshot.
        snapshotWithoutReboot: true,
        description: pulumi.interpolate`Windows ARM64 ${args.windowsVersion} CI builder host, image sha256 ${args.manifest.apply((m) => m.sha256)}`,
        tags: {
          ...args.tags,
          Name: nameOut,
          WindowsVersion: args.windowsVersion,
          ImageSha256: args.manifest.apply((m) => m.sha256),
          ImageUri: args.manifest.apply((m) => m.imageUri),
          SourceImage: args.sourceImageUrl,
          Stack: args.stack,
          // Policies cannot see retainOnDelete: the policy pack reads this tag.
          RetainOnDelete: String(args.retainOnDelete),
        } as Record<string, pulumi.Input<string>>,
      },
      {
        parent: this,
        dependsOn: [bake],
        retainOnDelete: args.retainOnDelete,
        customTimeouts: { create: `${amiStage.timeoutMinutes}m`, delete: "30m" },
      },
    );
    ctx.record("bakeAmi", this.ami);

    // The bake instance has done its work once the AMI exists.
    new command.local.Command(
      `${name}-terminate`,
      {
        create: pulumi.interpolate`${awsCommand("exec bash provisioning/bake-instance.sh terminate")} ${instanceId}`,
        environment: pulumi.output(args.awsEnv).apply((env) => ({ AWS_PROFILE: "", ...env })),
        triggers: [instanceId],
        logging: "stdoutAndStderr",
        interpreter: ["/bin/bash", "-c"],
        addPreviousOutputInEnv: false,
      },
      { parent: this, dependsOn: [this.ami], customTimeouts: { create: "20m" }, ignoreChanges: IGNORED_INPUTS },
    );

    this.amiId = this.ami.id;
    this.amiName = this.ami.name;
    this.registerOutputs({ amiId: this.amiId, amiName: this.amiName });
  }
}
