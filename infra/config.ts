/**
 * Reads and validates the stack configuration. `validateConfig` is pure: it
 * takes the raw strings Pulumi stores and returns either a typed, frozen
 * config or every problem found, each naming the key, what is wrong and the
 * fix. `loadConfig` reads Pulumi's config and throws one error listing all of
 * them before any resource is declared.
 */
import * as pulumi from "@pulumi/pulumi";
import * as net from "net";
import * as path from "path";
import { CONFIG_KEYS, KeySpec, PROJECT } from "./configSchema";
import {
  findHostType,
  GRAVITON_FAMILIES,
  gravitonCounterpart,
  gravitonTypeProblem,
  findGravitonFamily,
  HOST_TYPES,
  HostType,
  typesWithAtomics,
} from "./hostTypes";

export type Target = "aws" | "local";
export type ImageFormat = "vhdx" | "qcow2" | "iso";
export const WINDOWS_VERSIONS = ["10", "11-22h2", "11-23h2", "11-24h2", "11-25h2"] as const;
export type WindowsVersion = (typeof WINDOWS_VERSIONS)[number];
/** Releases built from 25168 on need ARMv8.1 LSE atomics. */
const NEEDS_ATOMICS: readonly WindowsVersion[] = ["11-24h2", "11-25h2"];
/** More vCPUs than this on Graviton1 crash Windows (CLOCK_WATCHDOG_TIMEOUT). */
export const GRAVITON1_SAFE_CPUS = 4;
/** Memory kept for the host OS and QEMU itself. */
export const HOST_RESERVED_GIB = 4;
export const VS_VERSIONS = ["2019", "2022", "2026"] as const;
export type VsVersion = (typeof VS_VERSIONS)[number];
/** VS Build Tools versions that support Windows 10 on ARM64 (2022 and later dropped it). */
const VS_FOR_WINDOWS_10: readonly VsVersion[] = ["2019"];
/** The only GO_BUILDER_ENV current buildlet stage0 accepts on windows/arm64. */
export const STAGE0_WINDOWS_ARM64_ENV = "host-windows11-arm64-azure";
/**
 * Source images whose file name says they are Insider/flighted builds: the OpenSSH
 * capability (Add-WindowsCapability) is known to fail on those, so they need openSshZipUrl.
 */
export const FLIGHTED_IMAGE_NAME = /insider|flight|preview/i;

export interface Download {
  url: string;
  sha256: string;
}

export interface GuestConfig {
  adminUser: string;
  locale: string;
  timeZone: string;
  edition: string;
  autoLogon: boolean;
  disableWindowsUpdate: boolean;
  disableErrorReportingUi: boolean;
  disableUac: boolean;
  disableFirewall: boolean;
  disableDefenderRealtime: boolean;
  disableServices: boolean;
  /** Present when the download is installed (its URL set, its switch not false). */
  buildlet?: Download;
  llvmMingw?: Download;
  vsBuildTools?: Download;
  /** GO_BUILDER_ENV, set machine-wide in the guest; present whenever the buildlet is installed. */
  buildletEnv?: string;
  /** VS Build Tools version (used when vsBuildTools is present). */
  vsVersion: VsVersion;
}

export interface StackConfig {
  target: Target;
  host: {
    instanceType: string;
    type: HostType;
    amiId?: string;
    volumeGiB: number;
    volumeIops: number;
    volumeThroughputMiBps: number;
    subnetId?: string;
    sshAllowedCidrs: string[];
    sshAuthorizedKeys: string[];
    keepRunning: boolean;
    /** The host powers itself off after this many minutes with no stage running. */
    idleMinutes: number;
  };
  bake: {
    /** The short-lived arm64 instance the AMI is baked on. */
    instanceType: string;
    /** Root volume of the AMI; unset: derived from the image's virtual size at bake time. */
    volumeGiB?: number;
  };
  artifacts: {
    bucketName?: string;
    prefix: string;
    noncurrentDays: number;
    /** Local target: where to publish (file:// or s3://). */
    uri?: string;
    endpointUrl?: string;
  };
  localWorkDir: string;
  image: {
    url: string;
    sha256: string;
    format: ImageFormat;
    windowsVersion: WindowsVersion;
    virtioUrl: string;
    virtioSha256: string;
    /** Win32-OpenSSH release zip for the config ISO (offline route), if given. */
    openSshZip?: { url: string; sha256: string };
  };
  vm: {
    cpus: number;
    memoryGiB: number;
    machineOptions: string;
    diskGiB: number;
    buildletPort: number;
  };
  guest: GuestConfig;
  retainAmiOnDelete: boolean;
  tags: Record<string, string>;
  /** Which secret keys are set (their values are read as Pulumi secrets, never here). */
  secretsSet: { sshPrivateKey: boolean; windowsProductKey: boolean };
}

export interface Problem {
  key: string;
  message: string;
}

/** Raw config: key (without project prefix) to the string Pulumi stores. */
export type RawConfig = Record<string, string | undefined>;

export class ConfigError extends Error {
  constructor(readonly problems: Problem[]) {
    super(formatProblems(problems));
    this.name = "ConfigError";
  }
}

export function formatProblems(problems: Problem[]): string {
  const lines = problems.map((p) => `  - ${PROJECT}:${p.key}: ${p.message}`);
  return `Invalid stack configuration (${problems.length} problem${problems.length === 1 ? "" : "s"}); nothing was created:\n${lines.join("\n")}`;
}

