/**
 * The CrossGuard pack in policy/: each policy called directly with passing and
 * failing resources; the stack's own mocked resources through every policy;
 * and the real pack served by run-policy-pack in a child process, asked over
 * the analyzer's gRPC protocol (as `pulumi preview --policy-pack policy` does).
 */
import { expect } from "chai";
import * as fs from "fs";
import * as path from "path";
import {
  AMI_RETAIN_TAG,
  amiRetained,
  ebsVolumesEncrypted,
  iamNoWildcards,
  imdsv2Required,
  noSshFromAnywhere,
  policies,
  s3BucketHardened,
  TYPES,
} from "../../policy/policies";
import { BASE_CONFIG, runProgram } from "../support/mocks";
import {
  checkAll,
  checkResource,
  checkStack,
  fromRegistered,
  POLICY_DIR,
  ResourceInput,
  servePack,
  ServedPack,
  UNKNOWN,
  urnOf,
  Violation,
} from "../support/policy";

const PACK_NAME = "windows-arm64-image-invariants";

function res(type: string, name: string, props: Record<string, unknown>, extra: Partial<ResourceInput> = {}) {
  return { type, name, props, ...extra };
}

/** One message that names the resource and carries a fix containing `fix`. */
function expectOne(messages: string[], resource: string, fix: string): string {
  expect(messages, JSON.stringify(messages)).to.have.length(1);
  expect(messages[0]).to.contain(resource);
  const fixAt = messages[0].indexOf("Fix:");
  expect(fixAt, messages[0]).to.be.greaterThan(0);
  expect(messages[0].slice(fixAt)).to.contain(fix);
  return messages[0];
}

