import { expect } from "chai";
import * as crypto from "crypto";
import * as fs from "fs";
import * as path from "path";
import { BAKE_FILES } from "../../infra/bake";
import { Machine, parseConfig, RawConfig } from "../../infra/config";
import { guestSettings, guestProvisionCommand, GUEST_PROVISION_SCRIPT } from "../../infra/pipeline/guest";
import {
  AWS_LAYOUT,
  baseDigest,
  baseKey,
  baseParts,
  buildPlan,
  changedStages,
  defaultArtifactUri,
  HOST_READY_SCRIPT,
  HOST_READY_TIMEOUT_S,
  HostLayout,
  hostFiles,
  installVmSettings,
  NOT_INSTALL_AFFECTING_ENV,
  Plan,
  planFiles,
  resolveCommand,
  RUNTIME,
  STAGE_IDS,
  StageId,
  TRANSPORT_FILES,
} from "../../infra/pipeline/plan";
import { renderVmEnv } from "../../infra/pipeline/vmEnv";
import { bashWords, bashWordsOf } from "../support/bash";
import { VALID_RAW } from "../support/config";
import { repoRoot } from "../support/run";

const RAW: RawConfig = VALID_RAW;

/** A machine big enough for any local config here (the local target checks CPUs and memory). */
const MACHINE: Machine = { cpus: 8, memoryGiB: 32, cwd: repoRoot };

const HASHES = Object.fromEntries(planFiles().map((f) => [f, `hash-of-${f}`]));

/** The local target's raw config: no SSH CIDRs, a file:// image, a work dir with characters worth quoting. */
const LOCAL_RAW: RawConfig = {
  target: "local",
  sshAllowedCidrs: "[]",
  windowsImageUrl: "file:///srv/win.qcow2",
  vmCpus: "2",
  vmMemoryGiB: "4",
  localWorkDir: "/tmp/w%i,x",
};

/** The layout infra/index.ts gives the local target for LOCAL_RAW's localWorkDir (TCG here). */
const LOCAL_LAYOUT: HostLayout = {
  home: "/tmp/w%i,x",
  vmDir: "/tmp/w%i,x/vm",
  sudo: "",
  imageRoot: "/tmp/w%i,x/image-root",
  buildUnit: "windows-vm-build-local",
  stageRunDir: "/tmp/w%i,x/run/stages",
  stageStateDir: "/tmp/w%i,x/state",
  sshPort: 2222,
  accel: "tcg",
};

function plan(over: RawConfig = {}, hashes: Record<string, string> = HASHES): Plan {
  return buildPlan({
    config: parseConfig({ ...RAW, ...over }, new Set(), MACHINE),
    layout: AWS_LAYOUT,
    fileHashes: hashes,
  });
}

function localPlan(over: RawConfig = {}): Plan {
  return buildPlan({
    config: parseConfig({ ...RAW, ...LOCAL_RAW, ...over }, new Set(), MACHINE),
    layout: LOCAL_LAYOUT,
    fileHashes: HASHES,
  });
}

/** The install: booted until its SSH answers, then frozen as the base. */
const INSTALL: StageId[] = ["startVm", "waitGuest", "baseImage"];
/** One provisioning run: a fresh overlay on the base, booted, provisioned, shut down, published. */
const PROVISION: StageId[] = ["overlayDisk", "provisionGuest", "stopVm", "publish"];
/** The host stages from booting the install disk to the publication (STAGE_IDS is the pipeline's order). */
const AFTER_START: StageId[] = [...INSTALL, ...PROVISION];
/** A new base: baseImage consumed the last install disk, so a new one is made from the source, then installed. */
const NEW_BASE: StageId[] = ["prepareDisk", "injectAnswerFile", ...AFTER_START];
/** The bake: a new AMI when what it installs around the image changes. */
const BAKE: StageId[] = ["bakeImage", "bakeAmi"];

