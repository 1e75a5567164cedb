import { ChildProcess, spawn } from "child_process";
import * as crypto from "crypto";
import * as fs from "fs";

/** sha256 hex of a string or buffer. */
export function sha256(data: string | Buffer): string {
  return crypto.createHash("sha256").update(data).digest("hex");
}

/** sha256 hex of a file's content. */
export function sha256File(file: string): string {
  return sha256(fs.readFileSync(file));
}

/**
 * Whether some process holds QEMU's lock on FILE's "write" permission byte (offset 101, as
 * /proc/locks lists QEMU's OFD locks). Reading /proc/locks takes no lock itself: a probe with
 * `qemu-img info` would, and QEMU starting at that moment fails with "Failed to get "write" lock".
 */
function writeLocked(file: string): boolean {
  const st = fs.statSync(file);
  const major = (st.dev >> 8) & 0xfff;
  const minor = (st.dev & 0xff) | ((st.dev >> 12) & 0xfff00);
  const id = `${major.toString(16).padStart(2, "0")}:${minor.toString(16).padStart(2, "0")}:${st.ino}`;
  return fs
    .readFileSync("/proc/locks", "utf8")
    .split("\n")
    .map((line) => line.trim().split(/\s+/))
    .some((f) => f[1] === "OFDLCK" && f[5] === id && Number(f[6]) <= 101 && (f[7] === "EOF" || Number(f[7]) >= 101));
}

/** Starts a paused QEMU that holds the qcow2 FILE open (and locked) as its NVMe disk; resolves once it is locked. */
export async function holdDisk(file: string): Promise<ChildProcess> {
  const qemu = spawn(
    "qemu-system-aarch64",
    [
      ...["-M", "virt", "-cpu", "max", "-accel", "tcg", "-m", "256", "-S"],
      ...["-display", "none", "-monitor", "none", "-serial", "none", "-nic", "none"],
      ...["-drive", `file=${file},if=none,id=d,format=qcow2`, "-device", "nvme,drive=d,serial=held"],
    ],
    { stdio: ["ignore", "ignore", "pipe"] },
  );
  let stderr = "";
  qemu.stderr!.on("data", (d: Buffer) => (stderr += d.toString()));
  const exited = new Promise<void>((resolve) => qemu.once("exit", () => resolve()));
  // Two minutes at most: a QEMU start on a loaded machine can take many seconds.
  const deadline = Date.now() + 120_000;
  while (Date.now() < deadline) {
    if (qemu.exitCode !== null || qemu.signalCode !== null) {
      await new Promise((res) => setTimeout(res, 100)); // the rest of its stderr
      throw new Error(`qemu-system-aarch64 exited early (${qemu.exitCode ?? qemu.signalCode}): ${stderr.trim()}`);
    }
    if (writeLocked(file)) return qemu;
    await Promise.race([exited, new Promise((res) => setTimeout(res, 100))]);
  }
  qemu.kill("SIGKILL");
  throw new Error(`QEMU did not lock the disk within 120 s: ${stderr.trim()}`);
}

/** Kills a QEMU started by holdDisk and waits for it to exit. */
export async function stopQemu(qemu: ChildProcess): Promise<void> {
  if (qemu.exitCode !== null || qemu.signalCode !== null) return;
  await new Promise<void>((resolve) => {
    qemu.once("exit", () => resolve());
    qemu.kill("SIGKILL");
  });
}
