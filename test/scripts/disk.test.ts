import { expect } from "chai";
import * as fs from "fs";
import * as os from "os";
import * as path from "path";
import { holdDisk, sha256File, stopQemu } from "../support/disk";
import { run, runOk, runScript } from "../support/run";

const GIB = 1024 * 1024 * 1024;

async function info(file: string): Promise<{ format: string; "virtual-size": number }> {
  return JSON.parse(await runOk("qemu-img", ["info", "-U", "--output=json", file]));
}

describe("prepare-disk.sh", function () {
  this.timeout(120000);
  let dir: string;

  beforeEach(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), "disk-"));
  });
  afterEach(() => fs.rmSync(dir, { recursive: true, force: true }));

  /** A 256 MiB VHDX with some data written into it. */
  async function makeVhdx(name = "win.vhdx", pattern = "0xab"): Promise<string> {
    const src = path.join(dir, name);
    await runOk("qemu-img", ["create", "-q", "-f", "vhdx", src, "256M"]);
    await runOk("qemu-io", ["-f", "vhdx", "-c", `write -P ${pattern} 1M 3M`, "-c", "write -P 0x11 200M 512k", src]);
    return src;
  }

  it("converts a VHDX to a valid qcow2 of the same virtual size and content", async () => {
    const src = await makeVhdx();
    const dest = path.join(dir, "vm", "disk.qcow2");
    const r = await runScript("prepare-disk.sh", [src, dest]);
    expect(r.code, r.stderr).to.equal(0);
    expect(r.stdout).to.equal("");
    expect(r.stderr).to.match(/converting: 100%/);
    const di = await info(dest);
    expect(di.format).to.equal("qcow2");
    expect(di["virtual-size"]).to.equal(256 * 1024 * 1024);
    expect((await run("qemu-img", ["check", dest])).code).to.equal(0);
    const cmp = await run("qemu-img", ["compare", "-f", "vhdx", "-F", "qcow2", src, dest]);
    expect(cmp.code, cmp.stdout + cmp.stderr).to.equal(0);
    expect(fs.readFileSync(`${dest}.source-sha256`, "utf8").trim()).to.equal(sha256File(src));
    expect(fs.existsSync(`${dest}.partial`)).to.equal(false);
  });

  it("skips a rerun, and never wipes a disk the VM has changed while the source is the same", async () => {
    const src = await makeVhdx();
    const dest = path.join(dir, "disk.qcow2");
    const r1 = await runScript("prepare-disk.sh", [src, dest]);
    expect(r1.code, r1.stderr).to.equal(0);
    // "Boot" the VM: the guest writes to its disk.
    await runOk("qemu-io", ["-f", "qcow2", "-c", "write -P 0x77 100M 1M", dest]);
    const before = fs.statSync(dest);
    const r2 = await runScript("prepare-disk.sh", [src, dest]);
    expect(r2.code, r2.stderr).to.equal(0);
    expect(r2.stderr).to.match(/already prepared .*kept as it is/);
    expect(r2.stderr).to.not.match(/converting/);
    // Hashed once (then the SOURCE.sha256 stamp is reused).
    expect(r2.stderr).to.not.match(/computing SHA-256/);
    const after = fs.statSync(dest);
    expect(after.ino).to.equal(before.ino);
    expect(after.mtimeMs).to.equal(before.mtimeMs);
    const read = await runOk("qemu-io", ["-f", "qcow2", "-c", "read -P 0x77 100M 1M", dest]);
    expect(read).to.contain("read 1048576/1048576");
  });

  it("replaces the disk when the source changes", async () => {
    const src = await makeVhdx();
    const dest = path.join(dir, "disk.qcow2");
    expect((await runScript("prepare-disk.sh", [src, dest])).code).to.equal(0);
    await runOk("qemu-io", ["-f", "vhdx", "-c", "write -P 0xcd 1M 3M", src]);
    const r = await runScript("prepare-disk.sh", [src, dest]);
    expect(r.code, r.stderr).to.equal(0);
    expect(r.stderr).to.contain("prepared from another source; replacing it");
    expect((await run("qemu-img", ["compare", "-f", "vhdx", "-F", "qcow2", src, dest])).code).to.equal(0);
    expect(fs.readFileSync(`${dest}.source-sha256`, "utf8").trim()).to.equal(sha256File(src));
  });

  it("uses the SOURCE.sha256 stamp written by fetch-image.sh instead of hashing", async () => {
    const src = await makeVhdx();
    const st = (await runOk("stat", ["-c", "%s %.9Y", src])).trim();
    const recorded = "c".repeat(64);
    fs.writeFileSync(`${src}.sha256`, `${recorded} ${st}\n`);
    const dest = path.join(dir, "disk.qcow2");
    const r = await runScript("prepare-disk.sh", [src, dest]);
    expect(r.code, r.stderr).to.equal(0);
    expect(r.stderr).to.not.match(/computing SHA-256/);
    expect(fs.readFileSync(`${dest}.source-sha256`, "utf8").trim()).to.equal(recorded);
  });

  it("treats a disk without its stamp as incomplete and rebuilds it", async () => {
    const src = await makeVhdx();
    const dest = path.join(dir, "disk.qcow2");
    fs.writeFileSync(dest, "half-written");
    const r = await runScript("prepare-disk.sh", [src, dest]);
    expect(r.code, r.stderr).to.equal(0);
    expect(r.stderr).to.contain("has no");
    expect((await info(dest)).format).to.equal("qcow2");
  });

  it("checks and copies a qcow2 source", async () => {
    const src = path.join(dir, "src.qcow2");
    await runOk("qemu-img", ["create", "-q", "-f", "qcow2", src, "128M"]);
    await runOk("qemu-io", ["-f", "qcow2", "-c", "write -P 0x42 0 2M", src]);
    const dest = path.join(dir, "out", "disk.qcow2");
    const r = await runScript("prepare-disk.sh", [src, dest]);
    expect(r.code, r.stderr).to.equal(0);
    expect(r.stderr).to.contain("checking");
    expect(r.stderr).to.contain("copying");
    expect(fs.readFileSync(dest).equals(fs.readFileSync(src))).to.equal(true);
  });

  it("refuses a damaged qcow2 source", async () => {
    const src = path.join(dir, "bad.qcow2");
    await runOk("qemu-img", ["create", "-q", "-f", "qcow2", src, "128M"]);
    await runOk("qemu-io", ["-f", "qcow2", "-c", "write -P 0x42 0 2M", src]);
    // Zero the refcount of cluster 0 (the header): "refcount=0 reference=1" is corruption.
    const buf = fs.readFileSync(src);
    const refcountTable = Number(buf.readBigUInt64BE(48));
    const refcountBlock = Number(buf.readBigUInt64BE(refcountTable));
    buf.writeUInt16BE(0, refcountBlock);
    fs.writeFileSync(src, buf);
    const dest = path.join(dir, "disk.qcow2");
    const r = await runScript("prepare-disk.sh", [src, dest]);
    expect(r.code).to.not.equal(0);
    expect(r.stderr).to.contain("qemu-img check found");
    expect(fs.existsSync(dest)).to.equal(false);
    expect(fs.existsSync(`${dest}.partial`)).to.equal(false);
  });

  it("converts raw and vmdk sources", async () => {
    for (const fmt of ["raw", "vmdk"]) {
      const src = path.join(dir, `src.${fmt === "raw" ? "img" : fmt}`);
      await runOk("qemu-img", ["create", "-q", "-f", fmt, src, "64M"]);
      await runOk("qemu-io", ["-f", fmt, "-c", "write -P 0x5a 4M 1M", src]);
      const dest = path.join(dir, `${fmt}.qcow2`);
      const r = await runScript("prepare-disk.sh", [src, dest]);
      expect(r.code, r.stderr).to.equal(0);
      expect(r.stderr).to.contain(`(${fmt}, virtual size 64 MiB)`);
      expect((await info(dest)).format).to.equal("qcow2");
      expect((await run("qemu-img", ["compare", "-f", fmt, "-F", "qcow2", src, dest])).code).to.equal(0);
    }
  });

  it("converts a fixed-size VHD (its footer only at the end: qemu-img probes it as raw)", async () => {
    const src = path.join(dir, "fixed.vhd");
    await runOk("qemu-img", ["create", "-q", "-f", "vpc", "-o", "subformat=fixed", src, "64M"]);
    await runOk("qemu-io", ["-f", "vpc", "-c", "write -P 0x33 1M 1M", src]);
    const dest = path.join(dir, "vhd.qcow2");
    const r = await runScript("prepare-disk.sh", [src, dest]);
    expect(r.code, r.stderr).to.equal(0);
    expect(r.stderr).to.contain("(vpc, virtual size 64 MiB)");
    expect((await run("qemu-img", ["compare", "-f", "vpc", "-F", "qcow2", src, dest])).code).to.equal(0);
  });

  it("makes an empty qcow2 of SIZE_GIB (default 64) for an ISO, and grows but never shrinks it", async () => {
    const content = path.join(dir, "iso-content");
    fs.mkdirSync(content);
    fs.writeFileSync(path.join(content, "setup.exe"), "MZ");
    const iso = path.join(dir, "Win11_ARM64.ISO");
    await runOk("xorriso", ["-as", "mkisofs", "-quiet", "-o", iso, content]);

    const def = path.join(dir, "default.qcow2");
    const r0 = await runScript("prepare-disk.sh", [iso, def]);
    expect(r0.code, r0.stderr).to.equal(0);
    expect((await info(def))["virtual-size"]).to.equal(64 * GIB);

    const dest = path.join(dir, "disk.qcow2");
    const r1 = await runScript("prepare-disk.sh", [iso, dest, "2"]);
    expect(r1.code, r1.stderr).to.equal(0);
    expect(r1.stderr).to.contain("install ISO");
    const i1 = await info(dest);
    expect(i1.format).to.equal("qcow2");
    expect(i1["virtual-size"]).to.equal(2 * GIB);
    // Empty: reads back as zeros, and takes almost no space.
    expect(fs.statSync(dest).size).to.be.below(1024 * 1024);
    await runOk("qemu-io", ["-f", "qcow2", "-c", "write -P 0x99 0 64k", dest]);

    const r2 = await runScript("prepare-disk.sh", [iso, dest, "3"]);
    expect(r2.code, r2.stderr).to.equal(0);
    expect(r2.stderr).to.contain("growing");
    expect((await info(dest))["virtual-size"]).to.equal(3 * GIB);
    const r3 = await runScript("prepare-disk.sh", [iso, dest, "1"]);
    expect(r3.code, r3.stderr).to.equal(0);
    expect(r3.stderr).to.contain("never shrunk");
    expect((await info(dest))["virtual-size"]).to.equal(3 * GIB);
    // The installed data survived both reruns.
    expect(await runOk("qemu-io", ["-f", "qcow2", "-c", "read -P 0x99 0 64k", dest])).to.contain("read 65536/65536");
  });

  it("refuses to replace a disk that a running QEMU holds", async () => {
    const src = await makeVhdx();
    const dest = path.join(dir, "disk.qcow2");
    expect((await runScript("prepare-disk.sh", [src, dest])).code).to.equal(0);
    await runOk("qemu-io", ["-f", "vhdx", "-c", "write -P 0xee 1M 1M", src]);
    const qemu = await holdDisk(dest);
    try {
      const r = await runScript("prepare-disk.sh", [src, dest]);
      expect(r.code).to.not.equal(0);
      expect(r.stderr).to.match(/in use by a running QEMU/);
    } finally {
      await stopQemu(qemu);
    }
    // The old disk and its stamp are still there, so nothing is lost.
    expect((await info(dest)).format).to.equal("qcow2");
  });

  it("fails clearly on a missing source or a bad size", async () => {
    const r1 = await runScript("prepare-disk.sh", [path.join(dir, "nope.vhdx"), path.join(dir, "d.qcow2")]);
    expect(r1.code).to.not.equal(0);
    expect(r1.stderr).to.match(/prepare-disk: error: source image .*nope\.vhdx does not exist/);
    const iso = path.join(dir, "x.iso");
    fs.writeFileSync(iso, "x");
    const r2 = await runScript("prepare-disk.sh", [iso, path.join(dir, "d.qcow2"), "0"]);
    expect(r2.code).to.not.equal(0);
    expect(r2.stderr).to.contain("SIZE_GIB must be a positive whole number");
  });

  it("refuses an image format it does not convert (legacy qcow version 1)", async () => {
    const src = path.join(dir, "old.qcow");
    await runOk("qemu-img", ["create", "-q", "-f", "qcow", src, "16M"]);
    const r = await runScript("prepare-disk.sh", [src, path.join(dir, "d.qcow2")]);
    expect(r.code).to.not.equal(0);
    expect(r.stderr).to.contain("has format 'qcow', which this script does not convert");
    expect(fs.existsSync(path.join(dir, "d.qcow2"))).to.equal(false);
  });
});
