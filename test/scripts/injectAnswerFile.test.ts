import { expect } from "chai";
import { spawn } from "child_process";
import * as fs from "fs";
import * as os from "os";
import * as path from "path";
import { holdDisk, sha256File, stopQemu } from "../support/disk";
import { RunResult, run, runOk, runScript, script } from "../support/run";

// inject-answer-file.sh against real disk images: a GPT (or MBR) disk built
// with sfdisk, file systems made with mkntfs/mkfs.vfat on loop devices at the
// partitions' offsets, converted to qcow2; the script mounts it for real
// (qemu-storage-daemon's FUSE export here, loop device, ntfs-3g), and the
// result is read back from the qcow2 with a read-only ntfs-3g mount.

const SECTOR = 512;
const BASIC_DATA = "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7";
const RECOVERY = "DE94BBA4-06D1-4D40-A16A-BFD50179D6AC";
const MSR = "E3C9E316-0B5C-4DB8-817D-F92DF00215AE";

interface Part {
  name: string;
  type: string; // GPT type GUID, sfdisk alias, or MBR type
  sizeMiB?: number; // the rest of the disk when unset
  fs?: "ntfs" | "vfat";
  populate?: (mnt: string) => void;
}

interface Disk {
  qcow2: string;
  /** start and size in bytes of each partition, in table order */
  parts: { start: number; size: number }[];
}

/** A partition holding a Windows folder with a stale cached answer file in each place Windows looks. */
const windowsPart = (populate?: (mnt: string) => void): Part => ({
  name: "Basic data partition",
  type: BASIC_DATA,
  fs: "ntfs",
  populate: (mnt) => {
    fs.mkdirSync(path.join(mnt, "Windows", "System32"), { recursive: true });
    fs.writeFileSync(path.join(mnt, "Windows", "System32", "ntoskrnl.exe"), "not really a kernel\n");
    fs.mkdirSync(path.join(mnt, "Windows", "Panther", "Unattend"), { recursive: true });
    fs.writeFileSync(path.join(mnt, "Windows", "Panther", "unattend.xml"), "<unattend>STALE-PANTHER</unattend>\n");
    fs.writeFileSync(path.join(mnt, "Windows", "Panther", "AutoUnattend.XML"), "<unattend>STALE-AUTO</unattend>\n");
    fs.writeFileSync(path.join(mnt, "Windows", "Panther", "setupact.log"), "Setup's own log, kept\n");
    fs.writeFileSync(
      path.join(mnt, "Windows", "Panther", "Unattend", "Unattend.xml"),
      "<unattend>STALE-SUB</unattend>\n",
    );
    populate?.(mnt);
  },
});

/** The layout of a Windows 10 image: recovery first, then EFI, MSR and the OS. */
const windowsLayout = (populate?: (mnt: string) => void): Part[] => [
  {
    name: "Recovery",
    type: RECOVERY,
    sizeMiB: 32,
    fs: "ntfs",
    populate: (mnt) => fs.mkdirSync(path.join(mnt, "Recovery", "WindowsRE"), { recursive: true }),
  },
  { name: "EFI system partition", type: "U", sizeMiB: 16, fs: "vfat" },
  { name: "Microsoft reserved partition", type: MSR, sizeMiB: 16 },
  windowsPart(populate),
];

/** Loop device for BYTES at OFFSET of FILE. */
async function loop(file: string, offset: number, size: number, readOnly = false): Promise<string> {
  const args = ["--find", "--show", ...(readOnly ? ["--read-only"] : [])];
  return (await runOk("losetup", [...args, "--offset", String(offset), "--sizelimit", String(size), file])).trim();
}

/** Mounts the NTFS at DEV on a fresh folder, runs FN, unmounts. */
async function withNtfs<T>(dev: string, dir: string, opts: string, fn: (mnt: string) => T | Promise<T>): Promise<T> {
  const mnt = fs.mkdtempSync(path.join(dir, "mnt-"));
  await runOk("ntfs-3g", ["-o", opts, dev, mnt]);
  try {
    return await fn(mnt);
  } finally {
    await runOk("umount", [mnt]);
    fs.rmdirSync(mnt);
  }
}

