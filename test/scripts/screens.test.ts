import { expect } from "chai";
import * as fs from "fs";
import * as net from "net";
import * as os from "os";
import * as path from "path";
import * as zlib from "zlib";
import { freePort, readPid, run, runOk, runScript } from "../support/run";

// Screenshots of a real VM: qemu-system-aarch64 under TCG, started by
// start-vm.sh on a blank disk, so the screen is the UEFI firmware's (ramfb).
// The PNGs are decoded here (zlib inflate and PNG row filters) to check them.

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

async function waitFor(what: string, cond: () => boolean, timeoutMs: number): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(200);
  }
}

function alive(pid: number | undefined): boolean {
  if (pid === undefined) return false;
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, "utf8");
    const state = stat.slice(stat.lastIndexOf(")") + 2).split(" ")[0];
    return state !== "Z" && state !== "X";
  } catch {
    return false;
  }
}

interface Png {
  width: number;
  height: number;
  colours: number;
}

/** Decodes an 8-bit, non-interlaced PNG fully (chunk CRCs, inflate, row filters); counts its distinct colours. */
function decodePng(buf: Buffer): Png {
  expect(buf.subarray(0, 8).toString("hex"), "PNG signature").to.equal("89504e470d0a1a0a");
  let off = 8;
  let ihdr: Buffer | undefined;
  const idat: Buffer[] = [];
  let ended = false;
  while (off < buf.length && !ended) {
    const len = buf.readUInt32BE(off);
    const type = buf.toString("latin1", off + 4, off + 8);
    const data = buf.subarray(off + 8, off + 8 + len);
    expect(buf.readUInt32BE(off + 8 + len), `CRC of ${type}`).to.equal(
      zlib.crc32(buf.subarray(off + 4, off + 8 + len)),
    );
    if (off === 8) expect(type, "first chunk").to.equal("IHDR");
    if (type === "IHDR") ihdr = data;
    if (type === "IDAT") idat.push(data);
    if (type === "IEND") ended = true;
    off += 12 + len;
  }
  expect(ended, "IEND").to.equal(true);
  const width = ihdr!.readUInt32BE(0);
  const height = ihdr!.readUInt32BE(4);
  const [depth, colourType, , , interlace] = ihdr!.subarray(8);
  expect(depth, "bit depth").to.equal(8);
  expect(interlace, "interlace").to.equal(0);
  const bpp = ({ 0: 1, 2: 3, 4: 2, 6: 4 } as Record<number, number>)[colourType];
  expect(bpp, `colour type ${colourType}`).to.not.equal(undefined);
  const raw = zlib.inflateSync(Buffer.concat(idat));
  const stride = width * bpp;
  expect(raw.length, "inflated size").to.equal(height * (stride + 1));
  const pixels = Buffer.alloc(height * stride);
  for (let y = 0; y < height; y++) {
    const filter = raw[y * (stride + 1)];
    const src = raw.subarray(y * (stride + 1) + 1, (y + 1) * (stride + 1));
    const row = pixels.subarray(y * stride, (y + 1) * stride);
    const prev = y > 0 ? pixels.subarray((y - 1) * stride, y * stride) : Buffer.alloc(stride);
    for (let i = 0; i < stride; i++) {
      const a = i >= bpp ? row[i - bpp] : 0;
      const b = prev[i];
      const c = i >= bpp ? prev[i - bpp] : 0;
      let p: number;
      if (filter === 0) p = 0;
      else if (filter === 1) p = a;
      else if (filter === 2) p = b;
      else if (filter === 3) p = (a + b) >> 1;
      else if (filter === 4) {
        const pa = Math.abs(b - c);
        const pb = Math.abs(a - c);
        const pc = Math.abs(a + b - 2 * c);
        p = pa <= pb && pa <= pc ? a : pb <= pc ? b : c;
      } else throw new Error(`row ${y}: filter type ${filter}`);
      row[i] = (src[i] + p) & 0xff;
    }
  }
  const colours = new Set<string>();
  for (let i = 0; i < pixels.length; i += bpp) colours.add(pixels.subarray(i, i + bpp).toString("hex"));
  return { width, height, colours: colours.size };
}

