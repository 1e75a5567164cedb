/**
 * The pipeline plan: a pure function from the validated config to the ordered
 * stages, each with what it depends on, the exact inputs its trigger hashes
 * and (for host stages) the exact shell command it runs. Components render
 * this plan into resources; tests and the end-to-end run read it directly.
 */
import * as path from "path";
import * as url from "url";
import { ANSWER_FILE_NAME, AUTHORIZED_KEYS_FILE, FIRSTLOGON_SCRIPT, OPENSSH_ZIP_FILE } from "../answerFile";
import { StackConfig } from "../config";
import { sha256Hex } from "../paths";
import { renderVmEnv, VmLayout } from "./vmEnv";

export const STAGE_IDS = [
  "waitHost",
  "uploadFiles",
  "firmware",
  "fetchImage",
  "fetchDrivers",
  "prepareDisk",
  "configMedia",
  "renderEnv",
  "startVm",
  "waitGuest",
  "provisionGuest",
  "stopVm",
  "publish",
  "prepareAmi",
  "stopHost",
  "bakeAmi",
] as const;
export type StageId = (typeof STAGE_IDS)[number];

/** Where a stage runs. */
export type StageSite = "host" | "guest" | "aws";

export interface Stage {
  id: StageId;
  title: string;
  site: StageSite;
  /** Stages whose completion (and trigger digest) this one depends on. */
  dependsOn: StageId[];
  /** Repo-relative files the stage runs (copied to the host first). */
  files: string[];
  /** Exactly what the trigger hashes besides upstream digests: name -> value. */
  inputs: Record<string, string>;
  /** sha256 over inputs and upstream digests: changes iff this stage must re-run. */
  digest: string;
  /** Host stages: the shell command, run by bash on the host. */
  command?: string;
  /** What the command reads on stdin (content supplied by the component). */
  stdin?: "vmBuildEnv" | "vmImageEnv" | "answerFile" | "guestSettings";
  /** Runtime values this stage or one upstream depends on (added to its triggers). */
  runtime: RuntimeName[];
  /** Upper bound for the stage; also its Pulumi customTimeouts. */
  timeoutMinutes: number;
  /** Config keys that drive the stage (README). */
  configKeys: string[];
}

export interface Plan {
  stages: Stage[];
  layout: HostLayout;
  stage(id: StageId): Stage;
}

/** Paths and privileges on the machine that runs the host stages. */
export interface HostLayout extends VmLayout {
  /** Folder holding provisioning/ and assets/. */
  home: string;
  /** Prefix for commands that need root ("sudo -n " on AWS, "" when already root). */
  sudo: string;
  /** Root the baked image's files go under ("/" on the host). */
  imageRoot: string;
  /** Transient unit / process name of the build VM. */
  buildUnit: string;
}

export const AWS_LAYOUT: HostLayout = {
  home: "/opt/windows-arm64-image",
  vmDir: "/var/lib/windows-vm",
  sudo: "sudo -n ",
  imageRoot: "/",
  buildUnit: "windows-vm-build",
  sshPort: 2222,
  accel: "kvm",
};

/**
 * Values known only while Pulumi runs (after the host, bucket, key or password
 * exist). Commands hold them as tokens, resolved by `resolveCommand`; stages
 * list in `runtime` the ones they (or a stage upstream) depend on, and the
 * component adds those values to the stage's triggers.
 */
export const RUNTIME = {
  /** The host's identity (instance id): a new host re-runs every stage. */
  hostId: "@HOST_ID@",
  /** Publish destination, s3://bucket/prefix/ or file:///dir/. */
  artifactUri: "@ARTIFACT_URI@",
  /** The pipeline's OpenSSH public key. */
  pipelineKey: "@PIPELINE_PUBLIC_KEY@",
  /** sha256 of the rendered answer file (the file is a secret). */
  answerFile: "@ANSWER_FILE_SHA256@",
  /** sha256 of the guest settings JSON (a secret). */
  guestSettings: "@GUEST_SETTINGS_SHA256@",
} as const;
export type RuntimeName = keyof typeof RUNTIME;
export type RuntimeValues = Record<RuntimeName, string>;

/**
 * Replaces the runtime tokens in a command with their values. Commands hold
 * tokens inside single quotes (see `word`), so a value must not hold one.
 */
