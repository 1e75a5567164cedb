/**
 * End-to-end test of the host pipeline against the stand-in aarch64 guest
 * (test/fixtures): the plan built from a local-target config is run stage by
 * stage, in plan order, the way the local target's components run it: the
 * files copied with LocalRunner's upload command, then each stage's
 * `hostCommand` (stage.sh-wrapped, runtime tokens resolved) with
 * `/bin/bash -c` and the stdin its component gives (the answer file, the env
 * file, the guest key + "\n" + the settings JSON). The guest stage is the
 * plan's real `guest-run.sh ... powershell -EncodedCommand ...`, which the
 * stand-in answers with standin-provision.sh as its /usr/bin/powershell.
 * Publishes to a local S3 (s3rver). Every stage's effect is checked.
 *
 * The lifecycle test (test/lifecycle) runs the whole program run after run
 * (no-change runs, edits, config changes, an injected failure and hang);
 * this file keeps to what needs the stages driven one by one:
 * - a stage that outlives its host-side bound (built with `bounded()`):
 *   exit 124, the message naming the stage, no process left;
 * - the guest's SSH session dropped during provisioning: guest-run.sh waits
 *   for the guest's SSH and retries, and provisioning finishes;
 * - QEMU killed during provisioning: guest-run.sh reports that the VM exited;
 *   a rerun of provisionGuest boots the VM again itself and finishes;
 * - a guest that never answers SSH: a bounded wait naming the cause, then
 *   the forced stop;
 * - S3 down at publish (from the start, or midway): the stage fails and the
 *   previous latest.json stays.
 * The main run also freezes the install as the base (a marker written at the
 * first boot, before baseImage, is in every image), and then runs what a
 * guest-script edit re-runs: a fresh overlay on the same base, so the second
 * image has none of the first provisioning's files.
 *
 * Writes the main run's stage timings to .cache/e2e-timings.md.
 */
import { expect } from "chai";
import * as fs from "fs";
import * as os from "os";
import * as path from "path";
import { DEFAULT_CONFIG_MEDIA_LABEL, DEFAULT_DRIVER_NAMES, renderAnswerFile } from "../../infra/answerFile";
import { parseConfig, StackConfig } from "../../infra/config";
import { MANIFEST_FILES, parseManifest, SOFTWARE_REPORT_FILE } from "../../infra/manifest";
import { guestProvisionCommand, guestSettings } from "../../infra/pipeline/guest";
import {
  baseDigest,
  baseParts,
  bounded,
  buildPlan,
  changedStages,
  driverFolder,
  GUEST_BOOT_TIMEOUT_S,
  GUEST_SHUTDOWN_TIMEOUT_S,
  HostLayout,
  Plan,
  RuntimeValues,
  shq,
  StageId,
} from "../../infra/pipeline/plan";
import { BUILD_VNC_DISPLAY, renderVmEnv } from "../../infra/pipeline/vmEnv";
import {
  ensureStandinGuest,
  POWEROFF_LINE,
  readFileFromDisk,
  READY_LINE,
  ssh,
  StandinGuest,
} from "../fixtures/standin";
import { readPid, repoRoot, run, RunResult } from "../support/run";
import {
  freePortPair,
  isQemu,
  killVm,
  localRawConfig,
  makeDriversIso,
  PipelineDriver,
  portFree,
  processesMatching,
  repoFileHashes,
  RestartableS3,
  sha256,
  sha256File,
  stageEnv,
  StageResult,
  Timing,
  timingTable,
} from "./support";

const BUCKET = "e2e-artifacts";
const BUILD_UNIT = "windows-vm-build-e2e";
/** The local plan's stages, in the order they run (no host wake, idle guard, stop or bake). */
const LOCAL_ORDER: StageId[] = [
  "uploadFiles",
  "firmware",
  "fetchImage",
  "fetchDrivers",
  "prepareDisk",
  "configMedia",
  "renderEnv",
  "startVm",
  "waitGuest",
  "baseImage",
  "overlayDisk",
  "provisionGuest",
  "stopVm",
  "publish",
];
/** What a guest-script edit re-runs: the config media and one provisioning run from the base, no install. */
const GUEST_SCRIPT_EDIT: StageId[] = [
  "uploadFiles",
  "configMedia",
  "overlayDisk",
  "provisionGuest",
  "stopVm",
  "publish",
];
/** Stages before the VM boots (quick with the stand-in image). */
const PREPARE: StageId[] = ["firmware", "fetchImage", "fetchDrivers", "prepareDisk", "configMedia", "renderEnv"];
const MIB64 = 64 * 1024 * 1024;
/** What standin-provision.sh prints on stdout when it has finished. */
const PROVISIONED = "standin-provision: provisioned root\n";
/** What it prints on stderr before it sleeps (STANDIN_PROVISION_SLEEP_S). */
const SLEEPING = "standin-provision: sleeping";

interface Pipeline {
  dir: string;
  layout: HostLayout;
  config: StackConfig;
  plan: Plan;
  driver: PipelineDriver;
  answer: string;
  password: string;
  artifactUri: string;
  prefix: string;
}

/**
 * Run in the stand-in guest (busybox sh, before provisionGuest): wraps its
 * /usr/bin/powershell (standin-provision.sh) so that the first provisioning
 * of this boot sleeps 120 s after its start marker, and records the
 * provisioning's pid. The guest's root is its initramfs: a reboot restores
 * the plain stand-in.
 */
