import { expect } from "chai";
import * as fs from "fs";
import * as path from "path";
import { validateConfig } from "../../infra/config";
import {
  DEFAULT_VARIANT,
  parseSmokeResult,
  promotedAmiParameterName,
  SMOKE_EXTRA_MINUTES,
  SMOKE_TEST_FILES,
  smokeTestCostUsd,
} from "../../infra/smokeTest";
import { GUEST_CHECK_FILES, guestSmokeCheckCommand } from "../../infra/pipeline/guest";
import {
  BASE_CONFIG,
  isSecret,
  MOCK_DEFAULT_SUBNET_ID,
  MOCK_KEYS,
  MOCK_PASSWORD,
  ProgramRun,
  Registered,
  runProgram,
  unwrap,
} from "../support/mocks";

const AMI = "ami-0123456789abcdef0";
const PARAM = "aws:ssm/parameter:Parameter";
const CMD = "command:local:Command";

describe("smoke test: pure decisions", () => {
  it("the promoted AMI's SSM parameter is /<project>/<stack>/<variant>/ami-id", () => {
    expect(promotedAmiParameterName("windows-arm64-image", "dev", DEFAULT_VARIANT)).to.equal(
      "/windows-arm64-image/dev/default/ami-id",
    );
    expect(promotedAmiParameterName("windows-arm64-image", "prod", "win11-24h2")).to.equal(
      "/windows-arm64-image/prod/win11-24h2/ami-id",
    );
    expect(() => promotedAmiParameterName("windows-arm64-image", "a b", "x")).to.throw(/stack name "a b"/);
  });

  it("parseSmokeResult takes the AMI id from the result line, only the AMI that was baked", () => {
    const line = JSON.stringify({ amiId: AMI, instanceId: "i-0123456789abcdef1", guest: "127.0.0.1:2222" });
    expect(parseSmokeResult(`noise\n${line}\n`, AMI)).to.deep.equal({ amiId: AMI, instanceId: "i-0123456789abcdef1" });
    expect(() => parseSmokeResult(line, "ami-0fffffffffffffff0")).to.throw(
      /tested ami-0123456789abcdef0, not the baked/,
    );
    expect(() => parseSmokeResult("", AMI)).to.throw(/did not print its result/);
    expect(() => parseSmokeResult('{"amiId":"x"}', AMI)).to.throw(/no AMI id/);
  });

  it("the cost on paper: the metal hourly price over the bound plus the extra minutes, rounded up to the cent", () => {
    // REFERENCE.md "AWS facts": a1.metal $0.408/h, c7g.metal $2.32/h (us-east-1, Jan 2026).
    expect(SMOKE_EXTRA_MINUTES).to.equal(10);
    expect(smokeTestCostUsd(0.408, 45)).to.equal(0.38);
    expect(smokeTestCostUsd(2.32, 45)).to.equal(2.13);
    expect(smokeTestCostUsd(2.32, 240)).to.equal(9.67);
  });
});

