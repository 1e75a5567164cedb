import { expect } from "chai";
import { ChildProcess, spawn } from "child_process";
import * as crypto from "crypto";
import * as fs from "fs";
import * as http from "http";
import * as net from "net";
import * as os from "os";
import * as path from "path";
import { sha256, sha256File } from "../support/disk";
import { freePort, run, runOk, RunResult, script } from "../support/run";

// The fault table of the host scripts that fetch, convert, stop and stage:
// fetch-image.sh, prepare-disk.sh, stop-vm.sh and build-config-iso.sh run for
// real against full file systems (tmpfs), permissions (run as nobody),
// truncated and corrupted inputs, hanging and garbage servers on 127.0.0.1, real
// QEMU processes, and SIGKILL at random points followed by a rerun. Each fault
// must end in an error that names its cause, leave the previous image,
// download or ISO as it was, and leave nothing behind.

const NOBODY = 65534;
const MIB = 1024 * 1024;

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/** Every path under DIR (relative, sorted), directories included. */
function tree(dir: string): string[] {
  const out: string[] = [];
  const walk = (d: string, rel: string) => {
    for (const e of fs.readdirSync(d, { withFileTypes: true })) {
      const r = rel ? `${rel}/${e.name}` : e.name;
      out.push(r);
      if (e.isDirectory() && !e.isSymbolicLink()) walk(path.join(d, e.name), r);
    }
  };
  walk(dir, "");
  return out.sort();
}

/** Regular files under DIR whose content contains NEEDLE. */
function filesContaining(dir: string, needle: string): string[] {
  return tree(dir).filter((rel) => {
    const p = path.join(dir, rel);
    const st = fs.lstatSync(p);
    return st.isFile() && fs.readFileSync(p).includes(needle);
  });
}

/** Alive and not a zombie. */
function alive(pid: number): boolean {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, "utf8");
    const state = stat.slice(stat.lastIndexOf(")") + 2).split(" ")[0];
    return state !== "Z" && state !== "X";
  } catch {
    return false;
  }
}

/** Live processes (not this one) whose command line mentions NEEDLE. */
function processesMentioning(needle: string): string[] {
  const found: string[] = [];
  for (const entry of fs.readdirSync("/proc")) {
    if (!/^\d+$/.test(entry) || Number(entry) === process.pid) continue;
    let cmdline = "";
    try {
      cmdline = fs.readFileSync(`/proc/${entry}/cmdline`, "utf8").split("\0").join(" ");
    } catch {
      continue;
    }
    if (cmdline.includes(needle) && alive(Number(entry))) found.push(`${entry}: ${cmdline.slice(0, 200)}`);
  }
  return found;
}

async function noProcessesLeft(needle: string): Promise<void> {
  for (let i = 0; i < 50 && processesMentioning(needle).length > 0; i++) await sleep(100);
  expect(processesMentioning(needle), "processes left running").to.deep.equal([]);
}

/** Mounts a tmpfs of SIZE on DIR (a small disk that fills up); returns the unmount. */
async function tmpfs(dir: string, size: string): Promise<() => Promise<void>> {
  fs.mkdirSync(dir, { recursive: true });
  await runOk("mount", ["-t", "tmpfs", "-o", `size=${size},mode=0755`, "tmpfs", dir]);
  return async () => {
    await runOk("umount", [dir]);
  };
}

interface Spawned {
  code: number | null;
  signal: NodeJS.Signals | null;
  stderr: string;
  /** Whether the kill came before the program ended by itself. */
  killed: boolean;
}

/**
 * Runs CMD in its own process group and sends the whole group SIGNAL (SIGKILL) after MS ms (as
 * stage.sh does at its bound). With WHEN, the signal goes as soon as WHEN() holds (the state the
 * test is about exists), and MS is only the longest wait: a loaded machine cannot make it early.
 */
function runKilledAfter(
  cmd: string,
  args: string[],
  ms: number,
  opts: { env?: NodeJS.ProcessEnv; input?: string; signal?: NodeJS.Signals; when?: () => boolean } = {},
): Promise<Spawned> {
  return new Promise((resolve, reject) => {
    const child: ChildProcess = spawn(cmd, args, {
      env: { ...process.env, ...opts.env },
      stdio: ["pipe", "ignore", "pipe"],
      detached: true,
    });
    let stderr = "";
    let done = false;
    let killed = false;
    child.stderr!.on("data", (d: Buffer) => (stderr += d.toString()));
    child.stdin!.on("error", () => undefined);
    child.stdin!.end(opts.input ?? "");
    const kill = () => {
      if (done) return;
      killed = true;
      try {
        process.kill(-child.pid!, opts.signal ?? "SIGKILL");
      } catch {
        /* already gone */
      }
    };
    const timer = setTimeout(kill, ms);
    const when = opts.when;
    const poll = when
      ? setInterval(() => {
          if (!done && !killed && when()) kill();
        }, 50)
      : undefined;
    child.on("error", reject);
    child.on("close", (code, signal) => {
      done = true;
      clearTimeout(timer);
      if (poll) clearInterval(poll);
      resolve({ code, signal, stderr, killed });
    });
  });
}

/** Runs a host script as nobody (root passes every permission check, nobody does not). */
function runAsNobody(name: string, args: string[], env: NodeJS.ProcessEnv = {}): Promise<RunResult> {
  return run(
    "setpriv",
    [`--reuid=${NOBODY}`, `--regid=${NOBODY}`, "--clear-groups", "--", "bash", script(name), ...args],
    { env, timeoutMs: 60000 },
  );
}

interface Server {
  url(p?: string): string;
  base: string;
  requests(): number;
  stop(): Promise<void>;
}

/** An HTTP server on 127.0.0.1 with HANDLER; stop() also ends connections it left hanging. */
async function httpServer(handler: (req: http.IncomingMessage, res: http.ServerResponse) => void): Promise<Server> {
  let n = 0;
  const sockets = new Set<net.Socket>();
  const server = http.createServer((req, res) => {
    n++;
    handler(req, res);
  });
  server.on("connection", (s) => {
    sockets.add(s);
    s.on("close", () => sockets.delete(s));
  });
  const port = await freePort();
  await new Promise<void>((r) => server.listen(port, "127.0.0.1", r));
  const base = `http://127.0.0.1:${port}`;
  return {
    base,
    url: (p = "/image") => `${base}${p}`,
    requests: () => n,
    stop: () =>
      new Promise<void>((r) => {
        for (const s of sockets) s.destroy();
        server.close(() => r());
      }),
  };
}

