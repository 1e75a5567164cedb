import { expect } from "chai";
import * as fs from "fs";
import * as net from "net";
import * as os from "os";
import * as path from "path";
import { qmp } from "../fixtures/standin";
import { freePort, readPid, run, runScript, script } from "../support/run";

// The VM lifecycle scripts against a real qemu-system-aarch64 (TCG, no guest
// OS: a blank disk boots into the UEFI shell, which is enough to exercise the
// launcher, the port forwards, QMP and the failure paths).

const tcgBase = {
  VM_ACCEL: "tcg",
  VM_CPUS: "1",
  VM_MEMORY_GIB: "1",
  VM_IMDS_PROXY: "0",
};

interface Vm {
  dir: string;
  envFile: string;
  sshPort: number;
  buildletPort: number;
  qmp: string;
  serial: string;
  pidFile: string;
  runLog: string;
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

async function waitFor(what: string, cond: () => boolean, timeoutMs: number): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(250);
  }
}

/** Alive and not a zombie. */
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

/** Pids of live QEMU processes whose command line mentions `needle`. */
function qemuProcessesMentioning(needle: string): number[] {
  const pids: number[] = [];
  for (const entry of fs.readdirSync("/proc")) {
    if (!/^\d+$/.test(entry)) continue;
    let cmdline = "";
    try {
      cmdline = fs.readFileSync(`/proc/${entry}/cmdline`, "utf8").split("\0").join(" ");
    } catch {
      continue;
    }
    if (cmdline.includes("qemu-system") && cmdline.includes(needle) && alive(Number(entry))) {
      pids.push(Number(entry));
    }
  }
  return pids;
}

/** Local addresses listening on a TCP port, from /proc/net/tcp{,6}. */
function listenAddresses(port: number): string[] {
  const out: string[] = [];
  for (const file of ["/proc/net/tcp", "/proc/net/tcp6"]) {
    let text = "";
    try {
      text = fs.readFileSync(file, "utf8");
    } catch {
      continue;
    }
    for (const line of text.split("\n").slice(1)) {
      const cols = line.trim().split(/\s+/);
      if (cols.length < 4 || cols[3] !== "0A") continue; // 0A = LISTEN
      const [addrHex, portHex] = cols[1].split(":");
      if (parseInt(portHex, 16) !== port) continue;
      if (addrHex.length === 8) {
        const bytes = addrHex.match(/../g)!.map((b) => parseInt(b, 16));
        out.push(bytes.reverse().join("."));
      } else {
        out.push(/^0+$/.test(addrHex) ? "::" : `ipv6:${addrHex}`);
      }
    }
  }
  return out.sort();
}

/** The value following each occurrence of `flag` in an argument list. */
function values(args: string[], flag: string): string[] {
  const out: string[] = [];
  args.forEach((a, i) => {
    if (a === flag && i + 1 < args.length) out.push(args[i + 1]);
  });
  return out;
}

/** The versioned machine type this host's QEMU's "virt" stands for ("virt-7.2"), read here independently. */
async function qemuVirtAlias(): Promise<string> {
  const r = await run("qemu-system-aarch64", ["-machine", "help"]);
  const m = /^virt\s.*\(alias of (virt-\d+\.\d+)\)\s*$/m.exec(r.stdout);
  if (!m) throw new Error(`qemu-system-aarch64 -machine help names no alias of virt:\n${r.stdout}`);
  return m[1];
}

/** Whether a file's file system takes O_DIRECT (what run-vm.sh's cache=none needs). */
async function takesODirect(file: string): Promise<boolean> {
  const r = await run("dd", [`if=${file}`, "of=/dev/null", "bs=4096", "count=1", "iflag=direct", "status=none"]);
  return r.code === 0;
}

/** start-vm.sh on the detached (non-systemd) path, whatever the machine runs. */
function startVm(vm: Vm, env: NodeJS.ProcessEnv = {}) {
  return runScript("start-vm.sh", [vm.envFile], { env: { START_VM_SYSTEMD: "0", ...env }, timeoutMs: 60000 });
}

