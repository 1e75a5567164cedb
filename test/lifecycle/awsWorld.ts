/**
 * The aws plan's world for the lifecycle test: the same program and
 * commands, with stand-ins only where AWS itself would be.
 * - EC2: test/lifecycle/aws/aws (state files): the build host is an sshd on
 *   127.0.0.1 in its own mount namespace whose AWS-layout folders are bind
 *   mounts of a folder here (its EBS volume); a stop kills every process in
 *   it (the VM too); a bake instance runs the user data's bake-image.sh on a
 *   folder as its root file system.
 * - S3: a local S3 server (s3rver) holding the source image, the drivers ISO
 *   and the artifact bucket.
 * - The host has no KVM: its sessions set VM_ACCEL=tcg (run-vm.sh lets the
 *   environment override the env file) and HOST_READY_NEED_KVM=0.
 * The mount points (/opt/windows-arm64-image, /var/lib/windows-vm,
 * /run/windows-arm64-image, /var/lib/windows-arm64-image) are created empty on
 * this machine; nothing is written into them outside the namespace.
 */
import * as fs from "fs";
import * as path from "path";
import { ensureStandinGuest, StandinGuest } from "../fixtures/standin";
import { makeDriversIso } from "../e2e/support";
import { sha256File } from "../support/disk";
import { S3Http, startS3, S3Server } from "../support/s3";
import { freePort, repoRoot, run, runOk } from "../support/run";
import { Engine, generateKey } from "./engine";

export const HOST_ID = "i-0123456789abcdef0";
const STANDIN = path.join(__dirname, "aws");

export interface AwsWorld {
  dir: string;
  root: string;
  guest: StandinGuest;
  engine: Engine;
  s3: S3Server;
  /** The host's folders (its disk), by AWS path. */
  hostPath(p: string): string;
  config(extra?: Record<string, string>): Record<string, string>;
  /** A Windows image stand-in in the media bucket (variant 0: the guest's disk). */
  image(variant: number): Promise<{ url: string; sha256: string }>;
  /** EC2's state of an instance. */
  state(id?: string): string;
  /** The stand-in AWS CLI calls so far. */
  calls(): string[];
  /** Runs the stand-in aws CLI (as a person would). */
  aws(args: string[]): Promise<string>;
  /** Runs a command on the host as root (over its sshd), with extra environment. */
  onHost(command: string, env?: Record<string, string>): Promise<{ code: number | null; out: string }>;
  /** Arms a fault the host's shims inject once (FAULTS in world.ts). */
  arm(fault: string): void;
  stop(): Promise<void>;
}