export function resolveCommand(command: string, values: Partial<RuntimeValues>): string {
  let out = command;
  for (const [name, token] of Object.entries(RUNTIME) as Array<[RuntimeName, string]>) {
    const v = values[name];
    if (out.includes(token)) {
      if (v === undefined) throw new Error(`resolveCommand: no value for ${name}`);
      if (v.includes("'")) throw new Error(`resolveCommand: the value of ${name} holds a single quote: ${v}`);
      out = out.split(token).join(v);
    }
  }
  return out;
}

export interface PlanInputs {
  config: StackConfig;
  layout: HostLayout;
  /** sha256 of each repo file a stage uses, by repo-relative path. */
  fileHashes: Record<string, string>;
}

/** Repo files each stage runs. */
export const STAGE_FILES: Partial<Record<StageId, string[]>> = {
  // waitHost: QemuHost sends host-ready.sh on stdin and waits with wait-for-guest.sh locally;
  // its own triggers hold those scripts' hashes, so editing them re-runs only the wait.
  firmware: ["provisioning/build-efi.sh"],
  fetchImage: ["provisioning/fetch-image.sh", "provisioning/lib.sh"],
  fetchDrivers: ["provisioning/fetch-image.sh", "provisioning/lib.sh"],
  prepareDisk: ["provisioning/prepare-disk.sh", "provisioning/lib.sh"],
  configMedia: [
    "provisioning/build-config-iso.sh",
    "provisioning/windows/firstlogon.ps1",
    "provisioning/windows/provision.ps1",
    "provisioning/windows/check.ps1",
    "provisioning/windows/common.psm1",
  ],
  startVm: ["provisioning/start-vm.sh", "provisioning/run-vm.sh", "provisioning/lib.sh"],
  waitGuest: ["provisioning/wait-for-guest.sh", "provisioning/lib.sh"],
  stopVm: ["provisioning/stop-vm.sh", "provisioning/lib.sh"],
  publish: ["provisioning/publish-image.sh", "provisioning/lib.sh"],
  prepareAmi: ["provisioning/prepare-ami.sh", "provisioning/run-vm.sh", "assets/windows-vm.service"],
};

/** Every repo file the host needs. */
export function hostFiles(): string[] {
  return [...new Set(Object.values(STAGE_FILES).flat())].sort();
}

