/**
 * The validation rules, by area: one table per area (text, host, artifacts,
 * image, VM, guest, AMI, local), each rule naming its key, a pure check of the
 * parsed values, and a message that says what is wrong and the fix. A new rule
 * goes in its area's table; `validateConfig` (config.ts) runs them all.
 */
import * as path from "path";
import {
  bucketNameProblem,
  charsOutside,
  cidrProblem,
  closest,
  controlCharIn,
  coversAll,
  folderUriProblem,
  isHttpUrl,
  isZeroPrefix,
  parseCidr,
  PRODUCT_KEY,
  publicKeyProblem,
  RESERVED_USER_NAMES,
  s3KeyHazard,
  s3KeyProblem,
  S3_MAX_KEY_BYTES,
  s3Parts,
  stringsIn,
  urlCredentials,
  urlPath,
  urlProblem,
  USER_NAME_FORBIDDEN,
  USER_NAME_MAX,
} from "./configChecks";
import { CONFIG_KEYS, KeySpec } from "./configSchema";
import {
  findGravitonFamily,
  GRAVITON_FAMILIES,
  gravitonCounterpart,
  gravitonTypeProblem,
  HOST_TYPES,
  HostType,
  typesWithAtomics,
} from "./hostTypes";
import { IMAGE_COMPRESSIONS } from "./manifest";
import { AWS_LAYOUT, RUNTIME } from "./pipeline/plan";
import { BUILD_VNC_DISPLAY } from "./pipeline/vmEnv";
import TIME_ZONE_DATA from "./windowsTimeZones.json";

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
/** Windows time zone ids (tzutil /l), from infra/windowsTimeZones.json. */
export const WINDOWS_TIME_ZONES: readonly string[] = Object.freeze(TIME_ZONE_DATA.zones.map((z) => z.id));

/**
 * Tags the stack sets itself on top of the user's `tags` (index.ts: Project, Stack,
 * ManagedBy; every host resource: Name; the AMI: WindowsVersion, ImageSha256,
 * ImageUri, SourceImage). The AMI carries them all.
 */
export const STACK_TAG_KEYS: readonly string[] = Object.freeze([
  "Project",
  "Stack",
  "ManagedBy",
  "Name",
  "WindowsVersion",
  "ImageSha256",
  "ImageUri",
  "SourceImage",
  "RetainOnDelete",
]);
/** EC2's limit of tags per resource, and of a tag key's and value's length. */
export const EC2_MAX_TAGS = 50;
export const TAG_KEY_MAX = 128;
export const TAG_VALUE_MAX = 256;
/** Characters IAM accepts in tags (the host role is tagged too): letters, digits, spaces and _.:/=+-@. */
const TAG_CHAR = /[\p{L}\p{Z}\p{N}_.:/=+\-@]/u;
/** AWS's default limit of inbound rules per security group, per address family. */
export const SG_MAX_RULES = 60;
/** Longest text any setting takes (a safety bound; specific limits are checked by their rules). */
export const MAX_VALUE_LENGTH = 2048;
/** Unix socket paths (the VM's QMP socket) hold at most 107 bytes. */
const MAX_SOCKET_PATH = 107;

/** Ports the host itself uses, which vmBuildletPort must not take. */
export const HOST_PORTS: ReadonlyArray<{ port: number; what: string }> = Object.freeze([
  { port: 22, what: "the host's sshd" },
  { port: AWS_LAYOUT.sshPort, what: "the build VM's SSH forward" },
  { port: AWS_LAYOUT.sshPort + 1, what: "the build VM's buildlet forward" },
  { port: 5900 + BUILD_VNC_DISPLAY, what: "the build VM's VNC display" },
]);

/** The guest downloads: each installed when its URL is set and its switch is not false. */
export const DOWNLOADS = Object.freeze([
  { name: "buildlet", switchKey: "guestInstallBuildlet", urlKey: "buildletStage0Url", shaKey: "buildletStage0Sha256" },
  { name: "llvmMingw", switchKey: "guestInstallLlvmMingw", urlKey: "llvmMingwUrl", shaKey: "llvmMingwSha256" },
  {
    name: "vsBuildTools",
    switchKey: "guestInstallVsBuildTools",
    urlKey: "vsBuildToolsUrl",
    shaKey: "vsBuildToolsSha256",
  },
] as const);
export type DownloadName = (typeof DOWNLOADS)[number]["name"];

/** Keys that hold URLs, and what to use instead of one that carries a secret. */
const URL_KEYS: Readonly<Record<string, string>> = {
  windowsImageUrl: "use an s3:// URL the host role can read, or a URL without credentials",
  virtioIsoUrl: "use an s3:// URL the host role can read, or a URL without credentials",
  openSshZipUrl: "use an s3:// URL the host role can read, or a URL without credentials",
  buildletStage0Url: "use a URL without credentials (the guest downloads it itself: a public release URL)",
  llvmMingwUrl: "use a URL without credentials (the guest downloads it itself: a public release URL)",
  vsBuildToolsUrl: "use a URL without credentials (the guest downloads it itself: a public release URL)",
  artifactUri: "use an s3:// or file:// URI without credentials (the AWS CLI takes its credentials from its profile)",
  artifactEndpointUrl: "use the endpoint without credentials (the AWS CLI takes them from its profile or environment)",
};

