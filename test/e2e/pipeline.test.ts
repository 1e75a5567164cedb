/**
 * End-to-end test of the host pipeline against the stand-in aarch64 guest
 * (test/fixtures): the plan built from a local-target config is run stage by
 * stage, in plan order, with exactly the plan's commands (`bash -c`, runtime
 * tokens resolved, the stdin the components give), on this machine: firmware,
 * fetch (file://), qcow2, config ISO, env file, boot under QEMU/TCG, wait for
 * SSH, provision over SSH (standin-provision.sh in place of the PowerShell),
 * ACPI shutdown, publish to a local S3 (s3rver), and the aws plan's
 * prepareAmi into a scratch root. Every stage's effect is checked.
 *
 * Faults: QEMU killed during provisioning (reported, then resumed), a guest
 * that never answers SSH (bounded wait, forced stop), S3 down at publish
 * (fails, the previous latest.json stays).
 *
 * Writes the main run's stage timings to .cache/e2e-timings.md.
 */
import { expect } from "chai";
import * as fs from "fs";
import * as os from "os";
import * as path from "path";
import { DEFAULT_CONFIG_MEDIA_LABEL, DEFAULT_DRIVER_NAMES, renderAnswerFile } from "../../infra/answerFile";
import { parseConfig, StackConfig } from "../../infra/config";
import { guestSettings } from "../../infra/pipeline/guest";
import {
  buildPlan,
  defaultArtifactUri,
  driverFolder,
  GUEST_BOOT_TIMEOUT_S,
  GUEST_SHUTDOWN_TIMEOUT_S,
  HostLayout,
  Plan,
  RuntimeValues,
  STAGE_IDS,
  StageId,
} from "../../infra/pipeline/plan";
import { BUILD_VNC_DISPLAY, renderVmEnv } from "../../infra/pipeline/vmEnv";
import { ensureStandinGuest, POWEROFF_LINE, readFileFromDisk, READY_LINE, StandinGuest } from "../fixtures/standin";
import { readPid, repoRoot, run } from "../support/run";
import {
  sha256File,
  freePortPair,
  isQemu,
  killVm,
  localRawConfig,
  makeDriversIso,
  must,
  PipelineDriver,
  portFree,
  repoFileHashes,
  RestartableS3,
  sha256,
  stageEnv,
  StageResult,
  Timing,
  timingTable,
  uploadFiles,
} from "./support";

const BUCKET = "e2e-artifacts";
const BUILD_UNIT = "windows-vm-build-e2e";
/** The host stages of the local plan, in the order they must run. */
const LOCAL_ORDER: StageId[] = STAGE_IDS.slice(0, STAGE_IDS.indexOf("prepareAmi"));
/** Stages before the VM boots (idempotent, quick with the stand-in image). */
const PREPARE: StageId[] = ["firmware", "fetchImage", "fetchDrivers", "prepareDisk", "configMedia", "renderEnv"];
const MIB64 = 64 * 1024 * 1024;

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

