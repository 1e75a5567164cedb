import { expect } from "chai";
import * as fs from "fs";
import * as os from "os";
import * as zlib from "zlib";
import { encodeUnattendPassword } from "../../infra/answerFile";
import { defaultAmiVolumeGiB } from "../../infra/bake";
import { parseConfig, RawConfig } from "../../infra/config";
import { fileSha256, repoPath, sha256Hex } from "../../infra/paths";
import {
  AWS_LAYOUT,
  buildPlan,
  HOST_READY_SCRIPT,
  HOST_READY_TIMEOUT_S,
  HostLayout,
  Plan,
  planFiles,
  resolveCommand,
  RuntimeValues,
  Stage,
  StageId,
} from "../../infra/pipeline/plan";
import { awsCommand } from "../../infra/pipeline/runner";
import { bashWords, bashWordsOf } from "../support/bash";
import { sampleManifest } from "../support/manifest";
import {
  allStrings,
  BASE_CONFIG,
  isSecret,
  MOCK_BAKE_INSTANCE_ID,
  MOCK_KEYS,
  MOCK_PASSWORD,
  ProgramRun,
  Registered,
  runProgram,
  unwrap,
} from "../support/mocks";

/** The Pulumi resource of each stage (all local commands, but the AMI). */
const STAGE_RESOURCE: Record<StageId, [string, string]> = {
  waitHost: ["command:local:Command", "host-files-wait-host"],
  uploadFiles: ["command:local:Command", "host-files-upload"],
  idleGuard: ["command:local:Command", "host-files-idle-guard"],
  firmware: ["command:local:Command", "firmware-build"],
  fetchImage: ["command:local:Command", "windows-disk-fetch-image"],
  fetchDrivers: ["command:local:Command", "windows-disk-fetch-drivers"],
  prepareDisk: ["command:local:Command", "windows-disk-prepare-disk"],
  injectAnswerFile: ["command:local:Command", "windows-disk-inject-answer-file"],
  configMedia: ["command:local:Command", "build-vm-config-media"],
  renderEnv: ["command:local:Command", "build-vm-env"],
  startVm: ["command:local:Command", "build-vm-start"],
  waitGuest: ["command:local:Command", "build-vm-wait-guest"],
  baseImage: ["command:local:Command", "build-vm-base"],
  overlayDisk: ["command:local:Command", "guest-overlay"],
  provisionGuest: ["command:local:Command", "guest-run"],
  stopVm: ["command:local:Command", "image-stop-vm"],
  publish: ["command:local:Command", "image-publish"],
  stopHost: ["command:local:Command", "stop-host"],
  bakeImage: ["command:local:Command", "bake-instance"],
  bakeAmi: ["aws:ec2/amiFromInstance:AmiFromInstance", "bake-ami"],
};

const HOST_ID = "qemu-host-instance-id";
const ELASTIC_IP = "198.51.100.10";
const ARTIFACT_URI = "s3://artifacts-bucket-123/windows-arm64/";
const SHA = "c".repeat(64);
const PIPELINE_PUBLIC = MOCK_KEYS.pipeline.publicKey;
const GUEST_PUBLIC = MOCK_KEYS.guest.publicKey;
/** Text only the rendered answer file and the settings JSON hold (besides the password). */
const ANSWER_FILE_MARK = "urn:schemas-microsoft-com:unattend";
const SETTINGS_MARK = '"builderPassword"';

const LOCAL_DIR = "/tmp/w%i,x";
const LOCAL_CONFIG: Record<string, string> = {
  ...BASE_CONFIG,
  target: "local",
  sshAllowedCidrs: "[]",
  windowsImageUrl: "file:///srv/win.qcow2",
  vmCpus: "2",
  vmMemoryGiB: "4",
  localWorkDir: LOCAL_DIR,
};
/** What infra/index.ts lays out for LOCAL_DIR on this machine. */
const LOCAL_LAYOUT: HostLayout = {
  home: LOCAL_DIR,
  vmDir: `${LOCAL_DIR}/vm`,
  sudo: "",
  imageRoot: `${LOCAL_DIR}/image-root`,
  buildUnit: "windows-vm-build-local",
  stageRunDir: `${LOCAL_DIR}/run/stages`,
  stageStateDir: `${LOCAL_DIR}/state`,
  sshPort: 2222,
  accel: os.arch() === "arm64" && fs.existsSync("/dev/kvm") ? "kvm" : "tcg",
};

/** The plan the program builds from this config (the real files' hashes). */
function expectedPlan(config: Record<string, string>, layout: HostLayout): Plan {
  const raw: RawConfig = Object.fromEntries(Object.entries(config).filter(([k]) => !k.includes(":")));
  const fileHashes = Object.fromEntries(planFiles().map((f) => [f, fileSha256(f)]));
  return buildPlan({ config: parseConfig(raw), layout, fileHashes });
}

