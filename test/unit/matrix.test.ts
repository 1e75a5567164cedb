import { expect } from "chai";
import * as fs from "fs";
import * as yaml from "js-yaml";
import * as path from "path";
import {
  parseConfig,
  Problem,
  RawConfig,
  validateConfig,
  VARIANT_NAME_MAX,
  variantNameProblem,
  variantRawValue,
} from "../../infra/config";
import { S3_MAX_KEY_BYTES } from "../../infra/configChecks";
import { CONFIG_KEYS, projectConfigBlock, VARIANT_KEYS, VARIANT_REQUIRED } from "../../infra/configSchema";
import { policies } from "../../policy/policies";
import { BASE_CONFIG, lastRunResources, ProgramRun, Registered, runProgram, unwrap } from "../support/mocks";
import { checkAll, fromRegistered } from "../support/policy";

/** The stack's shared keys (no image of its own: each variant names one). */
const STACK: RawConfig = {
  sshAllowedCidrs: '["203.0.113.7/32"]',
  guestInstallBuildlet: "false",
  guestInstallLlvmMingw: "false",
  guestInstallVsBuildTools: "false",
};
const WIN10 = {
  name: "win10",
  windowsImageUrl: "s3://my-windows-media/Windows10_ARM64_22H2.vhdx",
  windowsImageSha256: "b".repeat(64),
  windowsVersion: "10",
  vsVersion: "2019",
};
const WIN11 = {
  name: "win11-24h2",
  windowsImageUrl: "s3://my-windows-media/Win11_24H2_English_Arm64.iso",
  windowsImageSha256: "c".repeat(64),
  windowsVersion: "11-24h2",
  hostInstanceType: "c7g.metal",
  hostVolumeGiB: 200,
  vmCpus: 8,
  vmMemoryGiB: 32,
  vmDiskGiB: 128,
};

const withImages = (images: unknown, over: RawConfig = {}): RawConfig => ({
  ...STACK,
  ...over,
  images: JSON.stringify(images),
});
const keys = (ps: Problem[]) => ps.map((p) => p.key);
const problemAt = (ps: Problem[], key: string): string => {
  const found = ps.filter((p) => p.key === key);
  expect(found, `${key} in ${JSON.stringify(ps)}`).to.have.length(1);
  return found[0].message;
};