const SLOW_ONCE = `set -e
[ -e /usr/bin/powershell.standin ] || mv /usr/bin/powershell /usr/bin/powershell.standin
cat > /usr/bin/powershell <<'EOF'
#!/bin/sh
echo $$ > /tmp/e2e-provision.pid
if [ ! -e /tmp/e2e-slow-once ]; then
  : > /tmp/e2e-slow-once
  STANDIN_PROVISION_SLEEP_S=120
  export STANDIN_PROVISION_SLEEP_S
fi
exec /usr/bin/powershell.standin "$@"
EOF
chmod 0755 /usr/bin/powershell
`;

/**
 * Run in the stand-in guest while the provisioning sleeps: SIGKILLs the
 * dropbear process serving its SSH session (found by walking up from the
 * provisioning's pid) and the provisioning itself, so the pipeline's SSH
 * connection drops without an exit status, as when Windows restarts sshd.
 */
const DROP_SESSION = `p=$(cat /tmp/e2e-provision.pid)
s=$p
while [ "$s" -gt 1 ] && [ "$(cat /proc/$s/comm)" != dropbear ]; do s=$(cut -d' ' -f4 /proc/$s/stat); done
if [ "$(cat /proc/$s/comm 2>/dev/null)" != dropbear ] || [ "$s" = "$(cat /run/dropbear.pid)" ]; then
  echo "e2e: no dropbear session above the provisioning (pid $p)" >&2
  exit 1
fi
kill -9 "$s" "$p"
echo "e2e: killed the dropbear session $s of the provisioning (pid $p)"
`;

/** The SHA-256 publish gives DISK: that of its flattened copy (`qemu-img convert -O qcow2` is deterministic). */
async function flattenedSha(disk: string, scratch: string): Promise<string> {
  const flat = path.join(scratch, `flattened-${process.pid}.qcow2`);
  try {
    const r = await run("qemu-img", ["convert", "-O", "qcow2", disk, flat]);
    expect(r.code, r.stderr).to.equal(0);
    return sha256File(flat);
  } finally {
    fs.rmSync(flat, { force: true });
  }
}

