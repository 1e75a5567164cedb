import { expect } from "chai";
import * as fs from "fs";
import * as path from "path";
import { parseConfig, RawConfig } from "../../infra/config";
import { guestSettings, guestProvisionCommand, GUEST_PROVISION_SCRIPT } from "../../infra/pipeline/guest";
import {
  AWS_LAYOUT,
  buildPlan,
  changedStages,
  hostFiles,
  Plan,
  resolveCommand,
  RUNTIME,
  STAGE_IDS,
  StageId,
} from "../../infra/pipeline/plan";
import { renderVmEnv } from "../../infra/pipeline/vmEnv";
import { repoRoot } from "../support/run";

const RAW: RawConfig = {
  sshAllowedCidrs: '["203.0.113.7/32"]',
  windowsImageUrl: "s3://media/win.vhdx",
  windowsImageSha256: "a".repeat(64),
  windowsVersion: "11-23h2",
  guestInstallBuildlet: "false",
  guestInstallLlvmMingw: "false",
  guestInstallVsBuildTools: "false",
};

const HASHES = Object.fromEntries(hostFiles().map((f) => [f, `hash-of-${f}`]));

function plan(over: RawConfig = {}, hashes: Record<string, string> = HASHES): Plan {
  return buildPlan({ config: parseConfig({ ...RAW, ...over }), layout: AWS_LAYOUT, fileHashes: hashes });
}

/** The stages from booting the VM to the end (STAGE_IDS is the pipeline's order). */
const AFTER_START: StageId[] = STAGE_IDS.slice(STAGE_IDS.indexOf("startVm"));

