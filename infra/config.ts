/**
 * Reads and validates the stack configuration. `validateConfig` is pure: it
 * takes the raw strings Pulumi stores and returns either a typed, frozen
 * config or every problem found, each naming the key, what is wrong and the
 * fix (plus warnings, which do not stop the stack). The rules live in tables
 * by area in configRules.ts; `loadConfig` reads Pulumi's config, logs the
 * warnings and throws one error listing every problem before any resource is
 * declared.
 */
import * as os from "os";
import * as pulumi from "@pulumi/pulumi";
import { closest } from "./configChecks";
import {
  Ctx,
  DOWNLOADS,
  DownloadName,
  ImageFormat,
  Machine,
  Rule,
  RULE_SETS,
  Target,
  TEXT_RULES,
  VsVersion,
  WINDOWS_VERSIONS,
  WindowsVersion,
} from "./configRules";
import { CONFIG_KEYS, KeySpec, PROJECT, VARIANT_KEYS, VARIANT_REQUIRED } from "./configSchema";
import { findHostType, HostType } from "./hostTypes";
import { ImageCompression } from "./manifest";

export {
  FLIGHTED_IMAGE_NAME,
  GRAVITON1_SAFE_CPUS,
  HOST_RESERVED_GIB,
  STACK_TAG_KEYS,
  STAGE0_WINDOWS_ARM64_ENV,
  VS_VERSIONS,
  WINDOWS_TIME_ZONES,
  WINDOWS_VERSIONS,
} from "./configRules";
export type { ImageFormat, Machine, Target, VsVersion, WindowsVersion } from "./configRules";
export {
  bucketNameProblem,
  cidrProblem,
  folderUriProblem,
  publicKeyProblem,
  s3KeyProblem,
  urlCredentials,
  urlProblem,
} from "./configChecks";

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
    /** How the published disk.qcow2 stores its clusters (imageCompression). */
    compression: ImageCompression;
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
    /** VHDX/qcow2 sources: the answer file is written into the image's Windows\Panther. */
    answerFileInImage: boolean;
  };
  vm: {
    cpus: number;
    memoryGiB: number;
    machineOptions: string;
    diskGiB: number;
    buildletPort: number;
  };
  guest: GuestConfig;
  /** The smoke test of each baked AMI before it is promoted. */
  smokeTest: { enabled: boolean; timeoutMinutes: number };
  retainAmiOnDelete: boolean;
  tags: Record<string, string>;
  /** Which secret keys are set (their values are read as Pulumi secrets, never here). */
  secretsSet: { sshPrivateKey: boolean; windowsProductKey: boolean };
  /**
   * The image matrix, when `images` is set: one full config per variant (its artifacts.prefix is
   * `<artifactPrefix><name>/`). The settings the variants share (target, artifacts, network,
   * tags, lifecycle) are the same in each and in this config, which otherwise mirrors the first variant.
   */
  images?: readonly ImageVariant[];
}

/** One variant of the image matrix: its name (DNS-safe, unique) and its whole validated config. */
export interface ImageVariant {
  name: string;
  config: StackConfig;
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

/** This machine, where the local target runs its VM. */
export function thisMachine(): Machine {
  return { cpus: os.cpus().length, memoryGiB: os.totalmem() / 2 ** 30, cwd: process.cwd() };
}

/**
 * Parses, defaults and validates every key; returns all problems (and warnings) at once.
 * `machine` is where the local target's VM would run (default: this machine).
 */
export function validateConfig(
  raw: RawConfig,
  storedAsSecret: ReadonlySet<string> = new Set(),
  machine: Machine = thisMachine(),
): { config?: StackConfig; problems: Problem[]; warnings: Problem[] } {
  const stack = validateKeys(raw, storedAsSecret, machine);
  const list = stack.ctx.values["images"];
  if (list === undefined || stack.ctx.tainted.has("images")) {
    const { problems, warnings } = stack;
    if (problems.length > 0) return { problems, warnings };
    return { config: deepFreeze(buildConfig(stack.ctx)), problems, warnings };
  }
  return validateMatrix(raw, storedAsSecret, machine, stack, list as unknown[]);
}

/** Every key of one flat config (the stack's, or one variant's merged onto it), with the rules. */
function validateKeys(
  raw: RawConfig,
  storedAsSecret: ReadonlySet<string>,
  machine: Machine,
): { ctx: Ctx; problems: Problem[]; warnings: Problem[] } {
  const problems: Problem[] = [];
  const warnings: Problem[] = [];
  const add = (key: string, message: string) => problems.push({ key, message });
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

  // Types and defaults. A key whose value does not parse is not checked further.
  const values: Record<string, unknown> = {};
  const tainted = new Set<string>();
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
    if ("error" in parsed) {
      add(spec.key, `${shown(spec, text)} ${parsed.error}`);
      tainted.add(spec.key);
    } else values[spec.key] = parsed.value;
  }

