import { expect } from "chai";
import * as fs from "fs";
import * as net from "net";
import * as os from "os";
import * as path from "path";
import { run, RunResult, runScript } from "../support/run";

/**
 * host-power.sh against a stand-in `aws` (EC2 state kept in a file; pending
 * turns running and stopping turns stopped once read) and a local SSH banner.
 */
describe("host-power.sh (start/stop the EC2 host from the operator's machine)", function () {
  this.timeout(60000);
  const ID = "i-0123456789abcdef0";
  let dir: string;
  let bin: string;
  let server: net.Server;
  let port: number;

  before(async () => {
    server = net.createServer((s) => s.end("SSH-2.0-test\r\n"));
    await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
    port = (server.address() as net.AddressInfo).port;
  });
  after(() => server.close());

  beforeEach(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), "host-power-"));
    bin = path.join(dir, "bin");
    fs.mkdirSync(bin);
    fs.writeFileSync(
      path.join(bin, "aws"),
      [
        "#!/usr/bin/env bash",
        'd=$FAKE_AWS_DIR; echo "$*" >>"$d/calls"',
        '[[ -z ${FAKE_AWS_FAIL:-} ]] || { echo "$FAKE_AWS_FAIL" >&2; exit 255; }',
        's=$(cat "$d/state")',
        'case "$1 $2" in',
        '  "ec2 describe-instances") echo "$s"',
        '    case $s in pending) echo running >"$d/state" ;; stopping) echo stopped >"$d/state" ;; esac ;;',
        '  "ec2 start-instances") echo pending >"$d/state" ;;',
        '  "ec2 stop-instances") echo stopping >"$d/state" ;;',
        '  *) echo "unexpected: $*" >&2; exit 1 ;;',
        "esac",
      ].join("\n") + "\n",
      { mode: 0o755 },
    );
  });
  afterEach(() => fs.rmSync(dir, { recursive: true, force: true }));

  function power(args: string[], state: string, env: NodeJS.ProcessEnv = {}): Promise<RunResult> {
    fs.writeFileSync(path.join(dir, "state"), `${state}\n`);
    return runScript("host-power.sh", args, {
      env: {
        PATH: `${bin}:${process.env.PATH}`,
        FAKE_AWS_DIR: dir,
        HOST_POWER_POLL_S: "1",
        HOST_POWER_SSH_PORT: String(port),
        ...env,
      },
      timeoutMs: 50000,
    });
  }
  const calls = () =>
    fs.existsSync(path.join(dir, "calls")) ? fs.readFileSync(path.join(dir, "calls"), "utf8").trim().split("\n") : [];
  const ended = () => fs.readFileSync(path.join(dir, "state"), "utf8").trim();

  it("start: a stopped host is started, then SSH is awaited", async () => {
    const r = await power(["start", ID, "127.0.0.1", "20"], "stopped");
    expect(r.code, r.stderr).to.equal(0);
    expect(r.stdout).to.equal("SSH-2.0-test\n");
    expect(r.stderr).to.include(`starting ${ID} (it was stopped after the last build)`);
    expect(calls().filter((c) => c.startsWith("ec2 start-instances"))).to.deep.equal([
      `ec2 start-instances --instance-ids ${ID}`,
    ]);
    expect(ended()).to.equal("running");
  });

  it("start: a running host is only awaited; a stopping one is started once it has stopped", async () => {
    const r1 = await power(["start", ID, "127.0.0.1", "20"], "running");
    expect(r1.code, r1.stderr).to.equal(0);
    expect(calls().some((c) => c.includes("start-instances"))).to.equal(false);
    fs.rmSync(path.join(dir, "calls"));
    const r2 = await power(["start", ID, "127.0.0.1", "20"], "stopping");
    expect(r2.code, r2.stderr).to.equal(0);
    expect(calls().filter((c) => c.includes("start-instances"))).to.have.length(1);
    expect(ended()).to.equal("running");
  });

  it("start: a terminated host, or EC2 refusing, fails naming the cause", async () => {
    const gone = await power(["start", ID, "127.0.0.1", "20"], "terminated");
    expect(gone.code).to.equal(1);
    expect(gone.stderr).to.include(`${ID} is terminated: the host is gone`);
    const denied = await power(["start", ID, "127.0.0.1", "20"], "stopped", {
      HOST_POWER_REQUIRE_CLI: "1",
      FAKE_AWS_FAIL: "An error occurred (UnauthorizedOperation) when calling the DescribeInstances operation",
    });
    expect(denied.code).to.equal(1);
    expect(denied.stderr).to.include(`the AWS CLI cannot read ${ID}: An error occurred (UnauthorizedOperation)`);
  });

  it("start without the AWS CLI only waits for SSH and says how to start the host", async () => {
    // A PATH with the usual tools and no `aws`.
    const noAws = path.join(dir, "no-aws");
    fs.mkdirSync(noAws);
    for (const tool of [
      "bash",
      "timeout",
      "sleep",
      "cat",
      "tail",
      "head",
      "sed",
      "grep",
      "tr",
      "cut",
      "date",
      "dirname",
    ]) {
      const found = (await run("bash", ["-c", `command -v ${tool}`])).stdout.trim();
      if (found) fs.symlinkSync(found, path.join(noAws, tool));
    }
    const r = await power(["start", ID, "127.0.0.1", "20"], "stopped", { PATH: noAws });
    expect(r.code, r.stderr).to.equal(0);
    expect(r.stdout).to.equal("SSH-2.0-test\n");
    expect(r.stderr).to.include(`aws ec2 start-instances --instance-ids ${ID}`);
    expect(calls()).to.deep.equal([]);
  });

  it("start with HOST_POWER_REQUIRE_CLI=1 fails at once when the AWS CLI cannot read the host", async () => {
    const r = await power(["start", ID, "127.0.0.1", "20"], "running", {
      HOST_POWER_REQUIRE_CLI: "1",
      FAKE_AWS_FAIL: "Unable to locate credentials. You can configure credentials by running aws configure.",
    });
    expect(r.code).to.equal(1);
    expect(r.stdout).to.equal("");
    expect(r.stderr).to.include(`the AWS CLI cannot read ${ID}: Unable to locate credentials`);
    expect(r.stderr).to.include("set keepHostRunning: true");
    // Without the requirement, the same host is only awaited.
    const soft = await power(["start", ID, "127.0.0.1", "20"], "running", {
      FAKE_AWS_FAIL: "Unable to locate credentials.",
    });
    expect(soft.code, soft.stderr).to.equal(0);
    expect(soft.stderr).to.include("warning: the AWS CLI cannot read");
  });

  it("stop: stops a running host and waits for it; a stopped host is left alone", async () => {
    const r = await power(["stop", ID], "running");
    expect(r.code, r.stderr).to.equal(0);
    expect(r.stderr).to.include(`${ID} is stopped`);
    expect(calls().filter((c) => c.includes("stop-instances"))).to.have.length(1);
    expect(ended()).to.equal("stopped");
    fs.rmSync(path.join(dir, "calls"));
    const again = await power(["stop", ID], "stopped");
    expect(again.code, again.stderr).to.equal(0);
    expect(again.stderr).to.include("already stopped");
    expect(calls().some((c) => c.includes("stop-instances"))).to.equal(false);
  });

  it("rejects bad arguments", async () => {
    const r = await run("bash", [path.join(__dirname, "..", "..", "provisioning", "host-power.sh"), "stop", "web-1"]);
    expect(r.code).to.equal(2);
    expect(r.stderr).to.include("INSTANCE_ID='web-1' is not an EC2 instance id");
    const r2 = await power(["reboot", ID], "running");
    expect(r2.code).to.equal(2);
  });
});