describe("smoke test: the check kept in the image", () => {
  it("GUEST_CHECK_FILES holds check.ps1 and every file it loads from its own folder", () => {
    const check = fs.readFileSync(path.join(__dirname, "..", "..", "provisioning", "windows", "check.ps1"), "utf8");
    const loaded = [...check.matchAll(/Join-Path \$PSScriptRoot '([^']+)'/g)].map((m) => m[1]);
    expect(loaded).to.include("common.psm1");
    expect(GUEST_CHECK_FILES).to.include.members(["check.ps1", ...loaded]);
    const common = fs.readFileSync(path.join(__dirname, "..", "..", "provisioning", "windows", "common.psm1"), "utf8");
    expect([...common.matchAll(/Join-Path \$PSScriptRoot '([^']+)'/g)].map((m) => m[1])).to.deep.equal([]);
  });
});

describe("smoke test: config", () => {
  const raw = Object.fromEntries(Object.entries(BASE_CONFIG).filter(([k]) => !k.includes(":")));
  it("smokeTest defaults to true with a 45-minute bound; smokeTest: false turns it off", () => {
    expect(validateConfig(raw).config?.smokeTest).to.deep.equal({ enabled: true, timeoutMinutes: 45 });
    expect(validateConfig({ ...raw, smokeTest: "false" }).config?.smokeTest.enabled).to.equal(false);
  });
  it("refuses a bound outside 10 to 240 minutes and a smokeTest that is not a boolean, naming the key", () => {
    const { problems } = validateConfig({ ...raw, smokeTestTimeoutMinutes: "5", smokeTest: "maybe" });
    const keys = problems.map((p) => p.key);
    expect(keys).to.include.members(["smokeTestTimeoutMinutes", "smokeTest"]);
    const p = problems.find((x) => x.key === "smokeTestTimeoutMinutes");
    expect(p?.message).to.contain("5 minutes is out of range").and.contain("Fix: use 10 to 240");
  });
});

describe("smoke test and promotion (mocks)", function () {
  this.timeout(60000);
  let run: ProgramRun;
  before(async () => {
    run = await runProgram({ ...BASE_CONFIG, hostSubnetId: "subnet-0123456789abcdef0" }, { stack: "dev" });
  });
  const smokeCommand = (r: ProgramRun): Registered => {
    const found = r.ofType(CMD).filter((c) => /smoke-test\.sh run/.test(String(unwrap(c.inputs.create))));
    expect(found, "one smoke-test command").to.have.length(1);
    return found[0];
  };

  it("the SSM parameter: /<project>/<stack>/default/ami-id, a String of data type aws:ec2:image, the smoke test's AMI", async () => {
    const p = run.one(PARAM);
    expect(p.inputs).to.include({
      name: "/windows-arm64-image/dev/default/ami-id",
      type: "String",
      dataType: "aws:ec2:image",
    });
    expect(unwrap(p.inputs.insecureValue)).to.equal(AMI);
    expect(isSecret(p.inputs.insecureValue)).to.equal(false);
    expect(run.outputs.promotedAmiId).to.equal(AMI);
    expect(run.outputs.promotedAmiParameter).to.equal("/windows-arm64-image/dev/default/ami-id");
  });

  it("the parameter waits for the smoke-test command, which waits for the AMI", () => {
    const p = run.one(PARAM);
    const smoke = smokeCommand(run);
    const ami = run.one("aws:ec2/amiFromInstance:AmiFromInstance");
    expect(p.options.dependencies).to.include(smoke.urn);
    expect(run.waitsFor(smoke, ami)).to.equal(true);
  });

  it("the smoke command: smoke-test.sh run with the metal host type in the host's subnet, keys and settings only on a secret stdin, bounded", () => {
    const smoke = smokeCommand(run);
    const env = unwrap(smoke.inputs.environment) as Record<string, string>;
    const host = run.one("aws:ec2/instance:Instance");
    expect(env).to.include({
      SMOKE_AMI_ID: AMI,
      SMOKE_INSTANCE_TYPE: String(host.inputs.instanceType),
      SMOKE_INSTANCE_USER: "ubuntu",
      SMOKE_GUEST_USER: "gopher",
      SMOKE_GUEST_PORT: "2222",
      SMOKE_VM_DIR: "/var/lib/windows-vm",
      SMOKE_TIMEOUT_S: "2700",
      SMOKE_GUEST_COMMAND: guestSmokeCheckCommand(),
      AWS_REGION: "us-east-2",
    });
    expect(String(host.inputs.instanceType)).to.match(/\.metal$/);
    expect(env.SMOKE_SUBNET_ID).to.equal("subnet-0123456789abcdef0");
    expect(isSecret(smoke.inputs.stdin)).to.equal(true);
    const stdin = String(unwrap(smoke.inputs.stdin));
    const keys = stdin.match(/-----BEGIN OPENSSH PRIVATE KEY-----/g) ?? [];
    expect(keys).to.have.length(2);
    expect(stdin).to.contain(MOCK_KEYS.guest.privateKey);
    expect(stdin).to.contain(MOCK_PASSWORD);
    for (const v of [String(unwrap(smoke.inputs.create)), JSON.stringify(env)]) {
      expect(v).to.not.contain("PRIVATE KEY");
      expect(v).to.not.contain(MOCK_PASSWORD);
    }
    expect(smoke.inputs.triggers).to.have.length(2);
    expect(unwrap((smoke.inputs.triggers as unknown[])[0])).to.equal(AMI);
    expect(smoke.options.customTimeouts.create).to.equal(`${45 + SMOKE_EXTRA_MINUTES}m`);
    expect(SMOKE_TEST_FILES).to.include("provisioning/smoke-test.sh");
  });

  it("the smoke instance's security group lets SSH in only from sshAllowedCidrs", () => {
    const sg = run.ofType("aws:ec2/securityGroup:SecurityGroup").find((s) => s.name.endsWith("smoke-test-ssh"));
    expect(sg, "the smoke test's security group").to.not.equal(undefined);
    const smoke = smokeCommand(run);
    const env = unwrap(smoke.inputs.environment) as Record<string, string>;
    expect(env.SMOKE_SECURITY_GROUP_ID).to.equal(`${(sg as Registered).name}-id`);
    expect((sg as Registered).inputs.ingress).to.deep.equal([
      {
        description: "SSH",
        protocol: "tcp",
        fromPort: 22,
        toPort: 22,
        cidrBlocks: ["203.0.113.7/32"],
        ipv6CidrBlocks: [],
      },
    ]);
  });

  it("a dedicated smoke key (tls), not the pipeline's or the guest's", () => {
    const keys = run.ofType("tls:index/privateKey:PrivateKey").map((k) => k.name);
    expect(keys).to.include("smoke-test-key");
  });

  it("without hostSubnetId the smoke instance goes in the subnet the host instance got", () => {
    return runProgram(BASE_CONFIG, { stack: "dev" }).then((r) => {
      const env = unwrap(smokeCommand(r).inputs.environment) as Record<string, string>;
      expect(env.SMOKE_SUBNET_ID).to.equal(MOCK_DEFAULT_SUBNET_ID);
    });
  });

  it("smokeTest: false: no smoke instance, the parameter takes the baked AMI right away", async () => {
    const off = await runProgram({ ...BASE_CONFIG, smokeTest: "false" }, { stack: "dev" });
    expect(off.ofType(CMD).filter((c) => /smoke-test\.sh/.test(String(unwrap(c.inputs.create))))).to.have.length(0);
    expect(off.ofType("aws:ec2/securityGroup:SecurityGroup").filter((s) => s.name.includes("smoke"))).to.have.length(0);
    const p = off.one(PARAM);
    expect(unwrap(p.inputs.insecureValue)).to.equal(AMI);
    expect(p.inputs).to.include({ name: "/windows-arm64-image/dev/default/ami-id", dataType: "aws:ec2:image" });
    expect(off.waitsFor(p, off.one("aws:ec2/amiFromInstance:AmiFromInstance"))).to.equal(true);
    expect(off.outputs.promotedAmiId).to.equal(AMI);
  });

  it("the local target promotes nothing (no AMI)", async () => {
    const local = await runProgram({
      target: "local",
      windowsImageUrl: "file:///var/tmp/win11.vhdx",
      windowsImageSha256: "a".repeat(64),
      windowsVersion: "11-23h2",
      guestInstallBuildlet: "false",
      guestInstallLlvmMingw: "false",
      guestInstallVsBuildTools: "false",
      vmCpus: "1",
      vmMemoryGiB: "4",
    });
    expect(local.ofType(PARAM)).to.have.length(0);
    expect(local.outputs.promotedAmiId).to.equal(undefined);
  });
});
