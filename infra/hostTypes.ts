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