const HEX64 = /^[0-9a-f]{64}$/i;

/** Parses, defaults and validates every key; returns all problems (and warnings) at once. */
export function validateConfig(
  raw: RawConfig,
  storedAsSecret: ReadonlySet<string> = new Set(),
): { config?: StackConfig; problems: Problem[]; warnings: Problem[] } {
  const problems: Problem[] = [];
  const warnings: Problem[] = [];
  const add = (key: string, message: string) => problems.push({ key, message });
  const warn = (key: string, message: string) => warnings.push({ key, message });
  const shown = (spec: KeySpec, value: string) => (spec.secret ? "(secret)" : JSON.stringify(value));

  // Unknown keys: most often a typo of a real one.
  for (const key of Object.keys(raw)) {
    if (raw[key] === undefined) continue;
    if (!CONFIG_KEYS.some((k) => k.key === key)) {
      const near = closest(
        key,
        CONFIG_KEYS.map((k) => k.key),
      );
      add(
        key,
        `is not a setting of this stack.${near ? ` Did you mean ${near}?` : ""} Fix: remove it (pulumi config rm ${key})${near ? ` or rename it to ${near}` : ""}.`,
      );
    }
  }

  const values: Record<string, unknown> = {};
  for (const spec of CONFIG_KEYS) {
    const text = raw[spec.key];
    if (text === undefined || text === "") {
      values[spec.key] = spec.default === "" ? undefined : spec.default;
      continue;
    }
    if (spec.secret) {
      values[spec.key] = true; // presence only
      if (!storedAsSecret.has(spec.key))
        add(
          spec.key,
          `is stored in plain text in the stack file. Fix: pulumi config set --secret ${spec.key} <value> (or pipe it in on stdin).`,
        );
      continue;
    }
    const parsed = parseTyped(spec, text);
    if ("error" in parsed) add(spec.key, `${shown(spec, text)} ${parsed.error}`);
    else values[spec.key] = parsed.value;
  }
  const str = (k: string) => values[k] as string | undefined;
  const int = (k: string) => values[k] as number | undefined;
  const bool = (k: string) => values[k] as boolean;
  /** A switch that may be unset (undefined), true or false. */
  const maybe = (k: string) => values[k] as boolean | undefined;

  const target = (str("target") ?? "aws") as Target;
  if (target !== "aws" && target !== "local") {
    add("target", `${JSON.stringify(target)} is not a target. Fix: set target to aws or local.`);
  }
  const isAws = target === "aws";
  for (const spec of CONFIG_KEYS) {
    if (values[spec.key] !== undefined) continue;
    if (spec.requiredFor === "all" || (spec.requiredFor === "aws" && isAws)) {
      add(spec.key, `is required but not set. Fix: pulumi config set ${spec.key} <value> (${spec.description})`);
    }
  }

  // ---- host
  const instanceType = str("hostInstanceType") ?? "a1.metal";
  const hostType = findHostType(instanceType);
  if (!hostType) {
    const near = closest(
      instanceType,
      HOST_TYPES.map((t) => t.name),
    );
    add(
      "hostInstanceType",
      `${JSON.stringify(instanceType)} is not a Graviton bare-metal type; only .metal sizes expose KVM.${near ? ` Did you mean ${near}?` : ""} Fix: use one of ${HOST_TYPES.map((t) => t.name).join(", ")}.`,
    );
  }
  const amiId = str("hostAmiId");
  if (amiId !== undefined && !/^ami-[0-9a-f]{8,17}$/.test(amiId)) {
    add(
      "hostAmiId",
      `${JSON.stringify(amiId)} is not an AMI id. Fix: use an id like ami-0123456789abcdef0, or unset it.`,
    );
  }
  const volumeGiB = int("hostVolumeGiB");
  if (volumeGiB !== undefined && (volumeGiB < 60 || volumeGiB > 65536)) {
    add(
      "hostVolumeGiB",
      `${volumeGiB} is out of range: the volume holds the source image and the qcow2. Fix: use 60 to 65536 (default 150).`,
    );
  }
  const iops = int("hostVolumeIops");
  if (iops !== undefined) {
    if (iops < 3000 || iops > 80000)
      add("hostVolumeIops", `${iops} is outside gp3's 3000 to 80000. Fix: use 3000 to 80000.`);
    else if (volumeGiB !== undefined && iops > 500 * volumeGiB)
      add(
        "hostVolumeIops",
        `${iops} is more than gp3's 500 IOPS per GiB for ${volumeGiB} GiB. Fix: use at most ${500 * volumeGiB}, or a larger hostVolumeGiB.`,
      );
  }
  const throughput = int("hostVolumeThroughputMiBps");
  if (throughput !== undefined) {
    if (throughput < 125 || throughput > 2000)
      add("hostVolumeThroughputMiBps", `${throughput} is outside gp3's 125 to 2000 MiB/s. Fix: use 125 to 2000.`);
    else if (iops !== undefined && throughput > iops / 4)
      add(
        "hostVolumeThroughputMiBps",
        `${throughput} MiB/s needs at least ${throughput * 4} IOPS on gp3 (0.25 MiB/s per IOPS), but hostVolumeIops is ${iops}. Fix: lower it to ${Math.floor(iops / 4)} or raise hostVolumeIops to ${throughput * 4}.`,
      );
  }
  const subnetId = str("hostSubnetId");
  if (subnetId !== undefined && !/^subnet-[0-9a-f]{8,17}$/.test(subnetId)) {
    add(
      "hostSubnetId",
      `${JSON.stringify(subnetId)} is not a subnet id. Fix: use an id like subnet-0123456789abcdef0.`,
    );
  }
  const cidrs = (values["sshAllowedCidrs"] as unknown[] | undefined) ?? [];
  if (isAws && values["sshAllowedCidrs"] !== undefined && cidrs.length === 0) {
    add(
      "sshAllowedCidrs",
      `is empty, so nobody could reach the host. Fix: list your address, e.g. ["203.0.113.7/32"].`,
    );
  }
  cidrs.forEach((c, i) => {
    const why = cidrProblem(c);
    if (why) add("sshAllowedCidrs", `item ${i} ${JSON.stringify(c)} ${why}`);
    else if ((c === "0.0.0.0/0" || c === "::/0") && !bool("allowSshFromAnywhere")) {
      add(
        "sshAllowedCidrs",
        `item ${i} ${JSON.stringify(c)} opens SSH to the whole internet. Fix: list your own CIDRs, or set allowSshFromAnywhere: true if you mean it.`,
      );
    }
  });
  const idleMinutes = int("hostIdleMinutes");
  if (idleMinutes !== undefined && (idleMinutes < 10 || idleMinutes > 1440))
    add(
      "hostIdleMinutes",
      `${idleMinutes} is out of range: the host powers itself off after this many idle minutes. Fix: use 10 to 1440 (default 45).`,
    );
  const authorizedKeys = (values["sshAuthorizedKeys"] as unknown[] | undefined) ?? [];
  authorizedKeys.forEach((k, i) => {
    const why = publicKeyProblem(k);
    if (why)
      add(
        "sshAuthorizedKeys",
        `item ${i} ${why} Fix: paste one line of an id_*.pub file, e.g. "ssh-ed25519 AAAA... you@host".`,
      );
  });

  // ---- artifacts
  const bucketName = str("artifactBucketName");
  if (bucketName !== undefined) {
    const why = bucketNameProblem(bucketName);
    if (why)
      add(
        "artifactBucketName",
        `${JSON.stringify(bucketName)} ${why} Fix: use an existing bucket's exact name, or unset it to create one.`,
      );
  }
  const prefix = str("artifactPrefix") ?? "windows-arm64/";
  if (!/^[A-Za-z0-9!\-_.*()/]+\/$/.test(prefix) || prefix.startsWith("/") || prefix.includes("//")) {
    add(
      "artifactPrefix",
      `${JSON.stringify(prefix)} is not a key prefix: it must end with "/", not start with one, and use letters, digits and !-_.*()/ only. Fix: e.g. windows-arm64/.`,
    );
  }
  const noncurrentDays = int("artifactNoncurrentDays");
  if (noncurrentDays !== undefined && (noncurrentDays < 1 || noncurrentDays > 3650)) {
    add("artifactNoncurrentDays", `${noncurrentDays} is out of range. Fix: use 1 to 3650 days.`);
  }
  const artifactUri = str("artifactUri");
  if (artifactUri !== undefined) {
    if (isAws)
      add(
        "artifactUri",
        `applies to the local target only; the aws target publishes to the artifact bucket. Fix: unset it, or use artifactBucketName/artifactPrefix.`,
      );
    else if (artifactUri.startsWith("file://")) {
      const problem = folderUriProblem(artifactUri);
      if (problem) add("artifactUri", `${JSON.stringify(artifactUri)} ${problem}. Fix: use file:///abs/dir/.`);
    } else if (!/^s3:\/\/[a-z0-9.-]{3,63}(\/[A-Za-z0-9!\-_.*()/]*)?$/.test(artifactUri))
      add(
        "artifactUri",
        `${JSON.stringify(artifactUri)} is neither file:///abs/dir/ nor s3://bucket/prefix/. Fix: use one of those forms.`,
      );
  }
  const endpointUrl = str("artifactEndpointUrl");
  if (endpointUrl !== undefined) {
    if (isAws) add("artifactEndpointUrl", `applies to the local target only. Fix: unset it.`);
    else if (!isHttpUrl(endpointUrl))
      add(
        "artifactEndpointUrl",
        `${JSON.stringify(endpointUrl)} is not an http(s) URL. Fix: e.g. http://127.0.0.1:9000.`,
      );
  }
  const localWorkDir = str("localWorkDir") ?? ".work/local";

  // ---- source images
  const imageSchemes = isAws ? ["s3", "https"] : ["s3", "https", "file"];
  const imageUrl = str("windowsImageUrl");
  let format: ImageFormat | undefined;
  if (imageUrl !== undefined) {
    const why = urlProblem(imageUrl, imageSchemes);
    if (why) add("windowsImageUrl", `${JSON.stringify(imageUrl)} ${why}`);
    else {
      format = imageFormatOf(imageUrl);
      if (!format)
        add(
          "windowsImageUrl",
          `${JSON.stringify(imageUrl)} does not end in .vhdx, .qcow2 or .iso, so its format is unknown. Fix: point at a .vhdx, .qcow2 or .iso file.`,
        );
    }
  }
  for (const key of ["windowsImageSha256", "virtioIsoSha256"]) {
    const v = str(key);
    if (v !== undefined && !HEX64.test(v))
      add(key, `${JSON.stringify(v)} is not a SHA-256 (64 hex digits). Fix: sha256sum the file and paste the hash.`);
  }
  const virtioUrl = str("virtioIsoUrl");
  if (virtioUrl !== undefined) {
    const why = urlProblem(virtioUrl, imageSchemes);
    if (why) add("virtioIsoUrl", `${JSON.stringify(virtioUrl)} ${why}`);
  }
  const openSshUrl = str("openSshZipUrl");
  const openSshSha = str("openSshZipSha256");
  if (openSshUrl !== undefined) {
    const why = urlProblem(openSshUrl, imageSchemes);
    if (why) add("openSshZipUrl", `${JSON.stringify(openSshUrl)} ${why}`);
    else if (!/\.zip$/i.test(new URL(openSshUrl).pathname))
      add("openSshZipUrl", `${JSON.stringify(openSshUrl)} is not a .zip. Fix: the OpenSSH-ARM64.zip release asset.`);
    if (openSshSha === undefined)
      add("openSshZipSha256", `is required with openSshZipUrl. Fix: sha256sum the zip and paste the hash.`);
  } else if (openSshSha !== undefined) {
    add("openSshZipSha256", `is set but openSshZipUrl is not. Fix: set openSshZipUrl too, or unset this.`);
  }
  if (openSshSha !== undefined && !HEX64.test(openSshSha))
    add("openSshZipSha256", `${JSON.stringify(openSshSha)} is not a SHA-256 (64 hex digits). Fix: sha256sum the zip.`);
  if (imageUrl !== undefined && format && openSshUrl === undefined && FLIGHTED_IMAGE_NAME.test(imagePath(imageUrl)))
    warn(
      "openSshZipUrl",
      `is not set, but windowsImageUrl ${JSON.stringify(imageUrl)} names an Insider/flighted build, where the OpenSSH capability from Windows Update is known to fail (0x800f0954), so the guest may never answer SSH. Fix: set openSshZipUrl and openSshZipSha256 to a Win32-OpenSSH OpenSSH-ARM64.zip release.`,
    );
  const windowsVersion = str("windowsVersion") as WindowsVersion | undefined;
  if (windowsVersion !== undefined && !WINDOWS_VERSIONS.includes(windowsVersion)) {
    add(
      "windowsVersion",
      `${JSON.stringify(windowsVersion)} is not a known release. Fix: use one of ${WINDOWS_VERSIONS.join(", ")}.`,
    );
  }
  if (isAws && hostType && windowsVersion && NEEDS_ATOMICS.includes(windowsVersion) && !hostType.lseAtomics) {
    add(
      "windowsVersion",
      `Windows ${windowsVersion} needs ARMv8.1 LSE atomics, but ${hostType.name} is ${hostType.cpu}, ${hostType.armArch}: it cannot boot there. Fix: use Windows 10, 11-22h2 or 11-23h2 on ${hostType.name}, or set hostInstanceType to a Graviton2 or later type (${typesWithAtomics().slice(0, 4).join(", ")}, ...).`,
    );
  }

  // ---- VM
  const cpus = int("vmCpus");
  const memoryGiB = int("vmMemoryGiB");
  if (cpus !== undefined) {
    if (cpus < 1) add("vmCpus", `${cpus} is less than 1. Fix: use 1 to ${hostType?.cores ?? 4}.`);
    else if (isAws && hostType && cpus > hostType.cores)
      add(
        "vmCpus",
        `${cpus} is more than the ${hostType.cores} cores of ${hostType.name}. Fix: use at most ${hostType.cores}.`,
      );
    else if (isAws && hostType?.generation === 1 && cpus > GRAVITON1_SAFE_CPUS && !bool("allowUnsafeCpuCount"))
      add(
        "vmCpus",
        `${cpus} vCPUs on Graviton1 (${hostType.name}) crash Windows with CLOCK_WATCHDOG_TIMEOUT (interrupts arrive late). Fix: use ${GRAVITON1_SAFE_CPUS} or fewer, or set allowUnsafeCpuCount: true to try anyway.`,
      );
  }
  if (memoryGiB !== undefined) {
    if (memoryGiB < 4) add("vmMemoryGiB", `${memoryGiB} GiB is below the 4 GiB Windows 11 needs. Fix: use at least 4.`);
    else if (isAws && hostType && memoryGiB > hostType.memoryGiB - HOST_RESERVED_GIB)
      add(
        "vmMemoryGiB",
        `${memoryGiB} GiB leaves less than ${HOST_RESERVED_GIB} GiB of ${hostType.name}'s ${hostType.memoryGiB} GiB to the host. Fix: use at most ${hostType.memoryGiB - HOST_RESERVED_GIB}.`,
      );
  }
  const machineOptions = str("vmMachineOptions") ?? "";
  if (!/^[A-Za-z0-9=,._-]*$/.test(machineOptions)) {
    add(
      "vmMachineOptions",
      `${JSON.stringify(machineOptions)} has characters QEMU options never use (spaces, quotes, ...). Fix: comma-separated key=value pairs, e.g. gic-version=max,its=off.`,
    );
  }
  const diskGiB = int("vmDiskGiB");
  if (diskGiB !== undefined) {
    if (diskGiB < 64) add("vmDiskGiB", `${diskGiB} GiB is below the 64 GiB Windows 11 needs. Fix: use at least 64.`);
    else if (isAws && volumeGiB !== undefined && format === "iso" && diskGiB > volumeGiB - 20)
      add(
        "vmDiskGiB",
        `${diskGiB} GiB does not fit on the ${volumeGiB} GiB host volume with the ISO. Fix: raise hostVolumeGiB to ${diskGiB + 20} or more.`,
      );
  }
  const buildletPort = int("vmBuildletPort");
  if (buildletPort !== undefined && (buildletPort < 1 || buildletPort > 65535 || buildletPort === 22)) {
    add(
      "vmBuildletPort",
      `${buildletPort} is not a usable port (1-65535, not 22, which the host's sshd uses). Fix: e.g. 443.`,
    );
  }

  // ---- guest
  const adminUser = str("guestAdminUser") ?? "gopher";
  if (!/^[A-Za-z0-9][A-Za-z0-9._-]{0,19}$/.test(adminUser) || /^administrator$/i.test(adminUser)) {
    add(
      "guestAdminUser",
      `${JSON.stringify(adminUser)} is not a usable Windows user name (1-20 letters, digits, . _ -; not Administrator). Fix: e.g. gopher.`,
    );
  }
  const locale = str("guestLocale") ?? "en-US";
  if (!/^[a-z]{2,3}-[A-Z]{2}$/.test(locale))
    add("guestLocale", `${JSON.stringify(locale)} is not a locale name. Fix: e.g. en-US or de-DE.`);
  const timeZone = str("guestTimeZone") ?? "UTC";
  if (!/^[A-Za-z0-9 ()+.\-_]{2,64}$/.test(timeZone))
    add(
      "guestTimeZone",
      `${JSON.stringify(timeZone)} is not a Windows time zone id. Fix: e.g. UTC or "Pacific Standard Time" (tzutil /l lists them).`,
    );
  const edition = str("windowsEdition") ?? "Windows 11 Pro";
  if (edition.trim() === "" || edition.length > 128)
    add("windowsEdition", `is empty or too long. Fix: e.g. "Windows 11 Pro".`);

  const downloads: Array<[string, string, string, string]> = [
    ["guestInstallBuildlet", "buildletStage0Url", "buildletStage0Sha256", "buildlet"],
    ["guestInstallLlvmMingw", "llvmMingwUrl", "llvmMingwSha256", "llvmMingw"],
    ["guestInstallVsBuildTools", "vsBuildToolsUrl", "vsBuildToolsSha256", "vsBuildTools"],
  ];
  const guestDownloads: Record<string, Download | undefined> = {};
  for (const [switchKey, urlKey, shaKey, name] of downloads) {
    const url = str(urlKey);
    const sha = str(shaKey);
    if (url !== undefined) {
      const why = urlProblem(url, ["https"]);
      if (why) add(urlKey, `${JSON.stringify(url)} ${why} (the guest downloads it itself)`);
    }
    if (sha !== undefined && !HEX64.test(sha))
      add(
        shaKey,
        `${JSON.stringify(sha)} is not a SHA-256 (64 hex digits). Fix: sha256sum the file and paste the hash.`,
      );
    const on = maybe(switchKey);
    if (on === false) {
      if (url !== undefined)
        warn(
          urlKey,
          `is set but ${switchKey} is false, so it is not installed. Fix: unset ${switchKey} (or set it to true) to install it, or unset ${urlKey}.`,
        );
      continue;
    }
    if (on === undefined && url === undefined) {
      if (sha !== undefined) add(shaKey, `is set but ${urlKey} is not. Fix: set ${urlKey} too, or unset this.`);
      continue;
    }
    if (url === undefined)
      add(urlKey, `is required while ${switchKey} is true. Fix: set it, or set ${switchKey}: false.`);
    if (sha === undefined)
      add(
        shaKey,
        `is required ${on ? `while ${switchKey} is true` : `with ${urlKey}`}: every download is verified. Fix: set it, or set ${switchKey}: false.`,
      );
    if (url !== undefined && sha !== undefined) guestDownloads[name] = { url, sha256: sha.toLowerCase() };
  }
  const installsBuildlet =
    maybe("guestInstallBuildlet") === true ||
    (maybe("guestInstallBuildlet") === undefined && str("buildletStage0Url") !== undefined);
  const buildletEnv = str("buildletEnv");
  if (buildletEnv !== undefined) {
    if (!/^[a-z0-9-]{1,63}$/.test(buildletEnv))
      add(
        "buildletEnv",
        `${JSON.stringify(buildletEnv)} is not a builder env name (1 to 63 lowercase letters, digits and dashes). Fix: e.g. ${STAGE0_WINDOWS_ARM64_ENV}.`,
      );
    else if (buildletEnv !== STAGE0_WINDOWS_ARM64_ENV)
      warn(
        "buildletEnv",
        `${JSON.stringify(buildletEnv)}: current buildlet stage0 accepts only ${STAGE0_WINDOWS_ARM64_ENV} on windows/arm64 and panics on anything else; an older or self-built stage0 may accept it. Fix: use ${STAGE0_WINDOWS_ARM64_ENV} unless your stage0 knows this env.`,
      );
  } else if (installsBuildlet)
    add(
      "buildletEnv",
      `is required while the buildlet is installed: stage0 panics on windows/arm64 without GO_BUILDER_ENV. Fix: set buildletEnv: ${STAGE0_WINDOWS_ARM64_ENV}, or set guestInstallBuildlet: false.`,
    );
  const vsVersion = (str("vsVersion") ?? "2022") as VsVersion;
  const installsVs =
    maybe("guestInstallVsBuildTools") === true ||
    (maybe("guestInstallVsBuildTools") === undefined && str("vsBuildToolsUrl") !== undefined);
  if (!VS_VERSIONS.includes(vsVersion))
    add(
      "vsVersion",
      `${JSON.stringify(vsVersion)} is not a VS Build Tools version. Fix: use one of ${VS_VERSIONS.join(", ")}.`,
    );
  else if (installsVs && windowsVersion === "10" && !VS_FOR_WINDOWS_10.includes(vsVersion))
    add(
      "vsVersion",
      `VS ${vsVersion} Build Tools do not support Windows 10 on ARM64 (VS 2022 and later need Windows 11 there). Fix: set vsVersion: 2019, or use a Windows 11 image, or set guestInstallVsBuildTools: false.`,
    );

  // ---- AMI bake
  const bakeInstanceType = str("bakeInstanceType") ?? "c7g.large";
  const bakeWhy = gravitonTypeProblem(bakeInstanceType);
  if (bakeWhy === "family" || bakeWhy === "form")
    add(
      "bakeInstanceType",
      `${JSON.stringify(bakeInstanceType)} is not an arm64 (Graviton) instance type, so the arm64 AMI cannot boot on it (x86 types never can). Fix: use ${gravitonCounterpart(bakeInstanceType)} or another Graviton type (families ${GRAVITON_FAMILIES.map((f) => f.family).join(", ")}).`,
    );
  else if (bakeWhy === "size") {
    const fam = findGravitonFamily(bakeInstanceType.split(".")[0]);
    add(
      "bakeInstanceType",
      `${JSON.stringify(bakeInstanceType)} is not a size of ${fam?.family}. Fix: use one of ${fam?.sizes.map((z) => `${fam.family}.${z}`).join(", ")}.`,
    );
  }
  const amiVolumeGiB = int("amiVolumeGiB");
  if (amiVolumeGiB !== undefined && (amiVolumeGiB < 16 || amiVolumeGiB > 16384))
    add(
      "amiVolumeGiB",
      `${amiVolumeGiB} GiB is out of range for the AMI's root volume. Fix: use 16 to 16384, or unset it to size the volume from the image.`,
    );

  // ---- tags
  const tags = (values["tags"] as Record<string, unknown> | undefined) ?? {};
  for (const [k, v] of Object.entries(tags)) {
    if (typeof v !== "string")
      add("tags", `tag ${JSON.stringify(k)} has a ${typeof v} value; tag values are strings. Fix: quote it.`);
    else if (v.length > 256)
      add("tags", `tag ${JSON.stringify(k)} value is longer than 256 characters. Fix: shorten it.`);
    if (k.length === 0 || k.length > 128)
      add("tags", `tag key ${JSON.stringify(k)} must be 1 to 128 characters. Fix: rename it.`);
    if (/^aws:/i.test(k)) add("tags", `tag key ${JSON.stringify(k)} uses the reserved aws: prefix. Fix: rename it.`);
  }

  if (problems.length > 0) return { problems, warnings };

  const config: StackConfig = {
    target,
    host: {
      instanceType,
      type: hostType as HostType,
      amiId,
      volumeGiB: volumeGiB as number,
      volumeIops: iops as number,
      volumeThroughputMiBps: throughput as number,
      subnetId,
      sshAllowedCidrs: cidrs as string[],
      sshAuthorizedKeys: (authorizedKeys as string[]).map((k) => k.trim()),
      keepRunning: bool("keepHostRunning"),
      idleMinutes: idleMinutes as number,
    },
    bake: {
      instanceType: bakeInstanceType,
      ...(amiVolumeGiB !== undefined ? { volumeGiB: amiVolumeGiB } : {}),
    },
    artifacts: {
      bucketName,
      prefix,
      noncurrentDays: noncurrentDays as number,
      uri: artifactUri,
      endpointUrl,
    },
    localWorkDir,
    image: {
      url: imageUrl as string,
      sha256: (str("windowsImageSha256") as string).toLowerCase(),
      format: format as ImageFormat,
      windowsVersion: windowsVersion as WindowsVersion,
      virtioUrl: virtioUrl as string,
      virtioSha256: (str("virtioIsoSha256") as string).toLowerCase(),
      ...(openSshUrl && openSshSha ? { openSshZip: { url: openSshUrl, sha256: openSshSha.toLowerCase() } } : {}),
    },
    vm: {
      cpus: cpus as number,
      memoryGiB: memoryGiB as number,
      machineOptions,
      diskGiB: diskGiB as number,
      buildletPort: buildletPort as number,
    },
    guest: {
      adminUser,
      locale,
      timeZone,
      edition,
      autoLogon: bool("guestAutoLogon"),
      disableWindowsUpdate: bool("guestDisableWindowsUpdate"),
      disableErrorReportingUi: bool("guestDisableErrorReportingUi"),
      disableUac: bool("guestDisableUac"),
      disableFirewall: bool("guestDisableFirewall"),
      disableDefenderRealtime: bool("guestDisableDefenderRealtime"),
      disableServices: bool("guestDisableServices"),
      buildlet: guestDownloads["buildlet"],
      llvmMingw: guestDownloads["llvmMingw"],
      vsBuildTools: guestDownloads["vsBuildTools"],
      ...(installsBuildlet && buildletEnv !== undefined ? { buildletEnv } : {}),
      vsVersion,
    },
    retainAmiOnDelete: bool("retainAmiOnDelete"),
    tags: tags as Record<string, string>,
    secretsSet: {
      sshPrivateKey: values["sshPrivateKey"] === true,
      windowsProductKey: values["windowsProductKey"] === true,
    },
  };
  return { config: deepFreeze(config), problems, warnings };
}

