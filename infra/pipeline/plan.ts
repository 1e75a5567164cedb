/**
 * The pipeline plan: a pure function from the validated config to the ordered
 * stages, each with what it depends on, the exact inputs its trigger hashes
 * and (for host stages) the exact shell command it runs. Components render
 * this plan into resources; tests and the end-to-end run read it directly.
 */
import * as path from "path";
import * as url from "url";
import { BAKE_FILES } from "../bake";
import { ANSWER_FILE_NAME, AUTHORIZED_KEYS_FILE, FIRSTLOGON_SCRIPT, OPENSSH_ZIP_FILE } from "../answerFile";
import { StackConfig } from "../config";
import { SOFTWARE_REPORT_FILE } from "../manifest";
import { sha256Hex } from "../paths";
import { guestProvisionCommand } from "./guest";
import { renderVmEnv, VmLayout } from "./vmEnv";

export const STAGE_IDS = [
  "waitHost",
  "uploadFiles",
  "idleGuard",
  "firmware",
  "fetchImage",
  "fetchDrivers",
  "prepareDisk",
  "injectAnswerFile",
  "configMedia",
  "renderEnv",
  "startVm",
  "waitGuest",
  "baseImage",
  "overlayDisk",
  "provisionGuest",
  "stopVm",
  "publish",
  "stopHost",
  "bakeImage",
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
  /** Stages that must finish first but whose digests do not feed this one's. */
  after: StageId[];
  /** Repo-relative files the stage runs (copied to the host first). */
  files: string[];
  /** Exactly what the trigger hashes besides upstream digests: name -> value. */
  inputs: Record<string, string>;
  /** sha256 over inputs and upstream digests: changes iff this stage must re-run. */
  digest: string;
  /** Host stages: the shell command, run by bash on the host. */
  command?: string;
  /**
   * Host stages: `command` run through provisioning/stage.sh, bounded on the
   * host by timeoutMinutes (what the runner actually runs).
   */
  hostCommand?: string;
  /** What a hung stage was waiting for (stage.sh names it on a timeout). */
  waitsFor: string;
  /** What the command reads on stdin (content supplied by the component). */
  stdin?: "vmBuildEnv" | "answerFile" | "guestKeyAndSettings" | "hostReadyScript";
  /** The stdin holds a secret: stdout and stderr are stored as secrets too. */
  secretStdin: boolean;
  /** Runtime values this stage or one upstream depends on (added to its triggers). */
  runtime: RuntimeName[];
  /** Host-side bound of the stage (stage.sh); Pulumi's customTimeouts add a margin. */
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
  /** Where stage.sh keeps a marker per running stage (the idle guard reads it). */
  stageRunDir: string;
  /** Where stage.sh records the last activity. */
  stageStateDir: string;
}

