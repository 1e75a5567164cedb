import { Manifest } from "../../infra/manifest";

/**
 * A complete manifestVersion 2 manifest as publish-image.sh prints it, for
 * the image SHA published under BASE (s3://bucket/prefix or file:///dir).
 */
export function sampleManifest(base = "s3://artifacts-bucket-123/windows-arm64", sha = "c".repeat(64)): Manifest {
  const at = (name: string) => `${base}/${sha}/${name}`;
  const varsSha = "d".repeat(64);
  const efiSha = "e".repeat(64);
  const mib64 = 64 * 1024 * 1024;
  return {
    manifestVersion: 2,
    sha256: sha,
    size: 12345,
    format: "qcow2",
    virtualSize: 64 * 1024 * 1024 * 1024,
    compression: "none",
    allocatedBytes: 12000,
    publishedBytes: 12345,
    imageUri: at("disk.qcow2"),
    varsUri: at("QEMU_VARS.fd"),
    varsSha256: varsSha,
    varsSize: mib64,
    efiUri: at("QEMU_EFI.fd"),
    efiSha256: efiSha,
    efiSize: mib64,
    manifestUri: at("manifest.json"),
    files: [
      { name: "disk.qcow2", uri: at("disk.qcow2"), sha256: sha, size: 12345 },
      { name: "QEMU_VARS.fd", uri: at("QEMU_VARS.fd"), sha256: varsSha, size: mib64 },
      { name: "QEMU_EFI.fd", uri: at("QEMU_EFI.fd"), sha256: efiSha, size: mib64 },
    ],
    softwareReport: {
      name: "software-report.json",
      uri: at("software-report.json"),
      sha256: "b".repeat(64),
      size: 2048,
    },
    host: {
      qemuVersion: "QEMU emulator version 8.2.2 (Debian 1:8.2.2+ds-0ubuntu1)",
      qemuPackage: "1:8.2.2+ds-0ubuntu1",
      firmwarePackage: "2024.02-2",
    },
    machine: { machineOptions: "", cpus: 4, memoryGiB: 24, accel: "kvm" },
    sourceUrl: "s3://media/Windows11_ARM64_23H2.vhdx",
    sourceSha256: "a".repeat(64),
    windowsVersion: "11-23h2",
    createdAt: "2026-11-26T08:00:00Z",
  };
}