/** Like validateConfig, but throws a ConfigError listing every problem. */
export function parseConfig(raw: RawConfig, storedAsSecret: ReadonlySet<string> = new Set()): StackConfig {
  const { config, problems } = validateConfig(raw, storedAsSecret);
  if (!config) throw new ConfigError(problems);
  return config;
}

// ---------------------------------------------------------------- helpers

function parseTyped(spec: KeySpec, text: string): { value: unknown } | { error: string } {
  switch (spec.type) {
    case "string":
      return { value: text };
    case "integer": {
      if (!/^-?\d+$/.test(text.trim())) return { error: `is not a whole number. Fix: e.g. ${spec.default ?? 1}.` };
      return { value: Number(text.trim()) };
    }
    case "boolean": {
      const t = text.trim().toLowerCase();
      if (t === "true") return { value: true };
      if (t === "false") return { value: false };
      return { error: `is not true or false. Fix: set ${spec.key} to true or false.` };
    }
    case "array":
    case "object": {
      let v: unknown;
      try {
        v = JSON.parse(text);
      } catch {
        return {
          error: `is not valid ${spec.type === "array" ? "list" : "object"} (JSON/YAML). Fix: e.g. ${spec.type === "array" ? '["203.0.113.7/32"]' : '{"team": "ci"}'}.`,
        };
      }
      if (spec.type === "array" && !Array.isArray(v))
        return { error: `is not a list. Fix: write it as a YAML list or ["a", "b"].` };
      if (spec.type === "object" && (typeof v !== "object" || v === null || Array.isArray(v)))
        return { error: `is not an object of key: value pairs. Fix: e.g. {"team": "ci"}.` };
      return { value: v };
    }
  }
}