export async function makeAwsWorld(dir: string, shims: string, faults: string): Promise<AwsWorld> {
  fs.mkdirSync(dir, { recursive: true });
  const root = path.join(dir, "repo");
  fs.rmSync(root, { recursive: true, force: true });
  fs.mkdirSync(root);
  for (const f of ["infra", "provisioning", "assets", "Pulumi.yaml", "package.json", "tsconfig.json"])
    fs.cpSync(path.join(repoRoot, f), path.join(root, f), { recursive: true });
  fs.symlinkSync(path.join(repoRoot, "node_modules"), path.join(root, "node_modules"));

  const guest = await ensureStandinGuest();
  const drivers = await makeDriversIso(dir);
  const s3 = await startS3("artifacts-bucket");
  const media = new S3Http(s3.endpoint, "media");
  await media.createBucket();
  const put = (file: string, key: string) => media.put(key, fs.readFileSync(file));
  await put(guest.disk, "standin.qcow2");
  await put(drivers.iso, "virtio-win.iso");

  const ec2 = path.join(dir, "ec2");
  fs.rmSync(ec2, { recursive: true, force: true });
  fs.mkdirSync(path.join(ec2, "instances", HOST_ID), { recursive: true });
  fs.writeFileSync(path.join(ec2, "calls"), "");
  const disk = path.join(dir, "host-disk");
  fs.rmSync(disk, { recursive: true, force: true });
  fs.mkdirSync(disk);

  // The host's sshd: root with the pipeline's key; the sessions' environment is the host's.
  const pipelineKey = generateKey(dir, "pipeline");
  const sshd = path.join(dir, "sshd");
  fs.rmSync(sshd, { recursive: true, force: true });
  fs.mkdirSync(sshd, { mode: 0o700 });
  await runOk("ssh-keygen", ["-q", "-t", "ed25519", "-N", "", "-f", path.join(sshd, "host_key")]);
  fs.writeFileSync(path.join(sshd, "authorized_keys"), pipelineKey.publicKey + "\n", { mode: 0o600 });
  const port = await freePort();
  const hostEnv: Record<string, string> = {
    PATH: `${STANDIN}:${shims}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin`,
    // Its own home: operator-keys.sh edits ~/.ssh/authorized_keys.
    HOME: path.join(disk, "root-home"),
    HOST_READY_NEED_KVM: "0",
    VM_ACCEL: "tcg",
    // No windows-vm account on this machine: QEMU stays root here (run-vm.sh says so).
    VM_USER: "root",
    IDLE_INSTANCE_ID: HOST_ID,
    IDLE_INSTALL_ROOT: path.join(disk, "idle-root"),
    IDLE_STATE_DIR: path.join(disk, "idle-state"),
    FAKE_AWS_DIR: ec2,
    FAKE_S3_ENDPOINT: s3.endpoint,
    FAKE_AWS_REAL: "/usr/bin/aws",
    FAKE_HOST_ROOT: disk,
    FAKE_HOST_PORT: String(port),
    FAKE_HOST_SSHD_CONFIG: path.join(sshd, "sshd_config"),
    AWS_ACCESS_KEY_ID: String(s3.env.AWS_ACCESS_KEY_ID),
    AWS_SECRET_ACCESS_KEY: String(s3.env.AWS_SECRET_ACCESS_KEY),
    AWS_REGION: "us-east-2",
    AWS_DEFAULT_REGION: "us-east-2",
    AWS_EC2_METADATA_DISABLED: "true",
    AWS_PAGER: "",
  };
  fs.mkdirSync(hostEnv.IDLE_INSTALL_ROOT, { recursive: true });
  fs.mkdirSync(hostEnv.HOME, { recursive: true });
  fs.writeFileSync(
    hostEnv.FAKE_HOST_SSHD_CONFIG,
    [
      `Port ${port}`,
      "ListenAddress 127.0.0.1",
      `HostKey ${path.join(sshd, "host_key")}`,
      `AuthorizedKeysFile ${path.join(sshd, "authorized_keys")}`,
      `PidFile ${path.join(sshd, "sshd.pid")}`,
      "PermitRootLogin prohibit-password",
      "PasswordAuthentication no",
      "StrictModes no",
      "UsePAM no",
      `SetEnv ${Object.entries(hostEnv)
        .map(([k, v]) => `${k}=${v}`)
        .join(" ")}`,
      "",
    ].join("\n"),
  );
  const engineEnv: NodeJS.ProcessEnv = {
    ...hostEnv,
    PATH: `${STANDIN}:${process.env.PATH}`,
    HOST_EXEC_PORT: String(port),
    HOST_EXEC_SSH: path.join(STANDIN, "ssh"),
    HOST_EXEC_BOOT_TIMEOUT_S: "120",
    HOST_POWER_POLL_S: "1",
    BAKE_POLL_S: "1",
    S3_ENDPOINT_URL: s3.endpoint,
    AWS_CONFIG_FILE: String(s3.env.AWS_CONFIG_FILE),
    AWS_SHARED_CREDENTIALS_FILE: String(s3.env.AWS_SHARED_CREDENTIALS_FILE),
  };
  const engine = new Engine({
    root,
    keys: { "pipeline-key": pipelineKey, "guest-key": guestKey(guest) },
    env: engineEnv,
    // S3 objects the program declares land in the local S3 server.
    async onCloudResource(type, _name, inputs) {
      if (type !== "aws:s3/bucketObjectv2:BucketObjectv2") return;
      await new S3Http(s3.endpoint, String(inputs.bucket)).put(
        String(inputs.key),
        Buffer.from(String(inputs.contentBase64 ?? ""), "base64"),
      );
    },
  });
  const hostSh = (action: string) =>
    runOk("bash", [path.join(STANDIN, "host.sh"), action, HOST_ID], { env: { ...process.env, ...engineEnv } });
  // EC2 launches the instance: the host runs.
  await hostSh("start");

  const images = new Map<number, { url: string; sha256: string }>();
  const world: AwsWorld = {
    dir,
    root,
    guest,
    engine,
    s3,
    hostPath: (p) => path.join(disk, p),
    config(extra = {}) {
      return {
        "aws:region": "us-east-2",
        sshAllowedCidrs: JSON.stringify(["203.0.113.7/32"]),
        windowsImageUrl: "s3://media/standin.qcow2",
        windowsImageSha256: guest.digest,
        windowsVersion: "11-23h2",
        virtioIsoUrl: "s3://media/virtio-win.iso",
        virtioIsoSha256: drivers.sha256,
        guestAdminUser: "root",
        answerFileInImage: "false",
        vmCpus: "1",
        vmMemoryGiB: "4",
        // The smoke test boots the AMI on a metal instance, which this stand-in EC2 does not play:
        // test/scripts/smokeTest.test.ts runs smoke-test.sh against stand-ins of its own.
        smokeTest: "false",
        ...extra,
      };
    },
    async image(variant) {
      if (variant === 0) return { url: "s3://media/standin.qcow2", sha256: guest.digest };
      const have = images.get(variant);
      if (have) return have;
      const file = path.join(dir, `image-${variant}.qcow2`);
      await runOk("qemu-img", [
        "convert",
        "-c",
        "-O",
        "qcow2",
        "-o",
        `cluster_size=${2 ** (15 + variant)}`,
        guest.disk,
        file,
      ]);
      await put(file, `image-${variant}.qcow2`);
      const img = { url: `s3://media/image-${variant}.qcow2`, sha256: sha256File(file) };
      images.set(variant, img);
      return img;
    },
    state: (id = HOST_ID) => fs.readFileSync(path.join(ec2, "instances", id, "state"), "utf8").trim(),
    calls: () => fs.readFileSync(path.join(ec2, "calls"), "utf8").split("\n").filter(Boolean),
    async aws(args) {
      return runOk(path.join(STANDIN, "aws"), args, { env: { ...process.env, ...engineEnv } });
    },
    async onHost(command, env = {}) {
      const keyFile = path.join(sshd, "operator-key");
      fs.writeFileSync(keyFile, pipelineKey.privateKey, { mode: 0o600 });
      const envs = Object.entries(env).map(([k, v]) => `${k}='${v}'`);
      const r = await run(
        "/usr/bin/ssh",
        [
          "-i",
          keyFile,
          "-o",
          "BatchMode=yes",
          "-o",
          "StrictHostKeyChecking=no",
          "-o",
          "UserKnownHostsFile=/dev/null",
          "-o",
          "LogLevel=ERROR",
          "-p",
          String(port),
          "root@127.0.0.1",
          `env ${envs.join(" ")} bash -c '${command}'`,
        ],
        { timeoutMs: 120_000 },
      );
      fs.rmSync(keyFile);
      return { code: r.code, out: r.stdout + r.stderr };
    },
    arm(fault) {
      fs.writeFileSync(path.join(faults, fault), "");
    },
    async stop() {
      await hostSh("stop").catch(() => undefined);
      await s3.stop();
    },
  };
  return world;
}

function guestKey(guest: StandinGuest) {
  return {
    privateKey: fs.readFileSync(guest.privateKey, "utf8"),
    publicKey: fs.readFileSync(guest.publicKey, "utf8").trim(),
  };
}
