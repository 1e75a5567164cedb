import * as pulumi from "@pulumi/pulumi";
import { PipelineContext } from "../pipeline/context";
import { StageId } from "../pipeline/plan";
import { runHostStage } from "../pipeline/runner";

export interface WindowsDiskArgs {
  ctx: PipelineContext;
  /** The rendered answer file (a secret): written into a VHDX/qcow2 image, on stdin only. */
  answerFile: pulumi.Input<string>;
}

/**
 * The Windows image and the drivers ISO fetched and verified, the qcow2 the
 * VM boots, and (VHDX/qcow2 sources) the answer file written into its
 * Windows\Panther.
 */
export class WindowsDisk extends pulumi.ComponentResource {
  constructor(name: string, args: WindowsDiskArgs, opts?: pulumi.ComponentResourceOptions) {
    super("windows-arm64-image:pipeline:WindowsDisk", name, {}, opts);
    const { ctx } = args;
    const steps: Array<[StageId, string]> = [
      ["fetchImage", "fetch-image"],
      ["fetchDrivers", "fetch-drivers"],
      ["prepareDisk", "prepare-disk"],
      ["injectAnswerFile", "inject-answer-file"],
    ];
    for (const [id, suffix] of steps) {
      if (!ctx.plan.stages.some((s) => s.id === id)) continue;
      const stage = ctx.plan.stage(id);
      ctx.record(
        id,
        runHostStage(
          ctx.runner,
          stage,
          {
            name: `${name}-${suffix}`,
            ...(stage.stdin === "answerFile" ? { stdin: args.answerFile, logging: "stderr" as const } : {}),
          },
          { parent: this, dependsOn: ctx.dependencies(stage) },
        ),
      );
    }
    this.registerOutputs({});
  }
}