export function cidrProblem(value: unknown): string | undefined {
  if (typeof value !== "string") return 'is not a string. Fix: write CIDRs as strings, e.g. "203.0.113.7/32".';
  const m = /^([^/]+)\/(\d{1,3})$/.exec(value);
  if (!m) return "is not a CIDR (address/prefix length). Fix: e.g. 203.0.113.7/32 for one address.";
  const [, addr, lenText] = m;
  const kind = net.isIP(addr);
  const len = Number(lenText);
  if (kind === 0) return `has an invalid address ${JSON.stringify(addr)}. Fix: e.g. 203.0.113.7/32.`;
  const max = kind === 4 ? 32 : 128;
  if (len > max) return `has prefix length ${len}, more than ${max} for IPv${kind}. Fix: use /${max} for one address.`;
  if (kind === 4) {
    const n = addr.split(".").reduce((acc, o) => acc * 256 + Number(o), 0);
    const hostBits = 32 - len;
    if (hostBits > 0 && n % 2 ** hostBits !== 0)
      return `has host bits set for /${len}, which AWS rejects. Fix: use the network address or /32.`;
  }
  return undefined;
}

const KEY_TYPES = [
  "ssh-ed25519",
  "ssh-rsa",
  "ecdsa-sha2-nistp256",
  "ecdsa-sha2-nistp384",
  "ecdsa-sha2-nistp521",
  "sk-ssh-ed25519@openssh.com",
  "sk-ecdsa-sha2-nistp256@openssh.com",
];

