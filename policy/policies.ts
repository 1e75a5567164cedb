/**
 * The stack's invariants as CrossGuard policies, one exported object each, so
 * tests call their validation directly (index.ts builds the PolicyPack).
 *
 * Types are matched by their Pulumi type tokens (no @pulumi/aws import: the
 * pack installs in seconds and works with any 7.x provider). Every violation
 * message names the resource (type and name), what is wrong and the fix.
 *
 * During `pulumi preview` some values are not known yet (a bucket policy built
 * from the bucket's ARN, for example); reading one makes the policy SDK report
 * "can't run policy ... during preview" as advisory, and the check runs for real
 * at `pulumi up`, when the values are known.
 */
import type {
  Policies,
  PolicyResource,
  ReportViolation,
  ResourceValidationArgs,
  ResourceValidationPolicy,
  StackValidationArgs,
  StackValidationPolicy,
} from "@pulumi/policy";

export const TYPES = {
  instance: "aws:ec2/instance:Instance",
  spotInstanceRequest: "aws:ec2/spotInstanceRequest:SpotInstanceRequest",
  launchTemplate: "aws:ec2/launchTemplate:LaunchTemplate",
  volume: "aws:ebs/volume:Volume",
  securityGroup: "aws:ec2/securityGroup:SecurityGroup",
  securityGroupRule: "aws:ec2/securityGroupRule:SecurityGroupRule",
  securityGroupIngressRule: "aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule",
  bucket: "aws:s3/bucket:Bucket",
  bucketPublicAccessBlock: "aws:s3/bucketPublicAccessBlock:BucketPublicAccessBlock",
  bucketEncryption: "aws:s3/bucketServerSideEncryptionConfiguration:BucketServerSideEncryptionConfiguration",
  bucketEncryptionV2: "aws:s3/bucketServerSideEncryptionConfigurationV2:BucketServerSideEncryptionConfigurationV2",
  bucketVersioning: "aws:s3/bucketVersioning:BucketVersioning",
  bucketVersioningV2: "aws:s3/bucketVersioningV2:BucketVersioningV2",
  bucketPolicy: "aws:s3/bucketPolicy:BucketPolicy",
  rolePolicy: "aws:iam/rolePolicy:RolePolicy",
  iamPolicy: "aws:iam/policy:Policy",
  userPolicy: "aws:iam/userPolicy:UserPolicy",
  groupPolicy: "aws:iam/groupPolicy:GroupPolicy",
  amiFromInstance: "aws:ec2/amiFromInstance:AmiFromInstance",
  ami: "aws:ec2/ami:Ami",
  amiCopy: "aws:ec2/amiCopy:AmiCopy",
} as const;

/**
 * The tag the AMI policy reads. Policies cannot see the `retainOnDelete`
 * resource option (the policy SDK passes a resource's protect, ignoreChanges,
 * deleteBeforeReplace, aliases, customTimeouts, additionalSecretOutputs and
 * parent, nothing else), so an AMI declares its retention with this tag too.
 */
export const AMI_RETAIN_TAG = "RetainOnDelete";

const SSH_PORT = 22;

type Props = Record<string, any>;

/** `aws:ec2/instance:Instance "host-instance"`: how every message names its resource. */
function who(r: { type: string; name: string }): string {
  return `${r.type} "${r.name}"`;
}

function fmt(v: unknown): string {
  return v === undefined || v === null ? "not set" : JSON.stringify(v);
}

function asArray(v: unknown): any[] {
  if (v === undefined || v === null) return [];
  return Array.isArray(v) ? v : [v];
}

/** true or "true" (launch templates spell their EBS flag as a string). */
function isTrue(v: unknown): boolean {
  return v === true || (typeof v === "string" && v.trim().toLowerCase() === "true");
}

function isFalse(v: unknown): boolean {
  return v === false || (typeof v === "string" && v.trim().toLowerCase() === "false");
}