describe("image matrix config", () => {
  it("schema: every variant key is a stack key that is not a secret; each variant names its image", () => {
    for (const k of VARIANT_KEYS) {
      const spec = CONFIG_KEYS.find((s) => s.key === k);
      expect(spec, k).to.not.equal(undefined);
      expect(spec?.secret, k).to.not.equal(true);
    }
    for (const k of VARIANT_REQUIRED) expect(VARIANT_KEYS).to.include(k);
    // Shared by every variant: the network, the bucket, the tags.
    for (const k of ["sshAllowedCidrs", "hostSubnetId", "artifactPrefix", "artifactBucketName", "tags", "target"])
      expect(VARIANT_KEYS).to.not.include(k);
  });

  it("schema: images has no type in Pulumi.yaml (the project schema types array items only as scalars)", () => {
    const entry = projectConfigBlock()["images"];
    expect(entry).to.not.have.property("type");
    expect(entry).to.not.have.property("items");
    expect(entry.default).to.equal("");
  });

  it("builds one full config per variant, each under <prefix><name>/, with its own overrides", () => {
    const { config, problems, warnings } = validateConfig(withImages([WIN10, WIN11]));
    expect(problems).to.deep.equal([]);
    expect(warnings).to.deep.equal([]);
    const images = config?.images ?? [];
    expect(images.map((v) => v.name)).to.deep.equal(["win10", "win11-24h2"]);
    const [w10, w11] = images.map((v) => v.config);
    expect(w10.artifacts.prefix).to.equal("windows-arm64/win10/");
    expect(w11.artifacts.prefix).to.equal("windows-arm64/win11-24h2/");
    expect(w10.host.instanceType).to.equal("a1.metal");
    expect(w11.host).to.include({ instanceType: "c7g.metal", volumeGiB: 200 });
    expect(w10.image).to.include({ windowsVersion: "10", format: "vhdx", sha256: "b".repeat(64) });
    expect(w11.image).to.include({ windowsVersion: "11-24h2", format: "iso" });
    expect(w10.vm).to.include({ cpus: 4, memoryGiB: 24 });
    expect(w11.vm).to.include({ cpus: 8, memoryGiB: 32, diskGiB: 128 });
    expect(w10.guest.vsVersion).to.equal("2019");
    expect(w11.guest.vsVersion).to.equal("2022");
    // What the variants share stays the stack's.
    expect(config?.artifacts.prefix).to.equal("windows-arm64/");
    expect(w10.host.sshAllowedCidrs).to.deep.equal(["203.0.113.7/32"]);
    expect(w11.host.sshAllowedCidrs).to.deep.equal(["203.0.113.7/32"]);
    expect(Object.isFrozen(w11.vm)).to.equal(true);
  });

  it("a variant inherits the stack's value of a key it does not set", () => {
    const c = parseConfig(withImages([WIN10, WIN11], { guestTimeZone: "Pacific Standard Time", vmMemoryGiB: "16" }));
    const [w10, w11] = (c.images ?? []).map((v) => v.config);
    expect(w10.guest.timeZone).to.equal("Pacific Standard Time");
    expect(w11.guest.timeZone).to.equal("Pacific Standard Time");
    expect(w10.vm.memoryGiB).to.equal(16);
    expect(w11.vm.memoryGiB).to.equal(32);
  });

  it("a variant may store its published disk otherwise than the stack (imageCompression)", () => {
    const c = parseConfig(withImages([WIN10, { ...WIN11, imageCompression: "zstd" }]));
    const [w10, w11] = (c.images ?? []).map((v) => v.config);
    expect(w10.artifacts.compression).to.equal("none");
    expect(w11.artifacts.compression).to.equal("zstd");
    expect(
      problemAt(
        validateConfig(withImages([{ ...WIN10, imageCompression: "xz" }])).problems,
        "images[0].imageCompression",
      ),
    ).to.contain('"xz"');
  });

  it("a stack without images keeps its single image and still needs its own image keys", () => {
    const { config, problems } = validateConfig(STACK);
    expect(config).to.equal(undefined);
    expect(keys(problems)).to.include.members(["windowsImageUrl", "windowsImageSha256", "windowsVersion"]);
    const single = parseConfig({
      ...STACK,
      windowsImageUrl: WIN10.windowsImageUrl,
      windowsImageSha256: WIN10.windowsImageSha256,
      windowsVersion: "10",
    });
    expect(single.images).to.equal(undefined);
    expect(single.artifacts.prefix).to.equal("windows-arm64/");
  });

  it("names each variant's problem images[i].<key>, every problem at once", () => {
    const { config, problems } = validateConfig(
      withImages([
        { ...WIN10, windowsVersion: "11-24h2", windowsImageSha256: "xyz" },
        { ...WIN11, vmCpus: 65, vmMemoryGiB: "lots" },
      ]),
    );
    expect(config).to.equal(undefined);
    expect(keys(problems)).to.have.members([
      "images[0].windowsVersion",
      "images[0].windowsImageSha256",
      "images[1].vmCpus",
      "images[1].vmMemoryGiB",
    ]);
    expect(problemAt(problems, "images[0].windowsVersion")).to.contain("a1.metal").and.contain("LSE atomics");
    expect(problemAt(problems, "images[0].windowsImageSha256")).to.contain('"xyz" is not a SHA-256');
    expect(problemAt(problems, "images[1].vmCpus")).to.contain("64 cores of c7g.metal");
    expect(problemAt(problems, "images[1].vmMemoryGiB")).to.contain("is not a whole number");
  });

  it("checks names: required, DNS-safe, short, unique", () => {
    const { problems } = validateConfig(
      withImages([
        { ...WIN10, name: undefined },
        { ...WIN10, name: "Win_10" },
        { ...WIN10, name: "a".repeat(VARIANT_NAME_MAX + 1) },
        { ...WIN10, name: "win10" },
        { ...WIN11, name: "win10" },
        { ...WIN10, name: 7 },
      ]),
    );
    expect(problemAt(problems, "images[0].name")).to.contain("is required");
    expect(problemAt(problems, "images[1].name")).to.contain("not DNS-safe");
    expect(problemAt(problems, "images[2].name")).to.contain(`at most ${VARIANT_NAME_MAX}`);
    expect(problems.filter((p) => p.key === "images[3].name")).to.deep.equal([]);
    expect(problemAt(problems, "images[4].name")).to.contain("repeats images[3].name");
    expect(problemAt(problems, "images[5].name")).to.contain("is not text");
  });

  it("variantNameProblem accepts DNS labels only", () => {
    for (const ok of ["win10", "w", "win11-24h2", "a1", "0x"]) expect(variantNameProblem(ok), ok).to.equal(undefined);
    for (const bad of ["", "-win", "win-", "Win10", "win_10", "win.10", "win 10", "wïn"])
      expect(variantNameProblem(bad), bad).to.be.a("string");
  });

  it("variant values become the strings Pulumi would store", () => {
    expect(variantRawValue("x")).to.equal("x");
    expect(variantRawValue(8)).to.equal("8");
    expect(variantRawValue(false)).to.equal("false");
    expect(variantRawValue(["a"])).to.equal('["a"]');
    expect(variantRawValue(null)).to.equal(undefined);
  });

  it("refuses keys a variant cannot set: the stack's shared keys and unknown ones (with the nearest)", () => {
    const { problems } = validateConfig(
      withImages([{ ...WIN10, tags: { team: "x" }, sshAllowedCidrs: ["198.51.100.0/24"], vmCpu: 4 }]),
    );
    expect(problemAt(problems, "images[0].tags")).to.contain("setting of the whole stack");
    expect(problemAt(problems, "images[0].sshAllowedCidrs")).to.contain("setting of the whole stack");
    expect(problemAt(problems, "images[0].vmCpu")).to.contain("Did you mean vmCpus?");
  });

  it("needs each variant's image; the stack's own image keys are then unused and refused", () => {
    const { problems } = validateConfig(
      withImages([{ name: "bare" }, WIN11], { windowsImageUrl: WIN10.windowsImageUrl, windowsVersion: "10" }),
    );
    for (const k of VARIANT_REQUIRED)
      expect(problemAt(problems, `images[0].${k}`)).to.contain("required in every variant");
    expect(problemAt(problems, "windowsImageUrl")).to.contain("is not used");
    expect(problemAt(problems, "windowsVersion")).to.contain("is not used");
    expect(keys(problems).filter((k) => k.startsWith("images[1]"))).to.deep.equal([]);
  });

  it("refuses a list that is empty, holds a non-object, or is set on the local target", () => {
    expect(keys(validateConfig(withImages([])).problems)).to.deep.equal(["images"]);
    expect(problemAt(validateConfig(withImages([WIN10, "oops"])).problems, "images[1]")).to.contain("not a variant");
    const local = validateConfig(withImages([WIN10], { target: "local" }));
    expect(problemAt(local.problems, "images")).to.contain("aws target only");
    expect(problemAt(validateConfig({ ...STACK, images: "{not json" }).problems, "images")).to.contain(
      "not valid list",
    );
  });

  it("a stack value every variant inherits is reported once, by the stack's key", () => {
    const { problems } = validateConfig(
      withImages(
        [
          WIN10,
          {
            ...WIN11,
            name: "w11",
            hostInstanceType: "a1.metal",
            windowsVersion: "11-23h2",
            vmCpus: undefined,
            vmMemoryGiB: undefined,
          },
        ],
        {
          vmCpus: "8",
        },
      ),
    );
    expect(keys(problems)).to.deep.equal(["vmCpus"]);
    expect(problems[0].message).to.contain("Graviton1 (a1.metal)");
  });

  it("a stack value no variant uses (every variant sets its own) is not a problem", () => {
    // 8 vCPUs would crash Windows on the stack's a1.metal, but both variants are on Graviton3.
    const { problems } = validateConfig(
      withImages([{ ...WIN10, hostInstanceType: "c7g.metal" }, WIN11], { vmCpus: "8" }),
    );
    expect(problems).to.deep.equal([]);
  });

  it("a stack value one variant's own settings make wrong is named by that variant", () => {
    // The stack's 8 vCPUs are fine on its c7g.metal, not on the variant's a1.metal.
    const { problems } = validateConfig(
      withImages([{ ...WIN10, hostInstanceType: "a1.metal" }, WIN11], { hostInstanceType: "c7g.metal", vmCpus: "8" }),
    );
    expect(keys(problems)).to.deep.equal(["images[0].vmCpus"]);
    expect(problems[0].message).to.contain("Graviton1 (a1.metal)");
  });

  it("a variant's name that makes its artifact prefix too long is named by images[i].name", () => {
    const prefix = `${"p".repeat(S3_MAX_KEY_BYTES - 64 - "/QEMU_VARS.fd".length - 1)}/`;
    const single = {
      windowsImageUrl: WIN10.windowsImageUrl,
      windowsImageSha256: WIN10.windowsImageSha256,
      windowsVersion: "10",
    };
    expect(validateConfig({ ...STACK, ...single, artifactPrefix: prefix }).problems).to.deep.equal([]);
    const { problems } = validateConfig(withImages([WIN10], { artifactPrefix: prefix }));
    expect(keys(problems)).to.deep.equal(["images[0].name"]);
    expect(problems[0].message).to.contain(`${prefix}win10/`);
  });

  it("checks a variant's text like any value (control characters, placeholders)", () => {
    const { problems } = validateConfig(withImages([{ ...WIN10, guestAdminUser: "go\u0007pher" }]));
    expect(problemAt(problems, "images[0].guestAdminUser")).to.contain("control character");
  });
});