export function publicKeyProblem(value: unknown): string | undefined {
  if (typeof value !== "string") return "is not a string.";
  if (/PRIVATE KEY/.test(value)) return "is a PRIVATE key: never put one here.";
  const parts = value.trim().split(/\s+/);
  if (parts.length < 2 || !KEY_TYPES.includes(parts[0]))
    return `is not an OpenSSH public key (type must be one of ${KEY_TYPES.slice(0, 3).join(", ")}, ...).`;
  const blob = Buffer.from(parts[1], "base64");
  if (blob.length < 20 || blob.toString("base64") !== parts[1]) return "has an invalid base64 key body.";
  const nameLen = blob.readUInt32BE(0);
  if (blob.subarray(4, 4 + nameLen).toString() !== parts[0]) return `has a key body that is not a ${parts[0]} key.`;
  return undefined;
}

export function bucketNameProblem(name: string): string | undefined {
  if (name.length < 3 || name.length > 63) return "is not 3 to 63 characters long, as S3 bucket names are.";
  if (!/^[a-z0-9][a-z0-9.-]*[a-z0-9]$/.test(name))
    return "has characters S3 bucket names never have (lowercase letters, digits, '.', '-').";
  if (net.isIPv4(name)) return "looks like an IP address, which S3 bucket names may not.";
  return undefined;
}