describe("pipeline plan", () => {
  it("orders the stages as the pipeline runs them", () => {
    expect(plan().stages.map((s) => s.id)).to.deep.equal([...STAGE_IDS]);
  });

  it("every dependency comes earlier in the order", () => {
    const p = plan();
    p.stages.forEach((s, i) => {
      for (const d of s.dependsOn)
        expect(
          p.stages.findIndex((x) => x.id === d),
          `${s.id} <- ${d}`,
        ).to.be.lessThan(i);
    });
  });

  it("the local target has no AMI stages", () => {
    const p = plan({ target: "local", sshAllowedCidrs: "[]" });
    expect(p.stages.map((s) => s.id)).to.not.include.members(["prepareAmi", "bakeAmi", "stopHost"]);
    expect(p.stages.at(-1)?.id).to.equal("publish");
  });

  it("re-runs nothing when nothing changes", () => {
    expect(changedStages(plan(), plan())).to.deep.equal([]);
  });

  // [what changes, config overrides, file edited, stages that must re-run]
  const CASES: Array<[string, RawConfig, string | undefined, StageId[]]> = [
    ["build-efi.sh", {}, "provisioning/build-efi.sh", ["firmware", ...AFTER_START]],
    [
      "fetch-image.sh",
      {},
      "provisioning/fetch-image.sh",
      ["fetchImage", "fetchDrivers", "prepareDisk", "configMedia", ...AFTER_START],
    ],
    ["prepare-disk.sh", {}, "provisioning/prepare-disk.sh", ["prepareDisk", ...AFTER_START]],
    [
      "the shared lib.sh",
      {},
      "provisioning/lib.sh",
      ["fetchImage", "fetchDrivers", "prepareDisk", "configMedia", ...AFTER_START],
    ],
    ["run-vm.sh", {}, "provisioning/run-vm.sh", [...AFTER_START]],
    ["start-vm.sh", {}, "provisioning/start-vm.sh", [...AFTER_START]],
    ["wait-for-guest.sh", {}, "provisioning/wait-for-guest.sh", AFTER_START.filter((s) => s !== "startVm")],
    ["the guest provisioning script", {}, "provisioning/windows/provision.ps1", ["configMedia", ...AFTER_START]],
    ["the first-logon script", {}, "provisioning/windows/firstlogon.ps1", ["configMedia", ...AFTER_START]],
    ["stop-vm.sh", {}, "provisioning/stop-vm.sh", ["stopVm", "publish", "prepareAmi", "bakeAmi", "stopHost"]],
    ["publish-image.sh", {}, "provisioning/publish-image.sh", ["publish", "prepareAmi", "bakeAmi", "stopHost"]],
    ["prepare-ami.sh", {}, "provisioning/prepare-ami.sh", ["prepareAmi", "bakeAmi", "stopHost"]],
    ["the systemd unit", {}, "assets/windows-vm.service", ["prepareAmi", "bakeAmi", "stopHost"]],
    [
      "the Windows image hash",
      { windowsImageSha256: "b".repeat(64) },
      undefined,
      ["fetchImage", "prepareDisk", ...AFTER_START],
    ],
    [
      "the virtio ISO hash",
      { virtioIsoSha256: "c".repeat(64) },
      undefined,
      ["fetchDrivers", "configMedia", ...AFTER_START],
    ],
    ["vCPUs", { vmCpus: "3" }, undefined, ["renderEnv", ...AFTER_START]],
    ["memory", { vmMemoryGiB: "16" }, undefined, ["renderEnv", ...AFTER_START]],
    [
      "the buildlet port (baked image only)",
      { vmBuildletPort: "8443" },
      undefined,
      ["prepareAmi", "bakeAmi", "stopHost"],
    ],
    // A new host is also a new runtime hostId, which re-copies every file (see runtime tests).
    // In-place host changes keep the host's disk and work (a replaced host is a new runtime hostId).
    ["the host type (changed in place)", { hostInstanceType: "c6g.metal" }, undefined, []],
    ["the host volume's IOPS", { hostVolumeIops: "6000" }, undefined, []],
    ["keepHostRunning", { keepHostRunning: "true" }, undefined, ["stopHost"]],
    ["the artifact prefix (bucket URI is a runtime value)", { artifactPrefix: "other/" }, undefined, []],
  ];

  for (const [what, over, file, expected] of CASES) {
    it(`changing ${what} re-runs exactly ${expected.length} stage(s)`, () => {
      const hashes = file ? { ...HASHES, [file]: "edited" } : HASHES;
      const got = changedStages(plan(), plan(over, hashes));
      // An edited file is also re-copied to the host.
      const want = [...new Set(file ? ["uploadFiles" as StageId, ...expected] : expected)];
      expect(got).to.have.members(want);
      expect(got).to.have.length(want.length);
    });
  }

  it("an OpenSSH zip, when given, is fetched with the drivers and put on the config ISO", () => {
    const zip = { openSshZipUrl: "s3://media/OpenSSH-ARM64.zip", openSshZipSha256: "d".repeat(64) };
    const p = plan(zip);
    expect(p.stage("fetchDrivers").command).to.contain(
      `fetch-image.sh s3://media/OpenSSH-ARM64.zip ${"d".repeat(64)} /var/lib/windows-vm/OpenSSH-ARM64.zip`,
    );
    expect(p.stage("configMedia").command).to.contain("/var/lib/windows-vm/OpenSSH-ARM64.zip=OpenSSH-ARM64.zip");
    expect(plan().stage("configMedia").command).to.not.contain("OpenSSH");
    expect(changedStages(plan(), p)).to.have.members(["fetchDrivers", "configMedia", ...AFTER_START]);
  });

  it("the uploadFiles stage lists every file a stage runs", () => {
    const p = plan();
    const all = new Set(p.stage("uploadFiles").files);
    for (const s of p.stages) for (const f of s.files) expect(all.has(f), f).to.equal(true);
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
    expect([...sourcing].sort()).to.deep.equal(
      ["fetch-image", "prepare-disk", "publish-image", "start-vm", "stop-vm", "wait-for-guest"].map(
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
      "prepare-disk.sh /var/lib/windows-vm/source.vhdx /var/lib/windows-vm/disk.qcow2",
    );
    expect(p.stage("startVm").command).to.contain("start-vm.sh /var/lib/windows-vm/vm-build.env windows-vm-build");
    expect(p.stage("stopVm").command).to.contain("stop-vm.sh /var/lib/windows-vm/qmp.sock 600");
    expect(p.stage("publish").command).to.match(
      /env IMAGE_SOURCE_URL=s3:\/\/media\/win\.vhdx .*WINDOWS_VERSION=11-23h2 bash .*publish-image\.sh \/var\/lib\/windows-vm '@ARTIFACT_URI@'/,
    );
    expect(p.stage("prepareAmi").command).to.contain("prepare-ami.sh --generalize / /var/lib/windows-vm/vm.env");
  });

  it("secrets reach the host on stdin, never in a command", () => {
    const p = plan();
    expect(p.stage("configMedia").stdin).to.equal("answerFile");
    expect(p.stage("provisionGuest").stdin).to.equal("guestSettings");
    expect(p.stage("configMedia").command).to.contain("cat > /var/lib/windows-vm/config/autounattend.xml");
    // Once the ISO is built, the staged plain copies are removed.
    expect(p.stage("configMedia").command).to.match(
      /build-config-iso\.sh .* && sudo -n rm -rf -- \/var\/lib\/windows-vm\/config$/,
    );
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
  });

  it("runtime values propagate downstream: a new host re-runs every host stage", () => {
    const p = plan();
    for (const s of p.stages.filter((x) => x.site !== "aws")) expect(s.runtime, s.id).to.include("hostId");
    expect(p.stage("publish").runtime).to.include.members(["artifactUri", "answerFile", "guestSettings"]);
    expect(p.stage("firmware").runtime).to.deep.equal(["hostId"]);
    // Guest settings reach the guest only over SSH: changing them boots the VM again before provisioning.
    for (const id of ["startVm", "waitGuest", "provisionGuest", "stopVm", "publish"] as StageId[]) {
      expect(p.stage(id).runtime, id).to.include("guestSettings");
    }
    expect(p.stage("configMedia").runtime).to.not.include("guestSettings");
  });

  it("ISO sources pass the disk size and the WinPE drivers", () => {
    const p = plan({ windowsImageUrl: "https://example.com/Win11_ARM64.iso" });
    expect(p.stage("prepareDisk").command).to.match(/source\.iso \/var\/lib\/windows-vm\/disk\.qcow2 64$/);
    expect(p.stage("configMedia").command).to.contain("CONFIG_ISO_DRIVERS_ISO=/var/lib/windows-vm/virtio-win.iso");
    expect(
      changedStages(p, plan({ windowsImageUrl: "https://example.com/Win11_ARM64.iso", vmDiskGiB: "80" })),
    ).to.include("prepareDisk");
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
  });
  it("sends settings (with the password) as data, not in the command", () => {
    const s = guestSettings(c, "Secret-Pw1!");
    expect(s).to.include({ builderUser: "gopher", builderPassword: "Secret-Pw1!", installBuildlet: true });
    expect(s.buildletStage0Sha256).to.equal("d".repeat(64));
    expect(guestProvisionCommand()).to.not.contain("Secret-Pw1!");
  });
  it("is powershell -EncodedCommand of the wrapper (UTF-16LE base64)", () => {
    const cmd = guestProvisionCommand();
    const m = /-EncodedCommand (\S+)$/.exec(cmd);
    expect(m).to.not.equal(null);
    expect(Buffer.from((m as RegExpExecArray)[1], "base64").toString("utf16le")).to.equal(GUEST_PROVISION_SCRIPT);
    expect(GUEST_PROVISION_SCRIPT).to.contain("provision.ps1").and.contain("check.ps1").and.contain("Remove-Item");
  });
});