  const target = ((values["target"] as string | undefined) ?? "aws") as Target;
  if (target !== "aws" && target !== "local") {
    add("target", `${JSON.stringify(target)} is not a target. Fix: set target to aws or local.`);
  }
  const isAws = target === "aws";
  // With images, each variant names its own image (checked per variant).
  const matrix = values["images"] !== undefined || tainted.has("images");
  for (const spec of CONFIG_KEYS) {
    if (values[spec.key] !== undefined || tainted.has(spec.key)) continue;
    if (matrix && VARIANT_REQUIRED.includes(spec.key)) continue;
    if (spec.requiredFor === "all" || (spec.requiredFor === "aws" && isAws)) {
      add(spec.key, `is required but not set. Fix: pulumi config set ${spec.key} <value> (${spec.description})`);
    }
  }

  // What the rules share, derived from the values.
  const str = (k: string) => (tainted.has(k) ? undefined : (values[k] as string | undefined));
  const ctx = (): Ctx => {
    const imageUrl = str("windowsImageUrl");
    const windowsVersion = str("windowsVersion");
    const installs = Object.fromEntries(
      DOWNLOADS.map((d) => {
        const on = values[d.switchKey] as boolean | undefined;
        return [d.name, on === true || (on === undefined && str(d.urlKey) !== undefined)];
      }),
    ) as Record<DownloadName, boolean>;
    return {
      raw,
      values,
      target,
      isAws,
      hostType: findHostType(str("hostInstanceType") ?? "a1.metal"),
      format: imageUrl === undefined ? undefined : imageFormatOf(imageUrl),
      windowsVersion: (WINDOWS_VERSIONS as readonly string[]).includes(windowsVersion ?? "")
        ? (windowsVersion as WindowsVersion)
        : undefined,
      installs,
      machine,
      tainted,
    };
  };
  const run = (rules: readonly Rule[], c: Ctx) => {
    for (const rule of rules) {
      if (tainted.has(rule.key)) continue;
      const out = rule.check(c);
      const messages = out === undefined ? [] : Array.isArray(out) ? out : [out];
      for (const message of messages) {
        if (rule.level === "warn") warnings.push({ key: rule.key, message });
        else problems.push({ key: rule.key, message });
      }
    }
  };
  // Text first: a refused value (a control character, a credential, ...) taints its key for every later rule.
  const textCtx = ctx();
  for (const rule of TEXT_RULES) {
    const before = problems.length;
    run([rule], textCtx);
    if (problems.length > before) tainted.add(rule.key);
  }
  const c = ctx();
  for (const rules of Object.values(RULE_SETS)) run(rules, c);
  return { ctx: c, problems, warnings };
}

