/**
 * Runners: how a stage's command reaches the machine it runs on. Every stage
 * is a `local.Command`, because the command provider enforces customTimeouts
 * only for local commands (see REFERENCE.md). On AWS the command is
 * provisioning/host-exec.sh, which starts the host when it is stopped and
 * runs the stage over OpenSSH, so a stage's wake-up is part of the stage: a
 * run that fails records neither. Locally the command runs on this machine.
 * Stage components take a runner, so no stage is written twice.
 */
import * as command from "@pulumi/command";
import * as pulumi from "@pulumi/pulumi";
import { sha256Hex } from "../paths";
import { HostLayout, resolveCommand, RuntimeName, RuntimeValues, shq, Stage } from "./plan";

export type Logging = "stdout" | "stderr" | "stdoutAndStderr" | "none";

export interface CommandSpec {
  /** The command to run on the host (runtime tokens resolved). */
  create: pulumi.Input<string>;
  /** What the command reads on stdin. */
  stdin?: pulumi.Input<string>;
  triggers: pulumi.Input<unknown>[];
  logging: Logging;
  /** The stage's host-side bound; Pulumi's timeout adds the runner's margin. */
  timeoutMinutes: number;
  /** stdin holds a secret: store stdout and stderr as secrets too. */
  secretOutputs: boolean;
}

export interface StageCommand extends pulumi.Resource {
  readonly stdout: pulumi.Output<string>;
}

export interface Runner {
  readonly kind: "ssh" | "local";
  readonly layout: HostLayout;
  /** Values the plan's runtime tokens stand for. */
  readonly runtime: { [K in RuntimeName]: pulumi.Input<string> };
  /** Runs a command on the host (the AWS host, or this machine). */
  command(name: string, spec: CommandSpec, opts: pulumi.CustomResourceOptions): StageCommand;
  /** Copies repo files under the host's home; again whenever one of them (or the host) changes. */
  upload(
    name: string,
    files: string[],
    hashes: Record<string, string>,
    opts: pulumi.CustomResourceOptions,
  ): pulumi.Resource;
}

/** How the operator's machine reaches the AWS host. */
export interface HostAccess {
  /** The Elastic IP: it survives the host's stops. */
  address: pulumi.Input<string>;
  user: string;
  instanceId: pulumi.Input<string>;
  /** The pipeline's private key (a secret): sent to host-exec.sh on stdin, never on a disk. */
  privateKey: pulumi.Input<string>;
  /** AWS_REGION and, when the stack sets one, the profile (for starting the host). */
  region: pulumi.Input<string>;
  profile?: string;
}

/** Minutes host-exec.sh may spend starting a stopped host before the stage runs. */
export const WAKE_MARGIN_MINUTES = 35;
/** Minutes Pulumi allows beyond a stage's host-side bound (the bound kills it first). */
export const LOCAL_MARGIN_MINUTES = 5;

/**
 * Inputs that do not change what a stage does: a changed AWS profile or
 * logging setting re-runs nothing. (Connection tuning lives in host-exec.sh,
 * which is no input at all.)
 */
export const IGNORED_INPUTS = ["environment.AWS_PROFILE", "logging"];

export class SshRunner implements Runner {
  readonly kind = "ssh" as const;
  constructor(
    readonly layout: HostLayout,
    private readonly host: HostAccess,
    readonly runtime: { [K in RuntimeName]: pulumi.Input<string> },
  ) {}

  private environment(): pulumi.Input<Record<string, pulumi.Input<string>>> {
    return {
      HOST_EXEC_ADDRESS: this.host.address,
      HOST_EXEC_USER: this.host.user,
      HOST_EXEC_INSTANCE_ID: this.host.instanceId,
      AWS_REGION: this.host.region,
      AWS_DEFAULT_REGION: this.host.region,
      // Always present (empty when unset), so ignoring its changes has a path to ignore.
      AWS_PROFILE: this.host.profile ?? "",
    };
  }

  /** The key, then the payload: host-exec.sh reads the key up to its END line. */
  private stdin(payload?: pulumi.Input<string>): pulumi.Output<string> {
    return pulumi.secret(
      pulumi.all([this.host.privateKey, payload ?? ""]).apply(([key, data]) => `${key.trim()}\n${data}`),
    );
  }

