import * as aws from "@pulumi/aws";
import * as command from "@pulumi/command";
import * as pulumi from "@pulumi/pulumi";
import { WindowsVersion } from "../config";
import { PipelineContext } from "../pipeline/context";
import { runHostStage } from "../pipeline/runner";
import { Manifest } from "./imagePublication";

export interface AmiBakeArgs {
  ctx: PipelineContext;
  instanceId: pulumi.Input<string>;
  manifest: pulumi.Output<Manifest>;
  /** The baked image's VM env file (no config ISO; halts the host on exit). */
  imageEnv: string;
  windowsVersion: WindowsVersion;
  sourceImageUrl: string;
  stack: string;
  keepHostRunning: boolean;
  retainOnDelete: boolean;
  /** The host's wake key (see QemuHost): a run that started the host stops it again. */
  wakeKey: pulumi.Input<string>;
  /** Environment for the AWS CLI run where Pulumi runs (AWS_REGION, AWS_PROFILE). */
  awsCliEnv: pulumi.Input<Record<string, string>>;
  /** Other commands on the host (outside the plan) that must finish before it is stopped. */
  hostWork: pulumi.Resource[];
  /** A type change makes EC2 stop and start the host: it is stopped again afterwards. */
  instanceType: string;
  tags: Record<string, string>;
}

/**
 * The AMI name: the image's SHA-256 and publication date, and the digest of
 * what prepare-ami installed around it (launcher, unit, env): stable across
 * reruns, new when either changes (AWS reads the instance only at creation).
 */
export function amiName(
  stack: string,
  version: string,
  m: Pick<Manifest, "sha256" | "createdAt">,
  prepareDigest: string,
): string {
  const date = m.createdAt.slice(0, 10).replace(/-/g, "");
  return `windows-arm64-${version}-${stack}-${date}-${m.sha256.slice(0, 16)}-${prepareDigest.slice(0, 8)}`;
}

/**
 * Prepares the host for imaging, stops it (unless asked to keep it running),
 * then bakes the AMI: from a stopped host the snapshot is consistent and no
 * reboot boots the image's VM on the build host.
 */
export class AmiBake extends pulumi.ComponentResource {
  readonly ami: aws.ec2.AmiFromInstance;
  readonly amiId: pulumi.Output<string>;
  readonly amiName: pulumi.Output<string>;

  constructor(name: string, args: AmiBakeArgs, opts?: pulumi.ComponentResourceOptions) {
    super("windows-arm64-image:pipeline:AmiBake", name, {}, opts);
    const { ctx } = args;
    const prep = ctx.plan.stage("prepareAmi");
    const prepared = runHostStage(
      ctx.runner,
      prep,
      { name: `${name}-prepare`, stdin: args.imageEnv },
      { parent: this, dependsOn: ctx.dependencies(prep) },
    );
    ctx.record("prepareAmi", prepared);

    const stop = ctx.plan.stage("stopHost");
    let beforeAmi: pulumi.Resource = prepared;
    if (!args.keepHostRunning) {
      const stopped = new command.local.Command(
        `${name}-stop-host`,
        {
          create: pulumi.interpolate`bash provisioning/host-power.sh stop ${args.instanceId}`,
          environment: args.awsCliEnv,
          // Stops again whenever a run had work to do (and so started the host).
          triggers: [args.instanceId, args.wakeKey, stop.digest, args.instanceType],
          logging: "stdoutAndStderr",
        },
        {
          parent: this,
          dependsOn: [prepared, ...args.hostWork],
          customTimeouts: { create: `${stop.timeoutMinutes}m`, update: `${stop.timeoutMinutes}m` },
        },
      );
      ctx.record("stopHost", stopped);
      beforeAmi = stopped;
    } else {
      // Nothing to stop: the AMI is taken from the running host (EC2 reboots it).
      ctx.record("stopHost", prepared);
    }

    const bake = ctx.plan.stage("bakeAmi");
    const nameOut = args.manifest.apply((m) => amiName(args.stack, args.windowsVersion, m, prep.digest));
    this.ami = new aws.ec2.AmiFromInstance(
      `${name}-ami`,
      {
        name: nameOut,
        sourceInstanceId: args.instanceId,
        description: pulumi.interpolate`Windows ARM64 ${args.windowsVersion} CI builder host, image sha256 ${args.manifest.apply((m) => m.sha256)}`,
        tags: {
          ...args.tags,
          Name: nameOut,
          WindowsVersion: args.windowsVersion,
          ImageSha256: args.manifest.apply((m) => m.sha256),
          ImageUri: args.manifest.apply((m) => m.imageUri),
          SourceImage: args.sourceImageUrl,
          Stack: args.stack,
        } as Record<string, pulumi.Input<string>>,
      },
      {
        parent: this,
        dependsOn: [beforeAmi],
        retainOnDelete: args.retainOnDelete,
        customTimeouts: { create: `${bake.timeoutMinutes}m`, delete: "30m" },
      },
    );
    ctx.record("bakeAmi", this.ami);

    this.amiId = this.ami.id;
    this.amiName = this.ami.name;
    this.registerOutputs({ amiId: this.amiId, amiName: this.amiName });
  }
}
