import * as fs from "fs";
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
  /** Body of s3://BUCKET/KEY, or undefined when it does not exist. */
  getObject(key: string): Promise<Buffer | undefined>;
  /** Keys in the bucket under PREFIX. */
  listKeys(prefix?: string): Promise<string[]>;
  stop(): Promise<void>;
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
  return {
    endpoint,
    bucket,
    directory,
    env,
    aws,
    async getObject(key: string) {
      const tmp = path.join(fs.mkdtempSync(path.join(os.tmpdir(), "s3get-")), "obj");
      try {
        const r = await aws(["s3", "cp", "--only-show-errors", `s3://${bucket}/${key}`, tmp]);
        return r.code === 0 ? fs.readFileSync(tmp) : undefined;
      } finally {
        fs.rmSync(path.dirname(tmp), { recursive: true, force: true });
      }
    },
    async listKeys(prefix = "") {
      const r = await aws([
        "s3api",
        "list-objects-v2",
        "--bucket",
        bucket,
        "--prefix",
        prefix,
        "--query",
        "Contents[].Key",
        "--output",
        "json",
      ]);
      if (r.code !== 0) throw new Error(`list-objects-v2 failed: ${r.stderr}`);
      const keys = JSON.parse(r.stdout || "null") as string[] | null;
      return (keys ?? []).sort();
    },
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
