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
  BAKE_BOOTSTRAP,
  bakeKitKey,
  bakeStatusUri,
  DEFAULT_BAKE_IMAGE_TIMEOUT_S,
  DEFAULT_BAKE_INSTANCE_HOURLY_USD,
  DEFAULT_BAKE_INSTANCE_TYPE,
  DEFAULT_BAKE_TIMEOUT_S,
  defaultAmiVolumeGiB,
  renderBakeKit,
  renderBakeUserData,
  USER_DATA_BUDGET_BYTES,
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

interface Kit {
  kitVersion: number;
  files: Array<{ path: string; mode: string; content: string }>;
}

const KIT_SHA = SHA("e");
const KIT_URI = `s3://go-builder-data/windows-arm64/bake-kit/${KIT_SHA}.json.gz`;

function render(over: Partial<Parameters<typeof renderBakeUserData>[0]> = {}): Buffer {
  return renderBakeUserData({
    manifestJson: JSON.stringify(MANIFEST),
    imageEnv: IMAGE_ENV,
    statusUri: STATUS_URI,
    kit: { uri: KIT_URI, sha256: KIT_SHA },
    packages: HOST_PACKAGES,
    ...over,
  });
}

function decode(ud: Buffer): { text: string; doc: CloudConfig } {
  const text = zlib.gunzipSync(ud).toString("utf8");
  // cloud-init reads #cloud-config with a YAML loader; the JSON body must read the same.
  return { text, doc: yaml.load(text) as CloudConfig };
}

function unpack(body: Buffer): Kit {
  return JSON.parse(zlib.gunzipSync(body).toString("utf8")) as Kit;
}

/** Incompressible, reproducible text of about `bytes` characters. */
function noise(bytes: number, from = "filler"): string {
  let out = "";
  let seed = Buffer.from(from);
  while (out.length < bytes) {
    seed = crypto.createHash("sha256").update(seed).digest();
    out += seed.toString("base64");
  }
  return out.slice(0, bytes);
}