/** A policy document given as JSON text or as an object; undefined when it is neither. */
export function parsePolicyDocument(v: unknown): Props | undefined {
  if (typeof v === "string") {
    try {
      const doc: unknown = JSON.parse(v);
      return doc !== null && typeof doc === "object" && !Array.isArray(doc) ? (doc as Props) : undefined;
    } catch {
      return undefined;
    }
  }
  return v !== null && typeof v === "object" && !Array.isArray(v) ? (v as Props) : undefined;
}

function statementsOf(doc: Props): Props[] {
  return asArray(doc.Statement).filter((s): s is Props => s !== null && typeof s === "object");
}

function statementLabel(s: Props, i: number): string {
  return typeof s.Sid === "string" && s.Sid !== "" ? `statement "${s.Sid}"` : `statement ${i}`;
}

// ---------------------------------------------------------------------------
// IMDSv2
// ---------------------------------------------------------------------------

const IMDS_TYPES: readonly string[] = [TYPES.instance, TYPES.spotInstanceRequest, TYPES.launchTemplate];

export const imdsv2Required: ResourceValidationPolicy = {
  name: "ec2-imdsv2-required",
  description:
    'EC2 instances, spot instance requests and launch templates require IMDSv2 (metadataOptions.httpTokens "required").',
  enforcementLevel: "mandatory",
  validateResource: (args: ResourceValidationArgs, report: ReportViolation) => {
    if (!IMDS_TYPES.includes(args.type)) return;
    const mo: Props | undefined = args.props.metadataOptions;
    // With the endpoint off there is no instance metadata to steal.
    if (mo?.httpEndpoint === "disabled") return;
    if (mo?.httpTokens === "required") return;
    const now =
      mo?.httpTokens === undefined
        ? "not set, so EC2 also answers IMDSv1 requests"
        : `${fmt(mo.httpTokens)}, so EC2 also answers IMDSv1 requests`;
    report(
      `${who(args)}: metadataOptions.httpTokens is ${now}. Fix: set metadataOptions: { httpTokens: "required" } ` +
        "(IMDSv2 session tokens only; the role's credentials are then out of reach of a forged request).",
    );
  },
};

// ---------------------------------------------------------------------------
// Encrypted volumes
// ---------------------------------------------------------------------------

export const ebsVolumesEncrypted: ResourceValidationPolicy = {
  name: "ebs-volumes-encrypted",
  description:
    "EBS volumes are encrypted: an instance's rootBlockDevice and ebsBlockDevices, aws.ebs.Volume, and a launch template's EBS mappings.",
  enforcementLevel: "mandatory",
  validateResource: (args: ResourceValidationArgs, report: ReportViolation) => {
    const p = args.props;
    switch (args.type) {
      case TYPES.instance:
      case TYPES.spotInstanceRequest: {
        const root: Props | undefined = p.rootBlockDevice;
        if (root === undefined || root === null) {
          report(
            `${who(args)}: rootBlockDevice is not declared, so the root volume is encrypted only if the AMI's snapshot or ` +
              "the account default says so. Fix: declare rootBlockDevice: { encrypted: true, ... } (optionally kmsKeyId).",
          );
        } else if (!isTrue(root.encrypted)) {
          report(
            `${who(args)}: rootBlockDevice.encrypted is ${fmt(root.encrypted)}. Fix: set rootBlockDevice.encrypted: true ` +
              "(optionally kmsKeyId); this replaces the instance.",
          );
        }
        asArray(p.ebsBlockDevices).forEach((d: Props, i: number) => {
          if (!isTrue(d?.encrypted))
            report(
              `${who(args)}: ebsBlockDevices[${i}] (${d?.deviceName ?? "no deviceName"}) has encrypted ${fmt(d?.encrypted)}. ` +
                "Fix: set encrypted: true on that device.",
            );
        });
        return;
      }
      case TYPES.volume:
        if (!isTrue(p.encrypted))
          report(`${who(args)}: encrypted is ${fmt(p.encrypted)}. Fix: set encrypted: true (optionally kmsKeyId).`);
        return;
      case TYPES.launchTemplate:
        asArray(p.blockDeviceMappings).forEach((m: Props, i: number) => {
          if (m?.ebs && !isTrue(m.ebs.encrypted))
            report(
              `${who(args)}: blockDeviceMappings[${i}] (${m.deviceName ?? "no deviceName"}) has ebs.encrypted ${fmt(m.ebs.encrypted)}. ` +
                'Fix: set ebs: { encrypted: "true", ... } on that mapping.',
            );
        });
        return;
      default:
        return;
    }
  },
};