/** Facts about the machine Pulumi runs on (the local target's VM runs there). */
export interface Machine {
  cpus: number;
  memoryGiB: number;
  /** Where relative paths (localWorkDir) resolve. */
  cwd: string;
}

/** What a rule sees: the parsed values and what was derived from them. */
export interface Ctx {
  /** The strings Pulumi stored (secrets included: checked, never echoed). */
  raw: Readonly<Record<string, string | undefined>>;
  /** Parsed value of each key, or undefined when unset (or unparsable). */
  values: Readonly<Record<string, unknown>>;
  target: Target;
  isAws: boolean;
  hostType?: HostType;
  /** The source image's format, when its URL is usable. */
  format?: ImageFormat;
  windowsVersion?: WindowsVersion;
  /** Which guest downloads are installed. */
  installs: Readonly<Record<DownloadName, boolean>>;
  machine: Machine;
  /** Keys whose text was refused (TEXT_RULES): no other rule reads or echoes them. */
  tainted: ReadonlySet<string>;
}

export interface Rule {
  /** The key the message names. */
  key: string;
  /** "warn": reported, and the stack is still accepted. */
  level?: "warn";
  /** What is wrong and the fix (one message, or one per item), or nothing when the values are fine. */
  check: (c: Ctx) => string | string[] | undefined;
}

const str = (c: Ctx, k: string) => c.values[k] as string | undefined;
const int = (c: Ctx, k: string) => c.values[k] as number | undefined;
const bool = (c: Ctx, k: string) => c.values[k] === true;
const maybe = (c: Ctx, k: string) => c.values[k] as boolean | undefined;
const q = JSON.stringify;

/** A rule per key, from one check of that key's value. */
function each(keys: readonly string[], check: (value: string, key: string, c: Ctx) => string | undefined): Rule[] {
  return keys.map((key) => ({
    key,
    check: (c) => {
      const v = str(c, key);
      return v === undefined ? undefined : check(v, key, c);
    },
  }));
}

// ---------------------------------------------------------------- text (every key)

const RUNTIME_TOKENS = Object.values(RUNTIME) as string[];
/** The images list is not checked as text here: each variant's values are, under images[i].<key> (config.ts). */
const nonSecret = CONFIG_KEYS.filter((k) => !k.secret && !k.items);

/**
 * Rules on the text of every value; a key with a problem here is not checked
 * further, so one cause gives one message (and a secret-bearing URL is never echoed).
 */
export const TEXT_RULES: readonly Rule[] = Object.freeze([
  ...nonSecret.map((spec: KeySpec) => ({
    key: spec.key,
    check: (c: Ctx) => {
      for (const s of stringsIn(c.values[spec.key])) {
        const at = controlCharIn(s);
        if (at)
          return `holds a control character (${at}): it would break the answer file's XML, the env files or the stage commands. Fix: remove it (every value is one line of printable text).`;
      }
      return undefined;
    },
  })),
  ...nonSecret.map((spec: KeySpec) => ({
    key: spec.key,
    check: (c: Ctx) => {
      const token = RUNTIME_TOKENS.find((t) => stringsIn(c.values[spec.key]).some((s) => s.includes(t)));
      return token
        ? `holds ${token}, a placeholder the pipeline replaces with a run-time value in stage commands. Fix: remove it.`
        : undefined;
    },
  })),
  ...nonSecret
    .filter((spec) => spec.type === "string" || spec.type === "array")
    .map((spec: KeySpec) => ({
      key: spec.key,
      check: (c: Ctx) => {
        const long = stringsIn(c.values[spec.key]).find((s) => s.length > MAX_VALUE_LENGTH);
        return long
          ? `is ${long.length} characters long; no setting of this stack takes more than ${MAX_VALUE_LENGTH}. Fix: shorten it.`
          : undefined;
      },
    })),
  ...Object.entries(URL_KEYS).map(([key, fix]) => ({
    key,
    check: (c: Ctx) => {
      const v = str(c, key);
      const secret = v === undefined ? undefined : urlCredentials(v);
      return secret
        ? `carries a credential (${secret}), which would be kept in plain text in the stack's state, logs and tags, and may expire. Fix: ${fix}.`
        : undefined;
    },
  })),
  ...Object.keys(URL_KEYS).map((key) => ({
    key,
    check: (c: Ctx) =>
      /\s/.test(str(c, key) ?? "")
        ? `${q(str(c, key))} holds whitespace. Fix: percent-encode it (a space is %20), or rename the file.`
        : undefined,
  })),
]);

// ---------------------------------------------------------------- host