  command(name: string, spec: CommandSpec, opts: pulumi.CustomResourceOptions): StageCommand {
    return new command.local.Command(
      name,
      {
        create: pulumi.output(spec.create).apply((c) => hostExec(`run ${shq(c)}`)),
        stdin: this.stdin(spec.stdin),
        environment: this.environment(),
        triggers: spec.triggers,
        logging: spec.logging,
        interpreter: ["/bin/bash", "-c"],
        addPreviousOutputInEnv: false,
      },
      commandOptions(spec, opts, spec.timeoutMinutes + WAKE_MARGIN_MINUTES),
    );
  }

  upload(name: string, files: string[], hashes: Record<string, string>, opts: pulumi.CustomResourceOptions) {
    return new command.local.Command(
      name,
      {
        create: hostExec(`upload . ${shq(this.layout.home)} ${files.map(shq).join(" ")}`),
        stdin: this.stdin(),
        environment: this.environment(),
        // A new host (the Elastic IP keeps the address the same) needs every file again.
        triggers: [filesDigest(files, hashes), this.runtime.hostId],
        logging: "stderr",
        interpreter: ["/bin/bash", "-c"],
        addPreviousOutputInEnv: false,
      },
      commandOptions({ timeoutMinutes: 10, secretOutputs: false }, opts, 10 + WAKE_MARGIN_MINUTES),
    );
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
      {
        create: spec.create,
        stdin: spec.stdin,
        triggers: spec.triggers,
        logging: spec.logging,
        interpreter: ["/bin/bash", "-c"],
        addPreviousOutputInEnv: false,
      },
      commandOptions(spec, opts, spec.timeoutMinutes + LOCAL_MARGIN_MINUTES),
    );
  }

  upload(name: string, files: string[], hashes: Record<string, string>, opts: pulumi.CustomResourceOptions) {
    const copies = files.map((f) => `install -D -m 0644 ${shq(f)} ${shq(`${this.layout.home}/${f}`)}`);
    return new command.local.Command(
      name,
      {
        create: copies.join(" && "),
        triggers: [filesDigest(files, hashes), this.runtime.hostId],
        logging: "stderr",
        interpreter: ["/bin/bash", "-c"],
        addPreviousOutputInEnv: false,
      },
      commandOptions({ timeoutMinutes: 10, secretOutputs: false }, opts, 10),
    );
  }
}

/**
 * A command run where Pulumi runs with the AWS CLI: AWS_PROFILE is always in
 * its environment (so ignoreChanges has a path to ignore), and empty means none
 * (the CLI refuses an empty profile name).
 */
export function awsCommand(cmd: string): string {
  return `if [ -z "\${AWS_PROFILE:-}" ]; then unset AWS_PROFILE; fi; ${cmd}`;
}

/** host-exec.sh as run where Pulumi runs. */
export function hostExec(args: string): string {
  return awsCommand(`exec bash provisioning/host-exec.sh ${args}`);
}

/** One digest over a set of files' hashes. */
export function filesDigest(files: string[], hashes: Record<string, string>): string {
  return sha256Hex(JSON.stringify(files.map((f) => [f, hashes[f]])));
}

function commandOptions(
  spec: Pick<CommandSpec, "timeoutMinutes" | "secretOutputs">,
  opts: pulumi.CustomResourceOptions,
  pulumiMinutes: number,
): pulumi.CustomResourceOptions {
  return {
    ...opts,
    customTimeouts: { create: `${pulumiMinutes}m`, update: `${pulumiMinutes}m`, delete: "10m" },
    ignoreChanges: [...(opts.ignoreChanges ?? []), ...IGNORED_INPUTS],
    additionalSecretOutputs: spec.secretOutputs ? ["stdout", "stderr"] : opts.additionalSecretOutputs,
  };
}

/** The stage's host command with its runtime tokens resolved. */
export function stageCommand(runner: Runner, stage: Stage): pulumi.Output<string> {
  if (stage.hostCommand === undefined) throw new Error(`stage ${stage.id} has no host command`);
  const cmd = stage.hostCommand;
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
      stdin: stage.secretStdin && args.stdin !== undefined ? pulumi.secret(args.stdin) : args.stdin,
      triggers: stageTriggers(runner, stage),
      logging: args.logging ?? "stdoutAndStderr",
      timeoutMinutes: stage.timeoutMinutes,
      secretOutputs: stage.secretStdin,
    },
    opts,
  );
}
