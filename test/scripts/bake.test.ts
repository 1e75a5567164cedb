import { expect } from "chai";
import { spawn } from "child_process";
import * as crypto from "crypto";
import * as fs from "fs";
import * as os from "os";
import * as path from "path";
import * as zlib from "zlib";
import { BAKE_BOOTSTRAP, BAKE_DIR, BAKE_FILES, bakeKitKey, renderBakeKit, renderBakeUserData } from "../../infra/bake";
import { HOST_PACKAGES } from "../../infra/hostSetup";
import { sha256, sha256File } from "../support/disk";
import { freePort, repoRoot, run, RunResult, runOk, runScript } from "../support/run";
import { preferRealAws, S3Server, startS3 } from "../support/s3";

const NAMES = ["disk.qcow2", "QEMU_VARS.fd", "QEMU_EFI.fd"] as const;
const VSIZE = 64 * 1024 * 1024;

interface FileEntry {
  name: string;
  uri: string;
  sha256: string;
  size: number;
}
interface Status {
  status: string;
  stage?: string;
  error?: string;
  imageSha256?: string;
  files?: Array<{ name: string; sha256: string; size: number; path: string }>;
  finishedAt?: string;
}

/** The published files (a real qcow2 and two small firmware stand-ins) in a folder whose name needs percent-encoding. */
async function makeArtifacts(dir: string): Promise<string> {
  const pub = path.join(dir, "pub lished", "a".repeat(8));
  fs.mkdirSync(pub, { recursive: true });
  await runOk("qemu-img", ["create", "-q", "-f", "qcow2", path.join(pub, "disk.qcow2"), String(VSIZE)]);
  fs.writeFileSync(path.join(pub, "QEMU_VARS.fd"), Buffer.alloc(1024 * 1024, 7));
  fs.writeFileSync(
    path.join(pub, "QEMU_EFI.fd"),
    Buffer.from(Array.from({ length: 300000 }, (_, i) => (i * 31) % 251)),
  );
  return pub;
}

function entries(pub: string, uri: (name: string) => string): FileEntry[] {
  return NAMES.map((name) => {
    const f = path.join(pub, name);
    return { name, uri: uri(name), sha256: sha256File(f), size: fs.statSync(f).size };
  });
}

function manifestOf(files: FileEntry[]): Record<string, unknown> {
  const disk = files.find((f) => f.name === "disk.qcow2");
  return {
    manifestVersion: 2,
    sha256: disk?.sha256,
    size: disk?.size,
    format: "qcow2",
    virtualSize: VSIZE,
    imageUri: disk?.uri,
    createdAt: "2026-12-01T00:00:00Z",
    files,
  };
}

const fileUri = (p: string) => "file://" + p.split("/").map(encodeURIComponent).join("/");

/** A bake instance's root: identity to generalize, its own user data under /var/lib/cloud. */
function makeRoot(root: string, statusUri: string): void {
  const mk = (p: string, content: string, mode = 0o644) => {
    const f = path.join(root, p);
    fs.mkdirSync(path.dirname(f), { recursive: true });
    fs.writeFileSync(f, content, { mode });
  };
  mk("etc/ssh/ssh_host_ed25519_key", "private", 0o600);
  mk("etc/ssh/ssh_host_ed25519_key.pub", "public");
  mk("etc/ssh/sshd_config", "PermitRootLogin no\n");
  mk("etc/machine-id", "0123456789abcdef0123456789abcdef\n", 0o444);
  mk("var/lib/cloud/instances/i-0bake/user-data.txt", `#cloud-config ... --setenv=BAKE_STATUS_URI=${statusUri}`);
  mk("var/lib/cloud/instances/i-0bake/scripts/runcmd", `systemd-run ... ${statusUri}`);
  mk("var/lib/cloud/seed/nocloud/user-data", "seeded user data");
  mk("var/lib/cloud/seed/nocloud/meta-data", "instance-id: seed");
  mk("var/log/cloud-init.log", "log");
  mk("var/log/journal/0123/system.journal", "journal");
}

const IMAGE_ENV = "# baked image VM\nVM_DIR=/var/lib/windows-vm\nVM_CPUS=4\nVM_MEMORY_GIB=24\nVM_HALT_ON_EXIT=1\n";