/** A TCP server on 127.0.0.1 that does ON_CONNECTION with each connection (garbage, silence). */
async function rawServer(onConnection: (s: net.Socket) => void): Promise<Server> {
  let n = 0;
  const sockets = new Set<net.Socket>();
  const server = net.createServer((s) => {
    n++;
    sockets.add(s);
    s.on("error", () => undefined);
    s.on("close", () => sockets.delete(s));
    onConnection(s);
  });
  const port = await freePort();
  await new Promise<void>((r) => server.listen(port, "127.0.0.1", r));
  const base = `http://127.0.0.1:${port}`;
  return {
    base,
    url: (p = "/image") => `${base}${p}`,
    requests: () => n,
    stop: () =>
      new Promise<void>((r) => {
        for (const s of sockets) s.destroy();
        server.close(() => r());
      }),
  };
}

/** Serves BODY honouring "Range: bytes=N-", CHUNK bytes every DELAY ms (a slow download). */
function slowBody(body: Buffer, chunk: number, delay: number) {
  return (req: http.IncomingMessage, res: http.ServerResponse) => {
    const m = /^bytes=(\d+)-$/.exec(req.headers.range ?? "");
    const start = m ? Number(m[1]) : 0;
    if (start >= body.length) {
      res.writeHead(416, { "Content-Range": `bytes */${body.length}` }).end();
      return;
    }
    const headers: http.OutgoingHttpHeaders = { "Content-Length": body.length - start, "Accept-Ranges": "bytes" };
    if (m) headers["Content-Range"] = `bytes ${start}-${body.length - 1}/${body.length}`;
    res.writeHead(m ? 206 : 200, headers);
    let off = start;
    const next = () => {
      if (res.destroyed) return;
      if (off >= body.length) {
        res.end();
        return;
      }
      res.write(body.subarray(off, Math.min(off + chunk, body.length)));
      off += chunk;
      setTimeout(next, delay);
    };
    next();
  };
}

