import { expect } from "chai";
import * as fs from "fs";
import * as os from "os";
import * as path from "path";
import { runScript } from "../support/run";

const MIB64 = 64 * 1024 * 1024;
const FIRMWARE = "/usr/share/qemu-efi-aarch64/QEMU_EFI.fd";

function isZero(buf: Buffer, from: number): boolean {
  for (let i = from; i < buf.length; i++) if (buf[i] !== 0) return false;
  return true;
}

describe("build-efi.sh", function () {
  this.timeout(60000);
  let dir: string;

  beforeEach(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), "efi-"));
  });
  afterEach(() => fs.rmSync(dir, { recursive: true, force: true }));

  it("pads the firmware to exactly 64 MiB and creates a zeroed 64 MiB variable store", async () => {
    const out = path.join(dir, "out");
    const r = await runScript("build-efi.sh", [out]);
    expect(r.code, r.stderr).to.equal(0);
    expect(r.stdout).to.equal("");
    const fw = fs.readFileSync(FIRMWARE);
    const code = fs.readFileSync(path.join(out, "QEMU_EFI.fd"));
    const vars = fs.readFileSync(path.join(out, "QEMU_VARS.fd"));
    expect(code.length).to.equal(MIB64);
    expect(vars.length).to.equal(MIB64);
    expect(code.subarray(0, fw.length).equals(fw)).to.equal(true);
    expect(isZero(code, fw.length)).to.equal(true);
    expect(isZero(vars, 0)).to.equal(true);
    expect(fs.readdirSync(out).sort()).to.deep.equal(["QEMU_EFI.fd", "QEMU_VARS.fd"]);
  });

  it("keeps the variable store and does not rewrite the firmware on a rerun", async () => {
    const r1 = await runScript("build-efi.sh", [dir]);
    expect(r1.code, r1.stderr).to.equal(0);
    const varsPath = path.join(dir, "QEMU_VARS.fd");
    const codePath = path.join(dir, "QEMU_EFI.fd");
    // The guest writes its boot entries into the store.
    const fd = fs.openSync(varsPath, "r+");
    fs.writeSync(fd, Buffer.from("BOOT0001"), 0, 8, 4096);
    fs.closeSync(fd);
    const codeIno = fs.statSync(codePath).ino;
    const r2 = await runScript("build-efi.sh", [dir]);
    expect(r2.code, r2.stderr).to.equal(0);
    expect(r2.stderr).to.match(/up to date/);
    expect(r2.stderr).to.match(/QEMU_VARS\.fd already exists; kept/);
    const vars = fs.readFileSync(varsPath);
    expect(vars.subarray(4096, 4104).toString()).to.equal("BOOT0001");
    expect(vars.length).to.equal(MIB64);
    // Same inode: the firmware file was compared, not replaced.
    expect(fs.statSync(codePath).ino).to.equal(codeIno);
    expect(fs.readdirSync(dir).sort()).to.deep.equal(["QEMU_EFI.fd", "QEMU_VARS.fd"]);
  });

  it("replaces QEMU_EFI.fd when the firmware changes", async () => {
    const fw = path.join(dir, "fw.fd");
    fs.writeFileSync(fw, Buffer.alloc(1024, 0xaa));
    const out = path.join(dir, "out");
    const r1 = await runScript("build-efi.sh", [out], { env: { EFI_FIRMWARE: fw } });
    expect(r1.code, r1.stderr).to.equal(0);
    fs.writeFileSync(fw, Buffer.alloc(2048, 0xbb));
    const r2 = await runScript("build-efi.sh", [out], { env: { EFI_FIRMWARE: fw } });
    expect(r2.code, r2.stderr).to.equal(0);
    const code = fs.readFileSync(path.join(out, "QEMU_EFI.fd"));
    expect(code.length).to.equal(MIB64);
    expect(code.subarray(0, 2048).equals(Buffer.alloc(2048, 0xbb))).to.equal(true);
    expect(isZero(code, 2048)).to.equal(true);
  });

  it("fails clearly when the firmware is missing, and writes nothing", async () => {
    const out = path.join(dir, "out");
    const missing = path.join(dir, "no-such-firmware.fd");
    const r = await runScript("build-efi.sh", [out], { env: { EFI_FIRMWARE: missing } });
    expect(r.code).to.not.equal(0);
    expect(r.stderr).to.contain("build-efi:");
    expect(r.stderr).to.contain(missing);
    expect(r.stderr).to.contain("not found");
    expect(fs.existsSync(out)).to.equal(false);
  });

  it("refuses firmware larger than 64 MiB", async () => {
    const fw = path.join(dir, "big.fd");
    fs.writeFileSync(fw, "");
    fs.truncateSync(fw, MIB64 + 1);
    const r = await runScript("build-efi.sh", [path.join(dir, "out")], { env: { EFI_FIRMWARE: fw } });
    expect(r.code).to.not.equal(0);
    expect(r.stderr).to.match(/larger than the 64 MiB/);
  });

  it("refuses to touch a variable store of the wrong size", async () => {
    fs.writeFileSync(path.join(dir, "QEMU_VARS.fd"), Buffer.alloc(4096, 1));
    const r = await runScript("build-efi.sh", [dir]);
    expect(r.code).to.not.equal(0);
    expect(r.stderr).to.match(/QEMU_VARS\.fd exists but is 4096 bytes/);
    expect(fs.readFileSync(path.join(dir, "QEMU_VARS.fd")).equals(Buffer.alloc(4096, 1))).to.equal(true);
  });

  it("fails with usage when OUT_DIR is missing", async () => {
    const r = await runScript("build-efi.sh", []);
    expect(r.code).to.not.equal(0);
    expect(r.stderr).to.match(/usage: build-efi\.sh OUT_DIR/);
  });
});
