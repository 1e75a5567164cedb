/**
 * The stack's configuration keys: one table that drives reading, defaults,
 * validation messages, the `config:` block of Pulumi.yaml (a test keeps them
 * equal) and the README's config reference.
 */

export type KeyType = "string" | "integer" | "boolean" | "array" | "object";

export interface KeySpec {
  key: string;
  type: KeyType;
  description: string;
  /** Default when unset. Optional and required keys default to "" or [] (= unset), so that
   * Pulumi itself never stops on a missing key and every problem is reported at once. */
  default: string | number | boolean | string[] | Record<string, string>;
  /** Read with getSecret: never echoed in messages, kept a Pulumi secret. */
  secret?: boolean;
  /** Must be set for this target (the other target ignores it). */
  requiredFor?: "aws" | "all";
  /** An array of objects (Pulumi's project schema types array items only as scalars: the key gets no type). */
  items?: "object";
}

export const PROJECT = "windows-arm64-image";

export const VIRTIO_DEFAULT_URL =
  "https://fedorapeople.org/groups/virt/virtio-win/direct-downloads/archive-virtio/virtio-win-0.1.248-1/virtio-win.iso";
export const VIRTIO_DEFAULT_SHA256 = "d5b5739cf297f0538d263e30678d5a09bba470a7c6bcbd8dff74e44153f16549";

