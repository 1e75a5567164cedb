import * as pulumi from "@pulumi/pulumi";
import * as fs from "fs";
import { repoPath, sha256Hex } from "../paths";
import { PipelineContext } from "../pipeline/context";
import { HOST_READY_SCRIPT, shq } from "../pipeline/plan";
import { runHostStage } from "../pipeline/runner";

export interface HostFilesArgs {
  ctx: PipelineContext;
  /** sha256 of each repo file, by repo-relative path. */
  fileHashes: Record<string, string>;
  /** Operators' extra public keys for the host (AWS only). */
  operatorKeys?: readonly string[];
}

/** The script that sets the operators' keys on the host. */
export const OPERATOR_KEYS_SCRIPT = "provisioning/operator-keys.sh";

/**
 * The host made ready for the stages: (AWS) cloud-init done, then the scripts
 * and assets copied (again whenever one changes), the idle guard installed
 * and the operators' keys set in place.
 */
export class HostFiles extends pulumi.ComponentResource {
  /** Commands on the host outside the plan (the operators' keys): the host is stopped after them too. */
  readonly extra: pulumi.Resource[] = [];

  constructor(name: string, args: HostFilesArgs, opts?: pulumi.ComponentResourceOptions) {
    super("windows-arm64-image:pipeline:HostFiles", name, {}, opts);
    const { ctx } = args;
    const plan = ctx.plan;
    const has = (id: "waitHost" | "idleGuard") => plan.stages.some((s) => s.id === id);

    if (has("waitHost")) {
      const wait = plan.stage("waitHost");
      ctx.record(
        "waitHost",
        runHostStage(
          ctx.runner,
          wait,
          { name: `${name}-wait-host`, stdin: fs.readFileSync(repoPath(HOST_READY_SCRIPT), "utf8") },
          { parent: this, dependsOn: ctx.dependencies(wait) },
        ),
      );
    }

    const stage = plan.stage("uploadFiles");
    const copy = ctx.runner.upload(`${name}-upload`, stage.files, args.fileHashes, {
      parent: this,
      dependsOn: ctx.dependencies(stage),
    });
    ctx.record("uploadFiles", copy);
    for (const file of stage.files) ctx.recordCopy(file, copy);

    if (has("idleGuard")) {
      const idle = plan.stage("idleGuard");
      ctx.record(
        "idleGuard",
        runHostStage(
          ctx.runner,
          idle,
          { name: `${name}-idle-guard` },
          { parent: this, dependsOn: ctx.dependencies(idle) },
        ),
      );
    }

    if (args.operatorKeys !== undefined && has("waitHost")) {
      // Set in place, so changing them neither replaces the host nor re-runs a stage.
      const script = fs.readFileSync(repoPath(OPERATOR_KEYS_SCRIPT), "utf8");
      const keysB64 = Buffer.from(args.operatorKeys.join("\n")).toString("base64");
      this.extra.push(
        ctx.runner.command(
          `${name}-operator-keys`,
          {
            create: `bash -s -- ${shq(keysB64)}`,
            stdin: script,
            triggers: [ctx.runner.runtime.hostId, sha256Hex(script), sha256Hex(keysB64)],
            logging: "stderr",
            timeoutMinutes: 5,
            secretOutputs: false,
          },
          { parent: this, dependsOn: [ctx.resource("waitHost")] },
        ),
      );
    }
    this.registerOutputs({});
  }
}