/**
 * The resources (URN after the project) of a stack without images before the matrix existed:
 * every one must still be there under the same URN, or existing stacks would see replacements.
 */
const SINGLE_IMAGE_URNS = [
  "command:local:Command::stop-host",
  "random:index/randomPassword:RandomPassword::guest-admin-password",
  "tls:index/privateKey:PrivateKey::guest-key",
  "tls:index/privateKey:PrivateKey::pipeline-key",
  "windows-arm64-image:host:QemuHost$aws:ec2/eip:Eip::qemu-host-ip",
  "windows-arm64-image:host:QemuHost$aws:ec2/eipAssociation:EipAssociation::qemu-host-ip-assoc",
  "windows-arm64-image:host:QemuHost$aws:ec2/instance:Instance::qemu-host-instance",
  "windows-arm64-image:host:QemuHost$aws:ec2/keyPair:KeyPair::qemu-host-key",
  "windows-arm64-image:host:QemuHost$aws:ec2/securityGroup:SecurityGroup::qemu-host-ssh",
  "windows-arm64-image:host:QemuHost$aws:iam/instanceProfile:InstanceProfile::qemu-host-profile",
  "windows-arm64-image:host:QemuHost$aws:iam/role:Role::qemu-host-role",
  "windows-arm64-image:host:QemuHost$aws:iam/rolePolicy:RolePolicy::qemu-host-artifacts",
  "windows-arm64-image:host:QemuHost::qemu-host",
  "windows-arm64-image:pipeline:AmiBake$aws:ec2/amiFromInstance:AmiFromInstance::bake-ami",
  "windows-arm64-image:pipeline:AmiBake$aws:ec2/securityGroup:SecurityGroup::bake-egress",
  "windows-arm64-image:pipeline:AmiBake$aws:iam/instanceProfile:InstanceProfile::bake-profile",
  "windows-arm64-image:pipeline:AmiBake$aws:iam/role:Role::bake-role",
  "windows-arm64-image:pipeline:AmiBake$aws:iam/rolePolicy:RolePolicy::bake-artifacts",
  "windows-arm64-image:pipeline:AmiBake$aws:s3/bucketObjectv2:BucketObjectv2::bake-kit",
  "windows-arm64-image:pipeline:AmiBake$command:local:Command::bake-instance",
  "windows-arm64-image:pipeline:AmiBake$command:local:Command::bake-terminate",
  "windows-arm64-image:pipeline:AmiBake::bake",
  "windows-arm64-image:pipeline:EfiFirmware$command:local:Command::firmware-build",
  "windows-arm64-image:pipeline:EfiFirmware::firmware",
  "windows-arm64-image:pipeline:GuestProvisioning$command:local:Command::guest-run",
  "windows-arm64-image:pipeline:GuestProvisioning::guest",
  "windows-arm64-image:pipeline:HostFiles$command:local:Command::host-files-idle-guard",
  "windows-arm64-image:pipeline:HostFiles$command:local:Command::host-files-operator-keys",
  "windows-arm64-image:pipeline:HostFiles$command:local:Command::host-files-upload",
  "windows-arm64-image:pipeline:HostFiles$command:local:Command::host-files-wait-host",
  "windows-arm64-image:pipeline:HostFiles::host-files",
  "windows-arm64-image:pipeline:ImagePublication$command:local:Command::image-publish",
  "windows-arm64-image:pipeline:ImagePublication$command:local:Command::image-stop-vm",
  "windows-arm64-image:pipeline:ImagePublication::image",
  "windows-arm64-image:pipeline:WindowsDisk$command:local:Command::windows-disk-fetch-drivers",
  "windows-arm64-image:pipeline:WindowsDisk$command:local:Command::windows-disk-fetch-image",
  "windows-arm64-image:pipeline:WindowsDisk$command:local:Command::windows-disk-inject-answer-file",
  "windows-arm64-image:pipeline:WindowsDisk$command:local:Command::windows-disk-prepare-disk",
  "windows-arm64-image:pipeline:WindowsDisk::windows-disk",
  "windows-arm64-image:pipeline:WindowsVm$command:local:Command::build-vm-config-media",
  "windows-arm64-image:pipeline:WindowsVm$command:local:Command::build-vm-env",
  "windows-arm64-image:pipeline:WindowsVm$command:local:Command::build-vm-start",
  "windows-arm64-image:pipeline:WindowsVm$command:local:Command::build-vm-wait-guest",
  "windows-arm64-image:pipeline:WindowsVm::build-vm",
  "windows-arm64-image:storage:ArtifactBucket$aws:s3/bucket:Bucket::artifacts",
  "windows-arm64-image:storage:ArtifactBucket$aws:s3/bucketLifecycleConfiguration:BucketLifecycleConfiguration::artifacts-lifecycle",
  "windows-arm64-image:storage:ArtifactBucket$aws:s3/bucketOwnershipControls:BucketOwnershipControls::artifacts-ownership",
  "windows-arm64-image:storage:ArtifactBucket$aws:s3/bucketPolicy:BucketPolicy::artifacts-tls-only",
  "windows-arm64-image:storage:ArtifactBucket$aws:s3/bucketPublicAccessBlock:BucketPublicAccessBlock::artifacts-public-access",
  "windows-arm64-image:storage:ArtifactBucket$aws:s3/bucketServerSideEncryptionConfiguration:BucketServerSideEncryptionConfiguration::artifacts-encryption",
  "windows-arm64-image:storage:ArtifactBucket$aws:s3/bucketVersioning:BucketVersioning::artifacts-versioning",
  "windows-arm64-image:storage:ArtifactBucket::artifacts",
];

