import { expect } from "chai";
import { formatProblems, parseConfig, RawConfig, validateConfig } from "../../infra/config";
import { CONFIG_KEYS } from "../../infra/configSchema";
import { findHostType, HOST_TYPES, typesWithAtomics } from "../../infra/hostTypes";

/** Pulumi passes defaults from Pulumi.yaml as strings; mimic that. */
function withDefaults(over: RawConfig): RawConfig {
  const raw: RawConfig = {};
  for (const k of CONFIG_KEYS) raw[k.key] = typeof k.default === "string" ? k.default : JSON.stringify(k.default);
  return { ...raw, ...over };
}

const GOOD: RawConfig = {
  sshAllowedCidrs: '["203.0.113.7/32", "2001:db8::/64"]',
  windowsImageUrl: "s3://media/win.vhdx",
  windowsImageSha256: "A".repeat(64),
  windowsVersion: "11-23h2",
  guestInstallBuildlet: "false",
  guestInstallLlvmMingw: "false",
  guestInstallVsBuildTools: "false",
};

const ED25519 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB7bJ9r6bH1FyqRg5Ik3pS0pQ4lTAmQmWq8b3M2xk2eX op@laptop";

describe("config validation", () => {
  it("accepts a minimal aws config and fills in defaults", () => {
    const c = parseConfig(withDefaults(GOOD));
    expect(c.target).to.equal("aws");
    expect(c.host.instanceType).to.equal("a1.metal");
    expect(c.host.type.generation).to.equal(1);
    expect(c.host.volumeGiB).to.equal(150);
    expect(c.vm).to.deep.include({ cpus: 4, memoryGiB: 24 });
    expect(c.image.format).to.equal("vhdx");
    expect(c.image.sha256).to.equal("a".repeat(64));
    expect(c.artifacts.prefix).to.equal("windows-arm64/");
    expect(c.host.amiId).to.equal(undefined);
    expect(c.guest.adminUser).to.equal("gopher");
    expect(c.guest.buildlet).to.equal(undefined);
  });

  it("returns a frozen object", () => {
    const c = parseConfig(withDefaults(GOOD));
    expect(Object.isFrozen(c)).to.equal(true);
    expect(Object.isFrozen(c.vm)).to.equal(true);
  });

  it("works without Pulumi.yaml defaults too (keys absent)", () => {
    const c = parseConfig(GOOD);
    expect(c.vm.cpus).to.equal(4);
    expect(c.retainAmiOnDelete).to.equal(true);
  });

  it("keeps download URLs and hashes when a guest install is on", () => {
    const c = parseConfig(
      withDefaults({
        ...GOOD,
        guestInstallBuildlet: "true",
        buildletStage0Url: "https://storage.example.com/buildlet-stage0.windows-arm64",
        buildletStage0Sha256: "b".repeat(64),
      }),
    );
    expect(c.guest.buildlet).to.deep.equal({
      url: "https://storage.example.com/buildlet-stage0.windows-arm64",
      sha256: "b".repeat(64),
    });
  });

  it("allows Windows 11 24H2 on Graviton2 and later", () => {
    const c = parseConfig(withDefaults({ ...GOOD, windowsVersion: "11-24h2", hostInstanceType: "c6g.metal" }));
    expect(c.image.windowsVersion).to.equal("11-24h2");
  });

  it("the local target needs no SSH CIDRs and accepts file:// images", () => {
    const c = parseConfig(
      withDefaults({
        ...GOOD,
        target: "local",
        sshAllowedCidrs: "[]",
        windowsImageUrl: "file:///srv/images/win.qcow2",
      }),
    );
    expect(c.target).to.equal("local");
    expect(c.image.format).to.equal("qcow2");
    const folder = parseConfig(
      withDefaults({ ...GOOD, target: "local", artifactUri: "file:///srv/win%20images/" }),
    ).artifacts;
    expect(folder.uri).to.equal("file:///srv/win%20images/");
  });

  // [description, overrides, key that must be named, hint that must appear]
  const BAD: Array<[string, RawConfig, string, RegExp]> = [
    ["unknown target", { target: "gcp" }, "target", /aws or local/],
    ["non-metal instance type", { hostInstanceType: "c6g.large" }, "hostInstanceType", /only \.metal sizes/],
    ["x86 metal type", { hostInstanceType: "m5.metal" }, "hostInstanceType", /a1\.metal/],
    ["typo of a metal type", { hostInstanceType: "c6g.metl" }, "hostInstanceType", /Did you mean c6g\.metal/],
    ["bad AMI id", { hostAmiId: "ubuntu" }, "hostAmiId", /ami-0123456789abcdef0/],
    ["volume too small", { hostVolumeGiB: "20" }, "hostVolumeGiB", /60 to 65536/],
    ["volume not a number", { hostVolumeGiB: "big" }, "hostVolumeGiB", /whole number/],
    ["iops below gp3 minimum", { hostVolumeIops: "100" }, "hostVolumeIops", /3000 to 80000/],
    ["iops above 500 per GiB", { hostVolumeGiB: "60", hostVolumeIops: "40000" }, "hostVolumeIops", /500 IOPS per GiB/],
    ["throughput above gp3 max", { hostVolumeThroughputMiBps: "5000" }, "hostVolumeThroughputMiBps", /125 to 2000/],
    [
      "throughput above IOPS/4",
      { hostVolumeIops: "3000", hostVolumeThroughputMiBps: "1000" },
      "hostVolumeThroughputMiBps",
      /raise hostVolumeIops to 4000/,
    ],
    ["bad subnet id", { hostSubnetId: "my-subnet" }, "hostSubnetId", /subnet-0123456789abcdef0/],
    ["no SSH CIDRs on aws", { sshAllowedCidrs: "[]" }, "sshAllowedCidrs", /nobody could reach/],
    ["SSH CIDRs not a list", { sshAllowedCidrs: "10.0.0.0/8" }, "sshAllowedCidrs", /not valid list/],
    ["malformed CIDR", { sshAllowedCidrs: '["203.0.113.7"]' }, "sshAllowedCidrs", /203\.0\.113\.7\/32/],
    ["CIDR with bad address", { sshAllowedCidrs: '["300.1.1.1/32"]' }, "sshAllowedCidrs", /invalid address/],
    ["CIDR prefix too long", { sshAllowedCidrs: '["10.0.0.0/33"]' }, "sshAllowedCidrs", /more than 32/],
    ["CIDR with host bits", { sshAllowedCidrs: '["10.0.0.1/8"]' }, "sshAllowedCidrs", /host bits/],
    ["SSH open to the internet", { sshAllowedCidrs: '["0.0.0.0/0"]' }, "sshAllowedCidrs", /allowSshFromAnywhere: true/],
    ["SSH open to all IPv6", { sshAllowedCidrs: '["::/0"]' }, "sshAllowedCidrs", /whole internet/],
    [
      "private key as authorized key",
      { sshAuthorizedKeys: '["-----BEGIN OPENSSH PRIVATE KEY-----"]' },
      "sshAuthorizedKeys",
      /PRIVATE key/,
    ],
    [
      "garbage authorized key",
      { sshAuthorizedKeys: '["hello world"]' },
      "sshAuthorizedKeys",
      /not an OpenSSH public key/,
    ],
    [
      "authorized key body of another type",
      { sshAuthorizedKeys: `["${ED25519.replace("ssh-ed25519", "ssh-rsa")}"]` },
      "sshAuthorizedKeys",
      /not a ssh-rsa key/,
    ],
    ["bucket name with capitals", { artifactBucketName: "My_Bucket" }, "artifactBucketName", /S3 bucket names/],
    ["prefix without trailing slash", { artifactPrefix: "images" }, "artifactPrefix", /must end with "\/"/],
    ["prefix with leading slash", { artifactPrefix: "/images/" }, "artifactPrefix", /not start with one/],
    ["noncurrent days zero", { artifactNoncurrentDays: "0" }, "artifactNoncurrentDays", /1 to 3650/],
    ["artifactUri on aws", { artifactUri: "file:///tmp/x/" }, "artifactUri", /local target only/],
    ["OpenSSH zip hash alone", { openSshZipSha256: "a".repeat(64) }, "openSshZipSha256", /openSshZipUrl is not/],
    ["OpenSSH zip URL alone", { openSshZipUrl: "https://x.example/OpenSSH-ARM64.zip" }, "openSshZipSha256", /required/],
    [
      "OpenSSH zip that is not a zip",
      { openSshZipUrl: "https://x.example/OpenSSH.msi", openSshZipSha256: "a".repeat(64) },
      "openSshZipUrl",
      /not a \.zip/,
    ],
    ["artifactUri with a host", { target: "local", artifactUri: "file://nas/images/" }, "artifactUri", /names a host/],
    ["artifactUri at the root", { target: "local", artifactUri: "file:///" }, "artifactUri", /filesystem root/],
    ["artifactUri with ..", { target: "local", artifactUri: "file:///srv/../etc/" }, "artifactUri", /plain absolute/],
    ["artifactUri of another scheme", { target: "local", artifactUri: "ftp://x/y/" }, "artifactUri", /neither file/],
    ["artifactUri with a quote", { target: "local", artifactUri: "s3://b/it's/" }, "artifactUri", /neither file/],
    ["prefix with a quote", { artifactPrefix: "it's/" }, "artifactPrefix", /!-_\.\*\(\)\/ only/],
    ["missing image URL", { windowsImageUrl: "" }, "windowsImageUrl", /required but not set/],
    ["http image URL", { windowsImageUrl: "http://example.com/w.vhdx" }, "windowsImageUrl", /s3:\/\/ or https:\/\//],
    ["file:// image URL on aws", { windowsImageUrl: "file:///tmp/w.vhdx" }, "windowsImageUrl", /cannot fetch/],
    [
      "image of unknown format",
      { windowsImageUrl: "https://example.com/w.zip" },
      "windowsImageUrl",
      /\.vhdx, \.qcow2 or \.iso/,
    ],
    ["short image hash", { windowsImageSha256: "abc" }, "windowsImageSha256", /64 hex digits/],
    ["non-hex virtio hash", { virtioIsoSha256: "z".repeat(64) }, "virtioIsoSha256", /sha256sum/],
    ["unknown Windows version", { windowsVersion: "12" }, "windowsVersion", /11-23h2/],
    ["24H2 on Graviton1", { windowsVersion: "11-24h2" }, "windowsVersion", /ARMv8\.1.*c6g\.metal/],
    ["25H2 on Graviton1", { windowsVersion: "11-25h2" }, "windowsVersion", /cannot boot there/],
    ["zero vCPUs", { vmCpus: "0" }, "vmCpus", /less than 1/],
    ["more vCPUs than cores", { vmCpus: "32", allowUnsafeCpuCount: "true" }, "vmCpus", /16 cores of a1\.metal/],
    ["more than 4 vCPUs on Graviton1", { vmCpus: "8" }, "vmCpus", /CLOCK_WATCHDOG_TIMEOUT.*allowUnsafeCpuCount/],
    ["memory leaves too little to the host", { vmMemoryGiB: "30" }, "vmMemoryGiB", /at most 28/],
    ["memory below Windows minimum", { vmMemoryGiB: "2" }, "vmMemoryGiB", /at least 4/],
    ["machine options with spaces", { vmMachineOptions: "its=off; rm -rf /" }, "vmMachineOptions", /gic-version=max/],
    ["disk too small", { vmDiskGiB: "32" }, "vmDiskGiB", /at least 64/],
    ["buildlet port 22", { vmBuildletPort: "22" }, "vmBuildletPort", /not 22/],
    ["admin user Administrator", { guestAdminUser: "Administrator" }, "guestAdminUser", /not Administrator/],
    ["admin user with a space", { guestAdminUser: "go pher" }, "guestAdminUser", /e\.g\. gopher/],
    ["bad locale", { guestLocale: "english" }, "guestLocale", /en-US/],
    ["boolean typo", { keepHostRunning: "yes" }, "keepHostRunning", /true or false/],
    [
      "buildlet on without URL",
      { guestInstallBuildlet: "true", buildletStage0Sha256: "b".repeat(64) },
      "buildletStage0Url",
      /guestInstallBuildlet: false/,
    ],
    [
      "llvm-mingw on without hash",
      { guestInstallLlvmMingw: "true", llvmMingwUrl: "https://example.com/llvm.zip" },
      "llvmMingwSha256",
      /every download is verified/,
    ],
    ["VS Build Tools over s3://", { vsBuildToolsUrl: "s3://x/vs.exe" }, "vsBuildToolsUrl", /guest downloads it itself/],
    ["tags not an object", { tags: '["a"]' }, "tags", /key: value/],
    ["tag with reserved prefix", { tags: '{"aws:team": "x"}' }, "tags", /reserved aws: prefix/],
    ["tag with number value", { tags: '{"team": 5}' }, "tags", /quote it/],
    ["typo of a key", { vmCpu: "4" }, "vmCpu", /Did you mean vmCpus/],
    [
      "private key stored in plain text",
      { sshPrivateKey: "-----BEGIN OPENSSH PRIVATE KEY-----" },
      "sshPrivateKey",
      /--secret/,
    ],
  ];

  for (const [what, over, key, hint] of BAD) {
    it(`rejects ${what}, naming ${key} and the fix`, () => {
      const { config, problems } = validateConfig(withDefaults({ ...GOOD, ...over }));
      expect(config, "no config on error").to.equal(undefined);
      const mine = problems.filter((p) => p.key === key);
      expect(mine, JSON.stringify(problems)).to.have.length.greaterThan(0);
      expect(mine.map((p) => p.message).join("\n")).to.match(hint);
      expect(formatProblems(problems)).to.contain(`windows-arm64-image:${key}:`);
    });
  }

  it("reports every problem at once, not only the first", () => {
    const { problems } = validateConfig(
      withDefaults({ ...GOOD, vmCpus: "8", vmMemoryGiB: "64", windowsImageSha256: "x", artifactPrefix: "x" }),
    );
    const keys = new Set(problems.map((p) => p.key));
    expect([...keys]).to.include.members(["vmCpus", "vmMemoryGiB", "windowsImageSha256", "artifactPrefix"]);
    expect(() => parseConfig(withDefaults({ ...GOOD, vmCpus: "8", windowsImageSha256: "x" }))).to.throw(
      /\(2 problems\); nothing was created/,
    );
  });

  it("never echoes a secret value in a message", () => {
    const secret = "-----BEGIN OPENSSH PRIVATE KEY-----SUPERSECRET";
    const { problems } = validateConfig(withDefaults({ ...GOOD, sshPrivateKey: secret }));
    expect(formatProblems(problems)).to.not.contain("SUPERSECRET");
  });

  it("accepts a secret stored as a secret", () => {
    const c = parseConfig(withDefaults({ ...GOOD, sshPrivateKey: "x" }), new Set(["sshPrivateKey"]));
    expect(c.secretsSet.sshPrivateKey).to.equal(true);
  });

  it("accepts a well-formed operator public key", () => {
    const c = parseConfig(withDefaults({ ...GOOD, sshAuthorizedKeys: JSON.stringify([ED25519]) }));
    expect(c.host.sshAuthorizedKeys).to.deep.equal([ED25519]);
  });
});

describe("host type table", () => {
  it("lists the Graviton bare-metal types the stack supports", () => {
    const names = HOST_TYPES.map((t) => t.name);
    for (const n of [
      "a1.metal",
      "c6g.metal",
      "c6gn.metal",
      "x2gd.metal",
      "c7gn.metal",
      "r7gd.metal",
      "m8g.metal-24xl",
    ]) {
      expect(names).to.include(n);
    }
    expect(names.every((n) => /\.metal/.test(n))).to.equal(true);
    expect(new Set(names).size).to.equal(names.length);
  });

  it("knows Graviton1 lacks LSE atomics and later generations have them", () => {
    expect(findHostType("a1.metal")).to.include({ generation: 1, lseAtomics: false, cores: 16, memoryGiB: 32 });
    expect(findHostType("c6g.metal")).to.include({ generation: 2, lseAtomics: true });
    expect(typesWithAtomics()).to.not.include("a1.metal");
    for (const t of HOST_TYPES) expect(t.lseAtomics).to.equal(t.generation >= 2);
  });

  it("has consistent cores and memory", () => {
    for (const t of HOST_TYPES) {
      expect(t.cores, t.name).to.be.greaterThan(0);
      expect(t.memoryGiB, t.name).to.be.at.least(t.cores * 2);
    }
  });
});