describe("pipeline plan", () => {
  it("orders the stages as the pipeline runs them", () => {
    const ids = plan().stages.map((s) => s.id);
    expect(ids).to.deep.equal(STAGE_IDS.filter((id) => ids.includes(id)));
    // Every stage of the design is there on AWS (injectAnswerFile only for images it can write into).
    expect(ids).to.include.members([
      "waitHost",
      "uploadFiles",
      "idleGuard",
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
      "stopHost",
      "bakeImage",
      "bakeAmi",
    ]);
    expect(ids).to.not.include("prepareAmi");
  });

  it("every dependency and every `after` stage comes earlier in the order", () => {
    const p = plan();
    p.stages.forEach((s, i) => {
      for (const d of [...s.dependsOn, ...s.after])
        expect(
          p.stages.findIndex((x) => x.id === d),
          `${s.id} <- ${d}`,
        ).to.be.within(0, i - 1);
    });
  });

  it("the local target has no AWS stages: no host wait, idle guard, host stop or bake", () => {
    const ids = localPlan().stages.map((s) => s.id);
    expect(ids).to.not.include.members(["waitHost", "idleGuard", "stopHost", "bakeImage", "bakeAmi"]);
    expect(ids.at(-1)).to.equal("publish");
    expect(localPlan().stage("uploadFiles").after).to.deep.equal([]);
  });

  it("re-runs nothing when nothing changes", () => {
    expect(changedStages(plan(), plan())).to.deep.equal([]);
    expect(changedStages(localPlan(), localPlan())).to.deep.equal([]);
  });

  it("every file a plan reads has a hash, and a missing one is refused", () => {
    expect(planFiles()).to.include.members([...hostFiles(), ...BAKE_FILES, HOST_READY_SCRIPT]);
    const without = Object.fromEntries(Object.entries(HASHES).filter(([f]) => f !== BAKE_FILES[0]));
    expect(() => plan({}, without)).to.throw(`buildPlan: no hash for ${BAKE_FILES[0]}`);
  });

  // [what changes, config overrides, file edited, stages that must re-run]
  // injectAnswerFile is listed where it re-runs; it exists only for images the answer file is written into.
  const CASES: Array<[string, RawConfig, string | undefined, StageId[]]> = [
    ["build-efi.sh", {}, "provisioning/build-efi.sh", ["firmware", ...AFTER_START]],
    [
      "fetch-image.sh",
      {},
      "provisioning/fetch-image.sh",
      ["fetchImage", "fetchDrivers", "prepareDisk", "injectAnswerFile", "configMedia", ...AFTER_START],
    ],
    ["prepare-disk.sh", {}, "provisioning/prepare-disk.sh", ["prepareDisk", "injectAnswerFile", ...AFTER_START]],
    [
      "the shared lib.sh (host stages and the bake)",
      {},
      "provisioning/lib.sh",
      [
        "idleGuard",
        "fetchImage",
        "fetchDrivers",
        "prepareDisk",
        "injectAnswerFile",
        "configMedia",
        ...AFTER_START,
        ...BAKE,
      ],
    ],
    ["run-vm.sh (the build VM and the baked image's)", {}, "provisioning/run-vm.sh", [...AFTER_START, ...BAKE]],
    ["start-vm.sh", {}, "provisioning/start-vm.sh", [...AFTER_START]],
    ["wait-for-guest.sh", {}, "provisioning/wait-for-guest.sh", AFTER_START.filter((s) => s !== "startVm")],
    ["base-image.sh", {}, "provisioning/base-image.sh", AFTER_START],
    ["guest-run.sh", {}, "provisioning/guest-run.sh", ["provisionGuest", "stopVm", "publish"]],
    // A guest-script edit re-provisions from the base: Windows is not installed again.
    ["the guest provisioning script", {}, "provisioning/windows/provision.ps1", ["configMedia", ...PROVISION]],
    ["the first-logon script", {}, "provisioning/windows/firstlogon.ps1", ["configMedia", ...NEW_BASE]],
    ["the guest check script", {}, "provisioning/windows/check.ps1", ["configMedia", ...PROVISION]],
    ["the guest scripts' module", {}, "provisioning/windows/common.psm1", ["configMedia", ...PROVISION]],
    ["build-config-iso.sh", {}, "provisioning/build-config-iso.sh", ["configMedia", ...PROVISION]],
    ["stop-vm.sh", {}, "provisioning/stop-vm.sh", ["baseImage", ...PROVISION]],
    ["publish-image.sh", {}, "provisioning/publish-image.sh", ["publish"]],
    ["the idle guard", {}, "provisioning/idle-guard.sh", ["idleGuard"]],
    ["the idle guard's installer", {}, "provisioning/idle-guard-install.sh", ["idleGuard"]],
    ["the idle guard's timer", {}, "assets/windows-arm64-image-idle.timer", ["idleGuard"]],
    // The bake's own files are not on the build host: a new AMI, nothing on the host.
    ["bake-image.sh", {}, "provisioning/bake-image.sh", BAKE],
    ["prepare-ami.sh", {}, "provisioning/prepare-ami.sh", BAKE],
    ["the systemd unit", {}, "assets/windows-vm.service", BAKE],
    // The transport changes how stages run, not what they make.
    ["stage.sh (the host-side bound)", {}, "provisioning/stage.sh", []],
    ["host-exec.sh (the SSH transport, where Pulumi runs)", {}, "provisioning/host-exec.sh", []],
    // host-ready.sh is waitHost's stdin: that resource runs again on its own, nothing downstream does.
    ["host-ready.sh", {}, HOST_READY_SCRIPT, []],
    [
      "the Windows image hash",
      { windowsImageSha256: "b".repeat(64) },
      undefined,
      ["fetchImage", "prepareDisk", "injectAnswerFile", ...AFTER_START],
    ],
    [
      "the virtio ISO hash",
      { virtioIsoSha256: "c".repeat(64) },
      undefined,
      ["fetchDrivers", "configMedia", ...NEW_BASE],
    ],
    // The VM's size is not install-affecting: a new overlay, the same base.
    ["vCPUs (build VM and baked image)", { vmCpus: "3" }, undefined, ["renderEnv", ...PROVISION, ...BAKE]],
    ["memory (build VM and baked image)", { vmMemoryGiB: "16" }, undefined, ["renderEnv", ...PROVISION, ...BAKE]],
    [
      "the machine options (install-affecting)",
      { vmMachineOptions: "gic-version=3" },
      undefined,
      ["renderEnv", ...NEW_BASE, ...BAKE],
    ],
    ["the buildlet port (baked image only)", { vmBuildletPort: "8443" }, undefined, BAKE],
    ["the guest admin user", { guestAdminUser: "builder" }, undefined, ["provisionGuest", "stopVm", "publish"]],
    // In-place host changes keep the host's disk and work (a replaced host is a new runtime hostId).
    // a1.metal -> c6g.metal also moves the VM from GICv2 to GICv3 (gicVersionFor): install-affecting.
    [
      "the host type (changed in place)",
      { hostInstanceType: "c6g.metal" },
      undefined,
      ["renderEnv", ...NEW_BASE, ...BAKE],
    ],
    ["the host volume's IOPS", { hostVolumeIops: "6000" }, undefined, []],
    ["hostIdleMinutes", { hostIdleMinutes: "90" }, undefined, ["idleGuard"]],
    // The stop itself goes (see the mock tests); the idle guard is turned off.
    ["keepHostRunning", { keepHostRunning: "true" }, undefined, ["idleGuard"]],
    ["the bake instance type", { bakeInstanceType: "c7g.xlarge" }, undefined, BAKE],
    ["the AMI's volume size", { amiVolumeGiB: "100" }, undefined, BAKE],
    ["retainAmiOnDelete", { retainAmiOnDelete: "false" }, undefined, ["bakeAmi"]],
    ["the artifact prefix (bucket URI is a runtime value)", { artifactPrefix: "other/" }, undefined, []],
    ["a guest setting (a runtime value: the settings' hash)", { guestDisableUac: "false" }, undefined, []],
  ];

  for (const [what, over, file, listed] of CASES) {
    it(`changing ${what} re-runs exactly ${listed.length ? listed.join(", ") : "nothing"}`, () => {
      const hashes = file ? { ...HASHES, [file]: "edited" } : HASHES;
      const after = plan(over, hashes);
      const present = new Set(after.stages.map((s) => s.id));
      // An edited host file is copied to the host again (uploadFiles), whatever else re-runs.
      const copied = file !== undefined && hostFiles().includes(file);
      const want = [...new Set([...(copied ? ["uploadFiles" as StageId] : []), ...listed])].filter((id) =>
        present.has(id),
      );
      const got = changedStages(plan(), after);
      expect(got).to.have.members(want);
      expect(got).to.have.length(want.length);
    });
  }

  it("turning keepHostRunning off again brings the host stop back", () => {
    expect(changedStages(plan({ keepHostRunning: "true" }), plan())).to.have.members(["idleGuard", "stopHost"]);
  });

  it("the transport is on the host but in no stage's files; host-exec.sh never leaves this machine", () => {
    const p = plan();
    expect(hostFiles()).to.include("provisioning/stage.sh");
    for (const s of p.stages.filter((x) => x.id !== "uploadFiles"))
      expect(s.files, s.id).to.not.include("provisioning/stage.sh");
    expect(p.stage("uploadFiles").files).to.include("provisioning/stage.sh");
    expect(TRANSPORT_FILES).to.include("provisioning/stage.sh");
    expect(planFiles()).to.not.include("provisioning/host-exec.sh");
  });

  it("an OpenSSH zip, when given, is fetched with the drivers and put on the config ISO", () => {
    const zip = { openSshZipUrl: "s3://media/OpenSSH-ARM64.zip", openSshZipSha256: "d".repeat(64) };
    const p = plan(zip);
    expect(p.stage("fetchDrivers").command).to.contain(
      `fetch-image.sh s3://media/OpenSSH-ARM64.zip ${"d".repeat(64)} /var/lib/windows-vm/OpenSSH-ARM64.zip`,
    );
    expect(p.stage("configMedia").command).to.contain("/var/lib/windows-vm/OpenSSH-ARM64.zip=OpenSSH-ARM64.zip");
    expect(plan().stage("configMedia").command).to.not.contain("OpenSSH");
    expect(changedStages(plan(), p)).to.have.members(["fetchDrivers", "configMedia", ...NEW_BASE]);
  });

  it("the uploadFiles stage lists every file a host stage runs, and its digest is their hashes", () => {
    const p = plan();
    const all = new Set(p.stage("uploadFiles").files);
    for (const s of p.stages.filter((x) => x.site === "host"))
      for (const f of s.files) expect(all.has(f), `${s.id}: ${f}`).to.equal(true);
    for (const f of TRANSPORT_FILES) expect(all.has(f), f).to.equal(true);
    // The bake's files go to the bake instance in its user data, not to the build host.
    expect(all.has("provisioning/bake-image.sh")).to.equal(false);
    expect(p.stage("uploadFiles").after).to.deep.equal(["waitHost"]);
  });

  it("each stage lists the files its scripts source", () => {
    // `source "<the script's folder>/lib.sh"`, however the folder is found.
    const sourced = /^\s*(?:source|\.)\s+".*\/([^"/]+\.sh)"\s*$/gm;
    const sourcing = new Set<string>();
    for (const s of plan().stages) {
      for (const f of s.files.filter((x) => x.endsWith(".sh"))) {
        const text = fs.readFileSync(path.join(repoRoot, f), "utf8");
        for (const m of text.matchAll(sourced)) {
          sourcing.add(f);
          expect(s.files, `${s.id}: ${f} sources ${m[1]}`).to.include(path.posix.join(path.posix.dirname(f), m[1]));
        }
      }
    }
    // Both ways the scripts find their folder are recognised.
    expect([...sourcing]).to.include.members(
      ["fetch-image", "prepare-disk", "publish-image", "start-vm", "stop-vm", "wait-for-guest", "bake-image"].map(
        (n) => `provisioning/${n}.sh`,
      ),
    );
  });

  it("host commands run the scripts from the host's home with their arguments", () => {
    const p = plan();
    expect(p.stage("firmware").command).to.equal(
      "sudo -n bash /opt/windows-arm64-image/provisioning/build-efi.sh /var/lib/windows-vm",
    );
    expect(p.stage("fetchImage").command).to.contain(
      `fetch-image.sh s3://media/win.vhdx ${"a".repeat(64)} /var/lib/windows-vm/source.vhdx`,
    );
    expect(p.stage("prepareDisk").command).to.contain(
      "prepare-disk.sh /var/lib/windows-vm/source.vhdx /var/lib/windows-vm/install.qcow2",
    );
    expect(p.stage("startVm").command).to.contain("start-vm.sh /var/lib/windows-vm/vm-build.env windows-vm-build");
    expect(p.stage("stopVm").command).to.contain("stop-vm.sh /var/lib/windows-vm/qmp.sock 600");
    expect(p.stage("publish").command).to.match(
      /env IMAGE_SOURCE_URL=s3:\/\/media\/win\.vhdx .*WINDOWS_VERSION=11-23h2 .*bash .*publish-image\.sh \/var\/lib\/windows-vm '@ARTIFACT_URI@'/,
    );
    expect(p.stage("provisionGuest").command).to.match(
      /guest-run\.sh \/var\/lib\/windows-vm\/vm-build\.env windows-vm-build 2222 gopher 'powershell -NoProfile -NonInteractive -ExecutionPolicy Bypass -EncodedCommand [A-Za-z0-9+/=]+'/,
    );
    // The bake and the AMI are AWS calls from where Pulumi runs: no host command.
    for (const id of ["stopHost", "bakeImage", "bakeAmi"] as StageId[]) {
      expect(p.stage(id).site, id).to.equal("aws");
      expect(p.stage(id).hostCommand, id).to.equal(undefined);
    }
  });

  it("the env file is written with cat (stdin may be a socket), through a temporary file", () => {
    const cmd = plan().stage("renderEnv").command as string;
    expect(cmd).to.not.contain("/dev/stdin");
    const words = bashWords(cmd);
    expect(words.slice(0, 4)).to.deep.equal(["sudo", "-n", "bash", "-c"]);
    expect(words[4]).to.equal(
      "mkdir -p /var/lib/windows-vm && umask 022 && cat > /var/lib/windows-vm/vm-build.env.tmp && mv -f /var/lib/windows-vm/vm-build.env.tmp /var/lib/windows-vm/vm-build.env",
    );
    expect(plan().stage("renderEnv").stdin).to.equal("vmBuildEnv");
  });

  it("every host stage runs through stage.sh, bounded by its timeout in seconds and naming what it waits for", () => {
    for (const [p, L] of [
      [plan(), AWS_LAYOUT],
      [localPlan(), LOCAL_LAYOUT],
    ] as Array<[Plan, HostLayout]>) {
      const hostStages = p.stages.filter((s) => s.command !== undefined && s.id !== "waitHost");
      expect(hostStages.length).to.be.greaterThan(10);
      const parsed = bashWordsOf(hostStages.map((s) => s.hostCommand as string));
      hostStages.forEach((s, i) => {
        expect(s.waitsFor, s.id).to.match(/\S/);
        expect(s.timeoutMinutes, s.id).to.be.greaterThan(0);
        const sudo = L.sudo ? ["sudo", "-n"] : [];
        expect(parsed[i], `${L.home} ${s.id}`).to.deep.equal([
          ...sudo,
          "env",
          `STAGE_RUN_DIR=${L.stageRunDir}`,
          `STAGE_STATE_DIR=${L.stageStateDir}`,
          "bash",
          `${L.home}/provisioning/stage.sh`,
          s.id,
          String(s.timeoutMinutes * 60),
          s.waitsFor,
          s.command,
        ]);
      });
    }
  });

  it("waitHost is not wrapped: host-ready.sh arrives on stdin, bounded by HOST_READY_TIMEOUT_S", () => {
    const w = plan().stage("waitHost");
    expect(w.hostCommand).to.equal(`HOST_READY_TIMEOUT_S=${HOST_READY_TIMEOUT_S} bash -s`);
    expect(w.stdin).to.equal("hostReadyScript");
    expect(w.files).to.deep.equal([]);
    expect(w.timeoutMinutes * 60).to.be.greaterThan(HOST_READY_TIMEOUT_S);
    expect(w.dependsOn).to.deep.equal([]);
  });

  it("the idle guard powers the host off after hostIdleMinutes (45 by default), and is off with keepHostRunning", () => {
    expect(plan().stage("idleGuard").command).to.equal(
      "sudo -n bash /opt/windows-arm64-image/provisioning/idle-guard-install.sh 45",
    );
    expect(plan({ hostIdleMinutes: "90" }).stage("idleGuard").command).to.match(/idle-guard-install\.sh 90$/);
    expect(plan({ keepHostRunning: "true" }).stage("idleGuard").command).to.match(/idle-guard-install\.sh off$/);
    // Nothing depends on it.
    for (const s of plan().stages) {
      expect(s.dependsOn, s.id).to.not.include("idleGuard");
    }
  });

  it("the host stop comes after the publication and the idle guard, and without keepHostRunning only", () => {
    const stop = plan().stage("stopHost");
    expect(stop.site).to.equal("aws");
    expect(stop.after).to.include.members(["publish", "idleGuard"]);
    expect(plan({ keepHostRunning: "true" }).stages.map((s) => s.id)).to.not.include("stopHost");
  });

  it("the bake follows the published image, not how it was made", () => {
    const p = plan();
    const bake = p.stage("bakeImage");
    expect(bake.dependsOn).to.deep.equal([]);
    expect(bake.after).to.deep.equal(["publish"]);
    expect(bake.files).to.have.members([...BAKE_FILES]);
    expect(bake.inputs).to.include({ instanceType: "c7g.large", volumeGiB: "auto" });
    expect(plan({ amiVolumeGiB: "100" }).stage("bakeImage").inputs.volumeGiB).to.equal("100");
    expect(p.stage("bakeAmi").dependsOn).to.deep.equal(["bakeImage"]);
    // The bake's digest sees the image VM's env, not the build VM's.
    expect(bake.inputs.env).to.match(/^[0-9a-f]{64}$/);
    expect(changedStages(p, plan({ vmMachineOptions: "gic-version=max" }))).to.include.members(BAKE);
  });

  it("secrets reach the host on stdin, never in a command; stdin holding a secret is marked", () => {
    const p = plan();
    expect(p.stage("configMedia").stdin).to.equal("answerFile");
    expect(p.stage("configMedia").secretStdin).to.equal(true);
    expect(p.stage("provisionGuest").stdin).to.equal("guestKeyAndSettings");
    expect(p.stage("provisionGuest").secretStdin).to.equal(true);
    for (const s of p.stages.filter((x) => x.secretStdin))
      expect(s.stdin, s.id).to.be.oneOf(["answerFile", "guestKeyAndSettings"]);
    for (const id of ["renderEnv", "waitHost", "publish", "firmware"] as StageId[])
      expect(p.stage(id).secretStdin, id).to.equal(false);
    // The answer file goes from stdin straight into build-config-iso.sh: no plain copy on the host.
    expect(p.stage("configMedia").command).to.not.contain("cat >");
    expect(p.stage("configMedia").command).to.contain(" -=autounattend.xml ");
    // A killed run's staging folder is cleared first; once the ISO is built, the staged key is removed.
    expect(p.stage("configMedia").command).to.match(/^sudo -n rm -rf -- \/var\/lib\/windows-vm\/config && /);
    expect(p.stage("configMedia").command).to.match(
      /build-config-iso\.sh .* && sudo -n rm -rf -- \/var\/lib\/windows-vm\/config$/,
    );
  });

  it("the config ISO authorizes the guest-only key (a runtime token), not the pipeline's", () => {
    const cmd = plan().stage("configMedia").command as string;
    expect(plan().stage("configMedia").runtime).to.include("guestKey");
    expect(Object.keys(RUNTIME)).to.not.include("pipelineKey");
    const resolved = resolveCommand(cmd, { guestKey: "ssh-ed25519 AAAAguest guest" });
    expect(resolved).to.not.contain(RUNTIME.guestKey);
    // The key, spaces and all, is one word of printf inside the root shell that writes authorized_keys.
    const part = resolved.slice(
      resolved.indexOf("sudo -n bash -c 'umask 077 && printf"),
      resolved.indexOf(" && sudo -n env CONFIG_ISO_DRIVER_FOLDER="),
    );
    expect(bashWords(part)).to.deep.equal([
      "sudo",
      "-n",
      "bash",
      "-c",
      "umask 077 && printf '%s\\n' 'ssh-ed25519 AAAAguest guest' > /var/lib/windows-vm/config/authorized_keys",
    ]);
  });

  it("resolves runtime tokens and refuses to leave one unresolved", () => {
    const cmd = plan().stage("publish").command as string;
    expect(resolveCommand(cmd, { artifactUri: "s3://b/p/" })).to.contain(
      "publish-image.sh /var/lib/windows-vm 's3://b/p/'",
    );
    expect(() => resolveCommand(cmd, {})).to.throw(/no value for artifactUri/);
    // Tokens sit inside single quotes: a value holding one is refused, not spliced in.
    expect(() => resolveCommand(cmd, { artifactUri: "s3://b/it's/" })).to.throw(/artifactUri holds a single quote/);
    expect(Object.values(RUNTIME).every((t) => t.startsWith("@"))).to.equal(true);
    // The wrapped command resolves the same way (stage.sh gets the resolved command).
    const wrapped = resolveCommand(plan().stage("publish").hostCommand as string, { artifactUri: "s3://b/p/" });
    expect(bashWords(wrapped).at(-1)).to.equal(resolveCommand(cmd, { artifactUri: "s3://b/p/" }));
  });

  it("runtime values propagate downstream: a new host re-runs every host stage", () => {
    const p = plan();
    for (const s of p.stages.filter((x) => x.site === "host")) expect(s.runtime, s.id).to.include("hostId");
    for (const s of p.stages.filter((x) => x.site === "aws")) expect(s.runtime, s.id).to.not.include("hostId");
    expect(p.stage("publish").runtime).to.include.members(["artifactUri", "answerFile", "guestKey", "guestSettings"]);
    expect(p.stage("firmware").runtime).to.deep.equal(["hostId"]);
    // Guest settings reach the guest only over SSH: changing them provisions a fresh overlay, not a new base.
    for (const id of PROVISION) expect(p.stage(id).runtime, id).to.include("guestSettings");
    for (const id of INSTALL) expect(p.stage(id).runtime, id).to.not.include("guestSettings");
    // The answer file shapes the install (it is in the base key): a new one installs Windows again.
    for (const id of AFTER_START) expect(p.stage(id).runtime, id).to.include("answerFile");
    expect(p.stage("configMedia").runtime).to.not.include("guestSettings");
    expect(p.stage("configMedia").runtime).to.include.members(["answerFile", "guestKey"]);
  });

  it("ISO sources pass the disk size and the WinPE drivers, and get no answer file written into an image", () => {
    const p = plan({ windowsImageUrl: "https://example.com/Win11_ARM64.iso" });
    expect(p.stage("prepareDisk").command).to.match(/source\.iso \/var\/lib\/windows-vm\/install\.qcow2 64$/);
    expect(p.stage("configMedia").command).to.contain("CONFIG_ISO_DRIVERS_ISO=/var/lib/windows-vm/virtio-win.iso");
    expect(p.stages.map((s) => s.id)).to.not.include("injectAnswerFile");
    expect(
      changedStages(p, plan({ windowsImageUrl: "https://example.com/Win11_ARM64.iso", vmDiskGiB: "80" })),
    ).to.include("prepareDisk");
  });

  it("the local target runs the same host stages on this machine, as this user, under localWorkDir", () => {
    const aws = plan()
      .stages.filter((s) => s.site === "host" && !["waitHost", "idleGuard"].includes(s.id))
      .map((s) => s.id);
    const p = localPlan();
    expect(p.stages.map((s) => s.id)).to.deep.equal(aws);
    for (const s of p.stages) {
      expect(s.hostCommand ?? "", s.id).to.not.contain("sudo");
      expect(s.hostCommand ?? "", s.id).to.not.contain("/opt/windows-arm64-image");
      expect(s.dependsOn, s.id).to.not.include("waitHost");
    }
    expect(p.stage("firmware").command).to.equal("bash /tmp/w%i,x/provisioning/build-efi.sh /tmp/w%i,x/vm");
    expect(defaultArtifactUri(LOCAL_LAYOUT)).to.equal("file:///tmp/w%25i,x/artifacts/");
    const pub = resolveCommand(p.stage("publish").command as string, { artifactUri: defaultArtifactUri(LOCAL_LAYOUT) });
    expect(pub).to.contain("publish-image.sh /tmp/w%i,x/vm 'file:///tmp/w%25i,x/artifacts/'");
  });
});