export const CONFIG_KEYS: readonly KeySpec[] = Object.freeze([
  {
    key: "target",
    type: "string",
    default: "aws",
    description:
      "Where the pipeline runs: `aws` (a Graviton bare-metal host, S3, an AMI) or `local` (this machine, no AWS resource, no AMI).",
  },
  // ---- host (aws target)
  {
    key: "hostInstanceType",
    type: "string",
    default: "a1.metal",
    description: "Graviton bare-metal instance type for the QEMU/KVM host (only .metal sizes expose KVM).",
  },
  {
    key: "hostAmiId",
    type: "string",
    default: "",
    description: "AMI for the host. Default: the newest Canonical Ubuntu 24.04 arm64 server AMI.",
  },
  {
    key: "hostVolumeGiB",
    type: "integer",
    default: 150,
    description: "Size of the host's encrypted gp3 root volume (holds the source image, the qcow2 and the AMI).",
  },
  {
    key: "hostVolumeIops",
    type: "integer",
    default: 3000,
    description: "gp3 IOPS of the root volume (3000 to 80000, at most 500 per GiB).",
  },
  {
    key: "hostVolumeThroughputMiBps",
    type: "integer",
    default: 250,
    description: "gp3 throughput of the root volume in MiB/s (125 to 2000, at most IOPS / 4).",
  },
  {
    key: "hostSubnetId",
    type: "string",
    default: "",
    description: "Subnet for the host (public IP needed). Default: the region's default VPC.",
  },
  {
    key: "sshAllowedCidrs",
    type: "array",
    default: [],
    requiredFor: "aws",
    description: 'CIDRs allowed to reach the host\'s SSH port (the only ingress). Example: ["203.0.113.7/32"].',
  },
  {
    key: "allowSshFromAnywhere",
    type: "boolean",
    default: false,
    description: "Allow 0.0.0.0/0 or ::/0 in sshAllowedCidrs.",
  },
  {
    key: "sshPrivateKey",
    type: "string",
    default: "",
    secret: true,
    description:
      "The pipeline's SSH private key (OpenSSH PEM). Default: an ED25519 key generated and kept as a stack secret.",
  },
  {
    key: "sshAuthorizedKeys",
    type: "array",
    default: [],
    description:
      "Extra OpenSSH public keys allowed to log in to the host (operators); changed in place, without a new host.",
  },
  {
    key: "answerFileInImage",
    type: "boolean",
    default: true,
    description:
      "VHDX/qcow2 sources: write the answer file into the image's Windows\\Panther before the first boot (an answer file cached in the image would otherwise win over the config ISO). false: the config ISO only (e.g. a BitLocker-encrypted image).",
  },
  {
    key: "keepHostRunning",
    type: "boolean",
    default: false,
    description:
      "Leave the host running (the AMI is then taken with a reboot). Default: stop it before the AMI is taken, to save cost; a later run with work starts it again.",
  },
  {
    key: "hostIdleMinutes",
    type: "integer",
    default: 45,
    description: "The build host powers itself off after this many minutes with no stage running (10 to 1440).",
  },
  // ---- artifacts
  {
    key: "artifactBucketName",
    type: "string",
    default: "",
    description: "Use this existing bucket (e.g. go-builder-data) instead of creating one.",
  },
  {
    key: "artifactPrefix",
    type: "string",
    default: "windows-arm64/",
    description: "Key prefix for published images; ends with `/`.",
  },
  {
    key: "artifactNoncurrentDays",
    type: "integer",
    default: 30,
    description: "Days before a noncurrent object version in the created bucket expires.",
  },
  {
    key: "artifactUri",
    type: "string",
    default: "",
    description:
      "Local target only: where to publish, `file:///abs/dir/` or `s3://bucket/prefix/` (default file://<localWorkDir>/artifacts/).",
  },
  {
    key: "artifactEndpointUrl",
    type: "string",
    default: "",
    description: "Local target only: S3-compatible endpoint for an s3:// artifactUri (e.g. http://127.0.0.1:9000).",
  },
  {
    key: "imageCompression",
    type: "string",
    default: "none",
    description:
      "How the published disk.qcow2 stores its clusters: none or zstd (smaller to store and fetch). The bake and the local VM always run an uncompressed copy.",
  },
  {
    key: "localWorkDir",
    type: "string",
    default: ".work/local",
    description: "Local target only: folder for scripts, VM files and artifacts (relative to the project).",
  },
  // ---- source images
  {
    key: "windowsImageUrl",
    type: "string",
    default: "",
    requiredFor: "all",
    description: "Windows ARM64 image: s3:// or https:// (file:// on the local target); .vhdx, .qcow2 or .iso.",
  },
  {
    key: "windowsImageSha256",
    type: "string",
    default: "",
    requiredFor: "all",
    description: "SHA-256 of windowsImageUrl (64 hex digits).",
  },
  {
    key: "windowsVersion",
    type: "string",
    default: "",
    requiredFor: "all",
    description: "Windows release in the image: 10, 11-22h2, 11-23h2, 11-24h2 or 11-25h2.",
  },
  {
    key: "virtioIsoUrl",
    type: "string",
    default: VIRTIO_DEFAULT_URL,
    description: "virtio-win drivers ISO (a pinned release; the 'latest' URL moves).",
  },
  {
    key: "virtioIsoSha256",
    type: "string",
    default: VIRTIO_DEFAULT_SHA256,
    description: "SHA-256 of virtioIsoUrl.",
  },
  {
    key: "openSshZipUrl",
    type: "string",
    default: "",
    description:
      "Optional Win32-OpenSSH ARM64 release zip (OpenSSH-ARM64.zip), put on the config ISO: the guest installs it when the Windows capability cannot be had from Windows Update.",
  },
  {
    key: "openSshZipSha256",
    type: "string",
    default: "",
    description: "SHA-256 of openSshZipUrl.",
  },
  // ---- VM
  { key: "vmCpus", type: "integer", default: 4, description: "vCPUs of the Windows VM." },
  {
    key: "vmMemoryGiB",
    type: "integer",
    default: 24,
    description: "Memory of the Windows VM in GiB; at least 4 GiB must stay with the host.",
  },
  {
    key: "allowUnsafeCpuCount",
    type: "boolean",
    default: false,
    description: "Allow more than 4 vCPUs on Graviton1 (known CLOCK_WATCHDOG_TIMEOUT crashes).",
  },
  {
    key: "vmMachineOptions",
    type: "string",
    default: "",
    description: "Extra `-machine virt,...` options, e.g. `gic-version=max` or `its=off`.",
  },
  {
    key: "vmDiskGiB",
    type: "integer",
    default: 64,
    description: "Disk size for ISO installs (VHDX/qcow2 sources keep their own size).",
  },
  {
    key: "vmBuildletPort",
    type: "integer",
    default: 443,
    description: "Host port forwarded to the guest's 443 (the buildlet) in the baked image.",
  },
  // ---- guest
  { key: "guestAdminUser", type: "string", default: "gopher", description: "Local administrator created in Windows." },
  { key: "guestLocale", type: "string", default: "en-US", description: "Windows locale (UI, input, system, user)." },
  { key: "guestTimeZone", type: "string", default: "UTC", description: "Windows time zone id, e.g. `UTC`." },
  {
    key: "windowsEdition",
    type: "string",
    default: "Windows 11 Pro",
    description: "ISO installs: the image name to install from install.wim.",
  },
  {
    key: "windowsProductKey",
    type: "string",
    default: "",
    secret: true,
    description:
      "ISO installs: product key (a secret). Unset: the edition's generic installation key (Home, Pro, Education, Pro Education, Pro for Workstations), which installs without activating.",
  },
  { key: "guestDisableWindowsUpdate", type: "boolean", default: true, description: "Turn off automatic updates." },
  {
    key: "guestDisableErrorReportingUi",
    type: "boolean",
    default: true,
    description: "Turn off the Windows Error Reporting UI.",
  },
  { key: "guestDisableUac", type: "boolean", default: true, description: "Turn off UAC (EnableLUA=0)." },
  { key: "guestDisableFirewall", type: "boolean", default: true, description: "Turn off the Windows firewall." },
  {
    key: "guestDisableDefenderRealtime",
    type: "boolean",
    default: true,
    description: "Turn off Defender real-time monitoring.",
  },
  {
    key: "guestDisableServices",
    type: "boolean",
    default: true,
    description: "Disable NlaSvc, LanmanServer, BITS, DPS, MSDTC, IKEEXT, RemoteRegistry, lmhosts.",
  },
  {
    key: "guestInstallBuildlet",
    type: "boolean",
    default: "",
    description:
      "Install the Go buildlet stage0 and start it at logon. Unset: installed when buildletStage0Url is set; false: never.",
  },
  { key: "buildletStage0Url", type: "string", default: "", description: "URL of buildlet stage0 for windows-arm64." },
  { key: "buildletStage0Sha256", type: "string", default: "", description: "SHA-256 of buildletStage0Url." },
  {
    key: "buildletEnv",
    type: "string",
    default: "",
    description:
      "Go builder env name, set machine-wide as GO_BUILDER_ENV in the guest; required while the buildlet is installed (stage0 panics on windows/arm64 without it and today accepts only host-windows11-arm64-azure there).",
  },
  {
    key: "guestInstallLlvmMingw",
    type: "boolean",
    default: "",
    description:
      "Install the llvm-mingw aarch64 toolchain to C:\\godep. Unset: installed when llvmMingwUrl is set; false: never.",
  },
  { key: "llvmMingwUrl", type: "string", default: "", description: "URL of the llvm-mingw aarch64 zip." },
  { key: "llvmMingwSha256", type: "string", default: "", description: "SHA-256 of llvmMingwUrl." },
  {
    key: "guestInstallVsBuildTools",
    type: "boolean",
    default: "",
    description:
      "Install VS Build Tools with the ARM64 and ARM VC tools. Unset: installed when vsBuildToolsUrl is set; false: never.",
  },
  {
    key: "vsBuildToolsUrl",
    type: "string",
    default: "",
    description: "URL of the VS Build Tools bootstrapper (vs_BuildTools.exe).",
  },
  { key: "vsBuildToolsSha256", type: "string", default: "", description: "SHA-256 of vsBuildToolsUrl." },
  {
    key: "vsVersion",
    type: "string",
    default: "2022",
    description:
      "VS Build Tools version: 2019, 2022 or 2026. VS 2022 and later do not support Windows 10 on ARM64: use 2019 there.",
  },
  {
    key: "guestAutoLogon",
    type: "boolean",
    default: true,
    description:
      "Log the admin user on automatically (the buildlet runs in that session). false: only the first logon is automatic (for the first-logon commands).",
  },
  // ---- AMI
  {
    key: "bakeInstanceType",
    type: "string",
    default: "c7g.large",
    description:
      "The short-lived instance the AMI is baked on: an arm64 (Graviton) type of any size (x86 types cannot boot the arm64 AMI).",
  },
  {
    key: "amiVolumeGiB",
    type: "integer",
    default: "",
    description:
      "Root volume of the baked AMI in GiB (16 to 16384). Unset: derived from the image's virtual size at bake time.",
  },
  // ---- image matrix
  {
    key: "images",
    type: "array",
    items: "object",
    default: "",
    description:
      "Image matrix: a list of variants, each built on its own host in parallel, published under artifactPrefix + name + / and baked to its own AMI. Each is {name, windowsImageUrl, windowsImageSha256, windowsVersion, ...} and may override the stack's image, host type and volume, VM and guest keys. Unset: the stack's own single image.",
  },
  {
    key: "smokeTest",
    type: "boolean",
    default: true,
    description:
      "After each bake, boot the new AMI on a metal instance of the host type and promote it (the SSM parameter /<project>/<stack>/<variant>/ami-id, output promotedAmiId) only once its VM answered SSH and the guest check passed. false: promote right after the bake.",
  },
  {
    key: "smokeTestTimeoutMinutes",
    type: "integer",
    default: 45,
    description:
      "Bound of the smoke test, from the instance's launch to the guest check passing (10 to 240); a metal instance takes minutes to boot.",
  },
  // ---- lifecycle
  {
    key: "retainAmiOnDelete",
    type: "boolean",
    default: true,
    description: "Keep the AMI when the stack is destroyed (other stacks boot it).",
  },
  { key: "tags", type: "object", default: {}, description: "Tags merged into every taggable resource." },
] as KeySpec[]);

