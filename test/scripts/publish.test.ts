import { expect } from "chai";
import { ChildProcess, spawn } from "child_process";
import * as fs from "fs";
import * as os from "os";
import * as path from "path";
import { holdDisk, sha256, sha256File, stopQemu } from "../support/disk";
import { run, runOk, RunResult, script } from "../support/run";
import { startS3, S3Server } from "../support/s3";

interface Manifest {
  manifestVersion: number;
  sha256: string;
  size: number;
  format: string;
  virtualSize: number;
  imageUri: string;
  varsUri: string;
  varsSha256: string;
  varsSize: number;
  manifestUri: string;
  sourceUrl: string | null;
  sourceSha256: string | null;
  windowsVersion: string | null;
  createdAt: string;
}

/** Parses the publish-image stdout: exactly one line of JSON. */
function parseStdout(r: RunResult): Manifest {
  expect(r.stdout.endsWith("\n"), "stdout ends with a newline").to.equal(true);
  const lines = r.stdout.slice(0, -1).split("\n");
  expect(lines, r.stdout).to.have.length(1);
  return JSON.parse(lines[0]) as Manifest;
}

describe("publish-image.sh", function () {
  this.timeout(180000);
  let s3: S3Server;
  let dir: string;
  let vmDir: string;
  let disk: string;

  before(async () => {
    s3 = await startS3("images");
  });
  after(async () => {
    await s3.stop();
  });

  beforeEach(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), "publish-"));
    vmDir = path.join(dir, "vm");
    fs.mkdirSync(vmDir);
    disk = path.join(vmDir, "disk.qcow2");
    await runOk("qemu-img", ["create", "-q", "-f", "qcow2", disk, "1G"]);
    await runOk("qemu-io", ["-f", "qcow2", "-c", "write -P 0x5a 0 8M", "-c", "write -P 0x17 300M 2M", disk]);
    const vars = Buffer.alloc(64 * 1024 * 1024);
    vars.write("BOOT0001", 8192);
    fs.writeFileSync(path.join(vmDir, "QEMU_VARS.fd"), vars);
  });
  afterEach(() => fs.rmSync(dir, { recursive: true, force: true }));

  function publish(uri: string, env: NodeJS.ProcessEnv = {}): Promise<RunResult> {
    return run("bash", [script("publish-image.sh"), vmDir, uri], { env: { ...s3.env, ...env } });
  }

  async function lastModified(key: string): Promise<string> {
    const r = await s3.aws(["s3api", "head-object", "--bucket", s3.bucket, "--key", key]);
    expect(r.code, r.stderr).to.equal(0);
    return (JSON.parse(r.stdout) as { LastModified: string }).LastModified;
  }

  it("publishes disk, variables, manifest and latest.json; prints the manifest as one line", async () => {
    const sha = sha256File(disk);
    const varsSha = sha256File(path.join(vmDir, "QEMU_VARS.fd"));
    const r = await publish("s3://images/win11/", {
      IMAGE_SOURCE_URL: "s3://source/Win11_ARM64.vhdx",
      IMAGE_SOURCE_SHA256: "AB".repeat(32),
      WINDOWS_VERSION: "11-23H2",
    });
    expect(r.code, r.stderr).to.equal(0);
    const m = parseStdout(r);
    expect(m.sha256).to.equal(sha);
    expect(m.size).to.equal(fs.statSync(disk).size);
    expect(m.format).to.equal("qcow2");
    expect(m.virtualSize).to.equal(1024 * 1024 * 1024);
    expect(m.imageUri).to.equal(`s3://images/win11/${sha}/disk.qcow2`);
    expect(m.varsUri).to.equal(`s3://images/win11/${sha}/QEMU_VARS.fd`);
    expect(m.varsSha256).to.equal(varsSha);
    expect(m.varsSize).to.equal(64 * 1024 * 1024);
    expect(m.manifestUri).to.equal(`s3://images/win11/${sha}/manifest.json`);
    expect(m.sourceUrl).to.equal("s3://source/Win11_ARM64.vhdx");
    expect(m.sourceSha256).to.equal("ab".repeat(32));
    expect(m.windowsVersion).to.equal("11-23H2");
    expect(m.createdAt).to.match(/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$/);
    expect(Math.abs(Date.parse(m.createdAt) - Date.now())).to.be.below(600000);

    expect(await s3.listKeys("win11/")).to.deep.equal([
      `win11/${sha}/QEMU_VARS.fd`,
      `win11/${sha}/disk.qcow2`,
      `win11/${sha}/manifest.json`,
      "win11/latest.json",
    ]);
    const image = await s3.getObject(`win11/${sha}/disk.qcow2`);
    expect(image && image.equals(fs.readFileSync(disk))).to.equal(true);
    const vars = await s3.getObject(`win11/${sha}/QEMU_VARS.fd`);
    expect(vars && sha256(vars)).to.equal(varsSha);
    expect(JSON.parse(String(await s3.getObject(`win11/${sha}/manifest.json`)))).to.deep.equal(m);
    expect(JSON.parse(String(await s3.getObject("win11/latest.json")))).to.deep.equal(m);
    // Progress and results went to stderr.
    expect(r.stderr).to.contain("publish-image: uploading");
    expect(fs.readFileSync(`${disk}.sha256`, "utf8")).to.match(new RegExp(`^${sha} ${m.size} `));
  });

  it("records null for unset source metadata, and works without a prefix", async () => {
    const r = await publish("s3://images");
    expect(r.code, r.stderr).to.equal(0);
    const m = parseStdout(r);
    expect(m.sourceUrl).to.equal(null);
    expect(m.sourceSha256).to.equal(null);
    expect(m.windowsVersion).to.equal(null);
    expect(m.imageUri).to.equal(`s3://images/${m.sha256}/disk.qcow2`);
    expect(JSON.parse(String(await s3.getObject("latest.json")))).to.deep.equal(m);
  });

  it("uploads nothing on a rerun with the same disk, and repairs latest.json", async () => {
    const r1 = await publish("s3://images/rerun");
    expect(r1.code, r1.stderr).to.equal(0);
    const m1 = parseStdout(r1);
    const imageModified = await lastModified(`rerun/${m1.sha256}/disk.qcow2`);
    // Someone pointed latest.json elsewhere meanwhile.
    fs.writeFileSync(path.join(dir, "other.json"), '{"sha256":"other"}\n');
    await s3.aws(["s3", "cp", "--only-show-errors", path.join(dir, "other.json"), "s3://images/rerun/latest.json"]);
    await new Promise((res) => setTimeout(res, 1100));

    const r2 = await publish("s3://images/rerun/");
    expect(r2.code, r2.stderr).to.equal(0);
    expect(r2.stderr).to.contain("no upload needed");
    expect(r2.stderr).to.not.contain("uploading");
    expect(parseStdout(r2)).to.deep.equal(m1);
    expect(await lastModified(`rerun/${m1.sha256}/disk.qcow2`)).to.equal(imageModified);
    expect(JSON.parse(String(await s3.getObject("rerun/latest.json")))).to.deep.equal(m1);

    // Without the local hash stamp the disk is streamed again (that is the hash),
    // but the published copy is found and kept as it is.
    fs.rmSync(`${disk}.sha256`);
    const r3 = await publish("s3://images/rerun");
    expect(r3.code, r3.stderr).to.equal(0);
    expect(r3.stderr).to.contain("already published");
    expect(parseStdout(r3)).to.deep.equal(m1);
    expect(await s3.listKeys("rerun/")).to.not.satisfy((keys: string[]) => keys.some((k) => k.includes("staging")));
  });

  it("refuses while a running QEMU holds the disk, and publishes nothing", async () => {
    const qemu = await holdDisk(disk);
    try {
      const r = await publish("s3://images/busy/");
      expect(r.code).to.not.equal(0);
      expect(r.stdout).to.equal("");
      expect(r.stderr).to.match(/disk\.qcow2 is in use by a running QEMU; shut the VM down before publishing/);
      expect(await s3.listKeys("busy/")).to.deep.equal([]);
    } finally {
      await stopQemu(qemu);
    }
  });

  it("an interrupted publish leaves the previous latest.json pointing at a complete image", async () => {
    const r1 = await publish("s3://images/crash/");
    expect(r1.code, r1.stderr).to.equal(0);
    const old = parseStdout(r1);
    const oldImage = fs.readFileSync(disk);

    // The VM ran again: a bigger, different disk.
    await runOk("qemu-io", ["-f", "qcow2", "-c", "write -P 0x66 16M 200M", disk]);
    const newSha = sha256File(disk);
    const child: ChildProcess = spawn("bash", [script("publish-image.sh"), vmDir, "s3://images/crash/"], {
      env: { ...process.env, ...s3.env, PUBLISH_PROGRESS_INTERVAL_S: "1" },
      stdio: ["ignore", "pipe", "pipe"],
    });
    let stdout = "";
    let stderr = "";
    child.stdout!.on("data", (d: Buffer) => (stdout += d.toString()));
    const closed = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) =>
      child.on("close", (code, signal) => resolve({ code, signal })),
    );
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`upload never started: ${stderr}`)), 60000);
      child.stderr!.on("data", (d: Buffer) => {
        stderr += d.toString();
        if (/uploading .*disk\.qcow2/.test(stderr)) {
          clearTimeout(timer);
          resolve();
        }
      });
    });
    await new Promise((res) => setTimeout(res, 700));
    const killedAt = Date.now();
    child.kill("SIGTERM");
    const end = await closed;
    // The script stopped (by the signal, through its trap), its uploader with it.
    expect(end.code, stderr).to.equal(143);
    expect(stderr).to.contain("terminated");
    expect(Date.now() - killedAt).to.be.below(15000);
    expect(stdout).to.equal("");

    const latest = JSON.parse(String(await s3.getObject("crash/latest.json"))) as Manifest;
    expect(latest).to.deep.equal(old);
    const image = await s3.getObject(`crash/${latest.sha256}/disk.qcow2`);
    expect(image && image.equals(oldImage)).to.equal(true);
    expect(await s3.getObject(`crash/${newSha}/manifest.json`)).to.equal(undefined);

    // A rerun finishes the job and only then moves latest.json.
    const r2 = await publish("s3://images/crash/");
    expect(r2.code, r2.stderr).to.equal(0);
    const m2 = parseStdout(r2);
    expect(m2.sha256).to.equal(newSha);
    expect(JSON.parse(String(await s3.getObject("crash/latest.json")))).to.deep.equal(m2);
    const keys = await s3.listKeys("crash/");
    expect(keys).to.include.members([`crash/${old.sha256}/disk.qcow2`, `crash/${newSha}/disk.qcow2`]);
  });

  it("fails clearly on bad arguments and missing files", async () => {
    const r1 = await publish("https://images/x");
    expect(r1.code).to.not.equal(0);
    expect(r1.stderr).to.contain("must look like s3://bucket/prefix/ or file:///absolute/dir/");
    fs.rmSync(path.join(vmDir, "QEMU_VARS.fd"));
    const r2 = await publish("s3://images/x/");
    expect(r2.code).to.not.equal(0);
    expect(r2.stderr).to.match(/QEMU_VARS\.fd not found/);
    const r3 = await publish("s3://images/x/", { IMAGE_SOURCE_SHA256: "xyz" });
    expect(r3.code).to.not.equal(0);
    expect(r3.stderr).to.contain("IMAGE_SOURCE_SHA256");
    const r4 = await run("bash", [script("publish-image.sh"), vmDir]);
    expect(r4.code).to.equal(2);
    expect(r4.stdout).to.equal("");
  });

  it("publishes when S3 answers 403 for missing keys (the role may list only its prefix)", async () => {
    // Real S3 gives 403, not 404, for a missing key to a caller without s3:ListBucket on the whole
    // bucket. This aws wrapper turns every 404 into that 403; listing still works.
    const bin = fs.mkdtempSync(path.join(dir, "bin-"));
    const realAws = (await run("bash", ["-c", "command -v aws"])).stdout.trim();
    fs.writeFileSync(
      path.join(bin, "aws"),
      [
        "#!/usr/bin/env bash",
        '[[ -z ${DENY_LIST:-} || " $* " != *" list-objects-v2 "* ]] ||',
        '  { echo "An error occurred (AccessDenied) when calling the ListObjectsV2 operation: Access Denied" >&2; exit 255; }',
        'err=$(mktemp); rc=0; "$REAL_AWS" "$@" 2>"$err" || rc=$?',
        "if ((rc != 0)) && grep -qE '\\(404\\)|Not Found|NoSuchKey|does not exist' \"$err\"; then",
        '  echo "An error occurred (403) when calling the HeadObject operation: Forbidden" >&2',
        'else cat "$err" >&2; fi',
        'rm -f "$err"; exit "$rc"',
      ].join("\n") + "\n",
      { mode: 0o755 },
    );
    const env = { PATH: `${bin}:${process.env.PATH}`, REAL_AWS: realAws };
    const r = await publish("s3://images/forbidden/", env);
    expect(r.code, r.stderr).to.equal(0);
    const m = parseStdout(r);
    expect(JSON.parse(String(await s3.getObject("forbidden/latest.json")))).to.deep.equal(m);
    // When the listing is refused too, a 403 cannot be told from a refusal: named, never taken for "missing".
    const r2 = await publish("s3://images/denied/", { ...env, DENY_LIST: "1" });
    expect(r2.code).to.equal(1);
    expect(r2.stderr).to.match(/error: cannot read s3:\/\/images\/denied\/[0-9a-f]{64}\/manifest\.json: .*\(403\)/);
    expect(await s3.listKeys("denied/")).to.deep.equal([]);
  });

  it("names the endpoint when S3 cannot be reached", async () => {
    const r = await publish("s3://images/down/", { S3_ENDPOINT_URL: "http://127.0.0.1:9" });
    expect(r.code).to.not.equal(0);
    expect(r.stdout).to.equal("");
    expect(r.stderr).to.contain("http://127.0.0.1:9");
    expect(r.stderr).to.contain("publish-image: error:");
  });

  describe("to a folder (file://)", () => {
    /** A PATH whose first entries are shims (name -> bash body); `aws` always fails loudly. */
    function shimPath(shims: Record<string, string> = {}): string {
      const bin = fs.mkdtempSync(path.join(dir, "bin-"));
      const all = { aws: 'echo "aws was called: $*" >&2; exit 99', ...shims };
      for (const [name, body] of Object.entries(all)) {
        fs.writeFileSync(path.join(bin, name), `#!/usr/bin/env bash\n${body}\n`, { mode: 0o755 });
      }
      return `${bin}:${process.env.PATH}`;
    }
    const publishTo = (uri: string, env: NodeJS.ProcessEnv = {}) => publish(uri, { PATH: shimPath(), ...env });
    const list = (root: string) =>
      fs
        .readdirSync(root, { recursive: true, encoding: "utf8" })
        .filter((p) => fs.statSync(path.join(root, p)).isFile())
        .sort();

    it("publishes into the folder (percent-decoded, created when missing) without the AWS CLI", async () => {
      const root = path.join(dir, "out dir", "images");
      const uri = `file://${path.join(dir, "out%20dir", "images")}/`;
      const sha = sha256File(disk);
      const r = await publishTo(uri, { WINDOWS_VERSION: "11-24H2" });
      expect(r.code, r.stderr).to.equal(0);
      expect(r.stderr).to.not.contain("aws was called");
      const m = parseStdout(r);
      const base = uri.slice(0, -1);
      expect(m.sha256).to.equal(sha);
      expect(m.imageUri).to.equal(`${base}/${sha}/disk.qcow2`);
      expect(m.varsUri).to.equal(`${base}/${sha}/QEMU_VARS.fd`);
      expect(m.manifestUri).to.equal(`${base}/${sha}/manifest.json`);
      expect(m.windowsVersion).to.equal("11-24H2");
      // Exactly the layout S3 gets; staging is gone.
      expect(list(root)).to.deep.equal([
        `${sha}/QEMU_VARS.fd`,
        `${sha}/disk.qcow2`,
        `${sha}/manifest.json`,
        "latest.json",
      ]);
      expect(fs.readFileSync(path.join(root, sha, "disk.qcow2")).equals(fs.readFileSync(disk))).to.equal(true);
      expect(sha256File(path.join(root, sha, "QEMU_VARS.fd"))).to.equal(m.varsSha256);
      expect(JSON.parse(fs.readFileSync(path.join(root, sha, "manifest.json"), "utf8"))).to.deep.equal(m);
      expect(JSON.parse(fs.readFileSync(path.join(root, "latest.json"), "utf8"))).to.deep.equal(m);
      for (const f of list(root)) expect(fs.statSync(path.join(root, f)).mode & 0o777, f).to.equal(0o644);

      // A rerun copies nothing and leaves the files as they are.
      const before = fs.statSync(path.join(root, sha, "disk.qcow2")).mtimeMs;
      const r2 = await publishTo(uri);
      expect(r2.code, r2.stderr).to.equal(0);
      expect(r2.stderr).to.contain("no upload needed");
      expect(parseStdout(r2).createdAt).to.equal(m.createdAt);
      expect(fs.statSync(path.join(root, sha, "disk.qcow2")).mtimeMs).to.equal(before);
    });

    it("a publish stopped halfway leaves the old latest.json and no staging file; a rerun finishes", async () => {
      const root = path.join(dir, "halt");
      const r1 = await publishTo(`file://${root}`);
      expect(r1.code, r1.stderr).to.equal(0);
      const old = parseStdout(r1);
      await runOk("qemu-io", ["-f", "qcow2", "-c", "write -P 0x66 16M 20M", disk]);
      const newSha = sha256File(disk);

      // `sync` (run once the staging file is written) hangs: the publish is stopped there.
      const mark = path.join(dir, "syncing");
      const child = spawn("bash", [script("publish-image.sh"), vmDir, `file://${root}`], {
        env: { ...process.env, PATH: shimPath({ sync: `touch ${mark}; exec sleep 60` }) },
        stdio: ["ignore", "pipe", "pipe"],
      });
      let stderr = "";
      let stdout = "";
      child.stdout!.on("data", (d: Buffer) => (stdout += d.toString()));
      child.stderr!.on("data", (d: Buffer) => (stderr += d.toString()));
      const closed = new Promise<number | null>((resolve) => child.on("close", (code) => resolve(code)));
      for (let i = 0; i < 600 && !fs.existsSync(mark) && child.exitCode === null; i++) {
        await new Promise((res) => setTimeout(res, 100));
      }
      if (!fs.existsSync(mark)) {
        child.kill("SIGKILL");
        throw new Error(`publish never reached sync: ${stderr}`);
      }
      const staged = list(root).filter((f) => f.startsWith("staging/"));
      expect(staged, "the staging file exists while the copy runs").to.have.length(1);
      const killedAt = Date.now();
      child.kill("SIGTERM");
      expect(await closed, stderr).to.equal(143);
      // Its children (the hung sync among them) stopped with it.
      expect(Date.now() - killedAt).to.be.below(15000);
      expect(stdout).to.equal("");
      expect(JSON.parse(fs.readFileSync(path.join(root, "latest.json"), "utf8"))).to.deep.equal(old);
      expect(list(root)).to.deep.equal([
        `${old.sha256}/QEMU_VARS.fd`,
        `${old.sha256}/disk.qcow2`,
        `${old.sha256}/manifest.json`,
        "latest.json",
      ]);

      const r2 = await publishTo(`file://${root}/`);
      expect(r2.code, r2.stderr).to.equal(0);
      const m2 = parseStdout(r2);
      expect(m2.sha256).to.equal(newSha);
      expect(JSON.parse(fs.readFileSync(path.join(root, "latest.json"), "utf8"))).to.deep.equal(m2);
      expect(list(root)).to.include.members([`${old.sha256}/disk.qcow2`, `${newSha}/disk.qcow2`]);
      expect(list(root).filter((f) => f.startsWith("staging/"))).to.deep.equal([]);
    });

    it("sweeps staging left by killed runs more than a day ago, and keeps recent ones", async () => {
      const root = path.join(dir, "sweep");
      const stale = path.join(root, "staging", "20200101T000000Z-1-1");
      const recent = path.join(root, "staging", "recent-run");
      for (const d of [stale, recent]) {
        fs.mkdirSync(d, { recursive: true });
        fs.writeFileSync(path.join(d, "disk.qcow2"), "partial");
      }
      const twoDaysAgo = new Date(Date.now() - 2 * 86400 * 1000);
      fs.utimesSync(stale, twoDaysAgo, twoDaysAgo);
      const r = await publishTo(`file://${root}`);
      expect(r.code, r.stderr).to.equal(0);
      expect(r.stderr).to.contain(`removing stale staging folder ${stale}`);
      expect(fs.existsSync(stale)).to.equal(false);
      expect(fs.readFileSync(path.join(recent, "disk.qcow2"), "utf8")).to.equal("partial");
    });

    it("refuses when the folder lacks the space, before writing anything", async () => {
      const root = path.join(dir, "full");
      const r = await publish(`file://${root}`, {
        PATH: shimPath({ df: 'printf "Avail\\n%s\\n" 1048576' }),
      });
      expect(r.code).to.equal(1);
      expect(r.stdout).to.equal("");
      expect(r.stderr).to.match(/not enough free space in .*full: publishing needs \d+ MiB, 1 MiB are free/);
      expect(list(root)).to.deep.equal([]);
    });

    it("names what is wrong with a file:// URI", async () => {
      const cases: [string, RegExp][] = [
        ["file://server/share/images/", /names a host; use file:\/\/\/absolute\/dir\//],
        ["file:///", /is the filesystem root/],
        [`file://${dir}/a/../b/`, /is not a plain absolute path/],
        [`file://${dir}/a%zz/`, /malformed percent-escape/],
        [`file://${dir}/a%00/`, /malformed percent-escape/],
        ["ftp://images/x", /must look like s3:\/\/bucket\/prefix\/ or file:\/\/\/absolute\/dir\//],
      ];
      for (const [uri, msg] of cases) {
        const r = await publishTo(uri);
        expect(r.code, uri).to.equal(1);
        expect(r.stdout, uri).to.equal("");
        expect(r.stderr, uri).to.match(msg);
      }
    });
  });
});
