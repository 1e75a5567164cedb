/**
 * Pure checks of single config values: CIDR arithmetic, S3 bucket names and
 * object keys, URLs, Windows names and plain text. Each returns why a value is
 * unusable (a sentence fragment naming the cause) or undefined; the rule tables
 * in configRules.ts add the key and the fix.
 */
import * as net from "net";
import * as path from "path";

// ---------------------------------------------------------------- text

/** C0/C1 controls, DEL, the XML non-characters U+FFFE/U+FFFF and lone surrogates: never in one line of text. */
const CONTROL_CHAR =
  /[\u0000-\u001f\u007f-\u009f\ufffe\uffff]|[\ud800-\udbff](?![\udc00-\udfff])|(?<![\ud800-\udbff])[\udc00-\udfff]/;

/** The first control character in a string, as "U+000A at position 5", or undefined. */
export function controlCharIn(s: string): string | undefined {
  const m = CONTROL_CHAR.exec(s);
  if (!m) return undefined;
  const code = (m[0].codePointAt(0) as number).toString(16).toUpperCase().padStart(4, "0");
  return `U+${code} at position ${m.index}`;
}

/** Every string inside a parsed config value (array items, object keys and values). */
export function stringsIn(value: unknown): string[] {
  if (typeof value === "string") return [value];
  if (Array.isArray(value)) return value.flatMap(stringsIn);
  if (value && typeof value === "object")
    return Object.entries(value as Record<string, unknown>).flatMap(([k, v]) => [k, ...stringsIn(v)]);
  return [];
}

/** The distinct characters of `s` outside `allowed` (a one-character regex class), quoted for a message. */
export function charsOutside(s: string, allowed: RegExp): string | undefined {
  const bad = [...new Set([...s].filter((ch) => !allowed.test(ch)))];
  return bad.length ? bad.map((ch) => (ch === " " ? "space" : JSON.stringify(ch))).join(", ") : undefined;
}

// ---------------------------------------------------------------- CIDRs

export interface Cidr {
  kind: 4 | 6;
  /** Network start and prefix length. */
  start: bigint;
  len: number;
}

function ipv4Value(addr: string): bigint {
  return addr.split(".").reduce((acc, o) => acc * 256n + BigInt(Number(o)), 0n);
}

function ipv6Value(addr: string): bigint {
  let s = addr;
  const v4 = /(\d+\.\d+\.\d+\.\d+)$/.exec(s);
  if (v4) {
    const n = ipv4Value(v4[1]);
    s = `${s.slice(0, -v4[1].length)}${(n >> 16n).toString(16)}:${(n & 0xffffn).toString(16)}`;
  }
  let groups: string[];
  if (s.includes("::")) {
    const [head, tail] = s.split("::");
    const h = head ? head.split(":") : [];
    const t = tail ? tail.split(":") : [];
    groups = [...h, ...Array<string>(8 - h.length - t.length).fill("0"), ...t];
  } else groups = s.split(":");
  return groups.reduce((acc, g) => (acc << 16n) + BigInt(parseInt(g, 16)), 0n);
}

/** A parsed CIDR, or undefined when `cidrProblem` would refuse it. */
export function parseCidr(value: string): Cidr | undefined {
  if (cidrProblem(value) !== undefined) return undefined;
  const [addr, lenText] = value.split("/");
  const kind = net.isIP(addr) as 4 | 6;
  return { kind, start: kind === 4 ? ipv4Value(addr) : ipv6Value(addr), len: Number(lenText) };
}

/** Whether a CIDR's prefix length is zero, however its address is spelled ("0/0", "0::0/0", "1.2.3.4/00"). */
export function isZeroPrefix(value: unknown): boolean {
  return typeof value === "string" && /^[^/]*\/0+$/.test(value.trim());
}