/** Sets the dirty flag (VOLUME_IS_DIRTY) of the NTFS volume at OFFSET of FILE, in $MFT and $MFTMirr. */
function markDirty(file: string, offset: number): void {
  const fd = fs.openSync(file, "r+");
  try {
    const boot = Buffer.alloc(SECTOR);
    fs.readSync(fd, boot, 0, SECTOR, offset);
    const cluster = boot.readUInt16LE(0x0b) * boot.readUInt8(0x0d);
    const c = boot.readInt8(0x40);
    const recordSize = c < 0 ? 2 ** -c : c * cluster;
    for (const lcn of [boot.readBigUInt64LE(0x30), boot.readBigUInt64LE(0x38)]) {
      const pos = offset + Number(lcn) * cluster + 3 * recordSize; // record 3 is $Volume
      const rec = Buffer.alloc(recordSize);
      fs.readSync(fd, rec, 0, recordSize, pos);
      expect(rec.toString("latin1", 0, 4)).to.equal("FILE");
      let a = rec.readUInt16LE(0x14);
      for (;;) {
        const type = rec.readUInt32LE(a);
        expect(type, "$VOLUME_INFORMATION in $Volume").not.to.equal(0xffffffff);
        if (type === 0x70) {
          const flags = a + rec.readUInt16LE(a + 0x14) + 10;
          rec.writeUInt16LE(rec.readUInt16LE(flags) | 1, flags);
          break;
        }
        a += rec.readUInt32LE(a + 4);
      }
      fs.writeSync(fd, rec, 0, recordSize, pos);
    }
  } finally {
    fs.closeSync(fd);
  }
}

/** Builds the disk: partition table, file systems, contents; then converts it to qcow2. */
async function makeDisk(
  dir: string,
  name: string,
  parts: Part[],
  opts: { label?: "gpt" | "dos"; patch?: (raw: string, disk: Disk) => void } = {},
): Promise<Disk> {
  const raw = path.join(dir, `${name}.raw`);
  fs.writeFileSync(raw, "");
  fs.truncateSync(raw, 160 * 1024 * 1024);
  const label = opts.label ?? "gpt";
  const lines = [`label: ${label}`];
  for (const p of parts) {
    const size = p.sizeMiB ? `size=${p.sizeMiB}MiB, ` : "";
    lines.push(label === "gpt" ? `${size}type=${p.type}, name="${p.name}"` : `${size}type=${p.type}`);
  }
  await runOk("sfdisk", ["-q", raw], { input: lines.join("\n") + "\n" });
  const table = JSON.parse(await runOk("sfdisk", ["-J", raw])).partitiontable;
  const disk: Disk = {
    qcow2: path.join(dir, `${name}.qcow2`),
    parts: table.partitions.map((p: { start: number; size: number }) => ({
      start: p.start * SECTOR,
      size: p.size * SECTOR,
    })),
  };
  for (const [i, p] of parts.entries()) {
    if (!p.fs) continue;
    const dev = await loop(raw, disk.parts[i].start, disk.parts[i].size);
    try {
      if (p.fs === "vfat") await runOk("mkfs.vfat", ["-n", "SYSTEM", dev]);
      else await runOk("mkntfs", ["-q", "-F", "-f", "-L", p.name.slice(0, 16), dev]);
      if (p.fs === "ntfs" && p.populate) await withNtfs(dev, dir, "rw", p.populate);
    } finally {
      await runOk("losetup", ["-d", dev]);
    }
  }
  opts.patch?.(raw, disk);
  await runOk("qemu-img", ["convert", "-f", "raw", "-O", "qcow2", raw, disk.qcow2]);
  fs.rmSync(raw);
  return disk;
}

