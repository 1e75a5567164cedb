import { expect } from "chai";
import * as fs from "fs";
import { repoPath } from "../../infra/paths";
import { bashWords } from "../support/bash";
import * as mocks from "../support/mocks";
import {
  allStrings,
  BASE_CONFIG,
  isSecret,
  MOCK_KEYS,
  ProgramRun,
  Registered,
  runProgram,
  unwrap,
} from "../support/mocks";

const GUARD = 'if [ -z "${AWS_PROFILE:-}" ]; then unset AWS_PROFILE; fi; exec ';

/** The words after the profile guard of a command that runs host-exec.sh. */
function hostExecWords(r: Registered): string[] {
  const create = String(unwrap(r.inputs.create));
  expect(create.startsWith(GUARD), create.slice(0, 100)).to.equal(true);
  return bashWords(create.slice(GUARD.length));
}

/** The stdin of an SSH command after the pipeline's key. */
function payload(r: Registered, key: string = MOCK_KEYS.pipeline.privateKey): string {
  const stdin = String(unwrap(r.inputs.stdin));
  expect(stdin.startsWith(`${key.trim()}\n`), `${r.name}: the key first`).to.equal(true);
  return stdin.slice(key.trim().length + 1);
}

describe("stack foundation (mocks)", function () {
  this.timeout(60000);
  let run: ProgramRun;
  before(async () => {
    run = await runProgram({ ...BASE_CONFIG, tags: JSON.stringify({ team: "ci" }) });
  });

  it("creates a private, encrypted, versioned, TLS-only bucket with lifecycle rules", () => {
    run.one("aws:s3/bucket:Bucket");
    expect(run.one("aws:s3/bucketVersioning:BucketVersioning").inputs.versioningConfiguration).to.deep.equal({
      status: "Enabled",
    });
    const pab = run.one("aws:s3/bucketPublicAccessBlock:BucketPublicAccessBlock").inputs;
    expect(pab).to.include({
      blockPublicAcls: true,
      blockPublicPolicy: true,
      ignorePublicAcls: true,
      restrictPublicBuckets: true,
    });
    expect(run.one("aws:s3/bucketOwnershipControls:BucketOwnershipControls").inputs.rule).to.deep.equal({
      objectOwnership: "BucketOwnerEnforced",
    });
    const sse = run.one("aws:s3/bucketServerSideEncryptionConfiguration:BucketServerSideEncryptionConfiguration")
      .inputs as { rules: Array<{ applyServerSideEncryptionByDefault: { sseAlgorithm: string } }> };
    expect(sse.rules[0].applyServerSideEncryptionByDefault.sseAlgorithm).to.equal("AES256");
    const policy = JSON.parse(run.one("aws:s3/bucketPolicy:BucketPolicy").inputs.policy as string);
    expect(policy.Statement[0]).to.deep.include({ Effect: "Deny", Action: "s3:*" });
    expect(policy.Statement[0].Condition).to.deep.equal({ Bool: { "aws:SecureTransport": "false" } });
    const rules = (
      run.one("aws:s3/bucketLifecycleConfiguration:BucketLifecycleConfiguration").inputs as {
        rules: Array<Record<string, unknown>>;
      }
    ).rules;
    expect(rules.find((r) => r.noncurrentVersionExpiration)).to.deep.include({
      noncurrentVersionExpiration: { noncurrentDays: 30 },
    });
    expect(rules.find((r) => r.abortIncompleteMultipartUpload)).to.not.equal(undefined);
  });

  it("looks up an existing bucket instead of creating one", async () => {
    const r = await runProgram({ ...BASE_CONFIG, artifactBucketName: "go-builder-data" });
    expect(r.ofType("aws:s3/bucket:Bucket")).to.have.length(0);
    expect(r.ofType("aws:s3/bucketPolicy:BucketPolicy")).to.have.length(0);
    expect(r.calls.map((c) => c.token)).to.include("aws:s3/getBucket:getBucket");
    expect(r.outputs.bucketName).to.equal("go-builder-data");
    const policy = JSON.parse(r.one("aws:iam/rolePolicy:RolePolicy", "qemu-host-artifacts").inputs.policy as string);
    expect(JSON.stringify(policy)).to.contain("arn:aws:s3:::go-builder-data/windows-arm64/*");
    const bake = JSON.parse(r.one("aws:iam/rolePolicy:RolePolicy", "bake-artifacts").inputs.policy as string);
    expect(bake.Statement.map((st: { Resource: string[] }) => st.Resource[0])).to.deep.equal([
      "arn:aws:s3:::go-builder-data/windows-arm64/*",
      "arn:aws:s3:::go-builder-data/windows-arm64/bake-status/*",
    ]);
  });

  it("the host requires IMDSv2 and has an encrypted gp3 root volume", () => {
    const inst = run.one("aws:ec2/instance:Instance").inputs as Record<string, any>;
    expect(inst.instanceType).to.equal("a1.metal");
    expect(inst.metadataOptions.httpTokens).to.equal("required");
    expect(inst.rootBlockDevice).to.include({ volumeType: "gp3", encrypted: true, volumeSize: 150, iops: 3000 });
    expect(inst.ami).to.equal("ami-0a1b2c3d4e5f60718");
  });

  it("looks up the newest Canonical Ubuntu 24.04 arm64 AMI with owners set", () => {
    const call = run.calls.find((c) => c.token === "aws:ec2/getAmi:getAmi");
    expect(call?.inputs.owners).to.deep.equal(["099720109477"]);
    expect(call?.inputs.mostRecent).to.equal(true);
    expect(JSON.stringify(call?.inputs.filters)).to.contain("ubuntu-noble-24.04-arm64-server");
  });

  it("an explicit hostAmiId skips the lookup", async () => {
    const r = await runProgram({ ...BASE_CONFIG, hostAmiId: "ami-0123456789abcdef0" });
    expect(r.calls.map((c) => c.token)).to.not.include("aws:ec2/getAmi:getAmi");
    expect(r.one("aws:ec2/instance:Instance").inputs.ami).to.equal("ami-0123456789abcdef0");
  });

  it("allows SSH only from sshAllowedCidrs and no other ingress", () => {
    const sg = run.one("aws:ec2/securityGroup:SecurityGroup", "qemu-host-ssh").inputs as {
      ingress: Array<Record<string, unknown>>;
    };
    expect(sg.ingress).to.have.length(1);
    expect(sg.ingress[0]).to.deep.include({
      fromPort: 22,
      toPort: 22,
      protocol: "tcp",
      cidrBlocks: ["203.0.113.7/32"],
    });
    expect(run.ofType("aws:ec2/securityGroupRule:SecurityGroupRule")).to.have.length(0);
    expect(run.ofType("aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule")).to.have.length(0);
    // The bake instance's group has no inbound rule at all.
    const groups = run.ofType("aws:ec2/securityGroup:SecurityGroup").map((g) => g.name);
    expect(groups).to.have.members(["qemu-host-ssh", "bake-egress", "smoke-test-ssh"]);
    expect(run.one("aws:ec2/securityGroup:SecurityGroup", "bake-egress").inputs.ingress ?? []).to.deep.equal([]);
  });

  it("grants the host only what the pipeline needs on the artifact prefix", () => {
    const policy = JSON.parse(run.one("aws:iam/rolePolicy:RolePolicy", "qemu-host-artifacts").inputs.policy as string);
    for (const st of policy.Statement) {
      for (const a of st.Action) expect(a).to.not.match(/\*/);
      for (const r of st.Resource) expect(r).to.not.equal("*");
    }
    const rw = policy.Statement.find((s: { Sid: string }) => s.Sid === "ReadWriteArtifacts");
    expect(rw.Resource).to.deep.equal(["arn:aws:s3:::artifacts-bucket-123/windows-arm64/*"]);
    // publish-image.sh: put/get/head and multipart upload; it copies and deletes nothing (no
    // tagging, no DeleteObject).
    expect(rw.Action).to.have.members([
      "s3:GetObject",
      "s3:PutObject",
      "s3:AbortMultipartUpload",
      "s3:ListMultipartUploadParts",
    ]);
    const list = policy.Statement.find((s: { Sid: string }) => s.Sid === "ListArtifactPrefix");
    expect(list.Condition.StringLike["s3:prefix"]).to.deep.equal(["windows-arm64/*"]);
    const src = policy.Statement.find((s: { Sid: string }) => s.Sid === "ReadSourceImages");
    expect(src.Resource).to.deep.equal(["arn:aws:s3:::media-bucket/images/win11-23h2.vhdx"]);
    const role = JSON.parse(run.one("aws:iam/role:Role", "qemu-host-role").inputs.assumeRolePolicy as string);
    expect(role.Statement[0].Principal).to.deep.equal({ Service: "ec2.amazonaws.com" });
  });

  it("cloud-init installs the host packages and holds no secret", () => {
    const ud = run.one("aws:ec2/instance:Instance").inputs.userData as string;
    expect(ud.startsWith("#cloud-config")).to.equal(true);
    for (const p of ["qemu-system-arm", "qemu-efi-aarch64", "qemu-utils", "xorriso"]) expect(ud).to.contain(`- ${p}`);
    expect(ud).to.match(/aws-cli/);
    expect(ud).to.not.match(/PRIVATE KEY|password/i);
  });

  it("sets operators' keys in place (not in user data): new keys neither replace the host nor re-run a stage", async () => {
    const alice = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAliceKeyMaterialForTestsOnly1234567 alice";
    // Back to back: the repository's files are hashed at each run.
    const base = await runProgram(BASE_CONFIG);
    const r = await runProgram({ ...BASE_CONFIG, sshAuthorizedKeys: JSON.stringify([alice]) });
    expect(r.one("aws:ec2/instance:Instance").inputs.userData).to.equal(
      run.one("aws:ec2/instance:Instance").inputs.userData,
    );
    const keys = r.one("command:local:Command", "host-files-operator-keys");
    // Through the runner like every stage: host-exec.sh runs operator-keys.sh (on stdin after the key).
    expect(hostExecWords(keys)).to.deep.equal([
      "bash",
      "provisioning/host-exec.sh",
      "run",
      `bash -s -- ${Buffer.from(alice).toString("base64")}`,
    ]);
    expect(payload(keys)).to.equal(fs.readFileSync(repoPath("provisioning/operator-keys.sh"), "utf8"));
    expect(payload(keys)).to.contain("windows-arm64-image operators: begin");
    expect(keys.options.dependencies).to.include(r.one("command:local:Command", "host-files-wait-host").urn);
    expect(keys.inputs.triggers).to.not.deep.equal(
      base.one("command:local:Command", "host-files-operator-keys").inputs.triggers,
    );
    const triggers = (x: ProgramRun) =>
      x
        .ofType("command:local:Command")
        .filter((c) => !["host-files-operator-keys", "stop-host"].includes(c.name))
        .map((c) => [c.name, c.inputs.triggers]);
    expect(triggers(r)).to.deep.equal(triggers(base));
  });

  it("uses a generated ED25519 key for the host's key pair and the stages, and another one for the guest", () => {
    const keys = run.ofType("tls:index/privateKey:PrivateKey");
    expect(keys.map((k) => [k.name, k.inputs.algorithm])).to.have.deep.members([
      ["pipeline-key", "ED25519"],
      ["guest-key", "ED25519"],
      ["smoke-test-key", "ED25519"],
    ]);
    expect(run.one("aws:ec2/keyPair:KeyPair").inputs.publicKey).to.equal(MOCK_KEYS.pipeline.publicKey);
    payload(run.one("command:local:Command", "firmware-build"));
  });

  it("a given sshPrivateKey is read as a secret and no pipeline key is generated (the guest still gets its own)", async () => {
    const given = "-----BEGIN OPENSSH PRIVATE KEY-----\nGIVEN\n-----END OPENSSH PRIVATE KEY-----";
    const r = await runProgram({ ...BASE_CONFIG, sshPrivateKey: given }, { secretKeys: ["sshPrivateKey"] });
    expect(r.ofType("tls:index/privateKey:PrivateKey").map((k) => k.name)).to.deep.equal([
      "guest-key",
      "smoke-test-key",
    ]);
    expect(r.one("aws:ec2/keyPair:KeyPair").inputs.publicKey).to.contain("GivenKey");
    for (const x of r.resources) {
      const { stdin, ...visible } = x.inputs;
      expect(allStrings(visible).join("\n"), x.name).to.not.contain("GIVEN");
      if (allStrings(stdin).join("\n").includes("GIVEN")) expect(isSecret(stdin), x.name).to.equal(true);
    }
    const fw = r.one("command:local:Command", "firmware-build");
    expect(isSecret(fw.inputs.stdin)).to.equal(true);
    payload(fw, given);
    expect(allStrings(r.outputs).join("\n")).to.not.contain("GIVEN");
  });

  it("gives the host an Elastic IP: the address survives the stop after each build", () => {
    const assoc = run.one("aws:ec2/eipAssociation:EipAssociation").inputs;
    expect(assoc).to.include({ instanceId: "qemu-host-instance-id", allocationId: "eipalloc-0123" });
    expect(run.one("aws:ec2/eip:Eip").inputs.domain).to.equal("vpc");
  });

  it("wakes the host inside each stage (host-exec.sh), then waits for cloud-init on the host; no separate wake-up resource", () => {
    for (const c of run.ofType("command:local:Command"))
      expect(String(unwrap(c.inputs.create)), c.name).to.not.contain("host-power.sh start");
    expect(run.resources.filter((x) => /ssh-up|host-ready$/.test(x.name))).to.have.length(0);
    const wait = run.one("command:local:Command", "host-files-wait-host");
    expect(wait.inputs.environment).to.include({
      HOST_EXEC_ADDRESS: "198.51.100.10",
      HOST_EXEC_INSTANCE_ID: "qemu-host-instance-id",
      AWS_REGION: "us-east-2",
    });
    expect(payload(wait)).to.contain("cloud-init status");
    expect(wait.options.dependencies).to.include(run.one("aws:ec2/eipAssociation:EipAssociation").urn);
    expect(wait.seq).to.be.greaterThan(run.one("aws:ec2/eipAssociation:EipAssociation").seq);
  });

  it("merges the tags into every taggable resource", () => {
    const taggable = run.resources.filter((r) => r.type.startsWith("aws:") && "tags" in r.inputs);
    expect(taggable.length).to.be.greaterThan(5);
    for (const r of taggable)
      expect(r.inputs.tags, r.name).to.deep.include({ team: "ci", Project: "windows-arm64-image" });
    for (const t of [
      "aws:s3/bucket:Bucket",
      "aws:ec2/instance:Instance",
      "aws:iam/role:Role",
      "aws:ec2/securityGroup:SecurityGroup",
      "aws:ec2/amiFromInstance:AmiFromInstance",
    ]) {
      expect(run.ofType(t), t).to.not.have.length(0);
      for (const r of run.ofType(t)) expect(r.inputs.tags, `${t} ${r.name}`).to.deep.include({ team: "ci" });
    }
    // The bake instance is launched by bake-instance.sh: it gets the tags through the environment.
    const bakeTags = JSON.parse(
      (run.one("command:local:Command", "bake-instance").inputs.environment as Record<string, string>).BAKE_TAGS_JSON,
    );
    expect(bakeTags).to.deep.include({ Key: "team", Value: "ci" });
  });

  it("exports the outputs operators need", () => {
    expect(run.outputs).to.include({
      bucketName: "artifacts-bucket-123",
      artifactPrefix: "windows-arm64/",
      hostPublicIp: "198.51.100.10",
      hostInstanceType: "a1.metal",
    });
    expect(run.outputs.hostSshCommand).to.equal("ssh ubuntu@198.51.100.10");
    expect(run.outputs.vncTunnelCommand).to.match(/-L 5903:127\.0\.0\.1:5903/);
  });

  it("fails before any resource is declared when the config is invalid", async () => {
    let err: unknown;
    try {
      await runProgram({ ...BASE_CONFIG, vmCpus: "8", windowsImageSha256: "nope" });
    } catch (e) {
      err = e;
    }
    expect(String(err)).to.match(/windows-arm64-image:vmCpus: 8 vCPUs on Graviton1/);
    expect(String(err)).to.match(/windows-arm64-image:windowsImageSha256: "nope" is not a SHA-256/);
    expect(mocks.lastRunResources).to.have.length(0);
  });
});