function cidrRules(): Rule[] {
  const list = (c: Ctx) => (c.values["sshAllowedCidrs"] as unknown[] | undefined) ?? [];
  const anywhere = "Fix: list your own CIDRs, or set allowSshFromAnywhere: true if you mean it.";
  return [
    {
      key: "sshAllowedCidrs",
      check: (c) =>
        c.isAws && c.values["sshAllowedCidrs"] !== undefined && list(c).length === 0
          ? `is empty, so nobody could reach the host. Fix: list your address, e.g. ["203.0.113.7/32"].`
          : undefined,
    },
    {
      key: "sshAllowedCidrs",
      check: (c) =>
        list(c).flatMap((v, i) => {
          if (isZeroPrefix(v) && !bool(c, "allowSshFromAnywhere"))
            return [`item ${i} ${q(v)} opens SSH to the whole internet. ${anywhere}`];
          const why = cidrProblem(v);
          return why ? [`item ${i} ${q(v)} ${why}`] : [];
        }),
    },
    {
      key: "sshAllowedCidrs",
      check: (c) => {
        if (bool(c, "allowSshFromAnywhere")) return undefined;
        const parsed = list(c).flatMap((v) => (typeof v === "string" && !isZeroPrefix(v) ? [parseCidr(v)] : []));
        const cidrs = parsed.filter((x) => x !== undefined);
        const all = ([4, 6] as const).filter((kind) => coversAll(cidrs, kind));
        return all.map(
          (kind) =>
            `together cover every IPv${kind} address (${list(c)
              .filter((v) => typeof v === "string" && net6or4(v) === kind)
              .join(", ")}), which opens SSH to the whole internet. ${anywhere}`,
        );
      },
    },
    {
      key: "sshAllowedCidrs",
      check: (c) => {
        const seen = new Map<string, number>();
        const out: string[] = [];
        list(c).forEach((v, i) => {
          const p = typeof v === "string" ? parseCidr(v) : undefined;
          if (!p) return;
          const id = `${p.kind}:${p.start}/${p.len}`;
          const first = seen.get(id);
          if (first !== undefined)
            out.push(`item ${i} ${q(v)} repeats item ${first}, and AWS refuses duplicate rules. Fix: list it once.`);
          else seen.set(id, i);
        });
        for (const kind of [4, 6] as const) {
          const n = list(c).filter((v) => typeof v === "string" && net6or4(v) === kind).length;
          if (n > SG_MAX_RULES)
            out.push(
              `has ${n} IPv${kind} CIDRs, more than the ${SG_MAX_RULES} inbound rules a security group holds by default. Fix: merge them into wider CIDRs.`,
            );
        }
        return out;
      },
    },
  ];
}

function net6or4(v: string): 4 | 6 | undefined {
  return parseCidr(v)?.kind;
}

export const HOST_RULES: readonly Rule[] = Object.freeze([
  {
    key: "hostInstanceType",
    check: (c) => {
      const t = str(c, "hostInstanceType") ?? "a1.metal";
      if (c.hostType) return undefined;
      const near = closest(
        t,
        HOST_TYPES.map((h) => h.name),
      );
      return `${q(t)} is not a Graviton bare-metal type; only .metal sizes expose KVM.${near ? ` Did you mean ${near}?` : ""} Fix: use one of ${HOST_TYPES.map((h) => h.name).join(", ")}.`;
    },
  },
  ...each(["hostAmiId"], (v) =>
    /^ami-[0-9a-f]{8,17}$/.test(v)
      ? undefined
      : `${q(v)} is not an AMI id. Fix: use an id like ami-0123456789abcdef0, or unset it.`,
  ),
  {
    key: "hostVolumeGiB",
    check: (c) => {
      const v = int(c, "hostVolumeGiB");
      return v !== undefined && (v < 60 || v > 65536)
        ? `${v} is out of range: the volume holds the source image and the qcow2. Fix: use 60 to 65536 (default 150).`
        : undefined;
    },
  },
  {
    key: "hostVolumeIops",
    check: (c) => {
      const iops = int(c, "hostVolumeIops");
      const gib = int(c, "hostVolumeGiB");
      if (iops === undefined) return undefined;
      if (iops < 3000 || iops > 80000) return `${iops} is outside gp3's 3000 to 80000. Fix: use 3000 to 80000.`;
      if (gib !== undefined && iops > 500 * gib)
        return `${iops} is more than gp3's 500 IOPS per GiB for ${gib} GiB. Fix: use at most ${500 * gib}, or a larger hostVolumeGiB.`;
      return undefined;
    },
  },
  {
    key: "hostVolumeThroughputMiBps",
    check: (c) => {
      const t = int(c, "hostVolumeThroughputMiBps");
      const iops = int(c, "hostVolumeIops");
      if (t === undefined) return undefined;
      if (t < 125 || t > 2000) return `${t} is outside gp3's 125 to 2000 MiB/s. Fix: use 125 to 2000.`;
      if (iops !== undefined && t > iops / 4)
        return `${t} MiB/s needs at least ${t * 4} IOPS on gp3 (0.25 MiB/s per IOPS), but hostVolumeIops is ${iops}. Fix: lower it to ${Math.floor(iops / 4)} or raise hostVolumeIops to ${t * 4}.`;
      return undefined;
    },
  },
  ...each(["hostSubnetId"], (v) =>
    /^subnet-[0-9a-f]{8,17}$/.test(v)
      ? undefined
      : `${q(v)} is not a subnet id. Fix: use an id like subnet-0123456789abcdef0.`,
  ),
  {
    key: "hostIdleMinutes",
    check: (c) => {
      const v = int(c, "hostIdleMinutes");
      return v !== undefined && (v < 10 || v > 1440)
        ? `${v} is out of range: the host powers itself off after this many idle minutes. Fix: use 10 to 1440 (default 45).`
        : undefined;
    },
  },
  ...cidrRules(),
  {
    key: "sshAuthorizedKeys",
    check: (c) =>
      ((c.values["sshAuthorizedKeys"] as unknown[] | undefined) ?? []).flatMap((k, i) => {
        const why = publicKeyProblem(k);
        return why
          ? [`item ${i} ${why} Fix: paste one line of an id_*.pub file, e.g. "ssh-ed25519 AAAA... you@host".`]
          : [];
      }),
  },
]);

