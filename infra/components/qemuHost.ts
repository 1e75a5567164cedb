import * as aws from "@pulumi/aws";
import * as command from "@pulumi/command";
import * as pulumi from "@pulumi/pulumi";
import * as fs from "fs";
import {
  CANONICAL_OWNER,
  EC2_ASSUME_ROLE_POLICY,
  HOST_USER,
  hostPolicyDocument,
  renderCloudInit,
  s3ObjectArn,
  UBUNTU_AMI_NAME,
} from "../hostSetup";
import { repoPath, sha256Hex } from "../paths";

export interface QemuHostArgs {
  instanceType: string;
  /** Explicit AMI; default: newest Canonical Ubuntu 24.04 arm64. */
  amiId?: string;
  volumeGiB: number;
  volumeIops: number;
  volumeThroughputMiBps: number;
  subnetId?: string;
  sshAllowedCidrs: readonly string[];
  /** The pipeline's key: public half for the key pair, private half (secret) to connect. */
  publicKeyOpenssh: pulumi.Input<string>;
  privateKeyPem: pulumi.Input<string>;
  /** Operators' extra public keys. */
  authorizedKeys: readonly string[];
  bucketArn: pulumi.Input<string>;
  artifactPrefix: string;
  /** s3:// source objects the host must read (image, drivers ISO). */
  sourceObjectUrls: readonly string[];
  /** Seconds to wait for SSH and then for cloud-init (each). */
  bootTimeoutSeconds?: number;
  /**
   * A hash of everything the host stages depend on. When it changes there is
   * work to do, so the host (stopped after the last build) is started again.
   */
  wakeKey: pulumi.Input<string>;
  /** Environment for the AWS CLI run where Pulumi runs (AWS_REGION, AWS_PROFILE). */
  awsCliEnv: pulumi.Input<Record<string, string>>;
  /** The stack stops the host after the build: check up front that the AWS CLI can. */
  requireAwsCli: boolean;
  tags: Record<string, string>;
}

/** Scripts QemuHost sends to the host itself (outside the pipeline plan). */
export const HOST_SCRIPTS = {
  ready: "provisioning/host-ready.sh",
  operatorKeys: "provisioning/operator-keys.sh",
} as const;

/** How long a metal instance may take to boot and answer SSH. */
export const DEFAULT_BOOT_TIMEOUT_S = 1800;

/**
 * The KVM-capable Graviton bare-metal host: EC2 instance (IMDSv2, encrypted
 * gp3) with an Elastic IP (the address, and so every command's connection,
 * survives the stop after each build), key pair, SSH-only security group,
 * least-privilege instance profile, and the `ready` command every later
 * remote step depends on. `ready` re-runs when the wake key changes, after
 * host-power.sh has started the host again.
 */
export class QemuHost extends pulumi.ComponentResource {
  readonly instance: aws.ec2.Instance;
  readonly instanceId: pulumi.Output<string>;
  readonly publicIp: pulumi.Output<string>;
  readonly publicDns: pulumi.Output<string>;
  readonly connection: command.types.input.remote.ConnectionArgs;
  /** Completes when SSH answers and cloud-init has finished with the tools in place. */
  readonly ready: command.remote.Command;
  /** Sets the operators' SSH keys on the host (after `ready`). */
  readonly operatorKeys: command.remote.Command;

