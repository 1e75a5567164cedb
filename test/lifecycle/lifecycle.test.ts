/**
 * The lifecycle test: the real program (infra/index.ts, from a copy of the
 * repository) run several times in a row under the engine stand-in
 * (engine.ts: the command provider's and the engine's documented semantics),
 * state carried between runs, the local target's commands executed for real
 * on this machine against the stand-in guest under TCG, publishing to a
 * file:// folder. Prints a row per run and ends with
 * "lifecycle: N scenarios passed".
 */
import { expect } from "chai";
import * as fs from "fs";
import * as path from "path";
import { fileURLToPath } from "url";
import { repoRoot } from "../support/run";
import { RunResult } from "./engine";
import { AwsWorld, HOST_ID, makeAwsWorld } from "./awsWorld";
import { makeShims, makeWorld, Row, stagesOf, stopWorldVm, table, World } from "./world";

/** The local target's stage resources, by plan stage. */
const R = {
  upload: "host-files-upload",
  firmware: "firmware-build",
  fetchImage: "windows-disk-fetch-image",
  fetchDrivers: "windows-disk-fetch-drivers",
  prepareDisk: "windows-disk-prepare-disk",
  configMedia: "build-vm-config-media",
  renderEnv: "build-vm-env",
  startVm: "build-vm-start",
  waitGuest: "build-vm-wait-guest",
  baseImage: "build-vm-base",
  overlayDisk: "guest-overlay",
  provisionGuest: "guest-run",
  stopVm: "image-stop-vm",
  publish: "image-publish",
};
/** One provisioning run: a fresh overlay on the base, provisioned, shut down, published. */
const PROVISION_RUN = [R.overlayDisk, R.provisionGuest, R.stopVm, R.publish];
/** Windows installed again (a new base), then a provisioning run. */
const FROM_BOOT = [R.startVm, R.waitGuest, R.baseImage, ...PROVISION_RUN];

const rows: Row[] = [];
let passed = 0;

