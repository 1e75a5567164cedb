import * as aws from "@pulumi/aws";
import * as pulumi from "@pulumi/pulumi";
import {
  CANONICAL_OWNER,
  EC2_ASSUME_ROLE_POLICY,
  hostPolicyDocument,
  renderCloudInit,
  s3ObjectArn,
  UBUNTU_AMI_NAME,
} from "../hostSetup";

export interface QemuHostArgs {
  instanceType: string;
  /** Explicit AMI; default: newest Canonical Ubuntu 24.04 arm64. */
  amiId?: string;
  volumeGiB: number;
  volumeIops: number;
  volumeThroughputMiBps: number;
  subnetId?: string;
  sshAllowedCidrs: readonly string[];
  /** The pipeline's public key, for the key pair (the private half stays with the runner). */
  publicKeyOpenssh: pulumi.Input<string>;
  bucketArn: pulumi.Input<string>;
  artifactPrefix: string;
  /** s3:// source objects the host must read (image, drivers ISO). */
  sourceObjectUrls: readonly string[];
  tags: Record<string, string>;
}

/**
 * The KVM-capable Graviton bare-metal host: EC2 instance (IMDSv2, encrypted
 * gp3) with an Elastic IP (the address, and so every command's connection,
 * survives the stop after each build), key pair, SSH-only security group,
 * least-privilege instance profile. The stages reach it through the runner
 * (host-exec.sh), which also starts it when it is stopped.
 */
export class QemuHost extends pulumi.ComponentResource {
  readonly instance: aws.ec2.Instance;
  readonly instanceId: pulumi.Output<string>;
  readonly publicIp: pulumi.Output<string>;
  readonly publicDns: pulumi.Output<string>;
  /** The host AMI (the bake instance starts from the same one). */
  readonly amiId: pulumi.Output<string>;
  readonly vpcId: pulumi.Output<string>;
  /** What every stage waits for: the Elastic IP attached, the role's policy in place. */
  readonly ready: pulumi.Resource[];

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

    this.amiId = pulumi.output(amiId);
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

    // Stages run once the address is attached and the role's policy is in place.
    this.ready = [eipAssoc, policy];
    this.vpcId = pulumi.output(vpcId);

    this.registerOutputs({
      instanceId: this.instanceId,
      publicIp: this.publicIp,
      publicDns: this.publicDns,
    });
  }
}