// ---------------------------------------------------------------------------
// No SSH from anywhere
// ---------------------------------------------------------------------------

function portNumber(v: unknown, fallback: number): number {
  if (typeof v === "number" && Number.isFinite(v)) return v;
  if (typeof v === "string" && /^-?\d+$/.test(v.trim())) return Number(v.trim());
  return fallback;
}

/** True when a rule with this protocol and port range lets TCP port 22 through. */
export function coversSsh(protocol: unknown, fromPort: unknown, toPort: unknown): boolean {
  const proto = String(protocol ?? "")
    .trim()
    .toLowerCase();
  if (proto === "-1" || proto === "all") return true;
  if (proto !== "tcp" && proto !== "6") return false;
  const lo = portNumber(fromPort, 0);
  const hi = portNumber(toPort, 65535);
  // -1/-1 on TCP is not a valid range, but read it the way the provider would: every port.
  if (lo < 0 || hi < 0) return true;
  return lo <= SSH_PORT && SSH_PORT <= hi;
}

/** A CIDR of prefix length 0: 0.0.0.0/0, ::/0 and their spellings. */
export function isAnywhere(cidr: unknown): boolean {
  if (typeof cidr !== "string") return false;
  const m = /\/\s*(\d+)\s*$/.exec(cidr);
  return m !== null && Number(m[1]) === 0;
}

function sshFix(): string {
  return (
    "Fix: allow only the addresses that need SSH (for this stack: sshAllowedCidrs, e.g. your address /32), " +
    "or reach the host through SSM Session Manager or a bastion instead of an open port."
  );
}

function ruleText(protocol: unknown, fromPort: unknown, toPort: unknown): string {
  return `protocol ${fmt(protocol)}, ports ${fmt(fromPort)}-${fmt(toPort)}`;
}

export const noSshFromAnywhere: ResourceValidationPolicy = {
  name: "no-ssh-from-anywhere",
  description:
    "No security group ingress lets 0.0.0.0/0 or ::/0 reach TCP port 22 (SecurityGroup ingress, SecurityGroupRule, vpc.SecurityGroupIngressRule).",
  enforcementLevel: "mandatory",
  validateResource: (args: ResourceValidationArgs, report: ReportViolation) => {
    const p = args.props;
    switch (args.type) {
      case TYPES.securityGroup:
        asArray(p.ingress).forEach((r: Props, i: number) => {
          if (!r || !coversSsh(r.protocol, r.fromPort, r.toPort)) return;
          const open = [...asArray(r.cidrBlocks), ...asArray(r.ipv6CidrBlocks)].filter(isAnywhere);
          if (open.length > 0)
            report(
              `${who(args)}: ingress[${i}] (${ruleText(r.protocol, r.fromPort, r.toPort)}) lets ${open.join(" and ")} ` +
                `reach port ${SSH_PORT} (SSH). ${sshFix()}`,
            );
        });
        return;
      case TYPES.securityGroupRule: {
        if (p.type !== "ingress" || !coversSsh(p.protocol, p.fromPort, p.toPort)) return;
        const open = [...asArray(p.cidrBlocks), ...asArray(p.ipv6CidrBlocks)].filter(isAnywhere);
        if (open.length > 0)
          report(
            `${who(args)}: the ingress rule (${ruleText(p.protocol, p.fromPort, p.toPort)}) lets ${open.join(" and ")} ` +
              `reach port ${SSH_PORT} (SSH). ${sshFix()}`,
          );
        return;
      }
      case TYPES.securityGroupIngressRule: {
        if (!coversSsh(p.ipProtocol, p.fromPort, p.toPort)) return;
        const open = [p.cidrIpv4, p.cidrIpv6].filter(isAnywhere);
        if (open.length > 0)
          report(
            `${who(args)}: the rule (${ruleText(p.ipProtocol, p.fromPort, p.toPort)}) lets ${open.join(" and ")} ` +
              `reach port ${SSH_PORT} (SSH). ${sshFix()}`,
          );
        return;
      }
      default:
        return;
    }
  },
};

