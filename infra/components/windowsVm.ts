import * as pulumi from "@pulumi/pulumi";
import { PipelineContext } from "../pipeline/context";
import { runHostStage } from "../pipeline/runner";

export interface WindowsVmArgs {
  ctx: PipelineContext;
  /** The rendered answer file: a secret, sent on stdin only. */
  answerFile: pulumi.Input<string>;
  /** The build VM's env file (not secret). */
  buildEnv: string;
}

/**
 * The config ISO and env file, then Windows installed on the install disk
 * (booted until its SSH answers, once per base) and frozen as the read-only
 * base-<digest>.qcow2.
 */
export class WindowsVm extends pulumi.ComponentResource {
  constructor(name: string, args: WindowsVmArgs, opts?: pulumi.ComponentResourceOptions) {
    super("windows-arm64-image:pipeline:WindowsVm", name, {}, opts);
    const { ctx } = args;
    const child = (id: Parameters<PipelineContext["plan"]["stage"]>[0]) => ({
      parent: this,
      dependsOn: ctx.dependencies(ctx.plan.stage(id)),
    });
    ctx.record(
      "configMedia",
      runHostStage(
        ctx.runner,
        ctx.plan.stage("configMedia"),
        { name: `${name}-config-media`, stdin: pulumi.secret(args.answerFile) },
        child("configMedia"),
      ),
    );
    ctx.record(
      "renderEnv",
      runHostStage(
        ctx.runner,
        ctx.plan.stage("renderEnv"),
        { name: `${name}-env`, stdin: args.buildEnv },
        child("renderEnv"),
      ),
    );
    ctx.record(
      "startVm",
      runHostStage(ctx.runner, ctx.plan.stage("startVm"), { name: `${name}-start` }, child("startVm")),
    );
    ctx.record(
      "waitGuest",
      runHostStage(ctx.runner, ctx.plan.stage("waitGuest"), { name: `${name}-wait-guest` }, child("waitGuest")),
    );
    ctx.record(
      "baseImage",
      runHostStage(ctx.runner, ctx.plan.stage("baseImage"), { name: `${name}-base` }, child("baseImage")),
    );
    this.registerOutputs({});
  }
}