// ---------------------------------------------------------------- artifacts

/** The longest name the stack writes under the prefix: <sha256>/QEMU_VARS.fd. */
const LONGEST_ARTIFACT_NAME = 64 + "/QEMU_VARS.fd".length;

export const ARTIFACT_RULES: readonly Rule[] = Object.freeze([
  ...each(["artifactBucketName"], (v) => {
    const why = bucketNameProblem(v);
    return why ? `${q(v)} ${why} Fix: use an existing bucket's exact name, or unset it to create one.` : undefined;
  }),
  {
    key: "artifactPrefix",
    check: (c) => {
      const p = str(c, "artifactPrefix") ?? "windows-arm64/";
      const hazard = s3KeyHazard(p);
      if (hazard)
        return `${q(p)} ${hazard}, so the host role's policy would grant more (or other keys) than the prefix. Fix: e.g. windows-arm64/.`;
      if (!/^[A-Za-z0-9!\-_.()/]+\/$/.test(p) || p.startsWith("/") || p.includes("//"))
        return `${q(p)} is not a key prefix: it must end with "/", not start with one, and use letters, digits and !-_.()/ only. Fix: e.g. windows-arm64/.`;
      if (Buffer.byteLength(p) + LONGEST_ARTIFACT_NAME > S3_MAX_KEY_BYTES)
        return `is ${Buffer.byteLength(p)} bytes; with <sha256>/QEMU_VARS.fd after it the keys exceed S3's ${S3_MAX_KEY_BYTES}. Fix: use at most ${S3_MAX_KEY_BYTES - LONGEST_ARTIFACT_NAME} bytes.`;
      return undefined;
    },
  },
  {
    key: "imageCompression",
    check: (c) => {
      const v = str(c, "imageCompression") ?? "none";
      return (IMAGE_COMPRESSIONS as readonly string[]).includes(v)
        ? undefined
        : `${q(v)} is not a compression publish knows. Fix: use one of ${IMAGE_COMPRESSIONS.join(", ")}.`;
    },
  },
  {
    key: "artifactNoncurrentDays",
    check: (c) => {
      const v = int(c, "artifactNoncurrentDays");
      return v !== undefined && (v < 1 || v > 3650) ? `${v} is out of range. Fix: use 1 to 3650 days.` : undefined;
    },
  },
  ...each(["artifactUri"], (v, _k, c) => {
    if (c.isAws)
      return `applies to the local target only; the aws target publishes to the artifact bucket. Fix: unset it, or use artifactBucketName/artifactPrefix.`;
    if (v.startsWith("file://")) {
      const problem = folderUriProblem(v);
      return problem ? `${q(v)} ${problem}. Fix: use file:///abs/dir/.` : undefined;
    }
    if (!/^s3:\/\/[a-z0-9.-]{3,63}(\/[A-Za-z0-9!\-_.*()/]*)?$/.test(v))
      return `${q(v)} is neither file:///abs/dir/ nor s3://bucket/prefix/. Fix: use one of those forms.`;
    const { bucket, key } = s3Parts(v) as { bucket: string; key: string };
    const bucketWhy = bucketNameProblem(bucket);
    if (bucketWhy) return `${q(v)}: its bucket ${q(bucket)} ${bucketWhy} Fix: use the bucket's exact name.`;
    const keyWhy = key === "" ? undefined : s3KeyProblem(key);
    return keyWhy
      ? `${q(v)}: its key prefix ${q(key)} ${keyWhy}. Fix: e.g. s3://windows-images/windows-arm64/.`
      : undefined;
  }),
  ...each(["artifactEndpointUrl"], (v, _k, c) => {
    if (c.isAws) return `applies to the local target only. Fix: unset it.`;
    return isHttpUrl(v) ? undefined : `${q(v)} is not an http(s) URL. Fix: e.g. http://127.0.0.1:9000.`;
  }),
]);

// ---------------------------------------------------------------- source images

const imageSchemes = (c: Ctx) => (c.isAws ? ["s3", "https"] : ["s3", "https", "file"]);

/** Why an s3:// source URL could widen or break the host role's policy (its key becomes an exact object ARN). */
function s3SourceProblem(url: string): string | undefined {
  const parts = s3Parts(url);
  if (!parts) return undefined;
  const bucketWhy = bucketNameProblem(parts.bucket);
  if (bucketWhy) return `: its bucket ${q(parts.bucket)} ${bucketWhy} Fix: use the bucket's exact name.`;
  const keyWhy = s3KeyProblem(parts.key);
  return keyWhy
    ? `: its object key ${q(parts.key)} ${keyWhy} (the key becomes an exact object ARN in the host role's policy). Fix: copy the object to a key of letters, digits and !-_.()/+=,@ only.`
    : undefined;
}

const sourceUrlRules = (key: string): Rule[] =>
  each([key], (v, _k, c) => {
    const why = urlProblem(v, imageSchemes(c));
    if (why) return `${q(v)} ${why}`;
    const s3 = s3SourceProblem(v);
    return s3 ? `${q(v)}${s3}` : undefined;
  });