export function cidrProblem(value: unknown): string | undefined {
  if (typeof value !== "string") return 'is not a string. Fix: write CIDRs as strings, e.g. "203.0.113.7/32".';
  const m = /^([^/]+)\/(\d{1,3})$/.exec(value);
  if (!m) return "is not a CIDR (address/prefix length). Fix: e.g. 203.0.113.7/32 for one address.";
  const [, addr, lenText] = m;
  if (addr.includes("%")) return "has an IPv6 zone id (%...), which security groups do not take. Fix: drop it.";
  const kind = net.isIP(addr);
  const len = Number(lenText);
  if (kind === 0) return `has an invalid address ${JSON.stringify(addr)}. Fix: e.g. 203.0.113.7/32.`;
  const max = kind === 4 ? 32 : 128;
  if (len > max) return `has prefix length ${len}, more than ${max} for IPv${kind}. Fix: use /${max} for one address.`;
  if (lenText.length > 1 && lenText.startsWith("0"))
    return `has a prefix length with a leading zero (/${lenText}), which AWS rejects. Fix: write /${len}.`;
  const n = kind === 4 ? ipv4Value(addr) : ipv6Value(addr);
  const hostBits = BigInt(max - len);
  if (hostBits > 0n && n % (1n << hostBits) !== 0n)
    return `has host bits set for /${len}, which AWS rejects. Fix: use the network address or /${max}.`;
  return undefined;
}

/** Whether the CIDRs of one family together cover every address of that family. */
export function coversAll(cidrs: readonly Cidr[], kind: 4 | 6): boolean {
  const bits = kind === 4 ? 32 : 128;
  const spans = cidrs
    .filter((c) => c.kind === kind)
    .map((c) => [c.start, c.start + (1n << BigInt(bits - c.len))] as const)
    .sort((a, b) => (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0));
  let reached = 0n;
  for (const [start, end] of spans) {
    if (start > reached) return false;
    if (end > reached) reached = end;
  }
  return reached === 1n << BigInt(bits);
}

// ---------------------------------------------------------------- SSH keys

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

// ---------------------------------------------------------------- S3

/** S3's bucket naming rules (general purpose buckets). */
export function bucketNameProblem(name: string): string | undefined {
  if (name.length < 3 || name.length > 63) return "is not 3 to 63 characters long, as S3 bucket names are.";
  if (!/^[a-z0-9][a-z0-9.-]*[a-z0-9]$/.test(name))
    return "has characters S3 bucket names never have (lowercase letters, digits, '.', '-').";
  if (net.isIPv4(name)) return "looks like an IP address, which S3 bucket names may not.";
  if (name.includes("..")) return "has two adjacent periods, which S3 bucket names may not.";
  if (/\.-|-\./.test(name)) return "has a period next to a hyphen, which S3 bucket names may not.";
  const prefix = ["xn--", "sthree-", "amzn-s3-demo-"].find((p) => name.startsWith(p));
  if (prefix) return `starts with ${prefix}, a prefix S3 reserves.`;
  const suffix = ["-s3alias", "--ol-s3", ".mrap", "--x-s3", "--table-s3"].find((s) => name.endsWith(s));
  if (suffix) return `ends with ${suffix}, a suffix S3 reserves for access points and directory buckets.`;
  return undefined;
}

/** Characters this stack takes in S3 object keys: AWS's "safe" set without * and ', plus + = , @. */
const S3_KEY_CHAR = /[A-Za-z0-9!\-_.()/+=,@]/;
/** S3's object key limit, in bytes. */
export const S3_MAX_KEY_BYTES = 1024;

/**
 * Why an object key (or key prefix) would mean something else to IAM or to the
 * tools than it says: a wildcard or policy variable in the policy's ARN, or a
 * . or .. segment that names another key.
 */
export function s3KeyHazard(key: string): string | undefined {
  const wild = [..."*?"].filter((c) => key.includes(c));
  if (wild.length) return `holds ${wild.join(" and ")}, which IAM reads as a wildcard in the policy's ARN`;
  if (/[${}]/.test(key)) return "holds $, { or }, which IAM reads as a policy variable";
  if (key.split("/").some((s) => s === "." || s === ".."))
    return "has a . or .. segment, which the CLI and consoles resolve to another key";
  return undefined;
}

/**
 * Why an object key could widen or break the host role's IAM policy, where it
 * becomes part of an ARN, or the S3 calls that use it.
 */
export function s3KeyProblem(key: string): string | undefined {
  if (key.startsWith("/")) return "starts with /, so it names an empty first folder";
  const hazard = s3KeyHazard(key);
  if (hazard) return hazard;
  if (
    key
      .split("/")
      .slice(0, -1)
      .some((s) => s === "")
  )
    return "has an empty segment (//)";
  const bad = charsOutside(key, S3_KEY_CHAR);
  if (bad) return `holds ${bad}, which S3 or IAM treat specially`;
  if (Buffer.byteLength(key) > S3_MAX_KEY_BYTES) return `is longer than S3's ${S3_MAX_KEY_BYTES} bytes`;
  return undefined;
}

