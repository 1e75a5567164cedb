import * as aws from "@pulumi/aws";
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
  tags: Record<string, string>;
}

/** The AMI name: the image's SHA-256 and publication date, stable across reruns. */
export function amiName(stack: string, version: string, m: Pick<Manifest, "sha256" | "createdAt">): string {
  const date = m.createdAt.slice(0, 10).replace(/-/g, "");
  return `windows-arm64-${version}-${stack}-${date}-${m.sha256.slice(0, 16)}`;
}

/** Prepares the host for imaging, bakes the AMI, then stops the host (unless asked to keep it). */
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

    const bake = ctx.plan.stage("bakeAmi");
    const nameOut = args.manifest.apply((m) => amiName(args.stack, args.windowsVersion, m));
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
        dependsOn: [prepared],
        retainOnDelete: args.retainOnDelete,
        customTimeouts: { create: `${bake.timeoutMinutes}m`, delete: "30m" },
      },
    );
    ctx.record("bakeAmi", this.ami);

    const stop = ctx.plan.stage("stopHost");
    const state = new aws.ec2transitgateway.InstanceState(
      `${name}-host-state`,
      { instanceId: args.instanceId, state: args.keepHostRunning ? "running" : "stopped" },
      {
        parent: this,
        dependsOn: [this.ami],
        customTimeouts: { create: `${stop.timeoutMinutes}m`, update: `${stop.timeoutMinutes}m` },
      },
    );
    ctx.record("stopHost", state);

    this.amiId = this.ami.id;
    this.amiName = this.ami.name;
    this.registerOutputs({ amiId: this.amiId, amiName: this.amiName });
  }
}
