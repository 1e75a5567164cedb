import { expect } from "chai";
import * as fs from "fs";
import * as os from "os";
import * as path from "path";
import { parseConfig } from "../../infra/config";
import {
  AWS_LAYOUT,
  baseDigest,
  baseKey,
  baseParts,
  buildPlan,
  planFiles,
  resolveCommand,
} from "../../infra/pipeline/plan";
import { holdDisk, sha256File, stopQemu } from "../support/disk";
import { run, runOk, runScript } from "../support/run";

// base-image.sh against real qcow2 images (qemu-img, qemu-io): the install
// disk frozen as the content-addressed base, overlays on it, the claim that
// keeps a provisioning from running on top of another, and the retention rule.

const ANSWER = "e".repeat(64);
const HASHES = Object.fromEntries(planFiles().map((f) => [f, `hash-of-${f}`]));
const RAW = {
  sshAllowedCidrs: '["203.0.113.7/32"]',
  windowsImageUrl: "s3://media/win.vhdx",
  windowsImageSha256: "a".repeat(64),
  windowsVersion: "11-23h2",
};
const MACHINE = { cpus: 8, memoryGiB: 32, cwd: process.cwd() };

describe("base-image.sh (real qcow2 images)", function () {
  this.timeout(120_000);
  let dir: string;
  let vm: string;

  beforeEach(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), "base-image-"));
    vm = path.join(dir, "vm");
    fs.mkdirSync(vm);
  });
  afterEach(() => {
    for (const f of fs.readdirSync(vm)) fs.chmodSync(path.join(vm, f), 0o644);
    fs.rmSync(dir, { recursive: true, force: true });
  });

  const f = (name: string) => path.join(vm, name);
  const base = (cmd: string, key: string, env: NodeJS.ProcessEnv = {}) =>
    runScript("base-image.sh", [cmd, vm, key], { timeoutMs: 60_000, env });
  /** An install disk holding a pattern at offset 0 (what "Windows" wrote), and its EFI variable store. */
  async function install(pattern: string): Promise<void> {
    await runOk("qemu-img", ["create", "-q", "-f", "qcow2", f("install.qcow2"), "64M"]);
    await runOk("qemu-io", ["-f", "qcow2", "-c", `write -P ${pattern} 0 64k`, f("install.qcow2")]);
    fs.writeFileSync(f("QEMU_VARS.fd"), `vars of install ${pattern}\n`);
  }
  /** Whether the disk (through its backing chain) reads PATTERN at OFFSET. */
  async function reads(disk: string, pattern: string, offset: string): Promise<boolean> {
    const r = await run("qemu-io", ["-r", "-f", "qcow2", "-c", `read -P ${pattern} ${offset} 64k`, disk]);
    const mismatch = /Pattern verification failed/.test(r.stdout + r.stderr);
    expect(r.code === 0 || mismatch, r.stdout + r.stderr).to.equal(true);
    return r.code === 0 && !mismatch;
  }
  const backing = async (disk: string) =>
    (JSON.parse(await runOk("qemu-img", ["info", "--output=json", "-U", disk])) as { "backing-filename"?: string })[
      "backing-filename"
    ];

  it("freezes the install disk as base-<digest>.qcow2, the digest the plan's baseDigest computes for the key its command carries", async () => {
    const config = parseConfig(RAW, new Set(), MACHINE);
    const p = buildPlan({ config, layout: { ...AWS_LAYOUT, vmDir: vm }, fileHashes: HASHES });
    const parts = baseParts(config, { ...AWS_LAYOUT, vmDir: vm }, HASHES);
    // The key exactly as the baseImage stage runs it, its answer-file token resolved.
    const cmd = resolveCommand(p.stage("baseImage").command as string, { answerFile: ANSWER });
    const m = /base-image\.sh freeze \S+ '(\{[^']*\})'/.exec(cmd);
    expect(m, cmd).to.not.equal(null);
    const key = m?.[1] as string;
    expect(key).to.equal(resolveCommand(baseKey(parts), { answerFile: ANSWER }));
    const d = baseDigest(parts, ANSWER);

    await install("0xab");
    fs.writeFileSync(f("install.qcow2.source-sha256"), `${"a".repeat(64)}\n`);
    const inode = fs.statSync(f("install.qcow2")).ino;
    const absent = await base("present", key);
    expect(absent.code, absent.stderr).to.equal(1);
    expect(absent.stderr).to.include(`base-${d} is not present`);
    const r = await base("freeze", key);
    expect(r.code, r.stderr).to.equal(0);
    expect(r.stdout).to.equal(`base-image: base-${d} frozen\n`);
    // Renamed, not copied; read-only; the variable store and the key beside it.
    expect(fs.existsSync(f("install.qcow2"))).to.equal(false);
    expect(fs.existsSync(f("install.qcow2.source-sha256")), "prepare-disk's stamp of the gone disk").to.equal(false);
    expect(fs.statSync(f(`base-${d}.qcow2`)).ino).to.equal(inode);
    for (const n of [`base-${d}.qcow2`, `base-${d}.vars.fd`, `base-${d}.json`])
      expect(fs.statSync(f(n)).mode & 0o777, n).to.equal(0o444);
    expect(fs.readFileSync(f(`base-${d}.vars.fd`), "utf8")).to.equal("vars of install 0xab\n");
    expect(fs.readFileSync(f(`base-${d}.json`), "utf8")).to.equal(`${key}\n`);
    const present = await base("present", key);
    expect(present.code, present.stderr).to.equal(0);
    expect(present.stderr).to.include(`base-${d} is present: Windows is not installed again`);
    // Frozen again (the stage re-run): kept, and a new install disk left by prepareDisk removed.
    await install("0xcd");
    const again = await base("freeze", key);
    expect(again.code, again.stderr).to.equal(0);
    expect(again.stdout).to.equal(`base-image: base-${d} is current: kept\n`);
    expect(fs.existsSync(f("install.qcow2"))).to.equal(false);
    expect(await reads(f(`base-${d}.qcow2`), "0xab", "0")).to.equal(true);
  });

  it("an overlay starts from the base (its variable store too); a claimed overlay is never provisioned on again", async () => {
    const key = '{"answerFileSha256":"1","sourceSha256":"2"}';
    await install("0xab");
    expect((await base("freeze", key)).code).to.equal(0);
    const [name] = fs.readdirSync(vm).filter((n) => n.endsWith(".qcow2"));
    const baseSha = sha256File(f(name));

    // Run 1: a fresh overlay, claimed by its provisioning, which writes a marker.
    fs.writeFileSync(f("QEMU_VARS.fd"), "changed by an earlier boot\n");
    const o = await base("overlay", key);
    expect(o.code, o.stderr).to.equal(0);
    expect(o.stdout).to.equal(`base-image: fresh overlay disk.qcow2 on ${name}\n`);
    expect(await backing(f("disk.qcow2"))).to.equal(name);
    expect(fs.readFileSync(f("QEMU_VARS.fd"), "utf8")).to.equal("vars of install 0xab\n");
    expect(fs.existsSync(f("disk.qcow2.fresh"))).to.equal(true);
    const overlayInode = fs.statSync(f("disk.qcow2")).ino;
    const c1 = await base("claim", key);
    expect(c1.code, c1.stderr).to.equal(0);
    expect(c1.stdout, "the provisioning's stdout is the guest's").to.equal("");
    expect(c1.stderr).to.equal(
      `base-image: disk.qcow2 is a fresh overlay on ${name}: this provisioning starts from the base\n`,
    );
    expect(fs.statSync(f("disk.qcow2")).ino, "the fresh overlay is kept").to.equal(overlayInode);
    expect(fs.existsSync(f("disk.qcow2.fresh"))).to.equal(false);
    await runOk("qemu-io", ["-f", "qcow2", "-c", "write -P 0x11 1M 64k", f("disk.qcow2")]);
    expect(await reads(f("disk.qcow2"), "0xab", "0"), "the base's data shows through").to.equal(true);
    expect(await reads(f("disk.qcow2"), "0x11", "1M")).to.equal(true);
    expect(sha256File(f(name)), "the base is untouched").to.equal(baseSha);

    // Run 2 without a new overlay (a retry): the claim replaces the used one; run 1's marker is gone.
    const c2 = await base("claim", key);
    expect(c2.code, c2.stderr).to.equal(0);
    expect(c2.stderr).to.include("an earlier provisioning used it): making a fresh one");
    expect(await backing(f("disk.qcow2"))).to.equal(name);
    expect(await reads(f("disk.qcow2"), "0x11", "1M"), "run 1's data is gone").to.equal(false);
    expect(await reads(f("disk.qcow2"), "0xab", "0")).to.equal(true);
    expect(fs.existsSync(f("disk.qcow2.fresh"))).to.equal(false);
  });

  it("keeps only the current base: a new key freezes a new one and removes the old base and its overlay", async () => {
    const k1 = '{"sourceSha256":"1"}';
    const k2 = '{"sourceSha256":"2"}';
    await install("0xab");
    expect((await base("freeze", k1)).code).to.equal(0);
    expect((await base("overlay", k1)).code).to.equal(0);
    const old = fs.readdirSync(vm).filter((n) => n.startsWith("base-"));
    expect(old).to.have.length(3);
    await install("0xcd");
    const r = await base("freeze", k2);
    expect(r.code, r.stderr).to.equal(0);
    const now = fs.readdirSync(vm).filter((n) => n.startsWith("base-"));
    expect(now).to.have.length(3);
    for (const n of old) {
      expect(now, n).to.not.include(n);
      expect(r.stderr).to.include(`removed ${n} (only the current base is kept)`);
    }
    expect(fs.existsSync(f("disk.qcow2")), "the overlay on the old base is removed").to.equal(false);
    const overlay = await base("overlay", k1);
    expect(overlay.code).to.equal(1);
    expect(overlay.stderr).to.match(/base-[0-9a-f]{64} is not complete in .*: no overlay/);
  });

  it("refuses while a QEMU of the VM runs, without an install disk, and on bad usage", async () => {
    const key = '{"sourceSha256":"1"}';
    const noDisk = await base("freeze", key);
    expect(noDisk.code).to.equal(1);
    expect(noDisk.stderr).to.include("install.qcow2 not found: nothing to freeze");
    await install("0xab");
    expect((await base("freeze", key)).code).to.equal(0);
    await runOk("qemu-img", ["create", "-q", "-f", "qcow2", f("held.qcow2"), "1M"]);
    const qemu = await holdDisk(f("held.qcow2"));
    try {
      fs.writeFileSync(f("qemu.pid"), `${qemu.pid}\n`);
      const r = await base("overlay", key);
      expect(r.code).to.equal(1);
      expect(r.stderr).to.include(`a QEMU of this VM runs (pid ${qemu.pid}`);
      expect(fs.existsSync(f("disk.qcow2"))).to.equal(false);
    } finally {
      await stopQemu(qemu);
    }
    for (const [args, msg] of [
      [["thaw", vm, key], "unknown command 'thaw'"],
      [["freeze", vm, "not json"], "BASE_KEY must be one line of JSON"],
      [["freeze", path.join(dir, "none"), key], "is not a folder"],
      [["freeze", vm], "expected 3 arguments, got 2"],
    ] as Array<[string[], string]>) {
      const r = await runScript("base-image.sh", args);
      expect(r.code, args.join(" ")).to.equal(2);
      expect(r.stderr).to.include(msg);
    }
  });
});