function inputs(r: Registered): Record<string, any> {
  return r.inputs as Record<string, any>;
}

/** "215m" -> 215. */
function minutes(s: string | undefined): number {
  const m = /^(\d+)m$/.exec(s ?? "");
  if (!m) throw new Error(`not a whole number of minutes: ${s}`);
  return Number(m[1]);
}

/** The commands that run on the build host (through host-exec.sh). */
function hostExecCommands(run: ProgramRun): Registered[] {
  return run
    .ofType("command:local:Command")
    .filter((r) => /provisioning\/host-exec\.sh /.test(String(unwrap(inputs(r).create))));
}

/** What an SSH stage sends after the pipeline's key (host-exec.sh reads the key up to its END line). */
function sshPayload(r: Registered): string {
  const stdin = String(unwrap(inputs(r).stdin));
  const key = MOCK_KEYS.pipeline.privateKey.trim();
  expect(stdin.startsWith(`${key}\n`), `${r.name}: stdin starts with the pipeline's key`).to.equal(true);
  return stdin.slice(key.length + 1);
}

/** The words of `exec bash provisioning/host-exec.sh ...` in SSH commands (after the profile guard). */
function hostExecWordsOf(creates: string[]): string[][] {
  const guard = 'if [ -z "${AWS_PROFILE:-}" ]; then unset AWS_PROFILE; fi; exec ';
  for (const c of creates) expect(c.startsWith(guard), c.slice(0, 100)).to.equal(true);
  return bashWordsOf(creates.map((c) => c.slice(guard.length)));
}

function hostExecWords(create: unknown): string[] {
  return hostExecWordsOf([String(unwrap(create))])[0];
}

/** Every input but stdin, as text (where a secret must never be). */
function visibleText(r: Registered): string {
  const { stdin: _stdin, ...rest } = r.inputs;
  void _stdin;
  return allStrings(rest).join("\n");
}

