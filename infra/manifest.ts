/**
 * The manifest publish-image.sh writes next to a published image
 * (`<prefix>/<sha256>/manifest.json`, copied to `<prefix>/latest.json`) and
 * prints as one compact JSON line on stdout. Pure: no Pulumi, no I/O.
 */

/** The manifest format this stack writes and reads. */
export const MANIFEST_VERSION = 2;

/** The files of a published image, in the order the manifest lists them. */
export const MANIFEST_FILES = ["disk.qcow2", "QEMU_VARS.fd", "QEMU_EFI.fd"] as const;
export type ManifestFileName = (typeof MANIFEST_FILES)[number];

/** One published file. */
export interface ManifestFile {
  /** File name inside `<prefix>/<sha256>/`: one of MANIFEST_FILES. */
  name: string;
  /** Where it is: `s3://bucket/<prefix>/<sha256>/<name>` or `file:///dir/<sha256>/<name>`. */
  uri: string;
  /** SHA-256 of its content, 64 lower-case hex digits. */
  sha256: string;
  /** Size in bytes. */
  size: number;
}

/** How the published qcow2's clusters are stored (config imageCompression). */
export const IMAGE_COMPRESSIONS = ["none", "zstd"] as const;
export type ImageCompression = (typeof IMAGE_COMPRESSIONS)[number];

/** The file the guest's check step writes, published next to the manifest. */
export const SOFTWARE_REPORT_FILE = "software-report.json";

/** The software report published with the image (`<prefix>/<sha256>/software-report.json`). */
export interface ManifestSoftwareReport {
  name: typeof SOFTWARE_REPORT_FILE;
  uri: string;
  sha256: string;
  size: number;
}

/** The host's QEMU and firmware the image ran with (null: not known on that host). */
export interface ManifestHost {
  /** First line of `qemu-system-aarch64 --version`. */
  qemuVersion: string | null;
  /** Version of the qemu-system-arm package (dpkg). */
  qemuPackage: string | null;
  /** Version of the qemu-efi-aarch64 package (dpkg). */
  firmwarePackage: string | null;
}

/** The machine settings the image ran with, from the VM env file (PUBLISH_VM_ENV). */
export interface ManifestMachine {
  /** VM_MACHINE_OPTS: extra `-machine virt,...` options ("" when none). */
  machineOptions: string;
  /** VM_CPUS (null: not in the env file, run-vm.sh's default applied). */
  cpus: number | null;
  /** VM_MEMORY_GIB (null: not in the env file). */
  memoryGiB: number | null;
  /** VM_ACCEL: kvm or tcg (null: not in the env file). */
  accel: string | null;
  /** VM_MACHINE_TYPE (virt-X.Y) from VM_DIR/vm-resolved.env, else from the env file; absent when neither has it. */
  machineType?: string;
  /** VM_GIC_VERSION from VM_DIR/vm-resolved.env, else from the env file; absent when neither has it. */
  gicVersion?: string;
}

/** manifestVersion 2. The top-level fields of version 1 are all kept. */
export interface Manifest {
  manifestVersion: number;
  /** SHA-256 of disk.qcow2: the image's identity and its key prefix. */
  sha256: string;
  /** Size of disk.qcow2 in bytes. */
  size: number;
  format: string;
  /** The disk's virtual size in bytes. */
  virtualSize: number;
  /** How disk.qcow2's clusters are stored: none or zstd. */
  compression: ImageCompression;
  /** Guest data the image holds: its `qemu-img map` extents with data that are not zero. */
  allocatedBytes: number;
  /** Bytes of the published (flattened, compacted) disk.qcow2: equals size. */
  publishedBytes: number;
  imageUri: string;
  varsUri: string;
  varsSha256: string;
  varsSize: number;
  efiUri: string;
  efiSha256: string;
  efiSize: number;
  manifestUri: string;
  /** Every file of the image: disk.qcow2, QEMU_VARS.fd, QEMU_EFI.fd. */
  files: ManifestFile[];
  /** The guest's software report next to the manifest (null: the VM folder had none). */
  softwareReport: ManifestSoftwareReport | null;
  host: ManifestHost;
  /** null when the publish was not told the VM env file. */
  machine: ManifestMachine | null;
  sourceUrl: string | null;
  sourceSha256: string | null;
  windowsVersion: string | null;
  /** When the image was published, `YYYY-MM-DDTHH:MM:SSZ` (UTC). */
  createdAt: string;
}

const SHA256 = /^[0-9a-f]{64}$/;

