/**
 * Pure decisions about the AMI bake: the bake instance's user data, its IAM
 * policy, where it reports, how big the AMI's volume is and what a bake
 * costs. No Pulumi here, so tests read them as data.
 *
 * How the bake works: provisioning/bake-instance.sh (where Pulumi runs)
 * launches a small Graviton instance from the Ubuntu host AMI with the user
 * data below; cloud-init installs the host packages and the AWS CLI, writes
 * the scripts, the manifest and the image's env file to BAKE_DIR (tmpfs:
 * nothing of it stays in the AMI) and starts provisioning/bake-image.sh as a
 * transient systemd unit. That script fetches the published files, verifies
 * them, installs the launcher and the unit, generalizes, writes its status to
 * the status URI and powers off; bake-instance.sh reads the status once the
 * instance is stopped, and the AMI is taken from that stopped instance.
 */
import * as zlib from "zlib";
import { PolicyStatement } from "./hostSetup";

/** Repo-relative files the bake instance needs (pass them to renderBakeUserData). */
export const BAKE_FILES = Object.freeze([
  "provisioning/bake-image.sh",
  "provisioning/prepare-ami.sh",
  "provisioning/lib.sh",
  "provisioning/run-vm.sh",
  "assets/windows-vm.service",
]);

/**
 * Shell scripts installed into the image keep their header comment (the
 * launcher's --help prints it) as long as the user data fits with it; see
 * compactScript.
 */
export const BAKE_INSTALLED_SCRIPTS = Object.freeze(["provisioning/run-vm.sh"]);

/** Where the user data puts the files on the bake instance (/run is tmpfs: never in the AMI). */
export const BAKE_DIR = "/run/windows-image-bake";
/** The transient systemd unit that runs bake-image.sh (journal and console). */
export const BAKE_UNIT = "windows-image-bake";
/** EC2's user-data limit, in bytes before base64. */
export const USER_DATA_MAX_BYTES = 16384;

/**
 * Default instance type of the bake instance. The bake is a one-off
 * download of tens of GiB from S3 and the same amount written to its EBS
 * volume, plus the package installs: network and EBS throughput matter, CPU
 * and memory hardly. c7g.large (Graviton3, 2 vCPU, 4 GiB) bursts to 12.5
 * Gbit/s of network and 10 Gbit/s of EBS bandwidth, well above the gp3
 * volume's 125 MiB/s baseline, for a few cents an hour; t4g types are
 * cheaper but their EBS bandwidth (up to 2.78 Gbit/s) and CPU credits make a
 * long copy slower, and a1 is a previous generation. Any arm64 type works
 * (the Ubuntu AMI is arm64).
 */
export const DEFAULT_BAKE_INSTANCE_TYPE = "c7g.large";
/** On-demand price of DEFAULT_BAKE_INSTANCE_TYPE, Linux, us-east-1 (USD per hour, Jan 2026). */
export const DEFAULT_BAKE_INSTANCE_HOURLY_USD = 0.0725;
/** gp3 storage, us-east-1 (USD per GiB-month). */
export const GP3_USD_PER_GIB_MONTH = 0.08;

/** bake-instance.sh's bound (BAKE_TIMEOUT_S): boot, packages, the bake. */
export const DEFAULT_BAKE_TIMEOUT_S = 5400;
/**
 * bake-image.sh's own bound on the instance: shorter than
 * DEFAULT_BAKE_TIMEOUT_S by the boot and the package installs, so a hung
 * bake reports a status (naming what it waited for) before the operator's
 * side gives up.
 */
export const DEFAULT_BAKE_IMAGE_TIMEOUT_S = 4800;

const GIB = 1024 ** 3;
/** Ubuntu 24.04 with the host packages and the AWS CLI snap, rounded up. */
const OS_GIB = 8;
const MIN_HEADROOM_GIB = 4;
const HEADROOM_FRACTION = 0.1;

export interface BakeUserDataParams {
  /**
   * The published manifest (publish-image.sh's output line), manifestVersion
   * 2; the user data keeps manifestVersion, sha256, virtualSize, imageUri and
   * files[] (name, uri, sha256, size).
   */
  manifestJson: string;
  /** The image VM's env file (renderVmEnv(..., "image")): no VM_CONFIG_ISO. */
  imageEnv: string;
  /** Where bake-image.sh writes its status (bakeStatusUri). */
  statusUri: string;
  /** Repo-relative path -> content, for every path in BAKE_FILES. */
  files: Record<string, string>;
  /** Debian packages the image needs (HOST_PACKAGES). */
  packages: readonly string[];
  /** bake-image.sh's BAKE_TIMEOUT_S; default DEFAULT_BAKE_IMAGE_TIMEOUT_S. */
  timeoutS?: number;
  /** AWS region for the CLI on the instance (AWS_REGION, AWS_DEFAULT_REGION). */
  region?: string;
}

/** Content that must never be in user data (EC2 stores it in plain text). */
const SECRET_PATTERNS: readonly RegExp[] = [
  /-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----/,
  /aws_secret_access_key|AWS_SECRET_ACCESS_KEY=|AWS_SESSION_TOKEN=/,
  /<(Administrator)?Password>|<Value>[^<]*<\/Value>/,
];

