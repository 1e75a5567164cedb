import { expect } from "chai";
import { spawn, ChildProcess } from "child_process";
import * as fs from "fs";
import * as http from "http";
import * as net from "net";
import * as os from "os";
import * as path from "path";
import { repoRoot, run, runScript, RunResult } from "../support/run";

// A fixed, fake clock: 2027-01-15 08:00:00 UTC.
const NOW = 1_800_000_000;
const MIN = 60;
const HOST_ID = "i-0123456789abcdef0";
const SERVICE = "windows-arm64-image-idle.service";
const TIMER = "windows-arm64-image-idle.timer";

/** An IMDSv2 stand-in answering `instance-id` with whatever `id()` returns. */
async function imdsStandIn(id: () => string): Promise<{ url: string; close: () => Promise<void> }> {
  const server = http.createServer((req, res) => {
    if (req.method === "PUT" && req.url === "/latest/api/token") {
      res.end("tok-idle");
    } else if (req.url === "/latest/meta-data/instance-id" && req.headers["x-aws-ec2-metadata-token"] === "tok-idle") {
      res.end(id());
    } else {
      res.statusCode = 401;
      res.end();
    }
  });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  return {
    url: `http://127.0.0.1:${(server.address() as net.AddressInfo).port}`,
    close: () => new Promise<void>((r) => server.close(() => r())),
  };
}

/** The pid of a process that has already exited. */
async function deadPid(): Promise<number> {
  const p = spawn("true", [], { stdio: "ignore" });
  await new Promise((r) => p.once("exit", r));
  return p.pid as number;
}