describe("policy pack: the policy list", () => {
  it("lists each exported policy once, with unique names, all mandatory", () => {
    expect(policies).to.have.members([
      imdsv2Required,
      ebsVolumesEncrypted,
      noSshFromAnywhere,
      s3BucketHardened,
      iamNoWildcards,
      amiRetained,
    ]);
    const names = policies.map((p) => p.name);
    expect(new Set(names).size).to.equal(names.length);
    for (const p of policies) expect(p.enforcementLevel, p.name).to.equal("mandatory");
  });

  it("index.ts builds the pack named windows-arm64-image-invariants from that list", () => {
    const src = fs.readFileSync(path.join(POLICY_DIR, "index.ts"), "utf8");
    expect(src).to.match(/new PolicyPack\(\s*"windows-arm64-image-invariants"/);
    expect(src).to.match(/import \{ policies \} from "\.\/policies"/);
    expect(fs.readFileSync(path.join(POLICY_DIR, "PulumiPolicy.yaml"), "utf8")).to.match(/^runtime: nodejs$/m);
  });
});

describe("policy ec2-imdsv2-required", () => {
  const check = (r: ResourceInput) => checkResource(imdsv2Required, r);

  it("passes instances and launch templates that require IMDSv2 tokens, or turn the endpoint off", async () => {
    expect(await check(res(TYPES.instance, "web", { metadataOptions: { httpTokens: "required" } }))).to.deep.equal([]);
    expect(await check(res(TYPES.launchTemplate, "lt", { metadataOptions: { httpTokens: "required" } }))).to.deep.equal(
      [],
    );
    expect(await check(res(TYPES.instance, "dark", { metadataOptions: { httpEndpoint: "disabled" } }))).to.deep.equal(
      [],
    );
    expect(await check(res(TYPES.bucket, "b", {}))).to.deep.equal([]);
  });

  it("fails an instance without metadataOptions, naming it and the fix", async () => {
    const m = expectOne(
      await check(res(TYPES.instance, "web", { instanceType: "t4g.small" })),
      'aws:ec2/instance:Instance "web"',
      'metadataOptions: { httpTokens: "required" }',
    );
    expect(m).to.contain("not set");
  });

  it('fails httpTokens "optional" on an instance, a spot request and a launch template', async () => {
    for (const type of [TYPES.instance, TYPES.spotInstanceRequest, TYPES.launchTemplate]) {
      const m = expectOne(
        await check(res(type, "v1", { metadataOptions: { httpEndpoint: "enabled", httpTokens: "optional" } })),
        `${type} "v1"`,
        'httpTokens: "required"',
      );
      expect(m).to.contain('"optional"');
    }
  });
});

describe("policy ebs-volumes-encrypted", () => {
  const check = (r: ResourceInput) => checkResource(ebsVolumesEncrypted, r);

  it("passes encrypted root and EBS devices, volumes and launch template mappings", async () => {
    expect(
      await check(
        res(TYPES.instance, "web", {
          rootBlockDevice: { encrypted: true, volumeType: "gp3" },
          ebsBlockDevices: [{ deviceName: "/dev/sdf", encrypted: true }],
        }),
      ),
    ).to.deep.equal([]);
    expect(await check(res(TYPES.volume, "data", { encrypted: true, size: 10 }))).to.deep.equal([]);
    expect(
      await check(
        res(TYPES.launchTemplate, "lt", {
          blockDeviceMappings: [{ deviceName: "/dev/sda1", ebs: { encrypted: "true" } }, { virtualName: "ephemeral0" }],
        }),
      ),
    ).to.deep.equal([]);
  });

  it("fails an instance that does not declare its root volume", async () => {
    expectOne(
      await check(res(TYPES.instance, "web", { ami: "ami-1" })),
      'aws:ec2/instance:Instance "web"',
      "rootBlockDevice: { encrypted: true",
    );
  });

  it("fails an unencrypted root volume and names each unencrypted EBS device", async () => {
    const messages = await check(
      res(TYPES.instance, "web", {
        rootBlockDevice: { encrypted: false },
        ebsBlockDevices: [{ deviceName: "/dev/sdf", encrypted: true }, { deviceName: "/dev/sdg" }],
      }),
    );
    expect(messages).to.have.length(2);
    expect(messages[0]).to.contain('aws:ec2/instance:Instance "web": rootBlockDevice.encrypted is false');
    expect(messages[0]).to.contain("Fix: set rootBlockDevice.encrypted: true");
    expect(messages[1]).to.contain("ebsBlockDevices[1] (/dev/sdg)").and.contain("Fix: set encrypted: true");
  });

  it('fails an unencrypted aws.ebs.Volume and a launch template mapping with encrypted "false"', async () => {
    expectOne(await check(res(TYPES.volume, "data", { size: 10 })), 'aws:ebs/volume:Volume "data"', "encrypted: true");
    expectOne(
      await check(
        res(TYPES.launchTemplate, "lt", {
          blockDeviceMappings: [{ deviceName: "/dev/sda1", ebs: { encrypted: "false" } }],
        }),
      ),
      'aws:ec2/launchTemplate:LaunchTemplate "lt"',
      'ebs: { encrypted: "true"',
    );
  });
});

describe("policy no-ssh-from-anywhere", () => {
  const check = (r: ResourceInput) => checkResource(noSshFromAnywhere, r);
  const sg = (ingress: unknown[], egress: unknown[] = []) => res(TYPES.securityGroup, "host-ssh", { ingress, egress });

  it("passes SSH from listed CIDRs, other ports or UDP from anywhere, and egress to anywhere", async () => {
    expect(
      await check(
        sg(
          [
            { protocol: "tcp", fromPort: 22, toPort: 22, cidrBlocks: ["203.0.113.7/32"], ipv6CidrBlocks: [] },
            { protocol: "tcp", fromPort: 443, toPort: 443, cidrBlocks: ["0.0.0.0/0"] },
            { protocol: "udp", fromPort: 22, toPort: 22, cidrBlocks: ["0.0.0.0/0"] },
          ],
          [{ protocol: "-1", fromPort: 0, toPort: 0, cidrBlocks: ["0.0.0.0/0"], ipv6CidrBlocks: ["::/0"] }],
        ),
      ),
    ).to.deep.equal([]);
    const rule = { type: "egress", protocol: "-1", fromPort: 0, toPort: 0, cidrBlocks: ["0.0.0.0/0"] };
    expect(await check(res(TYPES.securityGroupRule, "out", rule))).to.deep.equal([]);
    expect(
      await check(
        res(TYPES.securityGroupIngressRule, "ssh", {
          ipProtocol: "tcp",
          fromPort: 22,
          toPort: 22,
          cidrIpv4: "198.51.100.0/24",
        }),
      ),
    ).to.deep.equal([]);
  });

  it("fails SSH from 0.0.0.0/0 in a security group's ingress, naming the group and the fix", async () => {
    const m = expectOne(
      await check(sg([{ protocol: "tcp", fromPort: 22, toPort: 22, cidrBlocks: ["10.0.0.0/8", "0.0.0.0/0"] }])),
      'aws:ec2/securityGroup:SecurityGroup "host-ssh"',
      "allow only the addresses that need SSH",
    );
    expect(m).to.contain("ingress[0]").and.contain("0.0.0.0/0").and.not.contain("10.0.0.0/8");
  });

  it("fails all-protocol and wide port ranges that include 22 from ::/0 or 0.0.0.0/0", async () => {
    for (const rule of [
      { protocol: "-1", fromPort: 0, toPort: 0, ipv6CidrBlocks: ["::/0"] },
      { protocol: "tcp", fromPort: 0, toPort: 65535, cidrBlocks: ["0.0.0.0/0"] },
      { protocol: "6", fromPort: 20, toPort: 30, cidrBlocks: ["0.0.0.0/0"] },
    ])
      expectOne(await check(sg([rule])), '"host-ssh"', "allow only the addresses that need SSH");
  });

  it("fails an ingress SecurityGroupRule and a vpc.SecurityGroupIngressRule open to the world on 22", async () => {
    expectOne(
      await check(
        res(TYPES.securityGroupRule, "ssh-in", {
          type: "ingress",
          protocol: "tcp",
          fromPort: 22,
          toPort: 22,
          cidrBlocks: ["0.0.0.0/0"],
        }),
      ),
      'aws:ec2/securityGroupRule:SecurityGroupRule "ssh-in"',
      "allow only the addresses that need SSH",
    );
    for (const props of [
      { ipProtocol: "-1", cidrIpv4: "0.0.0.0/0" },
      { ipProtocol: "tcp", fromPort: 22, toPort: 22, cidrIpv6: "::/0" },
    ])
      expectOne(
        await check(res(TYPES.securityGroupIngressRule, "open", props)),
        'aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule "open"',
        "allow only the addresses that need SSH",
      );
  });
});

/** A bucket and its four side resources, each linked to it as the engine records `bucket: bucket.id`. */
function hardenedBucket(name: string, overrides: Partial<Record<"pab" | "sse" | "ver" | "pol", unknown>> = {}) {
  const arn = `arn:aws:s3:::${name}-bucket`;
  const link = { propertyDependencies: { bucket: [name] } };
  const bucketId = `${name}-bucket`;
  const all: Record<string, ResourceInput> = {
    bucket: res(TYPES.bucket, name, { bucket: bucketId, arn, id: bucketId }),
    pab: res(
      TYPES.bucketPublicAccessBlock,
      `${name}-pab`,
      {
        bucket: bucketId,
        blockPublicAcls: true,
        blockPublicPolicy: true,
        ignorePublicAcls: true,
        restrictPublicBuckets: true,
      },
      link,
    ),
    sse: res(
      TYPES.bucketEncryption,
      `${name}-sse`,
      { bucket: bucketId, rules: [{ applyServerSideEncryptionByDefault: { sseAlgorithm: "aws:kms" } }] },
      link,
    ),
    ver: res(
      TYPES.bucketVersioning,
      `${name}-versioning`,
      { bucket: bucketId, versioningConfiguration: { status: "Enabled" } },
      link,
    ),
    pol: res(
      TYPES.bucketPolicy,
      `${name}-tls`,
      {
        bucket: bucketId,
        policy: JSON.stringify({
          Version: "2012-10-17",
          Statement: [
            {
              Effect: "Deny",
              Principal: "*",
              Action: "s3:*",
              Resource: [arn, `${arn}/*`],
              Condition: { Bool: { "aws:SecureTransport": "false" } },
            },
          ],
        }),
      },
      link,
    ),
  };
  for (const [k, v] of Object.entries(overrides)) {
    if (v === null) delete all[k];
    else all[k] = { ...all[k], props: { ...all[k].props, ...(v as object) } };
  }
  return Object.values(all);
}

describe("policy s3-bucket-private-encrypted-versioned-tls-only (stack)", () => {
  const check = (inputs: ResourceInput[]) => checkStack(s3BucketHardened, inputs);
  const messages = (vs: Violation[]) => vs.map((v) => v.message);

  it("passes a bucket with all four side resources, linked by dependency or by name", async () => {
    expect(await check(hardenedBucket("artifacts"))).to.deep.equal([]);
    const byName = hardenedBucket("named").map((r) => ({ ...r, propertyDependencies: undefined }));
    expect(await check(byName)).to.deep.equal([]);
    // The V2 side resources and a policy given as an object with { AWS: "*" } count too.
    const v2 = hardenedBucket("v2").map((r) =>
      r.type === TYPES.bucketVersioning
        ? { ...r, type: TYPES.bucketVersioningV2 }
        : r.type === TYPES.bucketEncryption
          ? { ...r, type: TYPES.bucketEncryptionV2 }
          : r.type === TYPES.bucketPolicy
            ? {
                ...r,
                props: {
                  ...r.props,
                  policy: {
                    Statement: {
                      Effect: "Deny",
                      Principal: { AWS: "*" },
                      Action: ["*"],
                      Resource: "arn:aws:s3:::v2-bucket/*",
                      Condition: { Bool: { "aws:securetransport": false } },
                    },
                  },
                },
              }
            : r,
    );
    expect(await check(v2)).to.deep.equal([]);
  });

  it("passes a stack without buckets (an existing bucket is only looked up)", async () => {
    expect(await check([res(TYPES.instance, "web", {})])).to.deep.equal([]);
  });

  it("reports each missing side resource against the bucket, with the fix", async () => {
    const found = await check(hardenedBucket("artifacts", { pab: null, sse: null, ver: null, pol: null }));
    expect(found.map((v) => v.urn)).to.deep.equal(Array(4).fill(urnOf(TYPES.bucket, "artifacts")));
    const [pab, sse, ver, pol] = messages(found);
    expect(pab).to.contain('aws:s3/bucket:Bucket "artifacts": not private: no BucketPublicAccessBlock');
    expect(pab).to.contain("Fix: add an aws.s3.BucketPublicAccessBlock").and.contain("restrictPublicBuckets: true");
    expect(sse)
      .to.contain("not encrypted: no BucketServerSideEncryptionConfiguration")
      .and.contain('sseAlgorithm: "AES256"');
    expect(ver).to.contain("not versioned: no BucketVersioning").and.contain('status: "Enabled"');
    expect(pol).to.contain("not TLS-only: no BucketPolicy").and.contain('"aws:SecureTransport": "false"');
  });

  it("reports side resources that exist but are too weak", async () => {
    const found = messages(
      await check(
        hardenedBucket("artifacts", {
          pab: { ignorePublicAcls: false, restrictPublicBuckets: false },
          sse: { rules: [{ bucketKeyEnabled: true }] },
          ver: { versioningConfiguration: { status: "Suspended" } },
          pol: {
            policy: JSON.stringify({
              Statement: [{ Effect: "Allow", Principal: "*", Action: "s3:GetObject", Resource: "arn:aws:s3:::x/*" }],
            }),
          },
        }),
      ),
    );
    expect(found).to.have.length(4);
    expect(found[0]).to.contain(
      'BucketPublicAccessBlock "artifacts-pab" leaves ignorePublicAcls, restrictPublicBuckets off',
    );
    expect(found[1]).to.contain('"artifacts-sse" has no rule with applyServerSideEncryptionByDefault.sseAlgorithm');
    expect(found[2]).to.contain('status "Suspended". Fix: set it to "Enabled"');
    expect(found[3])
      .to.contain('BucketPolicy "artifacts-tls" does not deny')
      .and.contain("Fix: give it a BucketPolicy");
  });

  it("does not credit one bucket's side resources to another", async () => {
    const found = await check([...hardenedBucket("good"), res(TYPES.bucket, "bare", { bucket: "bare-bucket" })]);
    expect(found).to.have.length(4);
    for (const v of found) {
      expect(v.urn).to.equal(urnOf(TYPES.bucket, "bare"));
      expect(v.message).to.contain('aws:s3/bucket:Bucket "bare"');
    }
  });
});

describe("policy iam-no-wildcard-actions-or-resources", () => {
  const check = (r: ResourceInput) => checkResource(iamNoWildcards, r);
  const doc = (...Statement: unknown[]) => JSON.stringify({ Version: "2012-10-17", Statement });

  it("passes exact actions on named ARNs, and wildcards in Deny statements", async () => {
    const policy = doc(
      { Effect: "Allow", Action: ["s3:GetObject", "s3:PutObject"], Resource: ["arn:aws:s3:::b/prefix/*"] },
      { Effect: "Allow", Action: "s3:ListBucket", Resource: "arn:aws:s3:::b" },
      { Effect: "Deny", Action: "*", Resource: "*", Condition: { Bool: { "aws:SecureTransport": "false" } } },
    );
    expect(await check(res(TYPES.rolePolicy, "host", { role: "r", policy }))).to.deep.equal([]);
    expect(
      await check(
        res(TYPES.iamPolicy, "obj", {
          policy: { Statement: { Effect: "Allow", Action: "ec2:Describe*", Resource: "arn:aws:ec2:*:*:instance/i-1" } },
        }),
      ),
    ).to.deep.equal([]);
  });

  it('fails Action "*" and a whole-service "s3:*", naming the statement and the fix', async () => {
    const m = expectOne(
      await check(
        res(TYPES.rolePolicy, "host", {
          policy: doc({ Sid: "All", Effect: "Allow", Action: "*", Resource: "arn:aws:s3:::b" }),
        }),
      ),
      'aws:iam/rolePolicy:RolePolicy "host"',
      "list the exact actions",
    );
    expect(m).to.contain('statement "All" allows Action "*"');
    const s3 = expectOne(
      await check(
        res(TYPES.iamPolicy, "p", {
          policy: doc({ Effect: "Allow", Action: ["s3:GetObject", "S3:*"], Resource: "arn:aws:s3:::b/*" }),
        }),
      ),
      'aws:iam/policy:Policy "p"',
      '"s3:GetObject", "s3:PutObject"',
    );
    expect(s3).to.contain('statement 0 allows Action "S3:*"').and.not.contain('"s3:GetObject" (');
  });

  it('fails Resource "*", NotAction and NotResource in Allow statements', async () => {
    expectOne(
      await check(
        res(TYPES.rolePolicy, "host", {
          policy: doc({ Effect: "Allow", Action: "s3:GetObject", Resource: ["arn:aws:s3:::b/*", "*"] }),
        }),
      ),
      'aws:iam/rolePolicy:RolePolicy "host"',
      "name the ARNs it acts on",
    );
    const found = await check(
      res(TYPES.userPolicy, "u", {
        policy: doc({ Effect: "Allow", NotAction: "iam:*", NotResource: "arn:aws:s3:::b" }),
      }),
    );
    expect(found).to.have.length(2);
    expect(found[0]).to.contain("NotAction").and.contain("Fix: use Action");
    expect(found[1]).to.contain("NotResource").and.contain("Fix: use Resource");
  });

  it("fails a policy that is not a JSON document", async () => {
    expectOne(
      await check(res(TYPES.groupPolicy, "g", { policy: "{not json" })),
      'aws:iam/groupPolicy:GroupPolicy "g"',
      "pass a policy document",
    );
  });
});

describe("policy ami-retained-on-delete", () => {
  const check = (r: ResourceInput) => checkResource(amiRetained, r);

  it(`passes an AMI tagged ${AMI_RETAIN_TAG}=true, or protected`, async () => {
    expect(await check(res(TYPES.amiFromInstance, "ami", { tags: { [AMI_RETAIN_TAG]: "true" } }))).to.deep.equal([]);
    expect(await check(res(TYPES.amiCopy, "copy", {}, { opts: { protect: true } }))).to.deep.equal([]);
    expect(await check(res(TYPES.instance, "web", {}))).to.deep.equal([]);
  });

  it("fails an AMI that shows no retention, naming it, why the option is not seen, and the fix", async () => {
    for (const tags of [undefined, { Name: "x" }, { [AMI_RETAIN_TAG]: "false" }]) {
      const m = expectOne(
        await check(res(TYPES.amiFromInstance, "bake-ami", { name: "x", tags })),
        'aws:ec2/amiFromInstance:AmiFromInstance "bake-ami"',
        `retainOnDelete: true and the tag ${AMI_RETAIN_TAG}: "true"`,
      );
      expect(m).to.contain("cannot read the retainOnDelete option");
    }
  });
});

/** stackInputs() of one program run, for the tests that only read it (the program is deterministic). */
let ownInputsRun: Promise<ResourceInput[]> | undefined;
function ownInputs(): Promise<ResourceInput[]> {
  ownInputsRun ??= stackInputs();
  return ownInputsRun;
}

/**
 * The stack's registrations under mocks, as policy inputs. A program that
 * throws inside an apply() only surfaces as an unhandled rejection: fail with it
 * instead of waiting for the timeout.
 */
async function stackInputs(): Promise<ResourceInput[]> {
  let onRejection: (e: unknown) => void = () => undefined;
  const failed = new Promise<never>((_, reject) => {
    onRejection = (e) =>
      reject(new Error(`infra/index.ts failed under mocks: ${e instanceof Error ? e.message : String(e)}`));
  });
  process.on("unhandledRejection", onRejection);
  try {
    return fromRegistered((await Promise.race([runProgram(BASE_CONFIG), failed])).resources);
  } finally {
    process.off("unhandledRejection", onRejection);
  }
}

describe("policy pack: the stack's own resources (mocks)", function () {
  this.timeout(120000);
  let inputs: ResourceInput[] = [];

  before(async () => {
    inputs = await ownInputs();
  });

  it("declares every kind of resource the policies look at (so passing is not vacuous)", () => {
    const types = new Set(inputs.map((r) => r.type));
    for (const t of [
      TYPES.instance,
      TYPES.securityGroup,
      TYPES.bucket,
      TYPES.bucketPublicAccessBlock,
      TYPES.bucketEncryption,
      TYPES.bucketVersioning,
      TYPES.bucketPolicy,
      TYPES.rolePolicy,
      TYPES.amiFromInstance,
    ])
      expect(types, t).to.include(t);
  });

  for (const p of policies) {
    it(`passes ${p.name}`, async () => {
      const found = await checkAll([p], inputs);
      expect(found.map((v) => v.message)).to.deep.equal([]);
    });
  }

  it("still fails when one of its invariants is taken away (the adapter feeds the policies)", async () => {
    const weakened = inputs
      .filter((r) => r.type !== TYPES.bucketVersioning)
      .map((r) =>
        r.type === TYPES.instance ? { ...r, props: { ...r.props, metadataOptions: { httpTokens: "optional" } } } : r,
      );
    const found = await checkAll(
      policies.filter((p) => p !== amiRetained),
      weakened,
    );
    expect(found.map((v) => v.policy)).to.have.members([imdsv2Required.name, s3BucketHardened.name]);
    const bucket = inputs.find((r) => r.type === TYPES.bucket)!;
    expect(found.find((v) => v.policy === s3BucketHardened.name)!.urn).to.equal(urnOf(TYPES.bucket, bucket.name));
  });
});

describe("policy pack: served by run-policy-pack, as the Pulumi CLI runs it", function () {
  this.timeout(240000);
  let pack: ServedPack;

  before(async () => {
    // TypeScript type-checks the pack on start: slow on 2 cores.
    pack = await servePack(200000);
  });
  after(() => pack?.stop());

  it("answers as windows-arm64-image-invariants with the version of policy/package.json and every policy", async () => {
    const info = await pack.info();
    const pkg = JSON.parse(fs.readFileSync(path.join(POLICY_DIR, "package.json"), "utf8"));
    expect(info.name).to.equal(PACK_NAME);
    expect(info.version).to.equal(pkg.version);
    expect(info.policies).to.deep.equal(policies.map((p) => p.name));
  });

  it("reports a violating resource as mandatory, and nothing for a compliant one", async () => {
    const bad = await pack.analyze(
      res(TYPES.instance, "web", { metadataOptions: { httpTokens: "optional" }, rootBlockDevice: { encrypted: true } }),
    );
    expect(bad.map((d) => [d.policy, d.level])).to.deep.equal([[imdsv2Required.name, "mandatory"]]);
    expect(bad[0].message).to.contain('aws:ec2/instance:Instance "web"').and.contain("Fix:");
    const good = await pack.analyze(
      res(TYPES.instance, "web", { metadataOptions: { httpTokens: "required" }, rootBlockDevice: { encrypted: true } }),
    );
    expect(good).to.deep.equal([]);
  });

  it("finds exactly what the direct calls find on the stack's own resources", async () => {
    const ownResources = await ownInputs();
    const found: Violation[] = [];
    for (const r of ownResources) found.push(...(await pack.analyze(r)));
    found.push(...(await pack.analyzeStack(ownResources)));
    // The SDK puts the policy's description before each message (the CLI prints both).
    const description = new Map(policies.map((p) => [p.name, p.description]));
    const direct = (await checkAll(policies, ownResources)).map((v) => ({
      ...v,
      message: `${description.get(v.policy)}\n${v.message}`,
    }));
    const key = (v: Violation) => `${v.policy} ${v.urn} ${v.message}`;
    expect(found.map(key).sort()).to.deep.equal(direct.map(key).sort());
  });

  it("in preview, links side resources to a bucket whose id is not known yet", async () => {
    const preview = hardenedBucket("artifacts").map((r) =>
      r.type === TYPES.bucket
        ? { ...r, props: { bucket: "artifacts-bucket", arn: UNKNOWN, id: UNKNOWN } }
        : {
            ...r,
            props: { ...r.props, bucket: UNKNOWN },
          },
    );
    expect(await pack.analyzeStack(preview)).to.deep.equal([]);
    const missing = await pack.analyzeStack(preview.filter((r) => r.type !== TYPES.bucketVersioning));
    expect(missing.map((d) => [d.policy, d.level, d.urn])).to.deep.equal([
      [s3BucketHardened.name, "mandatory", urnOf(TYPES.bucket, "artifacts")],
    ]);
  });

  it("in preview, defers a check on a value not known yet (advisory), as the README says", async () => {
    const found = await pack.analyze(res(TYPES.rolePolicy, "host", { role: "r", policy: UNKNOWN }));
    expect(found).to.have.length(1);
    expect(found[0].level).to.equal("advisory");
    expect(found[0].message).to.contain(`can't run policy '${iamNoWildcards.name}'`).and.contain("during preview");
  });
});
