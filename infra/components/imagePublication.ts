import * as pulumi from "@pulumi/pulumi";
import { PipelineContext } from "../pipeline/context";
import { runHostStage } from "../pipeline/runner";
import { Manifest, parseManifest } from "../manifest";

/** Stops the VM gracefully, then publishes the image content-addressed with its manifest. */
export class ImagePublication extends pulumi.ComponentResource {
  readonly manifest: pulumi.Output<Manifest>;
  /** The manifest exactly as publish-image.sh printed it (one JSON line). */
  readonly manifestJson: pulumi.Output<string>;
  readonly imageSha256: pulumi.Output<string>;
  readonly imageUri: pulumi.Output<string>;
  readonly manifestUri: pulumi.Output<string>;

  constructor(name: string, args: { ctx: PipelineContext }, opts?: pulumi.ComponentResourceOptions) {
    super("windows-arm64-image:pipeline:ImagePublication", name, {}, opts);
    const { ctx } = args;
    const stop = ctx.plan.stage("stopVm");
    ctx.record(
      "stopVm",
      runHostStage(ctx.runner, stop, { name: `${name}-stop-vm` }, { parent: this, dependsOn: ctx.dependencies(stop) }),
    );
    const pub = ctx.plan.stage("publish");
    const cmd = runHostStage(
      ctx.runner,
      pub,
      { name: `${name}-publish` },
      { parent: this, dependsOn: ctx.dependencies(pub) },
    );
    ctx.record("publish", cmd);
    this.manifest = cmd.stdout.apply(parseManifest);
    this.manifestJson = cmd.stdout.apply((out) => out.trim().split("\n").filter(Boolean).pop() ?? "");
    this.imageSha256 = this.manifest.apply((m) => m.sha256);
    this.imageUri = this.manifest.apply((m) => m.imageUri);
    this.manifestUri = this.manifest.apply((m) => m.manifestUri);
    this.registerOutputs({ imageSha256: this.imageSha256, imageUri: this.imageUri, manifestUri: this.manifestUri });
  }
}