export function keySpec(key: string): KeySpec {
  const spec = CONFIG_KEYS.find((k) => k.key === key);
  if (!spec) throw new Error(`unknown config key ${key}`);
  return spec;
}

/** The `config:` block of Pulumi.yaml, as data (a test keeps the file equal to it). */
export function projectConfigBlock(): Record<string, Record<string, unknown>> {
  const block: Record<string, Record<string, unknown>> = {};
  for (const k of CONFIG_KEYS) {
    const entry: Record<string, unknown> = {};
    // Pulumi's project schema types are string, integer, boolean and array; an object key has no type.
    // Nor has an integer or boolean that is unset by default: Pulumi refuses a typed default of "".
    // Nor has a list of objects (images): the schema types array items only as scalars.
    if (k.type !== "object" && !k.items && !(k.default === "" && k.type !== "string")) entry.type = k.type;
    if (k.type === "array" && !k.items) entry.items = { type: "string" };
    entry.description = k.description + (k.secret ? " Set it with --secret." : "");
    entry.default = k.default;
    block[k.key] = entry;
  }
  return block;
}

/**
 * The keys an `images` variant may set (its image, host, vm* and guest* settings); the rest
 * (network, bucket, tags, lifecycle, secrets) are the stack's and shared by every variant.
 */
