import { expect } from "chai";
import * as crypto from "crypto";
import * as fs from "fs";
import * as http from "http";
import * as os from "os";
import * as path from "path";
import { sha256 } from "../support/disk";
import { freePort, pathWithout, runOk, runScript } from "../support/run";
import { awsEnv, startS3, S3Server } from "../support/s3";

/** Serves BODY at /image; honours "Range: bytes=N-"; the first FAIL_FIRST requests are cut halfway. */
async function startHttp(body: Buffer, failFirst = 0) {
  let requests = 0;
  const ranges: string[] = [];
  const server = http.createServer((req, res) => {
    requests++;
    if (req.url !== "/image") {
      res.writeHead(404).end("not found");
      return;
    }
    const m = /^bytes=(\d+)-$/.exec(req.headers.range ?? "");
    const start = m ? Number(m[1]) : 0;
    ranges.push(req.headers.range ?? "");
    if (start >= body.length) {
      res.writeHead(416, { "Content-Range": `bytes */${body.length}` }).end();
      return;
    }
    const part = body.subarray(start);
    const headers: http.OutgoingHttpHeaders = { "Content-Length": part.length, "Accept-Ranges": "bytes" };
    if (m) headers["Content-Range"] = `bytes ${start}-${body.length - 1}/${body.length}`;
    res.writeHead(m ? 206 : 200, headers);
    if (requests <= failFirst) {
      res.write(part.subarray(0, Math.floor(part.length / 2)), () => res.destroy());
    } else {
      res.end(part);
    }
  });
  const port = await freePort();
  await new Promise<void>((resolve) => server.listen(port, "127.0.0.1", resolve));
  return {
    url: `http://127.0.0.1:${port}/image`,
    base: `http://127.0.0.1:${port}`,
    ranges,
    requests: () => requests,
    stop: () => new Promise<void>((resolve) => server.close(() => resolve())),
  };
}

