import * as aws from "@pulumi/aws";
import * as command from "@pulumi/command";
import * as pulumi from "@pulumi/pulumi";
import * as tls from "@pulumi/tls";
import { fileSha256, sha256Hex } from "../paths";
import { awsCommand, IGNORED_INPUTS } from "../pipeline/runner";
import {
  parseSmokeResult,
  SMOKE_EXTRA_MINUTES,
  SMOKE_INSTANCE_USER,
  SMOKE_SCREENSHOT_DIR,
  SMOKE_TEST_FILES,
} from "../smokeTest";

export interface SmokeTestArgs {
  /** The baked AMI under test (one image variant's). */
  amiId: pulumi.Input<string>;
  /** false: no smoke test, the AMI is promoted right after the bake. */
  enabled: boolean;
  /** The SSM parameter promoted to (promotedAmiParameterName). */
  parameterName: string;
  /** The variant's host type (a .metal type: the VM needs KVM). */
  instanceType: string;
  /** The build host's subnet, and its VPC. */
  subnetId: pulumi.Input<string>;
  vpcId: pulumi.Input<string>;
  /** Who may reach the instance's SSH (the stack's sshAllowedCidrs). */
  sshAllowedCidrs: string[];
  /** The guest user the guest key logs in as, and the guest key's private half (a secret). */
  guestUser: string;
  guestPrivateKey: pulumi.Input<string>;
  /** The guest command (the check) and its stdin (the guest settings, a secret). */
  guestCommand: string;
  guestSettings: pulumi.Input<string>;
  /** The baked image's VM: its SSH forward on the instance's loopback, and its folder (QMP socket, serial log). */
  guestPort: number;
  vmDir: string;
  /** smokeTestTimeoutMinutes: launch to the check passing. */
  timeoutMinutes: number;
  /** AWS_REGION (and AWS_PROFILE when set) for the AWS CLI where Pulumi runs. */
  awsEnv: pulumi.Input<Record<string, string>>;
  tags: Record<string, string>;
  /** What the smoke test waits for besides the AMI (e.g. the bake instance's termination). */
  dependsOn?: pulumi.Input<pulumi.Resource>[];
}

const endWithNewline = (s: string) => (s.endsWith("\n") ? s : `${s}\n`);

/**
 * The smoke test of one baked AMI and its promotion: a metal instance boots
 * the AMI (provisioning/smoke-test.sh, where Pulumi runs, bounded), the VM
 * inside must answer SSH through the instance's loopback forward and pass the
 * guest check, the instance is terminated; only then is the SSM parameter
 * `/<project>/<stack>/<variant>/ami-id` set to the AMI, its value taken from
 * the smoke test's result line. A failed smoke test fails the run and is not
 * recorded, so the parameter keeps the previously promoted AMI.
 */
export class SmokeTest extends pulumi.ComponentResource {
  readonly parameter: aws.ssm.Parameter;
  /** The AMI id the parameter holds once this run's promotion is done. */
  readonly promotedAmiId: pulumi.Output<string>;
  /** The smoke-test command (undefined with enabled: false). */
  readonly command?: command.local.Command;