function isHttpUrl(s: string): boolean {
  try {
    const u = new URL(s);
    return u.protocol === "http:" || u.protocol === "https:";
  } catch {
    return false;
  }
}

export function urlProblem(s: string, schemes: string[]): string | undefined {
  const fix = `Fix: use ${schemes.map((x) => `${x}://`).join(" or ")}.`;
  let u: URL;
  try {
    u = new URL(s);
  } catch {
    return `is not a URL. ${fix}`;
  }
  const scheme = u.protocol.replace(/:$/, "");
  if (!schemes.includes(scheme)) return `uses ${scheme}://, which this target cannot fetch. ${fix}`;
  if (scheme === "s3" && (!u.hostname || u.pathname.length < 2)) return `is not s3://bucket/key. ${fix}`;
  if (scheme === "https" && !u.hostname) return `has no host. ${fix}`;
  if (scheme === "file" && !path.isAbsolute(decodeURIComponent(u.pathname)))
    return `is not an absolute file:/// path. ${fix}`;
  return undefined;
}

/** Why a file:// publish folder is unusable (what publish-image.sh refuses), or undefined. */
export function folderUriProblem(uri: string): string | undefined {
  if (!uri.startsWith("file:///")) return "names a host or no absolute path";
  let p: string;
  try {
    p = decodeURIComponent(uri.slice("file://".length));
  } catch {
    return "has a broken percent-escape";
  }
  if (p.includes("\\")) return "holds a backslash";
  const trimmed = p.replace(/\/+$/, "");
  if (trimmed === "") return "is the filesystem root";
  if (/\/\/|\/\.\.?(\/|$)/.test(trimmed)) return "is not a plain absolute path (no //, . or ..)";
  return undefined;
}