interface Panther {
  /** entries of Windows/Panther and Windows/Panther/Unattend, sorted */
  panther: string[];
  unattendDir: string[];
  /** Windows/Panther/unattend.xml, undefined when absent */
  answer?: Buffer;
  system32: string[];
}

/** Reads Windows/Panther back from partition PART of the qcow2 (read-only). */
async function readBack(dir: string, disk: Disk, part: number): Promise<Panther> {
  const raw = path.join(dir, "readback.raw");
  await runOk("qemu-img", ["convert", "-U", "-f", "qcow2", "-O", "raw", disk.qcow2, raw]);
  const dev = await loop(raw, disk.parts[part].start, disk.parts[part].size, true);
  try {
    return await withNtfs(dev, dir, "ro", (mnt) => {
      const p = path.join(mnt, "Windows", "Panther");
      const answer = path.join(p, "unattend.xml");
      return {
        panther: fs.readdirSync(p).sort(),
        unattendDir: fs.readdirSync(path.join(p, "Unattend")).sort(),
        answer: fs.existsSync(answer) ? fs.readFileSync(answer) : undefined,
        system32: fs.readdirSync(path.join(mnt, "Windows", "System32")),
      };
    });
  } finally {
    await runOk("losetup", ["-d", dev]);
    fs.rmSync(raw);
  }
}

/** Loop devices, mounts and daemons that still refer to anything under DIR. */
function leftovers(dir: string): string[] {
  const out: string[] = [];
  for (const b of fs.readdirSync("/sys/block").filter((n) => n.startsWith("loop"))) {
    try {
      const f = fs.readFileSync(`/sys/block/${b}/loop/backing_file`, "utf8").trim();
      if (f.startsWith(dir)) out.push(`/dev/${b} on ${f}`);
    } catch {
      /* not attached */
    }
  }
  for (const line of fs.readFileSync("/proc/self/mountinfo", "utf8").split("\n")) {
    const mp = line.split(" ")[4];
    if (mp && mp.startsWith(dir)) out.push(`mount ${mp}`);
  }
  for (const pid of fs.readdirSync("/proc").filter((n) => /^\d+$/.test(n))) {
    try {
      const cmd = fs.readFileSync(`/proc/${pid}/cmdline`, "utf8").split("\0").join(" ");
      if (/qemu-storage-daemon|ntfs-3g|qemu-nbd/.test(cmd) && cmd.includes(dir)) out.push(`pid ${pid}: ${cmd}`);
    } catch {
      /* gone */
    }
  }
  return out;
}

/** Pids of PID's descendants (children first found through /proc/<pid>/stat). */
function descendants(pid: number): number[] {
  const parents = new Map<number, number>();
  for (const p of fs.readdirSync("/proc").filter((n) => /^\d+$/.test(n))) {
    try {
      const stat = fs.readFileSync(`/proc/${p}/stat`, "utf8");
      parents.set(Number(p), Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[1]));
    } catch {
      /* gone */
    }
  }
  const out: number[] = [];
  const walk = (p: number) => {
    for (const [child, parent] of parents) {
      if (parent === p) {
        out.push(child);
        walk(child);
      }
    }
  };
  walk(pid);
  return out;
}