/** The typed config, from values that passed every rule. */
function buildConfig(c: Ctx): StackConfig {
  const v = c.values;
  const str = (k: string) => v[k] as string | undefined;
  const num = (k: string) => v[k] as number;
  const bool = (k: string) => v[k] === true;
  const sha = (k: string) => (str(k) as string).toLowerCase();
  const download = (name: DownloadName): Download | undefined => {
    const d = DOWNLOADS.find((x) => x.name === name) as (typeof DOWNLOADS)[number];
    return c.installs[name] ? { url: str(d.urlKey) as string, sha256: sha(d.shaKey) } : undefined;
  };
  const amiVolumeGiB = v["amiVolumeGiB"] as number | undefined;
  const openSshUrl = str("openSshZipUrl");
  const buildletEnv = str("buildletEnv");
  return {
    target: c.target,
    host: {
      instanceType: str("hostInstanceType") ?? "a1.metal",
      type: c.hostType as HostType,
      amiId: str("hostAmiId"),
      volumeGiB: num("hostVolumeGiB"),
      volumeIops: num("hostVolumeIops"),
      volumeThroughputMiBps: num("hostVolumeThroughputMiBps"),
      subnetId: str("hostSubnetId"),
      sshAllowedCidrs: (v["sshAllowedCidrs"] as string[] | undefined) ?? [],
      sshAuthorizedKeys: ((v["sshAuthorizedKeys"] as string[] | undefined) ?? []).map((k) => k.trim()),
      keepRunning: bool("keepHostRunning"),
      idleMinutes: num("hostIdleMinutes"),
    },
    bake: {
      instanceType: str("bakeInstanceType") ?? "c7g.large",
      ...(amiVolumeGiB !== undefined ? { volumeGiB: amiVolumeGiB } : {}),
    },
    artifacts: {
      bucketName: str("artifactBucketName"),
      prefix: str("artifactPrefix") ?? "windows-arm64/",
      noncurrentDays: num("artifactNoncurrentDays"),
      uri: str("artifactUri"),
      endpointUrl: str("artifactEndpointUrl"),
      compression: (str("imageCompression") ?? "none") as ImageCompression,
    },
    localWorkDir: str("localWorkDir") ?? ".work/local",
    image: {
      url: str("windowsImageUrl") as string,
      sha256: sha("windowsImageSha256"),
      format: c.format as ImageFormat,
      windowsVersion: c.windowsVersion as WindowsVersion,
      virtioUrl: str("virtioIsoUrl") as string,
      virtioSha256: sha("virtioIsoSha256"),
      ...(openSshUrl ? { openSshZip: { url: openSshUrl, sha256: sha("openSshZipSha256") } } : {}),
      answerFileInImage: bool("answerFileInImage"),
    },
    vm: {
      cpus: num("vmCpus"),
      memoryGiB: num("vmMemoryGiB"),
      machineOptions: str("vmMachineOptions") ?? "",
      diskGiB: num("vmDiskGiB"),
      buildletPort: num("vmBuildletPort"),
    },
    guest: {
      adminUser: str("guestAdminUser") ?? "gopher",
      locale: str("guestLocale") ?? "en-US",
      timeZone: str("guestTimeZone") ?? "UTC",
      edition: str("windowsEdition") ?? "Windows 11 Pro",
      autoLogon: bool("guestAutoLogon"),
      disableWindowsUpdate: bool("guestDisableWindowsUpdate"),
      disableErrorReportingUi: bool("guestDisableErrorReportingUi"),
      disableUac: bool("guestDisableUac"),
      disableFirewall: bool("guestDisableFirewall"),
      disableDefenderRealtime: bool("guestDisableDefenderRealtime"),
      disableServices: bool("guestDisableServices"),
      buildlet: download("buildlet"),
      llvmMingw: download("llvmMingw"),
      vsBuildTools: download("vsBuildTools"),
      ...(c.installs.buildlet && buildletEnv !== undefined ? { buildletEnv } : {}),
      vsVersion: (str("vsVersion") ?? "2022") as VsVersion,
    },
    smokeTest: { enabled: bool("smokeTest"), timeoutMinutes: num("smokeTestTimeoutMinutes") },
    retainAmiOnDelete: bool("retainAmiOnDelete"),
    tags: (v["tags"] as Record<string, string> | undefined) ?? {},
    secretsSet: {
      sshPrivateKey: v["sshPrivateKey"] === true,
      windowsProductKey: v["windowsProductKey"] === true,
    },
  };
}

/** Like validateConfig, but throws a ConfigError listing every problem. */
export function parseConfig(
  raw: RawConfig,
  storedAsSecret: ReadonlySet<string> = new Set(),
  machine: Machine = thisMachine(),
): StackConfig {
  const { config, problems } = validateConfig(raw, storedAsSecret, machine);
  if (!config) throw new ConfigError(problems);
  return config;
}

