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
        buildletEnv: "host-windows11-arm64-azure",
      }),
    );
    expect(c.guest.buildletEnv).to.equal("host-windows11-arm64-azure");
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

  it("accepts a stack that sets only the required keys, with or without Pulumi.yaml's defaults", () => {
    const required: RawConfig = {
      sshAllowedCidrs: '["203.0.113.7/32"]',
      windowsImageUrl: "s3://media/Windows11_ARM64_23H2.vhdx",
      windowsImageSha256: "a".repeat(64),
      windowsVersion: "11-23h2",
    };
    for (const raw of [required, withDefaults(required)]) {
      const { config, problems, warnings } = validateConfig(raw);
      expect(problems, JSON.stringify(problems)).to.deep.equal([]);
      expect(warnings, JSON.stringify(warnings)).to.deep.equal([]);
      const c = config as NonNullable<typeof config>;
      expect(c.guest).to.include({
        buildlet: undefined,
        llvmMingw: undefined,
        vsBuildTools: undefined,
        vsVersion: "2022",
      });
      expect(c.guest.buildletEnv).to.equal(undefined);
      expect(c.bake).to.deep.equal({ instanceType: "c7g.large" });
      expect(c.host.idleMinutes).to.equal(45);
    }
  });

  it("installs a guest download when its URL is set and its switch is unset", () => {
    const c = parseConfig(
      withDefaults({
        ...GOOD,
        guestInstallLlvmMingw: "",
        llvmMingwUrl: "https://example.com/llvm-mingw-aarch64.zip",
        llvmMingwSha256: "c".repeat(64),
        guestInstallBuildlet: "",
        buildletStage0Url: "https://example.com/stage0.exe",
        buildletStage0Sha256: "d".repeat(64),
        buildletEnv: "host-windows11-arm64-azure",
      }),
    );
    expect(c.guest.llvmMingw).to.deep.equal({
      url: "https://example.com/llvm-mingw-aarch64.zip",
      sha256: "c".repeat(64),
    });
    expect(c.guest.buildlet?.sha256).to.equal("d".repeat(64));
  });

  it("reads the AMI bake settings, the idle timeout and VS version", () => {
    const c = parseConfig(
      withDefaults({
        ...GOOD,
        bakeInstanceType: "m8g.metal-24xl",
        amiVolumeGiB: "80",
        hostIdleMinutes: "90",
        vsVersion: "2026",
      }),
    );
    expect(c.bake).to.deep.equal({ instanceType: "m8g.metal-24xl", volumeGiB: 80 });
    expect(c.host.idleMinutes).to.equal(90);
    expect(c.guest.vsVersion).to.equal("2026");
    for (const t of [
      "t4g.nano",
      "a1.large",
      "c6gn.16xlarge",
      "im4gn.large",
      "r7gd.metal",
      "x8g.48xlarge",
      "i8g.metal-24xl",
    ])
      expect(parseConfig(withDefaults({ ...GOOD, bakeInstanceType: t })).bake.instanceType).to.equal(t);
  });

  it("accepts VS 2022 with Windows 10 when VS Build Tools are not installed", () => {
    const c = parseConfig(withDefaults({ ...GOOD, windowsVersion: "10", vsVersion: "2022" }));
    expect(c.guest.vsBuildTools).to.equal(undefined);
    const vs2019 = parseConfig(
      withDefaults({
        ...GOOD,
        windowsVersion: "10",
        vsVersion: "2019",
        guestInstallVsBuildTools: "true",
        vsBuildToolsUrl: "https://aka.ms/vs/16/release/vs_buildtools.exe",
        vsBuildToolsSha256: "e".repeat(64),
      }),
    );
    expect(vs2019.guest).to.include({ vsVersion: "2019" });
  });

  // [description, overrides, key that must be named, hint that must appear]
  const WARNED: Array<[string, RawConfig, string, RegExp]> = [
    [
      "a builder env current stage0 refuses",
      {
        buildletStage0Url: "https://example.com/stage0.exe",
        guestInstallBuildlet: "true",
        buildletStage0Sha256: "d".repeat(64),
        buildletEnv: "host-windows-arm64-mini",
      },
      "buildletEnv",
      /accepts only host-windows11-arm64-azure/,
    ],
    [
      "a download URL with its switch off",
      { guestInstallLlvmMingw: "false", llvmMingwUrl: "https://example.com/llvm.zip" },
      "llvmMingwUrl",
      /not installed.*unset guestInstallLlvmMingw/,
    ],
    [
      "an Insider VHDX without the OpenSSH zip",
      { windowsImageUrl: "s3://media/Windows11_InsiderPreview_Client_ARM64_en-us_22631.vhdx" },
      "openSshZipUrl",
      /Insider\/flighted.*OpenSSH-ARM64\.zip/,
    ],
    [
      "a flighted ISO without the OpenSSH zip",
      {
        windowsImageUrl: "https://media.example.com/26100.1-FLIGHT-arm64.iso",
        windowsVersion: "11-24h2",
        hostInstanceType: "c7g.metal",
      },
      "openSshZipUrl",
      /0x800f0954/,
    ],
  ];

  for (const [what, over, key, hint] of WARNED) {
    it(`accepts ${what} with a warning naming ${key}`, () => {
      const { config, problems, warnings } = validateConfig(withDefaults({ ...GOOD, ...over }));
      expect(problems, JSON.stringify(problems)).to.deep.equal([]);
      expect(config).to.not.equal(undefined);
      const mine = warnings.filter((w) => w.key === key);
      expect(mine, JSON.stringify(warnings)).to.have.length(1);
      expect(mine[0].message).to.match(hint);
    });
  }

  it("does not warn about OpenSSH for a release image, or a flighted one with the zip", () => {
    for (const over of [
      { windowsImageUrl: "s3://media/Windows11_ARM64_23H2.vhdx" },
      {
        windowsImageUrl: "s3://media/Windows11_InsiderPreview_ARM64.vhdx",
        openSshZipUrl:
          "https://github.com/PowerShell/Win32-OpenSSH/releases/download/v9.8.1.0p1-Preview/OpenSSH-ARM64.zip",
        openSshZipSha256: "f".repeat(64),
      },
    ]) {
      const { problems, warnings } = validateConfig(withDefaults({ ...GOOD, ...over }));
      expect(problems).to.deep.equal([]);
      expect(warnings, JSON.stringify(warnings)).to.deep.equal([]);
    }
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
    ["x86 bake type", { bakeInstanceType: "c7i.large" }, "bakeInstanceType", /not an arm64.*Fix: use c7g\.large/],
    ["older x86 bake type", { bakeInstanceType: "m5.xlarge" }, "bakeInstanceType", /x86 types never can.*m7g\.xlarge/],
    ["AMD bake type", { bakeInstanceType: "t3a.micro" }, "bakeInstanceType", /t4g\.micro/],
    [
      "bake type that is no type",
      { bakeInstanceType: "large" },
      "bakeInstanceType",
      /Graviton type \(families a1, t4g/,
    ],
    ["bake type of a size that does not exist", { bakeInstanceType: "c7g.huge" }, "bakeInstanceType", /c7g\.medium/],
    ["t4g has no metal", { bakeInstanceType: "t4g.metal" }, "bakeInstanceType", /not a size of t4g/],
    ["AMI volume too small", { amiVolumeGiB: "8" }, "amiVolumeGiB", /16 to 16384/],
    ["AMI volume too large", { amiVolumeGiB: "20000" }, "amiVolumeGiB", /unset it to size the volume/],
    ["AMI volume not a number", { amiVolumeGiB: "64G" }, "amiVolumeGiB", /whole number/],
    ["idle timeout too short", { hostIdleMinutes: "5" }, "hostIdleMinutes", /10 to 1440/],
    ["idle timeout over a day", { hostIdleMinutes: "1441" }, "hostIdleMinutes", /10 to 1440/],
    [
      "buildlet URL without a builder env",
      {
        guestInstallBuildlet: "",
        buildletStage0Url: "https://example.com/s0.exe",
        buildletStage0Sha256: "d".repeat(64),
      },
      "buildletEnv",
      /buildletEnv: host-windows11-arm64-azure/,
    ],
    [
      "builder env with capitals",
      { buildletEnv: "Host-Windows11" },
      "buildletEnv",
      /lowercase letters, digits and dashes/,
    ],
    ["builder env too long", { buildletEnv: "a".repeat(64) }, "buildletEnv", /1 to 63/],
    ["builder env with a space", { buildletEnv: "host windows" }, "buildletEnv", /not a builder env name/],
    [
      "buildlet on without URL (switch unset defaults never refuse)",
      { guestInstallBuildlet: "true", buildletEnv: "host-windows11-arm64-azure" },
      "buildletStage0Url",
      /required while guestInstallBuildlet is true/,
    ],
    [
      "download URL without hash, switch unset",
      { guestInstallVsBuildTools: "", vsBuildToolsUrl: "https://example.com/vs_BuildTools.exe" },
      "vsBuildToolsSha256",
      /required with vsBuildToolsUrl/,
    ],
    [
      "download hash without URL",
      { guestInstallLlvmMingw: "", llvmMingwSha256: "c".repeat(64) },
      "llvmMingwSha256",
      /llvmMingwUrl is not/,
    ],
    ["unknown VS version", { vsVersion: "2017" }, "vsVersion", /2019, 2022, 2026/],
    [
      "VS 2022 for Windows 10",
      {
        windowsVersion: "10",
        vsBuildToolsUrl: "https://example.com/vs_BuildTools.exe",
        vsBuildToolsSha256: "e".repeat(64),
        guestInstallVsBuildTools: "",
      },
      "vsVersion",
      /do not support Windows 10 on ARM64.*vsVersion: 2019/,
    ],
    [
      "VS 2026 for Windows 10",
      {
        windowsVersion: "10",
        vsVersion: "2026",
        vsBuildToolsUrl: "https://example.com/vs_BuildTools.exe",
        vsBuildToolsSha256: "e".repeat(64),
        guestInstallVsBuildTools: "true",
      },
      "vsVersion",
      /VS 2026.*vsVersion: 2019/,
    ],
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
