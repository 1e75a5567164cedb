/**
 * A stand-in EC2 instance metadata service for the tests: IMDSv2 like the real
 * one (PUT /latest/api/token with a TTL header gives a token; every GET needs
 * it, else 401), user data, a few meta-data keys, and fake credentials under
 * meta-data/iam/ and identity-credentials/. It records every request it gets.
 *
 * In-process: startImdsStandin(). In another network namespace (where the
 * test cannot bind): run this file with node, see main() at the bottom; it
 * prints "listening" and then one JSON line (an ImdsRequest) per request.
 */
import * as crypto from "crypto";
import * as http from "http";

export interface ImdsRequest {
  method: string;
  path: string;
  /** The X-aws-ec2-metadata-token header was a token this service gave out. */
  validToken: boolean;
  /** The X-aws-ec2-metadata-token header as sent ("" when absent). */
  tokenHeader: string;
}

export interface ImdsOptions {
  userData: string;
  /** The fake secret access key under iam/ and identity-credentials/. */
  secret: string;
  /** IMDSv1 only: the token PUT answers 404 and GETs need no token. */
  v1Only?: boolean;
}

export const INSTANCE_ID = "i-0123456789abcdef0";
export const ROLE = "windows-image-host";

export function imdsHandler(opts: ImdsOptions, seen: (r: ImdsRequest) => void): http.RequestListener {
  const tokens = new Set<string>();
  const creds = JSON.stringify({
    Code: "Success",
    Type: "AWS-HMAC",
    AccessKeyId: "ASIAFAKEFAKEFAKEFAKE",
    SecretAccessKey: opts.secret,
    Token: `session-${opts.secret}`,
  });
  const data: Record<string, string> = {
    "/latest/user-data": opts.userData,
    "/latest/meta-data/": "ami-id\ninstance-id\niam/\nidentity-credentials/\nplacement/",
    "/latest/meta-data/instance-id": INSTANCE_ID,
    "/latest/meta-data/placement/region": "us-east-2",
    "/latest/meta-data/iam/security-credentials/": ROLE,
    [`/latest/meta-data/iam/security-credentials/${ROLE}`]: creds,
    "/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance": creds,
    "/latest/dynamic/instance-identity/document": JSON.stringify({ region: "us-east-2", instanceId: INSTANCE_ID }),
  };
  return (req, res) => {
    const tokenHeader = String(req.headers["x-aws-ec2-metadata-token"] ?? "");
    const path = req.url ?? "";
    seen({ method: req.method ?? "", path, validToken: tokens.has(tokenHeader), tokenHeader });
    const send = (code: number, body = "") => {
      res.writeHead(code, { "Content-Type": "text/plain", "Content-Length": Buffer.byteLength(body) });
      res.end(body);
    };
    if (req.method === "PUT" && path === "/latest/api/token") {
      if (opts.v1Only) return send(404);
      const ttl = Number(req.headers["x-aws-ec2-metadata-token-ttl-seconds"]);
      if (!Number.isInteger(ttl) || ttl < 1 || ttl > 21600) return send(400, "missing or bad TTL header");
      const token = crypto.randomBytes(24).toString("base64");
      tokens.add(token);
      return send(200, token);
    }
    if (req.method !== "GET") return send(405);
    if (!opts.v1Only && !tokens.has(tokenHeader)) return send(401);
    const body = data[path];
    return body === undefined ? send(404, "not found") : send(200, body);
  };
}

export interface ImdsStandin {
  port: number;
  requests: ImdsRequest[];
  close(): Promise<void>;
}

/** Starts the stand-in on host:port (port 0: any free one). */
export function startImdsStandin(opts: ImdsOptions, host = "127.0.0.1", port = 0): Promise<ImdsStandin> {
  const requests: ImdsRequest[] = [];
  const server = http.createServer(imdsHandler(opts, (r) => requests.push(r)));
  return new Promise((resolve, reject) => {
    server.once("error", reject);
    server.listen(port, host, () => {
      const addr = server.address();
      resolve({
        port: typeof addr === "object" && addr ? addr.port : port,
        requests,
        close: () => new Promise<void>((r) => server.close(() => r())),
      });
    });
  });
}

/** node -r ts-node/register/transpile-only imds.ts HOST PORT, with IMDS_USER_DATA and IMDS_SECRET set. */
function main(): void {
  const [host, port] = process.argv.slice(2);
  const opts = { userData: process.env.IMDS_USER_DATA ?? "", secret: process.env.IMDS_SECRET ?? "" };
  const server = http.createServer(imdsHandler(opts, (r) => process.stdout.write(JSON.stringify(r) + "\n")));
  server.listen(Number(port), host, () => process.stdout.write("listening\n"));
}

if (require.main === module) main();
