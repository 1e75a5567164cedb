import { expect } from "chai";
import * as fs from "fs";
import * as path from "path";
import { parseConfig, RawConfig } from "../../infra/config";
import { findHostType, gicVersionFor, HOST_TYPES, HostType } from "../../infra/hostTypes";
import { AWS_LAYOUT, buildPlan, GUEST_SHUTDOWN_TIMEOUT_S, planFiles } from "../../infra/pipeline/plan";
import { renderVmEnv, vmGicVersion } from "../../infra/pipeline/vmEnv";
import { VALID_RAW } from "../support/config";
import { repoRoot } from "../support/run";

// The VM launch settings that are decided in infra/ (GIC version per host
// type, the stop window shared by the image unit and the pipeline).

const RAW: RawConfig = VALID_RAW;

const host = (name: string): HostType => findHostType(name) as HostType;

describe("GIC version per host type (gicVersionFor)", () => {
  it("a1.metal keeps the GICv2 QEMU gave the original launcher (KVM, at most 8 vCPUs)", () => {
    for (const cpus of [1, 4, 8]) expect(gicVersionFor(host("a1.metal"), "kvm", cpus), `${cpus}`).to.equal("2");
  });
  it("a1.metal with more than 8 vCPUs gets GICv3 (a GICv2 has 8 CPU interfaces)", () => {
    expect(gicVersionFor(host("a1.metal"), "kvm", 9)).to.equal("3");
    expect(gicVersionFor(host("a1.metal"), "kvm", 16)).to.equal("3");
  });
  it("every Graviton2 and later host type gets GICv3, whatever the vCPU count", () => {
    const later = HOST_TYPES.filter((t) => t.generation > 1);
    expect(later.length).to.be.greaterThan(10);
    for (const t of later) {
      for (const cpus of [1, 4, 8, 64]) expect(gicVersionFor(t, "kvm", cpus), `${t.name} ${cpus}`).to.equal("3");
    }
  });
  it("TCG gets GICv3 on any host type", () => {
    for (const t of HOST_TYPES) expect(gicVersionFor(t, "tcg", 4), t.name).to.equal("3");
  });
});

describe("VM env: GIC version and machine type", () => {
  it("renders the host type's GIC version into the build and the image env", () => {
    const a1 = parseConfig({ ...RAW, hostInstanceType: "a1.metal", vmCpus: "4" });
    const c7 = parseConfig({ ...RAW, hostInstanceType: "c7g.metal", windowsVersion: "11-24h2", vmCpus: "4" });
    for (const kind of ["build", "image"] as const) {
      expect(renderVmEnv(a1, AWS_LAYOUT, kind), kind).to.match(/^VM_GIC_VERSION=2$/m);
      expect(renderVmEnv(c7, AWS_LAYOUT, kind), kind).to.match(/^VM_GIC_VERSION=3$/m);
    }
    expect(renderVmEnv(a1, { ...AWS_LAYOUT, accel: "tcg" }, "build")).to.match(/^VM_GIC_VERSION=3$/m);
  });
  it("a gic-version= in vmMachineOptions is the GIC version (run-vm.sh refuses two that differ)", () => {
    const c = parseConfig({ ...RAW, vmMachineOptions: "its=off,gic-version=max" });
    expect(vmGicVersion(c, AWS_LAYOUT)).to.equal("max");
    expect(renderVmEnv(c, AWS_LAYOUT, "build")).to.match(/^VM_GIC_VERSION=max$/m);
    const noGic = parseConfig({ ...RAW, vmMachineOptions: "its=off,xgic-version=2" });
    expect(vmGicVersion(noGic, AWS_LAYOUT)).to.equal("2");
  });
  it("leaves the machine type to run-vm.sh (auto: the host QEMU's versioned virt-X.Y)", () => {
    const env = renderVmEnv(parseConfig(RAW), AWS_LAYOUT, "build");
    expect(env).to.not.match(/VM_MACHINE_TYPE/);
    const launcher = fs.readFileSync(path.join(repoRoot, "provisioning", "run-vm.sh"), "utf8");
    expect(launcher).to.match(/^VM_MACHINE_TYPE=\$\{VM_MACHINE_TYPE:-auto\}$/m);
  });
});

describe("the VM's stop window: one value for the image unit and the pipeline", () => {
  const unit = fs.readFileSync(path.join(repoRoot, "assets", "windows-vm.service"), "utf8");

  it("windows-vm.service's TimeoutStopSec is GUEST_SHUTDOWN_TIMEOUT_S", () => {
    const m = /^TimeoutStopSec=(\d+)$/m.exec(unit);
    expect(m, "TimeoutStopSec line").to.not.equal(null);
    expect(Number(m![1])).to.equal(GUEST_SHUTDOWN_TIMEOUT_S);
    expect(unit.match(/^TimeoutStopSec=/gm)).to.have.length(1);
  });
  it("the stopVm stage gives stop-vm.sh GUEST_SHUTDOWN_TIMEOUT_S, and that is stop-vm.sh's default too", () => {
    const hashes = Object.fromEntries(planFiles().map((f) => [f, `hash-of-${f}`]));
    const plan = buildPlan({ config: parseConfig(RAW), layout: AWS_LAYOUT, fileHashes: hashes });
    expect(plan.stage("stopVm").command).to.match(
      new RegExp(`stop-vm\\.sh \\S+qmp\\.sock ${GUEST_SHUTDOWN_TIMEOUT_S}\\b`),
    );
    const stopVm = fs.readFileSync(path.join(repoRoot, "provisioning", "stop-vm.sh"), "utf8");
    expect(stopVm).to.match(new RegExp(`^timeout_s=\\$\\{2:-${GUEST_SHUTDOWN_TIMEOUT_S}\\}$`, "m"));
  });
  it("base-image.sh claim (a VM left running by an earlier run) stops it within the same window", () => {
    const base = fs.readFileSync(path.join(repoRoot, "provisioning", "base-image.sh"), "utf8");
    expect(base).to.match(
      new RegExp(`^stop_timeout_s=\\$\\{BASE_IMAGE_STOP_TIMEOUT_S:-${GUEST_SHUTDOWN_TIMEOUT_S}\\}$`, "m"),
    );
  });
});
