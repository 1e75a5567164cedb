import { expect } from "chai";
import { ChildProcess, spawn } from "child_process";
import * as fs from "fs";
import * as os from "os";
import * as path from "path";
import { Manifest, parseManifest } from "../../infra/manifest";
import { holdDisk, sha256, sha256File, stopQemu } from "../support/disk";
import { pathWithout, run, runOk, RunResult, script } from "../support/run";
import { preferRealAws, startS3, S3Server } from "../support/s3";

const MIB64 = 64 * 1024 * 1024;
/** A manifest from a publish that started later than any in these tests. */
const NEWER = { manifestVersion: 2, sha256: "f".repeat(64), createdAt: "2999-01-01T00:00:00Z" };
/** A manifest from long ago. */
const OLDER = { manifestVersion: 2, sha256: "0".repeat(64), createdAt: "2000-01-01T00:00:00Z" };

/** Parses the publish-image stdout: exactly one line of JSON, under 4 KiB, that parseManifest accepts. */
function parseStdout(r: RunResult): Manifest {
  expect(r.stdout.endsWith("\n"), `stdout ends with a newline: ${r.stderr}`).to.equal(true);
  const lines = r.stdout.slice(0, -1).split("\n");
  expect(lines, r.stdout).to.have.length(1);
  expect(Buffer.byteLength(r.stdout), "the stdout line is under 4 KiB").to.be.below(4096);
  const m = parseManifest(r.stdout);
  expect(m).to.deep.equal(JSON.parse(lines[0]));
  return m;
}

/** Pids of the processes whose command line contains TEXT. */
function processesWith(text: string): number[] {
  const found: number[] = [];
  for (const p of fs.readdirSync("/proc")) {
    if (!/^\d+$/.test(p)) continue;
    try {
      if (fs.readFileSync(`/proc/${p}/cmdline`, "utf8").replace(/\0/g, " ").includes(text)) found.push(Number(p));
    } catch {
      // gone meanwhile
    }
  }
  return found;
}

/** Files under ROOT (recursive, dot files too), relative and sorted. */
function list(root: string): string[] {
  if (!fs.existsSync(root)) return [];
  return fs
    .readdirSync(root, { recursive: true, encoding: "utf8" })
    .filter((p) => fs.statSync(path.join(root, p)).isFile())
    .sort();
}

/** The published layout of the images SHAS under a folder. */
function folderLayout(...shas: string[]): string[] {
  const files = shas.flatMap((s) =>
    ["QEMU_EFI.fd", "QEMU_VARS.fd", "disk.qcow2", "manifest.json"].map((f) => `${s}/${f}`),
  );
  return [".publish.lock", ...files, "latest.json"].sort();
}

/** A manifestVersion 1 manifest: the v2 one without what v1 did not have. */
function toV1(m: Manifest, createdAt = m.createdAt): Record<string, unknown> {
  const v1: Record<string, unknown> = { ...m, manifestVersion: 1, createdAt };
  for (const k of ["efiUri", "efiSha256", "efiSize", "files", "host", "machine"]) delete v1[k];
  return v1;
}

/** Zeroes the first refcount block of a qcow2: every allocated cluster then has refcount 0 (corruption). */
function corruptRefcounts(file: string): void {
  const fd = fs.openSync(file, "r+");
  try {
    const header = Buffer.alloc(104);
    fs.readSync(fd, header, 0, header.length, 0);
    const entry = Buffer.alloc(8);
    fs.readSync(fd, entry, 0, 8, Number(header.readBigUInt64BE(48)));
    fs.writeSync(fd, Buffer.alloc(65536), 0, 65536, Number(entry.readBigUInt64BE(0)));
  } finally {
    fs.closeSync(fd);
  }
}

/** Drops the first L2 entry of a qcow2: its data cluster stays allocated but unreferenced (a leak). */
function leakCluster(file: string): void {
  const fd = fs.openSync(file, "r+");
  try {
    const header = Buffer.alloc(104);
    fs.readSync(fd, header, 0, header.length, 0);
    const l1 = Buffer.alloc(8);
    fs.readSync(fd, l1, 0, 8, Number(header.readBigUInt64BE(40)));
    const l2 = l1.readBigUInt64BE(0) & 0x00fffffffffffe00n;
    fs.writeSync(fd, Buffer.alloc(8), 0, 8, Number(l2));
  } finally {
    fs.closeSync(fd);
  }
}