describe("fault table: host scripts fail cleanly (cause named, previous state intact, nothing left behind)", function () {
  this.timeout(180000);
  let root: string;
  let tmp: string;
  let vm: string;

  beforeEach(() => {
    root = fs.mkdtempSync(path.join(os.tmpdir(), "faults-"));
    fs.chmodSync(root, 0o755);
    tmp = path.join(root, "tmp");
    fs.mkdirSync(tmp);
    fs.chmodSync(tmp, 0o1777);
    vm = path.join(root, "vm");
    fs.mkdirSync(vm);
  });
  afterEach(async () => {
    for (const p of processesMentioning(root)) {
      try {
        process.kill(Number(p.split(":")[0]), "SIGKILL");
      } catch {
        /* gone */
      }
    }
    await run("umount", [vm]);
    fs.rmSync(root, { recursive: true, force: true });
  });

  // --- fetch-image.sh -------------------------------------------------------------
  describe("fetch-image.sh", () => {
    const retries = { FETCH_RETRIES: "3", FETCH_RETRY_DELAY_S: "0", FETCH_PROGRESS_INTERVAL_S: "1" };
    const timeouts = { FETCH_STALL_TIMEOUT_S: "2", FETCH_CONNECT_TIMEOUT_S: "2" };
    const oldBody = crypto.randomBytes(128 * 1024);
    const oldSum = sha256(oldBody);
    let dest: string;
    let oldStamp: string;

    interface Ctx {
      root: string;
      body: Buffer;
      sum: string;
    }
    interface Fault {
      name: string;
      /** A tmpfs of this size at the VM folder (set up before the earlier download). */
      disk?: string;
      /** Sets up the fault; returns the URL to fetch and what else the run needs. */
      setup(ctx: Ctx): Promise<{ url: string; env?: NodeJS.ProcessEnv; server?: Server; nobody?: boolean }>;
      error: (ctx: Ctx) => RegExp;
      /** Exact number of requests the server sees (1: not retried). */
      requests?: number;
      retried: boolean;
      /** Entries of the VM folder the fault itself put there (they are the operator's, left alone). */
      leaves?: string[];
    }

    /** DEST from an earlier, verified download (with its stamp). */
    async function earlierDownload(): Promise<void> {
      const src = path.join(root, "old.bin");
      fs.writeFileSync(src, oldBody);
      const r = await run("bash", [script("fetch-image.sh"), `file://${src}`, oldSum, dest], { env: { TMPDIR: tmp } });
      expect(r.code, r.stderr).to.equal(0);
      fs.rmSync(src);
      oldStamp = fs.readFileSync(`${dest}.sha256`, "utf8");
    }

    function expectEarlierIntact(leaves: string[] = []): void {
      expect(sha256File(dest), "the earlier download").to.equal(oldSum);
      expect(fs.readFileSync(`${dest}.sha256`, "utf8"), "its stamp").to.equal(oldStamp);
      expect(tree(vm), "the VM folder").to.deep.equal(["win.vhdx", "win.vhdx.sha256", ...leaves].sort());
      expect(tree(tmp), "TMPDIR").to.deep.equal([]);
    }

    const faults: Fault[] = [
      {
        name: "the disk fills up during a download of unknown size (chunked reply)",
        disk: "1m",
        setup: async ({ body }) => {
          const server = await httpServer((_req, res) => {
            res.writeHead(200, { "Content-Type": "application/octet-stream" });
            res.end(body);
          });
          return { url: server.url(), server };
        },
        error: () =>
          /fetch-image: error: cannot download http:\S+: cannot write \S+\/win\.vhdx\.partial: error writing '\S+win\.vhdx\.partial': No space left on device$/m,
        requests: 1,
        retried: false,
      },
      {
        name: "no room for a download of known size (file://): refused before writing",
        disk: "1m",
        setup: async ({ root: r, body }) => {
          const src = path.join(r, "new.bin");
          fs.writeFileSync(src, body);
          return { url: `file://${src}` };
        },
        error: () =>
          /cannot download file:\S+: not enough space for \S+win\.vhdx\.partial: the download needs 3 MiB, [01] MiB free on \S+\/vm$/m,
        retried: false,
      },
      {
        name: "permission denied writing DEST.partial (run as nobody)",
        setup: async ({ body }) => {
          const server = await httpServer((_req, res) =>
            res.writeHead(200, { "Content-Length": body.length }).end(body),
          );
          return { url: server.url(), server, nobody: true };
        },
        error: () => /cannot write \S+win\.vhdx\.partial: failed to open '\S+win\.vhdx\.partial': Permission denied$/m,
        retried: false,
      },
      {
        name: "permission denied reading a file:// source (run as nobody)",
        setup: async ({ root: r, body }) => {
          const src = path.join(r, "secret-source.bin");
          fs.writeFileSync(src, body, { mode: 0o600 });
          return { url: `file://${src}`, nobody: true };
        },
        error: () =>
          /copy from \S+secret-source\.bin to \S+ failed: failed to open '\S+secret-source\.bin': Permission denied$/m,
        retried: false,
      },
      {
        name: "DEST.partial is a directory",
        setup: async ({ body }) => {
          fs.mkdirSync(path.join(vm, "win.vhdx.partial"));
          const server = await httpServer((_req, res) =>
            res.writeHead(200, { "Content-Length": body.length }).end(body),
          );
          return { url: server.url(), server };
        },
        error: () => /win\.vhdx\.partial is a directory, not a download in progress: remove it$/m,
        requests: 0,
        retried: false,
        leaves: ["win.vhdx.partial"],
      },
      {
        name: "DEST.partial is a symbolic link (never followed)",
        setup: async ({ root: r, body }) => {
          const victim = path.join(r, "victim");
          fs.writeFileSync(victim, "keep me");
          fs.symlinkSync(victim, path.join(vm, "win.vhdx.partial"));
          const server = await httpServer((_req, res) =>
            res.writeHead(200, { "Content-Length": body.length }).end(body),
          );
          return { url: server.url(), server };
        },
        error: () => /win\.vhdx\.partial is a symbolic link \(to \S+\/victim\); refusing to follow it: remove it$/m,
        requests: 0,
        retried: false,
        leaves: ["win.vhdx.partial"],
      },
      {
        name: "HTTP 404",
        setup: async () => {
          const server = await httpServer((_req, res) => res.writeHead(404).end("not found"));
          return { url: server.url(), server };
        },
        error: () =>
          /cannot download http:\S+: curl exit 22 \(HTTP 404\): curl: \(22\) The requested URL returned error: 404$/m,
        requests: 1,
        retried: false,
      },
      {
        name: "HTTP 403",
        setup: async () => {
          const server = await httpServer((_req, res) => res.writeHead(403).end("forbidden"));
          return { url: server.url(), server };
        },
        error: () => /cannot download http:\S+: curl exit 22 \(HTTP 403\)/,
        requests: 1,
        retried: false,
      },
      {
        name: "HTTP 503 on every attempt (retried, bounded)",
        setup: async () => {
          const server = await httpServer((_req, res) => res.writeHead(503).end("busy"));
          return { url: server.url(), server };
        },
        error: () => /could not download http:\S+ after 3 attempt\(s\): curl exit 22 \(HTTP 503\)/,
        requests: 3,
        retried: true,
      },
      {
        name: "a server that accepts and never answers (stall timeout, retried, bounded)",
        setup: async () => {
          const server = await rawServer(() => undefined);
          return { url: server.url(), server, env: { ...timeouts, FETCH_RETRIES: "2" } };
        },
        error: () =>
          /could not download http:\S+ after 2 attempt\(s\): curl exit 28 \(HTTP none\): curl: \(28\) Operation too slow/,
        requests: 2,
        retried: true,
      },
      {
        name: "a server that stalls halfway through the body (resumed, then bounded)",
        setup: async ({ body }) => {
          const server = await httpServer((req, res) => {
            const m = /^bytes=(\d+)-$/.exec(req.headers.range ?? "");
            const start = m ? Number(m[1]) : 0;
            const part = body.subarray(start);
            const headers: http.OutgoingHttpHeaders = { "Content-Length": part.length };
            if (m) headers["Content-Range"] = `bytes ${start}-${body.length - 1}/${body.length}`;
            res.writeHead(m ? 206 : 200, headers);
            res.write(part.subarray(0, Math.floor(part.length / 2)));
          });
          return { url: server.url(), server, env: { ...timeouts, FETCH_RETRIES: "2" } };
        },
        error: () =>
          /could not download http:\S+ after 2 attempt\(s\): curl exit 28 \(HTTP 20[06]\): curl: \(28\) Operation too slow/,
        requests: 2,
        retried: true,
      },
      {
        name: "garbage instead of HTTP",
        setup: async () => {
          const server = await rawServer((s) => s.end("SSH-2.0-OpenSSH_9.2\r\n\x00\x01\x02 not http at all\r\n"));
          return { url: server.url(), server };
        },
        error: () =>
          /could not download http:\S+ after 3 attempt\(s\): curl exit (1|8) \(HTTP none\): curl: \((1|8)\) (Received HTTP\/0\.9 when not allowed|Weird server reply)/,
        requests: 3,
        retried: true,
      },
      {
        name: "the connection is reset in the middle of every reply (resumed, then bounded)",
        setup: async ({ body }) => {
          const server = await httpServer((req, res) => {
            const m = /^bytes=(\d+)-$/.exec(req.headers.range ?? "");
            const start = m ? Number(m[1]) : 0;
            const part = body.subarray(start);
            const headers: http.OutgoingHttpHeaders = { "Content-Length": part.length };
            if (m) headers["Content-Range"] = `bytes ${start}-${body.length - 1}/${body.length}`;
            res.writeHead(m ? 206 : 200, headers);
            res.write(part.subarray(0, Math.floor(part.length / 3)), () => res.socket?.resetAndDestroy());
          });
          return { url: server.url(), server };
        },
        error: () =>
          /could not download http:\S+ after 3 attempt\(s\): curl exit (18|56) \(HTTP 20[06]\): curl: \((18|56)\)/,
        requests: 3,
        retried: true,
      },
      {
        name: "an endless reply without a size, over FETCH_MAX_BYTES",
        setup: async () => {
          const server = await httpServer((_req, res) => {
            res.writeHead(200);
            const chunk = Buffer.alloc(64 * 1024, 0x5a);
            const pump = () => {
              let more = true;
              while (more && !res.destroyed) more = res.write(chunk);
              if (!res.destroyed) res.once("drain", pump);
            };
            pump();
          });
          return { url: server.url(), server, env: { FETCH_MAX_BYTES: String(MIB) } };
        },
        error: () =>
          /cannot download http:\S+: the download is larger than FETCH_MAX_BYTES \(1048576 bytes\) and the server gave no size/,
        requests: 1,
        retried: false,
      },
      {
        name: "a Content-Length over FETCH_MAX_BYTES",
        setup: async ({ body }) => {
          const server = await httpServer((_req, res) =>
            res.writeHead(200, { "Content-Length": body.length }).end(body),
          );
          return { url: server.url(), server, env: { FETCH_MAX_BYTES: String(MIB) } };
        },
        error: () =>
          /cannot download http:\S+: the server announces more than FETCH_MAX_BYTES \(1048576 bytes\) \(curl exit 63/,
        requests: 1,
        retried: false,
      },
      {
        name: "corrupted bytes from the server (checksum mismatch)",
        setup: async ({ body }) => {
          const bad = Buffer.from(body);
          bad[12345] ^= 0xff;
          const server = await httpServer((_req, res) => res.writeHead(200, { "Content-Length": bad.length }).end(bad));
          return { url: server.url(), server };
        },
        error: ({ sum }) =>
          new RegExp(
            `checksum mismatch for http:\\S+: expected sha256 ${sum}, actual [0-9a-f]{64} \\(the earlier \\S+win\\.vhdx is kept as it was\\)`,
          ),
        requests: 1,
        retried: false,
      },
      {
        name: "a truncated file on the server (checksum mismatch)",
        setup: async ({ body }) => {
          const cut = body.subarray(0, body.length - 4096);
          const server = await httpServer((_req, res) => res.writeHead(200, { "Content-Length": cut.length }).end(cut));
          return { url: server.url(), server };
        },
        error: ({ sum }) => new RegExp(`checksum mismatch for http:\\S+: expected sha256 ${sum}, actual [0-9a-f]{64}`),
        requests: 1,
        retried: false,
      },
    ];

    for (const f of faults) {
      it(f.name, async () => {
        dest = path.join(vm, "win.vhdx");
        const unmount = f.disk ? await tmpfs(vm, f.disk) : undefined;
        try {
          await earlierDownload();
          const body = crypto.randomBytes(3 * MIB);
          const ctx: Ctx = { root, body, sum: sha256(body) };
          const { url, env, server, nobody } = await f.setup(ctx);
          let r: RunResult;
          try {
            const e = { ...retries, TMPDIR: tmp, ...env };
            r = nobody
              ? await runAsNobody("fetch-image.sh", [url, ctx.sum, dest], e)
              : await run("bash", [script("fetch-image.sh"), url, ctx.sum, dest], { env: e, timeoutMs: 120000 });
          } finally {
            if (server && f.requests !== undefined) {
              expect(server.requests(), "requests the server saw").to.equal(f.requests);
            }
            await server?.stop();
          }
          expect(r.code, r.stderr).to.equal(1);
          expect(r.stdout).to.equal("");
          expect(r.stderr).to.match(f.error(ctx));
          if (f.retried) expect(r.stderr).to.match(/attempt 1\/[23] for /);
          else expect(r.stderr).to.not.contain("retrying");
          for (const line of r.stderr.split("\n")) expect(line.length).to.be.below(1024);
          expectEarlierIntact(f.leaves);
          if (f.name.includes("symbolic link"))
            expect(fs.readFileSync(path.join(root, "victim"), "utf8")).to.equal("keep me");
          await noProcessesLeft(root);
        } finally {
          if (unmount) await unmount();
        }
      });
    }

    it("DEST that is a symbolic link is refused (the file it points to is left as it was)", async () => {
      dest = path.join(vm, "win.vhdx");
      await earlierDownload();
      const images = path.join(root, "images");
      fs.mkdirSync(images);
      fs.renameSync(dest, path.join(images, "win.vhdx"));
      fs.symlinkSync(path.join(images, "win.vhdx"), dest);
      const body = crypto.randomBytes(MIB);
      const server = await httpServer((_req, res) => res.writeHead(200, { "Content-Length": body.length }).end(body));
      try {
        const r = await run("bash", [script("fetch-image.sh"), server.url(), sha256(body), dest], {
          env: { ...retries, TMPDIR: tmp },
        });
        expect(r.code).to.equal(1);
        expect(r.stderr).to.match(
          /DEST \S+win\.vhdx is a symbolic link \(to \S+images\/win\.vhdx\); refusing to follow it/,
        );
        expect(server.requests()).to.equal(0);
      } finally {
        await server.stop();
      }
      expect(sha256File(path.join(images, "win.vhdx"))).to.equal(oldSum);
      expect(fs.lstatSync(dest).isSymbolicLink()).to.equal(true);
      expect(tree(vm)).to.deep.equal(["win.vhdx", "win.vhdx.sha256"]);
    });

    it("an S3 object over FETCH_MAX_BYTES, and an S3 endpoint that never answers", async () => {
      dest = path.join(vm, "win.vhdx");
      await earlierDownload();
      const sum = "e".repeat(64);
      const silent = await rawServer(() => undefined);
      const big = await httpServer((_req, res) => {
        // Enough of S3's HeadObject for the aws CLI: a 5 GiB object.
        const headers = {
          "Content-Length": String(5 * 1024 * MIB),
          ETag: '"abc"',
          "Last-Modified": new Date().toUTCString(),
        };
        res.writeHead(200, headers).end();
      });
      const aws = {
        AWS_ACCESS_KEY_ID: "x",
        AWS_SECRET_ACCESS_KEY: "x",
        AWS_DEFAULT_REGION: "us-east-1",
        AWS_CONFIG_FILE: path.join(root, "none"),
        AWS_SHARED_CREDENTIALS_FILE: path.join(root, "none"),
        AWS_EC2_METADATA_DISABLED: "true",
        AWS_MAX_ATTEMPTS: "1",
        TMPDIR: tmp,
        ...retries,
        ...timeouts,
        FETCH_RETRIES: "2",
      };
      try {
        const r1 = await run("bash", [script("fetch-image.sh"), "s3://images/win.vhdx", sum, dest], {
          env: { ...aws, S3_ENDPOINT_URL: big.base, FETCH_MAX_BYTES: String(64 * MIB) },
          timeoutMs: 120000,
        });
        expect(r1.code, r1.stderr).to.equal(1);
        expect(r1.stderr).to.contain(
          "cannot download s3://images/win.vhdx: s3://images/win.vhdx is 5368709120 bytes, more than FETCH_MAX_BYTES (67108864 bytes)",
        );
        expect(r1.stderr).to.not.contain("retrying");
        expectEarlierIntact();
        const r2 = await run("bash", [script("fetch-image.sh"), "s3://images/win.vhdx", sum, dest], {
          env: { ...aws, S3_ENDPOINT_URL: silent.base },
          timeoutMs: 150000,
        });
        expect(r2.code, r2.stderr).to.equal(1);
        expect(r2.stderr).to.match(
          /could not download s3:\/\/images\/win\.vhdx after 2 attempt\(s\): .*(timeout|timed out)/i,
        );
        expect(silent.requests()).to.be.at.least(2);
        expectEarlierIntact();
      } finally {
        await silent.stop();
        await big.stop();
      }
      await noProcessesLeft(root);
    });

    it("SIGTERM during a download (a stage's bound): DEST.partial removed, the earlier DEST intact", async () => {
      dest = path.join(vm, "win.vhdx");
      await earlierDownload();
      const body = crypto.randomBytes(4 * MIB);
      const server = await httpServer(slowBody(body, 64 * 1024, 100));
      try {
        const args = [script("fetch-image.sh"), server.url(), sha256(body), dest];
        const k = await runKilledAfter("bash", args, 60000, {
          env: { ...retries, TMPDIR: tmp },
          signal: "SIGTERM",
          // Some of the body written: the signal lands mid-download, with DEST.partial there.
          when: () => (fs.statSync(`${dest}.partial`, { throwIfNoEntry: false })?.size ?? 0) > 0,
        });
        expect(k.killed, "still downloading when the signal came").to.equal(true);
        expect(k.code, k.stderr).to.equal(143);
        expect(k.stderr).to.contain("downloading http://");
      } finally {
        await server.stop();
      }
      expectEarlierIntact();
      await noProcessesLeft(root);
    });

    it("SIGKILL at random points of a download, then a rerun: DEST is the earlier file or the new one, never a part", async () => {
      dest = path.join(vm, "win.vhdx");
      await earlierDownload();
      const body = crypto.randomBytes(4 * MIB);
      const sum = sha256(body);
      const server = await httpServer(slowBody(body, 128 * 1024, 25));
      const env = { ...retries, TMPDIR: tmp };
      const args = [script("fetch-image.sh"), server.url(), sum, dest];
      try {
        // How long an undisturbed run takes, then back to the earlier file.
        const t0 = Date.now();
        expect((await run("bash", args, { env })).code).to.equal(0);
        const full = Date.now() - t0;
        const reset = async () => {
          const src = path.join(root, "old.bin");
          fs.writeFileSync(src, oldBody);
          const r = await run("bash", [script("fetch-image.sh"), `file://${src}`, oldSum, dest], { env });
          expect(r.code, r.stderr).to.equal(0);
          fs.rmSync(src);
        };
        await reset();
        const points = [0.05, ...Array.from({ length: 2 }, () => Math.random()), 0.97].map((x) => Math.round(x * full));
        for (const ms of points) {
          const k = await runKilledAfter("bash", args, ms, { env });
          const now = sha256File(dest);
          expect([oldSum, sum], `DEST after a kill at ${ms} of ${full} ms`).to.include(now);
          await noProcessesLeft(root);
          const again = await run("bash", args, { env });
          expect(again.code, `rerun after a kill at ${ms} ms: ${again.stderr}`).to.equal(0);
          expect(sha256File(dest)).to.equal(sum);
          expect(tree(vm), `after a kill at ${ms} ms (killed: ${k.killed}) and a rerun`).to.deep.equal([
            "win.vhdx",
            "win.vhdx.sha256",
          ]);
          expect(fs.readFileSync(`${dest}.sha256`, "utf8")).to.match(new RegExp(`^${sum} ${body.length} `));
          expect(tree(tmp)).to.deep.equal([]);
          await reset();
        }
      } finally {
        await server.stop();
      }
    });
  });

  // --- prepare-disk.sh ------------------------------------------------------------
  describe("prepare-disk.sh", () => {
    let disk: string;
    let oldSrc: string;
    let oldHash: string;
    let oldStamp: string;

    async function vhdx(file: string, pattern: string, dataMiB = 1, size = "64M"): Promise<void> {
      await runOk("qemu-img", ["create", "-q", "-f", "vhdx", file, size]);
      await runOk("qemu-io", ["-f", "vhdx", "-c", `write -P ${pattern} 1M ${dataMiB}M`, file]);
    }

    /** A random-content VHDX (incompressible, slow enough to kill mid-way). */
    async function randomVhdx(file: string, dataMiB: number): Promise<void> {
      const raw = `${file}.raw`;
      fs.writeFileSync(raw, crypto.randomBytes(dataMiB * MIB));
      await runOk("qemu-img", ["convert", "-f", "raw", "-O", "vhdx", raw, file]);
      fs.rmSync(raw);
    }

    /** The VM disk prepared from an earlier source, with its stamp. */
    async function earlierDisk(): Promise<void> {
      oldSrc = path.join(root, "old.vhdx");
      await vhdx(oldSrc, "0x11");
      const r = await run("bash", [script("prepare-disk.sh"), oldSrc, disk]);
      expect(r.code, r.stderr).to.equal(0);
      oldHash = sha256File(disk);
      oldStamp = fs.readFileSync(`${disk}.source-sha256`, "utf8");
    }

    function expectEarlierIntact(): void {
      expect(sha256File(disk), "the earlier disk").to.equal(oldHash);
      expect(fs.readFileSync(`${disk}.source-sha256`, "utf8"), "its stamp").to.equal(oldStamp);
      expect(tree(vm), "the VM folder").to.deep.equal(["disk.qcow2", "disk.qcow2.source-sha256"]);
    }

    interface Fault {
      name: string;
      disk?: string;
      nobody?: boolean;
      /** Makes the new source; returns its path. */
      source(): Promise<string>;
      error: RegExp;
    }
    const faults: Fault[] = [
      {
        name: "the disk fills up during the conversion",
        disk: "3m",
        source: async () => {
          const src = path.join(root, "new.vhdx");
          await randomVhdx(src, 8);
          return src;
        },
        error: /qemu-img convert of \S+new\.vhdx \(vhdx\) to qcow2 failed: .*No space left on device/,
      },
      {
        name: "permission denied writing DEST.partial (run as nobody)",
        nobody: true,
        source: async () => {
          const src = path.join(root, "new.vhdx");
          await vhdx(src, "0x22");
          return src;
        },
        error: /qemu-img convert of \S+new\.vhdx \(vhdx\) to qcow2 failed: .*Permission denied/,
      },
      {
        name: "a truncated VHDX",
        source: async () => {
          const src = path.join(root, "new.vhdx");
          await vhdx(src, "0x22", 8);
          fs.truncateSync(src, 3 * MIB);
          return src;
        },
        error:
          /qemu-img cannot read \S+new\.vhdx as a disk image \(truncated or corrupt\?\): qemu-img: Could not open '\S+new\.vhdx'/,
      },
      {
        name: "garbage named .vhdx (probes as raw: not a disk)",
        source: async () => {
          const src = path.join(root, "new.vhdx");
          fs.writeFileSync(src, crypto.randomBytes(2 * MIB));
          return src;
        },
        error:
          /new\.vhdx is named as vhdx but qemu-img finds no vhdx header in it \(it probes as raw\): truncated, corrupt or not a vhdx image/,
      },
      {
        name: "a qcow2 named .vhdx (the probe differs from the name)",
        source: async () => {
          const src = path.join(root, "new.vhdx");
          await runOk("qemu-img", ["create", "-q", "-f", "qcow2", src, "64M"]);
          return src;
        },
        error: /new\.vhdx is named as vhdx but qemu-img probes it as qcow2/,
      },
      {
        name: "garbage without a format in its name",
        source: async () => {
          const src = path.join(root, "new.download");
          fs.writeFileSync(src, crypto.randomBytes(MIB));
          return src;
        },
        error:
          /new\.download has no header of a disk format qemu-img knows \(it probes as raw\) and its name does not say raw/,
      },
      {
        name: "a truncated qcow2 (qemu-img check finds corruptions)",
        source: async () => {
          const src = path.join(root, "new.qcow2");
          await runOk("qemu-img", ["create", "-q", "-f", "qcow2", src, "128M"]);
          await runOk("qemu-io", ["-f", "qcow2", "-c", "write -P 0x42 0 8M", src]);
          fs.truncateSync(src, 2 * MIB);
          return src;
        },
        error:
          /qemu-img check found \S+new\.qcow2 damaged \([1-9]\d* corruptions, 0 leaked clusters, 0 check errors\): truncated or corrupt; fetch it again$/m,
      },
      {
        name: "a qcow2 with a backing file",
        source: async () => {
          const base = path.join(root, "base.qcow2");
          await runOk("qemu-img", ["create", "-q", "-f", "qcow2", base, "64M"]);
          const src = path.join(root, "new.qcow2");
          await runOk("qemu-img", ["create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", src]);
          return src;
        },
        error: /new\.qcow2 has a backing file \(\S+base\.qcow2\): the VM disk must be self-contained/,
      },
      {
        name: "a qcow2 that keeps its data in an external data file",
        source: async () => {
          const src = path.join(root, "new.qcow2");
          await runOk("qemu-img", ["create", "-q", "-f", "qcow2", "-o", `data_file=${root}/data.raw`, src, "64M"]);
          return src;
        },
        error: /new\.qcow2 keeps its data in an external file \(\S+data\.raw\): the VM disk must be self-contained/,
      },
      {
        name: "a vmdk whose data lives in another file (flat extent)",
        source: async () => {
          const src = path.join(root, "new.vmdk");
          await runOk("qemu-img", ["create", "-q", "-f", "vmdk", "-o", "subformat=monolithicFlat", src, "64M"]);
          return src;
        },
        error:
          /new\.vmdk keeps its data in another file \(\S+new-flat\.vmdk, a vmdk extent\): the VM disk must be self-contained/,
      },
      {
        name: "an .iso that is not an ISO",
        source: async () => {
          const src = path.join(root, "new.iso");
          fs.writeFileSync(src, crypto.randomBytes(MIB));
          return src;
        },
        error:
          /new\.iso is named \.iso but is not an ISO 9660 or UDF image \(no CD001\/BEA01 volume descriptor at sector 16\)/,
      },
      {
        name: "a truncated ISO",
        source: async () => {
          const content = path.join(root, "iso-content");
          fs.mkdirSync(content);
          fs.writeFileSync(path.join(content, "install.wim"), crypto.randomBytes(2 * MIB));
          const src = path.join(root, "new.iso");
          await runOk("xorriso", ["-as", "mkisofs", "-quiet", "-o", src, content]);
          fs.truncateSync(src, MIB);
          return src;
        },
        error: /new\.iso is truncated: its ISO 9660 volume is \d+ bytes, the file 1048576 bytes/,
      },
    ];

    for (const f of faults) {
      it(f.name, async () => {
        disk = path.join(vm, "disk.qcow2");
        const unmount = f.disk ? await tmpfs(vm, f.disk) : undefined;
        try {
          await earlierDisk();
          const src = await f.source();
          const r = f.nobody
            ? await runAsNobody("prepare-disk.sh", [src, disk])
            : await run("bash", [script("prepare-disk.sh"), src, disk], { timeoutMs: 120000 });
          expect(r.code, r.stderr).to.equal(1);
          expect(r.stdout).to.equal("");
          expect(r.stderr).to.match(f.error);
          for (const line of r.stderr.split("\n")) expect(line.length).to.be.below(1024);
          expectEarlierIntact();
          await noProcessesLeft(root);
        } finally {
          if (unmount) await unmount();
        }
      });
    }

    it("SIGTERM during a conversion (a stage's bound): DEST.partial removed, the earlier disk intact", async () => {
      disk = path.join(vm, "disk.qcow2");
      await earlierDisk();
      const src = path.join(root, "new.vhdx");
      await randomVhdx(src, 96);
      fs.writeFileSync(`${src}.sha256`, `${"d".repeat(64)} ${(await runOk("stat", ["-c", "%s %.9Y", src])).trim()}\n`);
      // A qemu-img whose convert writes DEST.partial, marks it, then takes its time: the signal
      // lands while the partial disk is there.
      const bin = path.join(root, "bin");
      fs.mkdirSync(bin);
      const real = (await runOk("bash", ["-c", "command -v qemu-img"])).trim();
      fs.writeFileSync(
        path.join(bin, "qemu-img"),
        `#!/usr/bin/env bash\nif [[ $1 == convert ]]; then ${real} "$@" || exit; touch ${root}/converted; sleep 30; exit 0; fi\nexec ${real} "$@"\n`,
        { mode: 0o755 },
      );
      const converted = path.join(root, "converted");
      const k = await runKilledAfter("bash", [script("prepare-disk.sh"), src, disk], 60000, {
        env: { PATH: `${bin}:${process.env.PATH}` },
        signal: "SIGTERM",
        when: () => fs.existsSync(converted),
      });
      expect(k.killed).to.equal(true);
      expect(k.code, k.stderr).to.equal(143);
      expect(k.stderr).to.contain("converting");
      expect(fs.existsSync(converted), "DEST.partial was written before the signal").to.equal(true);
      expectEarlierIntact();
      await noProcessesLeft(root);
    });

    it("SIGKILL at random points of a conversion, then a rerun: the earlier disk and stamp, or the new ones", async () => {
      disk = path.join(vm, "disk.qcow2");
      await earlierDisk();
      const src = path.join(root, "new.vhdx");
      await randomVhdx(src, 48);
      const newSha = sha256File(src);
      const args = [script("prepare-disk.sh"), src, disk];
      // Without the source's stamp every run hashes it first: kills land in the hash too.
      const unstamp = () => fs.rmSync(`${src}.sha256`, { force: true });
      const t0 = Date.now();
      expect((await run("bash", args)).code).to.equal(0);
      const full = Date.now() - t0;
      const reset = async () => {
        const r = await run("bash", [script("prepare-disk.sh"), oldSrc, disk]);
        expect(r.code, r.stderr).to.equal(0);
        oldHash = sha256File(disk);
      };
      await reset();
      const oldSha = oldStamp.trim();
      const points = [0.05, ...Array.from({ length: 2 }, () => Math.random()), 0.95].map((x) => Math.round(x * full));
      for (const ms of points) {
        unstamp();
        const k = await runKilledAfter("bash", args, ms);
        await noProcessesLeft(root);
        const stampFile = `${disk}.source-sha256`;
        const stamp = fs.existsSync(stampFile) ? fs.readFileSync(stampFile, "utf8").trim() : undefined;
        const what = `after a kill at ${ms} of ${full} ms (killed: ${k.killed})`;
        if (stamp === oldSha) {
          expect(sha256File(disk), `${what}: the stamp says earlier source`).to.equal(oldHash);
        } else if (stamp === newSha) {
          const cmp = await run("qemu-img", ["compare", "-f", "vhdx", "-F", "qcow2", src, disk]);
          expect(cmp.code, `${what}: the stamp says new source`).to.equal(0);
        } else {
          expect(stamp, `${what}: a stamp naming neither source`).to.equal(undefined);
        }
        const again = await run("bash", args);
        expect(again.code, `rerun ${what}: ${again.stderr}`).to.equal(0);
        expect(fs.readFileSync(stampFile, "utf8").trim()).to.equal(newSha);
        expect((await run("qemu-img", ["compare", "-f", "vhdx", "-F", "qcow2", src, disk])).code).to.equal(0);
        expect(tree(vm), `${what} and a rerun`).to.deep.equal(["disk.qcow2", "disk.qcow2.source-sha256"]);
        await reset();
      }
    });
  });

  // --- stop-vm.sh ------------------------------------------------------------------
  describe("stop-vm.sh", () => {
    const qemus: ChildProcess[] = [];
    afterEach(async () => {
      for (const q of qemus.splice(0)) {
        if (q.exitCode === null && q.signalCode === null) {
          try {
            process.kill(q.pid!, "SIGCONT");
          } catch {
            /* gone */
          }
          q.kill("SIGKILL");
          await new Promise((r) => q.once("exit", r));
        }
      }
    });

    /** A paused QEMU (no guest) with a QMP socket and pid file in DIR, as run-vm.sh lays them out. */
    async function qemuIn(dir: string): Promise<{ pid: number; sock: string; pidFile: string }> {
      fs.mkdirSync(dir, { recursive: true });
      const sock = path.join(dir, "qmp.sock");
      const pidFile = path.join(dir, "qemu.pid");
      const q = spawn(
        "qemu-system-aarch64",
        [
          ...["-M", "virt", "-cpu", "max", "-accel", "tcg", "-m", "128", "-S", "-nodefaults"],
          ...["-display", "none", "-serial", "none", "-nic", "none"],
          ...["-chardev", `socket,id=qmp0,path=${sock},server=on,wait=off`, "-mon", "chardev=qmp0,mode=control"],
          ...["-pidfile", pidFile],
        ],
        { stdio: "ignore" },
      );
      qemus.push(q);
      for (let i = 0; i < 200 && !(fs.existsSync(sock) && fs.existsSync(pidFile)); i++) await sleep(50);
      expect(fs.existsSync(sock), "QMP socket").to.equal(true);
      return { pid: q.pid!, sock, pidFile };
    }

    it("a pid file naming another VM's QEMU: that QEMU is left alone, and this VM is already stopped", async () => {
      const other = await qemuIn(path.join(root, "other-vm"));
      fs.writeFileSync(path.join(vm, "qemu.pid"), `${other.pid}\n`);
      const r = await run("bash", [script("stop-vm.sh"), path.join(vm, "qmp.sock"), "1"], { timeoutMs: 60000 });
      expect(r.code, r.stderr).to.equal(0);
      expect(r.stdout).to.equal(
        `stop-vm: already stopped (no QMP socket at ${vm}/qmp.sock, no QEMU of this VM running)\n`,
      );
      expect(r.stderr).to.include(
        `names QEMU pid ${other.pid}, whose command line names neither ${vm}/qmp.sock nor ${vm}/disk.qcow2: not this VM's QEMU, left alone`,
      );
      await sleep(500);
      expect(alive(other.pid), "the other VM's QEMU").to.equal(true);
    });

    it("a pid file naming a process that is not QEMU: it is not signalled; this VM's QEMU is found by its command line", async () => {
      const ours = await qemuIn(vm);
      const bystander = spawn("sleep", ["60"], { stdio: "ignore" });
      try {
        fs.writeFileSync(ours.pidFile, `${bystander.pid}\n`);
        const r = await run("bash", [script("stop-vm.sh"), ours.sock, "1"], { timeoutMs: 60000 });
        expect(r.code, r.stderr).to.equal(0);
        expect(r.stderr).to.include(`QEMU pid ${ours.pid} of this VM found by its command line`);
        expect(r.stdout).to.equal("stop-vm: forced quit after timeout (1s): the guest did not power off\n");
        for (let i = 0; i < 50 && alive(ours.pid); i++) await sleep(100);
        expect(alive(ours.pid), "this VM's QEMU").to.equal(false);
        expect(alive(bystander.pid!), "the process the pid file named").to.equal(true);
      } finally {
        bystander.kill("SIGKILL");
      }
    });

    it("this VM's QEMU runs but its QMP socket was deleted: a failure naming the pid, not 'already stopped', nothing killed", async () => {
      const ours = await qemuIn(vm);
      fs.rmSync(ours.sock);
      const r = await run("bash", [script("stop-vm.sh"), ours.sock, "1"], { timeoutMs: 60000 });
      expect(r.code, r.stderr).to.equal(1);
      expect(r.stdout).to.equal("");
      expect(r.stderr).to.include(
        `stop-vm: error: QEMU pid ${ours.pid} of this VM is running but its QMP socket ${ours.sock} is missing: it was not stopped`,
      );
      expect(r.stderr).to.include(`kill ${ours.pid}`);
      expect(alive(ours.pid)).to.equal(true);
    });

    it("this VM's QEMU does not answer on QMP (stopped) and its pid file is gone: found by its command line, a failure, nothing killed", async () => {
      const ours = await qemuIn(vm);
      fs.rmSync(ours.pidFile);
      process.kill(ours.pid, "SIGSTOP");
      const r = await run("bash", [script("stop-vm.sh"), ours.sock, "1"], { timeoutMs: 60000 });
      expect(r.code, r.stderr).to.equal(1);
      expect(r.stdout).to.equal("");
      expect(r.stderr).to.include(`QEMU pid ${ours.pid} of this VM found by its command line`);
      expect(r.stderr).to.include(
        `QEMU pid ${ours.pid} of this VM is running but does not answer on its QMP socket ${ours.sock} (hung or stopped?): it was not stopped`,
      );
      expect(alive(ours.pid)).to.equal(true);
    });
  });

  // --- build-config-iso.sh ------------------------------------------------------------
  describe("build-config-iso.sh", () => {
    const SECRET = "fault-table-answer-secret-9f3b";
    const answer = (n: number) => `<unattend><password>${SECRET}-${n}</password></unattend>\n`;
    let iso: string;
    let keys: string;
    let oldIsoHash: string;
    let oldStamp: string;

    async function earlierIso(): Promise<void> {
      keys = path.join(root, "authorized_keys");
      fs.writeFileSync(keys, "ssh-ed25519 AAAAfaults test\n");
      const r = await run("bash", [script("build-config-iso.sh"), iso, "-=autounattend.xml", keys], {
        input: answer(0),
        env: { TMPDIR: tmp },
      });
      expect(r.code, r.stderr).to.equal(0);
      oldIsoHash = sha256File(iso);
      oldStamp = fs.readFileSync(`${iso}.stamp`, "utf8");
    }

    function expectEarlierIntact(): void {
      expect(sha256File(iso), "the earlier ISO").to.equal(oldIsoHash);
      expect(fs.readFileSync(`${iso}.stamp`, "utf8"), "its stamp").to.equal(oldStamp);
      expect(tree(vm), "the VM folder").to.deep.equal(["config.iso", "config.iso.stamp"]);
      expect(tree(tmp), "TMPDIR").to.deep.equal([]);
    }

    it("the output is a directory, or a symbolic link to one: refused, the directory untouched", async () => {
      const d = path.join(vm, "config.iso");
      fs.mkdirSync(d);
      fs.writeFileSync(path.join(d, "keep"), "x");
      const r1 = await run("bash", [script("build-config-iso.sh"), d, "-=autounattend.xml"], { input: answer(1) });
      expect(r1.code).to.equal(1);
      expect(r1.stderr).to.include(`build-config-iso: output ${d} is a directory; give the path of an ISO file`);
      const link = path.join(root, "link.iso");
      fs.symlinkSync(d, link);
      const r2 = await run("bash", [script("build-config-iso.sh"), link, "-=autounattend.xml"], { input: answer(1) });
      expect(r2.code).to.equal(1);
      expect(r2.stderr).to.include(`output ${link} is a symbolic link to a directory (${d})`);
      expect(tree(vm)).to.deep.equal(["config.iso", "config.iso/keep"]);
      expect(filesContaining(root, SECRET)).to.deep.equal([]);
    });

    it("the disk fills up while staging: the cause named, the earlier ISO intact, no copy of the answer file left", async () => {
      iso = path.join(vm, "config.iso");
      const unmount = await tmpfs(vm, "1m");
      try {
        await earlierIso();
        const big = path.join(root, "OpenSSH-ARM64.zip");
        fs.writeFileSync(big, crypto.randomBytes(2 * MIB));
        const r = await run("bash", [script("build-config-iso.sh"), iso, "-=autounattend.xml", keys, big], {
          input: answer(1),
          env: { TMPDIR: tmp },
        });
        expect(r.code, r.stderr).to.equal(1);
        expect(r.stderr).to.match(
          /build-config-iso: (cannot copy \S+OpenSSH-ARM64\.zip: error writing '\S+': |xorriso failed to write \S+: )No space left on device/,
        );
        expectEarlierIntact();
        expect(filesContaining(root, SECRET)).to.deep.equal(["vm/config.iso"]);
      } finally {
        await unmount();
      }
    });

    it("no room on the disk for the new ISO (xorriso checks before writing): the cause named, the earlier ISO intact", async () => {
      iso = path.join(vm, "config.iso");
      const unmount = await tmpfs(vm, "2m");
      try {
        await earlierIso();
        const big = path.join(root, "OpenSSH-ARM64.zip");
        fs.writeFileSync(big, crypto.randomBytes(1200 * 1024));
        const r = await run("bash", [script("build-config-iso.sh"), iso, "-=autounattend.xml", keys, big], {
          input: answer(1),
          env: { TMPDIR: tmp },
        });
        expect(r.code, r.stderr).to.equal(1);
        expect(r.stderr).to.match(
          /build-config-iso: xorriso failed to write \S+config\.iso: (No space left on device|not enough space on the device \(Image size \d+s exceeds free space on media \d+s; s = 2048-byte sectors\))$/m,
        );
        expectEarlierIntact();
        expect(filesContaining(root, SECRET)).to.deep.equal(["vm/config.iso"]);
      } finally {
        await unmount();
      }
    });

    it("a killed run's work folder (with an answer file copy) is cleared by the next run, even one with nothing to build", async () => {
      iso = path.join(vm, "config.iso");
      await earlierIso();
      const stale = path.join(vm, ".config-iso-work.999999999.AbCdEf");
      fs.mkdirSync(path.join(stale, "tree"), { recursive: true, mode: 0o700 });
      fs.writeFileSync(path.join(stale, "tree", "autounattend.xml"), answer(7));
      const r = await run("bash", [script("build-config-iso.sh"), iso, "-=autounattend.xml", keys], {
        input: answer(0),
        env: { TMPDIR: tmp },
      });
      expect(r.code, r.stderr).to.equal(0);
      expect(r.stderr).to.include("is up to date");
      expectEarlierIntact();
      expect(filesContaining(root, SECRET)).to.deep.equal(["vm/config.iso"]);
    });

    it("SIGKILL at random points, then a rerun: the earlier ISO or the new one, and no copy of the answer file anywhere", async () => {
      iso = path.join(vm, "config.iso");
      await earlierIso();
      const payload = path.join(root, "payload.bin");
      fs.writeFileSync(payload, crypto.randomBytes(8 * MIB));
      const args = [script("build-config-iso.sh"), iso, "-=autounattend.xml", keys, payload];
      const env = { TMPDIR: tmp };
      const t0 = Date.now();
      const first = await run("bash", args, { input: answer(1), env });
      expect(first.code, first.stderr).to.equal(0);
      const full = Date.now() - t0;
      const reset = async () => {
        const r = await run("bash", [script("build-config-iso.sh"), iso, "-=autounattend.xml", keys], {
          input: answer(0),
          env,
        });
        expect(r.code, r.stderr).to.equal(0);
        oldIsoHash = sha256File(iso);
      };
      await reset();
      const points = [0.02, ...Array.from({ length: 2 }, () => Math.random()), 0.95].map((x) => Math.round(x * full));
      for (const [i, ms] of points.entries()) {
        const k = await runKilledAfter("bash", args, ms, { input: answer(i + 2), env });
        await noProcessesLeft(root);
        const what = `after a kill at ${ms} of ${full} ms (killed: ${k.killed})`;
        if (sha256File(iso) !== oldIsoHash) {
          const ls = await run("xorriso", ["-indev", iso, "-find", "/", "-type", "f"]);
          expect(ls.code, `${what}: a complete new ISO`).to.equal(0);
          expect(ls.stdout).to.include("/autounattend.xml");
          expect(ls.stdout).to.include("/payload.bin");
        }
        const again = await run("bash", args, { input: answer(i + 2), env });
        expect(again.code, `rerun ${what}: ${again.stderr}`).to.equal(0);
        expect(tree(vm), `${what} and a rerun`).to.deep.equal(["config.iso", "config.iso.stamp"]);
        expect(filesContaining(root, SECRET), `${what} and a rerun`).to.deep.equal(["vm/config.iso"]);
        expect(tree(tmp)).to.deep.equal([]);
        await reset();
      }
    });
  });
});