export const IMAGE_RULES: readonly Rule[] = Object.freeze([
  ...sourceUrlRules("windowsImageUrl"),
  {
    key: "windowsImageUrl",
    check: (c) => {
      const v = str(c, "windowsImageUrl");
      if (v === undefined || urlProblem(v, imageSchemes(c)) || s3SourceProblem(v) || c.format) return undefined;
      return `${q(v)} does not end in .vhdx, .qcow2 or .iso, so its format is unknown. Fix: point at a .vhdx, .qcow2 or .iso file.`;
    },
  },
  ...each(["windowsImageUrl"], (v) =>
    v.length > TAG_VALUE_MAX
      ? `is ${v.length} characters long; the AMI's SourceImage tag carries it, and an EC2 tag value holds at most ${TAG_VALUE_MAX}. Fix: copy the image to a shorter URL (at most ${TAG_VALUE_MAX} characters).`
      : undefined,
  ),
  ...each(["windowsImageSha256", "virtioIsoSha256"], (v) =>
    /^[0-9a-f]{64}$/i.test(v)
      ? undefined
      : `${q(v)} is not a SHA-256 (64 hex digits). Fix: sha256sum the file and paste the hash.`,
  ),
  ...sourceUrlRules("virtioIsoUrl"),
  ...sourceUrlRules("openSshZipUrl"),
  ...each(["openSshZipUrl"], (v, _k, c) =>
    !urlProblem(v, imageSchemes(c)) && !/\.zip$/i.test(new URL(v).pathname)
      ? `${q(v)} is not a .zip. Fix: the OpenSSH-ARM64.zip release asset.`
      : undefined,
  ),
  {
    key: "openSshZipSha256",
    check: (c) => {
      const url = str(c, "openSshZipUrl");
      const sha = str(c, "openSshZipSha256");
      if (url !== undefined && sha === undefined)
        return `is required with openSshZipUrl. Fix: sha256sum the zip and paste the hash.`;
      if (url === undefined && sha !== undefined)
        return `is set but openSshZipUrl is not. Fix: set openSshZipUrl too, or unset this.`;
      if (sha !== undefined && !/^[0-9a-f]{64}$/i.test(sha))
        return `${q(sha)} is not a SHA-256 (64 hex digits). Fix: sha256sum the zip.`;
      return undefined;
    },
  },
  {
    key: "openSshZipUrl",
    level: "warn",
    check: (c) => {
      const image = str(c, "windowsImageUrl");
      if (image === undefined || c.tainted.has("windowsImageUrl") || !c.format || str(c, "openSshZipUrl") !== undefined)
        return undefined;
      return FLIGHTED_IMAGE_NAME.test(urlPath(image))
        ? `is not set, but windowsImageUrl ${q(image)} names an Insider/flighted build, where the OpenSSH capability from Windows Update is known to fail (0x800f0954), so the guest may never answer SSH. Fix: set openSshZipUrl and openSshZipSha256 to a Win32-OpenSSH OpenSSH-ARM64.zip release.`
        : undefined;
    },
  },
  ...each(["windowsVersion"], (v) =>
    (WINDOWS_VERSIONS as readonly string[]).includes(v)
      ? undefined
      : `${q(v)} is not a known release. Fix: use one of ${WINDOWS_VERSIONS.join(", ")}.`,
  ),
  {
    key: "windowsVersion",
    check: (c) => {
      const h = c.hostType;
      const w = c.windowsVersion;
      if (!c.isAws || !h || !w || !NEEDS_ATOMICS.includes(w) || h.lseAtomics) return undefined;
      return `Windows ${w} needs ARMv8.1 LSE atomics, but ${h.name} is ${h.cpu}, ${h.armArch}: it cannot boot there. Fix: use Windows 10, 11-22h2 or 11-23h2 on ${h.name}, or set hostInstanceType to a Graviton2 or later type (${typesWithAtomics().slice(0, 4).join(", ")}, ...).`;
    },
  },
]);

// ---------------------------------------------------------------- VM

export const VM_RULES: readonly Rule[] = Object.freeze([
  {
    key: "vmCpus",
    check: (c) => {
      const cpus = int(c, "vmCpus");
      const h = c.hostType;
      if (cpus === undefined) return undefined;
      if (cpus < 1) return `${cpus} is less than 1. Fix: use 1 to ${h?.cores ?? 4}.`;
      if (c.isAws && h && cpus > h.cores)
        return `${cpus} is more than the ${h.cores} cores of ${h.name}. Fix: use at most ${h.cores}.`;
      if (c.isAws && h?.generation === 1 && cpus > GRAVITON1_SAFE_CPUS && !bool(c, "allowUnsafeCpuCount"))
        return `${cpus} vCPUs on Graviton1 (${h.name}) crash Windows with CLOCK_WATCHDOG_TIMEOUT (interrupts arrive late). Fix: use ${GRAVITON1_SAFE_CPUS} or fewer, or set allowUnsafeCpuCount: true to try anyway.`;
      return undefined;
    },
  },
  {
    key: "vmMemoryGiB",
    check: (c) => {
      const m = int(c, "vmMemoryGiB");
      const h = c.hostType;
      if (m === undefined) return undefined;
      if (m < 4) return `${m} GiB is below the 4 GiB Windows 11 needs. Fix: use at least 4.`;
      if (c.isAws && h && m > h.memoryGiB - HOST_RESERVED_GIB)
        return `${m} GiB leaves less than ${HOST_RESERVED_GIB} GiB of ${h.name}'s ${h.memoryGiB} GiB to the host. Fix: use at most ${h.memoryGiB - HOST_RESERVED_GIB}.`;
      return undefined;
    },
  },
  ...each(["vmMachineOptions"], (v) =>
    /^[A-Za-z0-9=,._-]*$/.test(v)
      ? undefined
      : `${q(v)} has characters QEMU options never use (spaces, quotes, ...). Fix: comma-separated key=value pairs, e.g. gic-version=max,its=off.`,
  ),
  {
    key: "vmDiskGiB",
    check: (c) => {
      const d = int(c, "vmDiskGiB");
      const vol = int(c, "hostVolumeGiB");
      if (d === undefined) return undefined;
      if (d < 64) return `${d} GiB is below the 64 GiB Windows 11 needs. Fix: use at least 64.`;
      if (c.isAws && vol !== undefined && c.format === "iso" && d > vol - 20)
        return `${d} GiB does not fit on the ${vol} GiB host volume with the ISO. Fix: raise hostVolumeGiB to ${d + 20} or more.`;
      return undefined;
    },
  },
  {
    key: "vmBuildletPort",
    check: (c) => {
      const p = int(c, "vmBuildletPort");
      if (p === undefined) return undefined;
      if (p < 1 || p > 65535 || p === 22)
        return `${p} is not a usable port (1-65535, not 22, which the host's sshd uses). Fix: e.g. 443.`;
      const taken = HOST_PORTS.find((h) => h.port === p);
      return taken
        ? `${p} is ${taken.what} on the host, so the buildlet's forward would collide with it (the host uses ${HOST_PORTS.map((h) => h.port).join(", ")}). Fix: e.g. 443.`
        : undefined;
    },
  },
]);

