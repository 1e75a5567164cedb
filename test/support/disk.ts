import { ChildProcess, spawn } from "child_process";
import * as crypto from "crypto";
import * as fs from "fs";
import { run } from "./run";

/** sha256 hex of a string or buffer. */
export function sha256(data: string | Buffer): string {
  return crypto.createHash("sha256").update(data).digest("hex");
}

/** sha256 hex of a file's content. */
export function sha256File(file: string): string {
  return sha256(fs.readFileSync(file));
}

/** Starts a paused QEMU that holds the qcow2 FILE open (and locked) as its NVMe disk; resolves once it is locked. */
export async function holdDisk(file: string): Promise<ChildProcess> {
  // The probe (qemu-img info, which takes a read lock that refuses writers while it runs) can meet
  // QEMU's own start on a loaded machine: QEMU then exits with "Failed to get "write" lock".
  // That is the probe's doing, not another user of the disk: QEMU is started again.
  for (let attempt = 1; ; attempt++) {
    try {
      return await holdDiskOnce(file);
    } catch (e) {
      if (attempt >= 5 || !/Failed to get "write" lock/.test(String((e as Error).message))) throw e;
    }
  }
}

async function holdDiskOnce(file: string): Promise<ChildProcess> {
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
  const exited = () => qemu.exitCode !== null || qemu.signalCode !== null;
  // Wait until the lock is taken (qemu-img info without -U then fails): two minutes at most,
  // as a QEMU start on a loaded machine can take many seconds.
  const deadline = Date.now() + 120_000;
  while (Date.now() < deadline) {
    await new Promise((res) => setTimeout(res, 200));
    if (exited()) {
      await new Promise((res) => setTimeout(res, 100)); // the rest of its stderr
      throw new Error(`qemu-system-aarch64 exited early (${qemu.exitCode ?? qemu.signalCode}): ${stderr.trim()}`);
    }
    const r = await run("qemu-img", ["info", file]);
    if (r.code !== 0 && /lock/.test(r.stderr) && !exited()) return qemu;
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
