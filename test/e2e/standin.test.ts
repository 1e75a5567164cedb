/**
 * Self-test of the stand-in aarch64 guest fixture (test/fixtures/): it must
 * boot through UEFI + NVMe + virtio-net under TCG, answer SSH with the test
 * key, keep what is written to /disk, and power off by itself on an ACPI
 * power button (QMP system_powerdown), like the Windows guest it stands in for.
 */
import { expect } from "chai";
import { ChildProcess, spawn } from "child_process";
import * as fs from "fs";
import * as os from "os";
import * as path from "path";
import { freePort, repoRoot, run } from "../support/run";
import {
  ensureStandinGuest,
  makeFirmware,
  makeOverlay,
  POWEROFF_LINE,
  qmp,
  readFileFromDisk,
  READY_LINE,
  ssh,
  StandinGuest,
  waitForSshBanner,
} from "../fixtures/standin";

const BOOT_TIMEOUT_MS = 150_000;
const POWEROFF_TIMEOUT_MS = 10_000;

interface Vm {
  proc: ChildProcess;
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  running: () => boolean;
  output: () => string;
}

function startProcess(cmd: string, args: string[]): Vm {
  const proc = spawn(cmd, args, { stdio: ["ignore", "pipe", "pipe"] });
  let out = "";
  let running = true;
  proc.stdout?.on("data", (d: Buffer) => (out += d.toString()));
  proc.stderr?.on("data", (d: Buffer) => (out += d.toString()));
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => {
    proc.on("error", (e) => {
      out += `\nspawn error: ${e.message}`;
      running = false;
      resolve({ code: null, signal: null });
    });
    proc.on("exit", (code, signal) => {
      running = false;
      resolve({ code, signal });
    });
  });
  return { proc, exited, running: () => running, output: () => out };
}

function within<T>(p: Promise<T>, ms: number): Promise<T | "timeout"> {
  let timer: NodeJS.Timeout | undefined;
  const t = new Promise<"timeout">((r) => (timer = setTimeout(() => r("timeout"), ms)));
  return Promise.race([p, t]).finally(() => clearTimeout(timer));
}

