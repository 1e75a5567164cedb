import * as command from "@pulumi/command";
import * as pulumi from "@pulumi/pulumi";
import { PipelineContext } from "../pipeline/context";
import { stageTriggers } from "../pipeline/runner";

export interface GuestProvisioningArgs {
  ctx: PipelineContext;
  /** Guest user the pipeline logs in as (an administrator). */
  user: string;
  privateKey: pulumi.Input<string>;
  /** The command run in the guest (cmd.exe on Windows: powershell -EncodedCommand ...). */
  script: string;
  /** Its parameters, sent on stdin (a secret: never in the command string or log). */
  parameters: pulumi.Input<string>;
}

/** Runs the provisioning script in the guest over SSH, through the host as a jump host. */
export class GuestProvisioning extends pulumi.ComponentResource {
  readonly stdout: pulumi.Output<string>;

  constructor(name: string, args: GuestProvisioningArgs, opts?: pulumi.ComponentResourceOptions) {
    super("windows-arm64-image:pipeline:GuestProvisioning", name, {}, opts);
    const { ctx } = args;
    const stage = ctx.plan.stage("provisionGuest");
    const cmd = new command.remote.Command(
      `${name}-run`,
      {
        connection: ctx.runner.guestConnection(args.user, args.privateKey),
        create: args.script,
        stdin: pulumi.secret(args.parameters),
        triggers: stageTriggers(ctx.runner, stage),
        logging: "stdoutAndStderr",
        addPreviousOutputInEnv: false,
      },
      {
        parent: this,
        dependsOn: ctx.dependencies(stage),
        customTimeouts: { create: `${stage.timeoutMinutes}m`, update: `${stage.timeoutMinutes}m` },
      },
    );
    ctx.record("provisionGuest", cmd);
    this.stdout = cmd.stdout;
    this.registerOutputs({});
  }
}