/** A stand-in QMP server on a UNIX socket: greets, accepts capabilities, answers screendump as told. */
function fakeQmp(sock: string, mode: "silent" | "error" | "junk"): Promise<net.Server> {
  const srv = net.createServer((c) => {
    c.on("error", () => undefined);
    if (mode === "silent") {
      c.resume(); // reads (and so sees the client close), never speaks
      return;
    }
    c.write('{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}}, "capabilities": []}}\r\n');
    let buf = "";
    c.on("data", (d) => {
      buf += d.toString();
      let nl: number;
      while ((nl = buf.indexOf("\n")) >= 0) {
        const msg = JSON.parse(buf.slice(0, nl));
        buf = buf.slice(nl + 1);
        if (msg.execute === "screendump" && mode === "error") {
          c.write('{"error": {"class": "GenericError", "desc": "There is no QemuConsole I can screendump from."}}\r\n');
        } else {
          if (msg.execute === "screendump") fs.writeFileSync(msg.arguments.filename, "P6\n800 600\n255\n");
          c.write('{"return": {}}\r\n');
        }
      }
    });
  });
  return new Promise((resolve) => srv.listen(sock, () => resolve(srv)));
}

describe("screens: vm-screenshot.sh, screen-keeper.sh and wait-for-guest's screenshot (TCG)", function () {
  this.timeout(180000);

  let work: string;
  let vmDir: string;
  let qmp: string;
  let sshPort: number;
  const keeperDirs: string[] = [];

  before(async function () {
    work = fs.mkdtempSync(path.join(os.tmpdir(), "screens-"));
    vmDir = path.join(work, "vm");
    fs.mkdirSync(vmDir);
    await runOk("bash", [path.join(__dirname, "..", "..", "provisioning", "build-efi.sh"), vmDir]);
    await runOk("qemu-img", ["create", "-q", "-f", "qcow2", path.join(vmDir, "disk.qcow2"), "1G"]);
    sshPort = await freePort();
    let buildletPort = await freePort();
    while (buildletPort === sshPort) buildletPort = await freePort();
    const envFile = path.join(vmDir, "vm.env");
    fs.writeFileSync(
      envFile,
      [
        `VM_DIR=${vmDir}`,
        "VM_ACCEL=tcg",
        "VM_CPUS=1",
        "VM_MEMORY_GIB=1",
        "VM_IMDS_PROXY=0",
        `VM_DISK=${path.join(vmDir, "disk.qcow2")}`,
        `VM_SSH_PORT=${sshPort}`,
        `VM_BUILDLET_PORT=${buildletPort}`,
      ].join("\n") + "\n",
    );
    qmp = path.join(vmDir, "qmp.sock");
    const s = await runScript("start-vm.sh", [envFile], { env: { START_VM_SYSTEMD: "0" }, timeoutMs: 60000 });
    expect(s.code, s.stderr).to.equal(0);
    // The firmware has drawn its screen once the boot manager runs.
    await waitFor(
      "the boot manager in the serial log",
      () => {
        try {
          return /BdsDxe/.test(fs.readFileSync(path.join(vmDir, "serial.log"), "utf8"));
        } catch {
          return false;
        }
      },
      90000,
    );
  });

  after(async function () {
    for (const d of keeperDirs) await runScript("screen-keeper.sh", ["stop", qmp, d]);
    await runScript("stop-vm.sh", [qmp, "0"], { timeoutMs: 60000 });
    const pid = readPid(path.join(vmDir, "qemu.pid"));
    if (alive(pid)) process.kill(pid!, "SIGKILL");
    fs.rmSync(work, { recursive: true, force: true });
  });

  describe("vm-screenshot.sh", function () {
    it("saves a PNG of the firmware screen: signature, IHDR 800x600, decodable, more than one colour", async function () {
      const out = path.join(work, "shots", "firmware.png");
      const r = await runScript("vm-screenshot.sh", [qmp, out], {
        env: { SCREENSHOT_FETCH_HINT: "scp ubuntu@1.2.3.4:<path> ." },
      });
      expect(r.code, r.stderr).to.equal(0);
      expect(r.stdout).to.equal(`screenshot: ${out}\nfetch it: scp ubuntu@1.2.3.4:${out} .\n`);
      expect(r.stderr).to.include("800x600 PNG of the VM's screen");
      const png = decodePng(fs.readFileSync(out));
      expect([png.width, png.height]).to.deep.equal([800, 600]);
      expect(png.colours, "distinct colours").to.be.above(1);
      expect(fs.statSync(out).mode & 0o777).to.equal(0o644);
      expect(fs.readdirSync(path.dirname(out))).to.deep.equal(["firmware.png"]); // no temporary left
    });

    it("fails naming the cause: no socket, QEMU not answering, screendump refused, not a PNG; the old file stays", async function () {
      const out = path.join(work, "keep", "screen.png");
      fs.mkdirSync(path.dirname(out));
      fs.writeFileSync(out, "previous screenshot");

      const none = await runScript("vm-screenshot.sh", [path.join(work, "nope.sock"), out]);
      expect(none.code).to.equal(3);
      expect(none.stderr).to.include(`no QMP socket at ${path.join(work, "nope.sock")}: is the VM running?`);

      const cases: ["silent" | "error" | "junk", number, RegExp][] = [
        [
          "silent",
          3,
          /QEMU is not answering on the QMP socket \S+ \(no greeting in 3 tries\): is the VM running, or hung\?/,
        ],
        ["error", 1, /QEMU refused the screendump: There is no QemuConsole I can screendump from\./],
        ["junk", 1, /QEMU's screendump at \S+ is not a PNG \(\d+ bytes\)/],
      ];
      for (const [mode, code, message] of cases) {
        const sock = path.join(work, `${mode}.sock`);
        const srv = await fakeQmp(sock, mode);
        try {
          const r = await runScript("vm-screenshot.sh", [sock, out], { timeoutMs: 60000 });
          expect(r.code, `${mode}: ${r.stderr}`).to.equal(code);
          expect(r.stderr, mode).to.match(message);
          expect(r.stdout, mode).to.equal("");
        } finally {
          await new Promise((res) => srv.close(res));
        }
      }
      expect(fs.readFileSync(out, "utf8")).to.equal("previous screenshot");
      expect(fs.readdirSync(path.dirname(out))).to.deep.equal(["screen.png"]);

      const bad = await runScript("vm-screenshot.sh", [qmp, path.join(work, 'a"b.png')]);
      expect(bad.code).to.equal(2);
      expect(bad.stderr).to.include("holds a quote, backslash or control character");
      const few = await runScript("vm-screenshot.sh", [qmp]);
      expect(few.code).to.equal(2);
    });
  });

  describe("screen-keeper.sh", function () {
    const screens = (dir: string) =>
      fs
        .readdirSync(dir)
        .filter((f) => /^screen-\d{8}T\d{6}Z\.png$/.test(f))
        .sort();

    it("keeps a screenshot per interval, never more than N, is idempotent, and stops cleanly", async function () {
      const dir = path.join(work, "keeper");
      keeperDirs.push(dir);
      const env = { SCREEN_KEEPER_INTERVAL_S: "1", SCREEN_KEEPER_KEEP: "3" };
      const r = await runScript("screen-keeper.sh", ["start", qmp, dir], { env });
      expect(r.code, r.stderr).to.equal(0);
      const pid = Number(/screen keeper started \(pid (\d+)\)/.exec(r.stdout)?.[1]);
      expect(readPid(path.join(dir, "screen-keeper.pid"))).to.equal(pid);
      expect(alive(pid)).to.equal(true);

      const again = await runScript("screen-keeper.sh", ["start", qmp, dir], { env });
      expect(again.code, again.stderr).to.equal(0);
      expect(again.stdout).to.include(`screen keeper already running (pid ${pid})`);

      // Watch the folder: names come and go, never more than 3 at once.
      const seen = new Set<string>();
      let most = 0;
      await waitFor(
        "6 different screenshots",
        () => {
          const now = screens(dir);
          now.forEach((f) => seen.add(f));
          most = Math.max(most, now.length);
          return seen.size >= 6;
        },
        120000,
      );
      expect(most, "screenshots at once").to.be.at.most(3);

      const stop = await runScript("screen-keeper.sh", ["stop", qmp, dir]);
      expect(stop.code, stop.stderr).to.equal(0);
      expect(stop.stdout).to.match(new RegExp(`screen keeper stopped \\(pid ${pid}\\); [1-3] screenshot\\(s\\) in `));
      expect(alive(pid)).to.equal(false);
      expect(fs.existsSync(path.join(dir, "screen-keeper.pid"))).to.equal(false);
      const left = screens(dir);
      expect(left.length).to.be.within(1, 3);
      for (const f of left) expect(decodePng(fs.readFileSync(path.join(dir, f))).width).to.equal(800);
      expect(fs.readdirSync(dir).filter((f) => f.includes(".tmp-"))).to.deep.equal([]);
      await sleep(2500);
      expect(screens(dir), "nothing new after stop").to.deep.equal(left);
      const log = fs.readFileSync(path.join(dir, "screen-keeper.log"), "utf8");
      expect(log).to.include("started: every 1s, the newest 3 kept").and.include("stopped;");

      const twice = await runScript("screen-keeper.sh", ["stop", qmp, dir]);
      expect(twice.code).to.equal(0);
      expect(twice.stdout).to.include("no screen keeper running for");
    });

    it("ends by itself after its lifetime, and when QEMU stops answering", async function () {
      const dir = path.join(work, "lifetime");
      keeperDirs.push(dir);
      const r = await runScript("screen-keeper.sh", ["start", qmp, dir], {
        env: { SCREEN_KEEPER_INTERVAL_S: "1", SCREEN_KEEPER_MAX_S: "2" },
      });
      expect(r.code, r.stderr).to.equal(0);
      const pid = readPid(path.join(dir, "screen-keeper.pid"));
      await waitFor("the keeper to end", () => !alive(pid), 60000);
      expect(fs.existsSync(path.join(dir, "screen-keeper.pid"))).to.equal(false);
      expect(fs.readFileSync(path.join(dir, "screen-keeper.log"), "utf8")).to.include("lifetime of 2s reached: ending");
      expect(screens(dir).length).to.be.at.least(1);

      const gone = path.join(work, "gone");
      keeperDirs.push(gone);
      const g = await runScript("screen-keeper.sh", ["start", path.join(work, "no-vm.sock"), gone], {
        env: { SCREEN_KEEPER_INTERVAL_S: "1", SCREEN_KEEPER_GIVE_UP: "2" },
      });
      expect(g.code, g.stderr).to.equal(0);
      expect(g.stderr).to.include("warning: no QMP socket at");
      const gpid = readPid(path.join(gone, "screen-keeper.pid"));
      await waitFor("the keeper to give up", () => !alive(gpid), 60000);
      const glog = fs.readFileSync(path.join(gone, "screen-keeper.log"), "utf8");
      expect(glog).to.include("no screenshot (exit 3): vm-screenshot: error: no QMP socket at");
      expect(glog).to.include("QEMU did not answer 2 times in a row (the VM is gone?): ending");
    });

    it("shot takes one now, names it and how to fetch it, and keeps failure shots apart from the rolling ones", async function () {
      const dir = path.join(work, "shot");
      const r = await runScript("screen-keeper.sh", ["shot", qmp, dir, "provisionGuest"], {
        env: { SCREENSHOT_FETCH_HINT: "scp ubuntu@1.2.3.4:<path> ." },
      });
      expect(r.code, r.stderr).to.equal(0);
      const m =
        /^screenshot: (\S+\/failure-\d{8}T\d{6}Z-provisionGuest\.png)\nfetch it: scp ubuntu@1\.2\.3\.4:(\S+) \.\n$/.exec(
          r.stdout,
        );
      expect(m, r.stdout).to.not.equal(null);
      expect(m![2]).to.equal(m![1]);
      expect(decodePng(fs.readFileSync(m![1])).colours).to.be.above(1);
      const bad = await runScript("screen-keeper.sh", ["shot", qmp, dir, "two words"]);
      expect(bad.code).to.equal(2);
      const none = await runScript("screen-keeper.sh", ["shot", path.join(work, "no-vm.sock"), dir]);
      expect(none.code, "vm-screenshot's code").to.equal(3);
      const unknown = await runScript("screen-keeper.sh", ["begin", qmp, dir]);
      expect(unknown.code).to.equal(2);
      expect(unknown.stderr).to.include("unknown command 'begin'");
    });
  });

  describe("wait-for-guest.sh with the QMP socket", function () {
    it("on a timeout, saves a screenshot, names its path and the command to fetch it", async function () {
      const dir = path.join(work, "wait-screens");
      const r = await runScript("wait-for-guest.sh", ["127.0.0.1", String(sshPort), "3"], {
        env: {
          SERIAL_LOG: path.join(vmDir, "serial.log"),
          VM_PID_FILE: path.join(vmDir, "qemu.pid"),
          WAIT_GUEST_QMP_SOCKET: qmp,
          WAIT_GUEST_SCREEN_DIR: dir,
          WAIT_GUEST_FETCH_HINT: "scp ubuntu@1.2.3.4:<path> .",
        },
        timeoutMs: 60000,
      });
      expect(r.code, r.stderr).to.equal(1);
      expect(r.stdout).to.equal("");
      expect(r.stderr).to.include(`timed out after 3s waiting for an SSH banner on 127.0.0.1:${sshPort}`);
      const shot = /^wait-for-guest: screenshot: (\S+)$/m.exec(r.stderr)?.[1];
      expect(shot, r.stderr).to.match(new RegExp(`^${dir}/failure-\\d{8}T\\d{6}Z-wait-for-guest\\.png$`));
      expect(r.stderr).to.include(`wait-for-guest: fetch it: scp ubuntu@1.2.3.4:${shot} .`);
      const png = decodePng(fs.readFileSync(shot!));
      expect([png.width, png.height]).to.deep.equal([800, 600]);
      expect(png.colours).to.be.above(1);
    });

    it("puts the screenshot in screens/ beside the socket by default; says why there is none when the VM is gone", async function () {
      const r = await runScript("wait-for-guest.sh", ["127.0.0.1", String(sshPort), "2"], {
        env: { WAIT_GUEST_QMP_SOCKET: qmp },
        timeoutMs: 60000,
      });
      expect(r.code, r.stderr).to.equal(1);
      const shot = /^wait-for-guest: screenshot: (\S+)$/m.exec(r.stderr)?.[1];
      expect(path.dirname(shot ?? ""), r.stderr).to.equal(path.join(vmDir, "screens"));
      expect(fs.existsSync(shot!)).to.equal(true);
      expect(r.stderr).not.to.include("fetch it:");

      // A pid file of a process that is gone: no QEMU to ask.
      const deadPid = path.join(work, "dead.pid");
      const sh = await run("bash", ["-c", "echo $$"]);
      fs.writeFileSync(deadPid, sh.stdout);
      const d = await runScript("wait-for-guest.sh", ["127.0.0.1", String(sshPort), "2"], {
        env: { VM_PID_FILE: deadPid, WAIT_GUEST_QMP_SOCKET: qmp },
        timeoutMs: 60000,
      });
      expect(d.code, d.stderr).to.equal(3);
      expect(d.stderr).to.include("no screenshot: the VM (QEMU) is not running");

      // Without the socket nothing changes: no screenshot line at all.
      const plain = await runScript("wait-for-guest.sh", ["127.0.0.1", String(sshPort), "1"], { timeoutMs: 60000 });
      expect(plain.code).to.equal(1);
      expect(plain.stderr).not.to.include("screenshot");
    });
  });
});