describe("base checkpoint (baseImage)", () => {
  const ANSWER = "e".repeat(64);
  const config = (over: RawConfig = {}) => parseConfig({ ...RAW, ...over }, new Set(), MACHINE);
  const digestOf = (over: RawConfig = {}, hashes = HASHES, answer = ANSWER) =>
    baseDigest(baseParts(config(over), AWS_LAYOUT, hashes), answer);
  /** The base key a stage's command carries (base-image.sh ACTION VM_DIR 'KEY'; a key holds no single quote). */
  const keyIn = (cmd: string, action: string) => {
    const m = new RegExp(`/base-image\\.sh ${action} /var/lib/windows-vm '(\\{[^']*\\})'`).exec(cmd);
    expect(m, `base-image.sh ${action} in ${cmd}`).to.not.equal(null);
    return m?.[1];
  };

  // [what changes, config overrides, file edited, whether it makes a new base]
  const BASE_CASES: Array<[string, RawConfig, string | undefined, boolean]> = [
    ["the Windows image's SHA-256", { windowsImageSha256: "b".repeat(64) }, undefined, true],
    ["the virtio-win ISO's SHA-256", { virtioIsoSha256: "c".repeat(64) }, undefined, true],
    [
      "an OpenSSH zip",
      { openSshZipUrl: "s3://media/OpenSSH-ARM64.zip", openSshZipSha256: "d".repeat(64) },
      undefined,
      true,
    ],
    ["the machine options", { vmMachineOptions: "gic-version=3" }, undefined, true],
    ["writing the answer file into the image", { answerFileInImage: "false" }, undefined, true],
    ["the first-logon script", {}, "provisioning/windows/firstlogon.ps1", true],
    ["prepare-disk.sh (writes the install disk)", {}, "provisioning/prepare-disk.sh", true],
    ["inject-answer-file.sh (writes into the install disk)", {}, "provisioning/inject-answer-file.sh", true],
    ["the guest provisioning script", {}, "provisioning/windows/provision.ps1", false],
    ["the guest check script", {}, "provisioning/windows/check.ps1", false],
    ["the guest scripts' module", {}, "provisioning/windows/common.psm1", false],
    ["guest-run.sh", {}, "provisioning/guest-run.sh", false],
    ["run-vm.sh (the device wiring)", {}, "provisioning/run-vm.sh", false],
    ["start-vm.sh", {}, "provisioning/start-vm.sh", false],
    ["base-image.sh", {}, "provisioning/base-image.sh", false],
    ["publish-image.sh", {}, "provisioning/publish-image.sh", false],
    ["vCPUs", { vmCpus: "3" }, undefined, false],
    ["memory", { vmMemoryGiB: "16" }, undefined, false],
    ["a guest setting", { guestDisableUac: "false" }, undefined, false],
    ["the buildlet port", { vmBuildletPort: "8443" }, undefined, false],
    ["the Windows image's URL alone", { windowsImageUrl: "s3://other/win.vhdx" }, undefined, false],
  ];
  for (const [what, over, file, newBase] of BASE_CASES) {
    it(`${what}: ${newBase ? "a new base (baseImage re-runs, Windows is installed again)" : "the same base"}`, () => {
      const hashes = file ? { ...HASHES, [file]: "edited" } : HASHES;
      expect(digestOf(over, hashes) !== digestOf(), "base digest changed").to.equal(newBase);
      const changed = changedStages(plan(), plan(over, hashes));
      // A new base is a new install: every install stage re-runs. The same base: provisioning may re-run.
      // The install disk as well: the last one became the old base.
      if (newBase)
        expect(changed).to.include.members(["prepareDisk", "startVm", "waitGuest", "baseImage", "overlayDisk"]);
    });
  }

  it("a new answer file (admin user, locale, password, guest key: its SHA-256 at runtime) makes a new base", () => {
    expect(digestOf({}, HASHES, "f".repeat(64))).to.not.equal(digestOf());
    for (const id of ["prepareDisk", "baseImage"] as StageId[])
      expect(plan().stage(id).runtime).to.include("answerFile");
  });

  it("a guest-script or guest-settings change re-runs no install stage; an install-affecting one re-runs baseImage", () => {
    const p = plan();
    for (const f of ["provision.ps1", "check.ps1", "common.psm1"]) {
      const changed = changedStages(p, plan({}, { ...HASHES, [`provisioning/windows/${f}`]: "edited" }));
      expect(changed, f).to.include.members(["overlayDisk", "provisionGuest", "publish"]);
      expect(changed, f).to.not.include.members(["startVm"]).and.not.include("waitGuest").and.not.include("baseImage");
    }
    expect(changedStages(p, plan({ vmCpus: "3" }))).to.not.include("baseImage");
    expect(changedStages(p, plan({ windowsImageSha256: "b".repeat(64) }))).to.include("baseImage");
    expect(changedStages(p, plan({}, { ...HASHES, "provisioning/windows/firstlogon.ps1": "x" }))).to.include(
      "baseImage",
    );
  });

  it("the key is sorted JSON of exactly the parts; the digest is its SHA-256 with the answer file's hash in it", () => {
    const parts = baseParts(config(), AWS_LAYOUT, HASHES);
    expect(Object.keys(parts).sort()).to.deep.equal([
      "answerFileInImage",
      "answerFileSha256",
      "driverFolder",
      "firstLogon",
      "injectAnswerFile",
      "prepareDisk",
      "sourceFormat",
      "sourceSha256",
      "virtioSha256",
      "vmSettings",
    ]);
    expect(parts.answerFileSha256).to.equal(RUNTIME.answerFile);
    const key = baseKey(parts);
    expect(Object.keys(JSON.parse(key) as object)).to.deep.equal(Object.keys(parts).sort());
    const want = crypto.createHash("sha256").update(key.replace(RUNTIME.answerFile, ANSWER)).digest("hex");
    expect(baseDigest(parts, ANSWER)).to.equal(want);
    // An ISO install: the disk size shapes it too; no answer file is written into an image.
    const iso = baseParts(config({ windowsImageUrl: "https://example.com/Win11_ARM64.iso" }), AWS_LAYOUT, HASHES);
    expect(iso).to.include({ diskGiB: "64", sourceFormat: "iso", answerFileInImage: "false" });
    expect(iso).to.not.have.property("injectAnswerFile");
  });

  it("the install-affecting VM settings are the build env without the VM's size, ports and sockets", () => {
    const env = renderVmEnv(config({ vmMachineOptions: "gic-version=3" }), AWS_LAYOUT, "build");
    const kept = installVmSettings(env).split("\n");
    expect(kept).to.include("VM_MACHINE_OPTS=gic-version=3");
    expect(kept).to.include("VM_DISK=/var/lib/windows-vm/disk.qcow2");
    for (const l of kept) {
      expect(l).to.match(/^[A-Z_][A-Z0-9_]*=/);
      expect(NOT_INSTALL_AFFECTING_ENV, l).to.not.include(l.split("=")[0]);
    }
    expect(env).to.match(/^VM_CPUS=/m);
  });

  it("every install and provisioning stage carries the same base key; the install boots install.qcow2 only while its base is missing", () => {
    const p = plan();
    const key = baseKey(baseParts(config(), AWS_LAYOUT, HASHES));
    const start = p.stage("startVm").command as string;
    const wait = p.stage("waitGuest").command as string;
    const freeze = p.stage("baseImage").command as string;
    const overlay = p.stage("overlayDisk").command as string;
    const claim = p.stage("provisionGuest").command as string;
    expect(keyIn(start, "present")).to.equal(key);
    expect(keyIn(wait, "present")).to.equal(key);
    expect(keyIn(freeze, "freeze")).to.equal(key);
    expect(keyIn(overlay, "overlay")).to.equal(key);
    expect(keyIn(claim, "claim")).to.equal(key);
    // "present || boot": a present base skips the install boot and its wait.
    expect(start).to.match(
      /base-image\.sh present .* \|\| \{ sudo -n env VM_DISK=\/var\/lib\/windows-vm\/install\.qcow2 bash \S+\/start-vm\.sh /,
    );
    expect(wait).to.match(
      /base-image\.sh present .* \|\| sudo -n env SERIAL_LOG=\S+ .*wait-for-guest\.sh 127\.0\.0\.1 2222 3600$/,
    );
    // The base comes from a clean shutdown of the install VM.
    expect(freeze).to.match(
      /env VM_DISK=\/var\/lib\/windows-vm\/install\.qcow2 STOP_VM_REQUIRE_GRACEFUL=1 bash \S+\/stop-vm\.sh \S+\/qmp\.sock 600 && .*base-image\.sh freeze /,
    );
    // The overlay: any VM stopped, a fresh overlay, the build VM (disk.qcow2) booted, its SSH awaited.
    const order = [
      "stop-vm.sh",
      "base-image.sh overlay",
      "start-vm.sh /var/lib/windows-vm/vm-build.env",
      "wait-for-guest.sh",
    ];
    const at = order.map((w) => overlay.indexOf(w));
    expect(
      at.every((i) => i >= 0),
      overlay,
    ).to.equal(true);
    expect([...at].sort((a, b) => a - b)).to.deep.equal(at);
    expect(overlay).to.not.contain("install.qcow2");
    // Provisioning claims the overlay first: one an earlier run used is replaced.
    expect(claim.indexOf("base-image.sh claim")).to.be.below(claim.indexOf("guest-run.sh"));
    expect(p.stage("publish").command).to.contain("publish-image.sh /var/lib/windows-vm ");
  });

  it("the base's stages depend on what shaped it, the provisioning on the config media and the env", () => {
    const p = plan();
    expect(p.stage("startVm").dependsOn).to.not.include.members(["configMedia"]);
    expect(p.stage("startVm").dependsOn).to.not.include("renderEnv");
    expect(p.stage("startVm").after).to.include.members(["configMedia", "renderEnv"]);
    expect(p.stage("baseImage").dependsOn).to.deep.equal(["waitGuest"]);
    expect(p.stage("overlayDisk").dependsOn).to.have.members(["baseImage", "configMedia", "renderEnv"]);
    expect(p.stage("provisionGuest").dependsOn).to.deep.equal(["overlayDisk"]);
  });
});

describe("VM env file", () => {
  const c = parseConfig({ ...RAW, vmCpus: "4", vmMemoryGiB: "24", vmMachineOptions: "gic-version=max" });
  it("the build VM attaches the config ISO and keeps the host up", () => {
    const env = renderVmEnv(c, AWS_LAYOUT, "build");
    expect(env).to.match(/^VM_CPUS=4$/m);
    expect(env).to.match(/^VM_MEMORY_GIB=24$/m);
    expect(env).to.match(/^VM_MACHINE_OPTS=gic-version=max$/m);
    expect(env).to.match(/^VM_CONFIG_ISO=\/var\/lib\/windows-vm\/config\.iso$/m);
    expect(env).to.match(/^VM_HALT_ON_EXIT=0$/m);
    expect(env).to.match(/^VM_ACCEL=kvm$/m);
    expect(env).to.match(/^VM_IMDS_PROXY=1$/m);
  });
  it("the baked image's VM has no config ISO (it holds secrets) and halts the host on exit", () => {
    const env = renderVmEnv(c, AWS_LAYOUT, "image");
    expect(env).to.not.match(/VM_CONFIG_ISO/);
    expect(env).to.match(/^VM_HALT_ON_EXIT=1$/m);
    expect(env).to.match(/^VM_BUILDLET_PORT=443$/m);
  });
  it("every line is a comment or KEY=value without spaces", () => {
    for (const line of renderVmEnv(c, AWS_LAYOUT, "build").trim().split("\n")) {
      expect(line).to.match(/^(#.*|[A-Z_][A-Z0-9_]*=\S*)$/);
    }
  });
});

describe("guest provisioning command", () => {
  const c = parseConfig({
    ...RAW,
    guestInstallBuildlet: "true",
    buildletStage0Url: "https://example.com/stage0.exe",
    buildletStage0Sha256: "d".repeat(64),
    buildletEnv: "host-windows11-arm64-azure",
  });
  it("sends settings (with the password) as data, not in the command", () => {
    const s = guestSettings(c, "Secret-Pw1!");
    expect(s).to.include({ builderUser: "gopher", builderPassword: "Secret-Pw1!", installBuildlet: true });
    expect(s.buildletStage0Sha256).to.equal("d".repeat(64));
    expect(guestProvisionCommand()).to.not.contain("Secret-Pw1!");
  });
  it("a guest download installs only when its URL is set", () => {
    // Only the required keys: no download URL, so nothing to install (and no buildletEnv needed).
    const minimal = parseConfig({
      sshAllowedCidrs: RAW.sshAllowedCidrs,
      windowsImageUrl: RAW.windowsImageUrl,
      windowsImageSha256: RAW.windowsImageSha256,
      windowsVersion: RAW.windowsVersion,
    });
    expect(guestSettings(minimal, "pw")).to.include({
      installBuildlet: false,
      installLlvmMingw: false,
      installVsBuildTools: false,
    });
    const llvm = parseConfig({
      ...RAW,
      guestInstallLlvmMingw: undefined,
      llvmMingwUrl: "https://example.com/llvm-mingw.zip",
      llvmMingwSha256: "e".repeat(64),
    });
    expect(guestSettings(llvm, "pw")).to.include({
      installLlvmMingw: true,
      llvmMingwUrl: "https://example.com/llvm-mingw.zip",
    });
  });
  it("is powershell -EncodedCommand of the wrapper (UTF-16LE base64)", () => {
    const cmd = guestProvisionCommand();
    const m = /-EncodedCommand (\S+)$/.exec(cmd);
    expect(m).to.not.equal(null);
    expect(Buffer.from((m as RegExpExecArray)[1], "base64").toString("utf16le")).to.equal(GUEST_PROVISION_SCRIPT);
    expect(GUEST_PROVISION_SCRIPT).to.contain("provision.ps1").and.contain("check.ps1").and.contain("Remove-Item");
  });
});