describe("idle-guard.sh (powers the build host off when no stage has run for hostIdleMinutes)", () => {
  let dir: string;
  let runDir: string;
  let stateDir: string;
  let ownDir: string;
  let envFile: string;
  let whoFile: string;
  let poweroffLog: string;
  const children: ChildProcess[] = [];

  beforeEach(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), "idle-guard-"));
    runDir = path.join(dir, "run", "stages");
    stateDir = path.join(dir, "state");
    ownDir = path.join(dir, "own");
    envFile = path.join(dir, "idle.env");
    whoFile = path.join(dir, "who.txt");
    poweroffLog = path.join(dir, "poweroff.log");
    fs.mkdirSync(runDir, { recursive: true });
    fs.mkdirSync(stateDir);
    fs.writeFileSync(envFile, "IDLE_MINUTES=45\nIDLE_ENABLED=1\n");
    fs.writeFileSync(whoFile, "");
    // Stands in for `systemctl poweroff`: records each call.
    fs.writeFileSync(path.join(dir, "poweroff.sh"), `echo poweroff >> '${poweroffLog}'\n`);
  });
  afterEach(() => {
    for (const c of children.splice(0)) c.kill("SIGKILL");
    fs.rmSync(dir, { recursive: true, force: true });
  });

  const guard = (opts: { now?: number; uptime?: number; env?: NodeJS.ProcessEnv; args?: string[] } = {}) =>
    runScript("idle-guard.sh", opts.args ?? [], {
      env: {
        STAGE_RUN_DIR: runDir,
        STAGE_STATE_DIR: stateDir,
        IDLE_STATE_DIR: ownDir,
        IDLE_ENV_FILE: envFile,
        IDLE_NOW_S: String(opts.now ?? NOW),
        IDLE_UPTIME_S: String(opts.uptime ?? 3 * 3600),
        IDLE_WHO_COMMAND: `cat '${whoFile}'`,
        IDLE_POWEROFF_COMMAND: `bash '${path.join(dir, "poweroff.sh")}'`,
        ...opts.env,
      },
      timeoutMs: 60000,
    });
  const powerOffs = () =>
    fs.existsSync(poweroffLog) ? fs.readFileSync(poweroffLog, "utf8").trim().split("\n").length : 0;
  /** last-activity as the stage wrapper leaves it, AGO seconds before NOW. */
  const activity = (agoS: number, stage = "fetchImage") => {
    const f = path.join(stateDir, "last-activity");
    fs.writeFileSync(f, `${stage}\n`);
    fs.utimesSync(f, NOW - agoS, NOW - agoS);
  };
  /** A live process standing in for a stage wrapper. */
  const wrapper = () => {
    const c = spawn("sleep", ["300"], { stdio: "ignore" });
    children.push(c);
    return c.pid as number;
  };
  const ok = (r: RunResult) => expect(r.code, r.stderr).to.equal(0);

  it("powers off once no stage has run for IDLE_MINUTES, naming the last stage and its time", async () => {
    activity(50 * MIN);
    const r = await guard();
    ok(r);
    expect(powerOffs()).to.equal(1);
    expect(r.stderr).to.include(
      "idle-guard: no stage for 50 min (last: stage fetchImage at 2027-01-15 07:10:00 UTC; limit 45 min): powering off",
    );
  });

  it("does nothing below the threshold, and counts from the boot when no stage ran", async () => {
    activity(44 * MIN);
    const r = await guard();
    ok(r);
    expect(r.stderr).to.include("idle for 44 min (last: stage fetchImage at 2027-01-15 07:16:00 UTC)");
    expect(powerOffs()).to.equal(0);

    fs.rmSync(path.join(stateDir, "last-activity"));
    const young = await guard({ uptime: 44 * MIN });
    ok(young);
    expect(young.stderr).to.include("last: boot at 2027-01-15 07:16:00 UTC");
    expect(powerOffs()).to.equal(0);
    // A host booted long ago with no stage since (none ever started, or the
    // run failed before its first stage).
    ok(await guard({ uptime: 46 * MIN }));
    expect(powerOffs()).to.equal(1);
  });

  it("a live stage marker keeps the host up; once its wrapper is killed, idle time starts when it was last seen", async () => {
    activity(3 * 3600, "startVm");
    const child = spawn("sleep", ["300"], { stdio: "ignore" });
    children.push(child);
    const marker = path.join(runDir, `waitGuest.${child.pid}`);
    fs.writeFileSync(marker, `${child.pid}\n`);
    const busy = await guard();
    ok(busy);
    expect(busy.stderr).to.include(`busy: stage waitGuest (pid ${child.pid})`);
    expect(powerOffs()).to.equal(0);
    expect(fs.existsSync(marker)).to.equal(true);

    // The wrapper is killed: its marker stays behind, stale.
    child.kill("SIGKILL");
    await new Promise((r) => child.once("exit", r));
    const later = await guard({ now: NOW + 10 * MIN });
    ok(later);
    expect(later.stderr).to.include(`removed stale marker waitGuest.${child.pid}`);
    expect(fs.existsSync(marker)).to.equal(false);
    expect(later.stderr).to.include(
      `idle for 10 min (last: stage waitGuest (pid ${child.pid}) at 2027-01-15 08:00:00 UTC)`,
    );
    expect(powerOffs()).to.equal(0);

    const r = await guard({ now: NOW + 46 * MIN });
    ok(r);
    expect(r.stderr).to.include(
      `no stage for 46 min (last: stage waitGuest (pid ${child.pid}) at 2027-01-15 08:00:00 UTC`,
    );
    expect(powerOffs()).to.equal(1);
  });

  it("removes a stale marker (dead pid) and does not count it", async () => {
    activity(50 * MIN);
    const pid = await deadPid();
    const marker = path.join(runDir, `publish.${pid}`);
    fs.writeFileSync(marker, `${pid}\n`);
    const r = await guard();
    ok(r);
    expect(r.stderr).to.include(`removed stale marker publish.${pid} (pid ${pid} is gone`);
    expect(fs.existsSync(marker)).to.equal(false);
    expect(powerOffs()).to.equal(1);
  });

  it("a marker whose pid is not written yet counts by the pid in its name", async () => {
    activity(50 * MIN);
    const pid = wrapper();
    fs.writeFileSync(path.join(runDir, `stopVm.${pid}`), "");
    const r = await guard();
    ok(r);
    expect(r.stderr).to.include(`busy: stage stopVm (pid ${pid})`);
    expect(powerOffs()).to.equal(0);
  });

  it("an interactive login keeps the host up, and idle time starts when it ends", async () => {
    activity(3 * 3600);
    fs.writeFileSync(whoFile, "alice    pts/0        2027-01-15 07:30 (203.0.113.7)\n");
    const r = await guard();
    ok(r);
    expect(r.stderr).to.include("busy: login alice on pts/0");
    expect(powerOffs()).to.equal(0);

    fs.writeFileSync(whoFile, "");
    const after = await guard({ now: NOW + 30 * MIN });
    ok(after);
    expect(after.stderr).to.include("idle for 30 min (last: login alice on pts/0 at 2027-01-15 08:00:00 UTC)");
    expect(powerOffs()).to.equal(0);
    ok(await guard({ now: NOW + 45 * MIN }));
    expect(powerOffs()).to.equal(1);
  });

  it("never powers off with IDLE_ENABLED=0 (keepHostRunning)", async () => {
    activity(10 * 3600);
    fs.writeFileSync(envFile, "IDLE_MINUTES=45\nIDLE_ENABLED=0\n");
    const r = await guard();
    ok(r);
    expect(r.stderr).to.include("disabled (IDLE_ENABLED=0");
    expect(powerOffs()).to.equal(0);
  });

  it("does not power off when it cannot tell, and says why (exit 1)", async () => {
    activity(10 * 3600);
    const cases: Array<[string, () => void, NodeJS.ProcessEnv, string]> = [
      ["who fails", () => undefined, { IDLE_WHO_COMMAND: "exit 3" }, "(IDLE_WHO_COMMAND) failed"],
      [
        "run dir not a directory",
        () => {
          fs.rmSync(runDir, { recursive: true });
          fs.writeFileSync(runDir, "");
        },
        {},
        "(STAGE_RUN_DIR) is not a readable directory",
      ],
      ["no env file", () => fs.rmSync(envFile), {}, "idle.env is missing"],
      [
        "bad minutes",
        () => fs.writeFileSync(envFile, "IDLE_MINUTES=soon\nIDLE_ENABLED=1\n"),
        {},
        "IDLE_MINUTES='soon'",
      ],
      ["bad switch", () => fs.writeFileSync(envFile, "IDLE_MINUTES=45\nIDLE_ENABLED=yes\n"), {}, "IDLE_ENABLED='yes'"],
    ];
    for (const [what, prepare, env, message] of cases) {
      prepare();
      const r = await guard({ env });
      expect(r.code, `${what}: ${r.stderr}`).to.equal(1);
      expect(r.stderr, what).to.include("cannot tell whether the host is idle").and.include(message);
      expect(r.stderr, what).to.include("not powering off");
      expect(powerOffs(), what).to.equal(0);
    }
  });

  it("acts only on the build host named by IDLE_HOST_ID, read through IMDSv2", async () => {
    activity(50 * MIN);
    fs.writeFileSync(envFile, `IDLE_MINUTES=45\nIDLE_ENABLED=1\nIDLE_HOST_ID=${HOST_ID}\n`);
    let here = "i-0fedcba9876543210";
    const imds = await imdsStandIn(() => here);
    try {
      // An instance launched from the AMI carries the same files: left alone.
      const other = await guard({ env: { IDLE_IMDS_URL: imds.url } });
      ok(other);
      expect(other.stderr).to.include(`this instance (i-0fedcba9876543210) is not the build host (${HOST_ID}`);
      expect(powerOffs()).to.equal(0);
      // Metadata unreachable: cannot tell.
      const dark = await guard({ env: { IDLE_IMDS_URL: "http://127.0.0.1:9" } });
      expect(dark.code).to.equal(1);
      expect(dark.stderr).to.include("this instance's id could not be read");
      expect(powerOffs()).to.equal(0);
      here = HOST_ID;
      ok(await guard({ env: { IDLE_IMDS_URL: imds.url } }));
      expect(powerOffs()).to.equal(1);
    } finally {
      await imds.close();
    }
  });

  it("--status says what it would do, and changes nothing", async () => {
    activity(50 * MIN);
    const pid = await deadPid();
    const marker = path.join(runDir, `publish.${pid}`);
    fs.writeFileSync(marker, `${pid}\n`);
    const r = await guard({ args: ["--status"] });
    ok(r);
    expect(r.stdout).to.include("no stage for 50 min").and.include("would power off");
    expect(powerOffs()).to.equal(0);
    expect(fs.existsSync(marker)).to.equal(true);
    expect(fs.existsSync(ownDir)).to.equal(false);
    expect((await guard({ args: ["--now"] })).code).to.equal(2);
  });
});

