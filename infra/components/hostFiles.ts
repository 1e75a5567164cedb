import * as pulumi from "@pulumi/pulumi";
import { PipelineContext } from "../pipeline/context";

export interface HostFilesArgs {
  ctx: PipelineContext;
  /** sha256 of each repo file, by repo-relative path. */
  fileHashes: Record<string, string>;
}

/** Copies the scripts and assets to the host, each file re-copied only when it changes. */
export class HostFiles extends pulumi.ComponentResource {
  constructor(name: string, args: HostFilesArgs, opts?: pulumi.ComponentResourceOptions) {
    super("windows-arm64-image:pipeline:HostFiles", name, {}, opts);
    const { ctx } = args;
    const stage = ctx.plan.stage("uploadFiles");
    const dependsOn = ctx.hostReady ? [ctx.hostReady] : [];
    for (const file of stage.files) {
      const id = file.replace(/[^A-Za-z0-9]+/g, "-");
      const copy = ctx.runner.copyFile(`${name}-${id}`, file, args.fileHashes[file], { parent: this, dependsOn });
      ctx.recordCopy(file, copy);
    }
    this.registerOutputs({});
  }
}