  constructor(name: string, args: SmokeTestArgs, opts?: pulumi.ComponentResourceOptions) {
    super("windows-arm64-image:pipeline:SmokeTest", name, {}, opts);
    const tags = (suffix: string) => ({ ...args.tags, Name: `${name}-${suffix}` });
    let value: pulumi.Input<string> = args.amiId;

    if (args.enabled) {
      // Its own key: authorized for the instance's user through the user data (public half only).
      const key = new tls.PrivateKey(`${name}-key`, { algorithm: "ED25519" }, { parent: this });
      const v4 = args.sshAllowedCidrs.filter((c) => !c.includes(":"));
      const v6 = args.sshAllowedCidrs.filter((c) => c.includes(":"));
      const sg = new aws.ec2.SecurityGroup(
        `${name}-ssh`,
        {
          description: "windows-arm64-image smoke test: SSH from the allowed CIDRs only",
          vpcId: args.vpcId,
          ingress: [
            { description: "SSH", protocol: "tcp", fromPort: 22, toPort: 22, cidrBlocks: v4, ipv6CidrBlocks: v6 },
          ],
          egress: [
            {
              description: "Anything the booting image asks for",
              protocol: "-1",
              fromPort: 0,
              toPort: 0,
              cidrBlocks: ["0.0.0.0/0"],
              ipv6CidrBlocks: ["::/0"],
            },
          ],
          tags: tags("ssh"),
        },
        { parent: this },
      );
      const digest = sha256Hex(
        JSON.stringify({ files: SMOKE_TEST_FILES.map((f) => [f, fileSha256(f)]), guestCommand: args.guestCommand }),
      );
      const instanceTags = JSON.stringify(Object.entries(tags("instance")).map(([Key, Value]) => ({ Key, Value })));
      this.command = new command.local.Command(
        `${name}-run`,
        {
          create: awsCommand("exec bash provisioning/smoke-test.sh run"),
          // The smoke key, the guest key and the guest settings: secrets, on stdin only.
          stdin: pulumi.secret(
            pulumi
              .all([key.privateKeyOpenssh, args.guestPrivateKey, args.guestSettings])
              .apply(
                ([smokeKey, guestKey, settings]) => endWithNewline(smokeKey) + endWithNewline(guestKey) + settings,
              ),
          ),
          environment: pulumi
            .all([args.awsEnv, args.amiId, args.subnetId, sg.id])
            .apply(([env, ami, subnet, sgId]) => ({
              AWS_PROFILE: "",
              ...env,
              SMOKE_AMI_ID: ami,
              SMOKE_INSTANCE_TYPE: args.instanceType,
              SMOKE_SUBNET_ID: subnet,
              SMOKE_SECURITY_GROUP_ID: sgId,
              SMOKE_INSTANCE_USER: SMOKE_INSTANCE_USER,
              SMOKE_GUEST_USER: args.guestUser,
              SMOKE_GUEST_COMMAND: args.guestCommand,
              SMOKE_GUEST_PORT: String(args.guestPort),
              SMOKE_VM_DIR: args.vmDir,
              SMOKE_TIMEOUT_S: String(args.timeoutMinutes * 60),
              SMOKE_SCREENSHOT_DIR: SMOKE_SCREENSHOT_DIR,
              SMOKE_TAGS_JSON: instanceTags,
            })),
          // A new AMI, or a change to the scripts or the check, tests again; nothing else does.
          triggers: [args.amiId, digest],
          logging: "stdoutAndStderr",
          interpreter: ["/bin/bash", "-c"],
          addPreviousOutputInEnv: false,
        },
        {
          parent: this,
          dependsOn: args.dependsOn,
          customTimeouts: {
            create: `${args.timeoutMinutes + SMOKE_EXTRA_MINUTES}m`,
            update: `${args.timeoutMinutes + SMOKE_EXTRA_MINUTES}m`,
          },
          ignoreChanges: IGNORED_INPUTS,
        },
      );
      // The promoted value comes from the passed smoke test itself.
      const run = this.command;
      value = pulumi.all([run.stdout, args.amiId]).apply(([stdout, ami]) => parseSmokeResult(stdout, ami).amiId);
    }

    this.parameter = new aws.ssm.Parameter(
      `${name}-ami-id`,
      {
        name: args.parameterName,
        type: "String",
        // EC2 checks the value is an AMI, and launch templates can read it with resolve:ssm:.
        dataType: "aws:ec2:image",
        insecureValue: value,
        description: args.enabled
          ? "The newest AMI whose VM booted and passed the guest check (windows-arm64-image smoke test)"
          : "The newest baked AMI (windows-arm64-image, no smoke test)",
        tags: tags("ami-id"),
      },
      { parent: this, dependsOn: this.command ? [this.command] : [] },
    );
    this.promotedAmiId = this.parameter.insecureValue;
    this.registerOutputs({ promotedAmiId: this.promotedAmiId, parameterName: args.parameterName });
  }
}
