import { expect } from "chai";
import * as fs from "fs";
import * as os from "os";
import * as path from "path";
import { runScript } from "../support/run";

describe("operator-keys.sh (operators' SSH keys on the host, in place)", () => {
  const PIPELINE = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPipeline pipeline";
  const ALICE = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAlice alice@laptop";
  // Pasted with a tab: the config check accepts any white space, so does the script.
  const BOB = "ecdsa-sha2-nistp256\tAAAAE2VjZHNhLXNoYTItbmlzdHAyNTY= bob";
  let home: string;
  let file: string;
  beforeEach(() => {
    home = fs.mkdtempSync(path.join(os.tmpdir(), "operator-keys-"));
    fs.mkdirSync(path.join(home, ".ssh"), { mode: 0o700 });
    file = path.join(home, ".ssh", "authorized_keys");
    fs.writeFileSync(file, `${PIPELINE}\n`, { mode: 0o600 });
  });
  afterEach(() => fs.rmSync(home, { recursive: true, force: true }));

  const set = (keys: string[]) =>
    runScript("operator-keys.sh", [Buffer.from(keys.join("\n")).toString("base64")], { env: { HOME: home } });
  const lines = () => fs.readFileSync(file, "utf8").trimEnd().split("\n");

  it("adds, replaces and removes the operators' block, keeping the pipeline key", async () => {
    const r1 = await set([ALICE, BOB]);
    expect(r1.code, r1.stderr).to.equal(0);
    expect(r1.stderr).to.include("2 operator key(s)");
    expect(lines()).to.deep.equal([
      PIPELINE,
      "# windows-arm64-image operators: begin",
      ALICE,
      BOB,
      "# windows-arm64-image operators: end",
    ]);
    expect(fs.statSync(file).mode & 0o777).to.equal(0o600);

    expect((await set([BOB])).code).to.equal(0);
    expect(lines()).to.deep.equal([
      PIPELINE,
      "# windows-arm64-image operators: begin",
      BOB,
      "# windows-arm64-image operators: end",
    ]);
    expect((await set([])).code).to.equal(0);
    expect(lines()).to.deep.equal([PIPELINE]);
  });

  it("refuses something that is not a public key and leaves the file as it was", async () => {
    const r = await set([ALICE, "-----BEGIN OPENSSH PRIVATE KEY-----"]);
    expect(r.code).to.equal(1);
    expect(r.stderr).to.include("not an OpenSSH public key");
    expect(lines()).to.deep.equal([PIPELINE]);
    expect(fs.readdirSync(path.join(home, ".ssh"))).to.deep.equal(["authorized_keys"]);
  });
});