/** The resources every variant shares (the stack's pipeline key, its bucket). */
const SHARED = /^(pipeline-key|artifacts(-[a-z-]+)?)$/;

/** A stack file's project keys, as the strings Pulumi hands the program. */
function stackFileRaw(file: string): RawConfig {
  const doc = yaml.load(fs.readFileSync(path.resolve(__dirname, "..", "..", file), "utf8")) as {
    config: Record<string, unknown>;
  };
  const raw: RawConfig = {};
  for (const [k, v] of Object.entries(doc.config)) {
    if (k.startsWith("windows-arm64-image:"))
      raw[k.slice("windows-arm64-image:".length)] = typeof v === "string" ? v : JSON.stringify(v);
  }
  return raw;
}

describe("Pulumi.matrix.yaml", () => {
  it("builds Windows 10 on a1.metal and Windows 11 24H2 on Graviton3 metal, each under its own prefix", () => {
    const c = parseConfig(stackFileRaw("Pulumi.matrix.yaml"));
    const byName = Object.fromEntries((c.images ?? []).map((v) => [v.name, v.config]));
    expect(Object.keys(byName)).to.deep.equal(["win10", "win11-24h2"]);
    expect(byName["win10"].image.windowsVersion).to.equal("10");
    expect(byName["win10"].host.instanceType).to.equal("a1.metal");
    expect(byName["win10"].vm.cpus).to.be.at.most(4);
    expect(byName["win11-24h2"].image).to.include({ windowsVersion: "11-24h2", format: "iso" });
    expect(byName["win11-24h2"].host.instanceType).to.equal("c7g.metal");
    expect(byName["win11-24h2"].host.type).to.include({ generation: 3, lseAtomics: true });
    expect(byName["win10"].artifacts.prefix).to.equal("windows-arm64/win10/");
    expect(byName["win11-24h2"].artifacts.prefix).to.equal("windows-arm64/win11-24h2/");
  });
});