function isSize(v: unknown): v is number {
  return typeof v === "number" && Number.isSafeInteger(v) && v >= 0;
}

/**
 * Parses publish-image.sh's stdout: its last non-empty line is the manifest
 * JSON. Throws naming what is missing or malformed.
 */
export function parseManifest(stdout: string): Manifest {
  const line = stdout.trim().split("\n").filter(Boolean).pop() ?? "";
  let parsed: unknown;
  try {
    parsed = JSON.parse(line);
  } catch {
    parsed = undefined;
  }
  if (typeof parsed !== "object" || parsed === null || Array.isArray(parsed)) {
    throw new Error(`publish-image.sh did not print a manifest (last line: ${JSON.stringify(line.slice(0, 200))})`);
  }
  const m = parsed as Record<string, unknown>;
  for (const k of ["sha256", "imageUri", "manifestUri", "createdAt"] as const) {
    if (typeof m[k] !== "string") throw new Error(`publish-image.sh manifest lacks ${k}`);
  }
  if (!SHA256.test(m.sha256 as string)) {
    throw new Error(`publish-image.sh manifest sha256 is not 64 hex digits: ${JSON.stringify(m.sha256)}`);
  }
  if (!Array.isArray(m.files)) {
    throw new Error(
      `publish-image.sh manifest lacks files (manifestVersion ${JSON.stringify(m.manifestVersion)}; ` +
        `version ${MANIFEST_VERSION} lists ${MANIFEST_FILES.join(", ")})`,
    );
  }
  const files = m.files as unknown[];
  files.forEach((f, i) => {
    if (typeof f !== "object" || f === null) throw new Error(`publish-image.sh manifest files[${i}] is not an object`);
    const e = f as Record<string, unknown>;
    const what = typeof e.name === "string" ? `files[${i}] (${e.name})` : `files[${i}]`;
    for (const k of ["name", "uri"] as const) {
      if (typeof e[k] !== "string" || e[k] === "") throw new Error(`publish-image.sh manifest ${what} lacks ${k}`);
    }
    if (typeof e.sha256 !== "string" || !SHA256.test(e.sha256)) {
      throw new Error(`publish-image.sh manifest ${what} sha256 is not 64 hex digits: ${JSON.stringify(e.sha256)}`);
    }
    if (!isSize(e.size)) {
      throw new Error(`publish-image.sh manifest ${what} size is not a byte count: ${JSON.stringify(e.size)}`);
    }
  });
  const named = (n: string) => (files as ManifestFile[]).filter((f) => f.name === n);
  const missing = MANIFEST_FILES.filter((n) => named(n).length === 0);
  if (missing.length > 0) throw new Error(`publish-image.sh manifest files lacks ${missing.join(", ")}`);
  const twice = MANIFEST_FILES.filter((n) => named(n).length > 1);
  if (twice.length > 0) throw new Error(`publish-image.sh manifest files lists ${twice.join(", ")} more than once`);
  const disk = named("disk.qcow2")[0];
  if (disk.sha256 !== m.sha256 || disk.uri !== m.imageUri) {
    throw new Error("publish-image.sh manifest files entry disk.qcow2 disagrees with sha256/imageUri");
  }
  if (!(IMAGE_COMPRESSIONS as readonly unknown[]).includes(m.compression)) {
    throw new Error(
      `publish-image.sh manifest compression is not ${IMAGE_COMPRESSIONS.join(" or ")}: ${JSON.stringify(m.compression)}`,
    );
  }
  for (const k of ["allocatedBytes", "publishedBytes"] as const) {
    if (!isSize(m[k])) throw new Error(`publish-image.sh manifest ${k} is not a byte count: ${JSON.stringify(m[k])}`);
  }
  if (m.publishedBytes !== disk.size) {
    throw new Error("publish-image.sh manifest publishedBytes disagrees with the size of disk.qcow2");
  }
  const r = m.softwareReport;
  if (r !== null) {
    const e = (typeof r === "object" && !Array.isArray(r) ? r : {}) as Record<string, unknown>;
    if (
      e.name !== SOFTWARE_REPORT_FILE ||
      typeof e.uri !== "string" ||
      e.uri === "" ||
      typeof e.sha256 !== "string" ||
      !SHA256.test(e.sha256) ||
      !isSize(e.size)
    ) {
      throw new Error(
        `publish-image.sh manifest softwareReport needs name ${SOFTWARE_REPORT_FILE}, a uri, a 64-hex sha256 and a size, or null: ${JSON.stringify(r)?.slice(0, 200)}`,
      );
    }
  }
  return m as unknown as Manifest;
}