// ---------------------------------------------------------------------------
// S3 buckets: private, encrypted, versioned, TLS-only (stack policy)
// ---------------------------------------------------------------------------

const PUBLIC_ACCESS_FLAGS = ["blockPublicAcls", "blockPublicPolicy", "ignorePublicAcls", "restrictPublicBuckets"];
const SSE_ALGORITHMS = ["AES256", "aws:kms", "aws:kms:dsse"];

/** A value that may be unknown during preview, or undefined. */
function knownOrUndefined(obj: Props, key: string): unknown {
  try {
    return obj[key];
  } catch {
    return undefined;
  }
}

/**
 * Whether a side resource (BucketVersioning, BucketPolicy, ...) configures
 * `bucket`: by the engine's property dependencies when its `bucket` input came
 * from a bucket of the stack (this works in preview, before the bucket has an
 * id), otherwise by value (the bucket's name or id).
 */
export function configuresBucket(side: PolicyResource, bucket: PolicyResource): boolean {
  const deps = (side.propertyDependencies?.bucket ?? []).filter((d) => d.type === TYPES.bucket);
  if (deps.length > 0) return deps.some((d) => d.urn === bucket.urn);
  // Unknown during preview: the SDK then defers the whole check to `pulumi up`.
  const ref: unknown = side.props.bucket;
  if (typeof ref !== "string" || ref === "") return false;
  return ref === knownOrUndefined(bucket.props, "bucket") || ref === knownOrUndefined(bucket.props, "id");
}

/** The statement of a bucket policy that refuses requests made without TLS, if any. */
export function deniesInsecureTransport(doc: Props): boolean {
  return statementsOf(doc).some((s) => {
    if (s.Effect !== "Deny") return false;
    const everyone = s.Principal === "*" || asArray(s.Principal?.AWS).includes("*");
    const allS3 = asArray(s.Action).some((a) => a === "*" || (typeof a === "string" && a.toLowerCase() === "s3:*"));
    const objects = asArray(s.Resource).some((r) => r === "*" || (typeof r === "string" && r.endsWith("/*")));
    const cond: Props = s.Condition ?? {};
    const insecure = ["Bool", "BoolIfExists"].some((op) => {
      const block: Props | undefined = cond[op];
      if (!block || typeof block !== "object") return false;
      return Object.entries(block).some(
        ([k, v]) => k.toLowerCase() === "aws:securetransport" && asArray(v).some(isFalse),
      );
    });
    return everyone && allS3 && objects && insecure;
  });
}