describe("idle-guard-install.sh and the idle units", () => {
  let root: string;
  beforeEach(() => (root = fs.mkdtempSync(path.join(os.tmpdir(), "idle-install-"))));
  afterEach(() => fs.rmSync(root, { recursive: true, force: true }));

  const install = (arg: string[], env: NodeJS.ProcessEnv = {}) =>
    runScript("idle-guard-install.sh", arg, {
      env: { IDLE_INSTALL_ROOT: root, IDLE_INSTANCE_ID: HOST_ID, IDLE_NOW_S: String(NOW), ...env },
    });
  const envFile = () => path.join(root, "etc", "windows-arm64-image", "idle.env");
  const wants = () => path.join(root, "etc", "systemd", "system", "timers.target.wants", TIMER);
  const envLines = () =>
    fs
      .readFileSync(envFile(), "utf8")
      .split("\n")
      .filter((l) => /^[A-Z]/.test(l));
  const guardOn = (uptimeS: number) =>
    runScript("idle-guard.sh", [], {
      env: {
        IDLE_ENV_FILE: envFile(),
        IDLE_INSTANCE_ID: HOST_ID,
        STAGE_RUN_DIR: path.join(root, "run", "stages"),
        STAGE_STATE_DIR: path.join(root, "state"),
        IDLE_STATE_DIR: path.join(root, "var", "lib", "windows-arm64-image-idle"),
        IDLE_NOW_S: String(NOW + MIN),
        IDLE_UPTIME_S: String(uptimeS),
        IDLE_WHO_COMMAND: "true",
        IDLE_POWEROFF_COMMAND: `touch '${path.join(root, "powered-off")}'`,
      },
    });

  it("writes the env and the units under the root and enables the timer; a rerun changes nothing; off disables it", async () => {
    const r = await install(["45"]);
    expect(r.code, r.stderr).to.equal(0);
    expect(envLines()).to.deep.equal(["IDLE_MINUTES=45", "IDLE_ENABLED=1", `IDLE_HOST_ID=${HOST_ID}`]);
    for (const unit of [SERVICE, TIMER]) {
      const installed = path.join(root, "etc", "systemd", "system", unit);
      expect(fs.readFileSync(installed, "utf8")).to.equal(fs.readFileSync(path.join(repoRoot, "assets", unit), "utf8"));
      expect(fs.statSync(installed).mode & 0o777).to.equal(0o644);
    }
    expect(fs.readlinkSync(wants())).to.equal(`/etc/systemd/system/${TIMER}`);
    expect(r.stdout).to.include("wrote /etc/windows-arm64-image/idle.env");
    expect(r.stdout).to.include("could not be started");

    const again = await install(["45"]);
    expect(again.code, again.stderr).to.equal(0);
    expect(again.stdout).to.not.include("wrote");
    expect(again.stdout.match(/is up to date/g)).to.have.length(3);

    // Installed on a host that has been up for hours: idle time counts from
    // the installation, not from the boot.
    const fresh = await guardOn(5 * 3600);
    expect(fresh.code, fresh.stderr).to.equal(0);
    expect(fresh.stderr).to.include("idle for 1 min (last: idle-guard-install at 2027-01-15 08:00:00 UTC)");
    expect(fs.existsSync(path.join(root, "powered-off"))).to.equal(false);

    const changed = await install(["30"]);
    expect(changed.code, changed.stderr).to.equal(0);
    expect(changed.stdout).to.include("wrote /etc/windows-arm64-image/idle.env");
    expect(changed.stdout).to.include(`/etc/systemd/system/${SERVICE} is up to date`);
    expect(envLines()[0]).to.equal("IDLE_MINUTES=30");

    const off = await install(["off"]);
    expect(off.code, off.stderr).to.equal(0);
    expect(envLines()).to.deep.equal(["IDLE_MINUTES=30", "IDLE_ENABLED=0"]);
    expect(fs.lstatSync(wants(), { throwIfNoEntry: false })).to.equal(undefined);
    expect(off.stdout).to.include("disabled");
    const disabled = await guardOn(10 * 3600);
    expect(disabled.code, disabled.stderr).to.equal(0);
    expect(disabled.stderr).to.include("disabled (IDLE_ENABLED=0");
    expect(fs.existsSync(path.join(root, "powered-off"))).to.equal(false);
    expect((await install(["off"])).stdout).to.not.include("wrote");
  });

  it("refuses a bad MINUTES naming hostIdleMinutes and the range, writing nothing", async () => {
    for (const bad of ["5", "9", "1441", "abc", "", "45.5", "-45"]) {
      const r = await install([bad]);
      expect(r.code, bad).to.equal(2);
      expect(r.stderr, bad).to.include("hostIdleMinutes").and.include("from 10 to 1440");
      expect(r.stderr, bad).to.include("Fix:");
    }
    expect((await install([])).code).to.equal(2);
    expect(fs.readdirSync(root)).to.deep.equal([]);
    // The bounds themselves are accepted.
    expect((await install(["10"])).code).to.equal(0);
    expect((await install(["1440"])).code).to.equal(0);
  });

  it("records the instance id from IMDSv2, and refuses to install where there is none", async () => {
    const imds = await imdsStandIn(() => HOST_ID);
    try {
      const r = await install(["45"], { IDLE_INSTANCE_ID: "", IDLE_IMDS_URL: imds.url });
      expect(r.code, r.stderr).to.equal(0);
      expect(envLines()).to.include(`IDLE_HOST_ID=${HOST_ID}`);
    } finally {
      await imds.close();
    }
    fs.rmSync(path.join(root, "etc"), { recursive: true });
    const none = await install(["45"], { IDLE_INSTANCE_ID: "", IDLE_IMDS_URL: "http://127.0.0.1:9" });
    expect(none.code).to.equal(1);
    expect(none.stderr).to.include("EC2 instance id could not be read");
    expect(fs.existsSync(envFile())).to.equal(false);
  });

  it("the units pass systemd-analyze verify and hold the keys the guard relies on", async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), "idle-units-"));
    try {
      for (const unit of [SERVICE, TIMER]) fs.copyFileSync(path.join(repoRoot, "assets", unit), path.join(dir, unit));
      const r = await run("systemd-analyze", ["verify", path.join(dir, SERVICE), path.join(dir, TIMER)]);
      expect(r.code, r.stderr).to.equal(0);
      expect(r.stderr).to.not.include("windows-arm64-image-idle");
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
    const keys = (unit: string) =>
      fs
        .readFileSync(path.join(repoRoot, "assets", unit), "utf8")
        .split("\n")
        .filter((l) => /^[A-Za-z]+=/.test(l));
    expect(keys(SERVICE)).to.include.members([
      "Type=oneshot",
      "ExecStart=/bin/bash /opt/windows-arm64-image/provisioning/idle-guard.sh",
      "StateDirectory=windows-arm64-image-idle",
    ]);
    expect(keys(TIMER)).to.include.members([
      "OnBootSec=5min",
      "OnUnitActiveSec=1min",
      "Persistent=true",
      `Unit=${SERVICE}`,
      "WantedBy=timers.target",
    ]);
  });
});
