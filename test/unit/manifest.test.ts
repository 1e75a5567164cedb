import { expect } from "chai";
import { MANIFEST_FILES, parseManifest } from "../../infra/manifest";
import { sampleManifest } from "../support/manifest";

/** The sample manifest, changed by EDIT, as one stdout line. */
function line(edit: (m: Record<string, unknown>) => void = () => {}): string {
  const m = JSON.parse(JSON.stringify(sampleManifest())) as Record<string, unknown>;
  edit(m);
  return `${JSON.stringify(m)}\n`;
}
const files = (m: Record<string, unknown>) => m.files as Record<string, unknown>[];

describe("parseManifest", () => {
  it("returns the manifest on the last non-empty line, every field kept", () => {
    const m = parseManifest(`publish-image: a progress line that reached stdout\n${line()}\n\n`);
    expect(m).to.deep.equal(sampleManifest());
    expect(m.files.map((f) => f.name)).to.deep.equal([...MANIFEST_FILES]);
  });

  it("accepts the files in any order, and a null machine", () => {
    const m = parseManifest(
      line((x) => {
        x.files = files(x).reverse();
        x.machine = null;
      }),
    );
    expect(m.files[0].name).to.equal("QEMU_EFI.fd");
    expect(m.machine).to.equal(null);
  });

  it("throws when the output holds no manifest", () => {
    for (const out of ["", "\n\n", "publish-image: error: upload failed\n", "null\n", "[1,2]\n", "42\n"]) {
      expect(() => parseManifest(out), JSON.stringify(out)).to.throw(/publish-image\.sh did not print a manifest/);
    }
  });

  it("names a missing top-level field", () => {
    for (const k of ["sha256", "imageUri", "manifestUri", "createdAt"]) {
      expect(() => parseManifest(line((m) => delete m[k])), k).to.throw(`publish-image.sh manifest lacks ${k}`);
    }
    expect(() => parseManifest(line((m) => (m.sha256 = "abc")))).to.throw(/sha256 is not 64 hex digits: "abc"/);
  });

  it("refuses a manifestVersion 1 manifest: it lists no files", () => {
    const v1 = line((m) => {
      m.manifestVersion = 1;
      for (const k of ["files", "efiUri", "efiSha256", "efiSize", "host", "machine"]) delete m[k];
    });
    expect(() => parseManifest(v1)).to.throw(
      /lacks files \(manifestVersion 1; version 2 lists disk\.qcow2, QEMU_VARS\.fd, QEMU_EFI\.fd\)/,
    );
  });

  it("names each file that is missing or listed twice", () => {
    expect(() => parseManifest(line((m) => (m.files = files(m).slice(0, 1))))).to.throw(
      "publish-image.sh manifest files lacks QEMU_VARS.fd, QEMU_EFI.fd",
    );
    expect(() => parseManifest(line((m) => (m.files = [...files(m), files(m)[2]])))).to.throw(
      "files lists QEMU_EFI.fd more than once",
    );
  });

  it("names the malformed field of a file entry", () => {
    const cases: [(f: Record<string, unknown>) => void, RegExp][] = [
      [(f) => delete f.name, /files\[1\] lacks name/],
      [(f) => delete f.uri, /files\[1\] \(QEMU_VARS\.fd\) lacks uri/],
      [(f) => (f.uri = ""), /files\[1\] \(QEMU_VARS\.fd\) lacks uri/],
      [(f) => (f.sha256 = "D".repeat(64)), /files\[1\] \(QEMU_VARS\.fd\) sha256 is not 64 hex digits/],
      [(f) => delete f.sha256, /files\[1\] \(QEMU_VARS\.fd\) sha256 is not 64 hex digits: undefined/],
      [(f) => (f.size = "67108864"), /files\[1\] \(QEMU_VARS\.fd\) size is not a byte count: "67108864"/],
      [(f) => (f.size = -1), /size is not a byte count: -1/],
      [(f) => (f.size = 1.5), /size is not a byte count: 1\.5/],
    ];
    for (const [edit, msg] of cases) {
      expect(() => parseManifest(line((m) => edit(files(m)[1]))), String(msg)).to.throw(msg);
    }
    expect(() => parseManifest(line((m) => (files(m)[2] = null as unknown as Record<string, unknown>)))).to.throw(
      "files[2] is not an object",
    );
  });

  it("refuses a disk entry that disagrees with sha256 or imageUri", () => {
    expect(() => parseManifest(line((m) => (files(m)[0].sha256 = "f".repeat(64))))).to.throw(
      /disk\.qcow2 disagrees with sha256\/imageUri/,
    );
    expect(() => parseManifest(line((m) => (files(m)[0].uri = "s3://elsewhere/disk.qcow2")))).to.throw(
      /disk\.qcow2 disagrees/,
    );
  });

  it("checks the compaction fields: compression none or zstd, byte counts, publishedBytes the disk's size", () => {
    expect(parseManifest(line((m) => (m.compression = "zstd"))).compression).to.equal("zstd");
    expect(() => parseManifest(line((m) => (m.compression = "gzip")))).to.throw(
      'manifest compression is not none or zstd: "gzip"',
    );
    expect(() => parseManifest(line((m) => delete m.compression))).to.throw(/compression is not none or zstd/);
    expect(() => parseManifest(line((m) => (m.allocatedBytes = "12000")))).to.throw(
      'manifest allocatedBytes is not a byte count: "12000"',
    );
    expect(() => parseManifest(line((m) => delete m.publishedBytes))).to.throw(
      "manifest publishedBytes is not a byte count: undefined",
    );
    expect(() => parseManifest(line((m) => (m.publishedBytes = 12344)))).to.throw(
      "publishedBytes disagrees with the size of disk.qcow2",
    );
  });

  it("accepts a software report entry or null, and names a malformed one", () => {
    expect(parseManifest(line((m) => (m.softwareReport = null))).softwareReport).to.equal(null);
    const bad: ((r: Record<string, unknown>) => void)[] = [
      (r) => (r.name = "report.json"),
      (r) => delete r.uri,
      (r) => (r.sha256 = "B".repeat(64)),
      (r) => (r.size = -2),
    ];
    for (const edit of bad) {
      expect(
        () => parseManifest(line((m) => edit(m.softwareReport as Record<string, unknown>))),
        String(edit),
      ).to.throw(/softwareReport needs name software-report\.json, a uri, a 64-hex sha256 and a size, or null/);
    }
    expect(() => parseManifest(line((m) => delete m.softwareReport))).to.throw(/softwareReport needs/);
  });
});