describe("publish-image.sh", function () {
  // The AWS CLI takes a second or more per call on a busy 2-core machine.
  this.timeout(900000);
  let s3: S3Server;
  let realAws: string;
  let host: Manifest["host"];
  let dir: string;
  let vmDir: string;
  let disk: string;
  let tmp: string;

  let undoAws: () => void;

  before(async () => {
    // The aws executable itself, not a pyenv shim (which costs most of a second per call; a publish makes
    // some twenty calls).
    undoAws = await preferRealAws();
    s3 = await startS3("images");
    realAws = (await run("bash", ["-c", "command -v aws"])).stdout.trim();
    const version = await run("qemu-system-aarch64", ["--version"]);
    const pkg = async (p: string) => {
      const r = await run("bash", ["-c", `command -v dpkg-query >/dev/null && dpkg-query -W -f '\${Version}' ${p}`]);
      return r.code === 0 && r.stdout !== "" ? r.stdout : null;
    };
    host = {
      qemuVersion: version.stdout.split("\n")[0],
      qemuPackage: await pkg("qemu-system-arm"),
      firmwarePackage: await pkg("qemu-efi-aarch64"),
    };
  });
  after(async () => {
    undoAws();
    await s3.stop();
  });

  /** A VM folder: a 1 GiB qcow2 holding PATTERN, a 64 MiB variable store and a 64 MiB firmware file. */
  async function makeVm(d: string, pattern = 0x5a): Promise<void> {
    fs.mkdirSync(d, { recursive: true });
    const img = path.join(d, "disk.qcow2");
    await runOk("qemu-img", ["create", "-q", "-f", "qcow2", img, "1G"]);
    await runOk("qemu-io", ["-f", "qcow2", "-c", `write -P ${pattern} 0 8M`, "-c", "write -P 0x17 300M 2M", img]);
    // The same bytes as a 64 MiB buffer written out, but sparse: zeros cost no writes.
    const sparse = (name: string, at: number, text: string) => {
      const file = path.join(d, name);
      fs.writeFileSync(file, Buffer.alloc(at));
      fs.appendFileSync(file, text);
      fs.truncateSync(file, MIB64);
    };
    sparse("QEMU_VARS.fd", 8192, "BOOT0001");
    sparse("QEMU_EFI.fd", 0, "UEFI firmware (test build)");
  }

  beforeEach(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), "publish-"));
    vmDir = path.join(dir, "vm");
    disk = path.join(vmDir, "disk.qcow2");
    tmp = path.join(dir, "tmp");
    fs.mkdirSync(tmp);
    await makeVm(vmDir);
  });
  afterEach(() => fs.rmSync(dir, { recursive: true, force: true }));

  /** What publish makes of FILE: the bytes of `qemu-img convert -O qcow2` (zstd-compressed for "zstd"). */
  async function flatten(file: string, compression: "none" | "zstd" = "none"): Promise<Buffer> {
    const out = path.join(dir, `flat-${Math.random().toString(36).slice(2)}.qcow2`);
    try {
      const zstd = compression === "zstd" ? ["-c", "-o", "compression_type=zstd"] : [];
      await runOk("qemu-img", ["convert", "-O", "qcow2", ...zstd, file, out]);
      return fs.readFileSync(out);
    } finally {
      fs.rmSync(out, { force: true });
    }
  }
  /** The SHA-256 publish gives FILE: that of its flattened copy. */
  const flatSha = async (file: string) => sha256(await flatten(file));

  function publish(uri: string, env: NodeJS.ProcessEnv = {}, vm = vmDir): Promise<RunResult> {
    return run("bash", [script("publish-image.sh"), vm, uri], { env: { ...s3.env, TMPDIR: tmp, ...env } });
  }

  /** A publish in the background, in its own process group (so that all of it can be killed). */
  function start(uri: string, env: NodeJS.ProcessEnv = {}) {
    const child: ChildProcess = spawn("bash", [script("publish-image.sh"), vmDir, uri], {
      env: { ...process.env, ...s3.env, TMPDIR: tmp, PUBLISH_PROGRESS_INTERVAL_S: "1", ...env },
      stdio: ["ignore", "pipe", "pipe"],
      detached: true,
    });
    const out = { stdout: "", stderr: "" };
    child.stdout!.on("data", (d: Buffer) => (out.stdout += d.toString()));
    child.stderr!.on("data", (d: Buffer) => (out.stderr += d.toString()));
    const closed = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) =>
      child.on("close", (code, signal) => resolve({ code, signal })),
    );
    /** Resolves once stderr matches RE (true), or the run ended first (false). */
    const reached = (re: RegExp) =>
      new Promise<boolean>((resolve) => {
        const check = () => {
          if (re.test(out.stderr)) {
            clearInterval(timer);
            resolve(true);
          } else if (child.exitCode !== null || child.signalCode !== null) {
            clearInterval(timer);
            resolve(re.test(out.stderr));
          }
        };
        const timer = setInterval(check, 20);
      });
    const killGroup = (signal: NodeJS.Signals) => {
      try {
        process.kill(-child.pid!, signal);
      } catch {
        // already gone
      }
    };
    return { child, out, closed, reached, killGroup };
  }

  /** Content of a published file:// or s3://images/ URI, or undefined when it does not exist. */
  async function readUri(uri: string): Promise<Buffer | undefined> {
    if (uri.startsWith("s3://images/")) return s3.getObject(uri.slice("s3://images/".length));
    const file = decodeURIComponent(uri.replace(/^file:\/\//, ""));
    return fs.existsSync(file) ? fs.readFileSync(file) : undefined;
  }

  /** Every file the manifest lists is there with its SHA-256 and size; the manifest too. */
  async function expectComplete(m: Manifest): Promise<void> {
    for (const f of m.files) {
      if (f.uri.startsWith("file://")) {
        // A published file, hashed again only when it changed since it was last hashed.
        const file = decodeURIComponent(f.uri.replace(/^file:\/\//, ""));
        expect(fs.existsSync(file), `${f.uri} exists`).to.equal(true);
        const st = fs.statSync(file);
        expect(st.size, `${f.uri} size`).to.equal(f.size);
        expect(hashOf(file, st), `${f.uri} sha256`).to.equal(f.sha256);
        continue;
      }
      const body = await readUri(f.uri);
      expect(body, `${f.uri} exists`).to.not.equal(undefined);
      expect(body!.length, `${f.uri} size`).to.equal(f.size);
      expect(sha256(body!), `${f.uri} sha256`).to.equal(f.sha256);
    }
    if (m.softwareReport) {
      const body = await readUri(m.softwareReport.uri);
      expect(body, `${m.softwareReport.uri} exists`).to.not.equal(undefined);
      expect(sha256(body!), `${m.softwareReport.uri} sha256`).to.equal(m.softwareReport.sha256);
      expect(body!.length, `${m.softwareReport.uri} size`).to.equal(m.softwareReport.size);
    }
    expect(JSON.parse(String(await readUri(m.manifestUri)))).to.deep.equal(m);
  }

  // A file's SHA-256, hashed again only when its inode, size or times moved (any write moves them).
  const hashes = new Map<string, string>();
  const hashOf = (file: string, st: fs.Stats) => {
    const id = `${file} ${st.ino} ${st.size} ${st.mtimeMs} ${st.ctimeMs}`;
    if (!hashes.has(id)) hashes.set(id, sha256File(file));
    return hashes.get(id) as string;
  };

  const expectTmpClean = () => expect(fs.readdirSync(tmp), "work folders left in TMPDIR").to.deep.equal([]);

  async function lastModified(key: string): Promise<string> {
    const h = await s3.http.head(key);
    expect(h, `s3://images/${key} exists`).to.not.equal(undefined);
    return h!.lastModified;
  }

  const putS3Json = (key: string, value: unknown): Promise<void> =>
    s3.http.put(key, `${JSON.stringify(value)}\n`, "application/json");

  const s3Json = async (key: string): Promise<unknown> => JSON.parse(String(await s3.getObject(key)));

  /**
   * A PATH whose first entry holds an `aws` that stands in front of the real CLI
   * for put-object of latest.json: it honours --if-match/--if-none-match as S3
   * does (412 when the object's ETag differs), can refuse them as a CLI without
   * conditional writes does, and writes $INJECT to latest.json once, just before
   * (INJECT_WHEN=before) or just after (after) this publish's own write: the
   * concurrent publish. Each put-object call is logged to $SHIM_LOG.
   */
  function conditionalAws(): string {
    const bin = fs.mkdtempSync(path.join(dir, "bin-"));
    fs.writeFileSync(
      path.join(bin, "aws"),
      `#!/usr/bin/env bash
set -u
args=("$@") key= ifmatch= ifnone= cond=0 put=0
for ((i = 0; i < \${#args[@]}; i++)); do
  case \${args[i]} in
    put-object) put=1 ;;
    --key) key=\${args[i + 1]} ;;
    --if-match) ifmatch=\${args[i + 1]}; cond=1 ;;
    --if-none-match) ifnone=\${args[i + 1]}; cond=1 ;;
  esac
done
if ((put)) && [[ $key == latest.json || $key == */latest.json ]]; then
  echo "$*" >>"$SHIM_LOG"
  if [[ -n \${NO_CONDITIONAL:-} ]] && ((cond)); then
    echo 'aws: error: Unknown options: --if-match, "etag"' >&2
    exit 252
  fi
  # The other publish's write, and the current ETag, straight from s3rver (anonymous HTTP).
  inject() { curl -fsS -o /dev/null -X PUT -H 'content-type: application/json' --data-binary "@$INJECT" "$S3_ENDPOINT_URL/images/$key"; }
  if [[ \${INJECT_WHEN:-} == before && ! -e $INJECT.done ]]; then touch "$INJECT.done"; inject || exit 1; fi
  if ((cond)); then
    cur=$(curl -fsSI "$S3_ENDPOINT_URL/images/$key" 2>/dev/null | tr -d '\\r' | sed -n 's/^etag: //Ip') || cur=
    if [[ -n $ifmatch && $cur != "$ifmatch" ]] || [[ -n $ifnone && -n $cur ]]; then
      echo "An error occurred (PreconditionFailed) when calling the PutObject operation: At least one of the pre-conditions you specified did not hold" >&2
      exit 254
    fi
  fi
  "$REAL_AWS" "$@" || exit
  if [[ \${INJECT_WHEN:-} == after && ! -e $INJECT.done ]]; then touch "$INJECT.done"; inject || exit 1; fi
  exit 0
fi
exec "$REAL_AWS" "$@"
`,
      { mode: 0o755 },
    );
    return `${bin}:${process.env.PATH}`;
  }

  describe("to S3", () => {
    it("publishes disk (flattened), variables, firmware, software report, manifest (v2) and latest.json; prints the manifest as one line", async () => {
      const flat = await flatten(disk);
      const sha = sha256(flat);
      const report = `${JSON.stringify({ windows: { edition: "Professional", build: "22631.2861" }, tools: [] })}\n`;
      fs.writeFileSync(path.join(vmDir, "software-report.json"), report);
      const varsSha = sha256File(path.join(vmDir, "QEMU_VARS.fd"));
      const efiSha = sha256File(path.join(vmDir, "QEMU_EFI.fd"));
      const envFile = path.join(dir, "vm-build.env");
      fs.writeFileSync(
        envFile,
        [
          "# windows-arm64-image: build VM (provisioning)",
          `VM_DIR=${vmDir}`,
          "VM_CPUS=4",
          "VM_MEMORY_GIB=24",
          "VM_ACCEL=tcg",
          "VM_MACHINE_OPTS=gic-version=max,its=off",
          "VM_GIC_VERSION=3",
          `VM_DISK=${disk}`,
          `VM_EFI_CODE=${vmDir}/QEMU_EFI.fd`,
          `VM_EFI_VARS=${vmDir}/QEMU_VARS.fd`,
          "VM_SSH_PORT=2222",
          "",
        ].join("\n"),
      );
      const r = await publish("s3://images/win11/", {
        IMAGE_SOURCE_URL: "s3://source/Win11_ARM64.vhdx",
        IMAGE_SOURCE_SHA256: "AB".repeat(32),
        WINDOWS_VERSION: "11-23H2",
        PUBLISH_VM_ENV: envFile,
      });
      expect(r.code, r.stderr).to.equal(0);
      const m = parseStdout(r);
      const base = `s3://images/win11/${sha}`;
      const size = flat.length;
      expect(m).to.deep.equal({
        manifestVersion: 2,
        sha256: sha,
        size,
        format: "qcow2",
        virtualSize: 1024 * 1024 * 1024,
        compression: "none",
        // makeVm's 8 MiB and 2 MiB of pattern.
        allocatedBytes: 10 * 1024 * 1024,
        publishedBytes: size,
        imageUri: `${base}/disk.qcow2`,
        varsUri: `${base}/QEMU_VARS.fd`,
        varsSha256: varsSha,
        varsSize: MIB64,
        efiUri: `${base}/QEMU_EFI.fd`,
        efiSha256: efiSha,
        efiSize: MIB64,
        manifestUri: `${base}/manifest.json`,
        files: [
          { name: "disk.qcow2", uri: `${base}/disk.qcow2`, sha256: sha, size },
          { name: "QEMU_VARS.fd", uri: `${base}/QEMU_VARS.fd`, sha256: varsSha, size: MIB64 },
          { name: "QEMU_EFI.fd", uri: `${base}/QEMU_EFI.fd`, sha256: efiSha, size: MIB64 },
        ],
        softwareReport: {
          name: "software-report.json",
          uri: `${base}/software-report.json`,
          sha256: sha256(Buffer.from(report)),
          size: Buffer.byteLength(report),
        },
        host,
        machine: { machineOptions: "gic-version=max,its=off", cpus: 4, memoryGiB: 24, accel: "tcg", gicVersion: "3" },
        sourceUrl: "s3://source/Win11_ARM64.vhdx",
        sourceSha256: "ab".repeat(32),
        windowsVersion: "11-23H2",
        createdAt: m.createdAt,
      });
      expect(m.host.qemuVersion).to.match(/^QEMU emulator version \d+\.\d+/);
      expect(m.createdAt).to.match(/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$/);
      expect(Math.abs(Date.parse(m.createdAt) - Date.now())).to.be.below(3600000);

      expect(await s3.listKeys("win11/")).to.deep.equal([
        `win11/${sha}/QEMU_EFI.fd`,
        `win11/${sha}/QEMU_VARS.fd`,
        `win11/${sha}/disk.qcow2`,
        `win11/${sha}/manifest.json`,
        `win11/${sha}/software-report.json`,
        "win11/latest.json",
      ]);
      const image = await s3.getObject(`win11/${sha}/disk.qcow2`);
      expect(image && image.equals(flat), "the published disk is the flattened copy").to.equal(true);
      expect(String(await s3.getObject(`win11/${sha}/software-report.json`))).to.equal(report);
      await expectComplete(m);
      expect(await s3Json("win11/latest.json")).to.deep.equal(m);
      // Progress and results went to stderr; the work folder is gone.
      expect(r.stderr).to.contain("publish-image: uploading");
      expect(r.stderr).to.contain(`publish-image: checking ${disk} (qemu-img check)`);
      expect(fs.readFileSync(`${disk}.sha256`, "utf8")).to.match(new RegExp(`^${sha} ${m.size} `));
      expectTmpClean();
    });

    it("uploads no disk on a rerun with the same disk: repairs latest.json, and turns a manifestVersion 1 into 2", async () => {
      const r1 = await publish("s3://images/rerun");
      expect(r1.code, r1.stderr).to.equal(0);
      const m1 = parseStdout(r1);
      const sha = m1.sha256;
      expect(m1.machine, "no PUBLISH_VM_ENV").to.equal(null);
      const imageModified = await lastModified(`rerun/${sha}/disk.qcow2`);
      // Someone pointed latest.json elsewhere meanwhile.
      await putS3Json("rerun/latest.json", { sha256: "other" });

      const r2 = await publish("s3://images/rerun/");
      expect(r2.code, r2.stderr).to.equal(0);
      expect(r2.stderr).to.contain("no upload needed");
      expect(r2.stderr).to.not.contain("uploading");
      expect(r2.stderr).to.contain("holds no manifest this publish can compare; replacing it");
      expect(parseStdout(r2)).to.deep.equal(m1);
      expect(await s3Json("rerun/latest.json")).to.deep.equal(m1);

      // Without the local hash stamp the disk is flattened and hashed again; the published copy
      // is found by that hash and kept as it is: nothing is uploaded.
      fs.rmSync(`${disk}.sha256`);
      const r3 = await publish("s3://images/rerun");
      expect(r3.code, r3.stderr).to.equal(0);
      expect(r3.stderr).to.contain("this disk was already published at s3://images/rerun/");
      expect(r3.stderr).to.contain("no upload needed");
      expect(r3.stderr).to.not.contain("uploading");
      expect(parseStdout(r3)).to.deep.equal(m1);
      expect(await s3.listKeys("rerun/")).to.not.satisfy((keys: string[]) => keys.some((k) => k.includes("staging")));

      // What an earlier release published: no firmware, a v1 manifest.
      await putS3Json(`rerun/${sha}/manifest.json`, toV1(m1));
      await putS3Json("rerun/latest.json", toV1(m1));
      await s3.http.remove(`rerun/${sha}/QEMU_EFI.fd`);
      const r4 = await publish("s3://images/rerun/");
      expect(r4.code, r4.stderr).to.equal(0);
      expect(r4.stderr).to.contain("is already published; writing its variables, firmware and a manifestVersion 2");
      expect(r4.stderr).to.not.match(/uploading \S+disk\.qcow2/);
      expect(r4.stderr).to.not.match(/uploading \S+QEMU_VARS\.fd/);
      expect(r4.stderr).to.match(/uploading \S+\/QEMU_EFI\.fd to s3:\/\/images\/rerun\/[0-9a-f]{64}\/QEMU_EFI\.fd/);
      // The same image, so the same manifest as a fresh v2 publish wrote then.
      expect(parseStdout(r4)).to.deep.equal(m1);
      expect(await s3Json("rerun/latest.json")).to.deep.equal(m1);
      await expectComplete(m1);
      // The disk was never uploaded again.
      expect(await lastModified(`rerun/${sha}/disk.qcow2`)).to.equal(imageModified);
      expectTmpClean();
    });

    it("interrupted publishes (SIGTERM while uploading; SIGKILL of the whole group after the disk upload) keep the previous latest.json and image; reruns complete", async () => {
      const r1 = await publish("s3://images/crash/");
      expect(r1.code, r1.stderr).to.equal(0);
      const old = parseStdout(r1);

      // The VM ran again: a bigger, different disk.
      await runOk("qemu-io", ["-f", "qcow2", "-c", "write -P 0x66 16M 200M", disk]);
      const shaA = await flatSha(disk);
      const p = start("s3://images/crash/");
      expect(await p.reached(/uploading .*disk\.qcow2/), p.out.stderr).to.equal(true);
      await new Promise((res) => setTimeout(res, 700));
      p.child.kill("SIGTERM");
      const end = await p.closed;
      // The script stopped (by the signal, through its trap), its uploader with it.
      expect(end.code, p.out.stderr).to.equal(143);
      expect(p.out.stderr).to.contain("terminated");
      expect(p.out.stdout).to.equal("");
      expect(processesWith(`s3://images/crash/${shaA}/disk.qcow2`), "uploader still running").to.deep.equal([]);
      expect(await s3Json("crash/latest.json")).to.deep.equal(old);
      await expectComplete(old);
      expect(await s3.getObject(`crash/${shaA}/manifest.json`)).to.equal(undefined);
      // The disk goes straight to its key, where S3 shows it only complete: at most that is new.
      const leftA = (await s3.listKeys("crash/")).filter((k) => !k.startsWith(`crash/${old.sha256}/`));
      expect(
        leftA.filter((k) => k !== `crash/${shaA}/disk.qcow2`),
        p.out.stderr,
      ).to.deep.equal(["crash/latest.json"]);
      const partial = leftA.includes(`crash/${shaA}/disk.qcow2`)
        ? await s3.getObject(`crash/${shaA}/disk.qcow2`)
        : undefined;
      expect(partial === undefined || sha256(partial) === shaA, "a disk object is the whole disk").to.equal(true);
      expectTmpClean();

      // A rerun finishes the job and only then moves latest.json.
      const r2 = await publish("s3://images/crash/");
      expect(r2.code, r2.stderr).to.equal(0);
      const mA = parseStdout(r2);
      expect(mA.sha256).to.equal(shaA);
      expect(await s3Json("crash/latest.json")).to.deep.equal(mA);

      // Again, killed without a chance to clean up, after the disk's server-side copy.
      await runOk("qemu-io", ["-f", "qcow2", "-c", "write -P 0x67 16M 20M", disk]);
      const shaB = await flatSha(disk);
      const k = start("s3://images/crash/");
      expect(await k.reached(/uploading \S+\/QEMU_VARS\.fd to /), k.out.stderr).to.equal(true);
      const delay = Math.floor(Math.random() * 300);
      await new Promise((res) => setTimeout(res, delay));
      k.killGroup("SIGKILL");
      const at = `killed ${delay} ms after the variables upload began; ${k.out.stderr}`;
      expect((await k.closed).signal, at).to.equal("SIGKILL");
      expect(await s3Json("crash/latest.json"), at).to.deep.equal(mA);
      await expectComplete(mA);
      const imageKeys = (...shas: string[]) =>
        folderLayout(...shas)
          .filter((f) => f !== ".publish.lock")
          .map((f) => `crash/${f}`);
      // Only the new image's objects without a manifest (incomplete, named by no latest.json) can remain.
      for (const key of (await s3.listKeys("crash/")).filter((x) => !imageKeys(old.sha256, shaA).includes(x))) {
        expect(key, at).to.match(new RegExp(`^crash/${shaB}/(disk\\.qcow2|QEMU_VARS\\.fd)$`));
      }

      const r3 = await publish("s3://images/crash/");
      expect(r3.code, r3.stderr).to.equal(0);
      const mB = parseStdout(r3);
      expect(mB.sha256).to.equal(shaB);
      expect(await s3Json("crash/latest.json")).to.deep.equal(mB);
      await expectComplete(mB);
      expect(await s3.listKeys("crash/")).to.deep.equal(imageKeys(old.sha256, shaA, shaB));
      // The killed run's work folder went with the rerun.
      expectTmpClean();
    });

    it("fails clearly on bad arguments and missing files", async () => {
      const r1 = await publish("https://images/x");
      expect(r1.code).to.equal(1);
      expect(r1.stderr).to.contain("must look like s3://bucket/prefix/ or file:///absolute/dir/");
      const r3 = await publish("s3://images/x/", { IMAGE_SOURCE_SHA256: "xyz" });
      expect(r3.code).to.equal(1);
      expect(r3.stderr).to.contain("IMAGE_SOURCE_SHA256");
      const r4 = await run("bash", [script("publish-image.sh"), vmDir]);
      expect(r4.code).to.equal(2);
      expect(r4.stdout).to.equal("");
      const r5 = await publish("s3://images/x/", { PUBLISH_VM_ENV: path.join(dir, "missing.env") });
      expect(r5.code).to.equal(1);
      expect(r5.stderr).to.match(/PUBLISH_VM_ENV '.*missing\.env' does not exist or is not readable/);
      const r6 = await publish("s3://images/x/", { PUBLISH_LOCK_TIMEOUT_S: "soon" });
      expect(r6.code).to.equal(1);
      expect(r6.stderr).to.contain("PUBLISH_LOCK_TIMEOUT_S must be a positive integer, got 'soon'");
      fs.rmSync(path.join(vmDir, "QEMU_VARS.fd"));
      const r2 = await publish("s3://images/x/");
      expect(r2.code).to.equal(1);
      expect(r2.stderr).to.match(/QEMU_VARS\.fd not found/);
      expect(await s3.listKeys("x/")).to.deep.equal([]);
      expectTmpClean();
    });

    it("refuses, before uploading anything, a DEST_URI so long that the manifest line would reach 4 KiB", async () => {
      const uri = `s3://images/long-${"p".repeat(600)}/`;
      const r = await publish(uri);
      expect(r.code).to.equal(1);
      expect(r.stdout).to.equal("");
      expect(r.stderr).to.match(/error: the manifest would be a \d+-byte line, and it must stay under 4096 bytes: /);
      expect(r.stderr).to.contain(
        `DEST_URI is ${uri.length} characters (it appears in 7 URIs), IMAGE_SOURCE_URL 0; use a shorter prefix or folder`,
      );
      expect(r.stderr).to.not.contain("uploading");
      expect(await s3.listKeys("long-")).to.deep.equal([]);
      expectTmpClean();
    });

    it("publishes when S3 answers 403 for missing keys (the role may list only its prefix)", async () => {
      // Real S3 gives 403, not 404, for a missing key to a caller without s3:ListBucket on the whole
      // bucket. This aws wrapper turns every 404 into that 403; listing still works.
      const bin = fs.mkdtempSync(path.join(dir, "bin-"));
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
      expect(await s3Json("forbidden/latest.json")).to.deep.equal(m);
      // When the listing is refused too, a 403 cannot be told from a refusal: named, never taken for "missing".
      const r2 = await publish("s3://images/denied/", { ...env, DENY_LIST: "1" });
      expect(r2.code).to.equal(1);
      expect(r2.stderr).to.match(/error: cannot read s3:\/\/images\/denied\/[0-9a-f]{64}\/manifest\.json: .*\(403\)/);
      expect(await s3.listKeys("denied/")).to.deep.equal([]);
    });

    describe("latest.json never moves backwards", () => {
      it("a newer manifest written between this publish's read and its write (412) is left in place", async () => {
        await putS3Json("cond/latest.json", OLDER);
        const inject = path.join(dir, "newer.json");
        fs.writeFileSync(inject, `${JSON.stringify(NEWER)}\n`);
        const log = path.join(dir, "put-object.log");
        const r = await publish("s3://images/cond/", {
          PATH: conditionalAws(),
          REAL_AWS: realAws,
          INJECT: inject,
          INJECT_WHEN: "before",
          SHIM_LOG: log,
        });
        expect(r.code, r.stderr).to.equal(0);
        const m = parseStdout(r);
        // The write was conditional on the ETag it had read; S3 refused it; the publish read again.
        expect(fs.readFileSync(log, "utf8")).to.match(/ --if-match "[0-9a-f]+"/);
        expect(r.stderr).to.contain(
          "s3://images/cond/latest.json changed while it was written (another publish); reading it again",
        );
        expect(r.stderr).to.contain(
          `s3://images/cond/latest.json points at a newer image (sha256 ${NEWER.sha256}, created ${NEWER.createdAt}); left as it is`,
        );
        expect(await s3Json("cond/latest.json")).to.deep.equal(NEWER);
        // Its own image is complete all the same.
        await expectComplete(m);
        expectTmpClean();
      });

      it("with an AWS CLI that cannot write conditionally: warns, and writes again when an older manifest replaced its own", async () => {
        const inject = path.join(dir, "older.json");
        fs.writeFileSync(inject, `${JSON.stringify(OLDER)}\n`);
        const log = path.join(dir, "put-object.log");
        // Also: no prefix, and no source metadata.
        const r = await publish("s3://images", {
          PATH: conditionalAws(),
          REAL_AWS: realAws,
          INJECT: inject,
          INJECT_WHEN: "after",
          NO_CONDITIONAL: "1",
          SHIM_LOG: log,
        });
        expect(r.code, r.stderr).to.equal(0);
        const m = parseStdout(r);
        expect(m.imageUri).to.equal(`s3://images/${m.sha256}/disk.qcow2`);
        expect([m.sourceUrl, m.sourceSha256, m.windowsVersion]).to.deep.equal([null, null, null]);
        expect(r.stderr).to.contain("warning: this AWS CLI cannot write conditionally (no put-object --if-match)");
        expect(r.stderr).to.contain(
          "warning: s3://images/latest.json was replaced by an older or unknown manifest right after it was written; writing it again",
        );
        // The first call carried the condition, the retries did not.
        const calls = fs.readFileSync(log, "utf8").trim().split("\n");
        expect(calls[0]).to.contain("--if-none-match *");
        expect(calls.slice(1).join("\n")).to.not.contain("--if-");
        expect(await s3Json("latest.json")).to.deep.equal(m);
        await expectComplete(m);
      });
    });
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
    const publishTo = (uri: string, env: NodeJS.ProcessEnv = {}, vm = vmDir) =>
      publish(uri, { PATH: shimPath(), ...env }, vm);

    it("publishes into the folder (percent-decoded, created when missing) without the AWS CLI", async () => {
      const root = path.join(dir, "out dir", "images");
      const uri = `file://${path.join(dir, "out%20dir", "images")}/`;
      const flat = await flatten(disk);
      const sha = sha256(flat);
      const r = await publishTo(uri, { WINDOWS_VERSION: "11-24H2" });
      expect(r.code, r.stderr).to.equal(0);
      expect(r.stderr).to.not.contain("aws was called");
      const m = parseStdout(r);
      const base = uri.slice(0, -1);
      expect(m.sha256).to.equal(sha);
      expect(m.imageUri).to.equal(`${base}/${sha}/disk.qcow2`);
      expect(m.varsUri).to.equal(`${base}/${sha}/QEMU_VARS.fd`);
      expect(m.efiUri).to.equal(`${base}/${sha}/QEMU_EFI.fd`);
      expect(m.manifestUri).to.equal(`${base}/${sha}/manifest.json`);
      expect(m.windowsVersion).to.equal("11-24H2");
      expect(m.host).to.deep.equal(host);
      // Exactly the layout S3 gets, and the folder's lock file; staging is gone.
      expect(list(root)).to.deep.equal(folderLayout(sha));
      expect(fs.readFileSync(path.join(root, sha, "disk.qcow2")).equals(flat)).to.equal(true);
      await expectComplete(m);
      expect(JSON.parse(fs.readFileSync(path.join(root, "latest.json"), "utf8"))).to.deep.equal(m);
      for (const f of list(root).filter((f) => f !== ".publish.lock")) {
        expect(fs.statSync(path.join(root, f)).mode & 0o777, f).to.equal(0o644);
      }
      expectTmpClean();

      // A rerun copies nothing and leaves the files as they are.
      const before = fs.statSync(path.join(root, sha, "disk.qcow2")).mtimeMs;
      const r2 = await publishTo(uri);
      expect(r2.code, r2.stderr).to.equal(0);
      expect(r2.stderr).to.contain("no upload needed");
      expect(parseStdout(r2)).to.deep.equal(m);
      expect(fs.statSync(path.join(root, sha, "disk.qcow2")).mtimeMs).to.equal(before);
      expect(list(root)).to.deep.equal(folderLayout(sha));
    });

    it("publishes an overlay flattened and compacted (zstd when asked): the chain's content, no backing file, the VM's disk untouched", async () => {
      // The VM's disk as the pipeline leaves it: an overlay on a base, with data the guest discarded (TRIM).
      const base = path.join(vmDir, "base.qcow2");
      fs.renameSync(disk, base);
      await runOk("qemu-img", ["create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", disk]);
      await runOk("qemu-io", ["-f", "qcow2", "-c", "write -P 0x44 400M 32M", "-c", "discard 400M 16M", disk]);
      const diskBefore = sha256File(disk);
      const root = path.join(dir, "flat");
      const r = await publishTo(`file://${root}`, { IMAGE_COMPRESSION: "zstd" });
      expect(r.code, r.stderr).to.equal(0);
      expect(r.stderr).to.contain(`${disk} is an overlay on ${base}: it is published flattened`);
      expect(r.stderr).to.match(
        /flattening \S+disk\.qcow2 into \S+ \(qemu-img convert -O qcow2 -c -o compression_type=zstd;/,
      );
      const z = parseStdout(r);
      const published = path.join(root, z.sha256, "disk.qcow2");
      expect(z.sha256).to.equal(sha256(await flatten(disk, "zstd")));
      expect(z.compression).to.equal("zstd");
      // Base 8 + 2 MiB, overlay 32 MiB of which 16 MiB discarded.
      expect(z.allocatedBytes).to.equal(26 * 1024 * 1024);
      expect(z.publishedBytes).to.equal(fs.statSync(published).size);
      const info = JSON.parse(await runOk("qemu-img", ["info", "--output=json", published])) as Record<string, unknown>;
      expect(info["backing-filename"], "no backing file").to.equal(undefined);
      expect((info["format-specific"] as { data: Record<string, unknown> }).data["compression-type"]).to.equal("zstd");
      const map = JSON.parse(await runOk("qemu-img", ["map", "--output=json", published])) as Record<string, unknown>[];
      expect(
        map.some((e) => e.data === true && e.offset === undefined),
        "compressed clusters (data without a host offset)",
      ).to.equal(true);
      // What the guest sees is the same; the VM's own disk is only read.
      await runOk("qemu-img", ["compare", "-f", "qcow2", "-F", "qcow2", disk, published]);
      expect(sha256File(disk)).to.equal(diskBefore);
      expect(JSON.parse(await runOk("qemu-img", ["info", "--output=json", disk]))["backing-filename"]).to.equal(base);
      await expectComplete(z);

      // Uncompressed: still only the data (no discarded or zero clusters), at most 5% more.
      const r2 = await publishTo(`file://${root}`);
      expect(r2.code, r2.stderr).to.equal(0);
      const n = parseStdout(r2);
      expect(n.compression).to.equal("none");
      expect(n.sha256).to.not.equal(z.sha256);
      expect(n.allocatedBytes).to.equal(z.allocatedBytes);
      expect(n.publishedBytes).to.be.at.most(n.allocatedBytes * 1.05);
      expect(n.publishedBytes, "the discarded 16 MiB are not published").to.be.below(
        fs.statSync(disk).size + fs.statSync(base).size - 16 * 1024 * 1024,
      );
      await runOk("qemu-img", ["compare", "-f", "qcow2", "-F", "qcow2", disk, path.join(root, n.sha256, "disk.qcow2")]);

      // A new software report for the same disk: no conversion, no disk copy; the report and a manifest.
      const diskMtime = fs.statSync(path.join(root, n.sha256, "disk.qcow2")).mtimeMs;
      fs.writeFileSync(path.join(vmDir, "software-report.json"), '{"openssh":"9.5"}\n');
      const r3 = await publishTo(`file://${root}`);
      expect(r3.code, r3.stderr).to.equal(0);
      expect(r3.stderr).to.not.contain("flattening");
      const m3 = parseStdout(r3);
      expect(m3.sha256).to.equal(n.sha256);
      expect(m3.softwareReport?.uri).to.equal(`file://${root}/${n.sha256}/software-report.json`);
      expect(fs.readFileSync(path.join(root, n.sha256, "software-report.json"), "utf8")).to.equal(
        '{"openssh":"9.5"}\n',
      );
      expect(fs.statSync(path.join(root, n.sha256, "disk.qcow2")).mtimeMs).to.equal(diskMtime);
      await expectComplete(m3);

      const bad = await publishTo(`file://${root}`, { IMAGE_COMPRESSION: "xz" });
      expect(bad.code).to.equal(1);
      expect(bad.stderr).to.contain("IMAGE_COMPRESSION 'xz' is not none or zstd");
    });

    it("records null for what this host cannot tell (no dpkg, no qemu-system-aarch64, no PUBLISH_VM_ENV)", async () => {
      const bin = pathWithout(["dpkg-query", "qemu-system-aarch64", "aws"], path.join(dir, "bin-bare"));
      const r = await publish(`file://${dir}/bare`, { PATH: bin });
      expect(r.code, r.stderr).to.equal(0);
      const m = parseStdout(r);
      expect(m.host).to.deep.equal({ qemuVersion: null, qemuPackage: null, firmwarePackage: null });
      expect(m.machine).to.equal(null);
    });

    it("records the machine from PUBLISH_VM_ENV, with the optional keys only when set", async () => {
      const envFile = path.join(dir, "vm.env");
      fs.writeFileSync(envFile, "VM_MACHINE_TYPE=virt-7.2\r\n\n  # comment\nVM_ACCEL=kvm\nVM_MEMORY_GIB=8\n");
      const r = await publishTo(`file://${dir}/machine`, { PUBLISH_VM_ENV: envFile });
      expect(r.code, r.stderr).to.equal(0);
      expect(parseStdout(r).machine).to.deep.equal({
        machineOptions: "",
        cpus: null,
        memoryGiB: 8,
        accel: "kvm",
        machineType: "virt-7.2",
      });
      // What run-vm.sh resolved at the VM's last start (VM_DIR/vm-resolved.env) wins, for these two keys only.
      const resolved = path.join(vmDir, "vm-resolved.env");
      fs.writeFileSync(
        resolved,
        "# run-vm.sh\nVM_MACHINE_TYPE=virt-8.2\nVM_GIC_VERSION=2\nVM_DISK_CACHE=none\nVM_CPUS=99\n",
      );
      try {
        const rr = await publishTo(`file://${dir}/machine-resolved`, { PUBLISH_VM_ENV: envFile });
        expect(rr.code, rr.stderr).to.equal(0);
        expect(parseStdout(rr).machine).to.deep.equal({
          machineOptions: "",
          cpus: null,
          memoryGiB: 8,
          accel: "kvm",
          machineType: "virt-8.2",
          gicVersion: "2",
        });
      } finally {
        fs.rmSync(resolved, { force: true });
      }
      fs.writeFileSync(envFile, "VM_CPUS=four\n");
      const r2 = await publishTo(`file://${dir}/machine`, { PUBLISH_VM_ENV: envFile });
      expect(r2.code).to.equal(1);
      expect(r2.stderr).to.match(/PUBLISH_VM_ENV .*vm\.env: VM_CPUS 'four' is not a whole number/);
      // The env file of another VM folder does not describe this one.
      fs.writeFileSync(envFile, "VM_DIR=/var/lib/windows-vm\n");
      const r3 = await publishTo(`file://${dir}/machine`, { PUBLISH_VM_ENV: envFile });
      expect(r3.code).to.equal(1);
      expect(r3.stderr).to.contain(`sets VM_DIR=/var/lib/windows-vm, but what is published is ${vmDir}:`);
    });

    it("keeps the manifest line under 4 KiB with long URIs", async () => {
      const root = path.join(dir, "a".repeat(100), "b".repeat(80));
      const r = await publishTo(`file://${root}/`, {
        IMAGE_SOURCE_URL: `https://media.example.com/${"w".repeat(300)}/Windows11_ARM64.vhdx`,
        PUBLISH_VM_ENV: "",
      });
      expect(r.code, r.stderr).to.equal(0);
      const m = parseStdout(r);
      expect(Buffer.byteLength(r.stdout)).to.be.above(3000);
      expect(m.imageUri.length).to.be.above(250);
      // One more long segment and it would not fit: refused before anything is copied.
      const longer = path.join(root, "c".repeat(120));
      const r2 = await publishTo(`file://${longer}/`, { IMAGE_SOURCE_URL: m.sourceUrl! });
      expect(r2.code).to.equal(1);
      expect(r2.stderr).to.match(/the manifest would be a (\d+)-byte line, and it must stay under 4096 bytes/);
      expect(r2.stderr).to.contain(`IMAGE_SOURCE_URL ${m.sourceUrl!.length}`);
      expect(fs.existsSync(longer)).to.equal(false);
    });

    it("completes a manifestVersion 1 image in place, and replaces changed variables without copying the disk", async () => {
      const root = path.join(dir, "v1");
      const r1 = await publishTo(`file://${root}`);
      expect(r1.code, r1.stderr).to.equal(0);
      const m1 = parseStdout(r1);
      const sha = m1.sha256;
      const then = "2020-01-01T00:00:00Z";
      fs.writeFileSync(path.join(root, sha, "manifest.json"), `${JSON.stringify(toV1(m1, then))}\n`);
      fs.writeFileSync(path.join(root, "latest.json"), `${JSON.stringify(toV1(m1, then))}\n`);
      fs.rmSync(path.join(root, sha, "QEMU_EFI.fd"));
      const diskMtime = fs.statSync(path.join(root, sha, "disk.qcow2")).mtimeMs;

      const r2 = await publishTo(`file://${root}`);
      expect(r2.code, r2.stderr).to.equal(0);
      const m2 = parseStdout(r2);
      // The same image: its date is kept, and latest.json (v1, same date) moves to v2.
      expect(m2).to.deep.equal({ ...m1, createdAt: then });
      expect(JSON.parse(fs.readFileSync(path.join(root, "latest.json"), "utf8"))).to.deep.equal(m2);
      await expectComplete(m2);
      expect(fs.statSync(path.join(root, sha, "disk.qcow2")).mtimeMs).to.equal(diskMtime);
      expect(list(root)).to.deep.equal(folderLayout(sha));

      // The VM changed its boot entries but not its disk: new variables, a new manifest, newer than the last.
      const vars = fs.readFileSync(path.join(vmDir, "QEMU_VARS.fd"));
      vars.write("BOOT0002", 16384);
      fs.writeFileSync(path.join(vmDir, "QEMU_VARS.fd"), vars);
      const r3 = await publishTo(`file://${root}`);
      expect(r3.code, r3.stderr).to.equal(0);
      const m3 = parseStdout(r3);
      expect(m3.varsSha256).to.equal(sha256(vars));
      expect(m3.createdAt).to.not.equal(then);
      expect(m3.efiSha256).to.equal(m1.efiSha256);
      expect(sha256File(path.join(root, sha, "QEMU_VARS.fd"))).to.equal(m3.varsSha256);
      expect(JSON.parse(fs.readFileSync(path.join(root, "latest.json"), "utf8"))).to.deep.equal(m3);
      expect(fs.statSync(path.join(root, sha, "disk.qcow2")).mtimeMs).to.equal(diskMtime);
      expect(list(root)).to.deep.equal(folderLayout(sha));
      expectTmpClean();
    });

    it("leaves a newer latest.json in place, and still publishes its own image", async () => {
      const root = path.join(dir, "newer");
      fs.mkdirSync(root);
      fs.writeFileSync(path.join(root, "latest.json"), `${JSON.stringify(NEWER)}\n`);
      const r = await publishTo(`file://${root}`);
      expect(r.code, r.stderr).to.equal(0);
      const m = parseStdout(r);
      expect(r.stderr).to.contain(
        `points at a newer image (sha256 ${NEWER.sha256}, created ${NEWER.createdAt}); left as it is`,
      );
      expect(JSON.parse(fs.readFileSync(path.join(root, "latest.json"), "utf8"))).to.deep.equal(NEWER);
      await expectComplete(m);
    });

    it("two publishes at once: both complete, and latest.json ends at the newer", async () => {
      const root = path.join(dir, "both");
      const vm2 = path.join(dir, "vm2");
      await makeVm(vm2, 0x42);
      const [a, b] = await Promise.all([publishTo(`file://${root}`), publishTo(`file://${root}`, {}, vm2)]);
      expect(a.code, a.stderr).to.equal(0);
      expect(b.code, b.stderr).to.equal(0);
      const ms = [parseStdout(a), parseStdout(b)];
      expect(ms[0].sha256).to.not.equal(ms[1].sha256);
      const newer = ms.reduce((x, y) => ([x.createdAt, x.sha256] > [y.createdAt, y.sha256] ? x : y));
      expect(JSON.parse(fs.readFileSync(path.join(root, "latest.json"), "utf8"))).to.deep.equal(newer);
      for (const m of ms) await expectComplete(m);
      expect(list(root)).to.deep.equal(folderLayout(ms[0].sha256, ms[1].sha256));
      expectTmpClean();
    });

    it("a publish killed (SIGKILL, whole process group) at random points loses nothing; the next run sweeps up", async () => {
      const root = path.join(dir, "killed");
      const r0 = await publishTo(`file://${root}`);
      expect(r0.code, r0.stderr).to.equal(0);
      let old = parseStdout(r0);
      const points = [/uploading .*disk\.qcow2 \(/, /copying to file:/, /published file:/, /latest\.json now points/];
      for (const [i, point] of points.entries()) {
        await runOk("qemu-io", ["-f", "qcow2", "-c", `write -P ${0x30 + i} 16M 8M`, disk]);
        const newSha = await flatSha(disk);
        const p = start(`file://${root}`, { PATH: shimPath() });
        const reached = await p.reached(point);
        const delay = Math.floor(Math.random() * 200);
        await new Promise((res) => setTimeout(res, delay));
        p.killGroup("SIGKILL");
        await p.closed;
        const at = `killed ${delay} ms after ${point} (reached: ${reached}); ${p.out.stderr}`;

        // latest.json is the old manifest, or (killed after writing it) the new, complete one.
        const latest = JSON.parse(fs.readFileSync(path.join(root, "latest.json"), "utf8")) as Manifest;
        if (latest.sha256 === newSha) await expectComplete(latest);
        else expect(latest, at).to.deep.equal(old);
        await expectComplete(old);
        for (const f of list(root).filter((f) => f.startsWith(`${newSha}/`))) {
          expect(fs.existsSync(path.join(root, newSha, "manifest.json")), `${f} without its manifest; ${at}`).to.equal(
            true,
          );
        }

        const r = await publishTo(`file://${root}`);
        expect(r.code, `${at}\nrerun: ${r.stderr}`).to.equal(0);
        const m = parseStdout(r);
        expect(m.sha256).to.equal(newSha);
        expect(JSON.parse(fs.readFileSync(path.join(root, "latest.json"), "utf8"))).to.deep.equal(m);
        await expectComplete(m);
        // No staging, no temporary file, no work folder of the killed run is left.
        expect(
          list(root).filter((f) => !/^([0-9a-f]{64}\/|latest\.json$|\.publish\.lock$)/.test(f)),
          at,
        ).to.deep.equal([]);
        expect(fs.existsSync(path.join(root, "staging")), at).to.equal(false);
        expectTmpClean();
        old = m;
      }
    });

    it("a publish stopped halfway leaves the old latest.json and no staging file; a rerun finishes", async () => {
      const root = path.join(dir, "halt");
      const r1 = await publishTo(`file://${root}`);
      expect(r1.code, r1.stderr).to.equal(0);
      const old = parseStdout(r1);
      await runOk("qemu-io", ["-f", "qcow2", "-c", "write -P 0x66 16M 20M", disk]);
      const newSha = await flatSha(disk);

      // `sync` (run once the staging file is written) hangs: the publish is stopped there. The TERM is
      // handled once the foreground sync returns, so its hang is kept short (it outlasts the checks below).
      const mark = path.join(dir, "syncing");
      const name = `publish-test-hung-sync-${path.basename(dir)}`;
      const p = start(`file://${root}`, { PATH: shimPath({ sync: `touch ${mark}; exec -a ${name} sleep 10` }) });
      for (let i = 0; i < 600 && !fs.existsSync(mark) && p.child.exitCode === null; i++) {
        await new Promise((res) => setTimeout(res, 100));
      }
      if (!fs.existsSync(mark)) {
        p.killGroup("SIGKILL");
        throw new Error(`publish never reached sync: ${p.out.stderr}`);
      }
      const staged = list(root).filter((f) => f.startsWith("staging/"));
      expect(staged.map((f) => path.basename(f)).sort(), "the run's staging folder while the copy runs").to.deep.equal([
        "disk.qcow2",
        "lock",
      ]);
      p.child.kill("SIGTERM");
      expect((await p.closed).code, p.out.stderr).to.equal(143);
      // Its children (the hung sync among them) stopped with it.
      expect(processesWith(name)).to.deep.equal([]);
      expect(p.out.stdout).to.equal("");
      expect(JSON.parse(fs.readFileSync(path.join(root, "latest.json"), "utf8"))).to.deep.equal(old);
      expect(list(root)).to.deep.equal(folderLayout(old.sha256));
      expectTmpClean();

      const r2 = await publishTo(`file://${root}/`);
      expect(r2.code, r2.stderr).to.equal(0);
      const m2 = parseStdout(r2);
      expect(m2.sha256).to.equal(newSha);
      expect(JSON.parse(fs.readFileSync(path.join(root, "latest.json"), "utf8"))).to.deep.equal(m2);
      expect(list(root)).to.deep.equal(folderLayout(old.sha256, newSha));
    });

    it("warns about leaked clusters (space only) and publishes", async () => {
      leakCluster(disk);
      const r = await publishTo(`file://${dir}/leaky`);
      expect(r.code, r.stderr).to.equal(0);
      expect(r.stderr).to.match(
        /warning: qemu-img check: .*disk\.qcow2 has 1 leaked clusters \(space only, nothing lost/,
      );
      await expectComplete(parseStdout(r));
    });

    it("sweeps staging whose run is gone (at once) or that has no lock (after a day), and keeps a live run's", async () => {
      const root = path.join(dir, "sweep");
      const dirs = {
        dead: path.join(root, "staging", "20260101T000000Z-dead01"),
        live: path.join(root, "staging", "20260101T000000Z-live01"),
        stale: path.join(root, "staging", "20200101T000000Z-1-1"),
        recent: path.join(root, "staging", "recent-run"),
      };
      for (const d of Object.values(dirs)) {
        fs.mkdirSync(d, { recursive: true });
        fs.writeFileSync(path.join(d, "disk.qcow2"), "partial");
      }
      fs.writeFileSync(path.join(dirs.dead, "lock"), "");
      fs.writeFileSync(path.join(dirs.live, "lock"), "");
      const twoDaysAgo = new Date(Date.now() - 2 * 86400 * 1000);
      fs.utimesSync(dirs.stale, twoDaysAgo, twoDaysAgo);
      // A run that is still going holds its lock.
      const holder = spawn("flock", ["-x", path.join(dirs.live, "lock"), "sleep", "120"], { stdio: "ignore" });
      try {
        for (let i = 0; i < 100; i++) {
          if ((await run("flock", ["-n", path.join(dirs.live, "lock"), "true"])).code !== 0) break;
          await new Promise((res) => setTimeout(res, 50));
        }
        const r = await publishTo(`file://${root}`);
        expect(r.code, r.stderr).to.equal(0);
        expect(r.stderr).to.contain(`removing stale staging folder ${dirs.stale}`);
        expect(r.stderr).to.contain(`removing stale staging folder ${dirs.dead}`);
        expect(fs.existsSync(dirs.stale)).to.equal(false);
        expect(fs.existsSync(dirs.dead)).to.equal(false);
        expect(fs.readFileSync(path.join(dirs.live, "disk.qcow2"), "utf8")).to.equal("partial");
        expect(fs.readFileSync(path.join(dirs.recent, "disk.qcow2"), "utf8")).to.equal("partial");
      } finally {
        holder.kill("SIGKILL");
      }
    });

    it("removes the work folder a killed run left in TMPDIR, and keeps a live run's and other folders", async () => {
      const dead = path.join(tmp, "publish-image.dead01");
      const live = path.join(tmp, "publish-image.live01");
      const other = path.join(tmp, "something-else");
      for (const d of [dead, live, other]) {
        fs.mkdirSync(d);
        fs.writeFileSync(path.join(d, "lock"), "");
      }
      const holder = spawn("flock", ["-x", path.join(live, "lock"), "sleep", "120"], { stdio: "ignore" });
      try {
        for (let i = 0; i < 100; i++) {
          if ((await run("flock", ["-n", path.join(live, "lock"), "true"])).code !== 0) break;
          await new Promise((res) => setTimeout(res, 50));
        }
        const r = await publishTo(`file://${dir}/tmpsweep`);
        expect(r.code, r.stderr).to.equal(0);
        expect(r.stderr).to.contain(`removing stale work folder ${dead}`);
        expect(fs.readdirSync(tmp).sort()).to.deep.equal(["publish-image.live01", "something-else"]);
      } finally {
        holder.kill("SIGKILL");
      }
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
      expectTmpClean();
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

  describe("fault table: the cause named, the previous latest.json and image intact, nothing left behind", () => {
    interface Backend {
      name: string;
      uri: string;
      /** Every published object with what identifies its content and its last write. */
      snapshot(): Promise<Record<string, string>>;
      latest(): Promise<unknown>;
    }
    interface Fault {
      name: string;
      /** Breaks the VM folder (or the tools); returns extra environment and an undo. */
      prepare(b: Backend): Promise<{ env?: NodeJS.ProcessEnv; undo?: () => Promise<void> }>;
      error: (b: Backend) => RegExp;
      only?: "s3" | "folder";
      /** Keys this fault is documented to leave (S3: the new image's objects before its manifest). */
      leaves?: (newSha: string) => string[];
    }
    let shared: string;
    const olds: Record<string, Manifest> = {};
    /** Each backend's published objects as the last row left them. */
    const current: Record<string, Record<string, string>> = {};
    const backends: Backend[] = [
      {
        name: "s3",
        uri: "s3://images/faults/",
        // One listing: size, ETag (the MD5 of a single-part upload) and time of every object.
        snapshot: async () =>
          Object.fromEntries(
            (await s3.http.list("faults/")).map((o) => [o.key, `${o.size} ${o.etag} ${o.lastModified}`]),
          ),
        latest: () => s3Json("faults/latest.json"),
      },
      {
        name: "folder",
        get uri() {
          return `file://${shared}/out/`;
        },
        snapshot: async () => {
          const root = path.join(shared, "out");
          return Object.fromEntries(
            list(root).map((f) => {
              const st = fs.statSync(path.join(root, f));
              return [f, `${st.size} ${hashOf(path.join(root, f), st)} ${st.mtimeMs}`];
            }),
          );
        },
        latest: async () => JSON.parse(fs.readFileSync(path.join(shared, "out", "latest.json"), "utf8")),
      },
    ];
    const bin = (name: string, body: string) => {
      const d = fs.mkdtempSync(path.join(dir, "bin-"));
      fs.writeFileSync(path.join(d, name), `#!/usr/bin/env bash\n${body}\n`, { mode: 0o755 });
      return `${d}:${process.env.PATH}`;
    };
    const faults: Fault[] = [
      {
        name: "the disk is held by a running QEMU",
        prepare: async () => {
          const qemu = await holdDisk(disk);
          return { undo: () => stopQemu(qemu) };
        },
        error: () => /disk\.qcow2 is in use by a running QEMU; shut the VM down before publishing/,
      },
      {
        name: "qemu-img check finds the disk corrupt",
        prepare: async () => {
          corruptRefcounts(disk);
          return {};
        },
        error: () =>
          /qemu-img check found \S+disk\.qcow2 corrupt \(\d+ corruptions, 0 leaked clusters, 0 check errors\): refusing to publish it/,
      },
      {
        name: "the disk's backing file is missing",
        prepare: async () => {
          const base = path.join(dir, "base.qcow2");
          fs.renameSync(disk, base);
          await runOk("qemu-img", ["create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", disk]);
          fs.rmSync(base);
          return {};
        },
        error: () => /qemu-img cannot read \S+disk\.qcow2\b.*base\.qcow2/,
      },
      {
        name: "the software report is not a JSON object",
        prepare: async () => {
          fs.writeFileSync(path.join(vmDir, "software-report.json"), "[1, 2");
          return {};
        },
        error: () => /software-report\.json is not a JSON object \(the check step writes it\)/,
      },
      {
        name: "the disk keeps its data in an external file",
        prepare: async () => {
          fs.rmSync(disk);
          await runOk("qemu-img", ["create", "-q", "-f", "qcow2", "-o", `data_file=${dir}/data.raw`, disk, "64M"]);
          return {};
        },
        error: () =>
          /disk\.qcow2 keeps its data in an external file \(\S+data\.raw\): publish writes a self-contained image/,
      },
      {
        name: "the firmware file is not 64 MiB",
        prepare: async () => {
          fs.truncateSync(path.join(vmDir, "QEMU_EFI.fd"), 2 * 1024 * 1024);
          return {};
        },
        error: () => /QEMU_EFI\.fd is 2097152 bytes, not the 64 MiB \(67108864 bytes\) firmware image QEMU boots/,
      },
      {
        name: "the firmware file is missing",
        prepare: async () => {
          fs.rmSync(path.join(vmDir, "QEMU_EFI.fd"));
          return {};
        },
        error: () => /QEMU_EFI\.fd not found \(the firmware the image boots from is published with it/,
      },
      {
        name: "the VM env file names other firmware than the one published",
        prepare: async () => {
          const f = path.join(dir, "vm.env");
          fs.writeFileSync(f, "VM_CPUS=4\nVM_EFI_CODE=/usr/share/AAVMF/AAVMF_CODE.fd\n");
          return { env: { PUBLISH_VM_ENV: f } };
        },
        error: () =>
          /sets VM_EFI_CODE=\/usr\/share\/AAVMF\/AAVMF_CODE\.fd, but what is published is \S+QEMU_EFI\.fd: the manifest would not describe what the image ran with/,
      },
      {
        name: "the VM env file has a line run-vm.sh would refuse",
        prepare: async () => {
          const f = path.join(dir, "vm.env");
          fs.writeFileSync(f, "VM_CPUS=4\nexport VM_MEMORY_GIB=8\n");
          return { env: { PUBLISH_VM_ENV: f } };
        },
        error: () => /PUBLISH_VM_ENV \S+vm\.env:2 is not a KEY=value line: 'export VM_MEMORY_GIB=8'/,
      },
      {
        name: "S3 cannot be reached",
        only: "s3",
        // One attempt: the CLI's retry back-offs against a closed port only add seconds.
        prepare: async () => ({ env: { S3_ENDPOINT_URL: "http://127.0.0.1:9", AWS_MAX_ATTEMPTS: "1" } }),
        error: () => /publish-image: error: .*http:\/\/127\.0\.0\.1:9/,
      },
      {
        name: "writing the firmware fails after the disk was copied",
        prepare: async (b) => {
          if (b.name === "folder") {
            const cp = (await run("bash", ["-c", "command -v cp"])).stdout.trim();
            return {
              env: {
                PATH: bin(
                  "cp",
                  `if [[ "$*" == *QEMU_EFI.fd* ]]; then echo "cp: error writing '$3': No space left on device" >&2; exit 1; fi; exec ${cp} "$@"`,
                ),
              },
            };
          }
          return {
            env: {
              REAL_AWS: realAws,
              PATH: bin(
                "aws",
                'if [[ " $* " == *"/QEMU_EFI.fd s3://"* ]]; then echo "upload failed: An error occurred (InternalError) when calling the PutObject operation" >&2; exit 1; fi; exec "$REAL_AWS" "$@"',
              ),
            },
          };
        },
        error: (b) =>
          b.name === "folder"
            ? /error: copying \S+\/QEMU_EFI\.fd to \S+\/QEMU_EFI\.fd failed: cp: error writing .*No space left on device/
            : /error: upload of \S+\/QEMU_EFI\.fd to s3:\/\/images\/faults\/[0-9a-f]{64}\/QEMU_EFI\.fd failed: .*InternalError/,
        // S3 cannot copy a set of objects at once: the disk and the variables stay, without a manifest.
        leaves: (sha) => [`faults/${sha}/QEMU_VARS.fd`, `faults/${sha}/disk.qcow2`],
      },
    ];

    before(async () => {
      shared = fs.mkdtempSync(path.join(os.tmpdir(), "publish-faults-"));
      const vm = path.join(shared, "vm");
      await makeVm(vm, 0x21);
      for (const b of backends) {
        const r = await run("bash", [script("publish-image.sh"), vm, b.uri], { env: { ...s3.env, TMPDIR: shared } });
        expect(r.code, r.stderr).to.equal(0);
        olds[b.name] = parseStdout(r);
        await expectComplete(olds[b.name]);
        current[b.name] = await b.snapshot();
      }
    });
    after(() => fs.rmSync(shared, { recursive: true, force: true }));

    for (const b of backends) {
      for (const f of faults.filter((x) => !x.only || x.only === b.name)) {
        it(`${b.name}: ${f.name}`, async () => {
          const before = current[b.name];
          const newSha = await flatSha(disk);
          const { env, undo } = await f.prepare(b);
          let r: RunResult;
          try {
            r = await publish(b.uri, env);
          } finally {
            if (undo) await undo();
          }
          expect(r.code, r.stderr).to.equal(1);
          expect(r.stdout).to.equal("");
          expect(r.stderr).to.match(f.error(b));
          // Every object as it was (latest.json and the old image among them: on S3 the ETag is the
          // MD5 of the content), plus what the fault is documented to leave.
          const after = await b.snapshot();
          current[b.name] = { ...after };
          for (const k of b.name === "s3" && f.leaves ? f.leaves(newSha) : []) {
            if (!(k in before)) {
              expect(after, "documented leftover").to.have.property(k);
              delete after[k];
            }
          }
          expect(after, "what is published").to.deep.equal(before);
          if (b.name === "folder") await expectComplete(olds[b.name]);
          expect(await b.latest(), "latest.json").to.deep.equal(olds[b.name]);
          expectTmpClean();
        });
      }
    }
  });
});