describe("pipeline end to end (stand-in guest, TCG)", function () {
  let guest: StandinGuest;
  let work: string;
  let s3: RestartableS3;
  let drivers: { iso: string; sha256: string };
  const layouts: HostLayout[] = [];
  const timings: { main?: Timing[] } = {};

  before(async function () {
    this.timeout(15 * 60 * 1000);
    guest = await ensureStandinGuest();
    work = fs.mkdtempSync(path.join(os.tmpdir(), "e2e-"));
    drivers = await makeDriversIso(work);
    s3 = await RestartableS3.create(path.join(work, "s3"), BUCKET);
  });

  afterEach(async function () {
    this.timeout(60_000);
    // Leave no VM (and no screen keeper of one) behind, whatever happened.
    for (const L of layouts.splice(0)) {
      if (await killVm(L.vmDir)) console.log(`      (cleanup: killed the QEMU of ${L.vmDir})`);
      const keeper = path.join(L.home, "provisioning", "screen-keeper.sh");
      if (fs.existsSync(path.join(L.vmDir, "screens", "screen-keeper.pid")) && fs.existsSync(keeper)) {
        await run("bash", [keeper, "stop", path.join(L.vmDir, "qmp.sock"), path.join(L.vmDir, "screens")], {
          timeoutMs: 40_000,
        });
      }
    }
    if (s3 && !s3.running) await s3.start();
  });

  after(async function () {
    this.timeout(30_000);
    if (timings.main) {
      const date = new Date().toISOString().slice(0, 10);
      const table = timingTable(
        `Stage wall times, stand-in guest under TCG on ${os.cpus().length} cores (${date})`,
        timings.main,
      );
      console.log("\n" + table.replace(/^/gm, "    "));
      fs.mkdirSync(path.join(repoRoot, ".cache"), { recursive: true });
      fs.writeFileSync(path.join(repoRoot, ".cache", "e2e-timings.md"), table);
    }
    await s3?.stop();
    if (work) fs.rmSync(work, { recursive: true, force: true });
  });

  /** A fresh pipeline in work/NAME: config, layout, plan, and a driver for its stages. */
  async function pipeline(name: string, prefix = "windows-arm64/"): Promise<Pipeline> {
    const dir = path.join(work, name);
    fs.mkdirSync(dir, { recursive: true });
    const layout: HostLayout = {
      home: path.join(dir, "home"),
      vmDir: path.join(dir, "vm"),
      sudo: "",
      imageRoot: path.join(dir, "image-root"),
      buildUnit: BUILD_UNIT,
      stageRunDir: path.join(dir, "run", "stages"),
      stageStateDir: path.join(dir, "state"),
      sshPort: await freePortPair(),
      accel: "tcg",
    };
    const artifactUri = `s3://${BUCKET}/${prefix}`;
    const config = parseConfig(localRawConfig({ guest, driversIso: drivers, artifactUri, endpointUrl: s3.endpoint }));
    const plan = buildPlan({ config, layout, fileHashes: repoFileHashes() });
    // The stand-in authorizes its test key for root: it plays the guest-only key.
    const guestPublicKey = fs.readFileSync(guest.publicKey, "utf8").trim();
    const password = `Pw-${Math.random().toString(36).slice(2, 12)}-e2e`;
    const answer = renderAnswerFile({
      sourceKind: config.image.format,
      adminUser: config.guest.adminUser,
      adminPassword: password,
      locale: config.guest.locale,
      timeZone: config.guest.timeZone,
      keepAutoLogon: config.guest.autoLogon,
      authorizedKey: guestPublicKey,
      driverFolder: driverFolder(config),
      driverNames: [...DEFAULT_DRIVER_NAMES],
      configMediaLabel: DEFAULT_CONFIG_MEDIA_LABEL,
    });
    const settings = JSON.stringify(guestSettings(config, password));
    // As infra/index.ts gives them for the local target.
    const runtime: RuntimeValues = {
      hostId: "local",
      artifactUri,
      guestKey: guestPublicKey,
      answerFile: sha256(answer),
      guestSettings: sha256(settings),
    };
    const inputs = {
      buildEnv: renderVmEnv(config, layout, "build"),
      answerFile: answer,
      guestPrivateKey: fs.readFileSync(guest.privateKey, "utf8"),
      settings,
    };
    layouts.push(layout);
    const driver = new PipelineDriver(plan, runtime, inputs, stageEnv(s3.directory, s3.endpoint));
    return { dir, layout, config, plan, driver, answer, password, artifactUri, prefix };
  }

  async function upload(p: Pipeline): Promise<StageResult> {
    const r = await p.driver.upload();
    expect(r.code, r.stderr).to.equal(0);
    return r;
  }

  async function prepareHost(p: Pipeline): Promise<void> {
    await upload(p);
    for (const id of PREPARE) await p.driver.mustHost(id, { timeoutMs: 400_000 });
  }

  /** The build VM's env names VNC display 3: no other VM on this machine may hold it. */
  async function expectVncFree(): Promise<void> {
    const vncPort = 5900 + BUILD_VNC_DISPLAY;
    expect(
      await portFree(vncPort),
      `port ${vncPort} (VNC display ${BUILD_VNC_DISPLAY} of the build VM's env) is in use: another VM is running`,
    ).to.equal(true);
  }

  async function startVm(p: Pipeline, label?: string): Promise<StageResult> {
    await expectVncFree();
    const r = await p.driver.mustHost("startVm", { timeoutMs: 300_000, label });
    expect(r.stdout).to.match(/^start-vm: VM started \(QEMU pid \d+/);
    expect(qemuPid(p), "no live QEMU in vm/qemu.pid after startVm").to.be.a("number");
    return r;
  }

  async function waitGuest(p: Pipeline, label?: string): Promise<StageResult> {
    const r = await p.driver.mustHost("waitGuest", { timeoutMs: 600_000, label });
    expect(r.stdout.trim()).to.match(/^SSH-2\.0-dropbear/);
    return r;
  }

  /** After the install's waitGuest: the base frozen, a fresh overlay on it booted until its SSH answers. */
  async function toOverlay(p: Pipeline): Promise<void> {
    await p.driver.mustHost("baseImage", { timeoutMs: 400_000 });
    await expectVncFree();
    const r = await p.driver.mustHost("overlayDisk", { timeoutMs: 600_000 });
    expect(r.stdout).to.match(/^start-vm: VM started \(QEMU pid \d+/m);
  }

  async function stopVm(p: Pipeline, label?: string): Promise<StageResult> {
    const r = await p.driver.mustHost("stopVm", { timeoutMs: 400_000, label });
    expect(r.stdout, "stop-vm must report a graceful power-off").to.match(
      /^stop-vm: powered off gracefully after \d+s$/m,
    );
    expect(qemuPid(p), "QEMU still running after stopVm").to.equal(undefined);
    return r;
  }

  /** Writes LINE (no quotes in it) to FILE on the running stand-in guest's own disk (/disk), synced. */
  async function mark(p: Pipeline, file: string, line: string): Promise<void> {
    const r = await inGuest(p, `echo '${line}' > /disk/${file} && sync`);
    expect(r.code, `writing /disk/${file} in the guest: ${r.stderr}`).to.equal(0);
  }

  /** The backing file a qcow2 names (undefined when it is self-contained). */
  async function backingFile(qcow2: string): Promise<string | undefined> {
    const r = await run("qemu-img", ["info", "--output=json", "-U", qcow2]);
    expect(r.code, r.stderr).to.equal(0);
    return (JSON.parse(r.stdout) as { "backing-filename"?: string })["backing-filename"];
  }

  /** The live QEMU of the pipeline's VM, if any. */
  function qemuPid(p: Pipeline): number | undefined {
    const pid = readPid(path.join(p.layout.vmDir, "qemu.pid"));
    return pid !== undefined && isQemu(pid) ? pid : undefined;
  }

  /** Runs a shell script in the running stand-in guest, as root with the test key. */
  async function inGuest(p: Pipeline, script: string): Promise<RunResult> {
    return ssh(guest, p.layout.sshPort, "sh -s", script, 60_000);
  }

  /** Makes the next provisioning of this boot sleep halfway (see SLOW_ONCE). */
  async function slowGuestOnce(p: Pipeline): Promise<void> {
    const r = await inGuest(p, SLOW_ONCE);
    expect(r.code, `installing the slow wrapper in the guest: ${r.stderr}`).to.equal(0);
  }

  /** Calls `action` once, when the output seen so far holds `text`. */
  function onceSeen(text: string, action: () => void): (chunk: string) => void {
    let seen = "";
    let done = false;
    return (chunk) => {
      if (done) return;
      seen += chunk;
      if (seen.includes(text)) {
        done = true;
        action();
      }
    };
  }

  async function extractIso(iso: string, dest: string): Promise<void> {
    const r = await run("xorriso", ["-osirrox", "on", "-indev", iso, "-extract", "/", dest], { timeoutMs: 300_000 });
    expect(r.code, r.stderr).to.equal(0);
  }

  /** Files under dir (recursively) whose content holds `needle`. */
  function filesHolding(dir: string, needle: string, skip: string[] = []): string[] {
    const hits: string[] = [];
    const walk = (d: string) => {
      for (const e of fs.readdirSync(d, { withFileTypes: true })) {
        const f = path.join(d, e.name);
        if (skip.includes(f)) continue;
        if (e.isDirectory()) walk(f);
        else if (e.isFile() && fs.readFileSync(f).includes(needle)) hits.push(f);
      }
    };
    if (fs.existsSync(dir)) walk(dir);
    return hits;
  }

  it("runs every host stage of the local plan in plan order, each its stage.sh-wrapped hostCommand", async function () {
    this.timeout(12 * 60 * 1000);
    const p = await pipeline("main");
    const { layout: L, driver } = p;
    const vm = L.vmDir;

    // The plan: local target, no host wake, idle guard, host stop or bake.
    expect(p.plan.stages.map((s) => s.id)).to.deep.equal(LOCAL_ORDER);
    for (const s of p.plan.stages) {
      for (const d of [...s.dependsOn, ...s.after]) {
        expect(LOCAL_ORDER.indexOf(d), `${s.id} runs after ${d}`).to.be.below(LOCAL_ORDER.indexOf(s.id));
      }
      if (s.id === "uploadFiles") continue;
      // What the runner runs is the inner command through stage.sh with the stage's bound.
      expect(s.hostCommand, s.id).to.equal(bounded(L, s.id, s.timeoutMinutes, s.waitsFor, s.command ?? ""));
    }
    expect(p.plan.stage("publish").command).to.include(`S3_ENDPOINT_URL=${s3.endpoint}`);
    // The guest stage runs the real Windows command; the stand-in answers it.
    expect(p.plan.stage("provisionGuest").command).to.include(shq(guestProvisionCommand()));

    const outputs: Partial<Record<StageId, StageResult>> = {};
    for (const stage of p.plan.stages) {
      switch (stage.id) {
        case "uploadFiles":
          outputs.uploadFiles = await upload(p);
          continue;
        case "startVm":
          outputs.startVm = await startVm(p);
          continue;
        case "waitGuest":
          outputs.waitGuest = await waitGuest(p);
          // The stand-in's "first logon": a marker written on the install disk before it is frozen.
          await mark(p, "firstboot.txt", "first boot");
          continue;
        case "provisionGuest":
          outputs.provisionGuest = await driver.mustHost("provisionGuest", { timeoutMs: 600_000 });
          // A step of provisioning run 1 that a later version of the guest scripts no longer has.
          await mark(p, "run1.txt", "run 1");
          continue;
        case "stopVm":
          outputs.stopVm = await stopVm(p);
          continue;
        default:
          outputs[stage.id] = await driver.mustHost(stage.id, { timeoutMs: 600_000 });
      }
    }

    // Every bounded stage ran through stage.sh: its start and done lines.
    for (const id of LOCAL_ORDER.slice(1)) {
      const err = outputs[id]?.stderr ?? "";
      const bound = p.plan.stage(id).timeoutMinutes;
      expect(err, `${id} stderr`).to.include(`stage ${id}: start (bound ${bound} min)`);
      expect(err, `${id} stderr`).to.match(new RegExp(`^stage ${id}: done in \\d+\\.\\d s$`, "m"));
    }
    // No stage marker left for the idle guard; the last activity is the last stage.
    expect(fs.readdirSync(L.stageRunDir), "stage markers left").to.deep.equal([]);
    expect(fs.readFileSync(path.join(L.stageStateDir, "last-activity"), "utf8").split("\n")[0]).to.equal("publish");

    // uploadFiles: every host file, byte for byte (as the plan hashed it), 0644.
    const uploadStage = p.plan.stage("uploadFiles");
    for (const f of uploadStage.files) {
      const copy = path.join(L.home, f);
      expect(sha256File(copy), f).to.equal(uploadStage.inputs[`file:${f}`]);
      expect(fs.statSync(copy).mode & 0o777, f).to.equal(0o644);
    }
    // firmware: the 64 MiB pflash pair.
    expect(fs.statSync(path.join(vm, "QEMU_EFI.fd")).size).to.equal(MIB64);
    expect(fs.statSync(path.join(vm, "QEMU_VARS.fd")).size).to.equal(MIB64);
    // fetchImage / fetchDrivers: verified copies.
    expect(sha256File(path.join(vm, "source.qcow2"))).to.equal(guest.digest);
    expect(sha256File(path.join(vm, "virtio-win.iso"))).to.equal(drivers.sha256);
    // configMedia: the ISO holds exactly what was fed, the guest key, the marker and the guest scripts.
    const iso = path.join(vm, "config.iso");
    expect(fs.statSync(iso).mode & 0o077, "config.iso holds the password: mode 0600").to.equal(0);
    expect(fs.existsSync(path.join(vm, "config")), "the staged answer file is removed").to.equal(false);
    const isoDir = path.join(p.dir, "iso");
    await extractIso(iso, isoDir);
    expect(fs.readFileSync(path.join(isoDir, "autounattend.xml"), "utf8")).to.equal(p.answer);
    expect(fs.readFileSync(path.join(isoDir, "authorized_keys"), "utf8")).to.equal(`${driver.runtime.guestKey}\n`);
    for (const f of ["windows-arm64-image.marker", "firstlogon.ps1", "provision.ps1", "check.ps1", "common.psm1"]) {
      expect(fs.existsSync(path.join(isoDir, f)), `${f} on the config ISO`).to.equal(true);
    }
    // renderEnv: the env file is the rendered one.
    expect(fs.readFileSync(path.join(vm, "vm-build.env"), "utf8")).to.equal(driver.inputs.buildEnv);
    // startVm: no systemd here, so the background launcher with its log.
    expect(outputs.startVm?.stderr).to.include(`log: ${vm}/run-vm.log`);
    const serial = fs.readFileSync(path.join(vm, "serial.log"), "latin1");
    expect(serial).to.include(READY_LINE);
    expect(serial).to.include(POWEROFF_LINE);
    // provisionGuest: guest-run.sh found the VM running and ran the guest command once.
    expect(outputs.provisionGuest?.stdout).to.equal(PROVISIONED);
    expect(outputs.provisionGuest?.stderr).to.match(/^guest-run: the build VM runs \(QEMU pid \d+\)$/m);
    expect(outputs.provisionGuest?.stderr).to.include("guest-run: the guest command succeeded (attempt 1/3)");
    // Secrets: the password and the guest's private key show in no output and in no file left
    // behind (the password only on the config ISO, which is made for it).
    const keyLine = driver.inputs.guestPrivateKey.split("\n")[1];
    expect(keyLine).to.match(/^[A-Za-z0-9+/=]{40,}$/);
    for (const r of Object.values(outputs)) {
      expect(`${r?.stdout}${r?.stderr}`, `${r?.id} output`).to.not.include(p.password);
      expect(`${r?.stdout}${r?.stderr}`, `${r?.id} output`).to.not.include(keyLine);
    }
    expect(filesHolding(p.dir, keyLine), "files holding the guest's private key").to.deep.equal([]);
    expect(filesHolding(p.dir, p.password, [iso, isoDir]), "files holding the password").to.deep.equal([]);
    // stopVm: the marker survived the shutdown, on the host's disk.
    expect(await readFileFromDisk(path.join(vm, "disk.qcow2"), "provisioned.txt", p.dir)).to.equal("root\n");
    // baseImage: the install disk, renamed to the one base its key names, read-only, holding the first boot only.
    const baseName = `base-${baseDigest(baseParts(p.config, L, repoFileHashes()), driver.runtime.answerFile)}.qcow2`;
    expect(fs.readdirSync(vm).filter((n) => n.startsWith("base-") || n === "install.qcow2")).to.have.members([
      baseName,
      baseName.replace(/\.qcow2$/, ".vars.fd"),
      baseName.replace(/\.qcow2$/, ".json"),
    ]);
    expect(outputs.baseImage?.stdout).to.match(/^stop-vm: powered off gracefully after \d+s$/m);
    expect(outputs.baseImage?.stdout).to.include(`base-image: ${baseName.replace(/\.qcow2$/, "")} frozen`);
    expect(fs.statSync(path.join(vm, baseName)).mode & 0o222, "the base is read-only").to.equal(0);
    expect(await readFileFromDisk(path.join(vm, baseName), "firstboot.txt", p.dir)).to.equal("first boot\n");
    expect(await readFileFromDisk(path.join(vm, baseName), "provisioned.txt", p.dir)).to.equal(undefined);
    // overlayDisk: disk.qcow2 is an overlay on it, booted; provisioning claimed it and wrote on it only.
    expect(await backingFile(path.join(vm, "disk.qcow2"))).to.equal(baseName);
    expect(outputs.overlayDisk?.stdout).to.include(`base-image: fresh overlay disk.qcow2 on ${baseName}`);
    expect(outputs.overlayDisk?.stdout).to.match(/^start-vm: VM started \(QEMU pid \d+/m);
    expect(outputs.provisionGuest?.stderr).to.include(`base-image: disk.qcow2 is a fresh overlay on ${baseName}`);
    expect(await readFileFromDisk(path.join(vm, "disk.qcow2"), "firstboot.txt", p.dir)).to.equal("first boot\n");
    expect(await readFileFromDisk(path.join(vm, "disk.qcow2"), "run1.txt", p.dir)).to.equal("run 1\n");
    const baseSha = sha256File(path.join(vm, baseName));

    // publish: the manifest on stdout (as the component parses it); the objects are the VM's files,
    // the disk flattened (qemu-img convert -O qcow2 of the VM's disk: the same bytes, the same SHA-256).
    const manifest = parseManifest(outputs.publish?.stdout ?? "");
    const localSha = await flattenedSha(path.join(vm, "disk.qcow2"), p.dir);
    const base = `${p.artifactUri}${localSha}/`;
    expect(manifest).to.include({
      manifestVersion: 2,
      sha256: localSha,
      format: "qcow2",
      compression: "none",
      imageUri: `${base}disk.qcow2`,
      manifestUri: `${base}manifest.json`,
      sourceUrl: p.config.image.url,
      sourceSha256: guest.digest,
      windowsVersion: "11-23h2",
    });
    expect(manifest.files.map((f) => [f.name, f.uri, f.sha256])).to.deep.equal(
      MANIFEST_FILES.map((n) => [n, `${base}${n}`, n === "disk.qcow2" ? localSha : sha256File(path.join(vm, n))]),
    );
    // The stand-in's software report came back from the guest command and was published with the image.
    const report = path.join(vm, SOFTWARE_REPORT_FILE);
    expect(manifest.softwareReport).to.deep.equal({
      name: SOFTWARE_REPORT_FILE,
      uri: `${base}${SOFTWARE_REPORT_FILE}`,
      sha256: sha256File(report),
      size: fs.statSync(report).size,
    });
    expect(JSON.parse((await s3.text(`${p.prefix}${localSha}/${SOFTWARE_REPORT_FILE}`)) ?? "null")).to.deep.include({
      settings: [
        { step: "create-builder-user", setting: "builderUser", expected: "root", actual: "root", result: "PASS" },
      ],
    });
    expect(manifest.machine).to.include({ cpus: 2, memoryGiB: 4, accel: "tcg", machineOptions: "" });
    const downloaded = path.join(p.dir, "published.qcow2");
    expect(await s3.download(`${p.prefix}${localSha}/disk.qcow2`, downloaded), "download published disk").to.equal(
      true,
    );
    expect(sha256File(downloaded), "sha256 of the published object").to.equal(manifest.sha256);
    expect(await readFileFromDisk(downloaded, "provisioned.txt", p.dir)).to.equal("root\n");
    // The first boot's marker is in the published image (the base under the provisioning).
    expect(await readFileFromDisk(downloaded, "firstboot.txt", p.dir)).to.equal("first boot\n");
    expect(await backingFile(downloaded), "the published image is self-contained").to.equal(undefined);
    const latest = JSON.parse((await s3.text(`${p.prefix}latest.json`)) ?? "null") as unknown;
    expect(latest).to.deep.equal(JSON.parse(outputs.publish?.stdout ?? ""));
    expect(await s3.keys(p.prefix)).to.deep.equal(
      [...MANIFEST_FILES, "manifest.json", SOFTWARE_REPORT_FILE]
        .map((n) => `${p.prefix}${localSha}/${n}`)
        .concat(`${p.prefix}latest.json`)
        .sort(),
    );

    timings.main = driver.timings.slice();

    // A guest-script edit (provision.ps1's hash, as the plan sees an edit; the stand-in runs its own
    // provisioning): the plan re-runs the config media and one provisioning run from the base only.
    const edited = buildPlan({
      config: p.config,
      layout: L,
      fileHashes: { ...repoFileHashes(), "provisioning/windows/provision.ps1": "edited" },
    });
    const rerun = changedStages(p.plan, edited);
    expect(rerun).to.deep.equal(GUEST_SCRIPT_EDIT);
    const again = new PipelineDriver(edited, driver.runtime, driver.inputs, driver.env);
    const run2: Partial<Record<StageId, StageResult>> = {};
    await expectVncFree();
    for (const id of rerun) {
      const label = `${id} (guest-script edit)`;
      run2[id] =
        id === "uploadFiles" ? await again.upload({ label }) : await again.mustHost(id, { timeoutMs: 600_000, label });
    }
    expect(run2.overlayDisk?.stdout).to.include(`base-image: fresh overlay disk.qcow2 on ${baseName}`);
    expect(run2.provisionGuest?.stdout).to.include(PROVISIONED);
    expect(run2.provisionGuest?.stderr).to.include("is a fresh overlay on");
    expect(sha256File(path.join(vm, baseName)), "the base is untouched by run 2").to.equal(baseSha);
    const manifest2 = parseManifest(run2.publish?.stdout ?? "");
    expect(manifest2.sha256).to.not.equal(manifest.sha256);
    const downloaded2 = path.join(p.dir, "published-2.qcow2");
    expect(await s3.download(`${p.prefix}${manifest2.sha256}/disk.qcow2`, downloaded2)).to.equal(true);
    expect(sha256File(downloaded2)).to.equal(manifest2.sha256);
    // Image 2 = the base + run 2: the first boot's marker and run 2's provisioning, none of run 1's.
    expect(await readFileFromDisk(downloaded2, "firstboot.txt", p.dir)).to.equal("first boot\n");
    expect(await readFileFromDisk(downloaded2, "provisioned.txt", p.dir)).to.equal("root\n");
    expect(await readFileFromDisk(downloaded2, "run1.txt", p.dir), "run 1's marker in image 2").to.equal(undefined);
    timings.main.push(...again.timings);
  });

  it("a stage that outlives its host-side bound: exit 124, the message naming the stage, no process left", async function () {
    this.timeout(4 * 60 * 1000);
    const p = await pipeline("bound");
    const L = p.layout;
    await upload(p);
    const stage = p.plan.stage("fetchImage");
    // Unique sleep lengths, so the processes can be found afterwards.
    const tag = `${process.pid}${Date.now() % 1_000_000}`;
    const hang = `sleep 987.${tag} & (sleep 988.${tag}; echo never) & sleep 989.${tag}; echo never`;
    const boundMinutes = 3 / 60;
    const r = await p.driver.runHost("fetchImage", {
      timeoutMs: 300_000,
      boundMinutes,
      edit: (c) => {
        expect(c).to.equal(stage.command);
        return hang;
      },
    });
    expect(r.command).to.equal(bounded(L, "fetchImage", boundMinutes, stage.waitsFor, hang));
    expect(r.stderr, "not stopped by the harness").to.not.include("(e2e: the harness stopped");
    expect(r.code, r.stderr).to.equal(124);
    expect(r.stderr).to.include("stage fetchImage: start (bound 0.05 min)");
    expect(r.stderr).to.include(
      "stage fetchImage: timed out after 0.05 min (host-side bound) waiting for the Windows image download",
    );
    expect(r.stdout, "the command did not get past its sleep").to.not.include("never");
    expect(processesMatching(`.${tag}`), "processes of the stage left").to.deep.equal([]);
    expect(fs.readdirSync(L.stageRunDir), "stage marker left").to.deep.equal([]);
    expect(fs.readFileSync(path.join(L.stageStateDir, "last-activity"), "utf8").split("\n")[0]).to.equal("fetchImage");
  });

  it("fault: the guest's SSH session dropped during provisioning: guest-run.sh waits for SSH, retries and finishes", async function () {
    this.timeout(10 * 60 * 1000);
    const p = await pipeline("dropped");
    await prepareHost(p);
    await startVm(p);
    await waitGuest(p);
    await toOverlay(p);
    const pid = qemuPid(p);
    await slowGuestOnce(p);

    let drop: Promise<RunResult> | undefined;
    const r = await p.driver.runHost("provisionGuest", {
      timeoutMs: 600_000,
      onOutput: onceSeen(SLEEPING, () => (drop = inGuest(p, DROP_SESSION))),
    });
    expect(drop, `the session was not dropped; provisioning output:\n${r.stderr}`).to.not.equal(undefined);
    const dropped = await (drop as Promise<RunResult>);
    expect(dropped.code, dropped.stderr).to.equal(0);
    expect(dropped.stdout).to.match(/^e2e: killed the dropbear session \d+ of the provisioning \(pid \d+\)$/m);

    expect(r.code, r.stderr).to.equal(0);
    expect(r.stderr).to.include(
      "guest-run: attempt 1/3: the SSH connection to the guest was refused or lost (exit 255); waiting for its SSH again",
    );
    expect(r.stderr).to.include("guest-run: attempt 2/3: running the guest command as root@127.0.0.1:");
    expect(r.stderr).to.include("guest-run: the guest command succeeded (attempt 2/3)");
    expect(r.stderr).to.include("stage provisionGuest: done in");
    // The second attempt finished the provisioning, in the same VM.
    expect(r.stdout).to.equal(PROVISIONED);
    expect(r.stderr, "the VM was not restarted").to.not.include("starting it");
    expect(qemuPid(p)).to.equal(pid);
    const onDisk = await inGuest(p, "cat /disk/provision-started.txt /disk/provisioned.txt");
    expect(onDisk.code, onDisk.stderr).to.equal(0);
    expect(onDisk.stdout).to.equal("started root\nroot\n");
    // The pipeline goes on as after any provisioning.
    await stopVm(p);
  });

  it("fault: QEMU killed during provisioning: guest-run.sh reports the VM exited; a rerun boots the VM itself and finishes", async function () {
    this.timeout(12 * 60 * 1000);
    const p = await pipeline("killed");
    const vm = p.layout.vmDir;
    await prepareHost(p);
    await startVm(p);
    await waitGuest(p);
    await toOverlay(p);
    await slowGuestOnce(p);

    let killed: number | undefined;
    const failed = await p.driver.runHost("provisionGuest", {
      timeoutMs: 600_000,
      onOutput: onceSeen(SLEEPING, () => {
        killed = qemuPid(p);
        if (killed !== undefined) process.kill(killed, "SIGKILL");
      }),
    });
    expect(killed, `QEMU was not killed; provisioning output:\n${failed.stderr}`).to.be.a("number");
    expect(failed.code, failed.stderr).to.equal(3);
    expect(failed.stdout, "the provisioning did not finish").to.equal("");
    expect(failed.stderr).to.include(
      `guest-run: the VM exited while the guest command ran (no live QEMU in ${vm}/qemu.pid); the next run starts it again`,
    );
    expect(failed.stderr).to.include("stage provisionGuest: failed with exit code 3");

    // The disk shows provisioning started but did not finish.
    const disk = path.join(vm, "disk.qcow2");
    expect(await readFileFromDisk(disk, "provision-started.txt", p.dir)).to.equal("started root\n");
    expect(await readFileFromDisk(disk, "provisioned.txt", p.dir)).to.equal(undefined);

    // The rerun of the same stage (nothing before it) boots the VM, waits for it and provisions.
    await expectVncFree();
    const done = await p.driver.mustHost("provisionGuest", { timeoutMs: 300_000, label: "provisionGuest (rerun)" });
    // The claim replaces the overlay the killed run used: the rerun provisions from the base.
    expect(done.stderr).to.include("an earlier provisioning used it): making a fresh one");
    expect(done.stderr).to.include("base-image: fresh overlay disk.qcow2 on base-");
    expect(done.stderr).to.include(
      `guest-run: the build VM is not running (no live QEMU in ${vm}/qemu.pid): starting it`,
    );
    const restarted = /start-vm: VM started \(QEMU pid (\d+)/.exec(done.stderr);
    expect(restarted, done.stderr).to.not.equal(null);
    expect(Number(restarted?.[1])).to.not.equal(killed);
    expect(done.stderr).to.match(/^wait-for-guest: guest SSH answered on 127\.0\.0\.1:\d+ after \d+s$/m);
    expect(done.stderr).to.include("guest-run: the guest command succeeded (attempt 1/3)");
    expect(done.stdout).to.equal(PROVISIONED);
    expect(qemuPid(p), "the VM guest-run.sh started keeps running").to.equal(Number(restarted?.[1]));
    await stopVm(p, "stopVm (rerun)");
    expect(await readFileFromDisk(disk, "provisioned.txt", p.dir)).to.equal("root\n");
  });

  it("fault: a guest that never answers SSH fails waitGuest in bounded time naming host:port, and stop forces it off", async function () {
    this.timeout(6 * 60 * 1000);
    const p = await pipeline("silent");
    const vm = p.layout.vmDir;
    await prepareHost(p);
    // An install disk with nothing to boot: the firmware sits in its boot menu, like a Windows stuck before SSH.
    fs.rmSync(path.join(vm, "install.qcow2"));
    const mk = await run("qemu-img", ["create", "-q", "-f", "qcow2", path.join(vm, "install.qcow2"), "64M"]);
    expect(mk.code, mk.stderr).to.equal(0);
    await startVm(p);

    // The script's own timeout shortened; the stage keeps its bound (bounded() as buildPlan wraps it).
    const boot = ` ${GUEST_BOOT_TIMEOUT_S}`;
    const wait = await p.driver.runHost("waitGuest", {
      timeoutMs: 300_000,
      edit: (c) => {
        expect(c.endsWith(boot), `waitGuest command ends with its timeout: ${c}`).to.equal(true);
        return c.slice(0, -boot.length) + " 12";
      },
    });
    expect(wait.code, wait.stderr).to.equal(1);
    expect(wait.stderr).to.match(
      new RegExp(`timed out after 12s waiting for an SSH banner on 127\\.0\\.0\\.1:${p.layout.sshPort} \\(`),
    );
    expect(wait.stderr).to.include(`last 40 lines of the serial log ${vm}/serial.log`);
    expect(wait.stderr).to.include("stage waitGuest: failed with exit code 1");
    // The firmware's screen, saved and named for the operator.
    const shot = /^wait-for-guest: screenshot: (\S+\.png)$/m.exec(wait.stderr);
    expect(shot, wait.stderr).to.not.equal(null);
    const png = fs.readFileSync(shot?.[1] ?? "");
    expect(png.subarray(0, 8).toString("hex"), "a PNG").to.equal("89504e470d0a1a0a");
    expect(path.dirname(shot?.[1] ?? ""), "in the VM's screens folder").to.equal(path.join(vm, "screens"));
    expect(qemuPid(p), "the VM still runs for the stop").to.be.a("number");

    const stopT = ` ${GUEST_SHUTDOWN_TIMEOUT_S}`;
    const stop = await p.driver.runHost("stopVm", {
      timeoutMs: 300_000,
      edit: (c) => {
        expect(c.endsWith(stopT), `stopVm command ends with its timeout: ${c}`).to.equal(true);
        return c.slice(0, -stopT.length) + " 5";
      },
    });
    expect(stop.code, stop.stderr).to.equal(0);
    expect(stop.stdout).to.match(/^stop-vm: forced quit after timeout \(5s\): the guest did not power off$/m);
    expect(qemuPid(p), "QEMU gone after the forced stop").to.equal(undefined);
  });

  it("fault: S3 down at publish (from the start, or midway) fails the stage and leaves the previous latest.json in place", async function () {
    this.timeout(6 * 60 * 1000);
    const p = await pipeline("s3down", "fault-s3/");
    const vm = p.layout.vmDir;
    await prepareHost(p);
    // A disk to publish without a guest run: the install disk as it was fetched.
    fs.copyFileSync(path.join(vm, "install.qcow2"), path.join(vm, "disk.qcow2"));
    const first = parseManifest((await p.driver.mustHost("publish", { timeoutMs: 300_000 })).stdout);
    const latestBefore = await s3.text("fault-s3/latest.json");
    const keysBefore = await s3.keys("fault-s3/");
    expect((JSON.parse(latestBefore ?? "null") as { sha256?: string }).sha256).to.equal(first.sha256);

    // A new disk to publish (as after a provisioning run), then S3 goes away.
    const grow = await run("qemu-img", ["resize", "-q", "-f", "qcow2", path.join(vm, "disk.qcow2"), "+1M"]);
    expect(grow.code, grow.stderr).to.equal(0);
    const newSha = await flattenedSha(path.join(vm, "disk.qcow2"), p.dir);
    expect(newSha).to.not.equal(first.sha256);
    await s3.stop();
    const down = await p.driver.runHost("publish", { timeoutMs: 400_000, label: "publish (S3 down)" });
    await s3.start();
    expect(down.code, down.stderr).to.equal(1);
    expect(down.stdout, "no manifest printed").to.equal("");
    // Its first S3 request (is this image there already?) names the object and the endpoint.
    expect(down.stderr).to.match(
      new RegExp(`^publish-image: error: cannot read s3://\\S+/fault-s3/${newSha}/manifest\\.json: `, "m"),
    );
    expect(down.stderr).to.include(`127.0.0.1:${s3.port}`);
    expect(down.stderr).to.include("stage publish: failed with exit code 1");

    expect(await s3.text("fault-s3/latest.json"), "latest.json unchanged").to.equal(latestBefore);
    const keysAfter = await s3.keys("fault-s3/");
    expect(
      keysAfter.filter((k) => k.includes(newSha)),
      "nothing of the new image published",
    ).to.deep.equal([]);
    expect(keysAfter.filter((k) => !k.includes("/staging/"))).to.deep.equal(keysBefore);

    // S3 goes away in the middle: after the disk reached its content-addressed key, as the EFI vars upload starts.
    let stopping: Promise<void> | undefined;
    const mid = await p.driver.runHost("publish", {
      timeoutMs: 400_000,
      label: "publish (S3 down midway)",
      onOutput: (chunk) => {
        if (!stopping && /uploading \S+\/QEMU_VARS\.fd to /.test(chunk)) stopping = s3.stop();
      },
    });
    expect(stopping, `S3 was not stopped midway; publish output:\n${mid.stderr}`).to.not.equal(undefined);
    await stopping;
    await s3.start();
    expect(mid.code, mid.stderr).to.equal(1);
    expect(mid.stdout, "no manifest printed").to.equal("");
    expect(mid.stderr).to.match(/^publish-image: error: upload of \S+\/QEMU_VARS\.fd to \S+ failed/m);
    const keysMid = await s3.keys("fault-s3/");
    expect(keysMid, "the disk copy was made before S3 went away").to.include(`fault-s3/${newSha}/disk.qcow2`);
    expect(keysMid, "no manifest: the new image is not complete").to.not.include(`fault-s3/${newSha}/manifest.json`);
    expect(await s3.text("fault-s3/latest.json"), "latest.json unchanged").to.equal(latestBefore);

    // S3 back: the same stage completes and only then moves latest.json.
    const okOut = (await p.driver.mustHost("publish", { timeoutMs: 300_000, label: "publish (S3 back)" })).stdout;
    const ok = parseManifest(okOut);
    expect(ok.sha256).to.equal(newSha);
    expect(JSON.parse((await s3.text("fault-s3/latest.json")) ?? "null")).to.deep.equal(JSON.parse(okOut));
  });
});