describe("image pipeline (mocks)", function () {
  this.timeout(300000);
  let run: ProgramRun;
  let local: ProgramRun;
  let p: Plan;
  let lp: Plan;
  const res = (r: ProgramRun, id: StageId): Registered => r.one(...STAGE_RESOURCE[id]);
  const get = (id: StageId) => res(run, id);
  const values: Partial<RuntimeValues> = { hostId: HOST_ID, artifactUri: ARTIFACT_URI, guestKey: GUEST_PUBLIC };
  const hostStages = (pl: Plan): Stage[] => pl.stages.filter((s) => s.site === "host" && s.id !== "uploadFiles");

  before(async () => {
    run = await runProgram(BASE_CONFIG, { asyncDelayMs: 20 });
    local = await runProgram(LOCAL_CONFIG);
    p = expectedPlan(BASE_CONFIG, AWS_LAYOUT);
    lp = expectedPlan(LOCAL_CONFIG, LOCAL_LAYOUT);
    // The base key's answer-file token stands for the SHA-256 of the answer file configMedia sends.
    values.answerFile = sha256Hex(sshPayload(get("configMedia")));
  });

  it("declares one resource per stage of the plan, and no remote command (their timeouts are not enforced)", () => {
    for (const [r, pl] of [
      [run, p],
      [local, lp],
    ] as Array<[ProgramRun, Plan]>) {
      for (const s of pl.stages) expect(() => res(r, s.id), s.id).to.not.throw();
      expect(r.resources.filter((x) => x.type.startsWith("command:remote:")).map((x) => x.name)).to.deep.equal([]);
    }
    expect(p.stages.map((s) => s.id)).to.include.members(["waitHost", "idleGuard", "stopHost", "bakeImage", "bakeAmi"]);
  });

  it("each host stage runs the plan's bounded command through host-exec.sh, on the Elastic IP", () => {
    const stages = hostStages(p);
    const words = hostExecWordsOf(stages.map((s) => String(unwrap(inputs(get(s.id)).create))));
    stages.forEach((s, i) => {
      const r = inputs(get(s.id));
      expect(words[i], s.id).to.deep.equal([
        "bash",
        "provisioning/host-exec.sh",
        "run",
        resolveCommand(s.hostCommand as string, values),
      ]);
      expect(r.environment, s.id).to.deep.equal({
        HOST_EXEC_ADDRESS: ELASTIC_IP,
        HOST_EXEC_USER: "ubuntu",
        HOST_EXEC_INSTANCE_ID: HOST_ID,
        AWS_REGION: "us-east-2",
        AWS_DEFAULT_REGION: "us-east-2",
        AWS_PROFILE: "",
      });
      expect(r.interpreter, s.id).to.deep.equal(["/bin/bash", "-c"]);
      expect(r.addPreviousOutputInEnv, s.id).to.equal(false);
    });
    // The auto-assigned address is lost at each stop: nothing uses it.
    for (const r of run.resources) expect(allStrings(r.inputs).join("\n"), r.name).to.not.contain("203.0.113.250");
  });

  it("triggers hold the stage digest and the runtime values it depends on (a new host re-runs it)", () => {
    for (const s of hostStages(p)) {
      const t = inputs(get(s.id)).triggers as unknown[];
      expect(t[0], s.id).to.equal(s.digest);
      expect(t, s.id).to.have.length(1 + s.runtime.length);
      expect(t, s.id).to.include(HOST_ID);
    }
    expect(inputs(get("publish")).triggers).to.include(ARTIFACT_URI);
    expect(inputs(get("configMedia")).triggers).to.include(GUEST_PUBLIC);
    // The upload too: a replaced host behind the same Elastic IP gets every file again.
    const up = inputs(get("uploadFiles"));
    expect(up.triggers).to.have.length(2);
    expect(up.triggers[0]).to.match(/^[0-9a-f]{64}$/);
    expect(up.triggers[1]).to.equal(HOST_ID);
  });

  it("uploads every host file in one command, after the host is ready; every host stage waits for it", () => {
    const up = get("uploadFiles");
    expect(hostExecWords(inputs(up).create)).to.deep.equal([
      "bash",
      "provisioning/host-exec.sh",
      "upload",
      ".",
      "/opt/windows-arm64-image",
      ...p.stage("uploadFiles").files,
    ]);
    expect(
      run.ofType("command:local:Command").filter((r) => /host-exec\.sh upload/.test(String(unwrap(inputs(r).create)))),
    ).to.have.length(1);
    expect(up.options.dependencies).to.include(get("waitHost").urn);
    for (const s of hostStages(p).filter((x) => x.id !== "waitHost"))
      expect(get(s.id).options.dependencies, s.id).to.include(up.urn);
  });

  it("waits for the host with host-ready.sh on stdin, once the Elastic IP and the role policy are in place", () => {
    const w = get("waitHost");
    expect(hostExecWords(inputs(w).create)).to.deep.equal([
      "bash",
      "provisioning/host-exec.sh",
      "run",
      `HOST_READY_TIMEOUT_S=${HOST_READY_TIMEOUT_S} bash -s`,
    ]);
    expect(sshPayload(w)).to.equal(fs.readFileSync(repoPath(HOST_READY_SCRIPT), "utf8"));
    const deps = w.options.dependencies;
    expect(deps).to.include(run.one("aws:ec2/eipAssociation:EipAssociation").urn);
    expect(deps).to.include(run.one("aws:iam/rolePolicy:RolePolicy", "qemu-host-artifacts").urn);
  });

  it("every stage resource waits for its plan dependencies (and `after` stages)", () => {
    for (const [r, pl] of [
      [run, p],
      [local, lp],
    ] as Array<[ProgramRun, Plan]>) {
      for (const s of pl.stages)
        for (const d of [...s.dependsOn, ...s.after])
          expect(res(r, s.id).options.dependencies, `${s.id} after ${d}`).to.include(res(r, d).urn);
    }
  });

  it("registers each stage only after the stages it depends on (async mock)", () => {
    const order: Array<[StageId, StageId]> = [
      ["waitHost", "uploadFiles"],
      ["uploadFiles", "firmware"],
      ["fetchImage", "prepareDisk"],
      ["firmware", "startVm"],
      ["prepareDisk", "startVm"],
      ["configMedia", "startVm"],
      ["renderEnv", "startVm"],
      ["startVm", "waitGuest"],
      ["waitGuest", "baseImage"],
      ["baseImage", "overlayDisk"],
      ["configMedia", "overlayDisk"],
      ["renderEnv", "overlayDisk"],
      ["overlayDisk", "provisionGuest"],
      ["provisionGuest", "stopVm"],
      ["stopVm", "publish"],
      ["publish", "stopHost"],
      ["publish", "bakeImage"],
      ["bakeImage", "bakeAmi"],
    ];
    for (const [before, after] of order)
      expect(get(before).seq, `${before} before ${after}`).to.be.lessThan(get(after).seq);
  });

  it("bounds every command: host stages at their stage.sh bound + 35 min on AWS (the wake), + 5 min locally", () => {
    for (const [r, pl, margin] of [
      [run, p, 35],
      [local, lp, 5],
    ] as Array<[ProgramRun, Plan, number]>) {
      for (const s of hostStages(pl)) {
        const t = res(r, s.id).options.customTimeouts;
        expect(minutes(t.create), s.id).to.equal(s.timeoutMinutes + margin);
        expect(minutes(t.update), s.id).to.equal(s.timeoutMinutes + margin);
        const bound = s.id === "waitHost" ? HOST_READY_TIMEOUT_S : s.timeoutMinutes * 60;
        expect(minutes(t.create) * 60, s.id).to.be.greaterThan(bound);
      }
      for (const c of r.ofType("command:local:Command"))
        expect(minutes(c.options.customTimeouts.create), c.name).to.be.greaterThan(0);
    }
    // The stage.sh bound in the command is the same timeoutMinutes.
    expect(resolveCommand(p.stage("provisionGuest").hostCommand as string, values)).to.contain(
      "stage.sh provisionGuest 10800 ",
    );
    const up = get("uploadFiles").options.customTimeouts;
    expect(minutes(up.create)).to.equal(10 + 35);
    expect(
      minutes(run.one("command:local:Command", "host-files-operator-keys").options.customTimeouts.create),
    ).to.be.greaterThan(35);
    expect(minutes(res(local, "uploadFiles").options.customTimeouts.create)).to.equal(10);
    // The bake's own bound (bake-instance.sh) ends before Pulumi's.
    const bake = get("bakeImage");
    expect(minutes(bake.options.customTimeouts.create) * 60).to.be.greaterThan(
      Number(inputs(bake).environment.BAKE_TIMEOUT_S),
    );
  });

  it("no command re-runs for a changed AWS profile or logging setting: both are ignored on every command", () => {
    for (const r of [run, local])
      for (const c of r.ofType("command:local:Command"))
        expect(c.options.ignoreChanges, c.name).to.include.members(["environment.AWS_PROFILE", "logging"]);
    // The path exists on every AWS command that has an environment (so the ignore applies).
    for (const c of run.ofType("command:local:Command"))
      expect(inputs(c).environment, c.name).to.have.property("AWS_PROFILE");
  });

  it("a stack's aws:profile reaches every AWS CLI call where Pulumi runs, and changes no trigger or command", async () => {
    // Back to back: the repository's files are hashed at each run.
    const before = await runProgram(BASE_CONFIG);
    const r = await runProgram({ ...BASE_CONFIG, "aws:profile": "ci-builder" });
    for (const c of r.ofType("command:local:Command")) {
      expect(inputs(c).environment.AWS_PROFILE, c.name).to.equal("ci-builder");
      const base = before.one("command:local:Command", c.name);
      expect(inputs(c).triggers, c.name).to.deep.equal(inputs(base).triggers);
      expect(unwrap(inputs(c).create), c.name).to.deep.equal(unwrap(inputs(base).create));
    }
  });

  it("stores stdout and stderr as secrets where stdin holds one (the answer file, the guest key and settings), and only there", () => {
    for (const [r, pl] of [
      [run, p],
      [local, lp],
    ] as Array<[ProgramRun, Plan]>) {
      for (const id of ["configMedia", "provisionGuest"] as StageId[])
        expect(res(r, id).options.additionalSecretOutputs, id).to.include.members(["stdout", "stderr"]);
      for (const s of pl.stages.filter((x) => x.secretStdin))
        expect(res(r, s.id).options.additionalSecretOutputs, s.id).to.include.members(["stdout", "stderr"]);
      for (const s of pl.stages.filter((x) => !x.secretStdin))
        expect(res(r, s.id).options.additionalSecretOutputs, s.id).to.not.include("stdout");
    }
    // The manifest comes from publish's stdout: its outputs stay readable for other stacks.
    for (const k of ["imageSha256", "imageUri", "manifestUri", "amiId", "amiName"])
      expect(run.secretOutputs, k).to.not.include(k);
  });

  it("no secret appears in a command, trigger, environment or any other input but a secret stdin, nor in an output", () => {
    const secrets = [
      MOCK_PASSWORD,
      // The answer file holds the password base64-encoded (PlainText false).
      encodeUnattendPassword(MOCK_PASSWORD, "Password"),
      encodeUnattendPassword(MOCK_PASSWORD, "AdministratorPassword"),
      MOCK_KEYS.pipeline.privateMaterial,
      MOCK_KEYS.guest.privateMaterial,
      ANSWER_FILE_MARK,
      SETTINGS_MARK,
    ];
    for (const r of [run, local]) {
      for (const x of r.resources) {
        const text = visibleText(x);
        for (const s of secrets) expect(text, `${x.name} holds ${s}`).to.not.contain(s);
        const stdin = allStrings(x.inputs.stdin).join("\n");
        if (secrets.some((s) => stdin.includes(s)))
          expect(isSecret(x.inputs.stdin), `${x.name}: stdin is secret`).to.equal(true);
      }
      const out = allStrings(r.outputs).join("\n");
      for (const s of secrets) expect(out, s).to.not.contain(s);
    }
    // Not vacuous: the secrets are there, on stdin.
    expect(String(unwrap(inputs(get("configMedia")).stdin)))
      .to.contain(ANSWER_FILE_MARK)
      .and.contain(encodeUnattendPassword(MOCK_PASSWORD, "Password"));
    expect(String(unwrap(inputs(get("provisionGuest")).stdin))).to.contain(SETTINGS_MARK);
    expect(run.one("random:index/randomPassword:RandomPassword").inputs.length).to.be.at.least(16);
  });

  it("the stdin of every SSH command is a secret (it holds the pipeline's key first)", () => {
    const ssh = hostExecCommands(run);
    expect(ssh.length).to.be.greaterThan(15);
    for (const c of ssh) {
      expect(isSecret(inputs(c).stdin), c.name).to.equal(true);
      sshPayload(c);
    }
  });

  it("the guest gets its own key: the config ISO authorizes it, guest-run sends its private half, the pipeline's key stays out", () => {
    const keys = run.ofType("tls:index/privateKey:PrivateKey");
    // The smoke test has a key of its own (test/unit/smokeTest.test.ts).
    expect(keys.map((k) => k.name)).to.have.members(["pipeline-key", "guest-key", "smoke-test-key"]);
    for (const k of keys) expect(k.inputs.algorithm).to.equal("ED25519");
    expect(run.one("aws:ec2/keyPair:KeyPair").inputs.publicKey).to.equal(PIPELINE_PUBLIC);

    const mediaCmd = String(unwrap(inputs(get("configMedia")).create));
    expect(mediaCmd).to.contain(GUEST_PUBLIC);
    const answer = sshPayload(get("configMedia"));
    // The key goes on the ISO as authorized_keys (from the command), not inside the answer file.
    expect(answer).to.contain(ANSWER_FILE_MARK);
    const guestRun = sshPayload(get("provisionGuest"));
    expect(guestRun.startsWith(`${MOCK_KEYS.guest.privateKey.trim()}\n`)).to.equal(true);
    const settings = JSON.parse(guestRun.slice(MOCK_KEYS.guest.privateKey.trim().length + 1));
    expect(settings).to.include({ builderUser: "gopher", builderPassword: MOCK_PASSWORD });

    // Nothing the guest sees holds the pipeline's key, private or public.
    const guestFacing = [mediaCmd, answer, guestRun];
    if (p.stages.some((s) => s.id === "injectAnswerFile")) guestFacing.push(sshPayload(get("injectAnswerFile")));
    for (const [i, text] of guestFacing.entries()) {
      expect(text, `guest-facing input ${i}`).to.not.contain(MOCK_KEYS.pipeline.privateMaterial);
      expect(text, `guest-facing input ${i}`).to.not.contain(PIPELINE_PUBLIC);
    }
    // Locally too (stdin is the payload itself there).
    expect(String(unwrap(inputs(res(local, "configMedia")).create)))
      .to.contain(GUEST_PUBLIC)
      .and.not.contain(PIPELINE_PUBLIC);
    const localGuest = String(unwrap(inputs(res(local, "provisionGuest")).stdin));
    expect(localGuest.startsWith(`${MOCK_KEYS.guest.privateKey.trim()}\n`)).to.equal(true);
    expect(localGuest).to.not.contain(MOCK_KEYS.pipeline.privateMaterial);
  });

  it("installs the idle guard for 45 minutes by default; nothing but the host stop waits for it", () => {
    const idle = get("idleGuard");
    expect(resolveCommand(p.stage("idleGuard").hostCommand as string, values)).to.match(/idle-guard-install\.sh 45'$/);
    expect(hostExecWords(inputs(idle).create)[3]).to.equal(
      resolveCommand(p.stage("idleGuard").hostCommand as string, values),
    );
    const waiting = run.resources.filter((r) => r.options.dependencies.includes(idle.urn)).map((r) => r.name);
    expect(waiting).to.deep.equal(["stop-host"]);
  });

  it("stops the host after the publication and every host command (operator keys too), triggered by the wake key", () => {
    const stop = get("stopHost");
    const i = inputs(stop);
    expect(i.create).to.equal(awsCommand(`exec bash provisioning/host-power.sh stop ${HOST_ID}`));
    expect(i.environment).to.deep.equal({ AWS_PROFILE: "", AWS_REGION: "us-east-2", AWS_DEFAULT_REGION: "us-east-2" });
    expect(i.triggers).to.have.length(2);
    expect(i.triggers[0]).to.equal(HOST_ID);
    expect(i.triggers[1]).to.match(/^[0-9a-f]{64}$/);
    const ssh = hostExecCommands(run);
    expect(ssh.map((c) => c.name)).to.include("host-files-operator-keys");
    for (const c of ssh) expect(stop.options.dependencies, `stop-host after ${c.name}`).to.include(c.urn);
    expect(stop.options.dependencies).to.include(get("publish").urn);
    expect(minutes(stop.options.customTimeouts.create)).to.equal(p.stage("stopHost").timeoutMinutes);
    // The bake does not wait for the build host at all.
    expect(run.waitsFor(get("bakeImage"), stop)).to.equal(false);
  });

  it("the wake key is stable without changes and moves with any host stage input, not with bake-only ones", async () => {
    const wake = (r: ProgramRun) => inputs(r.one("command:local:Command", "stop-host")).triggers[1] as string;
    const hostTriggers = (r: ProgramRun) =>
      JSON.stringify(hostExecCommands(r).map((c) => [c.name, inputs(c).triggers]));
    // Back-to-back runs: the repository's files are hashed at each run.
    const base = await runProgram(BASE_CONFIG);
    const same = await runProgram(BASE_CONFIG);
    expect(wake(same)).to.equal(wake(base));
    expect(hostTriggers(same)).to.equal(hostTriggers(base));
    const alice = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAliceKeyMaterialForTestsOnly1234567 alice";
    const variants: Array<[string, Record<string, string>, boolean]> = [
      ["vmCpus (renderEnv)", { vmCpus: "3" }, true],
      ["a guest setting (runtime value)", { guestDisableUac: "false" }, true],
      ["hostIdleMinutes (idleGuard)", { hostIdleMinutes: "90" }, true],
      ["the image hash (fetchImage)", { windowsImageSha256: "b".repeat(64) }, true],
      ["the artifact prefix (publish's URI)", { artifactPrefix: "other/" }, true],
      ["an operator key", { sshAuthorizedKeys: JSON.stringify([alice]) }, true],
      ["the bake instance type", { bakeInstanceType: "c7g.xlarge" }, false],
      ["the AMI's volume", { amiVolumeGiB: "100" }, false],
      ["the buildlet port (baked image only)", { vmBuildletPort: "8443" }, false],
    ];
    for (const [what, over, moves] of variants) {
      const r = await runProgram({ ...BASE_CONFIG, ...over });
      // Exactly when some command on the host has work to do, the host is stopped again.
      expect(hostTriggers(r) !== hostTriggers(base), `${what}: host work`).to.equal(moves);
      expect(wake(r) !== wake(base), `${what}: wake key`).to.equal(moves);
    }
  });

  it("keeps the host running when asked: no stop, the idle guard off, the AMI still baked on its own instance", async () => {
    const r = await runProgram({ ...BASE_CONFIG, keepHostRunning: "true" });
    expect(r.resources.filter((x) => x.name === "stop-host")).to.have.length(0);
    const idle = String(unwrap(inputs(r.one("command:local:Command", "host-files-idle-guard")).create));
    expect(idle).to.contain("idle-guard-install.sh off");
    expect(idle).to.not.contain("idle-guard-install.sh 45");
    const ami = r.one("aws:ec2/amiFromInstance:AmiFromInstance");
    expect(inputs(ami).sourceInstanceId).to.equal(MOCK_BAKE_INSTANCE_ID);
    expect(ami.options.dependencies).to.include(r.one("command:local:Command", "bake-instance").urn);
  });

  it("gives the bake instance a role that reads the prefix and writes only bake-status/, and no inbound access", () => {
    const policy = JSON.parse(run.one("aws:iam/rolePolicy:RolePolicy", "bake-artifacts").inputs.policy as string);
    expect(policy.Statement).to.deep.equal([
      {
        Sid: "ReadPublishedImage",
        Effect: "Allow",
        Action: ["s3:GetObject"],
        Resource: ["arn:aws:s3:::artifacts-bucket-123/windows-arm64/*"],
      },
      {
        Sid: "WriteBakeStatus",
        Effect: "Allow",
        Action: ["s3:PutObject"],
        Resource: ["arn:aws:s3:::artifacts-bucket-123/windows-arm64/bake-status/*"],
      },
    ]);
    const role = run.one("aws:iam/role:Role", "bake-role");
    expect(JSON.parse(role.inputs.assumeRolePolicy as string).Statement[0].Principal).to.deep.equal({
      Service: "ec2.amazonaws.com",
    });
    expect(run.one("aws:iam/instanceProfile:InstanceProfile", "bake-profile").inputs.role).to.equal("bake-role");
    const sg = inputs(run.one("aws:ec2/securityGroup:SecurityGroup", "bake-egress"));
    expect(sg.ingress ?? []).to.deep.equal([]);
    expect(sg.vpcId).to.equal("vpc-0default");
    expect(run.ofType("aws:ec2/securityGroupRule:SecurityGroupRule")).to.have.length(0);
    expect(run.ofType("aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule")).to.have.length(0);
  });

  it("launches the bake instance from the host AMI with the bake type, the volume from the image, the status under the prefix", () => {
    const bake = get("bakeImage");
    const i = inputs(bake);
    expect(i.create).to.equal(awsCommand("exec bash provisioning/bake-instance.sh run"));
    const digest = p.stage("bakeImage").digest;
    expect(i.triggers).to.deep.equal([digest, SHA]);
    expect(i.environment).to.include({
      AWS_PROFILE: "",
      AWS_REGION: "us-east-2",
      BAKE_AMI_ID: run.one("aws:ec2/instance:Instance").inputs.ami,
      BAKE_INSTANCE_TYPE: "c7g.large",
      BAKE_VOLUME_GIB: String(defaultAmiVolumeGiB(sampleManifest().virtualSize)),
      BAKE_SECURITY_GROUP_ID: "bake-egress-id",
      BAKE_INSTANCE_PROFILE: "bake-profile",
      BAKE_STATUS_URI: `${ARTIFACT_URI}bake-status/${SHA.slice(0, 16)}-${digest.slice(0, 8)}.json`,
    });
    expect(i.environment.BAKE_AMI_ID).to.equal("ami-0a1b2c3d4e5f60718");
    // A 64 GiB image: the OS and headroom on top.
    expect(i.environment.BAKE_VOLUME_GIB).to.equal("79");
    expect(Object.keys(i.environment).filter((k) => k.startsWith("HOST_EXEC"))).to.deep.equal([]);
    // The user data: gzip'd cloud-config, as base64 on stdin, with the manifest and no secret.
    const userData = zlib.gunzipSync(Buffer.from(String(unwrap(i.stdin)), "base64")).toString("utf8");
    expect(userData.startsWith("#cloud-config\n")).to.equal(true);
    expect(userData).to.contain(SHA).and.contain(i.environment.BAKE_STATUS_URI);
    for (const s of [
      MOCK_PASSWORD,
      MOCK_KEYS.pipeline.privateMaterial,
      MOCK_KEYS.guest.privateMaterial,
      ANSWER_FILE_MARK,
    ])
      expect(userData).to.not.contain(s);
    for (const dep of [
      get("publish"),
      run.one("aws:iam/rolePolicy:RolePolicy", "bake-artifacts"),
      run.one("aws:iam/instanceProfile:InstanceProfile", "bake-profile"),
    ])
      expect(bake.options.dependencies, dep.name).to.include(dep.urn);
  });

  it("the bake takes amiVolumeGiB, bakeInstanceType and an explicit host AMI when given", async () => {
    const r = await runProgram({
      ...BASE_CONFIG,
      amiVolumeGiB: "100",
      bakeInstanceType: "m7g.xlarge",
      hostAmiId: "ami-0123456789abcdef0",
    });
    expect(inputs(r.one("command:local:Command", "bake-instance")).environment).to.include({
      BAKE_VOLUME_GIB: "100",
      BAKE_INSTANCE_TYPE: "m7g.xlarge",
      BAKE_AMI_ID: "ami-0123456789abcdef0",
    });
    expect(r.outputs.bakeInstanceType).to.equal("m7g.xlarge");
  });

  it("takes the AMI from the stopped bake instance, named with the image SHA-256 and the bake digest, retained", () => {
    const ami = get("bakeAmi");
    const i = inputs(ami);
    const digest = p.stage("bakeImage").digest;
    expect(i.name).to.equal(`windows-arm64-11-23h2-test-20261126-${SHA.slice(0, 16)}-${digest.slice(0, 8)}`);
    expect(i.sourceInstanceId).to.equal(MOCK_BAKE_INSTANCE_ID);
    // The build host is never the AMI's source.
    expect(i.sourceInstanceId).to.not.equal(HOST_ID);
    expect(i.snapshotWithoutReboot).to.equal(true);
    expect(ami.options.retainOnDelete).to.equal(true);
    expect(ami.options.dependencies).to.include(get("bakeImage").urn);
    expect(minutes(ami.options.customTimeouts.create)).to.be.at.least(p.stage("bakeAmi").timeoutMinutes);
    expect(i.tags).to.include({ WindowsVersion: "11-23h2", ImageSha256: SHA, Stack: "test", Name: i.name });
    expect(i.tags.ImageUri).to.equal(`${ARTIFACT_URI}${SHA}/disk.qcow2`);
    expect(i.tags.SourceImage).to.equal("s3://media-bucket/images/win11-23h2.vhdx");
    // Then the bake instance goes.
    const term = run.one("command:local:Command", "bake-terminate");
    expect(inputs(term).create).to.equal(
      awsCommand(`exec bash provisioning/bake-instance.sh terminate ${MOCK_BAKE_INSTANCE_ID}`),
    );
    expect(inputs(term).triggers).to.deep.equal([MOCK_BAKE_INSTANCE_ID]);
    expect(term.options.dependencies).to.include(ami.urn);
    expect(term.seq).to.be.greaterThan(ami.seq);
  });

  it("retainAmiOnDelete: false lets the AMI go with the stack", async () => {
    const r = await runProgram({ ...BASE_CONFIG, retainAmiOnDelete: "false" });
    expect(r.one("aws:ec2/amiFromInstance:AmiFromInstance").options.retainOnDelete).to.equal(false);
  });

  it("exports the outputs consumers read", () => {
    expect(run.outputs).to.include({
      amiId: "ami-0123456789abcdef0",
      imageSha256: SHA,
      windowsVersion: "11-23h2",
      hostInstanceType: "a1.metal",
      hostInstanceId: HOST_ID,
      bakeInstanceType: "c7g.large",
      pipelinePublicKeyOpenssh: PIPELINE_PUBLIC,
    });
    expect(run.outputs.imageUri).to.equal(`${ARTIFACT_URI}${SHA}/disk.qcow2`);
    expect(run.outputs.manifestUri).to.equal(`${ARTIFACT_URI}${SHA}/manifest.json`);
    expect(run.outputs.amiName).to.match(/c{16}-[0-9a-f]{8}$/);
    expect(run.outputs.amiArn).to.equal("arn:aws:ec2:us-east-2::image/ami-0123456789abcdef0");
    expect(run.outputs.amiRegion).to.equal("us-east-2");
  });

  it("the local target declares no AWS resource and runs the same stages locally, bounded by stage.sh", () => {
    expect(local.resources.filter((x) => x.type.startsWith("aws:")).map((x) => x.name)).to.deep.equal([]);
    expect(lp.stages.map((s) => s.id)).to.deep.equal(
      p.stages.filter((s) => s.site === "host" && !["waitHost", "idleGuard"].includes(s.id)).map((s) => s.id),
    );
    const localValues: Partial<RuntimeValues> = {
      hostId: "local",
      artifactUri: "file:///tmp/w%25i,x/artifacts/",
      guestKey: GUEST_PUBLIC,
      answerFile: sha256Hex(String(unwrap(inputs(res(local, "configMedia")).stdin))),
    };
    for (const s of hostStages(lp)) {
      const i = inputs(res(local, s.id));
      expect(unwrap(i.create), s.id).to.equal(resolveCommand(s.hostCommand as string, localValues));
      expect(String(unwrap(i.create)), s.id).to.match(
        /^env STAGE_RUN_DIR=\S+ STAGE_STATE_DIR=\S+ bash \/tmp\/w%i,x\/provisioning\/stage\.sh /,
      );
      expect(i.environment, s.id).to.equal(undefined);
      const t = i.triggers as unknown[];
      expect(t[0], s.id).to.equal(s.digest);
      expect(t, s.id).to.have.length(1 + s.runtime.length);
      s.runtime.forEach((n, k) => {
        const v = localValues[n];
        // answerFile and guestSettings are hashes of secrets.
        if (v === undefined) expect(t[1 + k], `${s.id} ${n}`).to.match(/^[0-9a-f]{64}$/);
        else expect(t[1 + k], `${s.id} ${n}`).to.equal(v);
      });
      expect(t, s.id).to.include("local");
    }
    for (const c of local.ofType("command:local:Command"))
      expect(String(unwrap(inputs(c).create)), c.name).to.not.match(/host-exec\.sh|host-power\.sh|bake-instance\.sh/);
    const up = bashWordsOf(String(inputs(res(local, "uploadFiles")).create).split(" && "));
    expect(up.map((w) => w.at(-1))).to.deep.equal(lp.stage("uploadFiles").files.map((f) => `${LOCAL_DIR}/${f}`));
    for (const w of up) expect(w.slice(0, 4)).to.deep.equal(["install", "-D", "-m", "0644"]);
    expect(local.outputs.amiId).to.equal(undefined);
    expect(local.outputs.imageSha256).to.equal(SHA);
  });

  it("the local target publishes to a percent-encoded folder URI under localWorkDir by default", () => {
    const pub = String(unwrap(inputs(res(local, "publish")).create));
    expect(pub).to.contain("'file:///tmp/w%25i,x/artifacts/'");
    expect(pub).to.match(/ bash \/tmp\/w%i,x\/provisioning\/stage\.sh publish 7200 /);
    expect(bashWords(pub).at(-1)).to.contain("publish-image.sh /tmp/w%i,x/vm 'file:///tmp/w%25i,x/artifacts/'");
    expect(local.outputs.imageUri).to.equal(`file:///tmp/w%25i,x/artifacts/${SHA}/disk.qcow2`);
  });
});
