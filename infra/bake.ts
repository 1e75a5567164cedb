/**
 * Pure decisions about the AMI bake: the bake instance's user data and kit, its IAM
 * policy, where it reports, how big the AMI's volume is and what a bake
 * costs. No Pulumi here, so tests read them as data.
 *
 * How the bake works: provisioning/bake-instance.sh (where Pulumi runs)
 * launches a small Graviton instance from the Ubuntu host AMI with the user
 * data below; cloud-init installs the host packages and the AWS CLI, writes
 * a bootstrap, the manifest and the image's env file to BAKE_DIR (tmpfs:
 * nothing of it stays in the AMI) and starts the bootstrap as a transient
 * systemd unit. The bootstrap fetches the bake kit (the scripts, one
 * content-addressed object under <prefix>bake-kit/, renderBakeKit), checks
 * its SHA-256, unpacks it beside itself and hands over to
 * provisioning/bake-image.sh. That script fetches the published files, verifies
 * them, installs the launcher and the unit, generalizes, writes its status to
 * the status URI and powers off; bake-instance.sh reads the status once the
 * instance is stopped, and the AMI is taken from that stopped instance.
 */
import * as crypto from "crypto";
import * as zlib from "zlib";
import { PolicyStatement, VM_USER_ADD } from "./hostSetup";

/** Repo-relative files the bake instance needs (pass them to renderBakeKit). */
export const BAKE_FILES = Object.freeze([
  "provisioning/bake-image.sh",
  "provisioning/prepare-ami.sh",
  "provisioning/lib.sh",
  "provisioning/run-vm.sh",
  "provisioning/imds-proxy.py",
  "assets/windows-vm.service",
]);

/** Where the user data and the kit put the files on the bake instance (/run is tmpfs: never in the AMI). */
export const BAKE_DIR = "/run/windows-image-bake";
/** The transient systemd unit that runs the bootstrap, then bake-image.sh (journal and console). */
export const BAKE_UNIT = "windows-image-bake";
/** EC2's user-data limit, in bytes before base64. */
export const USER_DATA_MAX_BYTES = 16384;
/**
 * What the bake's user data stays under (gzip'd): the bootstrap, the
 * manifest's few lines, the env and the package list, whatever the size of
 * the scripts (they travel in the kit).
 */
export const USER_DATA_BUDGET_BYTES = 4096;

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
  /** Where bake-image.sh (or the bootstrap, failing) writes its status (bakeStatusUri). */
  statusUri: string;
  /** Where renderBakeKit's body was uploaded (s3://bucket/<bakeKitKey>, or file:/// for tests), and its sha256. */
  kit: { uri: string; sha256: string };
  /** Debian packages the image needs (HOST_PACKAGES). */
  packages: readonly string[];
  /** bake-image.sh's BAKE_TIMEOUT_S; default DEFAULT_BAKE_IMAGE_TIMEOUT_S. */
  timeoutS?: number;
  /** AWS region for the CLI on the instance (AWS_REGION, AWS_DEFAULT_REGION). */
  region?: string;
}

/** Content that must never be in user data (EC2 stores it in plain text) or the kit. */
const SECRET_PATTERNS: readonly RegExp[] = [
  /-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----/,
  /aws_secret_access_key|AWS_SECRET_ACCESS_KEY=|AWS_SESSION_TOKEN=/,
  /<(Administrator)?Password>|<Value>[^<]*<\/Value>/,
];

/** The bake kit's document version (renderBakeKit). */
export const BAKE_KIT_VERSION = 1;

/**
 * The bootstrap the user data starts (BAKE_DIR/bake-bootstrap.sh): fetches
 * the kit from BAKE_KIT_URI (s3:// with the AWS CLI, honouring
 * S3_ENDPOINT_URL, 3 tries of at most 300 s, a missing object or a denied
 * read not retried; or file://),
 * refuses it unless its SHA-256 is BAKE_KIT_SHA256, unpacks its files with
 * python3 into its own folder (relative paths only) and execs
 * provisioning/bake-image.sh with manifest.json and image.env from that
 * folder. Before that hand-over every failure writes
 * {"status":"failed","stage":"bake kit","error":"...","finishedAt":"..."} to
 * BAKE_STATUS_URI and runs BAKE_POWEROFF_COMMAND (default systemctl
 * poweroff), as bake-image.sh does. Paths are relative to its own folder, so
 * it runs under a test root too.
 */