/** Single-quotes a word for bash. */
export function shq(s: string): string {
  if (/^[A-Za-z0-9_@%+=:,./-]+$/.test(s)) return s;
  return `'${s.replace(/'/g, `'\\''`)}'`;
}

/** A command word: a runtime token always single-quoted (its value may hold spaces), anything else by `shq`. */
export function word(s: string): string {
  return (Object.values(RUNTIME) as string[]).includes(s) ? `'${s}'` : shq(s);
}

function sourceFileName(c: StackConfig): string {
  return `source.${c.image.format}`;
}

/** The pure pipeline plan. */
export function buildPlan(p: PlanInputs): Plan {
  const { config: c, layout: L } = p;
  const S = `${L.home}/provisioning`;
  const vm = L.vmDir;
  const run = (file: string, ...args: string[]) =>
    `${L.sudo}bash ${shq(`${S}/${file}`)} ${args.map(word).join(" ")}`.trim();
  const withEnv = (env: Record<string, string | undefined>, cmd: string) => {
    const pairs = Object.entries(env)
      .filter((e): e is [string, string] => e[1] !== undefined && e[1] !== "")
      .map(([k, v]) => `${k}=${word(v)}`);
    return pairs.length ? cmd.replace(/bash /, `env ${pairs.join(" ")} bash `) : cmd;
  };
  const s3Endpoint = c.target === "local" ? c.artifacts.endpointUrl : undefined;
  const source = `${vm}/${sourceFileName(c)}`;
  const isAws = c.target === "aws";
  const buildEnv = renderVmEnv(c, L, "build");
  const imageEnv = renderVmEnv(c, L, "image");

  type Draft = Omit<Stage, "digest" | "files" | "runtime"> & { files?: string[]; uses?: RuntimeName[] };
  const drafts: Draft[] = [
    {
      id: "waitHost",
      title: "Wait for the host: SSH answers, cloud-init done, KVM and tools present",
      site: "host",
      dependsOn: [],
      // A new host is a new runtime hostId (every stage re-runs); in-place changes (instance
      // type, volume IOPS) keep the host's work, so they re-run nothing here.
      inputs: { target: c.target },
      timeoutMinutes: 35,
      configKeys: ["hostInstanceType", "hostAmiId", "hostVolumeGiB", "sshAllowedCidrs"],
    },
    {
      id: "uploadFiles",
      title: "Copy the scripts and assets to the host (each file re-copied only when it changes)",
      site: "host",
      // Runs once the host is ready (the component orders it); its digest is the files' hashes.
      dependsOn: [],
      files: hostFiles(),
      inputs: {},
      timeoutMinutes: 10,
      configKeys: [],
    },
    {
      id: "firmware",
      title: "UEFI firmware pair (QEMU_EFI.fd, QEMU_VARS.fd)",
      site: "host",
      dependsOn: ["waitHost"],
      inputs: {},
      command: run("build-efi.sh", vm),
      timeoutMinutes: 5,
      configKeys: [],
    },
    {
      id: "fetchImage",
      title: "Fetch the Windows image and verify its SHA-256",
      site: "host",
      dependsOn: ["waitHost"],
      inputs: { url: c.image.url, sha256: c.image.sha256 },
      command: withEnv({ S3_ENDPOINT_URL: s3Endpoint }, run("fetch-image.sh", c.image.url, c.image.sha256, source)),
      timeoutMinutes: 120,
      configKeys: ["windowsImageUrl", "windowsImageSha256"],
    },
    {
      id: "fetchDrivers",
      title: "Fetch the virtio-win drivers ISO (and the OpenSSH zip, if given) and verify their SHA-256",
      site: "host",
      dependsOn: ["waitHost"],
      inputs: {
        url: c.image.virtioUrl,
        sha256: c.image.virtioSha256,
        ...(c.image.openSshZip ? { openSshUrl: c.image.openSshZip.url, openSshSha256: c.image.openSshZip.sha256 } : {}),
      },
      command: [
        run("fetch-image.sh", c.image.virtioUrl, c.image.virtioSha256, `${vm}/virtio-win.iso`),
        ...(c.image.openSshZip
          ? [run("fetch-image.sh", c.image.openSshZip.url, c.image.openSshZip.sha256, `${vm}/${OPENSSH_ZIP_FILE}`)]
          : []),
      ].join(" && "),
      timeoutMinutes: 30,
      configKeys: ["virtioIsoUrl", "virtioIsoSha256", "openSshZipUrl", "openSshZipSha256"],
    },
    {
      id: "prepareDisk",
      title: "Convert the image to qcow2 (or create the install disk for an ISO)",
      site: "host",
      dependsOn: ["fetchImage"],
      inputs: { format: c.image.format, ...(c.image.format === "iso" ? { diskGiB: String(c.vm.diskGiB) } : {}) },
      command: run("prepare-disk.sh", source, `${vm}/disk.qcow2`, String(c.vm.diskGiB)),
      timeoutMinutes: 60,
      configKeys: ["windowsImageUrl", "vmDiskGiB"],
    },
    {
      id: "configMedia",
      title: "Answer file, guest scripts and the pipeline key on the config ISO",
      site: "host",
      dependsOn: ["fetchDrivers"],
      inputs: c.image.format === "iso" ? { winpeDrivers: driverFolder(c) } : {},
      uses: ["answerFile", "pipelineKey"],
      command: configMediaCommand(c, L),
      stdin: "answerFile",
      timeoutMinutes: 10,
      configKeys: ["guestAdminUser", "guestLocale", "guestTimeZone", "windowsEdition", "windowsProductKey"],
    },
    {
      id: "renderEnv",
      title: "Write the build VM's env file",
      site: "host",
      dependsOn: ["waitHost"],
      inputs: { env: sha256Hex(buildEnv) },
      command: `${L.sudo}install -D -m 0644 /dev/stdin ${shq(`${vm}/vm-build.env`)}`,
      stdin: "vmBuildEnv",
      timeoutMinutes: 2,
      configKeys: ["vmCpus", "vmMemoryGiB", "vmMachineOptions"],
    },
    {
      id: "startVm",
      title: "Boot the VM (transient systemd unit) with the config ISO attached",
      site: "host",
      dependsOn: ["firmware", "prepareDisk", "fetchDrivers", "configMedia", "renderEnv"],
      inputs: {},
      // New guest settings re-provision a VM the last run shut down: boot it again first.
      uses: ["guestSettings"],
      command: [
        // A host that booted the baked unit runs the image VM: stop it before building.
        `${L.sudo}systemctl stop windows-vm.service 2>/dev/null || true`,
        run("start-vm.sh", `${vm}/vm-build.env`, L.buildUnit),
      ].join("; "),
      timeoutMinutes: 5,
      configKeys: ["vmCpus", "vmMemoryGiB"],
    },
    {
      id: "waitGuest",
      title: "Wait for the guest's SSH through the host's loopback forward",
      site: "host",
      dependsOn: ["startVm"],
      inputs: {},
      command: withEnv(
        { SERIAL_LOG: `${vm}/serial.log`, VM_PID_FILE: `${vm}/qemu.pid` },
        run("wait-for-guest.sh", "127.0.0.1", String(L.sshPort), String(GUEST_BOOT_TIMEOUT_S)),
      ),
      timeoutMinutes: Math.ceil(GUEST_BOOT_TIMEOUT_S / 60) + 5,
      configKeys: [],
    },
    {
      id: "provisionGuest",
      title: "Provision Windows over SSH (drivers, OpenSSH, builder setup) and check it",
      site: "guest",
      dependsOn: ["waitGuest"],
      files: [],
      inputs: {},
      uses: ["guestSettings"],
      stdin: "guestSettings",
      timeoutMinutes: 180,
      configKeys: [
        "guestDisableWindowsUpdate",
        "guestInstallBuildlet",
        "guestInstallLlvmMingw",
        "guestInstallVsBuildTools",
        "guestAutoLogon",
      ],
    },
    {
      id: "stopVm",
      title: "Shut Windows down through ACPI (QMP), forcing only after the timeout",
      site: "host",
      dependsOn: ["provisionGuest"],
      inputs: {},
      command: run("stop-vm.sh", `${vm}/qmp.sock`, String(GUEST_SHUTDOWN_TIMEOUT_S)),
      timeoutMinutes: Math.ceil(GUEST_SHUTDOWN_TIMEOUT_S / 60) + 5,
      configKeys: [],
    },
    {
      id: "publish",
      title: "Publish disk, EFI vars and manifest (content-addressed), then latest.json",
      site: "host",
      dependsOn: ["stopVm"],
      inputs: {},
      uses: ["artifactUri"],
      command: withEnv(
        {
          IMAGE_SOURCE_URL: c.image.url,
          IMAGE_SOURCE_SHA256: c.image.sha256,
          WINDOWS_VERSION: c.image.windowsVersion,
          S3_ENDPOINT_URL: s3Endpoint,
        },
        run("publish-image.sh", vm, RUNTIME.artifactUri),
      ),
      timeoutMinutes: 120,
      configKeys: ["artifactBucketName", "artifactPrefix", "artifactUri"],
    },
  ];
  if (isAws) {
    drafts.push(
      {
        id: "prepareAmi",
        title: "Install the launcher, env file and windows-vm.service; generalize the host",
        site: "host",
        dependsOn: ["publish"],
        inputs: { env: sha256Hex(imageEnv) },
        uses: ["pipelineKey"],
        command: [
          `${L.sudo}install -D -m 0644 /dev/stdin ${shq(`${vm}/vm.env`)}`,
          withEnv(
            // The unit's ExecCondition keeps the image VM off this build host when it is started again.
            { PIPELINE_PUBLIC_KEY: RUNTIME.pipelineKey, BUILD_INSTANCE_ID: RUNTIME.hostId },
            run("prepare-ami.sh", "--generalize", L.imageRoot, `${vm}/vm.env`),
          ),
        ].join(" && "),
        stdin: "vmImageEnv",
        timeoutMinutes: 10,
        configKeys: ["vmCpus", "vmMemoryGiB", "vmBuildletPort"],
      },
      {
        id: "stopHost",
        title: c.host.keepRunning
          ? "Keep the host running (keepHostRunning): the AMI is taken with a reboot"
          : "Stop the host, so the AMI is taken from a stopped, consistent disk",
        site: "aws",
        dependsOn: ["prepareAmi"],
        inputs: { state: c.host.keepRunning ? "running" : "stopped" },
        timeoutMinutes: 20,
        configKeys: ["keepHostRunning"],
      },
      {
        id: "bakeAmi",
        // Named with the image SHA-256 and the prepareAmi digest: a change to what is installed
        // for the image bakes a new AMI. Created after stopHost (a stopped host), which does not
        // feed its digest: keeping the host running or not does not re-bake.
        title: "Bake the AMI from the host (named with the image SHA-256 and the prepareAmi digest)",
        site: "aws",
        dependsOn: ["prepareAmi"],
        inputs: { retain: String(c.retainAmiOnDelete) },
        timeoutMinutes: 90,
        configKeys: ["retainAmiOnDelete"],
      },
    );
  }

  const digests: Partial<Record<StageId, string>> = {};
  const runtimes: Partial<Record<StageId, RuntimeName[]>> = {};
  const stages: Stage[] = [];
  for (const { uses, ...d } of drafts) {
    const files = d.files ?? STAGE_FILES[d.id] ?? [];
    const inputs: Record<string, string> = { ...d.inputs };
    {
      for (const f of files) {
        const h = p.fileHashes[f];
        if (h === undefined) throw new Error(`buildPlan: no hash for ${f}`);
        inputs[`file:${f}`] = h;
      }
    }
    if (d.command !== undefined) inputs.command = sha256Hex(d.command);
    const upstream = d.dependsOn.map((u) => {
      const dg = digests[u];
      if (dg === undefined) throw new Error(`buildPlan: ${d.id} depends on ${u}, which comes later`);
      return `${u}:${dg}`;
    });
    const digest = sha256Hex(JSON.stringify({ id: d.id, inputs, upstream }));
    digests[d.id] = digest;
    const runtime = new Set<RuntimeName>(d.site === "aws" ? [] : ["hostId"]);
    for (const u of uses ?? []) runtime.add(u);
    for (const u of d.dependsOn) for (const r of runtimes[u] ?? []) runtime.add(r);
    runtimes[d.id] = [...runtime].sort();
    stages.push({ ...d, files, inputs, digest, runtime: runtimes[d.id] as RuntimeName[] });
  }
  return {
    stages,
    layout: L,
    stage(id: StageId) {
      const s = stages.find((x) => x.id === id);
      if (!s) throw new Error(`no stage ${id} in this plan`);
      return s;
    },
  };
}

/** How long Windows may take from power-on to answering SSH (first boot runs OOBE). */
export const GUEST_BOOT_TIMEOUT_S = 3600;
/** How long an ACPI shutdown may take before QEMU is told to quit. */
export const GUEST_SHUTDOWN_TIMEOUT_S = 600;

/** The local target's publish folder when artifactUri is unset: <home>/artifacts/, as a file:// URI. */
export function defaultArtifactUri(layout: HostLayout): string {
  return `${url.pathToFileURL(path.join(layout.home, "artifacts")).href}/`;
}

/** The virtio-win OS folder matching the Windows release. */
export function driverFolder(c: StackConfig): string {
  return c.image.windowsVersion === "10" ? "w10" : "w11";
}

function configMediaCommand(c: StackConfig, L: HostLayout): string {
  const S = `${L.home}/provisioning`;
  const stage = `${L.vmDir}/config`;
  // The names on the ISO are the ones the answer file and firstlogon.ps1 look for.
  const answer = `${stage}/${ANSWER_FILE_NAME}`;
  const keys = `${stage}/${AUTHORIZED_KEYS_FILE}`;
  const files = [
    `${answer}=${ANSWER_FILE_NAME}`,
    `${keys}=${AUTHORIZED_KEYS_FILE}`,
    `${S}/windows/${FIRSTLOGON_SCRIPT}`,
    `${S}/windows/provision.ps1`,
    `${S}/windows/check.ps1`,
    `${S}/windows/common.psm1`,
    ...(c.image.openSshZip ? [`${L.vmDir}/${OPENSSH_ZIP_FILE}=${OPENSSH_ZIP_FILE}`] : []),
  ];
  const env: string[] = [`CONFIG_ISO_DRIVER_FOLDER=${driverFolder(c)}`];
  if (c.image.format === "iso") env.push(`CONFIG_ISO_DRIVERS_ISO=${shq(`${L.vmDir}/virtio-win.iso`)}`);
  // The answer file (secret) arrives on stdin and is written 0600, never on a command line.
  return [
    `${L.sudo}install -d -m 0700 ${shq(stage)}`,
    `${L.sudo}bash -c ${shq(`umask 077 && cat > ${shq(answer)}`)}`,
    `${L.sudo}bash -c ${shq(`umask 077 && printf '%s\\n' ${word(RUNTIME.pipelineKey)} > ${shq(keys)}`)}`,
    `${L.sudo}env ${env.join(" ")} bash ${shq(`${S}/build-config-iso.sh`)} ${shq(`${L.vmDir}/config.iso`)} ${files.map(shq).join(" ")}`,
    // The ISO holds them now; the plain copies do not stay on the host.
    `${L.sudo}rm -rf -- ${shq(stage)}`,
  ].join(" && ");
}

/** Stage ids whose digest differs between two plans: what a `pulumi up` would re-run. */
export function changedStages(before: Plan, after: Plan): StageId[] {
  return after.stages
    .filter((s) => {
      const old = before.stages.find((b) => b.id === s.id);
      return !old || old.digest !== s.digest;
    })
    .map((s) => s.id);
}
