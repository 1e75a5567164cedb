import * as pulumi from "@pulumi/pulumi";
import { PipelineContext } from "../pipeline/context";
import { runHostStage } from "../pipeline/runner";

/** The manifest publish-image.sh prints (one JSON line on stdout). */
export interface Manifest {
  sha256: string;
  size: number;
  imageUri: string;
  manifestUri: string;
  createdAt: string;
  [k: string]: unknown;
}

/** Parses publish-image.sh's stdout: its last non-empty line is the manifest JSON. */
export function parseManifest(stdout: string): Manifest {
  const line = stdout.trim().split("\n").filter(Boolean).pop() ?? "";
  let m: Manifest;
  try {
    m = JSON.parse(line) as Manifest;
  } catch {
    throw new Error(`publish-image.sh did not print a manifest (last line: ${JSON.stringify(line.slice(0, 200))})`);
  }
  for (const k of ["sha256", "imageUri", "manifestUri", "createdAt"] as const) {
    if (typeof m[k] !== "string") throw new Error(`publish-image.sh manifest lacks ${k}`);
  }
  return m;
}

/** Stops the VM gracefully, then publishes the image content-addressed with its manifest. */
export class ImagePublication extends pulumi.ComponentResource {
  readonly manifest: pulumi.Output<Manifest>;
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
    this.imageSha256 = this.manifest.apply((m) => m.sha256);
    this.imageUri = this.manifest.apply((m) => m.imageUri);
    this.manifestUri = this.manifest.apply((m) => m.manifestUri);
    this.registerOutputs({ imageSha256: this.imageSha256, imageUri: this.imageUri, manifestUri: this.manifestUri });
  }
}