describe("bake-image.sh (on the bake instance: published image -> AMI file system)", function () {
  this.timeout(120000);
  let dir: string;
  let root: string;
  let pub: string;
  let envFile: string;
  let statusFile: string;
  let poweroffs: string;

  beforeEach(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), "bake-image-"));
    root = path.join(dir, "root");
    statusFile = path.join(dir, "status", "bake-status", "tok.json");
    poweroffs = path.join(dir, "poweroffs");
    makeRoot(root, fileUri(statusFile));
    pub = await makeArtifacts(dir);
    envFile = path.join(dir, "image.env");
    fs.writeFileSync(envFile, IMAGE_ENV);
  });
  afterEach(() => fs.rmSync(dir, { recursive: true, force: true }));

  const vmFile = (name: string) => path.join(root, "var/lib/windows-vm", name);
  const status = (): Status => JSON.parse(fs.readFileSync(statusFile, "utf8")) as Status;
  const powerOffCount = () =>
    fs.existsSync(poweroffs) ? fs.readFileSync(poweroffs, "utf8").split("\n").length - 1 : 0;

  function bake(
    manifest: Record<string, unknown>,
    env: NodeJS.ProcessEnv = {},
    envPath = envFile,
    timeoutMs = 300000,
  ): Promise<RunResult> {
    const m = path.join(dir, "manifest.json");
    fs.writeFileSync(m, JSON.stringify(manifest));
    return runScript("bake-image.sh", [m, envPath], {
      env: {
        BAKE_ROOT: root,
        BAKE_STATUS_URI: fileUri(statusFile),
        BAKE_POWEROFF_COMMAND: `echo poweroff >>'${poweroffs}'`,
        ...env,
      },
      timeoutMs,
    });
  }

  function expectBaked(files: FileEntry[]) {
    const vmDir = path.join(root, "var/lib/windows-vm");
    expect(fs.statSync(vmDir).mode & 0o777).to.equal(0o700);
    for (const f of files) {
      expect(sha256File(vmFile(f.name)), f.name).to.equal(f.sha256);
      expect(fs.statSync(vmFile(f.name)).mode & 0o777, f.name).to.equal(0o600);
      expect(fs.existsSync(vmFile(`${f.name}.partial`))).to.equal(false);
    }
    const launcher = path.join(root, "usr/local/lib/windows-vm/run-vm.sh");
    expect(fs.readFileSync(launcher, "utf8")).to.equal(
      fs.readFileSync(path.join(repoRoot, "provisioning/run-vm.sh"), "utf8"),
    );
    expect(fs.statSync(launcher).mode & 0o777).to.equal(0o755);
    const unit = path.join(root, "etc/systemd/system/windows-vm.service");
    expect(fs.readFileSync(unit, "utf8")).to.equal(
      fs.readFileSync(path.join(repoRoot, "assets/windows-vm.service"), "utf8"),
    );
    expect(fs.statSync(unit).mode & 0o777).to.equal(0o644);
    expect(fs.readlinkSync(path.join(root, "etc/systemd/system/multi-user.target.wants/windows-vm.service"))).to.equal(
      "/etc/systemd/system/windows-vm.service",
    );
    const env = fs.readFileSync(path.join(root, "etc/windows-vm/vm.env"), "utf8");
    expect(env).to.include("VM_MEMORY_GIB=24\n");
    expect(env.match(/^VM_HALT_ON_EXIT=.*$/gm)).to.deep.equal(["VM_HALT_ON_EXIT=1"]);
    // Generalized: identity gone, and the bake's own user data too.
    expect(fs.readdirSync(path.join(root, "etc/ssh"))).to.deep.equal(["sshd_config"]);
    expect(fs.readFileSync(path.join(root, "etc/machine-id"), "utf8")).to.equal("");
    expect(fs.readdirSync(path.join(root, "var/lib/cloud"))).to.deep.equal(["seed"]);
    expect(fs.readdirSync(path.join(root, "var/lib/cloud/seed/nocloud"))).to.deep.equal(["meta-data"]);
    expect(fs.existsSync(path.join(root, "var/log/cloud-init.log"))).to.equal(false);
    expect(fs.readdirSync(path.join(root, "var/log/journal"))).to.deep.equal([]);
  }

  function expectOkStatus(s: Status, files: FileEntry[]) {
    expect(s.status).to.equal("ok");
    expect(s.imageSha256).to.equal(files[0].sha256);
    expect(s.files).to.deep.equal(
      files.map((f) => ({ name: f.name, sha256: f.sha256, size: f.size, path: `/var/lib/windows-vm/${f.name}` })),
    );
    expect(s.finishedAt).to.match(/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$/);
  }

  it("file://: fetches and verifies every file, installs and enables the unit, generalizes, reports ok, powers off", async () => {
    const files = entries(pub, (n) => fileUri(path.join(pub, n)));
    expect(files[0].uri).to.include("pub%20lished");
    const r = await bake(manifestOf(files));
    expect(r.code, r.stderr).to.equal(0);
    expect(r.stdout).to.equal("");
    expectBaked(files);
    expectOkStatus(status(), files);
    expect(powerOffCount()).to.equal(1);
    for (const line of r.stderr.split("\n")) expect(line.length).to.be.below(4096);

    // A rerun verifies what is in place, fetches nothing and reports ok again.
    const before = fs.statSync(vmFile("disk.qcow2")).ino;
    const again = await bake(manifestOf(files));
    expect(again.code, again.stderr).to.equal(0);
    expect(again.stderr.match(/is already in place and verified/g)).to.have.length(3);
    expect(fs.statSync(vmFile("disk.qcow2")).ino).to.equal(before);
    expectBaked(files);
    expectOkStatus(status(), files);
    expect(powerOffCount()).to.equal(2);
  });

  it("a zstd-compressed published disk is decompressed once: the image VM gets an uncompressed qcow2 with the same content", async () => {
    // What publish-image.sh writes with IMAGE_COMPRESSION=zstd.
    const plain = path.join(dir, "plain.qcow2");
    await runOk("qemu-img", ["create", "-q", "-f", "qcow2", plain, String(VSIZE)]);
    await runOk("qemu-io", ["-f", "qcow2", "-c", "write -P 0x5a 0 4M", "-c", "write -P 0x17 40M 1M", plain]);
    await runOk("qemu-img", [
      ...["convert", "-O", "qcow2", "-c", "-o", "compression_type=zstd"],
      ...[plain, path.join(pub, "disk.qcow2")],
    ]);
    const compressed = (f: string) =>
      runOk("qemu-img", ["map", "--output=json", f]).then((out) =>
        (JSON.parse(out) as Record<string, unknown>[]).some((e) => e.data === true && e.offset === undefined),
      );
    expect(await compressed(path.join(pub, "disk.qcow2")), "the published disk is compressed").to.equal(true);
    const files = entries(pub, (n) => fileUri(path.join(pub, n)));
    const r = await bake(manifestOf(files));
    expect(r.code, r.stderr).to.equal(0);
    expect(r.stderr).to.include("decompressing disk.qcow2 (the image VM runs an uncompressed copy)");
    expect(await compressed(vmFile("disk.qcow2")), "the VM's disk").to.equal(false);
    await runOk("qemu-img", ["compare", "-f", "qcow2", "-F", "qcow2", plain, vmFile("disk.qcow2")]);
    expect(fs.statSync(vmFile("disk.qcow2")).mode & 0o777).to.equal(0o600);
    expect(fs.existsSync(vmFile("disk.qcow2.plain"))).to.equal(false);
    // The status names what was fetched and verified.
    expectOkStatus(status(), files);
    // A rerun finds it in place (derived from the verified download): no fetch, no second conversion.
    const again = await bake(manifestOf(files));
    expect(again.code, again.stderr).to.equal(0);
    expect(again.stderr.match(/is already in place and verified/g)).to.have.length(3);
    expect(again.stderr).to.not.include("decompressing");
  });

  describe("from S3 (s3rver)", function () {
    // Every aws CLI run (each upload, each fetch, the status and its read-back) starts Python:
    // seconds each on a busy machine. Bounded like bake-bootstrap.sh's S3 group.
    this.timeout(240000);
    let s3: S3Server;
    let undoAws: () => void;
    before(async () => {
      undoAws = await preferRealAws();
      s3 = await startS3("artifacts");
    });
    after(async () => {
      undoAws();
      await s3.stop();
    });

    /** Puts NAMES from pub at s3://artifacts/PREFIX (in-process: the setup, not what is tested). */
    async function upload(prefix: string, names: readonly string[]) {
      for (const n of names) await s3.http.put(`${prefix}${n}`, fs.readFileSync(path.join(pub, n)));
    }

    it("fetches from s3://, verifies, and writes its status to s3://", async () => {
      const prefix = `windows-arm64/${"b".repeat(8)}/`;
      await upload(prefix, NAMES);
      const files = entries(pub, (n) => `s3://artifacts/${prefix}${n}`);
      const statusKey = "windows-arm64/bake-status/s3tok.json";
      const r = await bake(
        manifestOf(files),
        { ...s3.env, BAKE_STATUS_URI: `s3://artifacts/${statusKey}` },
        envFile,
        220000,
      );
      expect(r.code, r.stderr).to.equal(0);
      expectBaked(files);
      const body = await s3.getObject(statusKey);
      expect(body, "status object").to.not.equal(undefined);
      expectOkStatus(JSON.parse(String(body)) as Status, files);
      expect(powerOffCount()).to.equal(1);
    });

    it("a missing object fails naming it, writes status failed and powers off", async () => {
      const prefix = `windows-arm64/${"c".repeat(8)}/`;
      await upload(prefix, ["disk.qcow2", "QEMU_VARS.fd"]);
      const files = entries(pub, (n) => `s3://artifacts/${prefix}${n}`);
      const r = await bake(manifestOf(files), s3.env);
      expect(r.code).to.equal(1);
      const s = status();
      expect(s.status).to.equal("failed");
      expect(s.stage).to.equal(`fetching QEMU_EFI.fd from s3://artifacts/${prefix}QEMU_EFI.fd`);
      expect(s.error).to.match(/^cannot fetch QEMU_EFI\.fd \(attempt 1\): .*(404|Not Found|NoSuchKey)/);
      expect(powerOffCount()).to.equal(1);
      expect(fs.existsSync(vmFile("QEMU_EFI.fd"))).to.equal(false);
      expect(fs.existsSync(path.join(root, "etc/systemd/system/windows-vm.service")), "nothing installed").to.equal(
        false,
      );
    });
  });

  it("a corrupted file fails naming it with the expected and actual SHA-256, and still powers off", async () => {
    const files = entries(pub, (n) => fileUri(path.join(pub, n)));
    // Same size, other content: only the checksum tells.
    const vars = path.join(pub, "QEMU_VARS.fd");
    const bytes = fs.readFileSync(vars);
    bytes[4096] ^= 0xff;
    fs.writeFileSync(vars, bytes);
    const r = await bake(manifestOf(files));
    expect(r.code).to.equal(1);
    const s = status();
    expect(s.status).to.equal("failed");
    expect(s.stage).to.equal(`fetching QEMU_VARS.fd from ${files[1].uri}`);
    expect(s.error).to.equal(
      `checksum mismatch for QEMU_VARS.fd: expected sha256 ${files[1].sha256}, actual ${sha256(bytes)}`,
    );
    expect(powerOffCount()).to.equal(1);
    expect(fs.existsSync(vmFile("QEMU_VARS.fd"))).to.equal(false);
    expect(fs.existsSync(vmFile("QEMU_VARS.fd.partial"))).to.equal(false);
    // Not generalized: the instance is thrown away, not imaged.
    expect(fs.existsSync(path.join(root, "etc/ssh/ssh_host_ed25519_key"))).to.equal(true);
  });

  it("a missing file:// source and a size that differs from the manifest fail naming the file", async () => {
    const files = entries(pub, (n) => fileUri(path.join(pub, n)));
    fs.rmSync(path.join(pub, "QEMU_EFI.fd"));
    const r = await bake(manifestOf(files));
    expect(r.code).to.equal(1);
    expect(status().error).to.equal(
      `cannot fetch QEMU_EFI.fd (attempt 1): ${path.join(pub, "QEMU_EFI.fd")} does not exist or is not a regular file`,
    );
    expect(powerOffCount()).to.equal(1);

    // QEMU_EFI.fd's entry pointing at another file, with a size that file does not have.
    const vars = files[1];
    const files2 = [files[0], vars, { ...vars, name: "QEMU_EFI.fd", size: 5 }];
    const r2 = await bake(manifestOf(files2));
    expect(r2.code).to.equal(1);
    expect(status().error).to.match(
      /^QEMU_EFI\.fd is 1048576 bytes, the manifest says 5 \(expected sha256 [0-9a-f]{64}, actual [0-9a-f]{64}\)$/,
    );
  });

  it("a hung download ends at BAKE_TIMEOUT_S: status failed names what it waited for, the download is killed, power off", async () => {
    const bin = path.join(dir, "bin");
    fs.mkdirSync(bin);
    // An aws whose download never ends.
    fs.writeFileSync(path.join(bin, "aws"), `#!/usr/bin/env bash\necho $$ >>'${dir}/aws.pids'\nexec sleep 600\n`, {
      mode: 0o755,
    });
    const files = entries(pub, (n) => `s3://artifacts/p/${n}`);
    // The bound covers the whole bake (manifest checks first), so it leaves room for a busy machine.
    const r = await bake(manifestOf(files), { PATH: `${bin}:${process.env.PATH}`, BAKE_TIMEOUT_S: "20" });
    expect(r.code).to.equal(1);
    const s = status();
    expect(s.status).to.equal("failed");
    expect(s.stage).to.equal("fetching disk.qcow2 from s3://artifacts/p/disk.qcow2");
    expect(s.error).to.equal(
      "timed out after 20 s (BAKE_TIMEOUT_S) while fetching disk.qcow2 from s3://artifacts/p/disk.qcow2",
    );
    expect(powerOffCount()).to.equal(1);
    const pids = fs.readFileSync(path.join(dir, "aws.pids"), "utf8").trim().split("\n").map(Number);
    for (const pid of pids) {
      // Gone, or at most a zombie on its way out.
      let alive = true;
      for (let i = 0; i < 50 && alive; i++) {
        try {
          alive = !/^\d+ \([^)]*\) [ZX]/.test(fs.readFileSync(`/proc/${pid}/stat`, "utf8"));
        } catch {
          alive = false;
        }
        if (alive) await new Promise((res) => setTimeout(res, 100));
      }
      expect(alive, `the hung download (pid ${pid}) was ended`).to.equal(false);
    }
  });

  it("refuses an env file that sets VM_CONFIG_ISO before fetching anything", async () => {
    const bad = path.join(dir, "bad.env");
    fs.writeFileSync(bad, IMAGE_ENV + "VM_CONFIG_ISO=/var/lib/windows-vm/config.iso\n");
    const r = await bake(manifestOf(entries(pub, (n) => fileUri(path.join(pub, n)))), {}, bad);
    expect(r.code).to.equal(1);
    const s = status();
    expect(s.stage).to.equal(`checking the manifest and ${bad}`);
    expect(s.error).to.match(/sets VM_CONFIG_ISO \(line 6\).*must not ship/);
    expect(fs.existsSync(path.join(root, "var/lib/windows-vm"))).to.equal(false);
    expect(powerOffCount()).to.equal(1);
  });

  it("refuses an env file that names a file the manifest does not provide (the VM would not start)", async () => {
    const env = path.join(dir, "drivers.env");
    fs.writeFileSync(env, IMAGE_ENV + "VM_DRIVERS_ISO=/var/lib/windows-vm/virtio-win.iso\n");
    const r = await bake(manifestOf(entries(pub, (n) => fileUri(path.join(pub, n)))), {}, env);
    expect(r.code).to.equal(1);
    const s = status();
    expect(s.stage).to.equal(`checking that the files ${env} names are in place`);
    expect(s.error).to.equal(
      "the image's env names VM_DRIVERS_ISO=/var/lib/windows-vm/virtio-win.iso, which the manifest does not provide: the VM would not start; publish it, or drop it from the image's env",
    );
    expect(fs.existsSync(path.join(root, "etc/systemd/system/windows-vm.service")), "nothing installed").to.equal(
      false,
    );
    expect(powerOffCount()).to.equal(1);
  });

  it("refuses a manifest without files[] (version 1) or without a file the VM needs", async () => {
    const r = await bake({ manifestVersion: 1, sha256: "a".repeat(64), imageUri: "s3://b/p/disk.qcow2" });
    expect(r.code).to.equal(1);
    expect(status().error).to.include("manifestVersion 2 is needed");
    const files = entries(pub, (n) => fileUri(path.join(pub, n))).filter((f) => f.name !== "QEMU_EFI.fd");
    const r2 = await bake(manifestOf(files));
    expect(r2.code).to.equal(1);
    expect(status().error).to.equal(
      "the manifest does not list QEMU_EFI.fd (the image VM needs disk.qcow2 QEMU_VARS.fd QEMU_EFI.fd)",
    );
    expect(powerOffCount()).to.equal(2);
  });

  it("without a valid BAKE_STATUS_URI it is a usage error and does not power off", async () => {
    const files = entries(pub, (n) => fileUri(path.join(pub, n)));
    for (const uri of ["", "https://example.com/status.json", "file://host/x.json"]) {
      const r = await bake(manifestOf(files), { BAKE_STATUS_URI: uri });
      expect(r.code, uri).to.equal(2);
      expect(r.stderr).to.include("BAKE_STATUS_URI");
    }
    expect(powerOffCount()).to.equal(0);
    // With one, even bad arguments are reported and end in a power-off.
    const r = await runScript("bake-image.sh", [path.join(dir, "nope.json"), envFile], {
      env: {
        BAKE_ROOT: root,
        BAKE_STATUS_URI: fileUri(statusFile),
        BAKE_POWEROFF_COMMAND: `echo poweroff >>'${poweroffs}'`,
      },
    });
    expect(r.code).to.equal(2);
    expect(status().error).to.match(/^bad usage: the manifest .*nope\.json does not exist/);
    expect(powerOffCount()).to.equal(1);
  });

  describe("bake-bootstrap.sh (the user data's command: bake kit -> bake-image.sh)", () => {
    let kit: { body: Buffer; sha256: string };
    /** What went into the kit (read once: the repository's files may change while a test runs). */
    let kitFiles: Record<string, string>;
    let kitDir: string;
    let scratch: string;
    const bakeDir = () => path.join(scratch, BAKE_DIR);
    const repoFileMap = () =>
      Object.fromEntries(BAKE_FILES.map((f) => [f, fs.readFileSync(path.join(repoRoot, f), "utf8")]));

    beforeEach(() => {
      kitFiles = repoFileMap();
      kit = renderBakeKit(kitFiles);
      kitDir = path.join(dir, "kits", "bake-kit");
      fs.mkdirSync(kitDir, { recursive: true });
      scratch = path.join(dir, "instance");
    });

    /** A kit file under kitDir; its file:// URI. */
    function putKit(body: Buffer, name = `${crypto.createHash("sha256").update(body).digest("hex")}.json.gz`): string {
      fs.writeFileSync(path.join(kitDir, name), body);
      return fileUri(path.join(kitDir, name));
    }

    /**
     * Renders the user data, writes its write_files where cloud-init writes
     * them (under a scratch folder instead of /) and runs its systemd-run
     * command there: its --setenv values, its argv with BAKE_DIR moved under
     * the scratch folder.
     */
    async function boot(
      k: { uri: string; sha256: string },
      list: FileEntry[],
      env: NodeJS.ProcessEnv = {},
      statusUri = fileUri(statusFile),
    ): Promise<{ r: RunResult; setenv: Record<string, string> }> {
      const ud = renderBakeUserData({
        manifestJson: JSON.stringify(manifestOf(list)),
        imageEnv: IMAGE_ENV,
        statusUri,
        kit: k,
        packages: HOST_PACKAGES,
        timeoutS: 600,
      });
      const text = zlib.gunzipSync(ud).toString("utf8");
      const doc = JSON.parse(text.slice(text.indexOf("\n") + 1)) as {
        write_files: Array<{ path: string; content: string; permissions: string }>;
        runcmd: string[][];
      };
      for (const w of doc.write_files) {
        const f = path.join(scratch, w.path);
        fs.mkdirSync(path.dirname(f), { recursive: true });
        fs.writeFileSync(f, w.content, { mode: parseInt(w.permissions, 8) });
      }
      const cmd = doc.runcmd[2];
      expect(cmd[0]).to.equal("systemd-run");
      const setenv = Object.fromEntries(
        cmd.filter((a) => a.startsWith("--setenv=")).map((a) => a.slice(9).split(/=(.*)/s).slice(0, 2)),
      ) as Record<string, string>;
      const argv = cmd
        .slice(cmd.indexOf("/bin/bash") + 1)
        .map((a) => (a.startsWith(BAKE_DIR) ? path.join(scratch, a) : a));
      expect(argv).to.deep.equal([path.join(bakeDir(), "bake-bootstrap.sh")]);
      const r = await run("/bin/bash", argv, {
        env: { ...setenv, BAKE_ROOT: root, BAKE_POWEROFF_COMMAND: `echo poweroff >>'${poweroffs}'`, ...env },
        timeoutMs: 400000,
      });
      return { r, setenv };
    }

    function expectKitFailure(error: RegExp | string, s: Status = status()) {
      expect(s.status).to.equal("failed");
      expect(s.stage).to.equal("bake kit");
      if (typeof error === "string") expect(s.error).to.equal(error);
      else expect(s.error).to.match(error);
      expect(s.finishedAt).to.match(/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$/);
      expect(powerOffCount()).to.equal(1);
      // bake-image.sh never ran: nothing fetched, nothing installed, not generalized.
      expect(fs.existsSync(path.join(root, "var/lib/windows-vm"))).to.equal(false);
      expect(fs.existsSync(path.join(root, "etc/ssh/ssh_host_ed25519_key"))).to.equal(true);
      expect(fs.existsSync(path.join(bakeDir(), "provisioning"))).to.equal(false);
      expect(fs.existsSync(path.join(bakeDir(), "bake-kit.json.gz")), "a refused kit is not kept").to.equal(false);
    }

    it("passes shellcheck", async () => {
      const f = path.join(dir, "bake-bootstrap.sh");
      fs.writeFileSync(f, BAKE_BOOTSTRAP);
      const r = await run("shellcheck", ["-s", "bash", f]);
      expect(r.code, r.stdout + r.stderr).to.equal(0);
    });

    it("file:// kit: unpacked byte for byte beside it, bake-image.sh bakes with the user data's manifest and env", async () => {
      const list = entries(pub, (n) => fileUri(path.join(pub, n)));
      const uri = putKit(kit.body);
      const { r, setenv } = await boot({ uri, sha256: kit.sha256 }, list);
      expect(r.code, r.stderr).to.equal(0);
      expect(setenv.BAKE_TIMEOUT_S).to.equal("600");
      expect(setenv.BAKE_KIT_URI).to.equal(uri);
      expect(setenv.BAKE_KIT_SHA256).to.equal(kit.sha256);
      expect(r.stderr).to.include(`bake-bootstrap: the bake kit is verified (sha256 ${kit.sha256}) and unpacked`);
      for (const f of BAKE_FILES) {
        const got = path.join(bakeDir(), f);
        expect(fs.readFileSync(got).equals(Buffer.from(kitFiles[f], "utf8")), f).to.equal(true);
        expect(fs.statSync(got).mode & 0o777, f).to.equal(/\.(sh|py)$/.test(f) ? 0o755 : 0o644);
      }
      expect(fs.existsSync(path.join(bakeDir(), "bake-kit.json.gz"))).to.equal(false);
      expectBaked(list);
      expectOkStatus(status(), list);
      expect(powerOffCount()).to.equal(1);
      // The launcher the image gets is the repository's, header and all.
      const installed = path.join(root, "usr/local/lib/windows-vm/run-vm.sh");
      const envPath = path.join(root, "etc/windows-vm/vm.env");
      expect(await runOk("bash", [installed, "--resolve", envPath])).to.include("VM_HALT_ON_EXIT=1\n");
      expect((await runOk("bash", [installed, "--help"])).split("\n")[0]).to.match(
        /run-vm\.sh - runs the Windows ARM64 VM/,
      );

      // A rerun (the same user data) unpacks the kit again and verifies what is in place.
      const again = await boot({ uri, sha256: kit.sha256 }, list);
      expect(again.r.code, again.r.stderr).to.equal(0);
      expect(again.r.stderr.match(/is already in place and verified/g)).to.have.length(3);
      expectOkStatus(status(), list);
      expect(powerOffCount()).to.equal(2);
    });

    it("a kit whose SHA-256 is not BAKE_KIT_SHA256 is refused: status failed naming the kit, power off", async () => {
      const uri = putKit(kit.body);
      const other = renderBakeKit({ ...kitFiles, "provisioning/lib.sh": "# another lib.sh\n" });
      const { r } = await boot(
        { uri, sha256: other.sha256 },
        entries(pub, (n) => fileUri(path.join(pub, n))),
      );
      expect(r.code).to.equal(1);
      expectKitFailure(`the bake kit ${uri} has sha256 ${kit.sha256}, not ${other.sha256} (BAKE_KIT_SHA256): refused`);
      expect(r.stderr).to.include("bake-bootstrap: powering off");
    });

    it("a missing file:// kit fails naming it and powers off", async () => {
      const uri = fileUri(path.join(kitDir, `${kit.sha256}.json.gz`));
      const { r } = await boot(
        { uri, sha256: kit.sha256 },
        entries(pub, (n) => fileUri(path.join(pub, n))),
      );
      expect(r.code).to.equal(1);
      expectKitFailure(`cannot fetch the bake kit ${uri}: not a regular file (or a malformed file:// URI)`);
    });

    it("refuses a kit (with the right SHA-256) that would write outside its folder or is not a kit", async () => {
      const list = entries(pub, (n) => fileUri(path.join(pub, n)));
      const gz = (doc: unknown) => zlib.gzipSync(JSON.stringify(doc));
      const cases: Array<[Buffer, RegExp]> = [
        [
          gz({ kitVersion: 1, files: [{ path: "../escaped.sh", mode: "0755", content: "echo out\n" }] }),
          /refused path '\.\.\/escaped\.sh'/,
        ],
        [
          gz({ kitVersion: 1, files: [{ path: path.join(dir, "abs.sh"), mode: "0755", content: "x\n" }] }),
          /refused path '\//,
        ],
        [
          gz({ kitVersion: 1, files: [{ path: "provisioning/../../up.sh", mode: "0755", content: "x\n" }] }),
          /refused path/,
        ],
        [gz({ kitVersion: 2, files: [] }), /not a kitVersion 1 document/],
        [Buffer.from("not gzip"), /cannot unpack the bake kit .*(gzip|Gzip)/],
      ];
      for (const [body, error] of cases) {
        fs.rmSync(poweroffs, { force: true });
        const sha = crypto.createHash("sha256").update(body).digest("hex");
        const { r } = await boot({ uri: putKit(body), sha256: sha }, list);
        expect(r.code, String(error)).to.equal(1);
        expectKitFailure(error);
      }
      expect(fs.existsSync(path.join(scratch, "run/escaped.sh"))).to.equal(false);
      expect(fs.existsSync(path.join(dir, "abs.sh"))).to.equal(false);
      expect(fs.existsSync(path.join(scratch, "run/up.sh"))).to.equal(false);
    });

    it("without a valid BAKE_STATUS_URI it stops before anything, without a power-off", async () => {
      const f = path.join(dir, "bake-bootstrap.sh");
      fs.writeFileSync(f, BAKE_BOOTSTRAP);
      const r = await run("/bin/bash", [f], {
        env: { BAKE_STATUS_URI: "https://example.com/s.json", BAKE_POWEROFF_COMMAND: `echo poweroff >>'${poweroffs}'` },
      });
      expect(r.code).to.equal(2);
      expect(r.stderr).to.include("BAKE_STATUS_URI 'https://example.com/s.json' must be s3://bucket/key");
      expect(powerOffCount()).to.equal(0);
    });

    describe("from S3 (s3rver)", function () {
      this.timeout(900000);
      let s3: S3Server;
      let undoAws: () => void;
      before(async () => {
        undoAws = await preferRealAws();
        s3 = await startS3("artifacts");
      });
      after(async () => {
        undoAws();
        await s3.stop();
      });

      it("fetches the kit from s3://<bucket>/<prefix>bake-kit/, bakes from S3 and writes its status there", async () => {
        const prefix = `windows-arm64/${"d".repeat(8)}/`;
        for (const n of NAMES) await s3.http.put(`${prefix}${n}`, fs.readFileSync(path.join(pub, n)));
        const key = bakeKitKey("windows-arm64/", kit.sha256);
        expect(key).to.equal(`windows-arm64/bake-kit/${kit.sha256}.json.gz`);
        await s3.http.put(key, kit.body);
        const list = entries(pub, (n) => `s3://artifacts/${prefix}${n}`);
        const statusKey = "windows-arm64/bake-status/kit-s3.json";
        const { r } = await boot(
          { uri: `s3://artifacts/${key}`, sha256: kit.sha256 },
          list,
          s3.env,
          `s3://artifacts/${statusKey}`,
        );
        expect(r.code, r.stderr).to.equal(0);
        for (const f of BAKE_FILES) {
          expect(fs.readFileSync(path.join(bakeDir(), f), "utf8"), f).to.equal(kitFiles[f]);
        }
        expectBaked(list);
        const body = await s3.getObject(statusKey);
        expect(body, "status object").to.not.equal(undefined);
        expectOkStatus(JSON.parse(String(body)) as Status, list);
        expect(powerOffCount()).to.equal(1);
      });

      it("a missing kit object: not retried, status failed (in S3) naming the kit, power off", async () => {
        const uri = `s3://artifacts/${bakeKitKey("windows-arm64/", kit.sha256)}`.replace("windows-arm64/", "gone/");
        const statusKey = "windows-arm64/bake-status/kit-missing.json";
        const { r } = await boot(
          { uri, sha256: kit.sha256 },
          entries(pub, (n) => fileUri(path.join(pub, n))),
          s3.env,
          `s3://artifacts/${statusKey}`,
        );
        expect(r.code).to.equal(1);
        const body = await s3.getObject(statusKey);
        expect(body, "status object").to.not.equal(undefined);
        const s = JSON.parse(String(body)) as Status;
        expect(fs.existsSync(statusFile)).to.equal(false);
        expectKitFailure(
          new RegExp(
            `^cannot fetch the bake kit ${uri.replace(/[.*+?^${}()|[\]\\/]/g, "\\$&")} \\(attempt 1/3\\): .*(404|Not Found|NoSuchKey)`,
          ),
          s,
        );
        expect(r.stderr).to.not.include("retrying");
      });

      it("an unreachable S3 is retried, three attempts, then fails naming the kit", async () => {
        const uri = `s3://artifacts/${bakeKitKey("windows-arm64/", kit.sha256)}`;
        const port = await freePort();
        const { r } = await boot(
          { uri, sha256: kit.sha256 },
          entries(pub, (n) => fileUri(path.join(pub, n))),
          {
            ...s3.env,
            S3_ENDPOINT_URL: `http://127.0.0.1:${port}`,
            AWS_MAX_ATTEMPTS: "1",
          },
        );
        expect(r.code).to.equal(1);
        expect(r.stderr.match(/retrying in 5 s/g)).to.have.length(2);
        expectKitFailure(
          /^cannot fetch the bake kit s3:\/\/artifacts\/windows-arm64\/bake-kit\/[0-9a-f]{64}\.json\.gz \(attempt 3\/3\): /,
        );
      });
    });
  });
});