export const BAKE_BOOTSTRAP = `#!/usr/bin/env bash
# bake-bootstrap.sh - on the bake instance, from its user data: fetch the bake
# kit (renderBakeKit in infra/bake.ts), check it, unpack it here, run the bake.
# Usage: bake-bootstrap.sh (no arguments; manifest.json, image.env beside it)
# Env: BAKE_KIT_URI (s3://bucket/key or file:///path; 3 tries of at most 300 s),
#   BAKE_KIT_SHA256 (other content is refused), BAKE_STATUS_URI,
#   BAKE_POWEROFF_COMMAND (default systemctl poweroff), S3_ENDPOINT_URL; all
#   passed on to provisioning/bake-image.sh manifest.json image.env, exec'd
#   last. A failure before it writes {"status":"failed","stage":"bake kit",
#   "error":...} to BAKE_STATUS_URI and powers off. Log on stderr.
# Exit: bake-image.sh's; 1 failed; 2 bad BAKE_STATUS_URI (no status or power-off)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
kit=$here/bake-kit.json.gz
[[ ! -d /snap/bin || :$PATH: == *:/snap/bin:* ]] || PATH=$PATH:/snap/bin
aws=(aws)
[[ -z \${S3_ENDPOINT_URL:-} ]] || aws+=(--endpoint-url "$S3_ENDPOINT_URL")
log() { printf 'bake-bootstrap: %s\\n' "$*" >&2; }
# file:///abs/path -> /abs/path, percent-decoded; status 1 when malformed.
file_path() {
  local p=\${1#file://}
  [[ $1 == file:///* && $p != *\\\\* && \${p//%[0-9A-Fa-f][0-9A-Fa-f]/} != *%* && $p != *%00* ]] || return 1
  p=$(printf '%b.' "\${p//%/\\\\x}")
  p=\${p%.}
  [[ $p != *$'\\n'* && /$p/ != */../* ]] || return 1
  printf '%s\\n' "$p"
}
status=\${BAKE_STATUS_URI:-} spath=
case $status in
  s3://?*/?*) ;;
  file:///*) spath=$(file_path "$status") || status= ;;
  *) status= ;;
esac
[[ -n $status ]] || {
  log "error: BAKE_STATUS_URI '\${BAKE_STATUS_URI:-}' must be s3://bucket/key or file:///absolute/path"
  exit 2
}
uri=\${BAKE_KIT_URI:-} want=\${BAKE_KIT_SHA256:-} err=

# Every exit but the hand-over: status failed, power off.
on_exit() {
  local rc=$? j try
  trap '' TERM INT HUP
  trap - EXIT
  ((rc != 0)) || rc=1
  rm -f -- "$kit"
  err=\${err:-exited with status $rc}
  log "error: $err"
  j=\${err//\\\\/\\\\\\\\}
  j=\${j//\\"/\\\\\\"}
  j="{\\"status\\":\\"failed\\",\\"stage\\":\\"bake kit\\",\\"error\\":\\"\${j//[[:cntrl:]]/ }\\",\\"finishedAt\\":\\"$(date -u +%FT%TZ)\\"}"
  if [[ -n $spath ]]; then
    { mkdir -p -- "\${spath%/*}" && printf '%s\\n' "$j" >"$spath"; } || log "error: cannot write $spath"
  else
    for try in 1 2 3; do
      printf '%s\\n' "$j" | timeout 60 "\${aws[@]}" s3 cp --only-show-errors - "$status" && break
      log "writing the status to $status failed (attempt $try/3)"
      sleep 5
    done
  fi
  log "powering off"
  bash -c "\${BAKE_POWEROFF_COMMAND:-systemctl poweroff}" || log "warning: the power-off failed"
  exit "$rc"
}
trap on_exit EXIT
trap 'err="interrupted by a signal"; exit 143' TERM INT HUP
fail() {
  err=$*
  exit 1
}

[[ $want =~ ^[0-9a-f]{64}$ ]] || fail "BAKE_KIT_SHA256 '$want' is not a SHA-256"
log "fetching the bake kit $uri"
rm -f -- "$kit"
case $uri in
  s3://?*/?*)
    for try in 1 2 3; do
      out=$(timeout 300 "\${aws[@]}" s3 cp --only-show-errors -- "$uri" "$kit" 2>&1) && break
      out=$(grep -v '^[[:space:]]*$' <<<"$out" | tail -n 1) || out="aws failed"
      # A missing object or a denied read (the role cannot list: 403 for a missing key) is final.
      if ((try == 3)) || grep -qE '\\(40[34]\\)|NoSuch|AccessDenied|Forbidden|Not Found' <<<"$out"; then
        fail "cannot fetch the bake kit $uri (attempt $try/3): $out"
      fi
      log "attempt $try/3 failed: $out; retrying in 5 s"
      sleep 5
    done
    ;;
  file:///*)
    if ! p=$(file_path "$uri") || [[ ! -f $p ]]; then
      fail "cannot fetch the bake kit $uri: not a regular file (or a malformed file:// URI)"
    fi
    cp -- "$p" "$kit"
    ;;
  *) fail "BAKE_KIT_URI '$uri' must be s3://bucket/key or file:///absolute/path" ;;
esac
got=$(sha256sum -- "$kit")
got=\${got%% *}
[[ $got == "$want" ]] || fail "the bake kit $uri has sha256 $got, not $want (BAKE_KIT_SHA256): refused"
out=$(
  python3 - "$here" "$kit" 2>&1 <<'PY'
import gzip, json, os, re, sys
root, kit = sys.argv[1:]
doc = json.loads(gzip.open(kit).read())
if doc.get("kitVersion") != 1:
    sys.exit("not a kitVersion 1 document")
for f in doc["files"]:
    p, m = f["path"], f["mode"]
    if not re.fullmatch(r"[\\w-][\\w.-]*(/[\\w.-]+)*", p, re.A) or {".", ".."} & set(p.split("/")):
        sys.exit(f"refused path {p!r}: relative, without . or .., expected")
    d = os.path.join(root, p)
    os.makedirs(os.path.dirname(d), exist_ok=True)
    with open(d + ".partial", "wb") as o:
        o.write(f["content"].encode())
    os.chmod(d + ".partial", {"0755": 0o755, "0644": 0o644}[m])
    os.replace(d + ".partial", d)
PY
) || fail "cannot unpack the bake kit $uri: $(tail -n 1 <<<"$out")"
rm -f -- "$kit"
[[ -f $here/provisioning/bake-image.sh ]] || fail "the bake kit $uri has no provisioning/bake-image.sh"
log "the bake kit is verified (sha256 $want) and unpacked; starting bake-image.sh"
trap - EXIT TERM INT HUP
exec bash "$here/provisioning/bake-image.sh" "$here/manifest.json" "$here/image.env"
`;

