/**
 * The VM env file, rendered from config: the same file run-vm.sh reads and
 * the systemd unit uses as EnvironmentFile=. Two flavours: the build VM (the
 * config ISO attached, SSH forwarded for provisioning) and the baked image's
 * VM (no config ISO, since it holds secrets; halts the host when Windows
 * shuts down).
 */
import { StackConfig } from "../config";
import { VM_USER } from "../hostSetup";
import { gicVersionFor } from "../hostTypes";

export interface VmLayout {
  /** VM data folder on the host. */
  vmDir: string;
  /** Host loopback port forwarded to the guest's SSH. */
  sshPort: number;
  /** kvm on the metal host; tcg where there is no KVM (tests, x86 workstations). */
  accel: "kvm" | "tcg";
}

/** VNC display for the build VM, loopback only (port 5900 + 3 = 5903, as the original runbook). */
export const BUILD_VNC_DISPLAY = 3;

/**
 * VM_GIC_VERSION: a gic-version= in vmMachineOptions, else the host type's
 * (gicVersionFor). run-vm.sh pins the machine type itself (VM_MACHINE_TYPE
 * auto: the versioned virt-X.Y of the host's QEMU) and writes what it used to
 * vm-resolved.env in VM_DIR.
 */
export function vmGicVersion(c: StackConfig, L: VmLayout): string {
  const fromOptions = /(?:^|,)gic-version=([^,]*)/.exec(c.vm.machineOptions)?.[1];
  return fromOptions ?? gicVersionFor(c.host.type, L.accel, c.vm.cpus);
}

export function renderVmEnv(c: StackConfig, L: VmLayout, kind: "build" | "image"): string {
  const vars: Array<[string, string]> = [
    ["VM_DIR", L.vmDir],
    ["VM_CPUS", String(c.vm.cpus)],
    ["VM_MEMORY_GIB", String(c.vm.memoryGiB)],
    ["VM_ACCEL", L.accel],
    ["VM_GIC_VERSION", vmGicVersion(c, L)],
    ["VM_MACHINE_OPTS", c.vm.machineOptions],
    ["VM_DISK", `${L.vmDir}/disk.qcow2`],
    ["VM_EFI_CODE", `${L.vmDir}/QEMU_EFI.fd`],
    ["VM_EFI_VARS", `${L.vmDir}/QEMU_VARS.fd`],
    ["VM_SSH_PORT", String(L.sshPort)],
    ["VM_QMP_SOCKET", `${L.vmDir}/qmp.sock`],
    ["VM_SERIAL_LOG", `${L.vmDir}/serial.log`],
    ["VM_IMDS_PROXY", c.target === "aws" ? "1" : "0"],
    // On AWS, QEMU runs the guest unprivileged (a missing account is an error, not a warning).
    ["VM_USER", c.target === "aws" ? VM_USER : ""],
  ];
  if (kind === "build") {
    // The image VM has its drivers installed, and the bake publishes no drivers ISO.
    vars.push(["VM_DRIVERS_ISO", `${L.vmDir}/virtio-win.iso`]);
    vars.push(["VM_CONFIG_ISO", `${L.vmDir}/config.iso`]);
    if (c.image.format === "iso") vars.push(["VM_INSTALL_ISO", `${L.vmDir}/source.iso`]);
    vars.push(["VM_VNC_DISPLAY", String(BUILD_VNC_DISPLAY)]);
    // The build VM listens for the buildlet on a spare port: 443 stays free on the host.
    vars.push(["VM_BUILDLET_PORT", String(L.sshPort + 1)]);
    vars.push(["VM_HALT_ON_EXIT", "0"]);
  } else {
    vars.push(["VM_BUILDLET_PORT", String(c.vm.buildletPort)]);
    vars.push(["VM_HALT_ON_EXIT", "1"]);
  }
  const header = [
    `# windows-arm64-image: ${kind === "build" ? "build VM (provisioning)" : "baked image VM (windows-vm.service)"}`,
    "# Rendered by the stack from its config; edits are overwritten by the next pulumi up.",
  ];
  return [...header, ...vars.filter(([, v]) => v !== "").map(([k, v]) => `${k}=${v}`)].join("\n") + "\n";
}