describe("inject-answer-file.sh (qcow2, FUSE export, loop device, ntfs-3g)", function () {
  this.timeout(180000);
  let work: string;
  let tmp: string;
  let env: NodeJS.ProcessEnv;

  // Byte-exact: CRLF line ends, UTF-8 beyond ASCII, no final newline.
  const answer = Buffer.from(
    '<?xml version="1.0" encoding="utf-8"?>\r\n<unattend xmlns="urn:schemas-microsoft-com:unattend">\r\n' +
      "  <!-- PLAINTEXT-MARKER-7f3a Zoë 日本 -->\r\n</unattend>",
    "utf8",
  );

  beforeEach(() => {
    work = fs.mkdtempSync(path.join(os.tmpdir(), "inject-"));
    tmp = path.join(work, "tmp");
    fs.mkdirSync(tmp);
    env = { TMPDIR: tmp };
  });
  afterEach(() => {
    const left = leftovers(work);
    fs.rmSync(work, { recursive: true, force: true });
    expect(left, "left behind").to.deep.equal([]);
  });

  /** Nothing mounted, attached or running, and the script's temp dir is empty again. */
  function expectNothingLeft(): void {
    expect(leftovers(work)).to.deep.equal([]);
    expect(fs.readdirSync(tmp), `${tmp} after the run`).to.deep.equal([]);
  }

  it("writes the answer file from a path, byte for byte, and removes every cached copy", async function () {
    const disk = await makeDisk(work, "win", windowsLayout());
    const file = path.join(work, "answer.xml");
    fs.writeFileSync(file, answer);
    const r = await runScript("inject-answer-file.sh", [disk.qcow2, file], { env });
    expect(r.code, r.stderr).to.equal(0);
    expect(r.stdout).to.equal(
      `inject-answer-file: wrote Windows/Panther/unattend.xml (${answer.length} bytes) on partition 4 of ${disk.qcow2}; removed 3 cached answer file(s)\n`,
    );
    expect(r.stderr).to.include("using the FUSE route");
    expect(r.stderr).to.match(/partition 4 \(\d+ MiB at sector \d+\): NTFS with Windows\/System32/);
    expect(r.stderr).to.include("removed the cached answer file Windows/Panther/AutoUnattend.XML");
    expect(r.stderr).to.include("removed the cached answer file Windows/Panther/Unattend/Unattend.xml");
    expect(r.stderr).to.include("replacing the cached answer file Windows/Panther/unattend.xml");
    expect(r.stderr + r.stdout).not.to.include("PLAINTEXT-MARKER");
    expectNothingLeft();

    const back = await readBack(work, disk, 3);
    expect(back.answer?.equals(answer), "unattend.xml byte for byte").to.equal(true);
    expect(back.panther).to.deep.equal(["Unattend", "setupact.log", "unattend.xml"]);
    expect(back.unattendDir).to.deep.equal([]);
    expect(back.system32).to.deep.equal(["ntoskrnl.exe"]);
    expect((await run("qemu-img", ["check", disk.qcow2])).code).to.equal(0);
  });

  it("reads the answer file from stdin (-), and a rerun keeps the same end state", async function () {
    const disk = await makeDisk(work, "win", windowsLayout());
    const r = await runScript("inject-answer-file.sh", [disk.qcow2, "-"], { env, input: answer.toString("utf8") });
    expect(r.code, r.stderr).to.equal(0);
    expect(r.stdout).to.match(/^inject-answer-file: wrote Windows\/Panther\/unattend.xml .*removed 3 cached/);
    expectNothingLeft();
    expect((await readBack(work, disk, 3)).answer?.equals(answer)).to.equal(true);

    const again = await runScript("inject-answer-file.sh", [disk.qcow2, "-"], { env, input: answer.toString("utf8") });
    expect(again.code, again.stderr).to.equal(0);
    expect(again.stdout).to.match(/kept \(unchanged\) Windows\/Panther\/unattend.xml .*removed 0 cached/);
    expectNothingLeft();
    const back = await readBack(work, disk, 3);
    expect(back.answer?.equals(answer)).to.equal(true);
    expect(back.panther).to.deep.equal(["Unattend", "setupact.log", "unattend.xml"]);

    // A different answer file replaces it.
    const other = Buffer.from("<unattend>second</unattend>\n");
    const third = await runScript("inject-answer-file.sh", [disk.qcow2, "-"], { env, input: other.toString() });
    expect(third.code, third.stderr).to.equal(0);
    expect(third.stdout).to.match(/wrote .*removed 1 cached/);
    expect((await readBack(work, disk, 3)).answer?.equals(other)).to.equal(true);
  });

  it("matches names case-insensitively: a WINDOWS/panther layout and an MBR disk", async function () {
    const disk = await makeDisk(
      work,
      "mbr",
      [
        { name: "System", type: "c", sizeMiB: 16, fs: "vfat" },
        {
          name: "Windows",
          type: "7",
          fs: "ntfs",
          populate: (mnt) => {
            fs.mkdirSync(path.join(mnt, "WINDOWS", "system32"), { recursive: true });
            fs.mkdirSync(path.join(mnt, "WINDOWS", "panther", "unattend"), { recursive: true });
            fs.writeFileSync(path.join(mnt, "WINDOWS", "panther", "UNATTEND.XML"), "<unattend>STALE</unattend>\n");
            fs.writeFileSync(path.join(mnt, "WINDOWS", "panther", "unattend", "autounattend.xml"), "<unattend/>\n");
          },
        },
      ],
      { label: "dos" },
    );
    const r = await runScript("inject-answer-file.sh", [disk.qcow2, "-"], { env, input: answer.toString("utf8") });
    expect(r.code, r.stderr).to.equal(0);
    expect(r.stdout).to.include("wrote WINDOWS/panther/unattend.xml").and.include("on partition 2");
    expect(r.stderr).to.include("NTFS with WINDOWS/system32");
    expectNothingLeft();
    const raw = path.join(work, "mbr-back.raw");
    await runOk("qemu-img", ["convert", "-f", "qcow2", "-O", "raw", disk.qcow2, raw]);
    const dev = await loop(raw, disk.parts[1].start, disk.parts[1].size, true);
    try {
      await withNtfs(dev, work, "ro", (mnt) => {
        expect(fs.readdirSync(path.join(mnt, "WINDOWS", "panther")).sort()).to.deep.equal(["unattend", "unattend.xml"]);
        expect(fs.readdirSync(path.join(mnt, "WINDOWS", "panther", "unattend"))).to.deep.equal([]);
        expect(fs.readFileSync(path.join(mnt, "WINDOWS", "panther", "unattend.xml")).equals(answer)).to.equal(true);
      });
    } finally {
      await runOk("losetup", ["-d", dev]);
    }
  });

  it("refuses a disk a running QEMU holds, naming the process; the image is unchanged", async function () {
    const disk = await makeDisk(work, "win", windowsLayout());
    const before = sha256File(disk.qcow2);
    const qemu = await holdDisk(disk.qcow2);
    try {
      const r = await runScript("inject-answer-file.sh", [disk.qcow2, "-"], { env, input: answer.toString("utf8") });
      expect(r.code, r.stderr).to.equal(3);
      expect(r.stderr).to.match(/is in use by qemu-system-\S* \(pid \d+\): shut the VM down first/, r.stderr);
    } finally {
      await stopQemu(qemu);
    }
    expectNothingLeft();
    expect(sha256File(disk.qcow2)).to.equal(before);
  });

  it("fails naming the cause when no NTFS partition holds Windows/System32, or there is no partition table", async function () {
    const layout = windowsLayout().slice(0, 3); // recovery, EFI and MSR only
    const disk = await makeDisk(work, "nowin", layout);
    const r = await runScript("inject-answer-file.sh", [disk.qcow2, "-"], { env, input: answer.toString("utf8") });
    expect(r.code, r.stderr).to.equal(4);
    expect(r.stderr).to.include(
      "no NTFS partition on " +
        disk.qcow2 +
        " holds Windows/System32 (1: NTFS without Windows/System32 2: not NTFS 3: not NTFS): is this a Windows image?",
    );
    expectNothingLeft();

    const blank = path.join(work, "blank.qcow2");
    await runOk("qemu-img", ["create", "-q", "-f", "qcow2", blank, "64M"]);
    const b = await runScript("inject-answer-file.sh", [blank, "-"], { env, input: answer.toString("utf8") });
    expect(b.code, b.stderr).to.equal(4);
    expect(b.stderr).to.include(`no partition table on ${blank}`);
    expectNothingLeft();
  });

  it("refuses a hibernated (fast startup) volume and a dirty one, writing nothing", async function () {
    const hib = await makeDisk(
      work,
      "hib",
      windowsLayout((mnt) =>
        fs.writeFileSync(path.join(mnt, "hiberfil.sys"), Buffer.concat([Buffer.from("hibr"), Buffer.alloc(8188)])),
      ),
    );
    const before = sha256File(hib.qcow2);
    const r = await runScript("inject-answer-file.sh", [hib.qcow2, "-"], { env, input: answer.toString("utf8") });
    expect(r.code, r.stderr).to.equal(5);
    expect(r.stderr).to.include("the Windows volume (partition 4) is hibernated (fast startup)");
    expect(sha256File(hib.qcow2)).to.equal(before);
    expectNothingLeft();

    const dirty = await makeDisk(work, "dirty", windowsLayout(), {
      patch: (raw, d) => markDirty(raw, d.parts[3].start),
    });
    const d = await runScript("inject-answer-file.sh", [dirty.qcow2, "-"], { env, input: answer.toString("utf8") });
    expect(d.code, d.stderr).to.equal(5);
    expect(d.stderr).to.match(
      /the Windows volume \(partition 4\) is marked dirty \(0x0001 DIRTY: check disk is scheduled\)/,
    );
    expectNothingLeft();
    const back = await readBack(work, dirty, 3);
    expect(back.answer?.toString()).to.include("STALE-PANTHER");
    expect(back.panther).to.include("AutoUnattend.XML");
  });

  it("rejects input that is not an answer file, leaving the cached copies as they were", async function () {
    const disk = await makeDisk(work, "win", windowsLayout());
    const r = await runScript("inject-answer-file.sh", [disk.qcow2, "-"], { env, input: "just some text\n" });
    expect(r.code, r.stderr).to.equal(2);
    expect(r.stderr).to.include("the answer file has no <unattend> element (UTF-8 XML expected): nothing changed");
    const e = await runScript("inject-answer-file.sh", [disk.qcow2, "-"], { env, input: "" });
    expect(e.code, e.stderr).to.equal(2);
    expect(e.stderr).to.include("the answer file is 0 bytes");
    expectNothingLeft();
    const back = await readBack(work, disk, 3);
    expect(back.panther).to.deep.equal(["AutoUnattend.XML", "Unattend", "setupact.log", "unattend.xml"]);
    expect(back.answer?.toString()).to.include("STALE-PANTHER");

    // Usage errors come before anything is touched.
    const u = await runScript("inject-answer-file.sh", [disk.qcow2, path.join(work, "missing.xml")], { env });
    expect(u.code).to.equal(2);
    expect(u.stderr).to.include("is not a readable file");
    const big = path.join(work, "big.xml");
    fs.writeFileSync(big, Buffer.alloc(4 * 1024 * 1024 + 1, 0x20));
    const bg = await runScript("inject-answer-file.sh", [disk.qcow2, big], { env });
    expect(bg.code).to.equal(2);
    expect(bg.stderr).to.include("an answer file is 1 byte to 4 MiB");
    const nd = await runScript("inject-answer-file.sh", [path.join(work, "none.qcow2"), big], { env });
    expect(nd.code).to.equal(2);
    expect(nd.stderr).to.include("is not a file");
    const rt = await runScript("inject-answer-file.sh", [disk.qcow2, "-"], { env: { ...env, INJECT_ROUTE: "tcp" } });
    expect(rt.code).to.equal(2);
    expect(rt.stderr).to.include("INJECT_ROUTE='tcp' is not auto, nbd or fuse");
    expectNothingLeft();
  });

  it("INJECT_ROUTE=nbd fails naming the missing nbd device where there is none", async function () {
    const disk = await makeDisk(work, "win", windowsLayout());
    const r = await runScript("inject-answer-file.sh", [disk.qcow2, "-"], {
      env: { ...env, INJECT_ROUTE: "nbd" },
      input: answer.toString("utf8"),
    });
    if (fs.existsSync("/dev/nbd0")) {
      // A machine with the nbd module: the nbd route must work like the FUSE one.
      expect(r.code, r.stderr).to.equal(0);
      expect(r.stderr).to.include("(qemu-nbd)");
      expect((await readBack(work, disk, 3)).answer?.equals(answer)).to.equal(true);
    } else {
      expect(r.code, r.stderr).to.equal(1);
      expect(r.stderr).to.include("INJECT_ROUTE=nbd, but there is no /dev/nbd0 and 'modprobe nbd' did not make one");
    }
    expectNothingLeft();
  });

  /** Starts the script with stdin held open; resolves once it has mounted the volume. */
  async function startHeld(disk: Disk) {
    const child = spawn("bash", [script("inject-answer-file.sh"), disk.qcow2, "-"], {
      env: { ...process.env, ...env },
      stdio: ["pipe", "pipe", "pipe"],
    });
    let stderr = "";
    let stdout = "";
    child.stderr.on("data", (d: Buffer) => (stderr += d.toString()));
    child.stdout.on("data", (d: Buffer) => (stdout += d.toString()));
    const closed = new Promise<RunResult>((resolve) =>
      child.on("close", (code, signal) => resolve({ code, signal, stdout, stderr })),
    );
    const end = Date.now() + 60000;
    while (!stderr.includes("read-write")) {
      if (child.exitCode !== null || Date.now() > end) throw new Error(`script did not mount: ${stderr}`);
      await new Promise((r) => setTimeout(r, 100));
    }
    return { child, closed };
  }

  it("SIGTERM while it waits for stdin: cleans up, and the image keeps its cached copies", async function () {
    const disk = await makeDisk(work, "win", windowsLayout());
    const { child, closed } = await startHeld(disk);
    expect(leftovers(work).length, "mounted while it runs").to.be.above(0);
    child.kill("SIGTERM");
    child.stdin.end(answer); // bash runs the trap once the read in progress returns
    const r = await closed;
    expect(r.code, r.stderr).to.equal(143);
    expect(r.stderr).to.include("terminated (SIGTERM)");
    expectNothingLeft();
    const back = await readBack(work, disk, 3);
    expect(back.panther).to.deep.equal(["AutoUnattend.XML", "Unattend", "setupact.log", "unattend.xml"]);
    expect(back.answer?.toString()).to.include("STALE-PANTHER");
  });

  it("after a SIGKILL mid-run, the next run releases what was left and succeeds", async function () {
    const disk = await makeDisk(work, "win", windowsLayout());
    const { child, closed } = await startHeld(disk);
    const pids = [child.pid!, ...descendants(child.pid!)];
    for (const pid of pids) {
      try {
        process.kill(pid, "SIGKILL");
      } catch (e) {
        // A short-lived helper (a subshell, a sleep) may have ended since the listing.
        if ((e as NodeJS.ErrnoException).code !== "ESRCH") throw e;
      }
    }
    child.stdin.destroy();
    await closed;
    const left = leftovers(work);
    expect(
      left.some((l) => l.startsWith("mount ")),
      left.join("\n"),
    ).to.equal(true);
    expect(
      left.some((l) => /qemu-storage-daemon/.test(l)),
      left.join("\n"),
    ).to.equal(true);

    const file = path.join(work, "answer.xml");
    fs.writeFileSync(file, answer);
    const r = await runScript("inject-answer-file.sh", [disk.qcow2, file], { env });
    expect(r.code, r.stderr).to.equal(0);
    expect(r.stderr).to.match(/a previous run on this disk left \S+ behind: releasing what it recorded/);
    expectNothingLeft();
    const back = await readBack(work, disk, 3);
    expect(back.answer?.equals(answer)).to.equal(true);
    expect(back.panther).to.deep.equal(["Unattend", "setupact.log", "unattend.xml"]);
  });
});