describe("pipeline end to end (stand-in guest, TCG)", function () {
  let guest: StandinGuest;
  let work: string;
  let s3: RestartableS3;
  let drivers: { iso: string; sha256: string };
  const vmDirs: string[] = [];
  const timings: { main?: Timing[]; rerun?: Timing[]; ami?: Timing } = {};

  before(async function () {
    this.timeout(15 * 60 * 1000);
    guest = await ensureStandinGuest();
    work = fs.mkdtempSync(path.join(os.tmpdir(), "e2e-"));
    drivers = await makeDriversIso(work);
    s3 = await RestartableS3.create(path.join(work, "s3"), BUCKET);
  });

  afterEach(async function () {
    this.timeout(30_000);
    // Leave no VM behind, whatever happened.
    for (const d of vmDirs.splice(0)) {
      if (await killVm(d)) console.log(`      (cleanup: killed the QEMU of ${d})`);
    }
    if (s3 && !s3.running) await s3.start();
  });

  after(async function () {
    this.timeout(30_000);
    if (timings.main) {
      const rows = [...timings.main, ...(timings.ami ? [{ ...timings.ami, id: "prepareAmi (aws plan)" }] : [])];
      const date = new Date().toISOString().slice(0, 10);
      const table =
        timingTable(`Stage wall times, stand-in guest under TCG on ${os.cpus().length} cores (${date})`, rows) +
        (timings.rerun ? "\n" + timingTable("Second run, nothing changed", timings.rerun) : "");
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
      imageRoot: path.join(dir, "root"),
      buildUnit: BUILD_UNIT,
      sshPort: await freePortPair(),
      accel: "tcg",
    };
    const artifactUri = `s3://${BUCKET}/${prefix}`;
    const config = parseConfig(localRawConfig({ guest, driversIso: drivers, artifactUri, endpointUrl: s3.endpoint }));
    const plan = buildPlan({ config, layout, fileHashes: repoFileHashes() });
    const pipelineKey = fs.readFileSync(guest.publicKey, "utf8").trim();
    const password = `Pw-${Math.random().toString(36).slice(2, 12)}-e2e`;
    const answer = renderAnswerFile({
      sourceKind: config.image.format,
      adminUser: config.guest.adminUser,
      adminPassword: password,
      locale: config.guest.locale,
      timeZone: config.guest.timeZone,
      authorizedKey: pipelineKey,
      driverFolder: driverFolder(config),
      driverNames: [...DEFAULT_DRIVER_NAMES],
      configMediaLabel: DEFAULT_CONFIG_MEDIA_LABEL,
    });
    const settings = JSON.stringify(guestSettings(config, password));
    const runtime: RuntimeValues = {
      // An EC2-shaped id: the aws plan's prepareAmi records it as the build host.
      hostId: "i-0e2e00000000e2e0e",
      artifactUri,
      pipelineKey,
      answerFile: sha256(answer),
      guestSettings: sha256(settings),
    };
    const stdin = {
      vmBuildEnv: renderVmEnv(config, layout, "build"),
      vmImageEnv: renderVmEnv(config, layout, "image"),
      answerFile: answer,
      guestSettings: settings,
    };
    vmDirs.push(layout.vmDir);
    const driver = new PipelineDriver(plan, runtime, stdin, stageEnv(s3.directory, s3.endpoint), guest);
    return { dir, layout, config, plan, driver, answer, password, artifactUri, prefix };
  }

  function upload(p: Pipeline): void {
    const t0 = Date.now();
    const files = uploadFiles(p.layout);
    p.driver.timings.push({ id: "uploadFiles", seconds: (Date.now() - t0) / 1000, ok: true });
    expect(files).to.include.members([
      "provisioning/start-vm.sh",
      "provisioning/run-vm.sh",
      "assets/windows-vm.service",
    ]);
  }

  async function prepareHost(p: Pipeline): Promise<void> {
    upload(p);
    for (const id of PREPARE) await p.driver.mustHost(id, { timeoutMs: 120_000 });
  }

  async function startVm(p: Pipeline, label?: string): Promise<StageResult> {
    const vncPort = 5900 + BUILD_VNC_DISPLAY;
    expect(
      await portFree(vncPort),
      `port ${vncPort} (VNC display ${BUILD_VNC_DISPLAY} of the build VM's env) is in use: another VM is running`,
    ).to.equal(true);
    const r = await p.driver.mustHost("startVm", { timeoutMs: 60_000, label });
    expect(r.stdout).to.match(/^start-vm: VM started \(QEMU pid \d+/);
    const pid = readPid(path.join(p.layout.vmDir, "qemu.pid"));
    expect(pid !== undefined && isQemu(pid), "no live QEMU in vm/qemu.pid after startVm").to.equal(true);
    return r;
  }

  async function waitGuest(p: Pipeline, label?: string): Promise<StageResult> {
    const r = await p.driver.mustHost("waitGuest", { timeoutMs: 240_000, label });
    expect(r.stdout.trim()).to.match(/^SSH-2\.0-dropbear/);
    return r;
  }

  async function stopVm(p: Pipeline, label?: string): Promise<StageResult> {
    const r = await p.driver.mustHost("stopVm", { timeoutMs: 120_000, label });
    expect(r.stdout, "stop-vm must report a graceful power-off").to.match(
      /^stop-vm: powered off gracefully after \d+s$/m,
    );
    const pid = readPid(path.join(p.layout.vmDir, "qemu.pid"));
    expect(pid === undefined || !isQemu(pid), "QEMU still running after stopVm").to.equal(true);
    return r;
  }

  async function extractIso(iso: string, dest: string): Promise<void> {
    const r = await run("xorriso", ["-osirrox", "on", "-indev", iso, "-extract", "/", dest], { timeoutMs: 60_000 });
    expect(r.code, r.stderr).to.equal(0);
  }

  it("runs every host stage of the local plan in plan order with the plan's commands", async function () {
    this.timeout(6 * 60 * 1000);
    const p = await pipeline("main");
    const { layout: L, driver } = p;
    const vm = L.vmDir;

    // The plan: local target, no AMI stages, every stage where we expect it.
    expect(p.plan.stages.map((s) => s.id)).to.deep.equal(LOCAL_ORDER);
    expect(p.plan.stage("publish").command).to.include(`S3_ENDPOINT_URL=${s3.endpoint}`);
    expect(p.plan.stage("waitHost").command).to.equal(undefined);

    const outputs: Partial<Record<StageId, StageResult>> = {};
    for (const stage of p.plan.stages) {
      switch (stage.id) {
        case "waitHost":
          continue; // this machine is the host: nothing to wait for
        case "uploadFiles":
          upload(p);
          continue;
        case "startVm":
          outputs.startVm = await startVm(p);
          continue;
        case "waitGuest":
          outputs.waitGuest = await waitGuest(p);
          continue;
        case "provisionGuest":
          outputs.provisionGuest = must(await driver.runGuest({ timeoutMs: 120_000 }));
          continue;
        case "stopVm":
          outputs.stopVm = await stopVm(p);
          continue;
        default:
          outputs[stage.id] = await driver.mustHost(stage.id, { timeoutMs: 180_000 });
      }
    }

    // firmware: the 64 MiB pflash pair.
    expect(fs.statSync(path.join(vm, "QEMU_EFI.fd")).size).to.equal(MIB64);
    expect(fs.statSync(path.join(vm, "QEMU_VARS.fd")).size).to.equal(MIB64);
    // fetchImage / fetchDrivers: verified copies.
    expect(sha256File(path.join(vm, "source.qcow2"))).to.equal(guest.digest);
    expect(sha256File(path.join(vm, "virtio-win.iso"))).to.equal(drivers.sha256);
    // configMedia: the ISO holds exactly what was fed, and the marker and guest scripts.
    const iso = path.join(vm, "config.iso");
    expect(fs.statSync(iso).mode & 0o077, "config.iso holds the password: mode 0600").to.equal(0);
    const isoDir = path.join(p.dir, "iso");
    await extractIso(iso, isoDir);
    expect(fs.readFileSync(path.join(isoDir, "autounattend.xml"), "utf8")).to.equal(p.answer);
    expect(fs.readFileSync(path.join(isoDir, "authorized_keys"), "utf8")).to.equal(`${p.driver.runtime.pipelineKey}\n`);
    for (const f of ["windows-arm64-image.marker", "firstlogon.ps1", "provision.ps1", "check.ps1", "common.psm1"]) {
      expect(fs.existsSync(path.join(isoDir, f)), `${f} on the config ISO`).to.equal(true);
    }
    // renderEnv: the env file is the rendered one.
    expect(fs.readFileSync(path.join(vm, "vm-build.env"), "utf8")).to.equal(driver.stdin.vmBuildEnv);
    // startVm: no systemd here, so the background launcher with its log.
    expect(outputs.startVm?.stdout).to.include(`log ${vm}/run-vm.log`);
    const serial = fs.readFileSync(path.join(vm, "serial.log"), "latin1");
    expect(serial).to.include(READY_LINE);
    expect(serial).to.include(POWEROFF_LINE);
    // provisionGuest: the script saw the settings; the password never shows.
    expect(outputs.provisionGuest?.stdout.trim()).to.equal(
      `standin-provision: provisioned ${p.config.guest.adminUser}`,
    );
    for (const r of Object.values(outputs)) {
      expect(`${r?.stdout}${r?.stderr}`, `${r?.id} output`).to.not.include(p.password);
    }
    // stopVm: the marker survived the shutdown, on the host's disk.
    expect(await readFileFromDisk(path.join(vm, "disk.qcow2"), "provisioned.txt", p.dir)).to.equal(
      `${p.config.guest.adminUser}\n`,
    );

    // publish: manifest on stdout; the object is the disk, the marker inside it.
    const manifest = JSON.parse(outputs.publish?.stdout.trim() ?? "") as Record<string, unknown>;
    const localSha = sha256File(path.join(vm, "disk.qcow2"));
    expect(manifest).to.include({
      manifestVersion: 1,
      sha256: localSha,
      format: "qcow2",
      imageUri: `${p.artifactUri}${localSha}/disk.qcow2`,
      sourceUrl: p.config.image.url,
      sourceSha256: guest.digest,
      windowsVersion: "11-23h2",
    });
    const downloaded = path.join(p.dir, "published.qcow2");
    expect(await s3.download(`${p.prefix}${localSha}/disk.qcow2`, downloaded), "download published disk").to.equal(
      true,
    );
    expect(sha256File(downloaded), "sha256 of the published object").to.equal(manifest.sha256);
    expect(await readFileFromDisk(downloaded, "provisioned.txt", p.dir)).to.equal(`${p.config.guest.adminUser}\n`);
    const latest = JSON.parse((await s3.text(`${p.prefix}latest.json`, p.dir)) ?? "null") as Record<string, unknown>;
    expect(latest).to.deep.equal(manifest);
    const varsKey = `${p.prefix}${localSha}/QEMU_VARS.fd`;
    expect(await s3.keys(p.prefix)).to.deep.equal(
      [
        `${p.prefix}${localSha}/disk.qcow2`,
        varsKey,
        `${p.prefix}${localSha}/manifest.json`,
        `${p.prefix}latest.json`,
      ].sort(),
    );

    timings.main = driver.timings.slice();

    // A second run with nothing changed redoes no heavy work and keeps the provisioned disk.
    for (const id of PREPARE) await driver.mustHost(id, { timeoutMs: 60_000, label: `${id} (rerun)` });
    expect(sha256File(path.join(vm, "disk.qcow2")), "prepareDisk kept the provisioned disk").to.equal(localSha);
    const again = await driver.mustHost("publish", { timeoutMs: 60_000, label: "publish (rerun)" });
    expect(again.stderr).to.match(/already published/);
    expect(JSON.parse(again.stdout)).to.deep.equal(manifest);
    timings.rerun = driver.timings.slice(timings.main.length);

    // The local target's default: no artifactUri, so the plan publishes to <home>/artifacts/ (file://).
    const folderConfig: StackConfig = {
      ...p.config,
      artifacts: { ...p.config.artifacts, uri: undefined, endpointUrl: undefined },
    };
    const folderPlan = buildPlan({ config: folderConfig, layout: L, fileHashes: repoFileHashes() });
    const folderUri = defaultArtifactUri(L);
    const folderDriver = new PipelineDriver(
      folderPlan,
      { ...driver.runtime, artifactUri: folderUri },
      driver.stdin,
      driver.env,
      guest,
    );
    const toFolder = await folderDriver.mustHost("publish", {
      timeoutMs: 60_000,
      label: "publish (to the default folder)",
    });
    expect(toFolder.command).to.not.include("S3_ENDPOINT_URL");
    const folderManifest = JSON.parse(toFolder.stdout) as Record<string, unknown>;
    expect(folderManifest.imageUri).to.equal(`${folderUri}${localSha}/disk.qcow2`);
    const folder = path.join(L.home, "artifacts");
    expect(sha256File(path.join(folder, localSha, "disk.qcow2"))).to.equal(localSha);
    expect(JSON.parse(fs.readFileSync(path.join(folder, "latest.json"), "utf8"))).to.deep.equal(folderManifest);
  });

  it("prepareAmi of the aws plan installs and enables windows-vm.service and generalizes only the image root", async function () {
    this.timeout(2 * 60 * 1000);
    const p = await pipeline("ami");
    const { layout: L, driver } = p;
    const vm = L.vmDir;
    // The files the VM needs (the launcher's --print checks them below).
    await prepareHost(p);
    const iso = path.join(vm, "config.iso");

    // A scratch image root for prepareAmi, with the identity a host would have.
    const root = L.imageRoot;
    const operatorKey = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOperatorKeyOperatorKeyOperatorKeyOpera operator@example";
    const files: Record<string, string> = {
      "etc/ssh/ssh_host_ed25519_key": "private host key\n",
      "etc/ssh/ssh_host_ed25519_key.pub": "ssh-ed25519 AAAA host\n",
      "etc/machine-id": "0123456789abcdef0123456789abcdef\n",
      "root/.ssh/authorized_keys": `${p.driver.runtime.pipelineKey}\n${operatorKey}\n`,
      "var/lib/cloud/instance/boot-finished": "done\n",
      "var/lib/cloud/seed/nocloud/meta-data": "keep\n",
      [`${vm.slice(1)}/config.iso`]: "answer-file media that must not ship\n",
    };
    for (const [rel, text] of Object.entries(files)) {
      fs.mkdirSync(path.dirname(path.join(root, rel)), { recursive: true });
      fs.writeFileSync(path.join(root, rel), text);
    }
    const hostKeysBefore = fs.readdirSync("/etc/ssh").filter((f) => f.startsWith("ssh_host_"));

    // prepareAmi: only the aws plan has it; run its command on this layout with the scratch root.
    const awsConfig = parseConfig({
      target: "aws",
      sshAllowedCidrs: '["203.0.113.7/32"]',
      windowsImageUrl: `s3://${BUCKET}/sources/standin.qcow2`,
      windowsImageSha256: guest.digest,
      windowsVersion: "11-23h2",
      vmCpus: "2",
      vmMemoryGiB: "4",
      guestInstallBuildlet: "false",
      guestInstallLlvmMingw: "false",
      guestInstallVsBuildTools: "false",
    });
    const awsPlan = buildPlan({ config: awsConfig, layout: L, fileHashes: repoFileHashes() });
    expect(awsPlan.stages.map((s) => s.id)).to.deep.equal([...STAGE_IDS]);
    const imageEnv = renderVmEnv(awsConfig, L, "image");
    const ami = await driver.mustHost("prepareAmi", {
      plan: awsPlan,
      stdin: { vmImageEnv: imageEnv },
      timeoutMs: 60_000,
    });
    expect(ami.command).to.include(`--generalize ${root} `);
    const wants = path.join(root, "etc/systemd/system/multi-user.target.wants/windows-vm.service");
    expect(fs.lstatSync(wants).isSymbolicLink(), "windows-vm.service enabled").to.equal(true);
    expect(fs.readlinkSync(wants)).to.match(/\/etc\/systemd\/system\/windows-vm\.service$/);
    expect(fs.readFileSync(path.join(root, "etc/systemd/system/windows-vm.service"), "utf8")).to.equal(
      fs.readFileSync(path.join(repoRoot, "assets/windows-vm.service"), "utf8"),
    );
    // The unit skips the image VM on the build host (this id), so a restarted build host keeps its disk.
    expect(fs.readFileSync(path.join(root, "etc/windows-vm/build-instance-id"), "utf8")).to.equal(
      "i-0e2e00000000e2e0e\n",
    );
    const bakedEnv = fs.readFileSync(path.join(root, "etc/windows-vm/vm.env"), "utf8");
    expect(bakedEnv).to.not.match(/^VM_CONFIG_ISO=/m);
    expect(bakedEnv).to.match(/^VM_HALT_ON_EXIT=1$/m);
    expect(bakedEnv).to.include(`VM_DISK=${vm}/disk.qcow2\n`);
    const launcher = path.join(root, "usr/local/lib/windows-vm/run-vm.sh");
    expect(fs.statSync(launcher).mode & 0o111, "launcher executable").to.not.equal(0);
    // The baked launcher accepts the baked env: it would boot the provisioned disk, without the config ISO.
    const print = await run("bash", [launcher, "--print", path.join(root, "etc/windows-vm/vm.env")], {
      env: stageEnv(s3.directory, s3.endpoint),
    });
    expect(print.code, print.stderr).to.equal(0);
    expect(print.stdout).to.include(`file=${vm}/disk.qcow2`);
    expect(print.stdout).to.not.include("config.iso");
    // Generalized: identity gone from the scratch root only.
    for (const gone of ["etc/ssh/ssh_host_ed25519_key", "etc/ssh/ssh_host_ed25519_key.pub", "var/lib/cloud/instance"]) {
      expect(fs.existsSync(path.join(root, gone)), `${gone} removed`).to.equal(false);
    }
    expect(fs.existsSync(path.join(root, "var/lib/cloud/seed/nocloud/meta-data")), "cloud seed kept").to.equal(true);
    expect(fs.existsSync(path.join(root, vm.slice(1), "config.iso")), "config.iso removed from the image").to.equal(
      false,
    );
    expect(fs.readFileSync(path.join(root, "etc/machine-id"), "utf8")).to.equal("");
    expect(fs.readFileSync(path.join(root, "root/.ssh/authorized_keys"), "utf8")).to.equal(`${operatorKey}\n`);
    expect(fs.existsSync(iso), "the build's own config.iso (outside the image root) is untouched").to.equal(true);
    expect(fs.readdirSync("/etc/ssh").filter((f) => f.startsWith("ssh_host_"))).to.deep.equal(hostKeysBefore);
    timings.ami = driver.timings.find((t) => t.id === "prepareAmi");
  });

  it("fault: QEMU killed during provisioning is reported with the serial log, and a rerun resumes", async function () {
    this.timeout(5 * 60 * 1000);
    const p = await pipeline("killed");
    const vm = p.layout.vmDir;
    await prepareHost(p);
    await startVm(p);
    await waitGuest(p);

    let killed: number | undefined;
    const failed = await p.driver.runGuest({
      env: { STANDIN_PROVISION_SLEEP_S: "120" },
      timeoutMs: 90_000,
      onOutput: (chunk) => {
        if (killed === undefined && chunk.includes("standin-provision: sleeping")) {
          killed = readPid(path.join(vm, "qemu.pid"));
          if (killed !== undefined) process.kill(killed, "SIGKILL");
        }
      },
    });
    expect(killed, `QEMU was not killed; provisioning output:\n${failed.stderr}`).to.be.a("number");
    expect(failed.code, "provisioning must fail when the VM dies").to.not.equal(0);
    expect(failed.seconds, "the failure is noticed at once, not after the sleep").to.be.below(60);
    expect(failed.stderr).to.include(`the VM ${BUILD_UNIT} (${vm}) is not running: QEMU pid ${killed} is gone`);
    expect(failed.stderr).to.include(`last lines of the serial log ${vm}/serial.log`);
    expect(failed.stderr).to.include(READY_LINE);

    // The next stage says the VM is gone, with the serial log, at once.
    const wait = await p.driver.runHost("waitGuest", { timeoutMs: 60_000, label: "waitGuest (VM dead)" });
    expect(wait.code, wait.stderr).to.equal(3);
    expect(wait.seconds).to.be.below(30);
    expect(wait.stderr).to.include(`the VM is not running: no live QEMU process in VM_PID_FILE=${vm}/qemu.pid`);
    expect(wait.stderr).to.match(/last 40 lines of the serial log/);

    // The disk shows provisioning started but did not finish.
    const disk = path.join(vm, "disk.qcow2");
    expect(await readFileFromDisk(disk, "provision-started.txt", p.dir)).to.equal(
      `started ${p.config.guest.adminUser}\n`,
    );
    expect(await readFileFromDisk(disk, "provisioned.txt", p.dir)).to.equal(undefined);

    // Rerun from startVm: boots the same disk, provisions, shuts down cleanly.
    await startVm(p, "startVm (rerun)");
    await waitGuest(p, "waitGuest (rerun)");
    const done = must(await p.driver.runGuest({ timeoutMs: 120_000, label: "provisionGuest (rerun)" }));
    expect(done.stdout).to.include(`provisioned ${p.config.guest.adminUser}`);
    await stopVm(p, "stopVm (rerun)");
    expect(await readFileFromDisk(disk, "provisioned.txt", p.dir)).to.equal(`${p.config.guest.adminUser}\n`);
  });

  it("fault: a guest that never answers SSH fails waitGuest in bounded time naming host:port, and stop forces it off", async function () {
    this.timeout(3 * 60 * 1000);
    const p = await pipeline("silent");
    const vm = p.layout.vmDir;
    await prepareHost(p);
    // A disk with nothing to boot: the firmware sits in its boot menu, like a Windows stuck before SSH.
    fs.rmSync(path.join(vm, "disk.qcow2"));
    const mk = await run("qemu-img", ["create", "-q", "-f", "qcow2", path.join(vm, "disk.qcow2"), "64M"]);
    expect(mk.code, mk.stderr).to.equal(0);
    await startVm(p);

    const boot = ` ${GUEST_BOOT_TIMEOUT_S}`;
    const wait = await p.driver.runHost("waitGuest", {
      timeoutMs: 60_000,
      edit: (c) => {
        expect(c.endsWith(boot), `waitGuest command ends with its timeout: ${c}`).to.equal(true);
        return c.slice(0, -boot.length) + " 12";
      },
    });
    expect(wait.code, wait.stderr).to.equal(1);
    expect(wait.seconds, "bounded by the 12 s timeout").to.be.below(25);
    expect(wait.stderr).to.match(
      new RegExp(`timed out after 12s waiting for an SSH banner on 127\\.0\\.0\\.1:${p.layout.sshPort} \\(`),
    );
    expect(wait.stderr).to.include(`last 40 lines of the serial log ${vm}/serial.log`);

    const stopT = ` ${GUEST_SHUTDOWN_TIMEOUT_S}`;
    const stop = await p.driver.runHost("stopVm", {
      timeoutMs: 60_000,
      edit: (c) => {
        expect(c.endsWith(stopT), `stopVm command ends with its timeout: ${c}`).to.equal(true);
        return c.slice(0, -stopT.length) + " 5";
      },
    });
    expect(stop.code, stop.stderr).to.equal(0);
    expect(stop.stdout).to.match(/^stop-vm: forced quit after timeout \(5s\): the guest did not power off$/m);
    const pid = readPid(path.join(vm, "qemu.pid"));
    expect(pid === undefined || !isQemu(pid), "QEMU gone after the forced stop").to.equal(true);
  });

  it("fault: S3 down at publish (from the start, or midway) fails the stage and leaves the previous latest.json in place", async function () {
    this.timeout(3 * 60 * 1000);
    const p = await pipeline("s3down", "fault-s3/");
    const vm = p.layout.vmDir;
    await prepareHost(p);
    const first = JSON.parse((await p.driver.mustHost("publish", { timeoutMs: 60_000 })).stdout) as { sha256: string };
    const latestBefore = await s3.text("fault-s3/latest.json", p.dir);
    const keysBefore = await s3.keys("fault-s3/");
    expect(JSON.parse(latestBefore ?? "null")).to.deep.equal(first);

    // A new disk to publish (as after a provisioning run), then S3 goes away.
    const grow = await run("qemu-img", ["resize", "-q", "-f", "qcow2", path.join(vm, "disk.qcow2"), "+1M"]);
    expect(grow.code, grow.stderr).to.equal(0);
    const newSha = sha256File(path.join(vm, "disk.qcow2"));
    expect(newSha).to.not.equal(first.sha256);
    await s3.stop();
    const down = await p.driver.runHost("publish", { timeoutMs: 120_000, label: "publish (S3 down)" });
    await s3.start();
    expect(down.code, down.stderr).to.equal(1);
    expect(down.stdout, "no manifest printed").to.equal("");
    expect(down.stderr).to.match(/^publish-image: error: .*failed/m);
    expect(down.stderr).to.include(`127.0.0.1:${s3.port}`);

    expect(await s3.text("fault-s3/latest.json", p.dir), "latest.json unchanged").to.equal(latestBefore);
    const keysAfter = await s3.keys("fault-s3/");
    expect(
      keysAfter.filter((k) => k.includes(newSha)),
      "nothing of the new image published",
    ).to.deep.equal([]);
    expect(keysAfter.filter((k) => !k.includes("/staging/"))).to.deep.equal(keysBefore);

    // S3 goes away in the middle: after the disk reached its content-addressed key, as the EFI vars upload starts.
    let stopping: Promise<void> | undefined;
    const mid = await p.driver.runHost("publish", {
      timeoutMs: 120_000,
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
    expect(await s3.text("fault-s3/latest.json", p.dir), "latest.json unchanged").to.equal(latestBefore);

    // S3 back: the same stage completes and only then moves latest.json.
    const ok = JSON.parse(
      (await p.driver.mustHost("publish", { timeoutMs: 60_000, label: "publish (S3 back)" })).stdout,
    ) as { sha256: string };
    expect(ok.sha256).to.equal(newSha);
    expect(JSON.parse((await s3.text("fault-s3/latest.json", p.dir)) ?? "null")).to.deep.equal(ok);
  });
});