describe("image matrix (mocks)", function () {
  this.timeout(120000);
  let single: ProgramRun;
  let matrix: ProgramRun;
  before(async () => {
    single = await runProgram({ ...BASE_CONFIG });
    const { windowsImageUrl, windowsImageSha256, windowsVersion, ...shared } = BASE_CONFIG;
    void [windowsImageUrl, windowsImageSha256, windowsVersion];
    matrix = await runProgram({ ...shared, images: JSON.stringify([WIN10, WIN11]) });
  });
  const named = (run: ProgramRun, name: string) => {
    const found = run.resources.filter((r) => r.name === name);
    expect(found, name).to.have.length(1);
    return found[0];
  };
  const policyOf = (r: Registered) => JSON.stringify(unwrap(r.inputs.policy));

  it("a stack without images keeps every resource name and URN, and its outputs", () => {
    const urns = new Set(single.resources.map((r) => r.urn));
    for (const u of SINGLE_IMAGE_URNS) expect(urns.has(`urn:pulumi:test::windows-arm64-image::${u}`), u).to.equal(true);
    expect(single.resources.filter((r) => /^win1/.test(r.name))).to.deep.equal([]);
    expect(single.outputs.images).to.equal(undefined);
    expect(single.outputs.amiId).to.equal("ami-0123456789abcdef0");
    expect(single.outputs.windowsVersion).to.equal("11-23h2");
    expect(single.outputs.hostInstanceType).to.equal("a1.metal");
    expect(String(single.outputs.imageUri)).to.match(/^s3:\/\/artifacts-bucket-123\/windows-arm64\/[0-9a-f]{64}\//);
  });

  it("two variants make two hosts of their own types, every other resource named by its variant", () => {
    const hosts = matrix.ofType("aws:ec2/instance:Instance");
    expect(hosts.map((h) => [h.name, h.inputs.instanceType])).to.have.deep.members([
      ["win10-qemu-host-instance", "a1.metal"],
      ["win11-24h2-qemu-host-instance", "c7g.metal"],
    ]);
    expect(named(matrix, "win11-24h2-qemu-host-instance").inputs.rootBlockDevice).to.deep.include({ volumeSize: 200 });
    const urns = matrix.resources.map((r) => r.urn);
    expect(new Set(urns).size, "unique URNs").to.equal(urns.length);
    for (const r of matrix.resources)
      expect(SHARED.test(r.name) || /^(win10|win11-24h2)-/.test(r.name), r.name).to.equal(true);
    // One bucket, one pipeline key for all; one of each per-image resource per variant.
    expect(matrix.ofType("aws:s3/bucket:Bucket")).to.have.length(1);
    expect(matrix.ofType("tls:index/privateKey:PrivateKey").map((r) => r.name)).to.include.members([
      "pipeline-key",
      "win10-guest-key",
      "win11-24h2-guest-key",
    ]);
    expect(matrix.ofType("aws:ec2/amiFromInstance:AmiFromInstance")).to.have.length(2);
    // Each variant is the single-image pipeline under its prefix: the same resources, renamed
    // (win10 is a VHDX like the single image; win11's ISO has no answer file to inject).
    const perImage = single.resources.filter((r) => !SHARED.test(r.name)).map((r) => `${r.type}::${r.name}`);
    const of = (v: string) =>
      matrix.resources.filter((r) => r.name.startsWith(`${v}-`)).map((r) => `${r.type}::${r.name.slice(v.length + 1)}`);
    expect(of("win10")).to.have.members(perImage);
    expect(perImage).to.include.members(of("win11-24h2"));
    expect(perImage.filter((r) => !of("win11-24h2").includes(r))).to.deep.equal([
      "command:local:Command::windows-disk-inject-answer-file",
    ]);
  });

  it("the variants build in parallel: no stage of one waits for the other's host", () => {
    const w10Host = named(matrix, "win10-qemu-host-instance");
    const w11Host = named(matrix, "win11-24h2-qemu-host-instance");
    const w10Publish = named(matrix, "win10-image-publish");
    const w11Publish = named(matrix, "win11-24h2-image-publish");
    expect(matrix.waitsFor(w10Publish, w10Host)).to.equal(true);
    expect(matrix.waitsFor(w11Publish, w11Host)).to.equal(true);
    expect(matrix.waitsFor(w11Publish, w10Host)).to.equal(false);
    expect(matrix.waitsFor(w10Publish, w11Host)).to.equal(false);
    expect(matrix.waitsFor(named(matrix, "win11-24h2-bake-ami"), named(matrix, "win10-bake-ami"))).to.equal(false);
  });

  it("each variant publishes, reads and bakes under <prefix><name>/ only", () => {
    for (const [v, other] of [
      ["win10", "win11-24h2"],
      ["win11-24h2", "win10"],
    ]) {
      const publish = String(unwrap(named(matrix, `${v}-image-publish`).inputs.create));
      expect(publish).to.contain(`s3://artifacts-bucket-123/windows-arm64/${v}/`);
      const hostPolicy = policyOf(named(matrix, `${v}-qemu-host-artifacts`));
      expect(hostPolicy).to.contain(`windows-arm64/${v}/*`);
      expect(hostPolicy).to.not.contain(`windows-arm64/${other}/`);
      expect(hostPolicy).to.not.contain(`windows-arm64/*`);
      const bakePolicy = policyOf(named(matrix, `${v}-bake-artifacts`));
      expect(bakePolicy).to.contain(`windows-arm64/${v}/`);
      expect(bakePolicy).to.not.contain(`windows-arm64/${other}/`);
      expect(String(named(matrix, `${v}-bake-kit`).inputs.key)).to.match(new RegExp(`^windows-arm64/${v}/bake-kit/`));
      const bakeEnv = unwrap(named(matrix, `${v}-bake-instance`).inputs.environment) as Record<string, string>;
      expect(bakeEnv.BAKE_STATUS_URI).to.match(
        new RegExp(`^s3://artifacts-bucket-123/windows-arm64/${v}/bake-status/`),
      );
      expect(String(named(matrix, `${v}-bake-ami`).inputs.name)).to.contain(`-test-${v}-`);
    }
    const rules = (named(matrix, "artifacts-lifecycle").inputs as { rules: Array<{ filter: { prefix?: string } }> })
      .rules;
    const staging = rules.map((r) => r.filter.prefix).filter((p) => p !== undefined);
    expect(staging).to.include.members(["windows-arm64/win10/staging/", "windows-arm64/win11-24h2/staging/"]);
  });

  it("outputs an images map by name; the single-image outputs are unset", () => {
    const images = matrix.outputs.images as Record<string, Record<string, unknown>>;
    expect(Object.keys(images)).to.have.members(["win10", "win11-24h2"]);
    for (const [v, version] of [
      ["win10", "10"],
      ["win11-24h2", "11-24h2"],
    ]) {
      const out = images[v];
      expect(out.amiId).to.equal("ami-0123456789abcdef0");
      expect(out.windowsVersion).to.equal(version);
      expect(String(out.imageUri)).to.match(new RegExp(`^s3://artifacts-bucket-123/windows-arm64/${v}/[0-9a-f]{64}/`));
      expect(String(out.manifestUri)).to.match(new RegExp(`^s3://artifacts-bucket-123/windows-arm64/${v}/`));
      expect(out.imageSha256).to.match(/^[0-9a-f]{64}$/);
      // The AMI the variant's smoke test promoted, as for the single image.
      expect(out.promotedAmiId).to.equal(single.outputs.promotedAmiId);
      expect(out.promotedAmiId).to.match(/^ami-/);
    }
    // Each variant promotes into its own SSM parameter.
    expect(matrix.ofType("aws:ssm/parameter:Parameter").map((r) => r.inputs.name)).to.have.members([
      "/windows-arm64-image/test/win10/ami-id",
      "/windows-arm64-image/test/win11-24h2/ami-id",
    ]);
    for (const k of [
      "amiId",
      "imageUri",
      "imageSha256",
      "manifestUri",
      "windowsVersion",
      "hostInstanceId",
      "promotedAmiId",
    ])
      expect(matrix.outputs[k], k).to.equal(undefined);
    expect(matrix.outputs.artifactPrefix).to.equal("windows-arm64/");
    expect(matrix.outputs.bucketName).to.equal("artifacts-bucket-123");
  });

  it("the matrix stack's resources pass every policy of the pack", async () => {
    expect(await checkAll(policies, fromRegistered(matrix.resources))).to.deep.equal([]);
    // Not vacuous: both hosts and both AMIs are among what the policies saw.
    expect(matrix.ofType("aws:ec2/instance:Instance")).to.have.length(2);
  });

  it("a variant name of the longest length keeps every IAM name within IAM's 64 characters", async () => {
    const { windowsImageUrl, windowsImageSha256, windowsVersion, ...shared } = BASE_CONFIG;
    const name = "w".repeat(VARIANT_NAME_MAX);
    const run = await runProgram({
      ...shared,
      images: JSON.stringify([{ name, windowsImageUrl, windowsImageSha256, windowsVersion }]),
    });
    const roles = run.ofType("aws:iam/role:Role");
    expect(roles.length).to.be.greaterThan(1);
    // Pulumi's auto-name appends "-" and 7 random characters.
    for (const r of roles) {
      expect(r.name.startsWith(`${name}-`), r.name).to.equal(true);
      expect(r.name.length + 8, r.name).to.be.at.most(64);
    }
  });

  it("a bad variant fails before any resource, naming images[i].<key>", async () => {
    const { windowsImageUrl, windowsImageSha256, windowsVersion, ...shared } = BASE_CONFIG;
    void [windowsImageUrl, windowsImageSha256, windowsVersion];
    let error: Error | undefined;
    try {
      await runProgram({ ...shared, images: JSON.stringify([WIN10, { ...WIN11, hostInstanceType: "a1.metal" }]) });
    } catch (e) {
      error = e as Error;
    }
    expect(error?.message).to.contain("windows-arm64-image:images[1].windowsVersion: Windows 11-24h2 needs ARMv8.1");
    expect(error?.message).to.contain("windows-arm64-image:images[1].vmCpus:");
    expect(lastRunResources).to.deep.equal([]);
  });
});
