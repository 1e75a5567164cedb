import * as pulumi from "@pulumi/pulumi";
import { PipelineContext } from "../pipeline/context";
import { StageId } from "../pipeline/plan";
import { runHostStage } from "../pipeline/runner";

/** The Windows image and the drivers ISO fetched and verified, and the qcow2 the VM boots. */
export class WindowsDisk extends pulumi.ComponentResource {
  constructor(name: string, args: { ctx: PipelineContext }, opts?: pulumi.ComponentResourceOptions) {
    super("windows-arm64-image:pipeline:WindowsDisk", name, {}, opts);
    const { ctx } = args;
    const steps: Array<[StageId, string]> = [
      ["fetchImage", "fetch-image"],
      ["fetchDrivers", "fetch-drivers"],
      ["prepareDisk", "prepare-disk"],
    ];
    for (const [id, suffix] of steps) {
      const stage = ctx.plan.stage(id);
      ctx.record(
        id,
        runHostStage(
          ctx.runner,
          stage,
          { name: `${name}-${suffix}` },
          { parent: this, dependsOn: ctx.dependencies(stage) },
        ),
      );
    }
    this.registerOutputs({});
  }
}