// ---------------------------------------------------------------- image matrix

/** Longest variant name: it prefixes the variant's resource names (IAM names hold 64), S3 keys and AMI name. */
export const VARIANT_NAME_MAX = 24;
const VARIANT_NAME = /^[a-z0-9]([a-z0-9-]*[a-z0-9])?$/;

/** Why a variant name is not usable (not a short DNS label), or undefined. */
export function variantNameProblem(name: unknown): string | undefined {
  const fix = "Fix: e.g. win11-24h2.";
  if (typeof name !== "string") return `${JSON.stringify(name)} is not text. ${fix}`;
  if (name.length > VARIANT_NAME_MAX)
    return `${JSON.stringify(name)} is ${name.length} characters long; a variant name holds at most ${VARIANT_NAME_MAX} (it prefixes the variant's resource names, and IAM names hold 64). ${fix}`;
  return VARIANT_NAME.test(name)
    ? undefined
    : `${JSON.stringify(name)} is not DNS-safe: only lower-case letters, digits and hyphens, starting and ending with a letter or digit (it names the variant's resources, its folder in the bucket and its AMI). ${fix}`;
}

/** A variant's value as the string Pulumi would store for a stack key (null: unset). */
export function variantRawValue(v: unknown): string | undefined {
  if (v === null || v === undefined) return undefined;
  return typeof v === "string" ? v : JSON.stringify(v);
}

/**
 * The image matrix: every variant is its settings merged onto the stack's and validated with the
 * same rules (its artifact prefix is `<artifactPrefix><name>/`). A variant's problem is named
 * `images[i].<key>`; one it inherits unchanged from the stack is named once, by the stack's key. A
 * stack problem of a key a variant may set is reported only if some variant inherits it.
 */