describe("infra/bake.ts", () => {
  describe("renderBakeKit", () => {
    it("is a gzip'd kitVersion 1 JSON document with every file in full, byte for byte, paths sorted", () => {
      const files = repoFiles();
      const kit = renderBakeKit(files);
      expect([kit.body[0], kit.body[1]]).to.deep.equal([0x1f, 0x8b]);
      const doc = unpack(kit.body);
      expect(doc.kitVersion).to.equal(1);
      expect(Object.keys(doc)).to.deep.equal(["kitVersion", "files"]);
      expect(doc.files.map((f) => f.path)).to.deep.equal([...BAKE_FILES].sort());
      for (const f of doc.files) {
        expect(Object.keys(f), f.path).to.deep.equal(["path", "mode", "content"]);
        expect(f.content, f.path).to.equal(files[f.path]);
      }
      const mode = Object.fromEntries(doc.files.map((f) => [f.path, f.mode]));
      expect(mode).to.deep.equal({
        "assets/windows-vm.service": "0644",
        "provisioning/bake-image.sh": "0755",
        "provisioning/imds-proxy.py": "0755",
        "provisioning/lib.sh": "0755",
        "provisioning/prepare-ami.sh": "0755",
        "provisioning/run-vm.sh": "0755",
      });
      // The launcher keeps its header comment (its --help prints it).
      expect(doc.files.find((f) => f.path === "provisioning/run-vm.sh")?.content).to.include(
        "# run-vm.sh - runs the Windows ARM64 VM under QEMU in the foreground.",
      );
    });

    it("is deterministic, whatever the order of the files; its sha256 is the body's", () => {
      const files = repoFiles();
      const kit = renderBakeKit(files);
      const reversed = Object.fromEntries(Object.entries(files).reverse());
      const again = renderBakeKit(reversed);
      expect(again.body.equals(kit.body)).to.equal(true);
      expect(again.sha256).to.equal(kit.sha256);
      expect(kit.sha256).to.equal(crypto.createHash("sha256").update(kit.body).digest("hex"));
      // Any change to a file is another kit.
      const changed = renderBakeKit({ ...files, "provisioning/lib.sh": files["provisioning/lib.sh"] + "\n" });
      expect(changed.sha256).to.not.equal(kit.sha256);
      // Extra files travel too (0644 unless a script).
      const extra = unpack(renderBakeKit({ ...files, "assets/note.txt": "naïve – ✓\r\n\t\u0000\n" }).body);
      expect(extra.files.find((f) => f.path === "assets/note.txt")).to.deep.equal({
        path: "assets/note.txt",
        mode: "0644",
        content: "naïve – ✓\r\n\t\u0000\n",
      });
    });

    it("refuses a missing file, a path that is not plain and relative, and anything that looks like a secret", () => {
      const files = repoFiles();
      delete files["provisioning/lib.sh"];
      expect(() => renderBakeKit(files)).to.throw(/files is missing provisioning\/lib\.sh/);
      for (const bad of ["../etc/passwd", "/etc/passwd", "a/../b", "./a", "a//b", "a b", ".hidden", "a/./b"]) {
        expect(() => renderBakeKit({ ...repoFiles(), [bad]: "x" }), bad).to.throw(/file path/);
      }
      expect(() => renderBakeKit({ ...repoFiles(), "manifest.json": "{}" })).to.throw(/bootstrap's own files/);
      const key = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----\n";
      expect(() =>
        renderBakeKit({ ...repoFiles(), "provisioning/lib.sh": repoFiles()["provisioning/lib.sh"] + `k='${key}'\n` }),
      ).to.throw(/provisioning\/lib\.sh holds something that looks like a secret/);
      expect(() =>
        renderBakeKit({ ...repoFiles(), "assets/windows-vm.service": "AWS_SECRET_ACCESS_KEY=abc\n" }),
      ).to.throw(/looks like a secret/);
      expect(() =>
        renderBakeKit({
          ...repoFiles(),
          "assets/x.xml": "<AdministratorPassword><Value>p</Value></AdministratorPassword>",
        }),
      ).to.throw(/looks like a secret/);
    });
  });

  describe("bakeKitKey", () => {
    it("is <prefix>bake-kit/<sha256>.json.gz, under the prefix the bake role reads", () => {
      expect(bakeKitKey("windows-arm64/", KIT_SHA)).to.equal(`windows-arm64/bake-kit/${KIT_SHA}.json.gz`);
      expect(bakeKitKey("", KIT_SHA)).to.equal(`bake-kit/${KIT_SHA}.json.gz`);
      const read = bakePolicyDocument("arn:aws:s3:::b", "windows-arm64/").Statement.find(
        (s) => s.Sid === "ReadPublishedImage",
      );
      const pattern = read?.Resource[0].replace("arn:aws:s3:::b/", "") ?? "";
      expect(pattern).to.equal("windows-arm64/*");
      expect(bakeKitKey("windows-arm64/", KIT_SHA).startsWith(pattern.slice(0, -1))).to.equal(true);
    });
    it("refuses a prefix without its slash and a value that is not a SHA-256", () => {
      expect(() => bakeKitKey("windows-arm64", KIT_SHA)).to.throw(/must end with \//);
      expect(() => bakeKitKey("/abs/", KIT_SHA)).to.throw(/must not start with \//);
      expect(() => bakeKitKey("p/", "abc")).to.throw(/not a SHA-256/);
      expect(() => bakeKitKey("p/", SHA("A"))).to.throw(/not a SHA-256/);
    });
  });

  describe("renderBakeUserData", () => {
    it(`is gzip'd cloud-config, under ${USER_DATA_BUDGET_BYTES} bytes (EC2 takes 16384), deterministic`, () => {
      const ud = render({ region: "us-east-2" });
      expect([ud[0], ud[1]]).to.deep.equal([0x1f, 0x8b]);
      expect(ud.length).to.be.below(USER_DATA_BUDGET_BYTES);
      expect(USER_DATA_BUDGET_BYTES).to.be.below(USER_DATA_MAX_BYTES);
      const { text, doc } = decode(ud);
      expect(text.startsWith("#cloud-config\n")).to.equal(true);
      expect(JSON.parse(text.slice("#cloud-config\n".length))).to.deep.equal(doc);
      expect(render({ region: "us-east-2" }).equals(ud), "deterministic").to.equal(true);
    });

    it("holds none of the scripts: its size does not depend on them, and it names the kit by URI and SHA-256", () => {
      const { text } = decode(render());
      for (const [f, content] of Object.entries(repoFiles())) {
        // A distinctive line of each file (its longest) is not in the user data.
        const line = content.split("\n").reduce((a, b) => (b.length > a.length ? b : a), "");
        expect(line.length, f).to.be.above(40);
        expect(text, f).to.not.include(line);
        expect(text, f).to.not.include(JSON.stringify(line).slice(1, -1));
      }
      expect(text).to.include(`--setenv=BAKE_KIT_URI=${KIT_URI}`);
      expect(text).to.include(`--setenv=BAKE_KIT_SHA256=${KIT_SHA}`);
      // However large the kit gets, the user data is the same.
      const big = renderBakeKit({ ...repoFiles(), "provisioning/lib.sh": noise(200000) });
      expect(big.body.length).to.be.above(USER_DATA_MAX_BYTES);
      const ud = render({ kit: { uri: `s3://b/p/bake-kit/${big.sha256}.json.gz`, sha256: big.sha256 } });
      expect(ud.length).to.be.below(USER_DATA_BUDGET_BYTES);
    });

    it("installs the host packages and the AWS CLI, and runs the bootstrap as a transient unit on the console", () => {
      const { doc } = decode(render({ region: "us-east-2" }));
      expect(doc.package_update).to.equal(true);
      expect(doc.packages).to.deep.equal([...HOST_PACKAGES]);
      expect(doc.runcmd).to.have.length(3);
      expect(doc.runcmd[0].join(" ")).to.include("snap install aws-cli --classic");
      expect(doc.runcmd[1].join(" ")).to.include("useradd --system").and.include("windows-vm");
      const cmd = doc.runcmd[2];
      expect(cmd.slice(0, 3)).to.deep.equal(["systemd-run", `--unit=${BAKE_UNIT}`, "--no-block"]);
      expect(cmd).to.include.members([
        "--property=StandardOutput=journal+console",
        "--property=StandardError=journal+console",
        `--setenv=BAKE_STATUS_URI=${STATUS_URI}`,
        `--setenv=BAKE_TIMEOUT_S=${DEFAULT_BAKE_IMAGE_TIMEOUT_S}`,
        `--setenv=BAKE_KIT_URI=${KIT_URI}`,
        `--setenv=BAKE_KIT_SHA256=${KIT_SHA}`,
        "--setenv=AWS_REGION=us-east-2",
        "--setenv=AWS_DEFAULT_REGION=us-east-2",
      ]);
      expect(cmd.slice(-2)).to.deep.equal(["/bin/bash", `${BAKE_DIR}/bake-bootstrap.sh`]);
      expect(cmd.filter((a) => !a.startsWith("--")).slice(1)).to.deep.equal([
        "/bin/bash",
        `${BAKE_DIR}/bake-bootstrap.sh`,
      ]);
      expect(decode(render({ timeoutS: 900 })).doc.runcmd[2]).to.include("--setenv=BAKE_TIMEOUT_S=900");
      expect(decode(render()).doc.runcmd[2].some((a) => a.includes("AWS_REGION"))).to.equal(false);
      expect(BAKE_DIR.startsWith("/run/"), "tmpfs: nothing of the bake stays in the AMI").to.equal(true);
      expect(DEFAULT_BAKE_IMAGE_TIMEOUT_S).to.be.below(DEFAULT_BAKE_TIMEOUT_S);
    });

    it("writes only the bootstrap, the manifest and the env under BAKE_DIR", () => {
      const { doc } = decode(render());
      const byPath = new Map(doc.write_files.map((w) => [w.path, w]));
      expect([...byPath.keys()].sort()).to.deep.equal(
        ["bake-bootstrap.sh", "image.env", "manifest.json"].map((f) => `${BAKE_DIR}/${f}`),
      );
      for (const w of doc.write_files) {
        expect(w.owner).to.equal("root:root");
        expect(w.encoding, "plain text").to.equal(undefined);
        expect(w.permissions).to.equal(w.path.endsWith(".sh") ? "0755" : "0644");
      }
      const at = (f: string) => byPath.get(`${BAKE_DIR}/${f}`)?.content ?? "";
      expect(at("bake-bootstrap.sh")).to.equal(BAKE_BOOTSTRAP);
      expect(BAKE_BOOTSTRAP.split("\n").slice(0, 2)).to.deep.equal([
        "#!/usr/bin/env bash",
        "# bake-bootstrap.sh - on the bake instance, from its user data: fetch the bake",
      ]);
      expect(BAKE_BOOTSTRAP).to.match(/^set -euo pipefail$/m);
      expect(at("image.env")).to.equal(IMAGE_ENV);
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
      expect(() => render({ imageEnv: IMAGE_ENV + "VM_NOTE=<Password>x</Password>\n" })).to.throw(
        /user data holds something that looks like a secret/,
      );
      expect(() => render({ imageEnv: IMAGE_ENV + "AWS_SESSION_TOKEN=abc\n" })).to.throw(/looks like a secret/);
    });

    it("refuses what must not or cannot go: the config ISO, a manifest without files[], bad values", () => {
      expect(() => render({ imageEnv: IMAGE_ENV + "VM_CONFIG_ISO=/var/lib/windows-vm/config.iso\n" })).to.throw(
        /VM_CONFIG_ISO/,
      );
      expect(() => render({ manifestJson: JSON.stringify({ ...MANIFEST, files: undefined }) })).to.throw(
        /manifestVersion 2/,
      );
      expect(() => render({ manifestJson: "{" })).to.throw(/not JSON/);
      expect(() => render({ statusUri: "https://example.com/s.json" })).to.throw(/statusUri/);
      expect(() => render({ kit: { uri: "https://example.com/kit.json.gz", sha256: KIT_SHA } })).to.throw(/kit\.uri/);
      expect(() => render({ kit: { uri: "s3://b/k it.json.gz", sha256: KIT_SHA } })).to.throw(/kit\.uri/);
      expect(() => render({ kit: { uri: KIT_URI, sha256: "abc" } })).to.throw(/kit\.sha256/);
      expect(() => render({ timeoutS: 5 })).to.throw(/timeoutS/);
      expect(() => render({ region: "us east" })).to.throw(/region/);
      expect(() => render({ packages: ["qemu; rm -rf /"] })).to.throw(/package/);
    });

    it("throws when the result is over 16384 bytes (a manifest that large)", () => {
      const files = [
        ...MANIFEST.files,
        ...Array.from({ length: 40 }, (_, i) => ({
          name: `extra-${i}.bin`,
          uri: `${PREFIX}${noise(400, `uri ${i}`).replace(/[^A-Za-z0-9]/g, "x")}`,
          sha256: crypto.createHash("sha256").update(String(i)).digest("hex"),
          size: i,
        })),
      ];
      expect(() => render({ manifestJson: JSON.stringify({ ...MANIFEST, files }) })).to.throw(
        /is \d+ bytes gzip'd .*EC2 takes at most 16384/,
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