// ---------------------------------------------------------------- guest

const timeZoneById = new Map(WINDOWS_TIME_ZONES.map((z) => [z.toLowerCase(), z]));

function downloadRules(d: (typeof DOWNLOADS)[number]): Rule[] {
  const { switchKey, urlKey, shaKey } = d;
  return [
    ...each([urlKey], (v) => {
      const why = urlProblem(v, ["https"]);
      return why ? `${q(v)} ${why} (the guest downloads it itself)` : undefined;
    }),
    ...each([shaKey], (v) =>
      /^[0-9a-f]{64}$/i.test(v)
        ? undefined
        : `${q(v)} is not a SHA-256 (64 hex digits). Fix: sha256sum the file and paste the hash.`,
    ),
    {
      key: urlKey,
      check: (c) =>
        maybe(c, switchKey) === true && str(c, urlKey) === undefined
          ? `is required while ${switchKey} is true. Fix: set it, or set ${switchKey}: false.`
          : undefined,
    },
    {
      key: shaKey,
      check: (c) => {
        const on = maybe(c, switchKey);
        const url = str(c, urlKey);
        const sha = str(c, shaKey);
        if (on === false || sha !== undefined) {
          return on === undefined && url === undefined && sha !== undefined
            ? `is set but ${urlKey} is not. Fix: set ${urlKey} too, or unset this.`
            : undefined;
        }
        if (on === true)
          return `is required while ${switchKey} is true: every download is verified. Fix: set it, or set ${switchKey}: false.`;
        return url !== undefined
          ? `is required with ${urlKey}: every download is verified. Fix: set it, or set ${switchKey}: false.`
          : undefined;
      },
    },
    {
      key: urlKey,
      level: "warn",
      check: (c) =>
        maybe(c, switchKey) === false && str(c, urlKey) !== undefined
          ? `is set but ${switchKey} is false, so it is not installed. Fix: unset ${switchKey} (or set it to true) to install it, or unset ${urlKey}.`
          : undefined,
    },
  ];
}