function validateMatrix(
  raw: RawConfig,
  storedAsSecret: ReadonlySet<string>,
  machine: Machine,
  stack: { ctx: Ctx; problems: Problem[]; warnings: Problem[] },
  list: unknown[],
): { config?: StackConfig; problems: Problem[]; warnings: Problem[] } {
  const problems: Problem[] = [];
  const warnings: Problem[] = [];
  const q = JSON.stringify;
  const overridable = new Set(VARIANT_KEYS);
  if (!stack.ctx.isAws) {
    problems.push({
      key: "images",
      message:
        "applies to the aws target only (each variant builds on its own metal host); the local target builds the stack's one image. Fix: unset images (pulumi config rm images), or set target to aws.",
    });
    return { problems: [...stack.problems, ...problems], warnings: stack.warnings };
  }
  if (list.length === 0)
    problems.push({
      key: "images",
      message: "is an empty list. Fix: list at least one variant, or unset images (pulumi config rm images).",
    });
  for (const k of VARIANT_REQUIRED) {
    if (raw[k] !== undefined && raw[k] !== "")
      problems.push({
        key: k,
        message: `is not used: with images set, every variant names its own image. Fix: unset it (pulumi config rm ${k}) and set ${k} in each variant.`,
      });
  }
  const prefix = (stack.ctx.values["artifactPrefix"] as string | undefined) ?? "windows-arm64/";
  const prefixOk = !stack.problems.some((p) => p.key === "artifactPrefix");
  const usedProblems = new Set<number>();
  const usedWarnings = new Set<number>();
  const names = new Map<string, number>();
  const variants: ImageVariant[] = [];

  list.forEach((item, i) => {
    const at = (k: string) => `images[${i}].${k}`;
    if (typeof item !== "object" || item === null || Array.isArray(item)) {
      problems.push({
        key: `images[${i}]`,
        message: `${q(item)} is not a variant (an object of settings). Fix: e.g. {name: win11-24h2, windowsImageUrl: ..., windowsImageSha256: ..., windowsVersion: 11-24h2}.`,
      });
      return;
    }
    const v = item as Record<string, unknown>;
    const before = problems.length;
    const add = (k: string, message: string) => problems.push({ key: at(k), message });

    const name = v["name"];
    const nameWhy = variantNameProblem(name);
    if (name === undefined || name === null || name === "")
      add(
        "name",
        "is required: it names the variant's resources, its folder in the bucket and its entry in the images output. Fix: e.g. name: win11-24h2.",
      );
    else if (nameWhy) add("name", nameWhy);
    else {
      const first = names.get(name as string);
      if (first !== undefined)
        add("name", `${q(name)} repeats images[${first}].name; every variant needs its own. Fix: rename one.`);
      else names.set(name as string, i);
    }

    const own: RawConfig = {};
    for (const [k, value] of Object.entries(v)) {
      if (k === "name") continue;
      if (!overridable.has(k)) {
        if (CONFIG_KEYS.some((spec) => spec.key === k))
          add(
            k,
            `is a setting of the whole stack, which every variant shares; a variant sets only its image, host, vm* and guest* keys. Fix: move it out of images[${i}] (pulumi config set ${k} <value>).`,
          );
        else {
          const near = closest(k, ["name", ...VARIANT_KEYS]);
          add(
            k,
            `is not a setting a variant takes.${near ? ` Did you mean ${near}?` : ""} Fix: remove it${near ? ` or rename it to ${near}` : ""}.`,
          );
        }
        continue;
      }
      const text = variantRawValue(value);
      if (text !== undefined && text !== "") own[k] = text;
    }
    const missing = VARIANT_REQUIRED.filter((k) => own[k] === undefined);
    for (const k of missing)
      add(k, `is required in every variant (each names its own image). Fix: add ${k} to images[${i}].`);

    // The variant: the stack's values, the variant's own on top, its own folder in the bucket.
    const merged: RawConfig = { ...raw, images: undefined, ...own };
    const named = typeof name === "string" && nameWhy === undefined;
    if (named && prefixOk) merged["artifactPrefix"] = `${prefix}${name}/`;
    const res = validateKeys(merged, storedAsSecret, machine);
    const place = (p: Problem, stackList: Problem[], used: Set<number>, out: Problem[]) => {
      if (missing.includes(p.key)) return;
      if (p.key === "artifactPrefix" && named && prefixOk) {
        out.push({
          key: at("name"),
          message: `makes the variant's artifact prefix ${q(merged["artifactPrefix"])}, which ${p.message}`,
        });
        return;
      }
      if (!(p.key in own)) {
        const j = stackList.findIndex((s) => s.key === p.key && s.message === p.message);
        if (j >= 0) {
          used.add(j);
          return;
        }
      }
      out.push({ key: at(p.key), message: p.message });
    };
    for (const p of res.problems) place(p, stack.problems, usedProblems, problems);
    for (const w of res.warnings) place(w, stack.warnings, usedWarnings, warnings);
    if (problems.length === before && res.problems.length === 0)
      variants.push({ name: name as string, config: buildConfig(res.ctx) });
  });

  // A stack value a variant may set counts only where a variant inherits it.
  const kept = (list: Problem[], used: Set<number>) => list.filter((p, j) => !overridable.has(p.key) || used.has(j));
  const allProblems = [...kept(stack.problems, usedProblems), ...problems];
  const allWarnings = [...kept(stack.warnings, usedWarnings), ...warnings];
  if (allProblems.length > 0 || variants.length === 0) return { problems: allProblems, warnings: allWarnings };
  const first = variants[0].config;
  const config: StackConfig = { ...first, artifacts: { ...first.artifacts, prefix }, images: variants };
  return { config: deepFreeze(config), problems: allProblems, warnings: allWarnings };
}

// ---------------------------------------------------------------- helpers

function parseTyped(spec: KeySpec, text: string): { value: unknown } | { error: string } {
  switch (spec.type) {
    case "string":
      return { value: text };
    case "integer": {
      if (!/^-?\d+$/.test(text.trim())) return { error: `is not a whole number. Fix: e.g. ${spec.default || 1}.` };
      const n = Number(text.trim());
      if (!Number.isSafeInteger(n)) return { error: `is too large a number. Fix: e.g. ${spec.default || 1}.` };
      return { value: n };
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