/** A URL's path (lower-case not applied), or the text itself when it is not a URL. */
function imagePath(url: string): string {
  try {
    return decodeURIComponent(new URL(url).pathname);
  } catch {
    return url;
  }
}

/** The source format, from the URL path's extension (query strings ignored). */
export function imageFormatOf(url: string): ImageFormat | undefined {
  let p: string;
  try {
    p = new URL(url).pathname.toLowerCase();
  } catch {
    return undefined;
  }
  if (p.endsWith(".vhdx")) return "vhdx";
  if (p.endsWith(".qcow2")) return "qcow2";
  if (p.endsWith(".iso")) return "iso";
  return undefined;
}

function closest(word: string, candidates: string[]): string | undefined {
  let best: string | undefined;
  let bestDist = Infinity;
  for (const c of candidates) {
    const d = levenshtein(word.toLowerCase(), c.toLowerCase());
    if (d < bestDist) {
      bestDist = d;
      best = c;
    }
  }
  return bestDist <= Math.max(2, Math.floor(word.length / 4)) ? best : undefined;
}

function levenshtein(a: string, b: string): number {
  const row = Array.from({ length: b.length + 1 }, (_, i) => i);
  for (let i = 1; i <= a.length; i++) {
    let prev = row[0];
    row[0] = i;
    for (let j = 1; j <= b.length; j++) {
      const tmp = row[j];
      row[j] = Math.min(row[j] + 1, row[j - 1] + 1, prev + (a[i - 1] === b[j - 1] ? 0 : 1));
      prev = tmp;
    }
  }
  return row[b.length];
}

