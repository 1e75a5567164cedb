/**
 * The world the lifecycle test and `npm run demo` run the program in: a copy
 * of the repository (so a test can edit a guest script as a user would), the
 * stand-in aarch64 guest's disk as the "Windows image" (and variants of it
 * with other bytes), a small drivers ISO, the local target's config, and
 * fault shims put first on the commands' PATH.
 */
import * as fs from "fs";
import * as os from "os";
import * as path from "path";
import { makeDriversIso } from "../e2e/support";
import { ensureStandinGuest, StandinGuest } from "../fixtures/standin";
import { sha256File } from "../support/disk";
import { repoRoot, run, runOk } from "../support/run";
import { Engine, Executed, RunResult } from "./engine";

/** What the copy of the repository holds (the program, its scripts and config schema). */
const COPIED = ["infra", "provisioning", "assets", "Pulumi.yaml", "package.json", "tsconfig.json"];

export interface World {
  dir: string;
  root: string;
  guest: StandinGuest;
  drivers: { iso: string; sha256: string };
  engine: Engine;
  /** The local target's config for this world. */
  config(extra?: Record<string, string>): Record<string, string>;
  /** A Windows image stand-in: the guest's disk, re-encoded so its bytes (and SHA-256) differ. */
  image(variant: number): Promise<{ url: string; sha256: string }>;
  /** Arms a fault the shims inject once (see FAULTS). */
  arm(fault: keyof typeof FAULTS): void;
  /** Files under the world's work folder. */
  home: string;
}

/** Faults the PATH shims inject, each once, when armed. */
export const FAULTS = {
  /** The next qemu-img call fails: prepareDisk's (after the download it needs has finished). */
  convertFails: "qemu-img",
  /** renderEnv's write of the env file hangs (its stage's host-side bound must end it). */
  envWriteHangs: "mv",
} as const;

/** The fault shims (bin) and the folder where faults are armed (faults), fresh. */
export function makeShims(dir: string): { bin: string; faults: string } {
  const bin = path.join(dir, "shims");
  const faults = path.join(dir, "faults");
  fs.rmSync(faults, { recursive: true, force: true });
  fs.mkdirSync(faults, { recursive: true });
  writeShims(bin, faults);
  return { bin, faults };
}

function writeShims(bin: string, faults: string): void {
  fs.mkdirSync(bin, { recursive: true });
  const shim = (name: string, body: string) => {
    const real = `/usr/bin/${name}`;
    fs.writeFileSync(
      path.join(bin, name),
      ["#!/usr/bin/env bash", `# lifecycle fault shim for ${name}`, body, `exec ${real} "$@"`, ""].join("\n"),
      { mode: 0o755 },
    );
  };
  shim(
    "qemu-img",
    `if [[ -e ${faults}/convertFails ]]; then rm -f ${faults}/convertFails; echo "qemu-img: injected fault: cannot read the image" >&2; exit 1; fi`,
  );
  shim(
    "mv",
    `if [[ "$*" == *vm-build.env* && -e ${faults}/envWriteHangs ]]; then rm -f ${faults}/envWriteHangs; exec sleep 100000; fi`,
  );
}

export async function makeWorld(dir: string, opts: { verbose?: boolean } = {}): Promise<World> {
  fs.mkdirSync(dir, { recursive: true });
  const root = path.join(dir, "repo");
  fs.rmSync(root, { recursive: true, force: true });
  fs.mkdirSync(root, { recursive: true });
  for (const f of COPIED) fs.cpSync(path.join(repoRoot, f), path.join(root, f), { recursive: true });
  fs.symlinkSync(path.join(repoRoot, "node_modules"), path.join(root, "node_modules"));
  const guest = await ensureStandinGuest();
  const drivers = await makeDriversIso(dir);
  const { bin, faults } = makeShims(dir);
  const home = path.join(dir, "host");
  const engine = new Engine({
    root,
    keys: {
      // The stand-in authorizes its own test key for root: it plays the guest-only key.
      "guest-key": {
        privateKey: fs.readFileSync(guest.privateKey, "utf8"),
        publicKey: fs.readFileSync(guest.publicKey, "utf8").trim(),
      },
    },
    env: { PATH: `${bin}:${process.env.PATH}` },
    verbose: opts.verbose,
  });
  const images = new Map<number, { url: string; sha256: string }>();
  return {
    dir,
    root,
    guest,
    drivers,
    engine,
    home,
    config(extra = {}) {
      return {
        target: "local",
        localWorkDir: home,
        windowsImageUrl: `file://${guest.disk}`,
        windowsImageSha256: guest.digest,
        windowsVersion: "11-23h2",
        virtioIsoUrl: `file://${drivers.iso}`,
        virtioIsoSha256: drivers.sha256,
        guestAdminUser: "root",
        // The stand-in's disk is FAT with no Windows partition: the answer file reaches it on the
        // config ISO only (inject-answer-file.sh has its own tests against NTFS disks).
        answerFileInImage: "false",
        vmCpus: "2",
        vmMemoryGiB: "4",
        ...extra,
      };
    },
    async image(variant) {
      if (variant === 0) return { url: `file://${guest.disk}`, sha256: guest.digest };
      const have = images.get(variant);
      if (have) return have;
      // Same guest, other bytes: compressed clusters (and a cluster size per variant).
      const file = path.join(dir, `image-${variant}.qcow2`);
      await runOk(
        "qemu-img",
        ["convert", "-c", "-O", "qcow2", "-o", `cluster_size=${2 ** (15 + variant)}`, guest.disk, file],
        { timeoutMs: 120_000 },
      );
      const img = { url: `file://${file}`, sha256: sha256File(file) };
      images.set(variant, img);
      return img;
    },
    arm(fault) {
      fs.writeFileSync(path.join(faults, fault), "");
    },
  };
}

/** Leaves no VM of the world running (its build VM's pid file under the host's vm/). */
export async function stopWorldVm(world: World): Promise<void> {
  const pidFile = path.join(world.home, "vm", "qemu.pid");
  if (!fs.existsSync(pidFile)) return;
  const pid = Number(fs.readFileSync(pidFile, "utf8").trim());
  if (!pid) return;
  try {
    process.kill(pid, "SIGKILL");
  } catch {
    /* already gone */
  }
  await run("sleep", ["1"]);
}

/** The stage (component resource) names a run executed, short: "image-publish" -> "publish". */
export function stagesOf(r: RunResult): string[] {
  return r.executed.filter((e) => e.type.startsWith("command:")).map((e) => e.name);
}

export interface Row {
  scenario: string;
  result: RunResult;
}

/** The table printed after the runs: a row per run. */
export function table(rows: Row[]): string {
  const lines = [
    "| # | scenario | ok | commands run | seconds |",
    "|---|----------|----|--------------|---------|",
    ...rows.map((r, i) => {
      const cmds = r.result.executed.filter((e: Executed) => e.type.startsWith("command:"));
      const names = cmds.map((e) => `${e.name}${e.ok ? "" : " (failed)"}`);
      return `| ${i + 1} | ${r.scenario} | ${r.result.ok ? "yes" : "no"} | ${cmds.length}: ${names.join(", ") || "-"} | ${r.result.seconds.toFixed(0)} |`;
    }),
  ];
  return lines.join("\n");
}

export function tmpDir(prefix: string): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), prefix));
}
