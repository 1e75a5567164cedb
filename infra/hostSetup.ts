/**
 * Pure decisions about the QEMU host: its cloud-init user data and the IAM
 * policy of its instance profile. No Pulumi here, so tests read them as data.
 */

/** Where the pipeline's scripts and assets live on a host. */
export const HOST_HOME = "/opt/windows-arm64-image";
/** The login user of Canonical's Ubuntu images. */
export const HOST_USER = "ubuntu";
/** Canonical's AWS account, owner of the Ubuntu AMIs. */
export const CANONICAL_OWNER = "099720109477";
export const UBUNTU_AMI_NAME = "ubuntu/images/hvm-ssd-gp3/ubuntu-noble-24.04-arm64-server-*";

/** Debian/Ubuntu packages the host scripts use. */
export const HOST_PACKAGES = Object.freeze([
  "qemu-system-arm",
  "qemu-efi-aarch64",
  "qemu-utils",
  "xorriso",
  "socat",
  "jq",
  "netcat-openbsd",
  "curl",
  "ca-certificates",
  "ntfs-3g",
  "fdisk",
  "nftables",
  "python3",
]);

/** The unprivileged account QEMU runs the guest as (run-vm.sh VM_USER). */
export const VM_USER = "windows-vm";
/** Creates VM_USER when missing (host cloud-init and the bake instance). */
export const VM_USER_ADD = `id -u ${VM_USER} >/dev/null 2>&1 || useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin ${VM_USER}`;

/**
 * cloud-init user data for the host. It holds no secret: EC2 stores user
 * data in plain text. The pipeline's own key arrives through the EC2 key
 * pair; operators' keys are set by operator-keys.sh (a change to them must
 * not replace the host, as a user-data change would).
 */
export function renderCloudInit(): string {
  const lines = [
    "#cloud-config",
    "# windows-arm64-image QEMU host. No secrets here: EC2 user data is plain text.",
    "package_update: true",
    "package_upgrade: false",
    "packages:",
    ...HOST_PACKAGES.map((p) => `  - ${p}`),
  ];
  lines.push(
    "runcmd:",
    // AWS CLI v2 is a snap on Ubuntu 24.04; retry since the store can be slow right after boot.
    `  - [bash, -c, "for i in 1 2 3 4 5; do snap install aws-cli --classic && break; sleep 10; done"]`,
    ...["", "/provisioning", "/provisioning/windows", "/assets"].map(
      (d) => `  - [install, -d, -o, ${HOST_USER}, -g, ${HOST_USER}, -m, "0755", ${HOST_HOME}${d}]`,
    ),
    `  - [install, -d, -o, root, -g, root, -m, "0700", /var/lib/windows-vm]`,
    // QEMU runs the guest as this account (run-vm.sh VM_USER), behind a rule that keeps it off the metadata service.
    `  - [bash, -c, "${VM_USER_ADD}"]`,
    "final_message: windows-arm64-image host ready after $UPTIME seconds",
  );
  return lines.join("\n") + "\n";
}

export interface PolicyStatement {
  Sid: string;
  Effect: "Allow" | "Deny";
  Action: string[];
  Resource: string[];
  Condition?: Record<string, Record<string, string[]>>;
}

/**
 * The host's instance-profile policy: read and write only under the artifact
 * prefix, list only that prefix, and read the given source objects (s3://
 * source image or drivers ISO). No s3:*, no "*" resource.
 */
export function hostPolicyDocument(bucketArn: string, prefix: string, sourceObjectArns: readonly string[]) {
  const statements: PolicyStatement[] = [
    {
      Sid: "ListArtifactPrefix",
      Effect: "Allow",
      Action: ["s3:ListBucket"],
      Resource: [bucketArn],
      Condition: { StringLike: { "s3:prefix": [`${prefix}*`] } },
    },
    {
      Sid: "ReadWriteArtifacts",
      Effect: "Allow",
      Action: ["s3:GetObject", "s3:PutObject", "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"],
      Resource: [`${bucketArn}/${prefix}*`],
    },
  ];
  const sources = [...new Set(sourceObjectArns)];
  if (sources.length > 0) {
    statements.push({ Sid: "ReadSourceImages", Effect: "Allow", Action: ["s3:GetObject"], Resource: sources });
  }
  return { Version: "2012-10-17", Statement: statements };
}

/** arn:aws:s3:::bucket/key for an s3:// URL; undefined for other schemes. */
export function s3ObjectArn(url: string, partition = "aws"): string | undefined {
  const m = /^s3:\/\/([^/]+)\/(.+)$/.exec(url);
  return m ? `arn:${partition}:s3:::${m[1]}/${m[2]}` : undefined;
}

/** The EC2 trust policy for the host role. */
export const EC2_ASSUME_ROLE_POLICY = {
  Version: "2012-10-17",
  Statement: [{ Effect: "Allow", Principal: { Service: "ec2.amazonaws.com" }, Action: "sts:AssumeRole" }],
};
