import * as pulumi from "@pulumi/pulumi";
import { PipelineContext } from "../pipeline/context";
import { runHostStage } from "../pipeline/runner";

export interface GuestProvisioningArgs {
  ctx: PipelineContext;
  /** The guest-only private key (a secret): it reaches the host on stdin and never its disk. */
  guestPrivateKey: pulumi.Input<string>;
  /** The settings JSON (a secret: it holds the builder password), sent after the key. */
  parameters: pulumi.Input<string>;
}

/**
 * A fresh qcow2 overlay on the base, booted (overlayDisk); then the
 * provisioning in the guest over SSH from the host (guest-run.sh):
 * bounded on the host, retried when the guest's sshd drops, and the VM booted
 * again first when a stopped host lost it.
 */
export class GuestProvisioning extends pulumi.ComponentResource {
  readonly stdout: pulumi.Output<string>;

  constructor(name: string, args: GuestProvisioningArgs, opts?: pulumi.ComponentResourceOptions) {
    super("windows-arm64-image:pipeline:GuestProvisioning", name, {}, opts);
    const { ctx } = args;
    const overlay = ctx.plan.stage("overlayDisk");
    ctx.record(
      "overlayDisk",
      runHostStage(
        ctx.runner,
        overlay,
        { name: `${name}-overlay` },
        { parent: this, dependsOn: ctx.dependencies(overlay) },
      ),
    );
    const stage = ctx.plan.stage("provisionGuest");
    const stdin = pulumi
      .all([args.guestPrivateKey, args.parameters])
      .apply(([key, settings]) => `${key.trim()}\n${settings}`);
    const cmd = runHostStage(
      ctx.runner,
      stage,
      { name: `${name}-run`, stdin: pulumi.secret(stdin) },
      { parent: this, dependsOn: ctx.dependencies(stage) },
    );
    ctx.record("provisionGuest", cmd);
    this.stdout = cmd.stdout;
    this.registerOutputs({});
  }
}
