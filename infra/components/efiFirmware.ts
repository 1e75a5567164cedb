import * as pulumi from "@pulumi/pulumi";
import { PipelineContext } from "../pipeline/context";
import { runHostStage } from "../pipeline/runner";

/** The UEFI firmware pair: QEMU_EFI.fd (64 MiB) and QEMU_VARS.fd (kept across runs). */
export class EfiFirmware extends pulumi.ComponentResource {
  constructor(name: string, args: { ctx: PipelineContext }, opts?: pulumi.ComponentResourceOptions) {
    super("windows-arm64-image:pipeline:EfiFirmware", name, {}, opts);
    const { ctx } = args;
    const stage = ctx.plan.stage("firmware");
    ctx.record(
      "firmware",
      runHostStage(ctx.runner, stage, { name: `${name}-build` }, { parent: this, dependsOn: ctx.dependencies(stage) }),
    );
    this.registerOutputs({});
  }
}