/**
 * A shell script without its full-line comments (the shebang kept; with
 * keepHeader, also the comment block right after it). Code lines, and
 * comments after code, are kept as they are. It keeps the bake's user data
 * under EC2's limit; the scripts hold no heredoc, and a test runs the
 * compacted scripts.
 */
export function compactScript(text: string, keepHeader = false): string {
  const out: string[] = [];
  let header = true;
  for (const [i, line] of text.split("\n").entries()) {
    const comment = /^\s*#/.test(line);
    if (i === 0 && line.startsWith("#!")) {
      out.push(line);
      continue;
    }
    if (header && keepHeader && comment) {
      out.push(line);
      continue;
    }
    header = false;
    if (!comment) out.push(line);
  }
  return out.join("\n");
}

function lineShape(what: string, value: string, re: RegExp): void {
  if (!re.test(value)) throw new Error(`renderBakeUserData: ${what} '${value}' is not valid`);
}

/**
 * The bake instance's user data: a gzip-compressed cloud-init `#cloud-config`
 * document (cloud-init inflates gzip'd user data itself). The document is
 * JSON, which cloud-init's YAML loader reads as is (no quoting rules to get
 * wrong for script contents). It installs `packages` and the AWS CLI snap,
 * writes the files (shell scripts compacted by compactScript; the launcher
 * keeps its header unless only its removal makes the document fit), the
 * manifest and the env under BAKE_DIR, and runs
 * bake-image.sh as the transient unit BAKE_UNIT with its output on the
 * console (bake-instance.sh shows the console's tail when no status comes).
 * Deterministic for the same inputs. Throws when a file is missing, the env
 * ships the config ISO, anything looks like a secret, or the result is over
 * EC2's 16384-byte limit.
 */
export function renderBakeUserData(p: BakeUserDataParams): Buffer {
  for (const f of BAKE_FILES) {
    if (typeof p.files[f] !== "string") throw new Error(`renderBakeUserData: files is missing ${f}`);
  }
  for (const f of Object.keys(p.files)) {
    lineShape("file path", f, /^(?!.*(^|\/)\.\.?(\/|$))[A-Za-z0-9._/-]+$/);
  }
  let manifest: unknown;
  try {
    manifest = JSON.parse(p.manifestJson);
  } catch {
    throw new Error("renderBakeUserData: manifestJson is not JSON");
  }
  const m = (manifest ?? {}) as Record<string, unknown>;
  if (!Array.isArray(m.files) || m.files.length === 0) {
    throw new Error("renderBakeUserData: the manifest has no files[] (publish-image.sh's manifestVersion 2 is needed)");
  }
  // Only what bake-image.sh reads (the rest of the manifest stays in the bucket).
  const bakeManifest = {
    manifestVersion: m.manifestVersion,
    sha256: m.sha256,
    virtualSize: m.virtualSize,
    imageUri: m.imageUri,
    files: (m.files as Array<Record<string, unknown>>).map((f) => ({
      name: f.name,
      uri: f.uri,
      sha256: f.sha256,
      size: f.size,
    })),
  };
  if (/^\s*VM_CONFIG_ISO=\S/m.test(p.imageEnv)) {
    throw new Error("renderBakeUserData: imageEnv sets VM_CONFIG_ISO; the answer-file media must not ship in the AMI");
  }
  lineShape("statusUri", p.statusUri, /^(s3:\/\/[a-z0-9][a-z0-9.-]*\/|file:\/\/\/)[A-Za-z0-9._~%/+-]+\.json$/);
  const timeoutS = p.timeoutS ?? DEFAULT_BAKE_IMAGE_TIMEOUT_S;
  if (!Number.isInteger(timeoutS) || timeoutS < 60) {
    throw new Error(`renderBakeUserData: timeoutS ${timeoutS} must be a whole number of seconds, at least 60`);
  }
  if (p.region !== undefined) lineShape("region", p.region, /^[a-z]{2}(-[a-z]+)+-\d+$/);
  for (const pkg of p.packages) lineShape("package", pkg, /^[a-z0-9][a-z0-9+.-]*$/);

  const at = (rel: string) => `${BAKE_DIR}/${rel}`;
  // The launcher's header goes only when the document would not fit with it.
  const attempt = (keepHeaders: boolean) => {
    const writeFiles = [
      ...Object.keys(p.files)
        .sort()
        .map((rel) => ({
          path: at(rel),
          owner: "root:root",
          permissions: rel.endsWith(".sh") ? "0755" : "0644",
          content: rel.endsWith(".sh")
            ? compactScript(p.files[rel], keepHeaders && BAKE_INSTALLED_SCRIPTS.includes(rel))
            : p.files[rel],
        })),
      {
        path: at("manifest.json"),
        owner: "root:root",
        permissions: "0644",
        content: JSON.stringify(bakeManifest) + "\n",
      },
      { path: at("image.env"), owner: "root:root", permissions: "0644", content: p.imageEnv },
    ];
    const env = [`BAKE_STATUS_URI=${p.statusUri}`, `BAKE_TIMEOUT_S=${timeoutS}`];
    if (p.region) env.push(`AWS_REGION=${p.region}`, `AWS_DEFAULT_REGION=${p.region}`);
    const doc = {
      package_update: true,
      package_upgrade: false,
      packages: [...p.packages],
      write_files: writeFiles,
      runcmd: [
        // AWS CLI v2 is a snap on Ubuntu 24.04; retry since the store can be slow right after boot.
        ["bash", "-c", "for i in 1 2 3 4 5; do snap install aws-cli --classic && break; sleep 10; done"],
        [
          "systemd-run",
          `--unit=${BAKE_UNIT}`,
          "--no-block",
          "--property=StandardOutput=journal+console",
          "--property=StandardError=journal+console",
          ...env.map((e) => `--setenv=${e}`),
          "/bin/bash",
          at("provisioning/bake-image.sh"),
          at("manifest.json"),
          at("image.env"),
        ],
      ],
      final_message: "windows-arm64-image bake instance: cloud-init done after $UPTIME seconds",
    };
    const text = "#cloud-config\n" + JSON.stringify(doc, null, 1) + "\n";
    for (const re of SECRET_PATTERNS) {
      if (re.test(text))
        throw new Error(`renderBakeUserData: the user data holds something that looks like a secret (${re})`);
    }
    return { text, gz: zlib.gzipSync(Buffer.from(text, "utf8"), { level: 9 }) };
  };
  let { text, gz } = attempt(true);
  if (gz.length > USER_DATA_MAX_BYTES) ({ text, gz } = attempt(false));
  if (gz.length > USER_DATA_MAX_BYTES) {
    throw new Error(
      `renderBakeUserData: the user data is ${gz.length} bytes gzip'd (${text.length} plain); EC2 takes at most ${USER_DATA_MAX_BYTES}`,
    );
  }
  return gz;
}

