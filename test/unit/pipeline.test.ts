import { expect } from "chai";
import { STAGE_IDS } from "../../infra/pipeline/plan";
import { allStrings, BASE_CONFIG, ProgramRun, Registered, runProgram } from "../support/mocks";

const PASSWORD = "Mock-Guest-Passw0rd!xyz";
const PRIVATE = "MOCKPRIVATEKEYDATA";
const SECRET_SIG = "4dabf18193072939515e22adb298388d";

/** The Pulumi resource name of each stage's main resource. */
const STAGE_RESOURCE: Record<string, [string, string]> = {
  firmware: ["command:remote:Command", "firmware-build"],
  fetchImage: ["command:remote:Command", "windows-disk-fetch-image"],
  fetchDrivers: ["command:remote:Command", "windows-disk-fetch-drivers"],
  prepareDisk: ["command:remote:Command", "windows-disk-prepare-disk"],
  configMedia: ["command:remote:Command", "build-vm-config-media"],
  renderEnv: ["command:remote:Command", "build-vm-env"],
  startVm: ["command:remote:Command", "build-vm-start"],
  waitGuest: ["command:remote:Command", "build-vm-wait-guest"],
  provisionGuest: ["command:remote:Command", "guest-run"],
  stopVm: ["command:remote:Command", "image-stop-vm"],
  publish: ["command:remote:Command", "image-publish"],
  prepareAmi: ["command:remote:Command", "bake-prepare"],
  stopHost: ["command:local:Command", "bake-stop-host"],
  bakeAmi: ["aws:ec2/amiFromInstance:AmiFromInstance", "bake-ami"],
};

/** The value inside a secret-wrapped input (the whole connection is a secret: it holds the key). */
function unwrap(v: any): any {
  return isSecret(v) ? v.value : v;
}

function isSecret(v: unknown): boolean {
  return typeof v === "object" && v !== null && SECRET_SIG in (v as Record<string, unknown>);
}

