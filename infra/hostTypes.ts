/**
 * Graviton instance types that expose KVM: only the bare-metal sizes do.
 * Kept as data so validation, messages and docs all read one table.
 */

export type GravitonGeneration = 1 | 2 | 3 | 4;

export interface HostType {
  /** EC2 instance type name. */
  name: string;
  /** Physical cores (vCPUs; Graviton has no SMT). */
  cores: number;
  memoryGiB: number;
  generation: GravitonGeneration;
  /** CPU core and Arm architecture level, for messages. */
  cpu: string;
  armArch: "ARMv8.0" | "ARMv8.2" | "ARMv8.4" | "ARMv9.0";
  /** ARMv8.1 LSE atomics: required by Windows 11 24H2 and later (build 25168+). */
  lseAtomics: boolean;
}

const G1 = { generation: 1, cpu: "Graviton1 (Cortex-A72)", armArch: "ARMv8.0", lseAtomics: false } as const;
const G2 = { generation: 2, cpu: "Graviton2 (Neoverse N1)", armArch: "ARMv8.2", lseAtomics: true } as const;
const G3 = { generation: 3, cpu: "Graviton3 (Neoverse V1)", armArch: "ARMv8.4", lseAtomics: true } as const;
const G4 = { generation: 4, cpu: "Graviton4 (Neoverse V2)", armArch: "ARMv9.0", lseAtomics: true } as const;

export const HOST_TYPES: readonly HostType[] = Object.freeze([
  { name: "a1.metal", cores: 16, memoryGiB: 32, ...G1 },
  { name: "c6g.metal", cores: 64, memoryGiB: 128, ...G2 },
  { name: "c6gd.metal", cores: 64, memoryGiB: 128, ...G2 },
  { name: "c6gn.metal", cores: 64, memoryGiB: 128, ...G2 },
  { name: "m6g.metal", cores: 64, memoryGiB: 256, ...G2 },
  { name: "m6gd.metal", cores: 64, memoryGiB: 256, ...G2 },
  { name: "r6g.metal", cores: 64, memoryGiB: 512, ...G2 },
  { name: "r6gd.metal", cores: 64, memoryGiB: 512, ...G2 },
  { name: "x2gd.metal", cores: 64, memoryGiB: 1024, ...G2 },
  { name: "c7g.metal", cores: 64, memoryGiB: 128, ...G3 },
  { name: "c7gd.metal", cores: 64, memoryGiB: 128, ...G3 },
  { name: "c7gn.metal", cores: 64, memoryGiB: 128, ...G3 },
  { name: "m7g.metal", cores: 64, memoryGiB: 256, ...G3 },
  { name: "m7gd.metal", cores: 64, memoryGiB: 256, ...G3 },
  { name: "r7g.metal", cores: 64, memoryGiB: 512, ...G3 },
  { name: "r7gd.metal", cores: 64, memoryGiB: 512, ...G3 },
  { name: "c8g.metal-24xl", cores: 96, memoryGiB: 192, ...G4 },
  { name: "c8g.metal-48xl", cores: 192, memoryGiB: 384, ...G4 },
  { name: "m8g.metal-24xl", cores: 96, memoryGiB: 384, ...G4 },
  { name: "m8g.metal-48xl", cores: 192, memoryGiB: 768, ...G4 },
  { name: "r8g.metal-24xl", cores: 96, memoryGiB: 768, ...G4 },
  { name: "r8g.metal-48xl", cores: 192, memoryGiB: 1536, ...G4 },
]);

export function findHostType(name: string): HostType | undefined {
  return HOST_TYPES.find((t) => t.name === name);
}

/** The cheapest-first list of types that can run a Windows build needing LSE atomics. */
export function typesWithAtomics(): string[] {
  return HOST_TYPES.filter((t) => t.lseAtomics).map((t) => t.name);
}

/**
 * Graviton (arm64) instance families and their sizes, for instances that need
 * not be bare metal (the AMI bake instance). An arm64 AMI boots only on these.
 */
export interface GravitonFamily {
  family: string;
  generation: GravitonGeneration;
  sizes: readonly string[];
}

const UP_TO_16XL = ["medium", "large", "xlarge", "2xlarge", "4xlarge", "8xlarge", "12xlarge", "16xlarge"];
const G2_G3_SIZES = [...UP_TO_16XL, "metal"];
const G4_SIZES = [...UP_TO_16XL, "24xlarge", "48xlarge", "metal-24xl", "metal-48xl"];