export const s3BucketHardened: StackValidationPolicy = {
  name: "s3-bucket-private-encrypted-versioned-tls-only",
  description:
    "Every aws.s3.Bucket of the stack has a BucketPublicAccessBlock with all four flags on, a " +
    "BucketServerSideEncryptionConfiguration, a BucketVersioning with status Enabled and a BucketPolicy " +
    "denying aws:SecureTransport=false.",
  enforcementLevel: "mandatory",
  validateStack: (args: StackValidationArgs, report: ReportViolation) => {
    const buckets = args.resources.filter((r) => r.type === TYPES.bucket);
    for (const bucket of buckets) {
      const w = who(bucket);
      const sides = (...types: string[]) =>
        args.resources.filter((r) => types.includes(r.type) && configuresBucket(r, bucket));

      const pabs = sides(TYPES.bucketPublicAccessBlock);
      if (pabs.length === 0) {
        report(
          `${w}: not private: no BucketPublicAccessBlock configures it. Fix: add an aws.s3.BucketPublicAccessBlock with ` +
            `bucket: <this bucket>.id and ${PUBLIC_ACCESS_FLAGS.map((f) => `${f}: true`).join(", ")}.`,
          bucket.urn,
        );
      } else if (!pabs.some((r) => PUBLIC_ACCESS_FLAGS.every((f) => isTrue(r.props[f])))) {
        const off = PUBLIC_ACCESS_FLAGS.filter((f) => !isTrue(pabs[0].props[f]));
        report(
          `${w}: not private: its BucketPublicAccessBlock "${pabs[0].name}" leaves ${off.join(", ")} off. ` +
            "Fix: set all four flags (blockPublicAcls, blockPublicPolicy, ignorePublicAcls, restrictPublicBuckets) to true.",
          bucket.urn,
        );
      }

      const sses = sides(TYPES.bucketEncryption, TYPES.bucketEncryptionV2);
      const encrypts = (r: PolicyResource) =>
        asArray(r.props.rules).some((rule: Props) =>
          SSE_ALGORITHMS.includes(rule?.applyServerSideEncryptionByDefault?.sseAlgorithm),
        );
      if (sses.length === 0) {
        report(
          `${w}: not encrypted: no BucketServerSideEncryptionConfiguration configures it. Fix: add an ` +
            "aws.s3.BucketServerSideEncryptionConfiguration with bucket: <this bucket>.id and rules: " +
            '[{ applyServerSideEncryptionByDefault: { sseAlgorithm: "AES256" (or "aws:kms") } }].',
          bucket.urn,
        );
      } else if (!sses.some(encrypts)) {
        report(
          `${w}: not encrypted: BucketServerSideEncryptionConfiguration "${sses[0].name}" has no rule with ` +
            `applyServerSideEncryptionByDefault.sseAlgorithm ${SSE_ALGORITHMS.join(", ")}. Fix: add such a rule.`,
          bucket.urn,
        );
      }

      const versionings = sides(TYPES.bucketVersioning, TYPES.bucketVersioningV2);
      if (versionings.length === 0) {
        report(
          `${w}: not versioned: no BucketVersioning configures it. Fix: add an aws.s3.BucketVersioning with ` +
            'bucket: <this bucket>.id and versioningConfiguration: { status: "Enabled" }.',
          bucket.urn,
        );
      } else if (!versionings.some((r) => r.props.versioningConfiguration?.status === "Enabled")) {
        report(
          `${w}: not versioned: BucketVersioning "${versionings[0].name}" has versioningConfiguration.status ` +
            `${fmt(versionings[0].props.versioningConfiguration?.status)}. Fix: set it to "Enabled".`,
          bucket.urn,
        );
      }

      const policies = sides(TYPES.bucketPolicy);
      const tlsFix =
        'Fix: give it a BucketPolicy with a statement { Effect: "Deny", Principal: "*", Action: "s3:*", ' +
        'Resource: [<bucket ARN>, "<bucket ARN>/*"], Condition: { Bool: { "aws:SecureTransport": "false" } } }.';
      if (policies.length === 0) {
        report(`${w}: not TLS-only: no BucketPolicy configures it. ${tlsFix}`, bucket.urn);
      } else if (
        !policies.some((r) => {
          const doc = parsePolicyDocument(r.props.policy);
          return doc !== undefined && deniesInsecureTransport(doc);
        })
      ) {
        report(
          `${w}: not TLS-only: BucketPolicy "${policies[0].name}" does not deny every S3 action on the bucket's ` +
            `objects to everyone when aws:SecureTransport is false. ${tlsFix}`,
          bucket.urn,
        );
      }
    }
  },
};

// ---------------------------------------------------------------------------
// IAM: no wildcard actions or resources
// ---------------------------------------------------------------------------

const IAM_TYPES: readonly string[] = [TYPES.rolePolicy, TYPES.iamPolicy, TYPES.userPolicy, TYPES.groupPolicy];

/** "*" or a whole service ("s3:*", "ec2:*"). */
export function isWildcardAction(action: unknown): boolean {
  return typeof action === "string" && (action.trim() === "*" || /^[A-Za-z0-9-]+:\*$/.test(action.trim()));
}