function tail(file: string, lines = 30): string {
  if (!fs.existsSync(file)) return `(no ${file})`;
  // Firmware output carries terminal escapes: drop them for readability.
  const text = fs.readFileSync(file, "latin1").replace(/\x1b\[[0-9;=?]*[A-Za-z]/g, "");
  return text.split(/\r?\n/).slice(-lines).join("\n");
}

describe("stand-in aarch64 guest fixture", function () {
  let guest: StandinGuest;
  let work: string;
  let vm: Vm | undefined;

  before(async function () {
    this.timeout(15 * 60 * 1000);
    guest = await ensureStandinGuest();
  });

  beforeEach(function () {
    work = fs.mkdtempSync(path.join(os.tmpdir(), "standin-"));
  });

  afterEach(async function () {
    this.timeout(30_000);
    if (vm?.running()) {
      vm.proc.kill("SIGKILL");
      await vm.exited;
    }
    vm = undefined;
    fs.rmSync(work, { recursive: true, force: true });
  });

  after(async function () {
    // Boots use overlays: the cached disk must be untouched.
    const res = await run("sha256sum", [guest.disk]);
    expect(res.stdout.split(/\s+/)[0], "cached standin.qcow2 was modified").to.equal(guest.digest);
  });

  it("builds a cached disk and key pair, and a rebuild with the same inputs does nothing", async function () {
    this.timeout(60_000);
    const before = fs.statSync(guest.disk).mtimeMs;
    const res = await run("bash", [
      path.join(repoRoot, "test/fixtures/build-standin-guest.sh"),
      path.dirname(guest.disk),
    ]);
    expect(res.code, res.stderr).to.equal(0);
    expect(res.stderr).to.match(/up to date/);
    expect(fs.statSync(guest.disk).mtimeMs).to.equal(before);
    expect(fs.readFileSync(guest.publicKey, "utf8")).to.match(/^ssh-ed25519 /);
    expect(fs.statSync(guest.privateKey).mode & 0o077, "private key must be 0600").to.equal(0);
    const info = await run("qemu-img", ["info", "--output=json", guest.disk]);
    expect(JSON.parse(info.stdout).format).to.equal("qcow2");
  });

  it("boots with UEFI on NVMe, answers SSH, keeps files on /disk and powers off on ACPI", async function () {
    this.timeout(BOOT_TIMEOUT_MS + 60_000);
    const disk = path.join(work, "disk.qcow2");
    await makeOverlay(guest, disk);
    const fw = makeFirmware(work);
    const port = await freePort();
    const qmpSock = path.join(work, "qmp.sock");
    const serial = path.join(work, "serial.log");

    const t0 = Date.now();
    vm = startProcess("qemu-system-aarch64", [
      "-machine", "virt",
      "-cpu", "max,pauth=off",
      "-accel", "tcg",
      "-smp", "2",
      "-m", "1G",
      "-nodefaults",
      "-display", "none",
      "-drive", `if=pflash,unit=0,format=raw,readonly=on,file=${fw.code}`,
      "-drive", `if=pflash,unit=1,format=raw,file=${fw.vars}`,
      "-drive", `if=none,id=disk0,format=qcow2,cache=writethrough,file=${disk}`,
      "-device", "nvme,drive=disk0,serial=standin0",
      "-netdev", `user,id=net0,hostfwd=tcp:127.0.0.1:${port}-:22`,
      // romfile= : no iPXE option ROM (efi-virtio.rom is in ipxe-qemu, which may be absent).
      "-device", "virtio-net-pci,disable-legacy=on,romfile=,netdev=net0",
      "-qmp", `unix:${qmpSock},server=on,wait=off`,
      "-serial", `file:${serial}`,
    ]); // prettier-ignore
    const current = vm;

    let banner: string;
    try {
      banner = await waitForSshBanner(port, BOOT_TIMEOUT_MS, current.running);
    } catch (e) {
      throw new Error(`${(e as Error).message}\nQEMU: ${current.output()}\nserial log:\n${tail(serial)}`);
    }
    const tSsh = Date.now();
    expect(banner).to.match(/^SSH-2\.0-dropbear/);
    expect(fs.readFileSync(serial, "latin1")).to.include(READY_LINE);

    const uname = await ssh(guest, port, "uname -m && mount");
    expect(uname.code, uname.stderr).to.equal(0);
    expect(uname.stdout).to.match(/^aarch64\n/);
    expect(uname.stdout).to.match(/\/dev\/nvme0n1 on \/disk type vfat \(rw/);

    const marker = `standin-marker-${process.pid}-${Date.now()}`;
    const w = await ssh(guest, port, `echo ${marker} > /disk/marker.txt && cat /disk/marker.txt`);
    expect(w.code, w.stderr).to.equal(0);
    expect(w.stdout.trim()).to.equal(marker);

    const param = await ssh(guest, port, "cat > /disk/param.txt", "value-from-stdin\n");
    expect(param.code, param.stderr).to.equal(0);

    // The pipeline's guest command (powershell ... -EncodedCommand ...) runs the stand-in's provisioning.
    const settings = JSON.stringify({ builderUser: "standin-user", builderPassword: "not-printed" });
    const ps = await ssh(guest, port, "powershell -NoProfile -NonInteractive -EncodedCommand ZQBjAGgAbwA=", settings);
    expect(ps.code, ps.stderr).to.equal(0);
    // Its result line, then the software report as the guest command sends it (one tagged base64 line).
    const out = /^standin-provision: provisioned standin-user\nwindows-arm64-image-software-report: (\S+)\n$/.exec(
      ps.stdout,
    );
    expect(out, ps.stdout).to.not.equal(null);
    const sent = JSON.parse(Buffer.from(out![1], "base64").toString("utf8"));
    expect(sent.settings).to.deep.equal([
      {
        step: "create-builder-user",
        setting: "builderUser",
        expected: "standin-user",
        actual: "standin-user",
        result: "PASS",
      },
    ]);
    expect(`${ps.stdout}${ps.stderr}`).to.not.include("not-printed");

    const tDown = Date.now();
    await qmp(qmpSock, "system_powerdown");
    const ended = await within(current.exited, POWEROFF_TIMEOUT_MS);
    const tOff = Date.now();
    expect(ended, `QEMU still running ${POWEROFF_TIMEOUT_MS} ms after system_powerdown\n${tail(serial)}`).to.not.equal(
      "timeout",
    );
    expect(ended).to.deep.equal({ code: 0, signal: null });
    expect(fs.readFileSync(serial, "latin1")).to.include(POWEROFF_LINE);

    expect((await readFileFromDisk(disk, "marker.txt", work))?.trim()).to.equal(marker);
    expect(await readFileFromDisk(disk, "param.txt", work)).to.equal("value-from-stdin\n");
    expect(await readFileFromDisk(disk, "provisioned.txt", work)).to.equal("standin-user\n");
    expect(await readFileFromDisk(disk, "absent.txt", work)).to.equal(undefined);

    console.log(
      `      boot to SSH ${((tSsh - t0) / 1000).toFixed(1)} s, ` +
        `poweroff ${((tOff - tDown) / 1000).toFixed(1)} s, total ${((tOff - t0) / 1000).toFixed(1)} s`,
    );
  });

  it("boots through provisioning/run-vm.sh with an env file and answers SSH", async function () {
    this.timeout(BOOT_TIMEOUT_MS + 60_000);
    const runVm = path.join(repoRoot, "provisioning", "run-vm.sh");
    expect(fs.existsSync(runVm), `${runVm} missing`).to.equal(true);
    const disk = path.join(work, "disk.qcow2");
    await makeOverlay(guest, disk);
    const fw = makeFirmware(work);
    const sshPort = await freePort();
    const buildletPort = await freePort();
    const envFile = path.join(work, "vm.env");
    fs.writeFileSync(
      envFile,
      [
        "# stand-in guest under run-vm.sh",
        `VM_DIR=${work}`,
        `VM_DISK=${disk}`,
        `VM_EFI_CODE=${fw.code}`,
        `VM_EFI_VARS=${fw.vars}`,
        "VM_ACCEL=tcg",
        "VM_IMDS_PROXY=0",
        "VM_MEMORY_GIB=1",
        "VM_CPUS=2",
        `VM_SSH_PORT=${sshPort}`,
        `VM_BUILDLET_PORT=${buildletPort}`,
        "",
      ].join("\n"),
    );
    const serial = path.join(work, "serial.log");

    const t0 = Date.now();
    vm = startProcess("bash", [runVm, envFile]);
    const current = vm;
    try {
      await waitForSshBanner(sshPort, BOOT_TIMEOUT_MS, current.running);
    } catch (e) {
      throw new Error(`${(e as Error).message}\nrun-vm.sh: ${current.output()}\nserial log:\n${tail(serial)}`);
    }
    const tSsh = Date.now();
    const res = await ssh(guest, sshPort, "echo via-run-vm > /disk/marker.txt && cat /disk/marker.txt");
    expect(res.code, res.stderr).to.equal(0);
    expect(res.stdout.trim()).to.equal("via-run-vm");
    const log = fs.readFileSync(serial, "latin1");
    expect(log).to.include("=== run-vm: starting QEMU");
    expect(log).to.include(READY_LINE);

    await qmp(path.join(work, "qmp.sock"), "system_powerdown");
    const ended = await within(current.exited, POWEROFF_TIMEOUT_MS);
    expect(ended, `QEMU still running after system_powerdown\n${tail(serial)}`).to.deep.equal({
      code: 0,
      signal: null,
    });
    expect((await readFileFromDisk(disk, "marker.txt", work))?.trim()).to.equal("via-run-vm");
    console.log(`      boot to SSH via run-vm.sh ${((tSsh - t0) / 1000).toFixed(1)} s`);
  });
});