export const AWS_LAYOUT: HostLayout = {
  home: "/opt/windows-arm64-image",
  vmDir: "/var/lib/windows-vm",
  sudo: "sudo -n ",
  imageRoot: "/",
  buildUnit: "windows-vm-build",
  stageRunDir: "/run/windows-arm64-image/stages",
  stageStateDir: "/var/lib/windows-arm64-image",
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
  /** The guest-only OpenSSH public key (the guest authorizes it; the host never stores its private half). */
  guestKey: "@GUEST_PUBLIC_KEY@",
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

/** What starting the VM runs on the host: the launcher (as a transient unit) and its screen keeper. */
const VM_START_FILES = [
  "provisioning/start-vm.sh",
  "provisioning/run-vm.sh",
  "provisioning/imds-proxy.py",
  "provisioning/screen-keeper.sh",
  "provisioning/vm-screenshot.sh",
  "provisioning/lib.sh",
];
/** Starting the VM and waiting for its SSH. */
const VM_BOOT_FILES = [...VM_START_FILES, "provisioning/wait-for-guest.sh"];

/** Repo files each stage runs. */
export const STAGE_FILES: Partial<Record<StageId, string[]>> = {
  // waitHost: host-ready.sh goes on stdin (the host has no files yet); its hash is in the stage's inputs.
  idleGuard: [
    "provisioning/idle-guard-install.sh",
    "provisioning/idle-guard.sh",
    "assets/windows-arm64-image-idle.service",
    "assets/windows-arm64-image-idle.timer",
    "provisioning/lib.sh",
  ],
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
  injectAnswerFile: ["provisioning/inject-answer-file.sh", "provisioning/lib.sh"],
  // startVm and waitGuest boot the install disk only while its base is missing (base-image.sh present).
  startVm: ["provisioning/base-image.sh", ...VM_START_FILES],
  waitGuest: [
    "provisioning/base-image.sh",
    "provisioning/wait-for-guest.sh",
    "provisioning/vm-screenshot.sh",
    "provisioning/lib.sh",
  ],
  baseImage: [
    "provisioning/base-image.sh",
    "provisioning/stop-vm.sh",
    "provisioning/screen-keeper.sh",
    "provisioning/lib.sh",
  ],
  overlayDisk: ["provisioning/base-image.sh", "provisioning/stop-vm.sh", ...VM_BOOT_FILES],
  // base-image.sh claim: a fresh overlay unless this run's overlayDisk made it (the VM stopped first).
  // guest-run.sh boots the VM again when it is not running (a host stopped after a failed run).
  provisionGuest: [
    "provisioning/base-image.sh",
    "provisioning/stop-vm.sh",
    "provisioning/guest-run.sh",
    "provisioning/ssh-key.sh",
    ...VM_BOOT_FILES,
  ],
  stopVm: ["provisioning/stop-vm.sh", "provisioning/screen-keeper.sh", "provisioning/lib.sh"],
  publish: ["provisioning/publish-image.sh", "provisioning/lib.sh"],
};

/**
 * The transport: every host stage runs through stage.sh (the host-side bound,
 * the idle-guard marker, long lines cut). It is copied to the host but is in
 * no stage's digest: editing it changes how stages run, not what they make,
 * so it re-runs nothing. (host-exec.sh, which reaches the host, runs where
 * Pulumi runs and is not copied.)
 */
export const TRANSPORT_FILES = ["provisioning/stage.sh", "provisioning/lib.sh"] as const;

/** The host's login user (for the screenshot fetch hint). */
export const HOST_LOGIN = "ubuntu";

/** The script the waitHost stage sends on stdin. */
export const HOST_READY_SCRIPT = "provisioning/host-ready.sh";
/** How long cloud-init may take on a new metal host. */
export const HOST_READY_TIMEOUT_S = 1800;

/** Every repo file the host needs. */
export function hostFiles(): string[] {
  return [...new Set([...Object.values(STAGE_FILES).flat(), ...TRANSPORT_FILES])].sort();
}

/** Every repo file whose hash a plan reads (host files, the bake's, host-ready.sh). */
export function planFiles(): string[] {
  return [...new Set([...hostFiles(), ...BAKE_FILES, HOST_READY_SCRIPT])].sort();
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

  type Draft = Omit<Stage, "digest" | "files" | "runtime" | "after" | "secretStdin" | "hostCommand"> & {
    files?: string[];
    uses?: RuntimeName[];
    after?: StageId[];
    secretStdin?: boolean;
  };
  const buildEnvFile = `${vm}/vm-build.env`;
  const screens = `${vm}/screens`;
  const screenKeeper = (action: "start" | "stop" | "shot", label?: string) => {
    const cmd = run("screen-keeper.sh", action, `${vm}/qmp.sock`, screens, ...(label ? [label] : []));
    return action === "shot" && isAws
      ? withEnv({ SCREENSHOT_FETCH_HINT: `scp ${HOST_LOGIN}@<hostPublicIp>:<path> .` }, cmd)
      : cmd;
  };
  const inject = c.image.format !== "iso" && c.image.answerFileInImage;
  // The install disk (Windows Setup and the first logon run on it) becomes the base; the build VM's
  // VM_DISK, disk.qcow2, is the overlay on it that provisioning runs on and publish reads.
  const installDisk = `${vm}/${INSTALL_DISK}`;
  const baseCmd = (action: "present" | "freeze" | "overlay" | "claim") =>
    run("base-image.sh", action, vm, baseKey(baseParts(c, L, p.fileHashes)));
  const qmpSock = `${vm}/qmp.sock`;
  const waitForGuest = () =>
    withEnv(
      {
        SERIAL_LOG: `${vm}/serial.log`,
        VM_PID_FILE: `${vm}/qemu.pid`,
        // A timeout saves a screenshot and names it (and, on AWS, how to fetch it).
        WAIT_GUEST_QMP_SOCKET: qmpSock,
        WAIT_GUEST_SCREEN_DIR: screens,
        WAIT_GUEST_FETCH_HINT: isAws ? `scp ${HOST_LOGIN}@<hostPublicIp>:<path> .` : undefined,
      },
      run("wait-for-guest.sh", "127.0.0.1", String(L.sshPort), String(GUEST_BOOT_TIMEOUT_S)),
    );
  const drafts: Draft[] = [];
  if (isAws) {
    drafts.push(
      {
        id: "waitHost",
        title: "Wait for the host: SSH answers, cloud-init done, KVM and tools present",
        site: "host",
        dependsOn: [],
        // A new host is a new runtime hostId (every stage re-runs); in-place changes (instance
        // type, volume IOPS) keep the host's work, so they re-run nothing here.
        inputs: { target: c.target },
        // host-ready.sh arrives on stdin: the host has no scripts yet (uploadFiles comes next).
        command: `HOST_READY_TIMEOUT_S=${HOST_READY_TIMEOUT_S} bash -s`,
        stdin: "hostReadyScript",
        waitsFor: "cloud-init, KVM and the host tools",
        timeoutMinutes: Math.ceil(HOST_READY_TIMEOUT_S / 60) + 5,
        configKeys: ["hostInstanceType", "hostAmiId", "hostVolumeGiB", "sshAllowedCidrs"],
      },
      {
        id: "idleGuard",
        title: c.host.keepRunning
          ? "Turn the host's idle guard off (keepHostRunning)"
          : `Install the host's idle guard: power off after ${c.host.idleMinutes} min with no stage running`,
        site: "host",
        // Nothing depends on it: changing hostIdleMinutes re-runs this stage only.
        dependsOn: ["waitHost"],
        inputs: { idle: c.host.keepRunning ? "off" : String(c.host.idleMinutes) },
        command: run("idle-guard-install.sh", c.host.keepRunning ? "off" : String(c.host.idleMinutes)),
        waitsFor: "systemd to install the idle timer",
        timeoutMinutes: 5,
        configKeys: ["hostIdleMinutes", "keepHostRunning"],
      },
    );
  }
  drafts.push(
    {
      id: "uploadFiles",
      title: "Copy the scripts and assets to the host (again whenever one changes)",
      site: "host",
      // Runs once the host is ready (the component orders it); its digest is the files' hashes.
      dependsOn: [],
      after: isAws ? ["waitHost"] : [],
      files: hostFiles(),
      inputs: {},
      waitsFor: "the copy of the scripts",
      timeoutMinutes: 10,
      configKeys: [],
    },
    {
      id: "firmware",
      title: "UEFI firmware pair (QEMU_EFI.fd, QEMU_VARS.fd)",
      site: "host",
      dependsOn: isAws ? ["waitHost"] : [],
      inputs: {},
      command: run("build-efi.sh", vm),
      waitsFor: "the firmware files",
      timeoutMinutes: 5,
      configKeys: [],
    },
    {
      id: "fetchImage",
      title: "Fetch the Windows image and verify its SHA-256",
      site: "host",
      dependsOn: isAws ? ["waitHost"] : [],
      inputs: { url: c.image.url, sha256: c.image.sha256 },
      command: withEnv({ S3_ENDPOINT_URL: s3Endpoint }, run("fetch-image.sh", c.image.url, c.image.sha256, source)),
      waitsFor: "the Windows image download",
      timeoutMinutes: 120,
      configKeys: ["windowsImageUrl", "windowsImageSha256"],
    },
    {
      id: "fetchDrivers",
      title: "Fetch the virtio-win drivers ISO (and the OpenSSH zip, if given) and verify their SHA-256",
      site: "host",
      dependsOn: isAws ? ["waitHost"] : [],
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
      waitsFor: "the drivers download",
      timeoutMinutes: 30,
      configKeys: ["virtioIsoUrl", "virtioIsoSha256", "openSshZipUrl", "openSshZipSha256"],
    },
    {
      id: "prepareDisk",
      title: "Convert the image to qcow2 (or create the install disk for an ISO)",
      site: "host",
      dependsOn: ["fetchImage"],
      // baseImage consumes the install disk (renames it to the base): a new base needs a new one.
      inputs: {
        format: c.image.format,
        ...(c.image.format === "iso" ? { diskGiB: String(c.vm.diskGiB) } : {}),
        base: baseKey(baseParts(c, L, p.fileHashes)),
      },
      uses: ["answerFile"],
      command: run("prepare-disk.sh", source, installDisk, String(c.vm.diskGiB)),
      waitsFor: "the conversion to qcow2",
      timeoutMinutes: 60,
      configKeys: ["windowsImageUrl", "vmDiskGiB"],
    },
    ...(inject
      ? [
          {
            id: "injectAnswerFile" as const,
            title: "Write the answer file into the image's Windows\\Panther (a cached one would win over the ISO)",
            site: "host" as const,
            dependsOn: ["prepareDisk" as const],
            inputs: {},
            uses: ["answerFile" as const],
            command: run("inject-answer-file.sh", installDisk, "-"),
            stdin: "answerFile" as const,
            secretStdin: true,
            waitsFor: "the answer file written into the image",
            timeoutMinutes: 10,
            configKeys: ["answerFileInImage"],
          },
        ]
      : []),
    {
      id: "configMedia",
      title: "Answer file, guest scripts and the guest key on the config ISO",
      site: "host",
      dependsOn: ["fetchDrivers"],
      inputs: c.image.format === "iso" ? { winpeDrivers: driverFolder(c) } : {},
      uses: ["answerFile", "guestKey"],
      command: configMediaCommand(c, L),
      stdin: "answerFile",
      secretStdin: true,
      waitsFor: "the config ISO",
      timeoutMinutes: 10,
      configKeys: ["guestAdminUser", "guestLocale", "guestTimeZone", "windowsEdition", "windowsProductKey"],
    },
    {
      id: "renderEnv",
      title: "Write the build VM's env file",
      site: "host",
      dependsOn: isAws ? ["waitHost"] : [],
      inputs: { env: sha256Hex(buildEnv) },
      // cat, not `install /dev/stdin`: stdin may be a socket, which /dev/stdin cannot reopen.
      command: `${L.sudo}bash -c ${shq(`mkdir -p ${shq(vm)} && umask 022 && cat > ${shq(`${buildEnvFile}.tmp`)} && mv -f ${shq(`${buildEnvFile}.tmp`)} ${shq(buildEnvFile)}`)}`,
      stdin: "vmBuildEnv",
      waitsFor: "the env file",
      timeoutMinutes: 2,
      configKeys: ["vmCpus", "vmMemoryGiB", "vmMachineOptions"],
    },
    {
      id: "startVm",
      title: "Boot the install disk (transient systemd unit) with the config ISO attached, unless its base exists",
      site: "host",
      // The guest scripts and the VM's size are not inputs: they shape the provisioning, not the install.
      dependsOn: ["firmware", "prepareDisk", ...(inject ? ["injectAnswerFile" as const] : []), "fetchDrivers"],
      after: ["configMedia", "renderEnv"],
      // What shaped the install is in the base key the command carries (baseParts).
      inputs: {},
      uses: ["answerFile"],
      // The screen keeper saves a screenshot a minute while Windows installs.
      command: `${baseCmd("present")} || { ${withEnv({ VM_DISK: installDisk }, run("start-vm.sh", buildEnvFile, L.buildUnit))} && { ${screenKeeper("start")} || true; }; }`,
      waitsFor: "QEMU to start",
      timeoutMinutes: 5,
      configKeys: ["windowsImageSha256", "windowsProductKey", "windowsEdition", "guestAdminUser", "vmMachineOptions"],
    },
    {
      id: "waitGuest",
      title: "Wait for the installed guest's SSH (Setup, OOBE and the first logon done), unless its base exists",
      site: "host",
      dependsOn: ["startVm"],
      inputs: {},
      uses: ["answerFile"],
      command: `${baseCmd("present")} || ${waitForGuest()}`,
      waitsFor: "Windows to answer SSH (first boot runs Setup and OOBE)",
      timeoutMinutes: Math.ceil(GUEST_BOOT_TIMEOUT_S / 60) + 5,
      configKeys: [],
    },
    {
      id: "baseImage",
      title:
        "Shut the installed Windows down and freeze its disk as the read-only base-<digest>.qcow2 (older bases removed)",
      site: "host",
      dependsOn: ["waitGuest"],
      inputs: {},
      uses: ["answerFile"],
      // A base must come from a clean shutdown: a forced one fails the stage.
      command: `{ ${screenKeeper("stop")} || true; } && ${withEnv({ VM_DISK: installDisk, STOP_VM_REQUIRE_GRACEFUL: "1" }, run("stop-vm.sh", qmpSock, String(GUEST_SHUTDOWN_TIMEOUT_S)))} && ${baseCmd("freeze")}`,
      waitsFor: "Windows to shut down and its disk to be frozen",
      timeoutMinutes: Math.ceil(GUEST_SHUTDOWN_TIMEOUT_S / 60) + 5,
      configKeys: [],
    },
    {
      id: "overlayDisk",
      title: "A fresh qcow2 overlay on the base (disk.qcow2), booted until its SSH answers",
      site: "host",
      dependsOn: ["baseImage", "configMedia", "renderEnv"],
      inputs: {},
      // New guest settings re-provision: from a fresh overlay.
      uses: ["guestSettings", "answerFile"],
      // A VM still running (a failed run's) is stopped first: its overlay is discarded.
      command: [
        `{ ${screenKeeper("stop")} || true; }`,
        run("stop-vm.sh", qmpSock, String(GUEST_SHUTDOWN_TIMEOUT_S)),
        baseCmd("overlay"),
        run("start-vm.sh", buildEnvFile, L.buildUnit),
        `{ ${screenKeeper("start")} || true; }`,
        waitForGuest(),
      ].join(" && "),
      waitsFor: "the VM on the fresh overlay to answer SSH",
      timeoutMinutes: Math.ceil((GUEST_SHUTDOWN_TIMEOUT_S + GUEST_BOOT_TIMEOUT_S) / 60) + 5,
      configKeys: ["vmCpus", "vmMemoryGiB"],
    },
    {
      id: "provisionGuest",
      title: "Provision Windows over SSH from the host (retried over a dropped connection) and check it",
      site: "host",
      dependsOn: ["overlayDisk"],
      inputs: { user: c.guest.adminUser },
      uses: ["guestSettings", "answerFile"],
      // The guest-only key and the settings (a password) arrive on stdin, never on a disk.
      // A failure saves a screenshot of the VM and names it.
      // base-image.sh claim first: an overlay an earlier provisioning used is replaced by a fresh one.
      command: `${baseCmd("claim")} && ${withEnv(
        // check.ps1's software report comes back on stdout; publish puts it next to the manifest.
        { GUEST_RUN_BOOT_TIMEOUT_S: String(GUEST_BOOT_TIMEOUT_S), GUEST_RUN_REPORT: `${vm}/${SOFTWARE_REPORT_FILE}` },
        run("guest-run.sh", buildEnvFile, L.buildUnit, String(L.sshPort), c.guest.adminUser, guestProvisionCommand()),
      )} || { rc=$?; ${screenKeeper("shot", "provisionGuest")} >&2 || true; exit $rc; }`,
      stdin: "guestKeyAndSettings",
      secretStdin: true,
      waitsFor: "the guest provisioning (provision.ps1 and check.ps1)",
      timeoutMinutes: 180,
      configKeys: [
        "guestDisableWindowsUpdate",
        "buildletEnv",
        "vsVersion",
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
      command: `{ ${screenKeeper("stop")} || true; } && ${run("stop-vm.sh", `${vm}/qmp.sock`, String(GUEST_SHUTDOWN_TIMEOUT_S))}`,
      waitsFor: "Windows to shut down",
      timeoutMinutes: Math.ceil(GUEST_SHUTDOWN_TIMEOUT_S / 60) + 5,
      configKeys: [],
    },
    {
      id: "publish",
      title: "Publish disk, EFI vars, firmware and manifest (content-addressed), then latest.json",
      site: "host",
      dependsOn: ["stopVm"],
      inputs: {},
      uses: ["artifactUri"],
      command: withEnv(
        {
          IMAGE_SOURCE_URL: c.image.url,
          IMAGE_SOURCE_SHA256: c.image.sha256,
          WINDOWS_VERSION: c.image.windowsVersion,
          PUBLISH_VM_ENV: buildEnvFile,
          IMAGE_COMPRESSION: c.artifacts.compression,
          S3_ENDPOINT_URL: s3Endpoint,
        },
        run("publish-image.sh", vm, RUNTIME.artifactUri),
      ),
      waitsFor: "the flattening and upload of the image",
      timeoutMinutes: 120,
      configKeys: ["artifactBucketName", "artifactPrefix", "artifactUri", "imageCompression"],
    },
  );
  if (isAws) {
    if (!c.host.keepRunning) {
      drafts.push({
        id: "stopHost",
        title: "Stop the build host (it is not needed for the bake)",
        site: "aws",
        dependsOn: [],
        after: ["publish", "idleGuard"],
        inputs: {},
        waitsFor: "EC2 to stop the host",
        timeoutMinutes: 20,
        configKeys: ["keepHostRunning"],
      });
    }
    drafts.push(
      {
        id: "bakeImage",
        // Depends on the published image (its SHA-256 is a runtime trigger), not on how it was made.
        title:
          "Bake: a small image instance fetches the published files, verifies them, installs the VM unit, powers off",
        site: "aws",
        dependsOn: [],
        after: ["publish"],
        files: [...BAKE_FILES],
        inputs: {
          env: sha256Hex(imageEnv),
          instanceType: c.bake.instanceType,
          volumeGiB: c.bake.volumeGiB === undefined ? "auto" : String(c.bake.volumeGiB),
        },
        waitsFor: "the bake instance to power off",
        timeoutMinutes: 90,
        configKeys: ["bakeInstanceType", "amiVolumeGiB", "vmCpus", "vmMemoryGiB", "vmBuildletPort"],
      },
      {
        id: "bakeAmi",
        title: "Take the AMI from the stopped bake instance (named with the image SHA-256 and the bake digest)",
        site: "aws",
        dependsOn: ["bakeImage"],
        inputs: { retain: String(c.retainAmiOnDelete) },
        waitsFor: "EC2 to create the AMI",
        timeoutMinutes: 90,
        configKeys: ["retainAmiOnDelete"],
      },
    );
  }

  const fileHash = (f: string) => {
    const h = p.fileHashes[f];
    if (h === undefined) throw new Error(`buildPlan: no hash for ${f}`);
    return h;
  };
  const order = new Map(STAGE_IDS.map((id, i) => [id, i]));
  drafts.sort((a, b) => (order.get(a.id) ?? 0) - (order.get(b.id) ?? 0));
  const digests: Partial<Record<StageId, string>> = {};
  const runtimes: Partial<Record<StageId, RuntimeName[]>> = {};
  const stages: Stage[] = [];
  for (const { uses, ...d } of drafts) {
    const files = d.files ?? STAGE_FILES[d.id] ?? [];
    const inputs: Record<string, string> = { ...d.inputs };
    for (const f of files) inputs[`file:${f}`] = fileHash(f);
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
    // waitHost's script is its stdin: an edit runs waitHost again (an update), and no other stage.
    const hostCommand =
      d.command === undefined
        ? undefined
        : d.id === "waitHost"
          ? d.command
          : bounded(L, d.id, d.timeoutMinutes, d.waitsFor, d.command);
    stages.push({
      ...d,
      after: d.after ?? [],
      secretStdin: d.secretStdin ?? false,
      hostCommand,
      files,
      inputs,
      digest,
      runtime: runtimes[d.id] as RuntimeName[],
    });
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

/**
 * A stage's command run through stage.sh: bounded on the host by its timeout
 * (then killed with its whole process tree, the message naming the stage and
 * what it waited for), its long lines cut, a marker kept for the idle guard.
 * As root on AWS, so the bound reaches every process the stage started.
 */
export function bounded(L: HostLayout, id: StageId, minutes: number, waitsFor: string, command: string): string {
  const env = `STAGE_RUN_DIR=${shq(L.stageRunDir)} STAGE_STATE_DIR=${shq(L.stageStateDir)}`;
  const stageSh = shq(`${L.home}/provisioning/stage.sh`);
  return `${L.sudo}env ${env} bash ${stageSh} ${id} ${minutes * 60} ${shq(waitsFor)} ${shq(command)}`;
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
  const keys = `${stage}/${AUTHORIZED_KEYS_FILE}`;
  const files = [
    // "-": the answer file (a secret) is read from stdin into the ISO: no plain copy on the host.
    `-=${ANSWER_FILE_NAME}`,
    `${keys}=${AUTHORIZED_KEYS_FILE}`,
    `${S}/windows/${FIRSTLOGON_SCRIPT}`,
    `${S}/windows/provision.ps1`,
    `${S}/windows/check.ps1`,
    `${S}/windows/common.psm1`,
    ...(c.image.openSshZip ? [`${L.vmDir}/${OPENSSH_ZIP_FILE}=${OPENSSH_ZIP_FILE}`] : []),
  ];
  const env: string[] = [`CONFIG_ISO_DRIVER_FOLDER=${driverFolder(c)}`];
  if (c.image.format === "iso") env.push(`CONFIG_ISO_DRIVERS_ISO=${shq(`${L.vmDir}/virtio-win.iso`)}`);
  // The answer file (secret) arrives on stdin, never on a command line or a disk.
  return [
    `${L.sudo}rm -rf -- ${shq(stage)}`,
    `${L.sudo}install -d -m 0700 ${shq(stage)}`,
    `${L.sudo}bash -c ${shq(`umask 077 && printf '%s\\n' ${word(RUNTIME.guestKey)} > ${shq(keys)}`)}`,
    `${L.sudo}env ${env.join(" ")} bash ${shq(`${S}/build-config-iso.sh`)} ${shq(`${L.vmDir}/config.iso`)} ${files.map(shq).join(" ")}`,
    // The ISO holds the key now; its staging folder does not stay.
    `${L.sudo}rm -rf -- ${shq(stage)}`,
  ].join(" && ");
}

/** The disk prepare-disk.sh writes and Windows installs on; baseImage renames it to the base. */
export const INSTALL_DISK = "install.qcow2";

/**
 * Build-env variables that do not shape the installed Windows: a new value
 * re-provisions from the base and never installs Windows again. Every other
 * variable (the machine options, the disk and firmware paths, the attached
 * media, and any variable added later) is install-affecting.
 */
export const NOT_INSTALL_AFFECTING_ENV = Object.freeze([
  "VM_CPUS",
  "VM_MEMORY_GIB",
  "VM_SSH_PORT",
  "VM_BUILDLET_PORT",
  "VM_VNC_DISPLAY",
  "VM_QMP_SOCKET",
  "VM_SERIAL_LOG",
  "VM_HALT_ON_EXIT",
]);

/** The build env's install-affecting KEY=value lines (comments and NOT_INSTALL_AFFECTING_ENV dropped). */
export function installVmSettings(buildEnv: string): string {
  return buildEnv
    .split("\n")
    .filter((l) => /^[A-Z_][A-Z0-9_]*=/.test(l) && !NOT_INSTALL_AFFECTING_ENV.includes(l.slice(0, l.indexOf("="))))
    .join("\n");
}

/**
 * Exactly what shapes the installed Windows that becomes the base: the source
 * image (its SHA-256 and format; for an ISO the disk size), the answer file
 * (its SHA-256, a runtime token: it holds the admin password and the guest
 * key), the drivers (virtio-win ISO, WinPE driver folder, OpenSSH zip), the
 * first-logon script, the scripts that write the install disk, and the
 * install-affecting VM settings. The guest provisioning scripts, the guest
 * settings, the VM's CPUs and memory are not in it.
 */
export function baseParts(c: StackConfig, L: VmLayout, fileHashes: Record<string, string>): Record<string, string> {
  const hash = (f: string) => {
    const h = fileHashes[f];
    if (h === undefined) throw new Error(`baseParts: no hash for ${f}`);
    return h;
  };
  const inject = c.image.format !== "iso" && c.image.answerFileInImage;
  return {
    sourceSha256: c.image.sha256,
    sourceFormat: c.image.format,
    ...(c.image.format === "iso" ? { diskGiB: String(c.vm.diskGiB) } : {}),
    answerFileSha256: RUNTIME.answerFile,
    answerFileInImage: String(inject),
    virtioSha256: c.image.virtioSha256,
    driverFolder: driverFolder(c),
    ...(c.image.openSshZip ? { openSshSha256: c.image.openSshZip.sha256 } : {}),
    firstLogon: hash(`provisioning/windows/${FIRSTLOGON_SCRIPT}`),
    prepareDisk: hash("provisioning/prepare-disk.sh"),
    ...(inject ? { injectAnswerFile: hash("provisioning/inject-answer-file.sh") } : {}),
    vmSettings: sha256Hex(installVmSettings(renderVmEnv(c, L, "build"))),
  };
}

/** The base key: baseParts as one line of JSON, its names sorted (base-image.sh hashes these bytes). */
export function baseKey(parts: Record<string, string>): string {
  return JSON.stringify(Object.fromEntries(Object.entries(parts).sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))));
}

/** The base's digest: SHA-256 of the base key with the answer file's SHA-256 in it (base-<digest>.qcow2). */
export function baseDigest(parts: Record<string, string>, answerFileSha256: string): string {
  return sha256Hex(resolveCommand(baseKey(parts), { answerFile: answerFileSha256 }));
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