// ---------------------------------------------------------------------------

/**
 * bake-instance.sh against a stand-in `aws`: EC2 state kept in a file, the
 * instance "bakes" (writes FAKE_STATUS_JSON to the status location) when it
 * is first seen running, then stops. `aws s3 ...` goes to the real CLI
 * (s3rver) so the status can live in S3 too.
 */
describe("bake-instance.sh (launch the bake instance, wait, read its status)", function () {
  this.timeout(90000);
  const ID = "i-0abcdef01234567b8";
  let dir: string;
  let bin: string;
  let userData: string;
  let statusFile: string;
  let realAws: string;

  before(async () => {
    realAws = (await runOk("bash", ["-c", "command -v aws"])).trim();
  });

  beforeEach(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), "bake-instance-"));
    bin = path.join(dir, "bin");
    fs.mkdirSync(bin);
    statusFile = path.join(dir, "status", "tok.json");
    fs.mkdirSync(path.dirname(statusFile));
    userData = path.join(dir, "user-data.gz");
    fs.writeFileSync(userData, zlib.gzipSync("#cloud-config\n{}\n"));
    fs.writeFileSync(
      path.join(bin, "aws"),
      [
        "#!/usr/bin/env bash",
        'd=$FAKE_AWS_DIR; printf "%s\\n" "$*" >>"$d/calls"',
        'for a in "$@"; do case $a in s3 | s3api) exec "$REAL_AWS" "$@" ;; ec2) break ;; esac; done',
        '[[ -z ${FAKE_AWS_FAIL:-} ]] || { echo "$FAKE_AWS_FAIL" >&2; exit 254; }',
        "notfound() { echo \"An error occurred (InvalidInstanceID.NotFound) when calling the $1 operation: The instance ID '" +
          ID +
          "' does not exist\" >&2; exit 254; }",
        "bake() { case ${FAKE_BAKE:-ok} in",
        '  ok | failed) if [[ -n ${FAKE_STATUS_S3:-} ]]; then printf "%s\\n" "$FAKE_STATUS_JSON" | "$REAL_AWS" --endpoint-url "$S3_ENDPOINT_URL" s3 cp - "$FAKE_STATUS_S3" >/dev/null; else printf "%s\\n" "$FAKE_STATUS_JSON" >"$FAKE_STATUS_FILE"; fi',
        '    echo stopping >"$d/state" ;;',
        '  nostatus) echo stopping >"$d/state" ;;',
        '  die) echo terminated >"$d/state" ;;',
        "  hang) ;;",
        "esac; }",
        'case "$2" in',
        "  describe-images) echo /dev/sda1 ;;",
        "  run-instances)",
        '    [[ -z ${FAKE_RUN_FAIL:-} ]] || { echo "$FAKE_RUN_FAIL" >&2; exit 254; }',
        '    [[ ! -e $FAKE_STATUS_FILE ]] || echo "stale status present at launch" >>"$d/notes"',
        '    prev=; for a in "$@"; do [[ $prev != --user-data ]] || cp "${a#fileb://}" "$d/user-data-sent"; prev=$a; done',
        '    printf "%s\\n" "$@" >"$d/run-args"; echo pending >"$d/state"; echo ' + ID + " ;;",
        "  describe-instances)",
        "    if [[ $* == *client-token* ]]; then [[ -e $d/state ]] && echo " + ID + "; exit 0; fi",
        "    [[ -e $d/state ]] || notfound DescribeInstances",
        '    if [[ $* == *StateReason* ]]; then echo "Server.InternalError: Internal error on launch"; exit 0; fi',
        '    s=$(cat "$d/state"); echo "$s"',
        '    case $s in pending) echo running >"$d/state" ;; running) bake ;; stopping) echo stopped >"$d/state" ;;',
        '      shutting-down) echo terminated >"$d/state" ;; esac ;;',
        "  terminate-instances)",
        "    [[ -e $d/state ]] || notfound TerminateInstances",
        '    echo shutting-down >"$d/state"; echo "{\\"TerminatingInstances\\": []}" ;;',
        '  get-console-output) printf "%s\\r\\n" "[  OK  ] Started windows-image-bake.service." "bake-image: error: failed while checking: aws not found" ;;',
        '  *) echo "unexpected: $*" >&2; exit 1 ;;',
        "esac",
      ].join("\n") + "\n",
      { mode: 0o755 },
    );
  });
  afterEach(() => fs.rmSync(dir, { recursive: true, force: true }));

  const OK_STATUS = `{"status":"ok","imageSha256":"${"a".repeat(64)}","files":[{"name":"disk.qcow2","sha256":"${"a".repeat(64)}","size":5,"path":"/var/lib/windows-vm/disk.qcow2"}],"finishedAt":"2026-12-01T00:00:00Z"}`;
  const FAILED_STATUS =
    '{"status":"failed","stage":"fetching disk.qcow2 from s3://b/p/disk.qcow2","error":"checksum mismatch for disk.qcow2: expected sha256 aa, actual \\"bb\\"","finishedAt":"2026-12-01T00:00:00Z"}';

  function env(extra: NodeJS.ProcessEnv = {}): NodeJS.ProcessEnv {
    return {
      PATH: `${bin}:${process.env.PATH}`,
      FAKE_AWS_DIR: dir,
      REAL_AWS: realAws,
      FAKE_STATUS_FILE: statusFile,
      FAKE_STATUS_JSON: OK_STATUS,
      BAKE_AMI_ID: "ami-0123456789abcdef0",
      BAKE_INSTANCE_TYPE: "c7g.large",
      BAKE_VOLUME_GIB: "84",
      BAKE_SUBNET_ID: "subnet-0123456789abcdef0",
      BAKE_SECURITY_GROUP_ID: "sg-0123456789abcdef0",
      BAKE_INSTANCE_PROFILE: "windows-arm64-bake",
      BAKE_STATUS_URI: fileUri(statusFile),
      BAKE_USER_DATA_FILE: userData,
      BAKE_TAGS_JSON: '[{"Key":"Stack","Value":"dev"},{"Key":"Name","Value":"bake"}]',
      BAKE_POLL_S: "1",
      ...extra,
    };
  }
  const bakeRun = (extra: NodeJS.ProcessEnv = {}, input?: string) =>
    runScript("bake-instance.sh", ["run"], { env: env(extra), input, timeoutMs: 80000 });
  const calls = () =>
    fs.existsSync(path.join(dir, "calls")) ? fs.readFileSync(path.join(dir, "calls"), "utf8").trim().split("\n") : [];
  const terminations = () => calls().filter((c) => c.startsWith("ec2 terminate-instances"));
  const state = () => fs.readFileSync(path.join(dir, "state"), "utf8").trim();
  async function eventually(what: string, cond: () => boolean) {
    for (let i = 0; i < 200 && !cond(); i++) await new Promise((res) => setTimeout(res, 100));
    expect(cond(), what).to.equal(true);
  }

  it("launches with IMDSv2, an encrypted gp3 root, stop on shutdown and tags; prints the ok status with the instance id", async () => {
    fs.writeFileSync(statusFile, FAILED_STATUS); // a stale status from an earlier try
    const r = await bakeRun();
    expect(r.code, r.stderr).to.equal(0);
    const lines = r.stdout.split("\n");
    expect(lines).to.have.length(2);
    expect(lines[1]).to.equal("");
    const out = JSON.parse(lines[0]) as Record<string, unknown>;
    expect(out).to.deep.equal({ instanceId: ID, ...(JSON.parse(OK_STATUS) as Record<string, unknown>) });
    expect(lines[0].startsWith(`{"instanceId":"${ID}","status":"ok",`)).to.equal(true);

    const args = fs.readFileSync(path.join(dir, "run-args"), "utf8").trim().split("\n");
    const arg = (name: string) => args[args.indexOf(name) + 1];
    expect(arg("--image-id")).to.equal("ami-0123456789abcdef0");
    expect(arg("--instance-type")).to.equal("c7g.large");
    expect(arg("--metadata-options")).to.include("HttpTokens=required");
    expect(arg("--instance-initiated-shutdown-behavior")).to.equal("stop");
    expect(arg("--iam-instance-profile")).to.equal("Name=windows-arm64-bake");
    expect(arg("--subnet-id")).to.equal("subnet-0123456789abcdef0");
    expect(arg("--security-group-ids")).to.equal("sg-0123456789abcdef0");
    expect(args).to.not.include("--key-name");
    expect(JSON.parse(arg("--block-device-mappings"))).to.deep.equal([
      {
        DeviceName: "/dev/sda1",
        Ebs: { VolumeSize: 84, VolumeType: "gp3", Encrypted: true, DeleteOnTermination: true },
      },
    ]);
    const tags = [
      { Key: "Stack", Value: "dev" },
      { Key: "Name", Value: "bake" },
    ];
    expect(JSON.parse(arg("--tag-specifications"))).to.deep.equal([
      { ResourceType: "instance", Tags: tags },
      { ResourceType: "volume", Tags: tags },
    ]);
    expect(arg("--client-token")).to.match(/^bake-/);
    expect(fs.readFileSync(path.join(dir, "user-data-sent")).equals(fs.readFileSync(userData))).to.equal(true);
    expect(fs.existsSync(path.join(dir, "notes")), "the stale status was deleted before the launch").to.equal(false);
    expect(terminations()).to.deep.equal([]);
    expect(state()).to.equal("stopped");
    // The watcher leaves a successful bake alone.
    await new Promise((res) => setTimeout(res, 3000));
    expect(terminations()).to.deep.equal([]);
  });

  it("takes the user data as base64 on stdin when BAKE_USER_DATA_FILE is unset, and refuses one over 16384 bytes", async () => {
    const r = await bakeRun({ BAKE_USER_DATA_FILE: "" }, fs.readFileSync(userData).toString("base64"));
    expect(r.code, r.stderr).to.equal(0);
    expect(fs.readFileSync(path.join(dir, "user-data-sent")).equals(fs.readFileSync(userData))).to.equal(true);
    const big = path.join(dir, "big.gz");
    fs.writeFileSync(big, Buffer.alloc(16385, 1));
    const r2 = await bakeRun({ BAKE_USER_DATA_FILE: big });
    expect(r2.code).to.equal(2);
    expect(r2.stderr).to.include("the user data is 16385 bytes; EC2 takes at most 16384");
  });

  it("reads an ok status from S3 (s3rver)", async () => {
    const s3 = await startS3("artifacts");
    try {
      const uri = "s3://artifacts/windows-arm64/bake-status/t1.json";
      const r = await bakeRun({ ...s3.env, BAKE_STATUS_URI: uri, FAKE_STATUS_S3: uri });
      expect(r.code, r.stderr).to.equal(0);
      expect((JSON.parse(r.stdout) as { instanceId: string }).instanceId).to.equal(ID);
      expect(calls()).to.include(`--endpoint-url ${s3.endpoint} s3 rm --only-show-errors ${uri}`);
    } finally {
      await s3.stop();
    }
  });

  it("status failed: terminates the instance and fails naming the stage and the error", async () => {
    const r = await bakeRun({ FAKE_STATUS_JSON: FAILED_STATUS });
    expect(r.code).to.equal(1);
    expect(r.stdout).to.equal("");
    expect(r.stderr).to.include(
      `the bake on ${ID} failed while fetching disk.qcow2 from s3://b/p/disk.qcow2: checksum mismatch for disk.qcow2: expected sha256 aa, actual "bb"`,
    );
    expect(terminations()).to.deep.equal([`ec2 terminate-instances --instance-ids ${ID}`]);
    expect(state()).to.equal("shutting-down");
  });

  it("no status (a stale one was removed first): prints the console's last lines, terminates, fails", async () => {
    fs.writeFileSync(statusFile, OK_STATUS);
    const r = await bakeRun({ FAKE_BAKE: "nostatus" });
    expect(r.code).to.equal(1);
    expect(r.stderr).to.include(`${ID} stopped without writing a status to ${fileUri(statusFile)}`);
    expect(r.stderr).to.include("  | bake-image: error: failed while checking: aws not found");
    expect(r.stderr).to.not.include("\r");
    expect(calls()).to.include(`ec2 get-console-output --instance-id ${ID} --latest --query Output --output text`);
    expect(terminations()).to.have.length(1);
  });

  it("timeout: an instance that never stops is terminated, with its console", async () => {
    const r = await bakeRun({ FAKE_BAKE: "hang", BAKE_TIMEOUT_S: "3" });
    expect(r.code).to.equal(1);
    expect(r.stderr).to.include(`${ID} did not finish the bake within 3 s (BAKE_TIMEOUT_S; it is running)`);
    expect(r.stderr).to.include("  | [  OK  ] Started windows-image-bake.service.");
    expect(terminations()).to.have.length(1);
  });

  it("an instance terminated under it fails naming the state reason", async () => {
    const r = await bakeRun({ FAKE_BAKE: "die" });
    expect(r.code).to.equal(1);
    expect(r.stderr).to.include(
      `${ID} was terminated before it finished the bake (state reason: Server.InternalError: Internal error on launch)`,
    );
  });

  it("run-instances refused: fails naming the cause, nothing to terminate", async () => {
    const r = await bakeRun({
      FAKE_RUN_FAIL:
        "An error occurred (InsufficientInstanceCapacity) when calling the RunInstances operation: We currently do not have sufficient c7g.large capacity",
    });
    expect(r.code).to.equal(1);
    expect(r.stderr).to.include(
      "run-instances refused the bake instance: An error occurred (InsufficientInstanceCapacity)",
    );
    expect(terminations()).to.deep.equal([]);
  });

  async function startAndSignal(signal: NodeJS.Signals): Promise<{ code: number | null; stderr: string }> {
    const child = spawn("bash", [path.join(repoRoot, "provisioning/bake-instance.sh"), "run"], {
      env: { ...process.env, ...env({ FAKE_BAKE: "hang" }) },
      stdio: ["ignore", "pipe", "pipe"],
    });
    let stderr = "";
    child.stderr.on("data", (d: Buffer) => (stderr += d.toString()));
    child.stdout.resume();
    const done = new Promise<number | null>((resolve) => child.on("close", (code) => resolve(code)));
    await eventually("the instance runs", () => fs.existsSync(path.join(dir, "state")) && state() === "running");
    child.kill(signal);
    const timer = setTimeout(() => child.kill("SIGKILL"), 30000);
    const code = await done;
    clearTimeout(timer);
    return { code, stderr };
  }

  it("SIGTERM (Pulumi's cancel): terminates the instance it started", async () => {
    const r = await startAndSignal("SIGTERM");
    expect(r.code).to.equal(143);
    expect(r.stderr).to.include("interrupted by SIGTERM");
    expect(terminations()).to.deep.equal([`ec2 terminate-instances --instance-ids ${ID}`]);
  });

  it("SIGKILL: the watcher terminates the instance once the script is gone", async () => {
    await startAndSignal("SIGKILL");
    await eventually("the watcher terminated the instance", () => terminations().length > 0);
    expect(terminations()).to.deep.equal([`ec2 terminate-instances --instance-ids ${ID}`]);
  });

  it("terminate: terminates and waits until terminated; a no-op for a gone instance", async () => {
    fs.writeFileSync(path.join(dir, "state"), "stopped\n");
    const r = await runScript("bake-instance.sh", ["terminate", ID], { env: env(), timeoutMs: 30000 });
    expect(r.code, r.stderr).to.equal(0);
    expect(r.stderr).to.include(`${ID} is terminated`);
    expect(state()).to.equal("terminated");
    const again = await runScript("bake-instance.sh", ["terminate", ID], { env: env(), timeoutMs: 30000 });
    expect(again.code, again.stderr).to.equal(0);
    expect(again.stderr).to.include("already terminated");
    fs.rmSync(path.join(dir, "state"));
    const gone = await runScript("bake-instance.sh", ["terminate", ID], { env: env(), timeoutMs: 30000 });
    expect(gone.code, gone.stderr).to.equal(0);
    expect(terminations()).to.have.length(1);
  });

  it("rejects bad arguments and environment before calling EC2", async () => {
    const cases: Array<[string[], NodeJS.ProcessEnv, string]> = [
      [["run"], { BAKE_AMI_ID: "" }, "BAKE_AMI_ID is not set"],
      [["run"], { BAKE_VOLUME_GIB: "4" }, "BAKE_VOLUME_GIB='4' is not a volume size"],
      [["run"], { BAKE_STATUS_URI: "https://x/y.json" }, "BAKE_STATUS_URI='https://x/y.json' must be"],
      [["run"], { BAKE_TAGS_JSON: "Name=x" }, "BAKE_TAGS_JSON must be one line of JSON"],
      [["terminate", "web-1"], {}, "INSTANCE_ID='web-1' is not an EC2 instance id"],
      [["reboot"], {}, "unknown action 'reboot'"],
    ];
    for (const [args, extra, message] of cases) {
      const r = await runScript("bake-instance.sh", args, { env: env(extra) });
      expect(r.code, message).to.equal(2);
      expect(r.stderr).to.include(message);
    }
    expect(calls()).to.deep.equal([]);
  });
});