describe("fetch-image.sh", function () {
  this.timeout(120000);
  let dir: string;
  let body: Buffer;
  let sum: string;
  const fast = { FETCH_RETRIES: "2", FETCH_RETRY_DELAY_S: "0", FETCH_PROGRESS_INTERVAL_S: "1" };

  beforeEach(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), "fetch-"));
    body = crypto.randomBytes(3 * 1024 * 1024 + 17);
    sum = sha256(body);
  });
  afterEach(() => fs.rmSync(dir, { recursive: true, force: true }));

  describe("file://", () => {
    it("copies, verifies and stamps the file", async () => {
      const src = path.join(dir, "src image.vhdx");
      fs.writeFileSync(src, body);
      const dest = path.join(dir, "out", "win.vhdx");
      const r = await runScript("fetch-image.sh", [`file://${src.replace(/ /g, "%20")}`, sum, dest]);
      expect(r.code, r.stderr).to.equal(0);
      expect(r.stdout).to.equal("");
      expect(fs.readFileSync(dest).equals(body)).to.equal(true);
      const st = fs.statSync(dest);
      const [stSha, stSize] = fs.readFileSync(`${dest}.sha256`, "utf8").trim().split(" ");
      expect(stSha).to.equal(sum);
      expect(Number(stSize)).to.equal(st.size);
      expect(fs.existsSync(`${dest}.partial`)).to.equal(false);
      expect(r.stderr).to.match(/fetch-image: verified/);
    });

    it("does nothing on a rerun, and says so", async () => {
      const src = path.join(dir, "src.img");
      fs.writeFileSync(src, body);
      const dest = path.join(dir, "dest.img");
      const r1 = await runScript("fetch-image.sh", [`file://${src}`, sum, dest]);
      expect(r1.code, r1.stderr).to.equal(0);
      const before = fs.statSync(dest);
      const r2 = await runScript("fetch-image.sh", [`file://${src}`, sum.toUpperCase(), dest]);
      expect(r2.code, r2.stderr).to.equal(0);
      expect(r2.stderr).to.match(/already present and verified.*nothing to do/);
      expect(r2.stderr).to.not.match(/computing SHA-256/);
      const after = fs.statSync(dest);
      expect(after.mtimeMs).to.equal(before.mtimeMs);
      expect(after.ino).to.equal(before.ino);
    });

    it("re-hashes (and keeps) DEST when its stamp is stale", async () => {
      const dest = path.join(dir, "dest.img");
      fs.writeFileSync(dest, body);
      fs.writeFileSync(`${dest}.sha256`, `${sum} 1 2\n`);
      const r = await runScript("fetch-image.sh", ["file:///nonexistent/never-read", sum, dest]);
      expect(r.code, r.stderr).to.equal(0);
      expect(r.stderr).to.match(/computing SHA-256/);
      expect(r.stderr).to.match(/checksum matches; nothing to do/);
      expect(fs.readFileSync(`${dest}.sha256`, "utf8")).to.match(new RegExp(`^${sum} ${body.length} `));
    });

    it("resumes a partial copy", async () => {
      const src = path.join(dir, "src.img");
      fs.writeFileSync(src, body);
      const dest = path.join(dir, "dest.img");
      fs.writeFileSync(`${dest}.partial`, body.subarray(0, 1000000));
      const r = await runScript("fetch-image.sh", [`file://${src}`, sum, dest]);
      expect(r.code, r.stderr).to.equal(0);
      expect(r.stderr).to.contain("resuming copy");
      expect(fs.readFileSync(dest).equals(body)).to.equal(true);
    });

    it("on a wrong checksum exits non-zero naming both hashes, and leaves nothing behind", async () => {
      const src = path.join(dir, "src.img");
      fs.writeFileSync(src, body);
      const dest = path.join(dir, "dest.img");
      const wrong = "0".repeat(64);
      const r = await runScript("fetch-image.sh", [`file://${src}`, wrong, dest]);
      expect(r.code).to.not.equal(0);
      expect(r.stderr).to.contain(`expected sha256 ${wrong}`);
      expect(r.stderr).to.contain(`actual ${sum}`);
      expect(fs.readdirSync(dir)).to.deep.equal(["src.img"]);
    });

    it("retries a fresh download when a resumed partial file gives a wrong checksum", async () => {
      const src = path.join(dir, "src.img");
      fs.writeFileSync(src, body);
      const dest = path.join(dir, "dest.img");
      // A partial file left from some other download.
      fs.writeFileSync(`${dest}.partial`, Buffer.alloc(1000, 7));
      const r = await runScript("fetch-image.sh", [`file://${src}`, sum, dest]);
      expect(r.code, r.stderr).to.equal(0);
      expect(r.stderr).to.contain("downloading file://");
      expect(r.stderr).to.contain("again from the start");
      expect(fs.readFileSync(dest).equals(body)).to.equal(true);
    });

    it("keeps an earlier DEST (known from its stamp, not hashed again) until the new file is verified", async () => {
      const dest = path.join(dir, "dest.img");
      const old = crypto.randomBytes(4096);
      const oldSrc = path.join(dir, "old.img");
      fs.writeFileSync(oldSrc, old);
      expect((await runScript("fetch-image.sh", [`file://${oldSrc}`, sha256(old), dest])).code).to.equal(0);
      const src = path.join(dir, "src.img");
      fs.writeFileSync(src, body);
      const wrong = "2".repeat(64);
      const bad = await runScript("fetch-image.sh", [`file://${src}`, wrong, dest]);
      expect(bad.code).to.equal(1);
      expect(bad.stderr).to.contain(`holds another file (sha256 ${sha256(old)}, from its stamp)`);
      expect(bad.stderr).to.not.contain(`computing SHA-256 of ${dest} `);
      expect(bad.stderr).to.contain("the earlier");
      expect(fs.readFileSync(dest).equals(old)).to.equal(true);
      const good = await runScript("fetch-image.sh", [`file://${src}`, sum, dest]);
      expect(good.code, good.stderr).to.equal(0);
      expect(fs.readFileSync(dest).equals(body)).to.equal(true);
      expect(fs.readdirSync(dir).sort()).to.deep.equal(["dest.img", "dest.img.sha256", "old.img", "src.img"]);
    });

    it("removes the outdated DEST only when the new file would not fit beside it", async () => {
      const mnt = path.join(dir, "small");
      fs.mkdirSync(mnt);
      await runOk("mount", ["-t", "tmpfs", "-o", "size=5m", "tmpfs", mnt]);
      try {
        const dest = path.join(mnt, "win.vhdx");
        const old = crypto.randomBytes(2 * 1024 * 1024);
        const oldSrc = path.join(dir, "old.img");
        fs.writeFileSync(oldSrc, old);
        expect((await runScript("fetch-image.sh", [`file://${oldSrc}`, sha256(old), dest])).code).to.equal(0);
        const src = path.join(dir, "src.img");
        fs.writeFileSync(src, body);
        const r = await runScript("fetch-image.sh", [`file://${src}`, sum, dest]);
        expect(r.code, r.stderr).to.equal(0);
        expect(r.stderr).to.match(
          /only \d+ MiB free for a 3 MiB download: removing the outdated \S+win\.vhdx to make room/,
        );
        expect(fs.readFileSync(dest).equals(body)).to.equal(true);
        expect(fs.readdirSync(mnt).sort()).to.deep.equal(["win.vhdx", "win.vhdx.sha256"]);
      } finally {
        await runOk("umount", [mnt]);
      }
    });

    it("removes a leftover DEST.partial and a stamp temporary when DEST is already verified", async () => {
      const src = path.join(dir, "src.img");
      fs.writeFileSync(src, body);
      const dest = path.join(dir, "dest.img");
      expect((await runScript("fetch-image.sh", [`file://${src}`, sum, dest])).code).to.equal(0);
      fs.writeFileSync(`${dest}.partial`, "left by a killed run");
      fs.writeFileSync(`${dest}.sha256.Ab12Cd`, "left by a killed run");
      const r = await runScript("fetch-image.sh", [`file://${src}`, sum, dest]);
      expect(r.code, r.stderr).to.equal(0);
      expect(r.stderr).to.contain("nothing to do");
      expect(fs.readdirSync(dir).sort()).to.deep.equal(["dest.img", "dest.img.sha256", "src.img"]);
    });

    it("verifies with sha256sum when openssl is not installed", async () => {
      const src = path.join(dir, "src.img");
      fs.writeFileSync(src, body);
      const bin = pathWithout(["openssl"], path.join(dir, "bin"));
      const dest = path.join(dir, "dest.img");
      const r1 = await runScript("fetch-image.sh", [`file://${src}`, sum, dest], { env: { PATH: bin } });
      expect(r1.code, r1.stderr).to.equal(0);
      expect(fs.readFileSync(dest).equals(body)).to.equal(true);
      const wrong = "1".repeat(64);
      const r2 = await runScript("fetch-image.sh", [`file://${src}`, wrong, path.join(dir, "d2")], {
        env: { PATH: bin },
      });
      expect(r2.code).to.not.equal(0);
      expect(r2.stderr).to.contain(`actual ${sum}`);
    });

    it("fails at once, without retrying, when the file does not exist", async () => {
      const r = await runScript("fetch-image.sh", ["file:///no/such/image.vhdx", sum, path.join(dir, "d")], {
        env: { FETCH_RETRIES: "5", FETCH_RETRY_DELAY_S: "30" },
        timeoutMs: 20000,
      });
      expect(r.code).to.not.equal(0);
      expect(r.stderr).to.contain("cannot download file:///no/such/image.vhdx");
      expect(r.stderr).to.not.contain("retrying");
    });
  });

  describe("argument checks", () => {
    for (const bad of ["abc", "g".repeat(64), "0".repeat(63), ""]) {
      it(`rejects SHA256 '${bad.slice(0, 10)}...' (${bad.length} chars)`, async () => {
        const r = await runScript("fetch-image.sh", ["file:///x", bad, path.join(dir, "d")]);
        expect(r.code).to.not.equal(0);
        expect(r.stderr).to.contain("is not 64 hex digits");
      });
    }

    it("rejects an unsupported URL scheme", async () => {
      const r = await runScript("fetch-image.sh", ["ftp://example/x", sum, path.join(dir, "d")]);
      expect(r.code).to.not.equal(0);
      expect(r.stderr).to.contain("unsupported URL");
    });

    it("prints usage on a wrong argument count", async () => {
      const r = await runScript("fetch-image.sh", ["file:///x"]);
      expect(r.code).to.equal(2);
      expect(r.stderr).to.contain("usage: fetch-image.sh URL SHA256 DEST");
    });
  });

  describe("http(s)://", () => {
    it("resumes an interrupted download with a range request", async () => {
      const srv = await startHttp(body, 1);
      try {
        const dest = path.join(dir, "dest.img");
        const r = await runScript("fetch-image.sh", [srv.url, sum, dest], { env: fast });
        expect(r.code, r.stderr).to.equal(0);
        expect(r.stderr).to.contain("attempt 1/2");
        expect(r.stderr).to.match(/resuming http:\/\/127\.0\.0\.1:\d+\/image from byte [1-9]/);
        expect(srv.ranges[1]).to.match(/^bytes=[1-9]\d*-$/);
        expect(fs.readFileSync(dest).equals(body)).to.equal(true);
      } finally {
        await srv.stop();
      }
    });

    it("does not retry a 404, and names the URL", async () => {
      const srv = await startHttp(body);
      try {
        const url = `${srv.base}/missing`;
        const r = await runScript("fetch-image.sh", [url, sum, path.join(dir, "d")], {
          env: { FETCH_RETRIES: "4", FETCH_RETRY_DELAY_S: "0" },
        });
        expect(r.code).to.not.equal(0);
        expect(r.stderr).to.contain(`cannot download ${url}`);
        expect(r.stderr).to.contain("HTTP 404");
        expect(srv.requests()).to.equal(1);
        expect(fs.readdirSync(dir)).to.deep.equal([]);
      } finally {
        await srv.stop();
      }
    });

    it("gives up after FETCH_RETRIES attempts when the server is down", async () => {
      const port = await freePort();
      const url = `http://127.0.0.1:${port}/image`;
      const r = await runScript("fetch-image.sh", [url, sum, path.join(dir, "d")], { env: fast });
      expect(r.code).to.not.equal(0);
      expect(r.stderr).to.contain(`could not download ${url} after 2 attempt(s)`);
    });
  });

  describe("s3://", () => {
    let s3: S3Server;
    before(async () => {
      s3 = await startS3("images");
    });
    after(async () => {
      await s3.stop();
    });

    it("downloads from the S3 endpoint in S3_ENDPOINT_URL and verifies it", async () => {
      await s3.http.put("win/win.vhdx", body);
      const dest = path.join(dir, "dest", "win.vhdx");
      const r = await runScript("fetch-image.sh", ["s3://images/win/win.vhdx", sum, dest], {
        env: { ...s3.env, ...fast },
      });
      expect(r.code, r.stderr).to.equal(0);
      expect(fs.readFileSync(dest).equals(body)).to.equal(true);
      expect(fs.readdirSync(path.dirname(dest)).sort()).to.deep.equal(["win.vhdx", "win.vhdx.sha256"]);
      // A rerun does nothing.
      const mtime = fs.statSync(dest).mtimeMs;
      const r2 = await runScript("fetch-image.sh", ["s3://images/win/win.vhdx", sum, dest], { env: s3.env });
      expect(r2.code, r2.stderr).to.equal(0);
      expect(r2.stderr).to.contain("nothing to do");
      expect(fs.statSync(dest).mtimeMs).to.equal(mtime);
    });

    it("on a wrong checksum leaves neither DEST nor a partial file", async () => {
      await s3.http.put("win/bad.vhdx", body);
      const wrong = "ab".repeat(32);
      const dest = path.join(dir, "bad.vhdx");
      const r = await runScript("fetch-image.sh", ["s3://images/win/bad.vhdx", wrong, dest], { env: s3.env });
      expect(r.code).to.not.equal(0);
      expect(r.stderr).to.contain(`expected sha256 ${wrong}`);
      expect(r.stderr).to.contain(`actual ${sum}`);
      expect(fs.readdirSync(dir)).to.deep.equal([]);
    });

    it("fails without retrying when the key does not exist", async () => {
      const r = await runScript("fetch-image.sh", ["s3://images/nope.vhdx", sum, path.join(dir, "d")], {
        env: { ...s3.env, FETCH_RETRIES: "5", FETCH_RETRY_DELAY_S: "30" },
        timeoutMs: 30000,
      });
      expect(r.code).to.not.equal(0);
      expect(r.stderr).to.contain("cannot download s3://images/nope.vhdx");
      expect(r.stderr).to.not.contain("retrying");
    });

    it("retries an access denial twice (a new role policy takes seconds to apply), then names the likely causes", async () => {
      // An aws that is refused for everything, as a host role without access is.
      const bin = fs.mkdtempSync(path.join(os.tmpdir(), "fetch-403-"));
      fs.writeFileSync(
        path.join(bin, "aws"),
        '#!/usr/bin/env bash\necho "An error occurred (403) when calling the HeadObject operation: Forbidden" >&2\nexit 255\n',
        { mode: 0o755 },
      );
      try {
        const r = await runScript("fetch-image.sh", ["s3://images/win/win.vhdx", sum, path.join(dir, "d")], {
          env: { ...s3.env, PATH: `${bin}:${process.env.PATH}`, FETCH_RETRIES: "5", FETCH_RETRY_DELAY_S: "0" },
          timeoutMs: 60000,
        });
        expect(r.code).to.equal(1);
        expect(r.stderr.match(/retrying in/g)).to.have.length(2);
        expect(r.stderr).to.contain("cannot download s3://images/win/win.vhdx: An error occurred (403)");
        expect(r.stderr).to.contain("SSE-KMS");
      } finally {
        fs.rmSync(bin, { recursive: true, force: true });
      }
    });

    it("retries a bounded number of times when the endpoint is down, naming the URL", async () => {
      const port = await freePort();
      // One CLI attempt per fetch attempt: the CLI's own back-offs against a closed port only add seconds.
      const env = { ...awsEnv(`http://127.0.0.1:${port}`, dir), ...fast, AWS_MAX_ATTEMPTS: "1" };
      const t0 = Date.now();
      const r = await runScript("fetch-image.sh", ["s3://images/win/win.vhdx", sum, path.join(dir, "d")], {
        env,
        timeoutMs: 100000,
      });
      expect(r.signal).to.equal(null);
      expect(r.code).to.not.equal(0);
      expect(r.stderr).to.contain("attempt 1/2 for s3://images/win/win.vhdx failed");
      expect(r.stderr).to.contain("could not download s3://images/win/win.vhdx after 2 attempt(s)");
      expect(r.stderr).to.contain(`127.0.0.1:${port}`);
      expect(Date.now() - t0).to.be.below(90000);
      expect(fs.existsSync(path.join(dir, "d"))).to.equal(false);
    });
  });
});
