import * as fs from "fs";
import * as http from "http";
import * as os from "os";
import * as path from "path";
import { freePort, run, RunResult } from "./run";

// s3rver ships no type declarations; this is the part of its API the tests use.
interface S3rverInstance {
  run(): Promise<unknown>;
  close(): Promise<void>;
}
interface S3rverOptions {
  port: number;
  address: string;
  silent: boolean;
  directory: string;
  configureBuckets: { name: string }[];
}
// eslint-disable-next-line @typescript-eslint/no-require-imports
const S3rver: new (opts: S3rverOptions) => S3rverInstance = require("s3rver");

/** A local S3 server (s3rver) on 127.0.0.1 with one bucket. */
export interface S3Server {
  /** http://127.0.0.1:PORT */
  endpoint: string;
  bucket: string;
  /** Where s3rver keeps the objects. */
  directory: string;
  /** Environment for the aws CLI and the scripts (credentials, region, S3_ENDPOINT_URL). */
  env: NodeJS.ProcessEnv;
  /** Runs `aws --endpoint-url ENDPOINT ARGS...` against this server. */
  aws(args: string[]): Promise<RunResult>;
  /** Body of s3://BUCKET/KEY, or undefined when it does not exist (in-process, see S3Http). */
  getObject(key: string): Promise<Buffer | undefined>;
  /** Keys in the bucket under PREFIX (in-process). */
  listKeys(prefix?: string): Promise<string[]>;
  /** The in-process client for this server and bucket. */
  http: S3Http;
  stop(): Promise<void>;
}

/** One object of a listing, as S3 reports it. */
export interface S3Object {
  key: string;
  size: number;
  /** With its quotes, as S3 sends it (the MD5 of a single-part upload). */
  etag: string;
  lastModified: string;
}

/**
 * The tests' own reads and writes of a local s3rver bucket, over plain HTTP from this process.
 * s3rver serves anonymous requests (it checks no ACLs), so no request is signed. The scripts
 * under test use the aws CLI as on a host; the tests' checks need no CLI process (each costs
 * about a second of CPU).
 */
export class S3Http {
  constructor(
    readonly endpoint: string,
    readonly bucket: string,
  ) {}

  private request(
    method: string,
    key: string,
    query = "",
    body?: Buffer,
    headers: Record<string, string> = {},
  ): Promise<{ status: number; body: Buffer; headers: http.IncomingHttpHeaders }> {
    const keyPath = key === "" ? "" : `/${key.split("/").map(encodeURIComponent).join("/")}`;
    const url = new URL(`${this.endpoint}/${encodeURIComponent(this.bucket)}${keyPath}${query}`);
    return new Promise((resolve, reject) => {
      const req = http.request(
        url,
        {
          method,
          agent: false,
          headers: { ...headers, ...(body ? { "content-length": String(body.length) } : {}) },
        },
        (res) => {
          const chunks: Buffer[] = [];
          res.on("data", (c: Buffer) => chunks.push(c));
          res.on("end", () =>
            resolve({ status: res.statusCode ?? 0, body: Buffer.concat(chunks), headers: res.headers }),
          );
          res.on("error", reject);
        },
      );
      req.setTimeout(120_000, () => req.destroy(new Error(`${method} ${url.href}: no answer within 120 s`)));
      req.on("error", reject);
      req.end(body);
    });
  }

  private static fail(what: string, r: { status: number; body: Buffer }): never {
    throw new Error(`${what}: HTTP ${r.status} ${r.body.toString("utf8").slice(0, 300)}`);
  }

  /** Body of KEY, or undefined when it does not exist. */
  async get(key: string): Promise<Buffer | undefined> {
    const r = await this.request("GET", key);
    if (r.status === 404) return undefined;
    if (r.status !== 200) S3Http.fail(`GET s3://${this.bucket}/${key}`, r);
    return r.body;
  }

  /** ETag, size and time of KEY, or undefined when it does not exist. */
  async head(key: string): Promise<Omit<S3Object, "key"> | undefined> {
    const r = await this.request("HEAD", key);
    if (r.status === 404) return undefined;
    if (r.status !== 200) S3Http.fail(`HEAD s3://${this.bucket}/${key}`, r);
    return {
      size: Number(r.headers["content-length"]),
      etag: String(r.headers.etag),
      lastModified: String(r.headers["last-modified"]),
    };
  }

  async put(key: string, body: Buffer | string, contentType = "application/octet-stream"): Promise<void> {
    const r = await this.request("PUT", key, "", Buffer.from(body), { "content-type": contentType });
    if (r.status !== 200) S3Http.fail(`PUT s3://${this.bucket}/${key}`, r);
  }

  /** Creates the bucket (s3rver: a folder of its own). */
  async createBucket(): Promise<void> {
    const r = await this.request("PUT", "");
    if (r.status !== 200) S3Http.fail(`create bucket ${this.bucket}`, r);
  }

