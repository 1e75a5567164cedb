import { expect } from "chai";
import * as crypto from "crypto";
import * as fs from "fs";
import * as yaml from "js-yaml";
import * as path from "path";
import * as zlib from "zlib";
import {
  BAKE_DIR,
  BAKE_FILES,
  BAKE_UNIT,
  bakeCostUsd,
  bakePolicyDocument,
  bakeStatusUri,
  compactScript,
  DEFAULT_BAKE_IMAGE_TIMEOUT_S,
  DEFAULT_BAKE_INSTANCE_HOURLY_USD,
  DEFAULT_BAKE_INSTANCE_TYPE,
  DEFAULT_BAKE_TIMEOUT_S,
  defaultAmiVolumeGiB,
  renderBakeUserData,
  USER_DATA_MAX_BYTES,
} from "../../infra/bake";
import { HOST_PACKAGES } from "../../infra/hostSetup";

const repoRoot = path.resolve(__dirname, "..", "..");
const GIB = 1024 ** 3;
const SHA = (c: string) => c.repeat(64);
const PREFIX = `s3://go-builder-data/windows-arm64/${SHA("a")}/`;

/** A manifestVersion 2 as publish-image.sh prints it, with fields the bake does not need. */
const MANIFEST = {
  manifestVersion: 2,
  sha256: SHA("a"),
  size: 21474836480,
  format: "qcow2",
  virtualSize: 68719476736,
  imageUri: `${PREFIX}disk.qcow2`,
  manifestUri: `${PREFIX}manifest.json`,
  sourceUrl: "s3://media/Windows11_ARM64_23H2.vhdx",
  sourceSha256: SHA("b"),
  windowsVersion: "11-23h2",
  createdAt: "2026-12-01T00:00:00Z",
  files: [
    { name: "disk.qcow2", uri: `${PREFIX}disk.qcow2`, sha256: SHA("a"), size: 21474836480 },
    { name: "QEMU_VARS.fd", uri: `${PREFIX}QEMU_VARS.fd`, sha256: SHA("c"), size: 67108864 },
    { name: "QEMU_EFI.fd", uri: `${PREFIX}QEMU_EFI.fd`, sha256: SHA("d"), size: 67108864 },
  ],
};
const IMAGE_ENV =
  "# windows-arm64-image: baked image VM (windows-vm.service)\nVM_DIR=/var/lib/windows-vm\nVM_CPUS=4\nVM_MEMORY_GIB=24\n" +
  "VM_ACCEL=kvm\nVM_BUILDLET_PORT=443\nVM_HALT_ON_EXIT=1\n";
const STATUS_URI = "s3://go-builder-data/windows-arm64/bake-status/0123abcd.json";

function repoFiles(): Record<string, string> {
  return Object.fromEntries(BAKE_FILES.map((f) => [f, fs.readFileSync(path.join(repoRoot, f), "utf8")]));
}

interface CloudConfig {
  package_update: boolean;
  package_upgrade: boolean;
  packages: string[];
  write_files: Array<{ path: string; owner: string; permissions: string; content: string; encoding?: string }>;
  runcmd: string[][];
}

function render(over: Partial<Parameters<typeof renderBakeUserData>[0]> = {}): Buffer {
  return renderBakeUserData({
    manifestJson: JSON.stringify(MANIFEST),
    imageEnv: IMAGE_ENV,
    statusUri: STATUS_URI,
    files: repoFiles(),
    packages: HOST_PACKAGES,
    ...over,
  });
}

function decode(ud: Buffer): { text: string; doc: CloudConfig } {
  const text = zlib.gunzipSync(ud).toString("utf8");
  // cloud-init reads #cloud-config with a YAML loader; the JSON body must read the same.
  return { text, doc: yaml.load(text) as CloudConfig };
}