export const iamNoWildcards: ResourceValidationPolicy = {
  name: "iam-no-wildcard-actions-or-resources",
  description:
    'IAM policies (RolePolicy, Policy, UserPolicy, GroupPolicy) allow no Action "*" or "<service>:*", no Resource "*", ' +
    "and no NotAction/NotResource.",
  enforcementLevel: "mandatory",
  validateResource: (args: ResourceValidationArgs, report: ReportViolation) => {
    if (!IAM_TYPES.includes(args.type)) return;
    const raw: unknown = args.props.policy;
    const doc = parsePolicyDocument(raw);
    if (doc === undefined) {
      report(
        `${who(args)}: policy is ${raw === undefined ? "not set" : "not a JSON policy document"}, so its actions and ` +
          'resources cannot be checked. Fix: pass a policy document (JSON.stringify({ Version: "2012-10-17", Statement: [...] })).',
      );
      return;
    }
    statementsOf(doc).forEach((s, i) => {
      if (s.Effect === "Deny") return;
      const label = statementLabel(s, i);
      const wild = asArray(s.Action).filter(isWildcardAction);
      if (wild.length > 0)
        report(
          `${who(args)}: ${label} allows Action ${wild.map((a) => JSON.stringify(a)).join(", ")} (every action ` +
            `${wild.some((a) => String(a).trim() === "*") ? "of every service" : "of the service"}). ` +
            'Fix: list the exact actions the principal needs (e.g. "s3:GetObject", "s3:PutObject").',
        );
      if (s.NotAction !== undefined)
        report(
          `${who(args)}: ${label} allows NotAction ${JSON.stringify(s.NotAction)}, i.e. every action but those. ` +
            "Fix: use Action with the exact actions the principal needs.",
        );
      if (asArray(s.Resource).some((r) => typeof r === "string" && r.trim() === "*"))
        report(
          `${who(args)}: ${label} applies to Resource "*". Fix: name the ARNs it acts on ` +
            '(e.g. "arn:aws:s3:::my-bucket/prefix/*").',
        );
      if (s.NotResource !== undefined)
        report(
          `${who(args)}: ${label} uses NotResource ${JSON.stringify(s.NotResource)}, i.e. every resource but those. ` +
            "Fix: use Resource with the ARNs it acts on.",
        );
    });
  },
};

// ---------------------------------------------------------------------------
// AMIs retained
// ---------------------------------------------------------------------------

const AMI_TYPES: readonly string[] = [TYPES.amiFromInstance, TYPES.ami, TYPES.amiCopy];

export const amiRetained: ResourceValidationPolicy = {
  name: "ami-retained-on-delete",
  description:
    `AMIs (AmiFromInstance, Ami, AmiCopy) outlive the stack: other stacks boot them. Policies cannot see the ` +
    `retainOnDelete option, so an AMI shows it with the tag ${AMI_RETAIN_TAG}="true" (or is protected).`,
  enforcementLevel: "mandatory",
  validateResource: (args: ResourceValidationArgs, report: ReportViolation) => {
    if (!AMI_TYPES.includes(args.type)) return;
    if (args.opts?.protect === true) return;
    const tags: Props = args.props.tags ?? {};
    if (isTrue(tags[AMI_RETAIN_TAG])) return;
    report(
      `${who(args)}: nothing shows that this AMI is kept when the stack is destroyed or the AMI replaced (tag ` +
        `${AMI_RETAIN_TAG} is ${fmt(tags[AMI_RETAIN_TAG])}, not protected). Policies cannot read the retainOnDelete ` +
        `option itself. Fix: set the resource option retainOnDelete: true and the tag ${AMI_RETAIN_TAG}: "true" ` +
        "(or protect: true).",
    );
  },
};

/** Every policy of the pack, in the order the pack lists them. */
export const policies: Policies = [
  imdsv2Required,
  ebsVolumesEncrypted,
  noSshFromAnywhere,
  s3BucketHardened,
  iamNoWildcards,
  amiRetained,
];