function deepFreeze<T>(o: T): T {
  if (o && typeof o === "object") {
    for (const v of Object.values(o as Record<string, unknown>)) deepFreeze(v);
    Object.freeze(o);
  }
  return o;
}

// ---------------------------------------------------------------- Pulumi

export interface LoadedConfig {
  config: StackConfig;
  /** Secret keys, read only as Pulumi secrets. */
  secrets: {
    sshPrivateKey?: pulumi.Output<string>;
    windowsProductKey?: pulumi.Output<string>;
  };
}

/** The stack's raw config (keys without the project prefix). */
export function readRawConfig(): RawConfig {
  const raw: RawConfig = {};
  const prefix = `${PROJECT}:`;
  for (const [k, v] of Object.entries(pulumi.runtime.allConfig())) {
    if (k.startsWith(prefix)) raw[k.slice(prefix.length)] = v;
  }
  return raw;
}

/** Reads and validates the whole config; throws one ConfigError listing every problem. */
export function loadConfig(): LoadedConfig {
  const raw = readRawConfig();
  const storedAsSecret = new Set(Object.keys(raw).filter((k) => isStoredAsSecret(`${PROJECT}:${k}`)));
  const { config: parsed, problems, warnings } = validateConfig(raw, storedAsSecret);
  for (const w of warnings) pulumi.log.warn(`${PROJECT}:${w.key}: ${w.message}`);
  if (!parsed) throw new ConfigError(problems);
  const config = parsed;
  const cfg = new pulumi.Config(PROJECT);
  return {
    config,
    secrets: {
      sshPrivateKey: config.secretsSet.sshPrivateKey ? cfg.requireSecret("sshPrivateKey") : undefined,
      windowsProductKey: config.secretsSet.windowsProductKey ? cfg.requireSecret("windowsProductKey") : undefined,
    },
  };
}

/** Whether Pulumi holds a config value as a secret (runtime API without typings; assume yes if absent). */
function isStoredAsSecret(fullKey: string): boolean {
  const rt = pulumi.runtime as unknown as { isConfigSecret?: (k: string) => boolean };
  return rt.isConfigSecret ? rt.isConfigSecret(fullKey) : true;
}