describe("infra/bake.ts", () => {
  describe("renderBakeUserData", () => {
    it("is gzip'd cloud-config within EC2's 16384 bytes, with the repository's files", () => {
      const ud = render();
      expect([ud[0], ud[1]]).to.deep.equal([0x1f, 0x8b]);
      expect(ud.length).to.be.at.most(USER_DATA_MAX_BYTES);
      const { text, doc } = decode(ud);
      expect(text.startsWith("#cloud-config\n")).to.equal(true);
      expect(JSON.parse(text.slice("#cloud-config\n".length))).to.deep.equal(doc);
      expect(render().equals(ud), "deterministic").to.equal(true);
    });

    it("installs the host packages and the AWS CLI, and runs bake-image.sh as a transient unit on the console", () => {
      const { doc } = decode(render({ region: "us-east-2" }));
      expect(doc.package_update).to.equal(true);
      expect(doc.packages).to.deep.equal([...HOST_PACKAGES]);
      expect(doc.runcmd[0].join(" ")).to.include("snap install aws-cli --classic");
      const cmd = doc.runcmd[1];
      expect(cmd.slice(0, 3)).to.deep.equal(["systemd-run", `--unit=${BAKE_UNIT}`, "--no-block"]);
      expect(cmd).to.include.members([
        "--property=StandardOutput=journal+console",
        "--property=StandardError=journal+console",
        `--setenv=BAKE_STATUS_URI=${STATUS_URI}`,
        `--setenv=BAKE_TIMEOUT_S=${DEFAULT_BAKE_IMAGE_TIMEOUT_S}`,
        "--setenv=AWS_REGION=us-east-2",
        "--setenv=AWS_DEFAULT_REGION=us-east-2",
      ]);
      expect(cmd.slice(-4)).to.deep.equal([
        "/bin/bash",
        `${BAKE_DIR}/provisioning/bake-image.sh`,
        `${BAKE_DIR}/manifest.json`,
        `${BAKE_DIR}/image.env`,
      ]);
      expect(decode(render({ timeoutS: 900 })).doc.runcmd[1]).to.include("--setenv=BAKE_TIMEOUT_S=900");
      expect(BAKE_DIR.startsWith("/run/"), "tmpfs: nothing of the bake stays in the AMI").to.equal(true);
      expect(DEFAULT_BAKE_IMAGE_TIMEOUT_S).to.be.below(DEFAULT_BAKE_TIMEOUT_S);
    });

    it("writes every file under BAKE_DIR: scripts compacted (the launcher keeps its header), the unit as it is", () => {
      const { doc } = decode(render());
      const files = repoFiles();
      const byPath = new Map(doc.write_files.map((w) => [w.path, w]));
      expect([...byPath.keys()].sort()).to.deep.equal(
        [...BAKE_FILES, "manifest.json", "image.env"].map((f) => `${BAKE_DIR}/${f}`).sort(),
      );
      for (const w of doc.write_files) {
        expect(w.owner).to.equal("root:root");
        expect(w.encoding, "plain text").to.equal(undefined);
        expect(w.permissions).to.equal(w.path.endsWith(".sh") ? "0755" : "0644");
      }
      const at = (f: string) => byPath.get(`${BAKE_DIR}/${f}`)?.content ?? "";
      expect(at("assets/windows-vm.service")).to.equal(files["assets/windows-vm.service"]);
      expect(at("image.env")).to.equal(IMAGE_ENV);
      const launcher = at("provisioning/run-vm.sh");
      expect(launcher).to.equal(compactScript(files["provisioning/run-vm.sh"], true));
      expect(launcher).to.include("# run-vm.sh - runs the Windows ARM64 VM under QEMU in the foreground.");
      const bake = at("provisioning/bake-image.sh");
      expect(bake).to.equal(compactScript(files["provisioning/bake-image.sh"]));
      expect(bake.split("\n").filter((l) => /^\s*#/.test(l))).to.deep.equal(["#!/usr/bin/env bash"]);
      // The manifest keeps only what bake-image.sh reads.
      expect(JSON.parse(at("manifest.json"))).to.deep.equal({
        manifestVersion: 2,
        sha256: MANIFEST.sha256,
        virtualSize: MANIFEST.virtualSize,
        imageUri: MANIFEST.imageUri,
        files: MANIFEST.files,
      });
    });

    it("holds no secret: no private key, password, or credentials", () => {
      const { text } = decode(render());
      expect(text).to.not.match(/PRIVATE KEY|BEGIN OPENSSH|BEGIN RSA/);
      expect(text).to.not.match(/password\s*[:=]|<Password>|AdministratorPassword|PlainText/i);
      expect(text).to.not.match(/AKIA[0-9A-Z]{16}|aws_secret_access_key|AWS_SECRET_ACCESS_KEY/i);
      // And it refuses to carry one.
      const key = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----\n";
      const files = { ...repoFiles(), "provisioning/lib.sh": repoFiles()["provisioning/lib.sh"] + `k='${key}'\n` };
      expect(() => render({ files })).to.throw(/looks like a secret/);
      expect(() => render({ imageEnv: IMAGE_ENV + "VM_NOTE=<Password>x</Password>\n" })).to.throw(
        /looks like a secret/,
      );
    });

    it("refuses what must not or cannot go: the config ISO, a missing file, a manifest without files[], bad values", () => {
      expect(() => render({ imageEnv: IMAGE_ENV + "VM_CONFIG_ISO=/var/lib/windows-vm/config.iso\n" })).to.throw(
        /VM_CONFIG_ISO/,
      );
      const files = repoFiles();
      delete files["provisioning/lib.sh"];
      expect(() => render({ files })).to.throw(/files is missing provisioning\/lib\.sh/);
      expect(() => render({ files: { ...repoFiles(), "../etc/passwd": "x" } })).to.throw(/file path/);
      expect(() => render({ manifestJson: JSON.stringify({ ...MANIFEST, files: undefined }) })).to.throw(
        /manifestVersion 2/,
      );
      expect(() => render({ manifestJson: "{" })).to.throw(/not JSON/);
      expect(() => render({ statusUri: "https://example.com/s.json" })).to.throw(/statusUri/);
      expect(() => render({ timeoutS: 5 })).to.throw(/timeoutS/);
      expect(() => render({ region: "us east" })).to.throw(/region/);
      expect(() => render({ packages: ["qemu; rm -rf /"] })).to.throw(/package/);
    });

    it("drops the launcher's header when only that makes the document fit", () => {
      // Incompressible, reproducible filler, grown until the header has to go.
      let noise = "";
      let seed = Buffer.from("filler");
      let launcher = "";
      for (let i = 0; i < 100 && !launcher.startsWith("#!/usr/bin/env bash\nset -"); i++) {
        for (let j = 0; j < 4; j++) {
          seed = crypto.createHash("sha256").update(seed).digest();
          noise += seed.toString("base64");
        }
        const files = { ...repoFiles(), "provisioning/lib.sh": `${repoFiles()["provisioning/lib.sh"]}x='${noise}'\n` };
        const ud = render({ files });
        expect(ud.length).to.be.at.most(USER_DATA_MAX_BYTES);
        const w = decode(ud).doc.write_files.find((f) => f.path.endsWith("/run-vm.sh"));
        launcher = w?.content ?? "";
      }
      expect(launcher).to.equal(compactScript(repoFiles()["provisioning/run-vm.sh"]));
    });

    it("throws when the result is over 16384 bytes", () => {
      // Incompressible content.
      const noise = crypto.randomBytes(12000).toString("base64");
      const files = { ...repoFiles(), "provisioning/lib.sh": `${repoFiles()["provisioning/lib.sh"]}x='${noise}'\n` };
      expect(() => render({ files })).to.throw(/is \d+ bytes gzip'd .*EC2 takes at most 16384/);
    });
  });

  describe("compactScript", () => {
    it("drops full-line comments, keeps the shebang, code and trailing comments; keepHeader keeps the header block", () => {
      const text = [
        "#!/usr/bin/env bash",
        "# header 1",
        "#",
        "set -e",
        "  # indented",
        "x=1 # why",
        "# later",
        "y='#not'",
        "",
      ].join("\n");
      expect(compactScript(text)).to.equal(["#!/usr/bin/env bash", "set -e", "x=1 # why", "y='#not'", ""].join("\n"));
      expect(compactScript(text, true)).to.equal(
        ["#!/usr/bin/env bash", "# header 1", "#", "set -e", "x=1 # why", "y='#not'", ""].join("\n"),
      );
    });
  });

  describe("bakePolicyDocument", () => {
    const ARN = "arn:aws:s3:::go-builder-data";
    it("reads the published files under the prefix and writes only under bake-status/", () => {
      expect(bakePolicyDocument(ARN, "windows-arm64/")).to.deep.equal({
        Version: "2012-10-17",
        Statement: [
          {
            Sid: "ReadPublishedImage",
            Effect: "Allow",
            Action: ["s3:GetObject"],
            Resource: ["arn:aws:s3:::go-builder-data/windows-arm64/*"],
          },
          {
            Sid: "WriteBakeStatus",
            Effect: "Allow",
            Action: ["s3:PutObject"],
            Resource: ["arn:aws:s3:::go-builder-data/windows-arm64/bake-status/*"],
          },
        ],
      });
    });
    it("is nothing wider: no '*' resource, no wildcard action, no delete, no listing", () => {
      for (const prefix of ["windows-arm64/", "a/b/", ""]) {
        const doc = bakePolicyDocument(ARN, prefix);
        const actions = doc.Statement.flatMap((s) => s.Action);
        const resources = doc.Statement.flatMap((s) => s.Resource);
        expect(actions.sort()).to.deep.equal(["s3:GetObject", "s3:PutObject"]);
        expect(resources).to.not.include("*");
        for (const r of resources) expect(r.startsWith(`${ARN}/`), r).to.equal(true);
        expect(doc.Statement.every((s) => s.Effect === "Allow")).to.equal(true);
      }
    });
    it("refuses a bad bucket ARN or a prefix without its slash", () => {
      expect(() => bakePolicyDocument("*", "p/")).to.throw(/not an S3 bucket ARN/);
      expect(() => bakePolicyDocument(ARN, "p")).to.throw(/must end with \//);
    });
  });

  describe("bakeStatusUri", () => {
    it("is <artifactUri>bake-status/<token>.json", () => {
      expect(bakeStatusUri("s3://b/windows-arm64/", "t0k-1")).to.equal("s3://b/windows-arm64/bake-status/t0k-1.json");
      expect(bakeStatusUri("s3://b/windows-arm64", "t")).to.equal("s3://b/windows-arm64/bake-status/t.json");
      expect(bakeStatusUri("file:///srv/artifacts/", "x.y")).to.equal("file:///srv/artifacts/bake-status/x.y.json");
    });
    it("refuses other schemes and tokens with path characters", () => {
      expect(() => bakeStatusUri("https://x/", "t")).to.throw(/s3:\/\/ or file:\/\/\//);
      expect(() => bakeStatusUri("s3://b/p/", "../t")).to.throw(/token/);
      expect(() => bakeStatusUri("s3://b/p/", "")).to.throw(/token/);
    });
  });

  describe("defaultAmiVolumeGiB", () => {
    it("is the virtual size + 8 GiB for the OS + 10 % (at least 4 GiB), rounded up", () => {
      expect(defaultAmiVolumeGiB(64 * GIB)).to.equal(79); // 64 + 8 + 6.4
      expect(defaultAmiVolumeGiB(127 * GIB)).to.equal(148); // 127 + 8 + 12.7
      expect(defaultAmiVolumeGiB(10 * GIB)).to.equal(22); // 10 + 8 + 4
      expect(defaultAmiVolumeGiB(0)).to.equal(12);
      expect(defaultAmiVolumeGiB(40 * GIB + 1)).to.equal(53);
      expect(() => defaultAmiVolumeGiB(-1)).to.throw(/not a size/);
      expect(() => defaultAmiVolumeGiB(Number.NaN)).to.throw(/not a size/);
    });
  });

  describe("instance type and cost", () => {
    it("defaults to c7g.large, and a bake costs cents", () => {
      expect(DEFAULT_BAKE_INSTANCE_TYPE).to.equal("c7g.large");
      expect(DEFAULT_BAKE_INSTANCE_HOURLY_USD).to.be.within(0.01, 0.2);
      // One hour with a 79 GiB gp3 volume.
      expect(bakeCostUsd(79, 1)).to.be.closeTo(0.0725 + (79 * 0.08) / 730, 1e-9);
      expect(bakeCostUsd(79, 0.5)).to.be.closeTo(bakeCostUsd(79, 1) / 2, 1e-9);
    });
  });
});
