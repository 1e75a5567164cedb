import { expect } from "chai";
import {
  formatProblems,
  Machine,
  parseConfig,
  RawConfig,
  STACK_TAG_KEYS,
  validateConfig,
  WINDOWS_TIME_ZONES,
} from "../../infra/config";
import { coversAll, parseCidr, s3KeyProblem, urlCredentials, Cidr } from "../../infra/configChecks";
import { CONFIG_KEYS } from "../../infra/configSchema";
import {
  findHostType,
  GRAVITON_FAMILIES,
  gravitonCounterpart,
  gravitonTypeProblem,
  HOST_TYPES,
  typesWithAtomics,
} from "../../infra/hostTypes";
import { RUNTIME } from "../../infra/pipeline/plan";

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

/** A workstation for the local target's VM, so results do not depend on the machine running the tests. */
const WORKSTATION: Machine = { cpus: 8, memoryGiB: 31.3, cwd: "/home/dev/windows-arm64-image" };

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
      new Set(),
      WORKSTATION,
    );
    expect(c.target).to.equal("local");
    expect(c.image.format).to.equal("qcow2");
    const folder = parseConfig(
      withDefaults({ ...GOOD, target: "local", artifactUri: "file:///srv/win%20images/" }),
      new Set(),
      WORKSTATION,
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

  it("imageCompression: none by default, zstd accepted, anything else refused naming the key and the fix", () => {
    expect(parseConfig(withDefaults(GOOD)).artifacts.compression).to.equal("none");
    expect(parseConfig(withDefaults({ ...GOOD, imageCompression: "zstd" })).artifacts.compression).to.equal("zstd");
    const { config, problems } = validateConfig(withDefaults({ ...GOOD, imageCompression: "gzip" }));
    expect(config).to.equal(undefined);
    expect(problems.map((p) => [p.key, p.message])).to.deep.equal([
      ["imageCompression", '"gzip" is not a compression publish knows. Fix: use one of none, zstd.'],
    ]);
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
    ["prefix with a quote", { artifactPrefix: "it's/" }, "artifactPrefix", /!-_\.\(\)\/ only/],
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

/** A value that must be refused: overrides, the key named, a hint in its message, and options. */
interface Hostile {
  over: RawConfig;
  key: string;
  hint: RegExp;
  /** Text that must not appear in any message (a secret inside the value). */
  absent?: string;
  machine?: Machine;
  secret?: string[];
}

const LOCAL: RawConfig = { target: "local", sshAllowedCidrs: "[]", windowsImageUrl: "file:///srv/images/win.qcow2" };
const CIDRS = (...c: string[]) => JSON.stringify(c);
const TAGS = (n: number) => JSON.stringify(Object.fromEntries(Array.from({ length: n }, (_, i) => [`t${i}`, "x"])));

const HOSTILE: Record<string, Record<string, Hostile>> = {
  "SSH reach": {
    "two halves of IPv4": {
      over: { sshAllowedCidrs: CIDRS("0.0.0.0/1", "128.0.0.0/1") },
      key: "sshAllowedCidrs",
      hint: /together cover every IPv4 address \(0\.0\.0\.0\/1, 128\.0\.0\.0\/1\).*allowSshFromAnywhere/,
    },
    "four quarters and a spare": {
      over: { sshAllowedCidrs: CIDRS("0.0.0.0/2", "64.0.0.0/2", "128.0.0.0/2", "192.0.0.0/2", "203.0.113.7/32") },
      key: "sshAllowedCidrs",
      hint: /every IPv4 address/,
    },
    "two halves of IPv6": {
      over: { sshAllowedCidrs: CIDRS("::/1", "8000::/1") },
      key: "sshAllowedCidrs",
      hint: /every IPv6 address/,
    },
    "0/0": { over: { sshAllowedCidrs: CIDRS("0/0") }, key: "sshAllowedCidrs", hint: /whole internet/ },
    "0::0/0": { over: { sshAllowedCidrs: CIDRS("0::0/0") }, key: "sshAllowedCidrs", hint: /whole internet/ },
    "0.0.0.0/00": { over: { sshAllowedCidrs: CIDRS("0.0.0.0/00") }, key: "sshAllowedCidrs", hint: /whole internet/ },
    "a /0 with host bits": {
      over: { sshAllowedCidrs: CIDRS("10.1.2.3/0") },
      key: "sshAllowedCidrs",
      hint: /whole internet/,
    },
    "0/0 even when allowed": {
      over: { sshAllowedCidrs: CIDRS("0/0"), allowSshFromAnywhere: "true" },
      key: "sshAllowedCidrs",
      hint: /invalid address "0"/,
    },
    "IPv6 host bits": {
      over: { sshAllowedCidrs: CIDRS("2001:db8::1/64") },
      key: "sshAllowedCidrs",
      hint: /host bits set for \/64.*\/128/,
    },
    "IPv6 host bits in an embedded IPv4": {
      over: { sshAllowedCidrs: CIDRS("::ffff:10.0.0.1/120") },
      key: "sshAllowedCidrs",
      hint: /host bits/,
    },
    "IPv6 zone id": { over: { sshAllowedCidrs: CIDRS("fe80::1%eth0/128") }, key: "sshAllowedCidrs", hint: /zone id/ },
    "prefix with a leading zero": {
      over: { sshAllowedCidrs: CIDRS("10.0.0.0/08") },
      key: "sshAllowedCidrs",
      hint: /leading zero.*\/8/,
    },
    "a repeated CIDR": {
      over: { sshAllowedCidrs: CIDRS("203.0.113.7/32", "198.51.100.0/24", "203.0.113.7/32") },
      key: "sshAllowedCidrs",
      hint: /item 2 .* repeats item 0/,
    },
    "an IPv6 CIDR spelled twice": {
      over: { sshAllowedCidrs: CIDRS("2001:db8::/64", "2001:0db8:0:0::/64") },
      key: "sshAllowedCidrs",
      hint: /repeats item 0/,
    },
    "more CIDRs than a security group holds": {
      over: { sshAllowedCidrs: JSON.stringify(Array.from({ length: 61 }, (_, i) => `10.0.${i}.0/24`)) },
      key: "sshAllowedCidrs",
      hint: /61 IPv4 CIDRs.*60/,
    },
  },
  "S3 names and keys": {
    "prefix with a wildcard": {
      over: { artifactPrefix: "images/*/" },
      key: "artifactPrefix",
      hint: /wildcard.*grant more/,
    },
    "prefix with ?": { over: { artifactPrefix: "images?/" }, key: "artifactPrefix", hint: /wildcard/ },
    "prefix with ..": { over: { artifactPrefix: "images/../other/" }, key: "artifactPrefix", hint: /\.\. segment/ },
    "prefix of one .": { over: { artifactPrefix: "./" }, key: "artifactPrefix", hint: /\. or \.\. segment/ },
    "prefix with a policy variable": {
      over: { artifactPrefix: "${aws:username}/" },
      key: "artifactPrefix",
      hint: /policy variable/,
    },
    "prefix with %": { over: { artifactPrefix: "a%2F/" }, key: "artifactPrefix", hint: /!-_\.\(\)\/ only/ },
    "prefix with a backslash": { over: { artifactPrefix: "a\\b/" }, key: "artifactPrefix", hint: /!-_\.\(\)\/ only/ },
    "prefix too long for S3 keys": {
      over: { artifactPrefix: `${"a".repeat(950)}/` },
      key: "artifactPrefix",
      hint: /S3's 1024.*at most 947/,
    },
    "image key with a wildcard": {
      over: { windowsImageUrl: "s3://media/win*.vhdx" },
      key: "windowsImageUrl",
      hint: /object key "win\*\.vhdx".*wildcard.*exact object ARN/,
    },
    "image key climbing with ..": {
      over: { windowsImageUrl: "s3://media/images/../secret/win.vhdx" },
      key: "windowsImageUrl",
      hint: /\.\. segment/,
    },
    "image key with a policy variable": {
      over: { windowsImageUrl: "s3://media/${aws:userid}/win.vhdx" },
      key: "windowsImageUrl",
      hint: /policy variable/,
    },
    "image key with a percent-escape": {
      over: { windowsImageUrl: "s3://media/win%20arm.vhdx" },
      key: "windowsImageUrl",
      hint: /holds "%", which S3 or IAM treat specially/,
    },
    "image key with #": { over: { windowsImageUrl: "s3://media/win#1.vhdx" }, key: "windowsImageUrl", hint: /"#"/ },
    "image key with a leading /": {
      over: { windowsImageUrl: "s3://media//win.vhdx" },
      key: "windowsImageUrl",
      hint: /starts with \//,
    },
    "image key with a brace": {
      over: { windowsImageUrl: "s3://media/win}.vhdx" },
      key: "windowsImageUrl",
      hint: /policy variable/,
    },
    "virtio key with ?": { over: { virtioIsoUrl: "s3://media/virtio?.iso" }, key: "virtioIsoUrl", hint: /wildcard/ },
    "OpenSSH key with *": {
      over: { openSshZipUrl: "s3://media/ssh/*.zip", openSshZipSha256: "a".repeat(64) },
      key: "openSshZipUrl",
      hint: /wildcard/,
    },
    "source bucket in capitals": {
      over: { windowsImageUrl: "s3://Media/win.vhdx" },
      key: "windowsImageUrl",
      hint: /bucket "Media".*S3 bucket names never have/,
    },
    "source bucket that is an IP": {
      over: { virtioIsoUrl: "s3://192.168.1.1/virtio.iso" },
      key: "virtioIsoUrl",
      hint: /IP address/,
    },
    "bucket with ..": {
      over: { artifactBucketName: "my..bucket" },
      key: "artifactBucketName",
      hint: /two adjacent periods/,
    },
    "bucket with .-": {
      over: { artifactBucketName: "my.-bucket" },
      key: "artifactBucketName",
      hint: /period next to a hyphen/,
    },
    "bucket with xn--": {
      over: { artifactBucketName: "xn--bucket" },
      key: "artifactBucketName",
      hint: /xn--, a prefix S3 reserves/,
    },
    "bucket with -s3alias": {
      over: { artifactBucketName: "images-s3alias" },
      key: "artifactBucketName",
      hint: /-s3alias/,
    },
    "bucket with --ol-s3": {
      over: { artifactBucketName: "images--ol-s3" },
      key: "artifactBucketName",
      hint: /--ol-s3/,
    },
    "bucket too short": { over: { artifactBucketName: "ab" }, key: "artifactBucketName", hint: /3 to 63/ },
    "local s3 URI with a wildcard prefix": {
      over: { ...LOCAL, artifactUri: "s3://images/a*/" },
      key: "artifactUri",
      hint: /key prefix "a\*\/".*wildcard/,
      machine: WORKSTATION,
    },
    "local s3 URI of a reserved bucket": {
      over: { ...LOCAL, artifactUri: "s3://images--ol-s3/x/" },
      key: "artifactUri",
      hint: /--ol-s3/,
      machine: WORKSTATION,
    },
  },
  Ports: {
    "the VM's SSH forward": {
      over: { vmBuildletPort: "2222" },
      key: "vmBuildletPort",
      hint: /2222 is the build VM's SSH forward/,
    },
    "the build VM's buildlet forward": {
      over: { vmBuildletPort: "2223" },
      key: "vmBuildletPort",
      hint: /buildlet forward/,
    },
    "the VNC display": { over: { vmBuildletPort: "5903" }, key: "vmBuildletPort", hint: /VNC.*22, 2222, 2223, 5903/ },
    "port 0": { over: { vmBuildletPort: "0" }, key: "vmBuildletPort", hint: /1-65535/ },
    "port 65536": { over: { vmBuildletPort: "65536" }, key: "vmBuildletPort", hint: /1-65535/ },
  },
  "Windows values": {
    "user Guest in lower case": {
      over: { guestAdminUser: "guest" },
      key: "guestAdminUser",
      hint: /built-in Windows account/,
    },
    "user SYSTEM": { over: { guestAdminUser: "SYSTEM" }, key: "guestAdminUser", hint: /built-in/ },
    "user DefaultAccount": { over: { guestAdminUser: "defaultaccount" }, key: "guestAdminUser", hint: /built-in/ },
    "user WDAGUtilityAccount": {
      over: { guestAdminUser: "WDAGUtilityAccount" },
      key: "guestAdminUser",
      hint: /built-in/,
    },
    "user Everyone": { over: { guestAdminUser: "Everyone" }, key: "guestAdminUser", hint: /built-in/ },
    "user of 21 characters": {
      over: { guestAdminUser: "abcdefghijklmnopqrstu" },
      key: "guestAdminUser",
      hint: /longer than 20/,
    },
    "user with a quote": { over: { guestAdminUser: 'go"pher' }, key: "guestAdminUser", hint: /holds ".*may not/ },
    "user with @": { over: { guestAdminUser: "go@pher" }, key: "guestAdminUser", hint: /holds @/ },
    "user with + and =": { over: { guestAdminUser: "a+b=c" }, key: "guestAdminUser", hint: /holds \+ =/ },
    "user with a slash": { over: { guestAdminUser: "go/pher" }, key: "guestAdminUser", hint: /holds \// },
    "user ending with a period": {
      over: { guestAdminUser: "gopher." },
      key: "guestAdminUser",
      hint: /ends with a period/,
    },
    "user with a newline": {
      over: { guestAdminUser: "go\npher" },
      key: "guestAdminUser",
      hint: /control character \(U\+000A at position 2\)/,
    },
    "time zone typo": {
      over: { guestTimeZone: "Pacific Standard Tim" },
      key: "guestTimeZone",
      hint: /Did you mean "Pacific Standard Time"/,
    },
    "time zone in another case": { over: { guestTimeZone: "utc" }, key: "guestTimeZone", hint: /use "UTC"/ },
    "IANA time zone": { over: { guestTimeZone: "Europe/Berlin" }, key: "guestTimeZone", hint: /IANA names/ },
    "made-up time zone": {
      over: { guestTimeZone: "Mars Standard Time" },
      key: "guestTimeZone",
      hint: /not a Windows time zone id/,
    },
    "time zone with XML": {
      over: { guestTimeZone: "UTC</TimeZone><x>" },
      key: "guestTimeZone",
      hint: /not a Windows time zone id/,
    },
    "edition with NUL": { over: { windowsEdition: "Windows 11 Pro\u0000" }, key: "windowsEdition", hint: /U\+0000/ },
    "locale with a tab": { over: { guestLocale: "en-US\t" }, key: "guestLocale", hint: /U\+0009/ },
    "edition with a lone surrogate": {
      over: { windowsEdition: "Windows \ud800 Pro" },
      key: "windowsEdition",
      hint: /U\+D800/,
    },
    "edition with U+FFFE": { over: { windowsEdition: "Windows\ufffe" }, key: "windowsEdition", hint: /U\+FFFE/ },
    "tag value with a bell": { over: { tags: JSON.stringify({ team: "ci\u0007" }) }, key: "tags", hint: /U\+0007/ },
    "product key with vowels": {
      over: { windowsProductKey: "ABCDE-FGHIJ-KLMNO-PQRST-UVWXY" },
      key: "windowsProductKey",
      hint: /five groups of five/,
      absent: "ABCDE",
      secret: ["windowsProductKey"],
    },
    "product key without dashes": {
      over: { windowsProductKey: "VK7JGNPHTMC97JM9MPGT3V66T" },
      key: "windowsProductKey",
      hint: /XXXXX-XXXXX/,
      absent: "VK7JG",
      secret: ["windowsProductKey"],
    },
    "product key of four groups": {
      over: { windowsProductKey: "VK7JG-NPHTM-C97JM-9MPGT" },
      key: "windowsProductKey",
      hint: /five groups/,
      absent: "NPHTM",
      secret: ["windowsProductKey"],
    },
  },
  "Paths and URIs": {
    "work dir with a quote": {
      over: { ...LOCAL, localWorkDir: "it's" },
      key: "localWorkDir",
      hint: /holds "'"/,
      machine: WORKSTATION,
    },
    "work dir with a space": {
      over: { ...LOCAL, localWorkDir: "work dir" },
      key: "localWorkDir",
      hint: /holds space/,
      machine: WORKSTATION,
    },
    "work dir with a double quote": {
      over: { ...LOCAL, localWorkDir: 'vm"dir' },
      key: "localWorkDir",
      hint: /holds "\\""/,
      machine: WORKSTATION,
    },
    "work dir with a backslash": {
      over: { ...LOCAL, localWorkDir: "vm\\dir" },
      key: "localWorkDir",
      hint: /no whitespace, quotes or backslashes/,
      machine: WORKSTATION,
    },
    "work dir with a newline": {
      over: { ...LOCAL, localWorkDir: ".work\nlocal" },
      key: "localWorkDir",
      hint: /control character/,
      machine: WORKSTATION,
    },
    "work dir climbing out": {
      over: { ...LOCAL, localWorkDir: "../elsewhere" },
      key: "localWorkDir",
      hint: /climbs out/,
      machine: WORKSTATION,
    },
    "work dir climbing inside an absolute path": {
      over: { ...LOCAL, localWorkDir: "/srv/vm/../../etc" },
      key: "localWorkDir",
      hint: /climbs out/,
      machine: WORKSTATION,
    },
    "work dir at the root": {
      over: { ...LOCAL, localWorkDir: "/" },
      key: "localWorkDir",
      hint: /filesystem root/,
      machine: WORKSTATION,
    },
    "work dir of the project itself": {
      over: { ...LOCAL, localWorkDir: "." },
      key: "localWorkDir",
      hint: /project folder itself/,
      machine: WORKSTATION,
    },
    "work dir too deep for a socket": {
      over: { ...LOCAL, localWorkDir: `deep/${"d".repeat(80)}` },
      key: "localWorkDir",
      hint: /107 bytes/,
      machine: WORKSTATION,
    },
    "artifact folder with a quote": {
      over: { ...LOCAL, artifactUri: "file:///srv/it's/" },
      key: "artifactUri",
      hint: /single quote/,
      machine: WORKSTATION,
    },
    "artifact folder with an escaped newline": {
      over: { ...LOCAL, artifactUri: "file:///srv/a%0Ab/" },
      key: "artifactUri",
      hint: /control character/,
      machine: WORKSTATION,
    },
    "artifact folder with an escaped NUL": {
      over: { ...LOCAL, artifactUri: "file:///srv/a%00/" },
      key: "artifactUri",
      hint: /control character/,
      machine: WORKSTATION,
    },
    "image URL with a newline": {
      over: { windowsImageUrl: "https://example.com/\nwin.vhdx" },
      key: "windowsImageUrl",
      hint: /control character/,
    },
    "stage0 URL with NUL": {
      over: { buildletStage0Url: "https://example.com/s0\u0000.exe" },
      key: "buildletStage0Url",
      hint: /U\+0000/,
    },
    "endpoint URL with a carriage return": {
      over: { ...LOCAL, artifactEndpointUrl: "http://127.0.0.1:9000/\r" },
      key: "artifactEndpointUrl",
      hint: /U\+000D/,
      machine: WORKSTATION,
    },
    "image URL with a space": {
      over: { windowsImageUrl: "https://example.com/my image.vhdx" },
      key: "windowsImageUrl",
      hint: /whitespace.*%20/,
    },
    "image URL longer than a tag value": {
      over: { windowsImageUrl: `https://example.com/${"w".repeat(240)}.vhdx` },
      key: "windowsImageUrl",
      hint: /265 characters.*SourceImage tag.*256/,
    },
    "a value longer than any setting takes": {
      over: { windowsEdition: "x".repeat(3000) },
      key: "windowsEdition",
      hint: /3000 characters long/,
    },
    "too many tags": {
      over: { tags: TAGS(51 - STACK_TAG_KEYS.length) },
      key: "tags",
      hint: new RegExp(`${51 - STACK_TAG_KEYS.length} tags.*Project.*at most ${50 - STACK_TAG_KEYS.length}`),
    },
    "a tag the stack sets": {
      over: { tags: JSON.stringify({ Name: "mine" }) },
      key: "tags",
      hint: /"Name" is one the stack sets itself/,
    },
    "a tag the stack sets, in another case": {
      over: { tags: JSON.stringify({ imagesha256: "x" }) },
      key: "tags",
      hint: /IAM tag keys ignore case/,
    },
    "tag keys differing in case": {
      over: { tags: JSON.stringify({ Team: "a", team: "b" }) },
      key: "tags",
      hint: /differ only in case/,
    },
    "tag value IAM refuses": {
      over: { tags: JSON.stringify({ team: "<ci>" }) },
      key: "tags",
      hint: /value holds "<", ">"/,
    },
    "tag key IAM refuses": {
      over: { tags: JSON.stringify({ "team#1": "ci" }) },
      key: "tags",
      hint: /key "team#1" holds "#"/,
    },
    "tag key too long": { over: { tags: JSON.stringify({ ["k".repeat(129)]: "v" }) }, key: "tags", hint: /1 to 128/ },
    ...Object.fromEntries(
      Object.values(RUNTIME).flatMap((token, i) => [
        [
          `the placeholder ${token} in a value`,
          {
            over: { windowsEdition: `Windows 11 ${token}` },
            key: "windowsEdition",
            hint: new RegExp(`holds ${token}`),
          },
        ],
        [
          `the placeholder ${token} in a tag`,
          { over: { tags: JSON.stringify({ [`k${i}`]: token }) }, key: "tags", hint: /placeholder/ },
        ],
      ]),
    ),
    "a placeholder in a URL": {
      over: { virtioIsoUrl: `https://example.com/${RUNTIME.hostId}.iso` },
      key: "virtioIsoUrl",
      hint: /placeholder/,
    },
  },
  "Credentials in URLs": {
    "user and password in an image URL": {
      over: { windowsImageUrl: "https://builder:hunter2@media.example.com/win.vhdx" },
      key: "windowsImageUrl",
      hint: /user name or password.*s3:\/\/ URL the host role can read/,
      absent: "hunter2",
    },
    "a presigned S3 URL": {
      over: {
        windowsImageUrl:
          "https://media.s3.amazonaws.com/win.vhdx?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAEXAMPLE%2F20260101&X-Amz-Signature=deadbeef",
      },
      key: "windowsImageUrl",
      hint: /X-Amz-Credential/,
      absent: "deadbeef",
    },
    "an S3 v2 signature": {
      over: {
        virtioIsoUrl:
          "https://media.s3.amazonaws.com/v.iso?AWSAccessKeyId=AKIAEXAMPLE&Expires=1&Signature=c2lnbmF0dXJl",
      },
      key: "virtioIsoUrl",
      hint: /AWSAccessKeyId/,
      absent: "c2lnbmF0dXJl",
    },
    "an Azure SAS": {
      over: {
        openSshZipUrl: "https://x.blob.core.windows.net/c/OpenSSH-ARM64.zip?sv=2024&sig=c2FzLXNpZw%3D",
        openSshZipSha256: "a".repeat(64),
      },
      key: "openSshZipUrl",
      hint: /sig/,
      absent: "c2FzLXNpZw",
    },
    "a token in a stage0 URL": {
      over: { buildletStage0Url: "https://dl.example.com/stage0.exe?token=t0ps3cret" },
      key: "buildletStage0Url",
      hint: /token.*guest downloads it itself/,
      absent: "t0ps3cret",
    },
    "a signature in an llvm-mingw URL": {
      over: { llvmMingwUrl: "https://cdn.example.com/l.zip?Expires=1&Signature=s3cr3tsig&Key-Pair-Id=K1" },
      key: "llvmMingwUrl",
      hint: /Signature/,
      absent: "s3cr3tsig",
    },
    "a password in the S3 endpoint": {
      over: { ...LOCAL, artifactEndpointUrl: "http://minio:minio123@127.0.0.1:9000" },
      key: "artifactEndpointUrl",
      hint: /profile or environment/,
      absent: "minio123",
      machine: WORKSTATION,
    },
    "a user in an s3:// artifact URI": {
      over: { ...LOCAL, artifactUri: "s3://key:secret@images/x/" },
      key: "artifactUri",
      hint: /user name or password/,
      absent: "secret@",
      machine: WORKSTATION,
    },
  },
  "Local target": {
    "more vCPUs than this machine": {
      over: { ...LOCAL, vmCpus: "8" },
      key: "vmCpus",
      hint: /8 vCPUs is more than the 4 CPUs of this machine.*at most 4/,
      machine: { ...WORKSTATION, cpus: 4 },
    },
    "more memory than this machine": {
      over: { ...LOCAL, vmMemoryGiB: "32" },
      key: "vmMemoryGiB",
      hint: /this machine's 31\.3 GiB.*at most 27/,
      machine: WORKSTATION,
    },
    "memory for a machine too small for Windows": {
      over: { ...LOCAL, vmMemoryGiB: "4" },
      key: "vmMemoryGiB",
      hint: /too little memory for Windows/,
      machine: { ...WORKSTATION, memoryGiB: 7.6 },
    },
  },
};

describe("config validation against hostile and mistaken values", () => {
  for (const [area, cases] of Object.entries(HOSTILE)) {
    describe(area, () => {
      for (const [what, h] of Object.entries(cases)) {
        it(`refuses ${what}, naming ${h.key}`, () => {
          const { config, problems } = validateConfig(
            withDefaults({ ...GOOD, ...h.over }),
            new Set(h.secret ?? []),
            h.machine ?? WORKSTATION,
          );
          expect(config, "no config on error").to.equal(undefined);
          const mine = problems.filter((p) => p.key === h.key);
          expect(mine, JSON.stringify(problems)).to.have.length.greaterThan(0);
          expect(mine.map((p) => p.message).join("\n")).to.match(h.hint);
          expect(
            mine.every((p) => /Fix: /.test(p.message)),
            "every message names the fix",
          ).to.equal(true);
          if (h.absent) expect(formatProblems(problems)).to.not.contain(h.absent);
        });
      }
    });
  }

  it("gives one message for a value refused for its text, not one per rule", () => {
    const { problems } = validateConfig(withDefaults({ ...GOOD, windowsImageUrl: "https://u:p@x.example/w\n.zip" }));
    expect(problems.filter((p) => p.key === "windowsImageUrl")).to.have.length(1);
  });

  // [what, overrides, machine]
  const FINE: Array<[string, RawConfig, Machine?]> = [
    [
      "SSH from two halves of IPv4 when allowed",
      { sshAllowedCidrs: CIDRS("0.0.0.0/1", "128.0.0.0/1"), allowSshFromAnywhere: "true" },
    ],
    ["0.0.0.0/0 and ::/0 when allowed", { sshAllowedCidrs: CIDRS("0.0.0.0/0", "::/0"), allowSshFromAnywhere: "true" }],
    ["three quarters of IPv4", { sshAllowedCidrs: CIDRS("0.0.0.0/2", "64.0.0.0/2", "128.0.0.0/2") }],
    [
      "a wide IPv6 range and a host",
      { sshAllowedCidrs: CIDRS("2001:db8::/32", "::ffff:203.0.113.7/128", "203.0.113.0/24") },
    ],
    ["60 IPv4 CIDRs", { sshAllowedCidrs: JSON.stringify(Array.from({ length: 60 }, (_, i) => `10.0.${i}.0/24`)) }],
    ["an image key with every safe character", { windowsImageUrl: "s3://my.media-1/Win_11(ARM)!/a+b=c,d@e.vhdx" }],
    ["an https image URL with a harmless query", { windowsImageUrl: "https://media.example.com/win.vhdx?version=3" }],
    ["an https URL with an escaped space", { windowsImageUrl: "https://media.example.com/my%20win.vhdx" }],
    ["buildlet port 8443", { vmBuildletPort: "8443" }],
    ["a Windows time zone with a dot", { guestTimeZone: "W. Europe Standard Time" }],
    ["a user name of 20 characters", { guestAdminUser: "a".repeat(20) }],
    ["a user named like a built-in one but longer", { guestAdminUser: "guests-ci" }],
    [`${50 - STACK_TAG_KEYS.length} user tags`, { tags: TAGS(50 - STACK_TAG_KEYS.length) }],
    [
      "tags IAM accepts",
      { tags: JSON.stringify({ "team:name": "CI / builders @ golang.org", Zuständig: "Ärger-Team" }) },
    ],
    ["an image URL of exactly 256 characters", { windowsImageUrl: `https://example.com/${"w".repeat(256 - 25)}.vhdx` }],
    [
      "the local target at this machine's limits",
      { ...LOCAL, vmCpus: "8", vmMemoryGiB: "27", localWorkDir: "/var/tmp/w-arm64" },
      WORKSTATION,
    ],
    ["an absolute local work dir", { ...LOCAL, localWorkDir: "/srv/windows-arm64/work" }, WORKSTATION],
    ["a local work dir with %, $ and a comma", { ...LOCAL, localWorkDir: "/tmp/w%i,$x" }, WORKSTATION],
  ];
  for (const [what, over, machine] of FINE) {
    it(`accepts ${what}`, () => {
      const { problems } = validateConfig(withDefaults({ ...GOOD, ...over }), new Set(), machine ?? WORKSTATION);
      expect(problems, JSON.stringify(problems)).to.deep.equal([]);
    });
  }

  it("accepts a well-formed product key stored as a secret, and never echoes it", () => {
    const key = "VK7JG-NPHTM-C97JM-9MPGT-3V66T";
    const ok = validateConfig(withDefaults({ ...GOOD, windowsProductKey: key }), new Set(["windowsProductKey"]));
    expect(ok.problems).to.deep.equal([]);
    const plain = validateConfig(withDefaults({ ...GOOD, windowsProductKey: key }));
    expect(formatProblems(plain.problems)).to.contain("--secret").and.not.contain("NPHTM");
  });

  it("knows the standard Windows time zone ids", () => {
    for (const id of [
      "UTC",
      "Pacific Standard Time",
      "W. Europe Standard Time",
      "Tokyo Standard Time",
      "UTC+12",
      "Yukon Standard Time",
    ])
      expect(WINDOWS_TIME_ZONES).to.include(id);
    expect(new Set(WINDOWS_TIME_ZONES).size).to.equal(WINDOWS_TIME_ZONES.length);
    expect(WINDOWS_TIME_ZONES.length).to.be.greaterThan(130);
  });
});

describe("config value checks", () => {
  const cidrs = (...c: string[]) => c.map((x) => parseCidr(x) as Cidr);
  it("computes whether CIDRs cover a whole address family", () => {
    expect(coversAll(cidrs("0.0.0.0/1", "128.0.0.0/1"), 4)).to.equal(true);
    expect(coversAll(cidrs("0.0.0.0/1", "128.0.0.0/2"), 4)).to.equal(false);
    expect(coversAll(cidrs("0.0.0.0/1", "0.0.0.0/2", "128.0.0.0/1"), 4)).to.equal(true);
    expect(coversAll(cidrs("::/1", "8000::/2", "c000::/2"), 6)).to.equal(true);
    expect(coversAll(cidrs("::/1", "8000::/2"), 6)).to.equal(false);
    expect(coversAll(cidrs("0.0.0.0/1", "128.0.0.0/1"), 6)).to.equal(false);
  });
  it("reads IPv6 addresses, compressed or with an embedded IPv4", () => {
    expect(parseCidr("2001:db8::/32")?.start).to.equal(0x20010db8n << 96n);
    expect(parseCidr("::ffff:10.0.0.0/104")?.start).to.equal((0xffffn << 32n) + (10n << 24n));
    expect(parseCidr("1::/16")?.start).to.equal(1n << 112n);
  });
  it("names the credential in a URL without its value", () => {
    expect(urlCredentials("https://a:b@h/x")).to.match(/user name or password/);
    expect(urlCredentials("https://h/x?X-Amz-Security-Token=abc")).to.equal("the query parameter X-Amz-Security-Token");
    expect(urlCredentials("https://h/x?version=1&mode=sig")).to.equal(undefined);
    expect(urlCredentials("s3://bucket/key@1")).to.equal(undefined);
  });
  it("refuses S3 keys that are not what they say", () => {
    for (const k of [
      "a*",
      "a?b",
      "${x}",
      "a/../b",
      "./a",
      "/a",
      "a//b",
      "a b",
      "a\\b",
      "a%41",
      "a#b",
      "a~b",
      "x".repeat(1025),
    ])
      expect(s3KeyProblem(k), k).to.be.a("string");
    for (const k of ["a", "a/b/c.vhdx", "Win_11(ARM)!/x-y.z", "a+b=c,d@e"])
      expect(s3KeyProblem(k), k).to.equal(undefined);
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

  it("lists every bare-metal host type among the Graviton families, with its generation", () => {
    for (const t of HOST_TYPES) {
      const family = GRAVITON_FAMILIES.find((f) => f.family === t.name.split(".")[0]);
      expect(family, t.name).to.not.equal(undefined);
      expect(family?.generation, t.name).to.equal(t.generation);
      expect(gravitonTypeProblem(t.name), t.name).to.equal(undefined);
    }
    expect(new Set(GRAVITON_FAMILIES.map((f) => f.family)).size).to.equal(GRAVITON_FAMILIES.length);
  });

  it("finds the Graviton counterpart of an x86 type", () => {
    expect(gravitonCounterpart("c7i.2xlarge")).to.equal("c7g.2xlarge");
    expect(gravitonCounterpart("r5.24xlarge")).to.equal("r7g.large");
    expect(gravitonCounterpart("t3.nano")).to.equal("t4g.nano");
    expect(gravitonCounterpart("p5.48xlarge")).to.equal("c7g.large");
    expect(gravitonTypeProblem("c7g.metal-24xl")).to.equal("size");
    expect(gravitonTypeProblem("C7G.large")).to.equal("form");
  });

  it("has consistent cores and memory", () => {
    for (const t of HOST_TYPES) {
      expect(t.cores, t.name).to.be.greaterThan(0);
      expect(t.memoryGiB, t.name).to.be.at.least(t.cores * 2);
    }
  });
});