  constructor(name: string, args: QemuHostArgs, opts?: pulumi.ComponentResourceOptions) {
    super("windows-arm64-image:host:QemuHost", name, {}, opts);
    const child = { parent: this };
    const tags = (suffix: string) => ({ ...args.tags, Name: `${name}-${suffix}` });

    const amiId =
      args.amiId ??
      aws.ec2
        .getAmiOutput(
          {
            mostRecent: true,
            owners: [CANONICAL_OWNER],
            filters: [
              { name: "name", values: [UBUNTU_AMI_NAME] },
              { name: "architecture", values: ["arm64"] },
              { name: "virtualization-type", values: ["hvm"] },
            ],
          },
          child,
        )
        .apply((a) => a.id);

    const vpcId = args.subnetId
      ? aws.ec2.getSubnetOutput({ id: args.subnetId }, child).vpcId
      : aws.ec2.getVpcOutput({ default: true }, child).id;

    const v4 = args.sshAllowedCidrs.filter((c) => !c.includes(":"));
    const v6 = args.sshAllowedCidrs.filter((c) => c.includes(":"));
    const securityGroup = new aws.ec2.SecurityGroup(
      `${name}-ssh`,
      {
        description: "windows-arm64-image host: SSH from the allowed CIDRs only",
        vpcId,
        ingress: [
          {
            description: "SSH",
            protocol: "tcp",
            fromPort: 22,
            toPort: 22,
            cidrBlocks: v4,
            ipv6CidrBlocks: v6,
          },
        ],
        egress: [
          {
            description: "Downloads (packages, images, S3)",
            protocol: "-1",
            fromPort: 0,
            toPort: 0,
            cidrBlocks: ["0.0.0.0/0"],
            ipv6CidrBlocks: ["::/0"],
          },
        ],
        tags: tags("ssh"),
      },
      child,
    );

    const role = new aws.iam.Role(
      `${name}-role`,
      { assumeRolePolicy: JSON.stringify(EC2_ASSUME_ROLE_POLICY), tags: tags("role") },
      child,
    );
    const sourceArns = pulumi
      .output(aws.getPartitionOutput({}, child))
      .apply((p) =>
        args.sourceObjectUrls.map((u) => s3ObjectArn(u, p.partition)).filter((arn): arn is string => arn !== undefined),
      );
    const policy = new aws.iam.RolePolicy(
      `${name}-artifacts`,
      {
        role: role.id,
        policy: pulumi
          .all([args.bucketArn, sourceArns])
          .apply(([arn, sources]) => JSON.stringify(hostPolicyDocument(arn, args.artifactPrefix, sources))),
      },
      child,
    );
    const profile = new aws.iam.InstanceProfile(`${name}-profile`, { role: role.name, tags: tags("profile") }, child);
    const keyPair = new aws.ec2.KeyPair(`${name}-key`, { publicKey: args.publicKeyOpenssh, tags: tags("key") }, child);

    this.instance = new aws.ec2.Instance(
      `${name}-instance`,
      {
        ami: amiId,
        instanceType: args.instanceType,
        subnetId: args.subnetId,
        associatePublicIpAddress: true,
        vpcSecurityGroupIds: [securityGroup.id],
        keyName: keyPair.keyName,
        iamInstanceProfile: profile.name,
        metadataOptions: { httpEndpoint: "enabled", httpTokens: "required", httpPutResponseHopLimit: 2 },
        rootBlockDevice: {
          volumeType: "gp3",
          volumeSize: args.volumeGiB,
          iops: args.volumeIops,
          throughput: args.volumeThroughputMiBps,
          encrypted: true,
          deleteOnTermination: true,
          tags: tags("root"),
        },
        userData: renderCloudInit(),
        userDataReplaceOnChange: true,
        tags: tags("host"),
      },
      {
        parent: this,
        // A newer Ubuntu AMI must not replace a working host; an explicit hostAmiId change still does.
        ignoreChanges: args.amiId ? [] : ["ami"],
        // An instance type change stops and starts a metal host: minutes each way.
        customTimeouts: { create: "30m", update: "40m", delete: "30m" },
      },
    );
    this.instanceId = this.instance.id;
    // A stopped instance gives up its public address; an Elastic IP keeps it.
    const eip = new aws.ec2.Eip(`${name}-ip`, { domain: "vpc", tags: tags("ip") }, child);
    const eipAssoc = new aws.ec2.EipAssociation(
      `${name}-ip-assoc`,
      { instanceId: this.instance.id, allocationId: eip.allocationId },
      child,
    );
    this.publicIp = eip.publicIp;
    this.publicDns = eip.publicDns;

    this.connection = {
      host: this.publicIp,
      user: HOST_USER,
      privateKey: args.privateKeyPem,
      dialErrorLimit: 30,
      perDialTimeout: 30,
    };

    const timeout = args.bootTimeoutSeconds ?? DEFAULT_BOOT_TIMEOUT_S;
    // Metal instances take many minutes to boot; dial retries have no delay between them,
    // so wait for the SSH banner locally in one bounded loop first. When the wake key
    // changed (work to do), start the host first: the last build stopped it.
    const sshUp = new command.local.Command(
      `${name}-ssh-up`,
      {
        create: pulumi.interpolate`bash provisioning/host-power.sh start ${this.instance.id} ${this.publicIp} ${timeout}`,
        environment: pulumi
          .output(args.awsCliEnv)
          .apply((env) => ({ ...env, HOST_POWER_REQUIRE_CLI: args.requireAwsCli ? "1" : "0" })),
        triggers: [this.instance.id, args.wakeKey],
        logging: "stdoutAndStderr",
      },
      { parent: this, dependsOn: [eipAssoc], customTimeouts: { create: `${Math.ceil(timeout / 60) + 5}m` } },
    );
    const readyScript = fs.readFileSync(repoPath(HOST_SCRIPTS.ready), "utf8");
    this.ready = new command.remote.Command(
      `${name}-ready`,
      {
        connection: this.connection,
        create: `HOST_READY_TIMEOUT_S=${timeout} bash -s`,
        stdin: readyScript,
        triggers: [this.instance.id, sha256Hex(readyScript), args.wakeKey],
        logging: "stdoutAndStderr",
        addPreviousOutputInEnv: false,
      },
      // The role's policy is in place before any stage reads or writes S3.
      { parent: this, dependsOn: [sshUp, policy], customTimeouts: { create: `${Math.ceil(timeout / 60) + 5}m` } },
    );

    // Operators' keys: set in place, so changing them neither replaces the host nor re-runs a stage.
    const keysScript = fs.readFileSync(repoPath(HOST_SCRIPTS.operatorKeys), "utf8");
    const keysB64 = Buffer.from(args.authorizedKeys.join("\n")).toString("base64");
    this.operatorKeys = new command.remote.Command(
      `${name}-operator-keys`,
      {
        connection: this.connection,
        create: `bash -s -- '${keysB64}'`,
        stdin: keysScript,
        triggers: [this.instance.id, sha256Hex(keysScript), sha256Hex(keysB64)],
        logging: "stderr",
        addPreviousOutputInEnv: false,
      },
      { parent: this, dependsOn: [this.ready] },
    );

    this.registerOutputs({
      instanceId: this.instanceId,
      publicIp: this.publicIp,
      publicDns: this.publicDns,
    });
  }
}
