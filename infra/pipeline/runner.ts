/**
 * Runners: how a stage's command reaches the machine it runs on. The remote
 * runner drives the AWS host over SSH; the local runner drives this machine.
 * Stage components take a runner, so no stage is written twice.
 */
import * as command from "@pulumi/command";
import * as pulumi from "@pulumi/pulumi";
import { repoPath } from "../paths";
import { HostLayout, resolveCommand, RuntimeName, RuntimeValues, shq, Stage } from "./plan";

export type Logging = "stdout" | "stderr" | "stdoutAndStderr" | "none";

export interface CommandSpec {
  create: pulumi.Input<string>;
  stdin?: pulumi.Input<string>;
  triggers: pulumi.Input<unknown>[];
  logging: Logging;
  timeoutMinutes: number;
}

export interface StageCommand extends pulumi.Resource {
  readonly stdout: pulumi.Output<string>;
}

export interface Runner {
  readonly kind: "remote" | "local";
  readonly layout: HostLayout;
  /** Values the plan's runtime tokens stand for. */
  readonly runtime: { [K in RuntimeName]: pulumi.Input<string> };
  /** Runs a command on the host (the AWS host, or this machine). */
  command(name: string, spec: CommandSpec, opts: pulumi.CustomResourceOptions): StageCommand;
  /** Copies a repo file to the host; re-copies only when its content changes. */
  copyFile(name: string, repoRelPath: string, sha256: string, opts: pulumi.CustomResourceOptions): pulumi.Resource;
  /** SSH connection to the guest (through the host as a jump host on AWS). */
  guestConnection(user: string, privateKey: pulumi.Input<string>): command.types.input.remote.ConnectionArgs;
}

export class RemoteRunner implements Runner {
  readonly kind = "remote" as const;
  constructor(
    readonly layout: HostLayout,
    private readonly connection: command.types.input.remote.ConnectionArgs,
    readonly runtime: { [K in RuntimeName]: pulumi.Input<string> },
  ) {}

  command(name: string, spec: CommandSpec, opts: pulumi.CustomResourceOptions): StageCommand {
    return new command.remote.Command(
      name,
      { connection: this.connection, ...commandInputs(spec) },
      commandOptions(spec, opts),
    );
  }

  copyFile(name: string, repoRelPath: string, sha256: string, opts: pulumi.CustomResourceOptions): pulumi.Resource {
    return new command.remote.CopyToRemote(
      name,
      {
        connection: this.connection,
        source: new pulumi.asset.FileAsset(repoPath(repoRelPath)),
        remotePath: `${this.layout.home}/${repoRelPath}`,
        // A new host (the Elastic IP keeps the connection the same) needs every file again.
        triggers: [sha256, this.runtime.hostId],
      },
      opts,
    );
  }

  guestConnection(user: string, privateKey: pulumi.Input<string>): command.types.input.remote.ConnectionArgs {
    return {
      host: "127.0.0.1",
      port: this.layout.sshPort,
      user,
      privateKey,
      proxy: this.connection as command.types.input.remote.ProxyConnectionArgs,
      dialErrorLimit: 20,
      perDialTimeout: 30,
    };
  }
}

export class LocalRunner implements Runner {
  readonly kind = "local" as const;
  constructor(
    readonly layout: HostLayout,
    readonly runtime: { [K in RuntimeName]: pulumi.Input<string> },
  ) {}

  command(name: string, spec: CommandSpec, opts: pulumi.CustomResourceOptions): StageCommand {
    return new command.local.Command(
      name,
      { ...commandInputs(spec), interpreter: ["/bin/bash", "-c"] },
      commandOptions(spec, opts),
    );
  }

  copyFile(name: string, repoRelPath: string, sha256: string, opts: pulumi.CustomResourceOptions): pulumi.Resource {
    const dest = `${this.layout.home}/${repoRelPath}`;
    return new command.local.Command(
      name,
      {
        create: `install -D -m 0644 ${shq(repoRelPath)} ${shq(dest)}`,
        triggers: [sha256, this.runtime.hostId],
        logging: "stderr",
        interpreter: ["/bin/bash", "-c"],
      },
      opts,
    );
  }

  guestConnection(user: string, privateKey: pulumi.Input<string>): command.types.input.remote.ConnectionArgs {
    return { host: "127.0.0.1", port: this.layout.sshPort, user, privateKey, dialErrorLimit: 20, perDialTimeout: 30 };
  }
}

/** The inputs a stage command has on either runner. */
function commandInputs(spec: CommandSpec) {
  return {
    create: spec.create,
    stdin: spec.stdin,
    triggers: spec.triggers,
    logging: spec.logging,
    // Stage output can be large (progress lines): not fed back into the next run's environment.
    addPreviousOutputInEnv: false,
  };
}

function commandOptions(spec: CommandSpec, opts: pulumi.CustomResourceOptions): pulumi.CustomResourceOptions {
  return { ...opts, customTimeouts: timeouts(spec.timeoutMinutes) };
}

function timeouts(minutes: number): pulumi.CustomTimeouts {
  return { create: `${minutes}m`, update: `${minutes}m`, delete: "10m" };
}

/** The stage's command with its runtime tokens resolved. */
export function stageCommand(runner: Runner, stage: Stage): pulumi.Output<string> {
  if (stage.command === undefined) throw new Error(`stage ${stage.id} has no host command`);
  const cmd = stage.command;
  return pulumi.all(stage.runtime.map((r) => pulumi.output(runner.runtime[r]))).apply((vals) => {
    const values: Partial<RuntimeValues> = {};
    stage.runtime.forEach((r, i) => (values[r] = vals[i]));
    return resolveCommand(cmd, values);
  });
}

/** The stage's triggers: its digest and the runtime values it depends on. */
export function stageTriggers(runner: Runner, stage: Stage): pulumi.Input<unknown>[] {
  return [stage.digest, ...stage.runtime.map((r) => runner.runtime[r])];
}

/** Creates the resource for a host stage of the plan. */
export function runHostStage(
  runner: Runner,
  stage: Stage,
  args: { name: string; stdin?: pulumi.Input<string>; logging?: Logging },
  opts: pulumi.CustomResourceOptions,
): StageCommand {
  return runner.command(
    args.name,
    {
      create: stageCommand(runner, stage),
      stdin: args.stdin,
      triggers: stageTriggers(runner, stage),
      logging: args.logging ?? "stdoutAndStderr",
      timeoutMinutes: stage.timeoutMinutes,
    },
    opts,
  );
}