export const GUEST_RULES: readonly Rule[] = Object.freeze([
  {
    key: "guestAdminUser",
    check: (c) => {
      const u = str(c, "guestAdminUser") ?? "gopher";
      if (u.length > USER_NAME_MAX)
        return `${q(u)} is longer than ${USER_NAME_MAX} characters, Windows' limit for user names. Fix: e.g. gopher.`;
      const forbidden = [...new Set([...u].filter((ch) => USER_NAME_FORBIDDEN.test(ch)))];
      if (forbidden.length)
        return `${q(u)} holds ${forbidden.join(" ")}, which Windows user names may not ("/\\[]:;|=,+*?<>@). Fix: e.g. gopher.`;
      if (RESERVED_USER_NAMES.includes(u.toLowerCase()))
        return `${q(u)} is a built-in Windows account, group or principal, so the answer file cannot create it (not Administrator, Guest, DefaultAccount, WDAGUtilityAccount, SYSTEM, Everyone, ...). Fix: e.g. gopher.`;
      if (u.endsWith(".")) return `${q(u)} ends with a period, which Windows refuses in user names. Fix: e.g. gopher.`;
      if (!/^[A-Za-z0-9][A-Za-z0-9._-]{0,19}$/.test(u))
        return `${q(u)} is not a usable Windows user name (1-20 letters, digits, . _ -; not Administrator). Fix: e.g. gopher.`;
      return undefined;
    },
  },
  ...each(["guestLocale"], (v) =>
    /^[a-z]{2,3}-[A-Z]{2}$/.test(v) ? undefined : `${q(v)} is not a locale name. Fix: e.g. en-US or de-DE.`,
  ),
  ...each(["guestTimeZone"], (v) => {
    if (WINDOWS_TIME_ZONES.includes(v)) return undefined;
    const exact = timeZoneById.get(v.toLowerCase());
    if (exact) return `${q(v)} is spelled differently from the Windows time zone id ${q(exact)}. Fix: use ${q(exact)}.`;
    const near = closest(v, WINDOWS_TIME_ZONES);
    const iana = /^[A-Za-z]+\/[A-Za-z_]+/.test(v) ? " IANA names such as Europe/Berlin are not Windows ids." : "";
    return `${q(v)} is not a Windows time zone id.${iana}${near ? ` Did you mean ${q(near)}?` : ""} Fix: e.g. UTC or "Pacific Standard Time" (tzutil /l lists them; infra/windowsTimeZones.json has the list).`;
  }),
  {
    key: "windowsEdition",
    check: (c) => {
      const e = str(c, "windowsEdition") ?? "Windows 11 Pro";
      return e.trim() === "" || e.length > 128 ? `is empty or too long. Fix: e.g. "Windows 11 Pro".` : undefined;
    },
  },
  {
    key: "windowsProductKey",
    check: (c) => {
      const k = c.raw["windowsProductKey"];
      return k !== undefined && k !== "" && !PRODUCT_KEY.test(k.trim())
        ? `is not a product key: five groups of five characters from BCDFGHJKMNPQRTVWXY2346789, joined by dashes (XXXXX-XXXXX-XXXXX-XXXXX-XXXXX). Fix: pulumi config set --secret windowsProductKey <key>, or unset it to use the edition's generic key.`
        : undefined;
    },
  },
  ...DOWNLOADS.flatMap(downloadRules),
  ...each(["buildletEnv"], (v) =>
    /^[a-z0-9-]{1,63}$/.test(v)
      ? undefined
      : `${q(v)} is not a builder env name (1 to 63 lowercase letters, digits and dashes). Fix: e.g. ${STAGE0_WINDOWS_ARM64_ENV}.`,
  ),
  {
    key: "buildletEnv",
    level: "warn",
    check: (c) => {
      const v = str(c, "buildletEnv");
      return v !== undefined && /^[a-z0-9-]{1,63}$/.test(v) && v !== STAGE0_WINDOWS_ARM64_ENV
        ? `${q(v)}: current buildlet stage0 accepts only ${STAGE0_WINDOWS_ARM64_ENV} on windows/arm64 and panics on anything else; an older or self-built stage0 may accept it. Fix: use ${STAGE0_WINDOWS_ARM64_ENV} unless your stage0 knows this env.`
        : undefined;
    },
  },
  {
    key: "buildletEnv",
    check: (c) =>
      c.installs.buildlet && str(c, "buildletEnv") === undefined
        ? `is required while the buildlet is installed: stage0 panics on windows/arm64 without GO_BUILDER_ENV. Fix: set buildletEnv: ${STAGE0_WINDOWS_ARM64_ENV}, or set guestInstallBuildlet: false.`
        : undefined,
  },
  {
    key: "vsVersion",
    check: (c) => {
      const v = str(c, "vsVersion") ?? "2022";
      if (!(VS_VERSIONS as readonly string[]).includes(v))
        return `${q(v)} is not a VS Build Tools version. Fix: use one of ${VS_VERSIONS.join(", ")}.`;
      if (c.installs.vsBuildTools && c.windowsVersion === "10" && !VS_FOR_WINDOWS_10.includes(v as VsVersion))
        return `VS ${v} Build Tools do not support Windows 10 on ARM64 (VS 2022 and later need Windows 11 there). Fix: set vsVersion: 2019, or use a Windows 11 image, or set guestInstallVsBuildTools: false.`;
      return undefined;
    },
  },
]);

// ---------------------------------------------------------------- AMI and tags

const userTagLimit = EC2_MAX_TAGS - STACK_TAG_KEYS.length;