/**
 * The bake instance role's policy: read the published files under the
 * artifact prefix, write only its status under <prefix>bake-status/. No
 * listing, no delete, no s3:*, no "*" resource.
 */
export function bakePolicyDocument(bucketArn: string, prefix: string) {
  if (!/^arn:[a-z-]+:s3:::[a-z0-9][a-z0-9.-]*$/.test(bucketArn)) {
    throw new Error(`bakePolicyDocument: '${bucketArn}' is not an S3 bucket ARN`);
  }
  if (prefix !== "" && !prefix.endsWith("/")) throw new Error(`bakePolicyDocument: prefix '${prefix}' must end with /`);
  const statements: PolicyStatement[] = [
    { Sid: "ReadPublishedImage", Effect: "Allow", Action: ["s3:GetObject"], Resource: [`${bucketArn}/${prefix}*`] },
    {
      Sid: "WriteBakeStatus",
      Effect: "Allow",
      Action: ["s3:PutObject"],
      Resource: [`${bucketArn}/${prefix}bake-status/*`],
    },
  ];
  return { Version: "2012-10-17", Statement: statements };
}

/** `<artifactUri>bake-status/<token>.json` (a "/" is added to artifactUri when missing). */
export function bakeStatusUri(artifactUri: string, token: string): string {
  if (!/^(s3:\/\/[^/]+|file:\/\/\/)/.test(artifactUri)) {
    throw new Error(`bakeStatusUri: '${artifactUri}' is not an s3:// or file:/// URI`);
  }
  if (!/^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/.test(token)) {
    throw new Error(`bakeStatusUri: token '${token}' may hold only letters, digits, '.', '_' and '-'`);
  }
  const base = artifactUri.endsWith("/") ? artifactUri : `${artifactUri}/`;
  return `${base}bake-status/${token}.json`;
}

/**
 * Root volume of the bake instance, and so of the AMI, in GiB: the image's
 * virtual size (the qcow2 can grow to it inside the builder's volume), plus
 * the OS (Ubuntu with the host packages, 8 GiB), plus headroom of 10 % of the
 * virtual size but at least 4 GiB (qcow2 metadata, logs, the serial log),
 * rounded up to a whole GiB.
 */
export function defaultAmiVolumeGiB(virtualSizeBytes: number): number {
  if (!Number.isFinite(virtualSizeBytes) || virtualSizeBytes < 0) {
    throw new Error(`defaultAmiVolumeGiB: ${virtualSizeBytes} is not a size in bytes`);
  }
  const virt = virtualSizeBytes / GIB;
  return Math.ceil(virt + OS_GIB + Math.max(virt * HEADROOM_FRACTION, MIN_HEADROOM_GIB));
}

/** What one bake costs on paper: the instance for `hours` plus its gp3 volume for that time (USD). */
export function bakeCostUsd(
  volumeGiB: number,
  hours: number,
  hourlyUsd: number = DEFAULT_BAKE_INSTANCE_HOURLY_USD,
): number {
  return hours * hourlyUsd + (volumeGiB * GP3_USD_PER_GIB_MONTH * hours) / 730;
}