function lineShape(fn: string, what: string, value: string, re: RegExp): void {
  if (!re.test(value)) throw new Error(`${fn}: ${what} '${value}' is not valid`);
}

function refuseSecrets(fn: string, what: string, text: string): void {
  for (const re of SECRET_PATTERNS) {
    if (re.test(text)) throw new Error(`${fn}: ${what} holds something that looks like a secret (${re})`);
  }
}

/**
 * The bake kit: every file the bake instance runs, as one gzip'd JSON
 * document `{"kitVersion":1,"files":[{"path":"provisioning/run-vm.sh",
 * "mode":"0755","content":"..."},...]}`, paths sorted, contents in full
 * (".sh" and ".py" files 0755, the rest 0644). `sha256` is the SHA-256 of
 * `body`, the object's bytes: upload `body` to bakeKitKey(prefix, sha256)
 * and pass both to renderBakeUserData. Deterministic for the same files.
 * Throws when a path of BAKE_FILES is missing, a path is not a plain
 * relative path, or a file looks like it holds a secret.
 */
export function renderBakeKit(files: Record<string, string>): { body: Buffer; sha256: string } {
  for (const f of BAKE_FILES) {
    if (typeof files[f] !== "string") throw new Error(`renderBakeKit: files is missing ${f}`);
  }
  const paths = Object.keys(files).sort();
  for (const f of paths) {
    lineShape(
      "renderBakeKit",
      "file path",
      f,
      /^(?!.*(^|\/)\.\.?(\/|$))[A-Za-z0-9_-][A-Za-z0-9._-]*(\/[A-Za-z0-9._-]+)*$/,
    );
    if (["manifest.json", "image.env", "bake-bootstrap.sh", "bake-kit.json.gz"].includes(f)) {
      throw new Error(`renderBakeKit: file path '${f}' is one of the bootstrap's own files`);
    }
    if (typeof files[f] !== "string") throw new Error(`renderBakeKit: ${f} is not text`);
    refuseSecrets("renderBakeKit", f, files[f]);
  }
  const doc = {
    kitVersion: BAKE_KIT_VERSION,
    files: paths.map((p) => ({ path: p, mode: /\.(sh|py)$/.test(p) ? "0755" : "0644", content: files[p] })),
  };
  const body = zlib.gzipSync(Buffer.from(JSON.stringify(doc), "utf8"), { level: 9 });
  return { body, sha256: crypto.createHash("sha256").update(body).digest("hex") };
}

/** `<prefix>bake-kit/<sha256>.json.gz`: the kit's object key, content-addressed (the bake role's GetObject on the prefix reads it). */
export function bakeKitKey(prefix: string, sha256: string): string {
  if (prefix !== "" && !prefix.endsWith("/")) throw new Error(`bakeKitKey: prefix '${prefix}' must end with /`);
  if (prefix.startsWith("/")) throw new Error(`bakeKitKey: prefix '${prefix}' must not start with /`);
  if (!/^[0-9a-f]{64}$/.test(sha256)) throw new Error(`bakeKitKey: '${sha256}' is not a SHA-256`);
  return `${prefix}bake-kit/${sha256}.json.gz`;
}