/** Bucket and key of an s3:// URL, read as the AWS CLI reads it (no percent-decoding). */
export function s3Parts(url: string): { bucket: string; key: string } | undefined {
  const m = /^s3:\/\/([^/]*)\/?(.*)$/.exec(url);
  return m ? { bucket: m[1], key: m[2] } : undefined;
}

// ---------------------------------------------------------------- URLs

export function isHttpUrl(s: string): boolean {
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

/** Query parameters that carry a signature or a token (S3/CloudFront presigning, Azure SAS, GCS, OAuth). */
const SIGNATURE_PARAM =
  /^(x-amz-(signature|credential|security-token)|x-goog-(signature|credential)|signature|sig|token|access_token|awsaccesskeyid|googleaccessid|key-pair-id|policy)$/i;

/**
 * What secret a URL carries, named without its value: "a user name or password"
 * or "the query parameter X-Amz-Signature"; undefined when it carries none.
 */
export function urlCredentials(s: string): string | undefined {
  if (/^[a-z][a-z0-9+.-]*:\/\/[^/?#]*@/i.test(s)) return "a user name or password before the host";
  const q = s.indexOf("?");
  if (q < 0) return undefined;
  const query = s.slice(q + 1).split("#")[0];
  for (const pair of query.split("&")) {
    const name = decodeSafely(pair.split("=")[0]);
    if (SIGNATURE_PARAM.test(name)) return `the query parameter ${name}`;
  }
  return undefined;
}

function decodeSafely(s: string): string {
  try {
    return decodeURIComponent(s.replace(/\+/g, " "));
  } catch {
    return s;
  }
}

/** Why a file:// publish folder is unusable (what publish-image.sh and the stage commands refuse), or undefined. */
export function folderUriProblem(uri: string): string | undefined {
  if (!uri.startsWith("file:///")) return "names a host or no absolute path";
  let p: string;
  try {
    p = decodeURIComponent(uri.slice("file://".length));
  } catch {
    return "has a broken percent-escape";
  }
  if (p.includes("\\")) return "holds a backslash";
  if (p.includes("'")) return "holds a single quote, which the publish command cannot carry";
  if (controlCharIn(p)) return "holds a control character (or an escaped one, such as %00 or %0A)";
  const trimmed = p.replace(/\/+$/, "");
  if (trimmed === "") return "is the filesystem root";
  if (/\/\/|\/\.\.?(\/|$)/.test(trimmed)) return "is not a plain absolute path (no //, . or ..)";
  return undefined;
}

/** A URL's decoded path (its file name is what names a build), or the text itself when it is not a URL. */
export function urlPath(url: string): string {
  try {
    return decodeURIComponent(new URL(url).pathname);
  } catch {
    return url;
  }
}

// ---------------------------------------------------------------- Windows

/** Characters Windows refuses in a user name. */
export const USER_NAME_FORBIDDEN = /["/\\[\]:;|=,+*?<>@]/;
export const USER_NAME_MAX = 20;

/**
 * Built-in accounts, groups and well-known principals (lower case): a local user
 * of that name cannot be created, or would be confused with the principal.
 */
export const RESERVED_USER_NAMES: readonly string[] = Object.freeze([
  "administrator",
  "guest",
  "defaultaccount",
  "wdagutilityaccount",
  "defaultuser0",
  "system",
  "localsystem",
  "local system",
  "localservice",
  "local service",
  "networkservice",
  "network service",
  "trustedinstaller",
  "everyone",
  "administrators",
  "users",
  "guests",
  "power users",
  "remote desktop users",
  "authenticated users",
  "interactive",
  "network",
  "batch",
  "service",
  "dialup",
  "anonymous logon",
  "creator owner",
  "nt authority",
  "none",
]);

/** Characters of Microsoft product keys (no vowels, no 0 1 5 A E I L O S U Z). */
export const PRODUCT_KEY = /^[BCDFGHJKMNPQRTVWXY2346789]{5}(-[BCDFGHJKMNPQRTVWXY2346789]{5}){4}$/i;

// ---------------------------------------------------------------- words

export function closest(word: string, candidates: readonly string[]): string | undefined {
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