describe("VM lifecycle scripts: run-vm, start-vm, wait-for-guest, stop-vm", function () {
  this.timeout(120000);

  let work: string;
  let driversIso: string;
  let configIso: string;
  let installIso: string;
  const vms: Vm[] = [];

  async function makeVm(name: string, vars: Record<string, string> = {}): Promise<Vm> {
    const dir = path.join(work, name);
    fs.mkdirSync(dir, { recursive: true });
    const efi = await runScript("build-efi.sh", [dir]);
    expect(efi.code, efi.stderr).to.equal(0);
    const img = await run("qemu-img", ["create", "-q", "-f", "qcow2", path.join(dir, "disk.qcow2"), "1G"]);
    expect(img.code, img.stderr).to.equal(0);
    const sshPort = await freePort();
    let buildletPort = await freePort();
    while (buildletPort === sshPort) buildletPort = await freePort();
    const settings: Record<string, string> = {
      VM_DIR: dir,
      ...tcgBase,
      VM_DISK: path.join(dir, "disk.qcow2"),
      VM_SSH_PORT: String(sshPort),
      VM_BUILDLET_PORT: String(buildletPort),
      ...vars,
    };
    const envFile = path.join(dir, "vm.env");
    const lines = ["# written by vm.test.ts", ...Object.entries(settings).map(([k, v]) => `${k}=${v}`)];
    fs.writeFileSync(envFile, lines.join("\n") + "\n");
    const vm: Vm = {
      dir,
      envFile,
      sshPort,
      buildletPort,
      qmp: path.join(dir, "qmp.sock"),
      serial: path.join(dir, "serial.log"),
      pidFile: path.join(dir, "qemu.pid"),
      runLog: path.join(dir, "run-vm.log"),
    };
    vms.push(vm);
    return vm;
  }

  before(async function () {
    work = fs.mkdtempSync(path.join(os.tmpdir(), "vm-test-"));
    const isoDir = path.join(work, "iso-content");
    fs.mkdirSync(isoDir);
    fs.writeFileSync(path.join(isoDir, "README.TXT"), "stand-in drivers\n");
    driversIso = path.join(work, "drivers.iso");
    configIso = path.join(work, "config.iso");
    installIso = path.join(work, "install.iso");
    for (const [iso, label] of [
      [driversIso, "VIRTIO"],
      [configIso, "CONFIG"],
      [installIso, "INSTALL"],
    ]) {
      const r = await run("xorriso", ["-as", "mkisofs", "-quiet", "-V", label, "-o", iso, isoDir]);
      expect(r.code, r.stderr).to.equal(0);
    }
  });

  after(async function () {
    // Kill only what these tests started: QEMUs and launchers of our VM dirs.
    for (const vm of vms) {
      for (const f of [vm.pidFile, path.join(vm.dir, "run-vm.pid")]) {
        const pid = readPid(f);
        if (alive(pid)) {
          try {
            process.kill(pid!, "SIGKILL");
          } catch {
            /* already gone */
          }
        }
      }
    }
    for (const pid of qemuProcessesMentioning(work)) process.kill(pid, "SIGKILL");
    fs.rmSync(work, { recursive: true, force: true });
  });

  describe("run-vm.sh --print and validation (QEMU not started)", function () {
    it("--print shows the device set: pflash pair, NVMe, read-only USB CDs, virtio-net, loopback SSH", async function () {
      const vm = await makeVm("print", {
        VM_DRIVERS_ISO: driversIso,
        VM_CONFIG_ISO: configIso,
        VM_MACHINE_OPTS: "gic-version=max",
        VM_VNC_DISPLAY: "7",
        VM_MAC: "52:54:00:aa:bb:cc",
      });
      const r = await runScript("run-vm.sh", ["--print", vm.envFile]);
      expect(r.code, r.stderr).to.equal(0);
      const args = r.stdout.trimEnd().split("\n");
      expect(args[0]).to.equal("qemu-system-aarch64");
      // gic-version in VM_MACHINE_OPTS is the GIC version; the machine type is pinned.
      expect(values(args, "-machine")).to.deep.equal([`${await qemuVirtAlias()},gic-version=max`]);
      expect(values(args, "-accel")).to.deep.equal(["tcg"]);
      expect(values(args, "-cpu")).to.deep.equal(["max,pauth=off"]);
      expect(values(args, "-smp")).to.deep.equal(["1"]);
      expect(values(args, "-m")).to.deep.equal(["1G"]);
      expect(args).to.include.members(["-nodefaults", "-no-user-config"]);
      expect(values(args, "-name")).to.deep.equal(["windows-vm"]);
      expect(values(args, "-pidfile")).to.deep.equal([vm.pidFile]);

      const drives = values(args, "-drive");
      const pflash = drives.filter((d) => d.startsWith("if=pflash"));
      expect(pflash).to.have.length(2);
      expect(pflash[0]).to.include("unit=0").and.include("readonly=on").and.include("format=raw");
      expect(pflash[0]).to.include(`file=${path.join(vm.dir, "QEMU_EFI.fd")}`);
      expect(pflash[1]).to.include("unit=1").and.not.include("readonly");
      expect(pflash[1]).to.include(`file=${path.join(vm.dir, "QEMU_VARS.fd")}`);

      const devices = values(args, "-device");
      const disk = drives.find((d) => d.includes("id=disk0"));
      expect(disk).to.include("format=qcow2").and.include("discard=unmap,detect-zeroes=unmap");
      expect(disk).to.not.include("cache=writethrough");
      expect(disk).to.include(`file=${path.join(vm.dir, "disk.qcow2")}`);
      expect(devices.find((d) => d.startsWith("nvme,")))
        .to.include("drive=disk0")
        .and.include("serial=")
        .and.not.include("bootindex"); // the firmware's own boot order without an install ISO

      for (const [id, iso] of [
        ["drivers", driversIso],
        ["config", configIso],
      ]) {
        const drive = drives.find((d) => d.includes(`id=${id},`));
        expect(drive, id).to.include("readonly=on").and.include("media=cdrom").and.include(`file=${iso}`);
        expect(devices.some((d) => d.startsWith("usb-storage,") && d.includes(`drive=${id}`))).to.equal(true);
      }
      expect(devices).to.include.members(["nec-usb-xhci,id=xhci,p2=8,p3=8", "ramfb", "virtio-rng-pci"]);
      expect(devices.some((d) => d.startsWith("usb-kbd"))).to.equal(true);
      expect(devices.some((d) => d.startsWith("usb-mouse"))).to.equal(true);

      const nic = devices.find((d) => d.startsWith("virtio-net-pci,"));
      expect(nic).to.include("disable-legacy=on").and.include("mac=52:54:00:aa:bb:cc");
      const netdev = values(args, "-netdev")[0];
      expect(netdev).to.include(`hostfwd=tcp:127.0.0.1:${vm.sshPort}-:22`);
      expect(netdev).to.include(`hostfwd=tcp::${vm.buildletPort}-:443`);
      expect(netdev).not.to.include("guestfwd"); // VM_IMDS_PROXY=0

      expect(values(args, "-vnc")).to.deep.equal(["127.0.0.1:7"]);
      expect(values(args, "-display")).to.deep.equal([]);
      expect(values(args, "-chardev").join(" ")).to.include(`path=${vm.serial},append=on`);
      expect(values(args, "-chardev").join(" ")).to.include(`path=${vm.qmp},server=on,wait=off`);

      // RUN_VM_DRY_RUN=1 is the same as --print; the environment wins over the file;
      // the IMDS proxy and KVM settings show up as documented.
      const dry = await runScript("run-vm.sh", [vm.envFile], { env: { RUN_VM_DRY_RUN: "1" } });
      expect(dry.code, dry.stderr).to.equal(0);
      expect(dry.stdout).to.equal(r.stdout);
      const imds = await runScript("run-vm.sh", ["--print", vm.envFile], {
        env: { VM_IMDS_PROXY: "1", VM_CPUS: "2", VM_VNC_DISPLAY: "" },
      });
      expect(imds.code, imds.stderr).to.equal(0);
      const imdsArgs = imds.stdout.trimEnd().split("\n");
      expect(values(imdsArgs, "-netdev")[0]).to.match(
        /,guestfwd=tcp:10\.0\.2\.100:8173-cmd:\/usr\/bin\/python3 -I -S \S+\/imds-proxy\.py( --upstream unix:@windows-vm-imds-\d+ --upstream-uid \d+)?$/,
      );
      expect(values(imdsArgs, "-smp")).to.deep.equal(["2"]);
      // VM_VNC_DISPLAY set to empty in the environment wins too: no VNC, no display.
      expect(values(imdsArgs, "-vnc")).to.deep.equal([]);
      expect(values(imdsArgs, "-display")).to.deep.equal(["none"]);

      // An install ISO boots first (bootindex 0), then the disk.
      const inst = await runScript("run-vm.sh", ["--print", vm.envFile], { env: { VM_INSTALL_ISO: installIso } });
      expect(inst.code, inst.stderr).to.equal(0);
      const instArgs = inst.stdout.trimEnd().split("\n");
      expect(values(instArgs, "-drive").find((d) => d.includes("id=install,")))
        .to.include("readonly=on")
        .and.include(`file=${installIso}`);
      const instDevices = values(instArgs, "-device");
      expect(instDevices).to.include("usb-storage,bus=xhci.0,drive=install,removable=on,bootindex=0");
      expect(instDevices.find((d) => d.startsWith("nvme,"))).to.match(/,bootindex=1$/);
    });

    it("--print of an ISO-install env: an xHCI with 8+8 ports, the disk cache chosen on this host, the versioned machine type and the GIC version, each said at start", async function () {
      const vm = await makeVm("iso-print", {
        VM_INSTALL_ISO: installIso,
        VM_DRIVERS_ISO: driversIso,
        VM_CONFIG_ISO: configIso,
      });
      const r = await runScript("run-vm.sh", ["--print", vm.envFile]);
      expect(r.code, r.stderr).to.equal(0);
      const args = r.stdout.trimEnd().split("\n");
      const devices = values(args, "-device");
      expect(devices.filter((d) => d.includes("xhci,"))).to.deep.equal(["nec-usb-xhci,id=xhci,p2=8,p3=8"]);
      expect(devices.filter((d) => d.includes("bus=xhci.0"))).to.have.length(5); // keyboard, mouse, three CDs

      const alias = await qemuVirtAlias();
      expect(values(args, "-machine")).to.deep.equal([`${alias},gic-version=3`]);
      expect(r.stderr).to.include(
        `run-vm: machine ${alias} (the versioned type this QEMU's virt stands for), GIC version 3\n`,
      );

      const disk = values(args, "-drive").find((d) => d.includes("id=disk0")) as string;
      const mode = /,cache=([a-z]+)(?:,aio=([a-z_]+))?,discard=unmap,detect-zeroes=unmap,/.exec(disk);
      expect(mode, disk).to.not.equal(null);
      if (await takesODirect(path.join(vm.dir, "disk.qcow2"))) {
        expect(mode![1], disk).to.equal("none");
        expect(mode![2], disk).to.be.oneOf(["io_uring", "native"]);
      } else {
        expect(mode![1], disk).to.equal("writeback");
        expect(mode![2], disk).to.equal(undefined);
      }
      const said = `run-vm: disk cache=${mode![1]}${mode![2] ? `,aio=${mode![2]}` : ""},discard=unmap,detect-zeroes=unmap (`;
      expect(r.stderr).to.include(said);
      expect(fs.existsSync(path.join(vm.dir, "vm-resolved.env")), "--print writes nothing").to.equal(false);

      // A cache mode given is taken as it is (writethrough: the old mode, for the bench).
      for (const cache of ["writethrough", "writeback"]) {
        const c = await runScript("run-vm.sh", ["--print", vm.envFile], { env: { VM_DISK_CACHE: cache } });
        expect(c.code, c.stderr).to.equal(0);
        const d = values(c.stdout.trimEnd().split("\n"), "-drive").find((x) => x.includes("id=disk0"));
        expect(d).to.include(`,cache=${cache},discard=unmap,detect-zeroes=unmap,`).and.not.include("aio=");
        expect(c.stderr).to.include(
          `run-vm: disk cache=${cache},discard=unmap,detect-zeroes=unmap (VM_DISK_CACHE=${cache})`,
        );
      }
      // A machine type and GIC version given are used, as long as this QEMU has them.
      const given = await runScript("run-vm.sh", ["--print", vm.envFile], {
        env: { VM_MACHINE_TYPE: "virt-6.2", VM_GIC_VERSION: "2", VM_MACHINE_OPTS: "its=off" },
      });
      expect(given.code, given.stderr).to.equal(0);
      expect(values(given.stdout.trimEnd().split("\n"), "-machine")).to.deep.equal(["virt-6.2,gic-version=2,its=off"]);
      expect(given.stderr).to.include("run-vm: machine virt-6.2 (VM_MACHINE_TYPE), GIC version 2\n");
    });

    it("the machine type comes from -machine help; a disk QEMU cannot open with O_DIRECT gets writeback; what cannot be pinned is refused", async function () {
      const vm = await makeVm("stub-qemu");
      const real = (await run("bash", ["-c", "command -v qemu-system-aarch64"])).stdout.trim();
      const bin = path.join(vm.dir, "bin");
      fs.mkdirSync(bin);
      // QEMU 8.2's list (Ubuntu 24.04), and a QEMU without io_uring or Linux AIO.
      fs.writeFileSync(
        path.join(bin, "qemu-system-aarch64"),
        [
          "#!/bin/bash",
          'case " $* " in',
          '  *" -machine help "*)',
          "    echo 'Supported machines are:'",
          "    echo 'virt-8.1             QEMU 8.1 ARM Virtual Machine'",
          "    if [[ -z ${STUB_NO_ALIAS:-} ]]; then",
          "      echo 'virt                 QEMU 8.2 ARM Virtual Machine (alias of virt-8.2)'",
          "    fi",
          "    echo 'virt-8.2             QEMU 8.2 ARM Virtual Machine'",
          "    echo 'xlnx-zcu102          Xilinx ZynqMP ZCU102 board with 4xA53s and 2xR5Fs based on the value of smp'",
          "    ;;",
          '  *" -machine none "*) echo "qemu-system-aarch64: aio=io_uring was specified, but is not supported in this build" >&2; exit 1 ;;',
          `  *) exec ${real} "$@" ;;`,
          "esac",
          "",
        ].join("\n"),
        { mode: 0o755 },
      );
      const env = { PATH: `${bin}:${process.env.PATH}` };
      const r = await runScript("run-vm.sh", ["--print", vm.envFile], { env });
      expect(r.code, r.stderr).to.equal(0);
      const args = r.stdout.trimEnd().split("\n");
      expect(values(args, "-machine")).to.deep.equal(["virt-8.2,gic-version=3"]);
      const disk = values(args, "-drive").find((d) => d.includes("id=disk0"));
      expect(disk).to.include(",cache=writeback,discard=unmap,detect-zeroes=unmap,").and.not.include("aio=");
      expect(r.stderr).to.include("neither aio=io_uring nor aio=native");

      // VM_DISK_CACHE=none is kept (QEMU's default AIO, threads).
      const none = await runScript("run-vm.sh", ["--print", vm.envFile], { env: { ...env, VM_DISK_CACHE: "none" } });
      expect(none.code, none.stderr).to.equal(0);
      expect(values(none.stdout.trimEnd().split("\n"), "-drive").find((d) => d.includes("id=disk0"))).to.include(
        ",cache=none,discard=unmap,",
      );

      const noAlias = await runScript("run-vm.sh", ["--print", vm.envFile], { env: { ...env, STUB_NO_ALIAS: "1" } });
      expect(noAlias.code).to.equal(2);
      expect(noAlias.stderr)
        .to.include("shows no versioned type behind virt")
        .and.include("set VM_MACHINE_TYPE=virt-X.Y");
      const pinned = await runScript("run-vm.sh", ["--print", vm.envFile], {
        env: { ...env, STUB_NO_ALIAS: "1", VM_MACHINE_TYPE: "virt-8.1" },
      });
      expect(pinned.code, pinned.stderr).to.equal(0);
      expect(values(pinned.stdout.trimEnd().split("\n"), "-machine")).to.deep.equal(["virt-8.1,gic-version=3"]);

      const bad = await runScript("run-vm.sh", ["--check", vm.envFile], {
        env: {
          ...env,
          VM_MACHINE_TYPE: "virt-9.9",
          VM_GIC_VERSION: "3",
          VM_MACHINE_OPTS: "gic-version=2",
          VM_DISK_CACHE: "unsafe",
        },
      });
      expect(bad.code).to.equal(2);
      expect(bad.stderr).to.include(
        "VM_MACHINE_TYPE=virt-9.9 is not a machine type of this QEMU (its virt types: virt-8.1 virt-8.2 )",
      );
      expect(bad.stderr).to.include("VM_MACHINE_OPTS sets gic-version=2 but VM_GIC_VERSION=3: set it in one place");
      expect(bad.stderr).to.include("VM_DISK_CACHE=unsafe must be auto, none, writeback or writethrough");
      const bad2 = await runScript("run-vm.sh", ["--check", vm.envFile], {
        env: { ...env, VM_MACHINE_TYPE: "virt", VM_GIC_VERSION: "5" },
      });
      expect(bad2.code).to.equal(2);
      expect(bad2.stderr).to.include(
        "VM_MACHINE_TYPE=virt must be auto or a versioned virt machine type like virt-8.2",
      );
      expect(bad2.stderr).to.include("VM_GIC_VERSION=5 must be 2, 3, 4, host or max");
    });

    it("a missing firmware and disk fail before QEMU starts, naming each variable and path", async function () {
      const vm = await makeVm("missing", {
        VM_EFI_CODE: path.join(work, "missing", "nope", "QEMU_EFI.fd"),
        VM_DISK: path.join(work, "missing", "nope.qcow2"),
        VM_DRIVERS_ISO: path.join(work, "missing", "virtio-win.iso"),
        VM_CPUS: "two",
        VM_SSH_PORT: "70000",
      });
      fs.appendFileSync(vm.envFile, "this line is not KEY=value\n");
      const started = Date.now();
      const r = await runScript("run-vm.sh", [vm.envFile]);
      expect(r.code, r.stderr).to.equal(2);
      expect(r.stderr).to.include(
        `VM_EFI_CODE=${path.join(work, "missing", "nope", "QEMU_EFI.fd")} does not exist (run build-efi.sh first)`,
      );
      expect(r.stderr).to.include(
        `VM_DISK=${path.join(work, "missing", "nope.qcow2")} does not exist (run prepare-disk.sh first)`,
      );
      expect(r.stderr).to.include(`VM_DRIVERS_ISO=${path.join(work, "missing", "virtio-win.iso")} does not exist`);
      expect(r.stderr).to.include("VM_CPUS=two is not a whole number");
      expect(r.stderr).to.include("VM_SSH_PORT=70000 is not a TCP port number");
      expect(r.stderr).to.match(/vm\.env:\d+: not a KEY=value line/);
      expect(r.stderr).not.to.include("starting:");
      expect(Date.now() - started).to.be.below(10000);
      expect(fs.existsSync(vm.pidFile), "qemu.pid").to.equal(false);
      expect(fs.existsSync(vm.serial), "serial.log").to.equal(false);
      expect(fs.existsSync(vm.qmp), "qmp.sock").to.equal(false);
      expect(qemuProcessesMentioning(vm.dir)).to.deep.equal([]);

      // start-vm refuses the same file with the same messages and exit code 2.
      const s = await startVm(vm);
      expect(s.code, s.stderr).to.equal(2);
      expect(s.stderr).to.include("VM_DISK=").and.include("not starting the VM");
      expect(fs.existsSync(vm.runLog)).to.equal(false);
      expect(qemuProcessesMentioning(vm.dir)).to.deep.equal([]);
    });

    it("rejects firmware that is not 64 MiB, a non-qcow2 disk, and KVM where there is none", async function () {
      const vm = await makeVm("badfiles", { VM_ACCEL: "kvm" });
      fs.copyFileSync("/usr/share/qemu-efi-aarch64/QEMU_EFI.fd", path.join(vm.dir, "QEMU_EFI.fd"));
      fs.writeFileSync(path.join(vm.dir, "disk.qcow2"), Buffer.alloc(4096));
      const r = await runScript("run-vm.sh", ["--check", vm.envFile]);
      expect(r.code, r.stderr).to.equal(2);
      expect(r.stderr).to.match(/VM_EFI_CODE=\S+ is 2097152 bytes, .*exactly 67108864/);
      expect(r.stderr).to.match(/VM_DISK=\S+ is not a qcow2 image/);
      const kvmUsable = os.arch() === "arm64" && fs.existsSync("/dev/kvm");
      if (!kvmUsable) expect(r.stderr).to.include("VM_ACCEL=kvm").and.include("VM_ACCEL=tcg for tests");
    });

    it("parses the env file without running it: shell syntax is data or an error, never code", async function () {
      const marker = path.join(work, "pwned");
      const vm = await makeVm("inject", { VM_MACHINE_OPTS: `$(touch ${marker})` });
      fs.appendFileSync(vm.envFile, `touch ${marker}\nexport VM_CPUS=1\nPATH=/nonexistent\n`);
      const r = await runScript("run-vm.sh", ["--print", vm.envFile]);
      expect(r.code).to.equal(2);
      expect(r.stderr).to.include("VM_MACHINE_OPTS=$(touch");
      expect(r.stderr).to.match(/not a KEY=value line: 'touch /);
      expect(r.stderr).to.match(/not a KEY=value line: 'export VM_CPUS=1'/);
      expect(r.stderr).not.to.include("qemu-system-aarch64 not found"); // PATH= from the file is ignored
      expect(fs.existsSync(marker)).to.equal(false);
    });
  });

  describe("a VM booted under TCG (blank disk: UEFI firmware only)", function () {
    let vm: Vm;
    let qemuPid: number;

    before(async function () {
      const vncPort = await freePort();
      vm = await makeVm("boot", {
        VM_DRIVERS_ISO: driversIso,
        VM_CONFIG_ISO: configIso,
        VM_INSTALL_ISO: installIso,
        VM_VNC_DISPLAY: String(vncPort - 5900),
      });
    });

    it("start-vm starts the launcher in the background, then presses Enter for the install ISO on a blank disk", async function () {
      const t0 = Date.now();
      const r = await startVm(vm, { START_VM_BOOT_KEYS_S: "12" });
      expect(r.code, r.stderr).to.equal(0);
      expect(r.stdout).to.match(/^start-vm: VM started \(QEMU pid \d+.*\)\n$/);
      expect(r.stderr).to.include("no systemd here");
      expect(r.stderr).to.include("blank disk and an install ISO: pressing Enter once a second for 12s");
      const pressed = Number(/pressed Enter (\d+) times; Windows Setup should be booting/.exec(r.stderr)?.[1]);
      expect(pressed, r.stderr).to.be.within(6, 12);
      expect(Date.now() - t0).to.be.below(50000);
      qemuPid = readPid(vm.pidFile)!;
      expect(alive(qemuPid), "QEMU alive").to.equal(true);
      // The launcher execs QEMU: the recorded launcher pid is QEMU's.
      expect(readPid(path.join(vm.dir, "run-vm.pid"))).to.equal(qemuPid);
      expect(fs.readFileSync(vm.runLog, "utf8")).to.include("run-vm: starting: qemu-system-aarch64");
    });

    it("the serial log shows the UEFI firmware banner within 60 s", async function () {
      await waitFor(
        "UEFI firmware in the serial log",
        () => {
          try {
            return fs.readFileSync(vm.serial, "utf8").includes("UEFI firmware");
          } catch {
            return false;
          }
        },
        60000,
      );
      const serial = fs.readFileSync(vm.serial, "utf8");
      expect(serial).to.match(/=== run-vm: starting QEMU at \S+ ===/);
      // Boot order: the install ISO (USB; no EFI image in this stand-in, so "Not Found"), then the NVMe disk.
      await waitFor(
        "the boot manager to try the NVMe disk",
        () => /BdsDxe: .*NVMe/.test(fs.readFileSync(vm.serial, "utf8")),
        60000,
      );
      const attempts = fs
        .readFileSync(vm.serial, "utf8")
        .split(/\r?\n/)
        .filter((l) => /BdsDxe: (failed to load|loading)/.test(l));
      expect(attempts[0], attempts.join("\n")).to.match(/USB/);
      expect(attempts[1], attempts.join("\n")).to.match(/NVMe/);
      // Nothing bootable, so the firmware ends in its shell: each Enter start-vm pressed
      // (QMP send-key to the USB keyboard) shows there as a fresh prompt.
      const prompts = fs.readFileSync(vm.serial, "utf8").split("Shell>").length - 1;
      expect(prompts, "UEFI shell prompts after the key presses").to.be.at.least(3);
    });

    it("forwards SSH on 127.0.0.1 only, the buildlet port on all addresses, VNC on loopback", async function () {
      expect(listenAddresses(vm.sshPort)).to.deep.equal(["127.0.0.1"]);
      expect(listenAddresses(vm.buildletPort)).to.deep.equal(["0.0.0.0"]);
      const vncPort = 5900 + Number(/VM_VNC_DISPLAY=(\d+)/.exec(fs.readFileSync(vm.envFile, "utf8"))![1]);
      expect(listenAddresses(vncPort)).to.deep.equal(["127.0.0.1"]);
    });

    it("QEMU's info usb (QMP): keyboard, mouse and the three CDs, none at 12 Mb/s, no hub", async function () {
      const info = (await qmp(vm.qmp, "human-monitor-command", { "command-line": "info usb" })) as string;
      const devices = info.split("\n").filter((l) => /^\s*Device /.test(l));
      expect(devices, info).to.have.length(5);
      const speeds = devices.map((l) => /Speed (\S+) Mb\/s/.exec(l)?.[1]);
      expect(speeds, info).to.not.include("12");
      expect(speeds, info).to.not.include("1.5");
      expect(info).to.not.include("Hub");
      expect(
        devices.filter((l) => l.includes("QEMU USB MSD")),
        info,
      ).to.have.length(3);
      expect(info).to.include("QEMU USB Keyboard").and.include("QEMU USB Mouse");
    });

    it("the launcher recorded the machine type, GIC version and disk mode it started QEMU with", async function () {
      const resolved = fs.readFileSync(path.join(vm.dir, "vm-resolved.env"), "utf8");
      expect(resolved).to.include(`\nVM_MACHINE_TYPE=${await qemuVirtAlias()}\n`);
      expect(resolved).to.include("\nVM_GIC_VERSION=3\n");
      expect(resolved).to.match(/\nVM_DISK_CACHE=(none|writeback)\n/);
      const pid = readPid(vm.pidFile)!;
      const cmdline = fs.readFileSync(`/proc/${pid}/cmdline`, "utf8").split("\0");
      const disk = values(cmdline, "-drive").find((d) => d.includes("id=disk0")) as string;
      const cache = /VM_DISK_CACHE=(\S+)/.exec(resolved)![1];
      const aio = /VM_DISK_AIO=(\S*)/.exec(resolved)![1];
      expect(disk).to.include(`,cache=${cache}${aio ? `,aio=${aio}` : ""},discard=unmap,detect-zeroes=unmap,`);
    });

    it("a second start-vm is a no-op", async function () {
      const r = await startVm(vm);
      expect(r.code, r.stderr).to.equal(0);
      expect(r.stdout).to.include(`VM already running (QEMU pid ${qemuPid}`);
      expect(readPid(vm.pidFile)).to.equal(qemuPid);
      expect(qemuProcessesMentioning(vm.dir)).to.deep.equal([qemuPid]);
    });

    it("run-vm refuses to start a second QEMU on the same VM dir", async function () {
      const r = await runScript("run-vm.sh", [vm.envFile]);
      expect(r.code).to.equal(2);
      expect(r.stderr).to.include(`already running (pid ${qemuPid}`);
      expect(r.stderr).to.include(`stop it first: stop-vm.sh ${vm.qmp}`);
      expect(qemuProcessesMentioning(vm.dir)).to.deep.equal([qemuPid]);
    });

    it("wait-for-guest times out with host:port, the timeout and the serial-log tail when no guest answers", async function () {
      const t0 = Date.now();
      const r = await runScript("wait-for-guest.sh", ["127.0.0.1", String(vm.sshPort), "4"], {
        env: { SERIAL_LOG: vm.serial, VM_PID_FILE: vm.pidFile },
        timeoutMs: 30000,
      });
      expect(r.code, r.stderr).to.equal(1);
      expect(r.stdout).to.equal("");
      expect(r.stderr).to.include(`timed out after 4s waiting for an SSH banner on 127.0.0.1:${vm.sshPort}`);
      expect(r.stderr).to.include("last 40 lines of the serial log");
      expect(r.stderr).to.include("| UEFI firmware");
      expect(r.stderr).not.to.match(/\x1b\[/); // terminal escapes are stripped
      // Never before its 4 s (whole-second clock ticks would allow up to a second early).
      expect(Date.now() - t0).to.be.within(4000, 15000);
    });

    it("stop-vm ends QEMU and says how (the UEFI shell ignores the ACPI power button)", async function () {
      const t0 = Date.now();
      const r = await runScript("stop-vm.sh", [vm.qmp, "3"], {
        env: { STOP_VM_REQUIRE_GRACEFUL: "1" },
        timeoutMs: 60000,
      });
      const elapsed = Date.now() - t0;
      expect(r.stderr).to.include("ACPI power-down sent");
      if (r.stdout.includes("powered off gracefully")) {
        expect(r.code, r.stderr).to.equal(0);
      } else {
        expect(r.stdout).to.include("stop-vm: forced quit after timeout (3s): the guest did not power off");
        expect(r.stderr).to.include("WARNING");
        expect(r.code, "STOP_VM_REQUIRE_GRACEFUL=1 makes a forced stop an error").to.equal(3);
        expect(elapsed).to.be.within(2500, 30000);
      }
      await waitFor("QEMU to be reaped", () => !alive(qemuPid), 10000);
      expect(qemuProcessesMentioning(vm.dir)).to.deep.equal([]);
      expect(fs.existsSync(vm.pidFile), "qemu.pid removed by QEMU").to.equal(false);
      expect(listenAddresses(vm.sshPort)).to.deep.equal([]);
    });

    it("stop-vm again is a no-op success", async function () {
      const r = await runScript("stop-vm.sh", [vm.qmp, "3"]);
      expect(r.code, r.stderr).to.equal(0);
      expect(r.stdout).to.include("stop-vm: already stopped");
    });
  });

  describe("failure and halt paths with a real QEMU", function () {
    it("start-vm names the cause when QEMU dies right after starting, and leaves nothing running", async function () {
      const vm = await makeVm("dies", { VM_MACHINE_OPTS: "no-such-option=on" });
      const r = await startVm(vm);
      expect(r.code, r.stderr).to.equal(1);
      expect(r.stderr).to.match(/start-vm: QEMU failed to start: .*no-such-option/);
      expect(r.stderr).to.include("launcher output");
      expect(qemuProcessesMentioning(vm.dir)).to.deep.equal([]);
    });

    it("start-vm refuses a port that is already taken, before starting anything", async function () {
      const vm = await makeVm("busy");
      const blocker = net.createServer((s) => s.destroy());
      await new Promise<void>((res) => blocker.listen(vm.sshPort, "127.0.0.1", () => res()));
      try {
        const r = await startVm(vm);
        expect(r.code, r.stderr).to.equal(2);
        expect(r.stderr).to.include(`VM_SSH_PORT=${vm.sshPort}: something already listens`);
        expect(fs.existsSync(vm.runLog)).to.equal(false);
      } finally {
        blocker.close();
      }
    });

    it("start-vm where systemd runs: a transient unit with --collect and KillMode=mixed (systemd stand-ins); stop-vm with nc when socat is absent", async function () {
      // Stand-ins for systemd-run/systemctl/journalctl that record their
      // arguments and run the unit's command detached, as systemd would.
      const fake = fs.mkdtempSync(path.join(work, "fake-systemd-"));
      const files: Record<string, string> = {
        "systemd-run": [
          "#!/usr/bin/env bash",
          'unit="" cmd=() envs=()',
          'for a in "$@"; do case $a in --unit=*) unit=${a#--unit=} ;; --setenv=*) envs+=("${a#--setenv=}") ;;',
          '  --*) ;; *) cmd+=("$a") ;; esac; done',
          'printf "%s\\n" "$@" >"$FAKE_SYSTEMD/$unit.args"',
          'env "${envs[@]}" setsid nohup "${cmd[@]}" >"$FAKE_SYSTEMD/$unit.journal" 2>&1 </dev/null &',
          'echo $! >"$FAKE_SYSTEMD/$unit.pid"',
        ].join("\n"),
        systemctl: [
          "#!/usr/bin/env bash",
          'verb="" unit=""',
          'for a in "$@"; do case $a in -*) ;; *) if [[ -z $verb ]]; then verb=$a; else unit=$a; fi ;; esac; done',
          'pid=$(cat "$FAKE_SYSTEMD/$unit.pid" 2>/dev/null)',
          "case $verb in",
          '  is-active) if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null && ! grep -q "^State:.*Z" "/proc/$pid/status"; then',
          "      echo active; else echo inactive; exit 3; fi ;;",
          '  stop) [[ -z $pid ]] || kill "$pid" 2>/dev/null; exit 0 ;;',
          "  *) exit 0 ;;",
          "esac",
        ].join("\n"),
        journalctl: [
          "#!/usr/bin/env bash",
          'unit=""; while (($#)); do [[ $1 == -u ]] && unit=$2; shift; done',
          'cat "$FAKE_SYSTEMD/$unit.journal"',
        ].join("\n"),
      };
      for (const [name, text] of Object.entries(files)) {
        fs.writeFileSync(path.join(fake, name), text + "\n", { mode: 0o755 });
      }
      const env = { START_VM_SYSTEMD: "1", FAKE_SYSTEMD: fake, PATH: `${fake}:${process.env.PATH}`, VM_CPUS: "1" };

      const vm = await makeVm("unit");
      const r = await runScript("start-vm.sh", [vm.envFile, "windows-vm-test"], { env, timeoutMs: 60000 });
      expect(r.code, r.stderr).to.equal(0);
      expect(r.stdout).to.match(/VM started \(QEMU pid \d+, .*unit windows-vm-test\)/);
      const args = fs.readFileSync(path.join(fake, "windows-vm-test.args"), "utf8").trimEnd().split("\n");
      expect(args).to.include.members(["--unit=windows-vm-test", "--collect", "--property=KillMode=mixed"]);
      expect(args).to.include("--setenv=VM_CPUS=1");
      expect(args.slice(-2)).to.deep.equal([script("run-vm.sh"), vm.envFile]);
      expect(fs.existsSync(vm.runLog), "no run-vm.log on the systemd path").to.equal(false);
      const again = await runScript("start-vm.sh", [vm.envFile, "windows-vm-test"], { env, timeoutMs: 60000 });
      expect(again.code, again.stderr).to.equal(0);
      expect(again.stdout).to.include("already running");
      // stop-vm with netcat-openbsd's nc -U where socat is not installed.
      const noSocat = fs.mkdtempSync(path.join(work, "bin-"));
      for (const tool of ["bash", "nc", "timeout", "grep", "sed", "cut", "tr", "dirname", "seq", "sleep"]) {
        const found = await run("bash", ["-c", `command -v ${tool}`]);
        fs.symlinkSync(found.stdout.trim(), path.join(noSocat, tool));
      }
      const stop = await run(path.join(noSocat, "bash"), [script("stop-vm.sh"), vm.qmp, "0"], {
        env: { PATH: noSocat },
        timeoutMs: 60000,
      });
      expect(stop.code, stop.stderr).to.equal(0);
      expect(stop.stderr).to.include("ACPI power-down sent");
      expect(stop.stdout).to.include("forced quit after timeout (0s)");
      expect(qemuProcessesMentioning(vm.dir)).to.deep.equal([]);

      // A QEMU that dies at once: the cause comes from the unit's journal.
      const bad = await makeVm("unit-dies", { VM_MACHINE_OPTS: "no-such-option=on" });
      const b = await runScript("start-vm.sh", [bad.envFile, "windows-vm-test2"], { env, timeoutMs: 60000 });
      expect(b.code, b.stderr).to.equal(1);
      expect(b.stderr).to.include("journal of windows-vm-test2");
      expect(b.stderr).to.match(/QEMU failed to start: .*no-such-option/);
      expect(b.stderr).to.include("no-such-option");
    });

    it("start-vm presses no key when the disk already holds data (Setup under way): it boots from the disk", async function () {
      const vm = await makeVm("installed", { VM_INSTALL_ISO: installIso });
      const w = await run("qemu-io", ["-f", "qcow2", "-c", "write -P 0x42 0 1M", path.join(vm.dir, "disk.qcow2")]);
      expect(w.code, w.stderr).to.equal(0);
      const s = await startVm(vm, { START_VM_BOOT_KEYS_S: "20" });
      expect(s.code, s.stderr).to.equal(0);
      expect(s.stderr).to.include("already holds data: no key at the install ISO's prompt");
      expect(s.stderr).not.to.include("pressing Enter");
      const stop = await runScript("stop-vm.sh", [vm.qmp, "0"], { timeoutMs: 60000 });
      expect(stop.code, stop.stderr).to.equal(0);
      const bad = await startVm(vm, { START_VM_BOOT_KEYS_S: "soon" });
      expect(bad.code).to.equal(2);
      expect(bad.stderr).to.include("START_VM_BOOT_KEYS_S='soon' is not a whole number of seconds");
    });

    it("VM_HALT_ON_EXIT=1 powers the host off after QEMU exits; wait-for-guest fails at once on the VM exit", async function () {
      const marker = path.join(work, "halted");
      const haltCmd = path.join(work, "fake-halt.sh");
      fs.writeFileSync(haltCmd, `#!/bin/sh\necho halted >"${marker}"\n`, { mode: 0o755 });
      const vm = await makeVm("halt", { VM_HALT_ON_EXIT: "1" });
      const env = { RUN_VM_HALT_COMMAND: haltCmd };
      const s = await startVm(vm, env);
      expect(s.code, s.stderr).to.equal(0);
      const launcherPid = readPid(path.join(vm.dir, "run-vm.pid"));
      const pid = readPid(vm.pidFile);
      expect(pid).not.to.equal(launcherPid); // QEMU is the launcher's child here

      const waiting = runScript("wait-for-guest.sh", ["127.0.0.1", String(vm.sshPort), "90"], {
        env: { SERIAL_LOG: vm.serial, VM_PID_FILE: vm.pidFile },
        timeoutMs: 100000,
      });
      await sleep(1500);
      const t0 = Date.now();
      const stop = await runScript("stop-vm.sh", [vm.qmp, "0"], { timeoutMs: 60000 });
      expect(stop.code, stop.stderr).to.equal(0);
      expect(stop.stdout).to.include("forced quit after timeout (0s)");
      const w = await waiting;
      expect(w.code, w.stderr).to.equal(3);
      expect(w.stderr).to.include(`the VM exited (QEMU pid ${pid} is gone)`);
      expect(Date.now() - t0).to.be.below(20000);
      await waitFor("the launcher to power off the host", () => fs.existsSync(marker), 15000);
      await waitFor("the launcher to exit", () => !alive(launcherPid), 15000);
      expect(fs.readFileSync(vm.runLog, "utf8")).to.match(
        /VM_HALT_ON_EXIT=1: powering off the host with '.*fake-halt\.sh'/,
      );
    });

    it("VM_HALT_ON_EXIT=1 does not power the host off when the launcher is stopped with SIGTERM", async function () {
      const marker = path.join(work, "halted-term");
      const haltCmd = path.join(work, "fake-halt-term.sh");
      fs.writeFileSync(haltCmd, `#!/bin/sh\necho halted >"${marker}"\n`, { mode: 0o755 });
      const vm = await makeVm("halt-term", { VM_HALT_ON_EXIT: "1" });
      const s = await startVm(vm, { RUN_VM_HALT_COMMAND: haltCmd });
      expect(s.code, s.stderr).to.equal(0);
      const launcherPid = readPid(path.join(vm.dir, "run-vm.pid"))!;
      const pid = readPid(vm.pidFile);
      process.kill(launcherPid, "SIGTERM");
      await waitFor("QEMU to exit", () => !alive(pid), 15000);
      await waitFor("the launcher to exit", () => !alive(launcherPid), 15000);
      expect(fs.readFileSync(vm.runLog, "utf8")).to.include("the host is NOT powered off");
      expect(fs.existsSync(marker)).to.equal(false);
    });
  });

  describe("wait-for-guest and stop-vm without a VM", function () {
    it("wait-for-guest succeeds on an SSH banner, also one that comes up late", async function () {
      const port = await freePort();
      const server = net.createServer((s) => s.end("SSH-2.0-test\r\n"));
      setTimeout(() => server.listen(port, "127.0.0.1"), 3000);
      try {
        const r = await runScript("wait-for-guest.sh", ["127.0.0.1", String(port), "30"], { timeoutMs: 40000 });
        expect(r.code, r.stderr).to.equal(0);
        expect(r.stdout).to.equal("SSH-2.0-test\n");
        expect(r.stderr).to.match(new RegExp(`guest SSH answered on 127\\.0\\.0\\.1:${port} after \\d+s`));
      } finally {
        server.close();
      }
    });

    it("wait-for-guest works without GNU timeout (an operator's macOS machine), using perl's alarm", async function () {
      const bin = fs.mkdtempSync(path.join(work, "bin-"));
      for (const tool of ["bash", "perl", "sleep", "seq", "tr", "sed", "grep", "tail", "cut"]) {
        const found = await run("bash", ["-c", `command -v ${tool}`]);
        fs.symlinkSync(found.stdout.trim(), path.join(bin, tool));
      }
      const port = await freePort();
      const held: net.Socket[] = [];
      const silent = net.createServer((s) => held.push(s));
      await new Promise<void>((res) => silent.listen(port, "127.0.0.1", () => res()));
      try {
        const bash = path.join(bin, "bash");
        const r = await run(bash, [script("wait-for-guest.sh"), "127.0.0.1", String(port), "3"], {
          env: { PATH: bin },
          timeoutMs: 20000,
        });
        expect(r.code, r.stderr).to.equal(1);
        expect(r.stderr).to.include("connected, but no SSH banner came");
        silent.close();
        held.forEach((s) => s.destroy());
        const banner = net.createServer((s) => s.end("SSH-2.0-OpenSSH_for_Windows_9.5\r\n"));
        await new Promise<void>((res) => banner.listen(port, "127.0.0.1", () => res()));
        try {
          const ok = await run(bash, [script("wait-for-guest.sh"), "127.0.0.1", String(port), "10"], {
            env: { PATH: bin },
            timeoutMs: 20000,
          });
          expect(ok.code, ok.stderr).to.equal(0);
          expect(ok.stdout).to.equal("SSH-2.0-OpenSSH_for_Windows_9.5\n");
        } finally {
          banner.close();
        }
      } finally {
        held.forEach((s) => s.destroy());
        silent.close();
      }
    });

    it("wait-for-guest is not fooled by a listener that sends no banner", async function () {
      const port = await freePort();
      const held: net.Socket[] = [];
      const server = net.createServer((s) => held.push(s));
      await new Promise<void>((res) => server.listen(port, "127.0.0.1", () => res()));
      try {
        const r = await runScript("wait-for-guest.sh", ["127.0.0.1", String(port), "3"], {
          env: { WAIT_FOR_GUEST_PROGRESS_S: "1" },
          timeoutMs: 20000,
        });
        expect(r.code, r.stderr).to.equal(1);
        expect(r.stderr).to.include(`timed out after 3s waiting for an SSH banner on 127.0.0.1:${port}`);
        expect(r.stderr).to.include("connected, but no SSH banner came");
      } finally {
        held.forEach((s) => s.destroy());
        server.close();
      }
    });

    it("wait-for-guest rejects bad arguments and a VM that is not running", async function () {
      const bad = await runScript("wait-for-guest.sh", ["127.0.0.1", "http", "5"]);
      expect(bad.code).to.equal(2);
      expect(bad.stderr).to.include("PORT='http' is not a TCP port");
      const port = await freePort();
      const r = await runScript("wait-for-guest.sh", ["127.0.0.1", String(port), "30"], {
        env: { VM_PID_FILE: path.join(work, "no-such-qemu.pid") },
        timeoutMs: 30000,
      });
      expect(r.code).to.equal(3);
      expect(r.stderr).to.include("the VM is not running");
    });

    it("stop-vm on an absent socket is a no-op success", async function () {
      const r = await runScript("stop-vm.sh", [path.join(work, "nowhere", "qmp.sock")]);
      expect(r.code, r.stderr).to.equal(0);
      expect(r.stdout).to.include("stop-vm: already stopped (no QMP socket at");
      const bad = await runScript("stop-vm.sh", [path.join(work, "qmp.sock"), "soon"]);
      expect(bad.code).to.equal(2);
    });

    it("the scripts exist and are executable", function () {
      for (const name of ["run-vm.sh", "start-vm.sh", "wait-for-guest.sh", "stop-vm.sh"]) {
        fs.accessSync(script(name), fs.constants.X_OK);
      }
    });
  });
});