/**
 * The bake instance's user data: a gzip-compressed cloud-init `#cloud-config`
 * document (cloud-init inflates gzip'd user data itself). The document is
 * JSON, which cloud-init's YAML loader reads as is. It installs `packages`
 * and the AWS CLI snap, writes the manifest (only what bake-image.sh reads),
 * the env and BAKE_BOOTSTRAP under BAKE_DIR, and runs the bootstrap as the
 * transient unit BAKE_UNIT with its output on the console (bake-instance.sh
 * shows the console's tail when no status comes); the bootstrap fetches the
 * kit (`kit`: where renderBakeKit's body was uploaded, and its SHA-256) and
 * hands over to bake-image.sh. The scripts are not in it, so its size does
 * not grow with them (USER_DATA_BUDGET_BYTES). Deterministic for the same
 * inputs. Throws when the env ships the config ISO, anything looks like a
 * secret, a value is malformed, or the result is over EC2's 16384-byte limit.
 */
export function renderBakeUserData(p: BakeUserDataParams): Buffer {
  const fn = "renderBakeUserData";
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
  const uriShape = /^(s3:\/\/[a-z0-9][a-z0-9.-]*\/|file:\/\/\/)[A-Za-z0-9._~%/+-]+$/;
  lineShape(fn, "statusUri", p.statusUri, /^(s3:\/\/[a-z0-9][a-z0-9.-]*\/|file:\/\/\/)[A-Za-z0-9._~%/+-]+\.json$/);
  lineShape(fn, "kit.uri", p.kit.uri, uriShape);
  lineShape(fn, "kit.sha256", p.kit.sha256, /^[0-9a-f]{64}$/);
  const timeoutS = p.timeoutS ?? DEFAULT_BAKE_IMAGE_TIMEOUT_S;
  if (!Number.isInteger(timeoutS) || timeoutS < 60) {
    throw new Error(`renderBakeUserData: timeoutS ${timeoutS} must be a whole number of seconds, at least 60`);
  }
  if (p.region !== undefined) lineShape(fn, "region", p.region, /^[a-z]{2}(-[a-z]+)+-\d+$/);
  for (const pkg of p.packages) lineShape(fn, "package", pkg, /^[a-z0-9][a-z0-9+.-]*$/);

  const at = (rel: string) => `${BAKE_DIR}/${rel}`;
  const env = [
    `BAKE_STATUS_URI=${p.statusUri}`,
    `BAKE_TIMEOUT_S=${timeoutS}`,
    `BAKE_KIT_URI=${p.kit.uri}`,
    `BAKE_KIT_SHA256=${p.kit.sha256}`,
  ];
  if (p.region) env.push(`AWS_REGION=${p.region}`, `AWS_DEFAULT_REGION=${p.region}`);
  const doc = {
    package_update: true,
    package_upgrade: false,
    packages: [...p.packages],
    write_files: [
      { path: at("bake-bootstrap.sh"), owner: "root:root", permissions: "0755", content: BAKE_BOOTSTRAP },
      {
        path: at("image.env"),
        owner: "root:root",
        permissions: "0644",
        content: p.imageEnv,
      },
      {
        path: at("manifest.json"),
        owner: "root:root",
        permissions: "0644",
        content: JSON.stringify(bakeManifest) + "\n",
      },
    ],
    runcmd: [
      // AWS CLI v2 is a snap on Ubuntu 24.04; retry since the store can be slow right after boot.
      ["bash", "-c", "for i in 1 2 3 4 5; do snap install aws-cli --classic && break; sleep 10; done"],
      // The image's QEMU runs the guest as this account (run-vm.sh VM_USER): it stays in the AMI.
      ["bash", "-c", VM_USER_ADD],
      [
        "systemd-run",
        `--unit=${BAKE_UNIT}`,
        "--no-block",
        "--property=StandardOutput=journal+console",
        "--property=StandardError=journal+console",
        ...env.map((e) => `--setenv=${e}`),
        "/bin/bash",
        at("bake-bootstrap.sh"),
      ],
    ],
    final_message: "windows-arm64-image bake instance: cloud-init done after $UPTIME seconds",
  };
  const text = "#cloud-config\n" + JSON.stringify(doc, null, 1) + "\n";
  refuseSecrets(fn, "the user data", text);
  const gz = zlib.gzipSync(Buffer.from(text, "utf8"), { level: 9 });
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