describe("lifecycle: the program run after run with the provider's semantics", function () {
  this.timeout(60 * 60 * 1000);
  afterEach(function () {
    if (this.currentTest?.state === "passed") passed++;
  });
  after(function () {
    console.log("\n" + table(rows).replace(/^/gm, "    "));
    // LIFECYCLE_PART (local or aws): one part of the run (test/lanes.sh runs the two side by side).
    const part = process.env.LIFECYCLE_PART ? `-${process.env.LIFECYCLE_PART}` : "";
    fs.writeFileSync(path.join(repoRoot, ".cache", `lifecycle-table${part}.md`), table(rows) + "\n");
    console.log(`\nlifecycle: ${passed} scenarios passed`);
  });

  describe("local target, stand-in guest", function () {
    // Each scenario starts from the state the one before it left.
    this.bail(true);
    let world: World;
    let config: Record<string, string>;

    before(async function () {
      world = await makeWorld(path.join(repoRoot, ".cache", "lifecycle"), { verbose: !!process.env.LIFECYCLE_VERBOSE });
      fs.rmSync(world.home, { recursive: true, force: true });
      config = world.config();
    });

    afterEach(async function () {
      await stopWorldVm(world);
    });

    const up = async (scenario: string, cfg = config) => record(`local: ${scenario}`, await world.engine.up(cfg));

    /** The manifest the last run published, read back from the folder. */
    function publishedManifest(r: RunResult): Record<string, unknown> {
      const uri = String(r.outputs.manifestUri);
      expect(uri).to.match(/^file:\/\//);
      return JSON.parse(fs.readFileSync(fileURLToPath(uri), "utf8")) as Record<string, unknown>;
    }

    it("1. a first build publishes the image", async () => {
      const r = await up("first build");
      expectOk(r);
      expect(stagesOf(r)).to.have.members(Object.values(R));
      const m = publishedManifest(r);
      expect(m.sha256).to.equal(r.outputs.imageSha256);
      // Secrets on stdin: their outputs are stored as secrets.
      for (const name of [R.configMedia, R.provisionGuest]) {
        const rec = world.engine.state.get(`command:local:Command::${name}`);
        expect(rec?.options.additionalSecretOutputs, name).to.have.members(["stdout", "stderr"]);
      }
      expect(
        world.engine.state.get(`command:local:Command::${R.publish}`)?.options.additionalSecretOutputs,
      ).to.deep.equal([]);
    });

    it("2. a run with no change executes no command", async () => {
      const r = await up("no change");
      expectOk(r);
      expect(stagesOf(r)).to.deep.equal([]);
    });

    it("3. a guest-script edit runs the config media and one provisioning run from the base, no install", async () => {
      const file = path.join(world.root, "provisioning", "windows", "provision.ps1");
      fs.appendFileSync(file, "\n# lifecycle test: an edit\n");
      const r = await up("guest-script edit");
      expectOk(r);
      expect(stagesOf(r)).to.have.members([R.upload, R.configMedia, ...PROVISION_RUN]);
    });

    it("4a. after a complete build, a vmCpus change rebuilds successfully", async () => {
      config = { ...config, vmCpus: "1" };
      const r = await up("vmCpus 2 -> 1");
      expectOk(r);
      // The VM's size is not install-affecting: the same base.
      expect(stagesOf(r)).to.have.members([R.renderEnv, ...PROVISION_RUN]);
    });

    it("4b. after a complete build, a new Windows image rebuilds successfully", async () => {
      const img = await world.image(1);
      config = { ...config, windowsImageUrl: img.url, windowsImageSha256: img.sha256 };
      const before = publishedSha();
      const r = await up("new Windows image");
      expectOk(r);
      expect(stagesOf(r)).to.have.members([R.fetchImage, R.prepareDisk, ...FROM_BOOT]);
      expect(r.outputs.imageSha256).to.not.equal(before);
    });

    it("5. a stage that fails: the retry resumes and finishes without repeating finished work", async () => {
      const img = await world.image(2);
      config = { ...config, windowsImageUrl: img.url, windowsImageSha256: img.sha256 };
      world.arm("convertFails");
      const failed = await up("new image, conversion fails (injected)");
      expect(failed.ok).to.equal(false);
      expect(failed.errors.join("\n"))
        .to.match(/windows-disk-prepare-disk/)
        .and.match(/stage prepareDisk: failed/);
      const ran = failed.executed.filter((e) => e.ok).map((e) => e.name);
      expect(ran).to.include(R.fetchImage);
      expect(ran).to.not.include(R.startVm);
      const source = path.join(world.home, "vm", "source.qcow2");
      const fetchedAt = fs.statSync(source).mtimeMs;

      const retry = await up("retry");
      expectOk(retry);
      expect(stagesOf(retry)).to.have.members([R.prepareDisk, ...FROM_BOOT]);
      expect(fs.statSync(source).mtimeMs, "the download is not repeated").to.equal(fetchedAt);
    });

    it("6. a stage that hangs fails within its host-side bound, naming the stage", async () => {
      config = { ...config, vmMemoryGiB: "5" };
      world.arm("envWriteHangs");
      const t0 = Date.now();
      const hung = await up("env write hangs (injected)");
      const seconds = (Date.now() - t0) / 1000;
      expect(hung.ok).to.equal(false);
      expect(hung.errors.join("\n")).to.match(/stage renderEnv: timed out after 2 min \(host-side bound\)/);
      // The bound (2 min) and the kill grace, well before Pulumi's own timeout (bound + 5 min).
      expect(seconds).to.be.below(2 * 60 + 60 + 30);
      const retry = await up("retry");
      expectOk(retry);
      expect(stagesOf(retry)).to.have.members([R.renderEnv, ...PROVISION_RUN]);
    });

    function publishedSha(): string {
      return String((JSON.parse(lastLine(`command:local:Command::${R.publish}`)) as { sha256: string }).sha256);
    }

    function lastLine(key: string): string {
      const out = String(world.engine.state.get(key)?.outputs.stdout ?? "");
      return out.trim().split("\n").pop() ?? "";
    }
  });

  describe("aws plan: stand-ins only where AWS would be (EC2, the bake instance, S3)", function () {
    this.bail(true);
    let world: AwsWorld;
    let config: Record<string, string>;
    const A = {
      waitHost: "host-files-wait-host",
      idleGuard: "host-files-idle-guard",
      operatorKeys: "host-files-operator-keys",
      stopHost: "stop-host",
      bake: "bake-instance",
      terminate: "bake-terminate",
    };
    const AMI = "aws:ec2/amiFromInstance:AmiFromInstance";
    const BAKE = [A.bake, A.terminate];

    before(async function () {
      const dir = path.join(repoRoot, ".cache", "lifecycle-aws");
      const { bin, faults } = makeShims(dir);
      world = await makeAwsWorld(dir, bin, faults);
      config = world.config();
    });
    after(async function () {
      await world?.stop();
    });

    const up = async (scenario: string, cfg = config) => record(`aws: ${scenario}`, await world.engine.up(cfg));
    const startsDuring = async (fn: () => Promise<RunResult>) => {
      const before = world.calls().length;
      const r = await fn();
      return {
        r,
        starts: world
          .calls()
          .slice(before)
          .filter((c) => c.startsWith("ec2 start-instances")).length,
      };
    };
    const amis = (r: RunResult) => r.executed.filter((e) => e.type === AMI && e.ok);
    const amiSource = () => String(world.engine.state.get(`${AMI}::bake-ami`)?.inputs.sourceInstanceId);

    it("7/8a. a first build: published to S3, the host stopped after it, an AMI baked from the published image on a bake instance", async () => {
      const r = await up("first build");
      expectOk(r);
      expect(stagesOf(r)).to.include.members([A.waitHost, A.idleGuard, R.publish, A.stopHost, ...BAKE]);
      expect(amis(r)).to.have.length(1);
      expect(world.state()).to.equal("stopped");
      const bakeId = amiSource();
      expect(bakeId)
        .to.match(/^i-0[0-9a-f]{16}$/)
        .and.not.equal(HOST_ID);
      expect(world.state(bakeId), "the bake instance is terminated").to.equal("terminated");
      // The bake installed the launcher, env and unit, with the published files verified.
      const bakeRoot = path.join(world.dir, "ec2", "instances", bakeId, "root");
      for (const f of [
        "usr/local/lib/windows-vm/run-vm.sh",
        "etc/windows-vm/vm.env",
        "etc/systemd/system/windows-vm.service",
      ])
        expect(fs.existsSync(path.join(bakeRoot, f)), f).to.equal(true);
      const key = String(r.outputs.manifestUri).replace(/^s3:\/\/[^/]+\//, "");
      const m = JSON.parse(String(await world.s3.getObject(key))) as { files: Array<{ name: string }> };
      expect(m.files.map((f) => f.name)).to.have.members(["disk.qcow2", "QEMU_VARS.fd", "QEMU_EFI.fd"]);
    });

    it("2/8b. a run with no change executes nothing: no start, no bake", async () => {
      const { r, starts } = await startsDuring(() => up("no change"));
      expectOk(r);
      expect(stagesOf(r)).to.deep.equal([]);
      expect(amis(r)).to.deep.equal([]);
      expect(starts).to.equal(0);
      expect(world.state()).to.equal("stopped");
    });

    it("7b/8c. a host stopped by the last run is started by the next run with work; a new image bakes a new AMI", async () => {
      const amiBefore = String(world.engine.state.get(`${AMI}::bake-ami`)?.id);
      fs.appendFileSync(path.join(world.root, "provisioning", "windows", "check.ps1"), "\n# lifecycle test: an edit\n");
      const { r, starts } = await startsDuring(() => up("guest-script edit (host stopped)"));
      expectOk(r);
      expect(starts).to.equal(1);
      expect(stagesOf(r)).to.include.members([R.configMedia, ...PROVISION_RUN, A.stopHost, ...BAKE]);
      for (const s of [R.fetchImage, R.prepareDisk, R.startVm, R.waitGuest, R.baseImage])
        expect(stagesOf(r), "a guest-script edit installs nothing").to.not.include(s);
      expect(String(world.engine.state.get(`${AMI}::bake-ami`)?.id)).to.not.equal(amiBefore);
      expect(world.state()).to.equal("stopped");
    });

    it("5/7c. a failed run leaves the host to the idle guard, which powers it off; the retry starts it and resumes", async () => {
      const img = await world.image(1);
      config = { ...config, windowsImageUrl: img.url, windowsImageSha256: img.sha256 };
      world.arm("convertFails");
      const failed = await up("new image, conversion fails (injected)");
      expect(failed.ok).to.equal(false);
      expect(failed.errors.join("\n")).to.match(/stage prepareDisk: failed/);
      expect(world.state(), "a failed run does not stop the host").to.equal("running");
      // The host's own idle guard, 46 minutes later with no stage running: it powers the host off.
      const idleRoot = world.hostPath("idle-root");
      const guard = await world.onHost("bash /opt/windows-arm64-image/provisioning/idle-guard.sh", {
        IDLE_ENV_FILE: path.join(idleRoot, "etc", "windows-arm64-image", "idle.env"),
        IDLE_NOW_S: String(Math.floor(Date.now() / 1000) + 46 * 60),
        IDLE_POWEROFF_COMMAND: `aws ec2 stop-instances --instance-ids ${HOST_ID}`,
      });
      expect(world.state(), `the idle guard stopped the host (it said: ${guard.out.trim()})`).to.equal("stopped");

      const { r, starts } = await startsDuring(() => up("retry (host stopped by the idle guard)"));
      expectOk(r);
      expect(starts).to.equal(1);
      expect(stagesOf(r)).to.include.members([R.prepareDisk, ...FROM_BOOT, A.stopHost, ...BAKE]);
      expect(stagesOf(r), "the finished download is not repeated").to.not.include(R.fetchImage);
      expect(world.state()).to.equal("stopped");
    });

    it("7d. a host stopped by hand stays stopped through a no-change run", async () => {
      await world.aws(["ec2", "start-instances", "--instance-ids", HOST_ID]);
      await world.aws(["ec2", "stop-instances", "--instance-ids", HOST_ID]);
      const { r, starts } = await startsDuring(() => up("no change (host stopped by hand)"));
      expectOk(r);
      expect(stagesOf(r)).to.deep.equal([]);
      expect(starts).to.equal(0);
    });
  });
});

function record(scenario: string, result: RunResult): RunResult {
  rows.push({ scenario, result });
  expect(result.longLines, "no stage prints a line over 4 KiB").to.deep.equal([]);
  return result;
}

function expectOk(r: RunResult): void {
  expect(r.errors, r.errors.join("\n---\n")).to.deep.equal([]);
  expect(r.ok).to.equal(true);
}