export const AMI_RULES: readonly Rule[] = Object.freeze([
  ...each(["bakeInstanceType"], (v) => {
    const why = gravitonTypeProblem(v);
    if (why === "family" || why === "form")
      return `${q(v)} is not an arm64 (Graviton) instance type, so the arm64 AMI cannot boot on it (x86 types never can). Fix: use ${gravitonCounterpart(v)} or another Graviton type (families ${GRAVITON_FAMILIES.map((f) => f.family).join(", ")}).`;
    if (why === "size") {
      const fam = findGravitonFamily(v.split(".")[0]);
      return `${q(v)} is not a size of ${fam?.family}. Fix: use one of ${fam?.sizes.map((z) => `${fam.family}.${z}`).join(", ")}.`;
    }
    return undefined;
  }),
  {
    key: "amiVolumeGiB",
    check: (c) => {
      const v = int(c, "amiVolumeGiB");
      return v !== undefined && (v < 16 || v > 16384)
        ? `${v} GiB is out of range for the AMI's root volume. Fix: use 16 to 16384, or unset it to size the volume from the image.`
        : undefined;
    },
  },
  {
    key: "smokeTestTimeoutMinutes",
    check: (c) => {
      const v = int(c, "smokeTestTimeoutMinutes");
      return v !== undefined && (v < 10 || v > 240)
        ? `${v} minutes is out of range for the smoke test (a metal instance alone takes minutes to boot, and a longer bound only costs more when the VM never answers). Fix: use 10 to 240.`
        : undefined;
    },
  },
  {
    key: "tags",
    check: (c) => {
      const tags = (c.values["tags"] as Record<string, unknown> | undefined) ?? {};
      const out: string[] = [];
      const seen = new Map<string, string>();
      for (const [k, v] of Object.entries(tags)) {
        if (typeof v !== "string")
          out.push(`tag ${q(k)} has a ${typeof v} value; tag values are strings. Fix: quote it.`);
        else if (v.length > TAG_VALUE_MAX)
          out.push(`tag ${q(k)} value is longer than ${TAG_VALUE_MAX} characters. Fix: shorten it.`);
        else if (charsOutside(v, TAG_CHAR))
          out.push(
            `tag ${q(k)} value holds ${charsOutside(v, TAG_CHAR)}; IAM (the host role is tagged too) allows letters, digits, spaces and _.:/=+-@ only. Fix: replace them.`,
          );
        if (k.length === 0 || k.length > TAG_KEY_MAX)
          out.push(`tag key ${q(k)} must be 1 to ${TAG_KEY_MAX} characters. Fix: rename it.`);
        else if (/^aws:/i.test(k)) out.push(`tag key ${q(k)} uses the reserved aws: prefix. Fix: rename it.`);
        else if (charsOutside(k, TAG_CHAR))
          out.push(
            `tag key ${q(k)} holds ${charsOutside(k, TAG_CHAR)}; IAM allows letters, digits, spaces and _.:/=+-@ only. Fix: rename it.`,
          );
        const own = STACK_TAG_KEYS.find((s) => s.toLowerCase() === k.toLowerCase());
        if (own)
          out.push(
            `tag key ${q(k)} is one the stack sets itself (${STACK_TAG_KEYS.join(", ")}), so yours would be overwritten${own !== k ? " (IAM tag keys ignore case)" : ""}. Fix: rename it.`,
          );
        const twin = seen.get(k.toLowerCase());
        if (twin !== undefined)
          out.push(`tag keys ${q(twin)} and ${q(k)} differ only in case, which IAM refuses. Fix: keep one.`);
        else seen.set(k.toLowerCase(), k);
      }
      const n = Object.keys(tags).length;
      if (n > userTagLimit)
        out.push(
          `has ${n} tags; with the ${STACK_TAG_KEYS.length} the stack adds (${STACK_TAG_KEYS.join(", ")}) the AMI would carry more than EC2's ${EC2_MAX_TAGS}. Fix: use at most ${userTagLimit}.`,
        );
      return out;
    },
  },
]);

// ---------------------------------------------------------------- local target

/** What run-vm.sh, the env files and the stage commands carry in a path: no whitespace, quotes or backslashes. */
const LOCAL_DIR_CHAR = /[^\s'"\\]/;

export const LOCAL_RULES: readonly Rule[] = Object.freeze([
  ...each(["localWorkDir"], (v, _k, c) => {
    if (c.isAws) return undefined;
    const bad = charsOutside(v, LOCAL_DIR_CHAR);
    if (bad)
      return `${q(v)} holds ${bad}, which run-vm.sh, the VM env file or the stage commands refuse in a path (no whitespace, quotes or backslashes). Fix: e.g. .work/local.`;
    if (v.split("/").includes(".."))
      return `${q(v)} climbs out with "..": the folder must be where it is named (inside the project, or an absolute path without ..). Fix: e.g. .work/local.`;
    const resolved = path.resolve(c.machine.cwd, v);
    if (resolved === "/" || resolved === path.resolve(c.machine.cwd))
      return `${q(v)} is ${resolved === "/" ? "the filesystem root" : "the project folder itself"}; the VM files and artifacts need a folder of their own. Fix: e.g. .work/local.`;
    const socket = `${resolved}/vm/qmp.sock`;
    return Buffer.byteLength(socket) > MAX_SOCKET_PATH
      ? `resolves to ${resolved}, too deep for the VM's QMP socket ${socket} (a Unix socket path holds at most ${MAX_SOCKET_PATH} bytes). Fix: use a shorter path, e.g. /var/tmp/windows-arm64.`
      : undefined;
  }),
  {
    key: "vmCpus",
    check: (c) => {
      const cpus = int(c, "vmCpus");
      return !c.isAws && cpus !== undefined && cpus > c.machine.cpus
        ? `${cpus} vCPUs is more than the ${c.machine.cpus} CPUs of this machine, where the local target runs the VM. Fix: use at most ${c.machine.cpus}.`
        : undefined;
    },
  },
  {
    key: "vmMemoryGiB",
    check: (c) => {
      const m = int(c, "vmMemoryGiB");
      const most = Math.floor(c.machine.memoryGiB - HOST_RESERVED_GIB);
      return !c.isAws && m !== undefined && m >= 4 && m > most
        ? `${m} GiB leaves less than ${HOST_RESERVED_GIB} GiB of this machine's ${c.machine.memoryGiB.toFixed(1)} GiB, where the local target runs the VM. Fix: use at most ${Math.max(most, 0)}${most < 4 ? " (this machine has too little memory for Windows: use the aws target)" : ""}.`
        : undefined;
    },
  },
]);

/** Every area's rules, in the order their messages are listed. */
export const RULE_SETS: Readonly<Record<string, readonly Rule[]>> = Object.freeze({
  host: HOST_RULES,
  artifacts: ARTIFACT_RULES,
  image: IMAGE_RULES,
  vm: VM_RULES,
  guest: GUEST_RULES,
  ami: AMI_RULES,
  local: LOCAL_RULES,
});