export const GRAVITON_FAMILIES: readonly GravitonFamily[] = Object.freeze([
  { family: "a1", generation: 1, sizes: ["medium", "large", "xlarge", "2xlarge", "4xlarge", "metal"] },
  { family: "t4g", generation: 2, sizes: ["nano", "micro", "small", "medium", "large", "xlarge", "2xlarge"] },
  ...["c6g", "c6gd", "c6gn", "m6g", "m6gd", "r6g", "r6gd", "x2gd"].map((family) => ({
    family,
    generation: 2 as const,
    sizes: G2_G3_SIZES,
  })),
  { family: "g5g", generation: 2, sizes: ["xlarge", "2xlarge", "4xlarge", "8xlarge", "16xlarge", "metal"] },
  { family: "im4gn", generation: 2, sizes: ["large", "xlarge", "2xlarge", "4xlarge", "8xlarge", "16xlarge"] },
  { family: "is4gen", generation: 2, sizes: ["medium", "large", "xlarge", "2xlarge", "4xlarge", "8xlarge"] },
  { family: "i4g", generation: 2, sizes: ["large", "xlarge", "2xlarge", "4xlarge", "8xlarge", "16xlarge"] },
  ...["c7g", "c7gd", "c7gn", "m7g", "m7gd", "r7g", "r7gd"].map((family) => ({
    family,
    generation: 3 as const,
    sizes: G2_G3_SIZES,
  })),
  { family: "hpc7g", generation: 3, sizes: ["4xlarge", "8xlarge", "16xlarge"] },
  ...["c8g", "c8gd", "c8gn", "m8g", "m8gd", "r8g", "r8gd", "x8g"].map((family) => ({
    family,
    generation: 4 as const,
    sizes: G4_SIZES,
  })),
  {
    family: "i8g",
    generation: 4,
    sizes: [
      "large",
      "xlarge",
      "2xlarge",
      "4xlarge",
      "8xlarge",
      "12xlarge",
      "16xlarge",
      "24xlarge",
      "48xlarge",
      "metal-24xl",
    ],
  },
] as GravitonFamily[]);

export function findGravitonFamily(family: string): GravitonFamily | undefined {
  return GRAVITON_FAMILIES.find((f) => f.family === family);
}

/**
 * Why an instance type cannot run an arm64 AMI, or undefined when it can:
 * "family" (not a Graviton family), "size" (no such size in the family) or "form".
 */
export function gravitonTypeProblem(name: string): "form" | "family" | "size" | undefined {
  const m = /^([a-z][a-z0-9-]*)\.([a-z0-9-]+)$/.exec(name);
  if (!m) return "form";
  const fam = findGravitonFamily(m[1]);
  if (!fam) return "family";
  return fam.sizes.includes(m[2]) ? undefined : "size";
}

/** The nearest Graviton type for an x86 (or unknown) one: same class and size where there is one. */
export function gravitonCounterpart(name: string): string {
  const m = /^([a-z]+)\d*[a-z-]*\.([a-z0-9-]+)$/.exec(name);
  const byClass: Record<string, string> = { t: "t4g", c: "c7g", m: "m7g", r: "r7g", x: "x2gd", i: "i4g" };
  const family = findGravitonFamily((m && byClass[m[1][0]]) ?? "c7g") as GravitonFamily;
  const size = m && family.sizes.includes(m[2]) ? m[2] : "large";
  return `${family.family}.${size}`;
}

/** The GIC version the VM is given (run-vm.sh VM_GIC_VERSION). */
export type GicVersion = "2" | "3";

/**
 * The interrupt controller the VM gets on a host type, set explicitly so that
 * neither a QEMU upgrade nor a host change switches it under an installed
 * Windows. With KVM and no gic-version, QEMU picks GICv2 when the host's GIC
 * can emulate one and the VM has at most 8 vCPUs, else GICv3 with ITS:
 * a1.metal (Graviton1) got GICv2 from the original launcher's 4 vCPUs, and
 * keeps it; more vCPUs there, and every later Graviton, get GICv3. Under TCG
 * (no host GIC) GICv3, which QEMU emulates with its ITS (MSI-X for NVMe).
 */
export function gicVersionFor(host: HostType, accel: "kvm" | "tcg", cpus: number): GicVersion {
  if (accel === "tcg") return "3";
  return host.generation === 1 && cpus <= 8 ? "2" : "3";
}