export const VARIANT_KEYS: readonly string[] = Object.freeze([
  // image
  "windowsImageUrl",
  "windowsImageSha256",
  "windowsVersion",
  "windowsEdition",
  "virtioIsoUrl",
  "virtioIsoSha256",
  "openSshZipUrl",
  "openSshZipSha256",
  "answerFileInImage",
  "imageCompression",
  // host
  "hostInstanceType",
  "hostAmiId",
  "hostVolumeGiB",
  "hostVolumeIops",
  "hostVolumeThroughputMiBps",
  // vm
  "vmCpus",
  "vmMemoryGiB",
  "allowUnsafeCpuCount",
  "vmMachineOptions",
  "vmDiskGiB",
  "vmBuildletPort",
  // guest
  "guestAdminUser",
  "guestLocale",
  "guestTimeZone",
  "guestDisableWindowsUpdate",
  "guestDisableErrorReportingUi",
  "guestDisableUac",
  "guestDisableFirewall",
  "guestDisableDefenderRealtime",
  "guestDisableServices",
  "guestInstallBuildlet",
  "buildletStage0Url",
  "buildletStage0Sha256",
  "buildletEnv",
  "guestInstallLlvmMingw",
  "llvmMingwUrl",
  "llvmMingwSha256",
  "guestInstallVsBuildTools",
  "vsBuildToolsUrl",
  "vsBuildToolsSha256",
  "vsVersion",
  "guestAutoLogon",
]);

/** What every variant sets itself (its image): the stack's own values of these are not used with images. */
export const VARIANT_REQUIRED: readonly string[] = Object.freeze([
  "windowsImageUrl",
  "windowsImageSha256",
  "windowsVersion",
]);