  async remove(key: string): Promise<void> {
    const r = await this.request("DELETE", key);
    if (r.status !== 204 && r.status !== 200) S3Http.fail(`DELETE s3://${this.bucket}/${key}`, r);
  }

  /** Every object under PREFIX, in key order (ListObjectsV2, all pages). */
  async list(prefix = ""): Promise<S3Object[]> {
    const out: S3Object[] = [];
    let token: string | undefined;
    do {
      const q = `?list-type=2&prefix=${encodeURIComponent(prefix)}${token ? `&continuation-token=${encodeURIComponent(token)}` : ""}`;
      const r = await this.request("GET", "", q);
      if (r.status !== 200) S3Http.fail(`list s3://${this.bucket}/${prefix}`, r);
      const xml = r.body.toString("utf8");
      for (const m of xml.matchAll(/<Contents>([\s\S]*?)<\/Contents>/g)) {
        const field = (name: string) => xmlText(new RegExp(`<${name}>([\\s\\S]*?)</${name}>`).exec(m[1])?.[1] ?? "");
        out.push({
          key: field("Key"),
          size: Number(field("Size")),
          etag: field("ETag"),
          lastModified: field("LastModified"),
        });
      }
      token = /<IsTruncated>true<\/IsTruncated>/.test(xml)
        ? xmlText(/<NextContinuationToken>([\s\S]*?)<\/NextContinuationToken>/.exec(xml)?.[1] ?? "")
        : undefined;
    } while (token);
    return out.sort((a, b) => (a.key < b.key ? -1 : a.key > b.key ? 1 : 0));
  }
}

function xmlText(s: string): string {
  return s.replace(
    /&(lt|gt|quot|apos|amp|#(\d+)|#x([0-9a-fA-F]+));/g,
    (_, name: string, dec?: string, hex?: string) => {
      if (dec) return String.fromCodePoint(Number(dec));
      if (hex) return String.fromCodePoint(parseInt(hex, 16));
      return ({ lt: "<", gt: ">", quot: '"', apos: "'", amp: "&" } as Record<string, string>)[name];
    },
  );
}

/** Environment that points the aws CLI at ENDPOINT with s3rver's fixed credentials. */
export function awsEnv(endpoint: string, dir: string): NodeJS.ProcessEnv {
  return {
    AWS_ACCESS_KEY_ID: "S3RVER",
    AWS_SECRET_ACCESS_KEY: "S3RVER",
    AWS_DEFAULT_REGION: "us-east-1",
    AWS_REGION: "us-east-1",
    AWS_CONFIG_FILE: path.join(dir, "aws-config-none"),
    AWS_SHARED_CREDENTIALS_FILE: path.join(dir, "aws-credentials-none"),
    AWS_EC2_METADATA_DISABLED: "true",
    AWS_PAGER: "",
    S3_ENDPOINT_URL: endpoint,
  };
}

/** Starts s3rver in this process on a free port, with a fresh directory and bucket BUCKET. */
export async function startS3(bucket = "test-bucket"): Promise<S3Server> {
  const directory = fs.mkdtempSync(path.join(os.tmpdir(), "s3rver-"));
  const port = await freePort();
  const server = new S3rver({
    port,
    address: "127.0.0.1",
    silent: true,
    directory,
    configureBuckets: [{ name: bucket }],
  });
  await server.run();
  const endpoint = `http://127.0.0.1:${port}`;
  const env = awsEnv(endpoint, directory);
  const aws = (args: string[]) => run("aws", ["--endpoint-url", endpoint, ...args], { env });
  const client = new S3Http(endpoint, bucket);
  return {
    endpoint,
    bucket,
    directory,
    env,
    aws,
    http: client,
    getObject: (key: string) => client.get(key),
    listKeys: async (prefix = "") => (await client.list(prefix)).map((o) => o.key),
    async stop() {
      await server.close();
      fs.rmSync(directory, { recursive: true, force: true });
    },
  };
}

/**
 * Puts the aws executable that a pyenv shim resolves to first on this process's PATH (a shim
 * re-resolves the interpreter on every call: most of a second each). Returns the undo.
 */
export async function preferRealAws(): Promise<() => void> {
  const r = await run("bash", ["-c", "command -v pyenv >/dev/null && pyenv which aws || command -v aws"]);
  const real = r.stdout.trim().split("\n").pop() ?? "";
  if (r.code !== 0 || real === "") return () => undefined;
  const bin = fs.mkdtempSync(path.join(os.tmpdir(), "aws-bin-"));
  fs.symlinkSync(real, path.join(bin, "aws"));
  const saved = process.env.PATH;
  process.env.PATH = `${bin}:${saved}`;
  return () => {
    process.env.PATH = saved;
    fs.rmSync(bin, { recursive: true, force: true });
  };
}