describe("image pipeline (mocks)", function () {
  this.timeout(120000);
  let run: ProgramRun;
  const get = (id: string): Registered => run.one(...STAGE_RESOURCE[id]);

  before(async () => {
    run = await runProgram(BASE_CONFIG, { asyncDelayMs: 20 });
  });

  it("creates one resource per stage", () => {
    for (const id of Object.keys(STAGE_RESOURCE)) expect(() => get(id), id).to.not.throw();
    expect(run.ofType("command:remote:CopyToRemote").length).to.be.greaterThan(10);
  });

  it("registers each stage only after the stages it depends on (async mock)", () => {
    const order: Array<[string, string]> = [
      ["fetchImage", "prepareDisk"],
      ["firmware", "startVm"],
      ["prepareDisk", "startVm"],
      ["configMedia", "startVm"],
      ["renderEnv", "startVm"],
      ["startVm", "waitGuest"],
      ["waitGuest", "provisionGuest"],
      ["provisionGuest", "stopVm"],
      ["stopVm", "publish"],
      ["publish", "prepareAmi"],
      ["prepareAmi", "stopHost"],
      ["stopHost", "bakeAmi"],
    ];
    for (const [before, after] of order)
      expect(get(before).seq, `${before} before ${after}`).to.be.lessThan(get(after).seq);
    const ready = run.one("command:remote:Command", "qemu-host-ready").seq;
    for (const id of ["firmware", "fetchImage", "fetchDrivers", "renderEnv"])
      expect(get(id).seq).to.be.greaterThan(ready);
    for (const c of run.ofType("command:remote:CopyToRemote")) expect(c.seq).to.be.greaterThan(ready);
  });

  it("host stages run the plan's commands over SSH to the host", () => {
    const fw = get("firmware").inputs as Record<string, any>;
    expect(fw.create).to.equal("sudo -n bash /opt/windows-arm64-image/provisioning/build-efi.sh /var/lib/windows-vm");
    expect(isSecret(fw.connection), "the connection holds the private key: a secret").to.equal(true);
    expect(unwrap(fw.connection).host).to.equal("198.51.100.10");
    expect(unwrap(fw.connection).user).to.equal("ubuntu");
    expect(fw.addPreviousOutputInEnv).to.equal(false);
    expect(get("publish").inputs.create).to.contain(
      "publish-image.sh /var/lib/windows-vm 's3://artifacts-bucket-123/windows-arm64/'",
    );
    expect(get("fetchImage").inputs.create).to.contain("fetch-image.sh s3://media-bucket/images/win11-23h2.vhdx");
  });

  it("triggers hold the stage digest and the host id", () => {
    const t = get("firmware").inputs.triggers as unknown[];
    expect(t[0]).to.match(/^[0-9a-f]{64}$/);
    expect(t).to.include("qemu-host-instance-id");
    // File copies too: a replaced host behind the same Elastic IP gets every file again.
    for (const c of run.ofType("command:remote:CopyToRemote")) {
      expect(c.inputs.triggers as unknown[], c.name).to.include("qemu-host-instance-id");
    }
  });

  it("guest provisioning goes through the host as a jump host, parameters on stdin as a secret", () => {
    const g = get("provisionGuest").inputs as Record<string, any>;
    const conn = unwrap(g.connection);
    expect(conn.host).to.equal("127.0.0.1");
    expect(conn.port).to.equal(2222);
    expect(conn.user).to.equal("gopher");
    expect(conn.proxy.host).to.equal("198.51.100.10");
    expect(g.create).to.match(/^powershell -NoProfile -NonInteractive -ExecutionPolicy Bypass -EncodedCommand /);
    expect(isSecret(g.stdin), "stdin is a secret").to.equal(true);
  });

  it("the answer file reaches the host on stdin as a secret", () => {
    expect(isSecret(get("configMedia").inputs.stdin)).to.equal(true);
  });

  it("no secret value appears in a command string, trigger or non-secret output", () => {
    for (const r of run.resources) {
      const visible = { ...r.inputs };
      delete visible.stdin; // secret-wrapped (checked above)
      delete visible.connection; // the private key is a secret-wrapped connection field
      const text = allStrings(visible).join("\n");
      expect(text, r.name).to.not.contain(PASSWORD);
      expect(text, r.name).to.not.contain(PRIVATE);
    }
    const outText = allStrings(run.outputs).join("\n");
    expect(outText).to.not.contain(PASSWORD);
    expect(outText).to.not.contain(PRIVATE);
    expect(run.one("random:index/randomPassword:RandomPassword").inputs.length).to.be.at.least(16);
  });

  it("bakes the AMI named with the image SHA-256, tagged, retained on delete, with long timeouts", () => {
    const ami = get("bakeAmi").inputs as Record<string, any>;
    // The image's SHA-256, then the prepareAmi digest (what was installed around it).
    expect(ami.name).to.match(/^windows-arm64-11-23h2-test-20261126-c{16}-[0-9a-f]{8}$/);
    expect(ami.sourceInstanceId).to.equal("qemu-host-instance-id");
    expect(ami.tags).to.include({ WindowsVersion: "11-23h2", ImageSha256: "c".repeat(64), Stack: "test" });
    expect(ami.tags.SourceImage).to.equal("s3://media-bucket/images/win11-23h2.vhdx");
  });

  it("stops the host before the bake by default (a consistent snapshot, no reboot), again after each run with work", () => {
    const stop = get("stopHost").inputs as Record<string, any>;
    expect(stop.create).to.equal("bash provisioning/host-power.sh stop qemu-host-instance-id");
    expect(stop.environment).to.deep.equal({ AWS_REGION: "us-east-2", AWS_DEFAULT_REGION: "us-east-2" });
    const wake = run.one("command:local:Command", "qemu-host-ssh-up").inputs as Record<string, any>;
    expect(stop.triggers).to.include(wake.triggers[1]);
    // An instance type change (EC2 stops and starts the host) stops it again; so does a run that set operator keys.
    expect(stop.triggers).to.include("a1.metal");
    expect(get("stopHost").seq).to.be.greaterThan(run.one("command:remote:Command", "qemu-host-operator-keys").seq);
    expect(run.ofType("aws:ec2transitgateway/instanceState:InstanceState")).to.have.length(0);
  });

  it("the wake key is stable without changes and moves with any input of a host stage", async () => {
    const wake = (r: ProgramRun) => (r.one("command:local:Command", "qemu-host-ssh-up").inputs.triggers as string[])[1];
    const same = await runProgram(BASE_CONFIG);
    expect(wake(same)).to.equal(wake(run));
    const settings = await runProgram({ ...BASE_CONFIG, guestDisableUac: "false" });
    expect(wake(settings)).to.not.equal(wake(run));
  });

  it("keeps the host running when asked: nothing stops it, the AMI follows prepareAmi", async () => {
    const r = await runProgram({ ...BASE_CONFIG, keepHostRunning: "true" });
    expect(r.resources.filter((x) => x.name.endsWith("stop-host"))).to.have.length(0);
    expect(r.one("aws:ec2/amiFromInstance:AmiFromInstance").seq).to.be.greaterThan(
      r.one("command:remote:Command", "bake-prepare").seq,
    );
  });

  it("exports the outputs consumers read", () => {
    expect(run.outputs).to.include({
      amiId: "ami-0123456789abcdef0",
      imageSha256: "c".repeat(64),
      windowsVersion: "11-23h2",
      hostInstanceType: "a1.metal",
      hostInstanceId: "qemu-host-instance-id",
    });
    expect(run.outputs.imageUri).to.match(/^s3:\/\/artifacts-bucket-123\/windows-arm64\/c{64}\/disk\.qcow2$/);
    expect(run.outputs.manifestUri).to.match(/manifest\.json$/);
    expect(run.outputs.amiName).to.match(/c{16}-[0-9a-f]{8}$/);
    expect(run.outputs.amiArn).to.equal("arn:aws:ec2:us-east-2::image/ami-0123456789abcdef0");
    expect(run.outputs.amiRegion).to.equal("us-east-2");
  });

  it("the local target declares no AWS resource and runs the same stages locally", async () => {
    const r = await runProgram({
      ...BASE_CONFIG,
      target: "local",
      sshAllowedCidrs: "[]",
      windowsImageUrl: "file:///srv/win.qcow2",
      localWorkDir: "/tmp/w-a-i-local",
    });
    expect(r.resources.filter((x) => x.type.startsWith("aws:"))).to.have.length(0);
    const fw = r.one("command:local:Command", "firmware-build").inputs as Record<string, string>;
    expect(fw.create).to.equal("bash /tmp/w-a-i-local/provisioning/build-efi.sh /tmp/w-a-i-local/vm");
    expect(r.outputs.amiId).to.equal(undefined);
    expect(r.outputs.imageSha256).to.equal("c".repeat(64));
    const g = r.one("command:remote:Command", "guest-run").inputs as Record<string, any>;
    expect(unwrap(g.connection).proxy).to.equal(undefined);
    expect(STAGE_IDS.length).to.equal(16);
    const pub = r.one("command:local:Command", "image-publish").inputs as Record<string, string>;
    expect(pub.create).to.contain("publish-image.sh /tmp/w-a-i-local/vm 'file:///tmp/w-a-i-local/artifacts/'");
  });

  it("the local target publishes to a percent-encoded folder URI under localWorkDir by default", async () => {
    const r = await runProgram({
      ...BASE_CONFIG,
      target: "local",
      sshAllowedCidrs: "[]",
      windowsImageUrl: "file:///srv/win.qcow2",
      localWorkDir: "/tmp/w a%i",
    });
    const pub = r.one("command:local:Command", "image-publish").inputs as Record<string, string>;
    expect(pub.create).to.contain("'file:///tmp/w%20a%25i/artifacts/'");
    // The folder's space is quoted wherever the path appears.
    expect(pub.create).to.contain("bash '/tmp/w a%i/provisioning/publish-image.sh' '/tmp/w a%i/vm' 'file://");
  });
});
