/**
 * windows-arm64-image: wires the components and exports the stack outputs.
 * The only place that creates top-level resources.
 */
import * as aws from "@pulumi/aws";
import * as command from "@pulumi/command";
import * as pulumi from "@pulumi/pulumi";
import * as random from "@pulumi/random";
import * as tls from "@pulumi/tls";
import * as fs from "fs";
import * as os from "os";
import * as path from "path";
import { DEFAULT_CONFIG_MEDIA_LABEL, DEFAULT_DRIVER_NAMES, renderAnswerFile } from "./answerFile";
import { StackConfig, loadConfig } from "./config";
import { PROJECT } from "./configSchema";
import { AmiBake } from "./components/amiBake";
import { ArtifactBucket } from "./components/artifactBucket";
import { EfiFirmware } from "./components/efiFirmware";
import { GuestProvisioning } from "./components/guestProvisioning";
import { HostFiles } from "./components/hostFiles";
import { ImagePublication } from "./components/imagePublication";
import { QemuHost } from "./components/qemuHost";
import { SmokeTest } from "./components/smokeTest";
import { WindowsDisk } from "./components/windowsDisk";
import { WindowsVm } from "./components/windowsVm";
import { HOST_USER } from "./hostSetup";
import { fileSha256, sha256Hex } from "./paths";
import { PipelineContext } from "./pipeline/context";
import { guestSettings, guestSmokeCheckCommand } from "./pipeline/guest";
import { DEFAULT_VARIANT, promotedAmiParameterName } from "./smokeTest";
import {
  AWS_LAYOUT,
  buildPlan,
  defaultArtifactUri,
  driverFolder,
  HostLayout,
  planFiles,
  RuntimeName,
} from "./pipeline/plan";
import { awsCommand, filesDigest, IGNORED_INPUTS, LocalRunner, Runner, SshRunner } from "./pipeline/runner";
import { renderVmEnv } from "./pipeline/vmEnv";

const { config, secrets } = loadConfig();
const stack = pulumi.getStack();
const tags: Record<string, string> = {
  ...config.tags,
  Project: PROJECT,
  Stack: stack,
  ManagedBy: "pulumi",
};

// The pipeline's own SSH key: given (a secret) or generated and kept as a secret.
let pipelinePrivateKey: pulumi.Output<string>;
let pipelinePublicKey: pulumi.Output<string>;
if (secrets.sshPrivateKey) {
  pipelinePrivateKey = pulumi.secret(secrets.sshPrivateKey);
  // The public half is not secret: unwrap it so the key pair and outputs stay readable.
  pipelinePublicKey = pulumi.unsecret(
    tls.getPublicKeyOutput({ privateKeyOpenssh: secrets.sshPrivateKey }).publicKeyOpenssh,
  );
} else {
  const key = new tls.PrivateKey("pipeline-key", { algorithm: "ED25519" });
  pipelinePrivateKey = pulumi.secret(key.privateKeyOpenssh);
  pipelinePublicKey = key.publicKeyOpenssh;
}

const isAws = config.target === "aws";

const bucket = isAws
  ? new ArtifactBucket("artifacts", {
      existingBucketName: config.artifacts.bucketName,
      prefix: config.artifacts.prefix,
      noncurrentDays: config.artifacts.noncurrentDays,
      variantPrefixes: config.images?.map((v) => v.config.artifacts.prefix),
      tags,
    })
  : undefined;

const region = isAws ? aws.getRegionOutput().region : undefined;
// The AWS CLI where Pulumi runs (host-power.sh, bake-instance.sh) uses the stack's region and profile.
const awsProfile = new pulumi.Config("aws").get("profile");
const awsCliEnv = region?.apply((r) => {
  const env: Record<string, string> = { AWS_REGION: r, AWS_DEFAULT_REGION: r };
  if (awsProfile) env.AWS_PROFILE = awsProfile;
  return env;
});
const fileHashes = Object.fromEntries(planFiles().map((f) => [f, fileSha256(f)]));

// ---- the image pipeline

/** Paths on this machine for the local target; KVM only on an arm64 Linux host with /dev/kvm. */
function localLayout(c: StackConfig): HostLayout {
  const home = path.resolve(c.localWorkDir);
  const kvm = os.arch() === "arm64" && fs.existsSync("/dev/kvm");
  if (!kvm) {
    pulumi.log.warn(
      "local target: no KVM on this machine (it needs an arm64 Linux host with /dev/kvm), so the VM runs under TCG emulation; Windows will be very slow.",
    );
  }
  return {
    home,
    vmDir: path.join(home, "vm"),
    sudo: "",
    imageRoot: path.join(home, "image-root"),
    buildUnit: "windows-vm-build-local",
    stageRunDir: path.join(home, "run", "stages"),
    stageStateDir: path.join(home, "state"),
    sshPort: 2222,
    accel: kvm ? "kvm" : "tcg",
  };
}

/** What one image's pipeline gives the outputs. */
interface ImageBuild {
  host?: QemuHost;
  publication: ImagePublication;
  bake?: AmiBake;
  /** The AMI the smoke test promoted, once a smoke test is wired in (else undefined). */
  promotedAmiId?: pulumi.Output<string>;
}

/**
 * One image's whole pipeline: its host, stages, publication and bake. `variant` is the name of an
 * `images` entry, which prefixes every resource name (a stack without images passes none, so its
 * names are unchanged); `config` is that variant's (or the stack's) config.
 */
function buildImage(variant: string | undefined, config: StackConfig): ImageBuild {
  const named = (name: string) => (variant ? `${variant}-${name}` : name);
  const layout = isAws ? AWS_LAYOUT : localLayout(config);
  const plan = buildPlan({ config, layout, fileHashes });

  // The guest administrator's password: generated, a secret, never on a command line.
  const guestPassword = new random.RandomPassword(named("guest-admin-password"), {
    length: 24,
    special: true,
    overrideSpecial: "!#%*-_=+",
    minLower: 1,
    minUpper: 1,
    minNumeric: 1,
    minSpecial: 1,
  });
  // The guest's own key: the guest authorizes only it; its private half reaches the host on stdin.
  const guestKey = new tls.PrivateKey(named("guest-key"), { algorithm: "ED25519" });
  const guestPublicKey = guestKey.publicKeyOpenssh.apply((k) => k.trim());
  const answerFile = pulumi.secret(
    pulumi.all([guestPassword.result, guestPublicKey, secrets.windowsProductKey]).apply(([pw, key, productKey]) =>
      renderAnswerFile({
        sourceKind: config.image.format,
        adminUser: config.guest.adminUser,
        adminPassword: pw,
        locale: config.guest.locale,
        timeZone: config.guest.timeZone,
        windowsEdition: config.image.format === "iso" ? config.guest.edition : undefined,
        productKey: productKey || undefined,
        keepAutoLogon: config.guest.autoLogon,
        authorizedKey: key.trim(),
        driverFolder: driverFolder(config),
        driverNames: [...DEFAULT_DRIVER_NAMES],
        configMediaLabel: DEFAULT_CONFIG_MEDIA_LABEL,
      }),
    ),
  );
  const settingsJson = pulumi.secret(guestPassword.result.apply((pw) => JSON.stringify(guestSettings(config, pw))));
  // Hashes of secrets are safe to show and keep `pulumi preview` readable.
  const runtimeValues: { [K in Exclude<RuntimeName, "hostId">]: pulumi.Input<string> } = {
    artifactUri: bucket
      ? pulumi.interpolate`s3://${bucket.bucketName}/${config.artifacts.prefix}`
      : (config.artifacts.uri ?? defaultArtifactUri(layout)),
    guestKey: guestPublicKey,
    answerFile: pulumi.unsecret(answerFile.apply((x) => sha256Hex(x))),
    guestSettings: pulumi.unsecret(settingsJson.apply((x) => sha256Hex(x))),
  };

  const host =
    bucket && region
      ? new QemuHost(named("qemu-host"), {
          instanceType: config.host.instanceType,
          amiId: config.host.amiId,
          volumeGiB: config.host.volumeGiB,
          volumeIops: config.host.volumeIops,
          volumeThroughputMiBps: config.host.volumeThroughputMiBps,
          subnetId: config.host.subnetId,
          sshAllowedCidrs: config.host.sshAllowedCidrs,
          publicKeyOpenssh: pipelinePublicKey,
          bucketArn: bucket.bucketArn,
          artifactPrefix: config.artifacts.prefix,
          sourceObjectUrls: [
            config.image.url,
            config.image.virtioUrl,
            ...(config.image.openSshZip ? [config.image.openSshZip.url] : []),
          ],
          tags,
        })
      : undefined;

  const runtime: { [K in RuntimeName]: pulumi.Input<string> } = {
    ...runtimeValues,
    hostId: host ? host.instanceId : "local",
  };
  const runner: Runner =
    host && region
      ? new SshRunner(
          layout,
          {
            address: host.publicIp,
            user: HOST_USER,
            instanceId: host.instanceId,
            privateKey: pipelinePrivateKey,
            region,
            profile: awsProfile,
          },
          runtime,
        )
      : new LocalRunner(layout, runtime);
  const ctx = new PipelineContext(runner, plan, host?.ready);

  const hostSetup = new HostFiles(named("host-files"), {
    ctx,
    fileHashes,
    operatorKeys: host ? config.host.sshAuthorizedKeys : undefined,
  });
  new EfiFirmware(named("firmware"), { ctx });
  new WindowsDisk(named("windows-disk"), { ctx, answerFile });
  new WindowsVm(named("build-vm"), { ctx, answerFile, buildEnv: renderVmEnv(config, layout, "build") });
  new GuestProvisioning(named("guest"), {
    ctx,
    guestPrivateKey: pulumi.secret(guestKey.privateKeyOpenssh),
    parameters: settingsJson,
  });
  const publication = new ImagePublication(named("image"), { ctx });

  // After a run with work for the host, it is stopped at once (a failed run leaves that to the
  // host's idle guard). The trigger moves with any input of any host stage, so a no-change run
  // stops nothing, and a run that failed before this point stops the host when it is retried.
  if (host && awsCliEnv && !config.host.keepRunning) {
    const stop = plan.stage("stopHost");
    const hostStages = plan.stages.filter((st) => st.site === "host");
    const wakeKey = pulumi.all([hostStages.map((st) => st.digest), runtimeValues]).apply(([digests, values]) =>
      sha256Hex(
        JSON.stringify({
          digests,
          values,
          files: filesDigest(plan.stage("uploadFiles").files, fileHashes),
          operatorKeys: config.host.sshAuthorizedKeys,
        }),
      ),
    );
    ctx.record(
      "stopHost",
      new command.local.Command(
        named("stop-host"),
        {
          create: pulumi.interpolate`${awsCommand("exec bash provisioning/host-power.sh stop")} ${host.instanceId}`,
          environment: awsCliEnv.apply((env) => ({ AWS_PROFILE: "", ...env })),
          triggers: [host.instanceId, wakeKey],
          logging: "stdoutAndStderr",
          interpreter: ["/bin/bash", "-c"],
          addPreviousOutputInEnv: false,
        },
        {
          dependsOn: [...ctx.all(), ...hostSetup.extra],
          customTimeouts: { create: `${stop.timeoutMinutes}m`, update: `${stop.timeoutMinutes}m` },
          ignoreChanges: IGNORED_INPUTS,
        },
      ),
    );
  }

  const bake =
    host && bucket && awsCliEnv
      ? new AmiBake(named("bake"), {
          variant,
          ctx,
          manifest: publication.manifest,
          manifestJson: publication.manifestJson,
          imageEnv: renderVmEnv(config, layout, "image"),
          bucketArn: bucket.bucketArn,
          bucketName: bucket.bucketName,
          artifactPrefix: config.artifacts.prefix,
          artifactUri: runtimeValues.artifactUri,
          amiId: host.amiId,
          subnetId: config.host.subnetId,
          vpcId: host.vpcId,
          instanceType: config.bake.instanceType,
          volumeGiB: config.bake.volumeGiB,
          windowsVersion: config.image.windowsVersion,
          sourceImageUrl: config.image.url,
          stack,
          retainOnDelete: config.retainAmiOnDelete,
          awsEnv: awsCliEnv,
          tags,
        })
      : undefined;

  // The baked AMI is promoted (SSM parameter) only once it passed its smoke test (or right away with smokeTest: false).
  const smoke =
    host && bake && awsCliEnv
      ? new SmokeTest(named("smoke-test"), {
          amiId: bake.amiId,
          enabled: config.smokeTest.enabled,
          parameterName: promotedAmiParameterName(PROJECT, stack, variant ?? DEFAULT_VARIANT),
          instanceType: config.host.instanceType,
          subnetId: host.instance.subnetId,
          vpcId: host.vpcId,
          sshAllowedCidrs: config.host.sshAllowedCidrs,
          guestUser: config.guest.adminUser,
          guestPrivateKey: pulumi.secret(guestKey.privateKeyOpenssh),
          guestCommand: guestSmokeCheckCommand(),
          guestSettings: settingsJson,
          guestPort: layout.sshPort,
          vmDir: layout.vmDir,
          timeoutMinutes: config.smokeTest.timeoutMinutes,
          awsEnv: awsCliEnv,
          tags,
        })
      : undefined;

  return { host, publication, bake, promotedAmiId: smoke?.promotedAmiId };
}

/** Every image: the variants of `images`, built in parallel (a host each), or the stack's one image. */
const builds = (config.images ?? [{ name: undefined, config }]).map((v) => ({
  name: v.name,
  windowsVersion: v.config.image.windowsVersion,
  ...buildImage(v.name, v.config),
}));
/** The stack's single image (no images), whose outputs are the stack's top-level ones. */
const single = config.images ? undefined : builds[0];
const host = single?.host;
const publication = single?.publication;
const bake = single?.bake;

// ---- outputs (other stacks read these with a StackReference)

export const amiId = bake?.amiId;
export const amiName = bake?.amiName;
export const amiArn = bake?.ami.arn;
export const amiRegion = region;
/** The AMI the smoke test promoted (also in the SSM parameter promotedAmiParameter names). */
export const promotedAmiId = single?.promotedAmiId;
export const promotedAmiParameter =
  single?.promotedAmiId !== undefined ? promotedAmiParameterName(PROJECT, stack, DEFAULT_VARIANT) : undefined;
export const imageUri = publication?.imageUri;
export const imageSha256 = publication?.imageSha256;
export const manifestUri = publication?.manifestUri;
export const windowsVersion = single ? config.image.windowsVersion : undefined;
export const target = config.target;
export const bucketName = bucket?.bucketName;
export const bucketArn = bucket?.bucketArn;
export const artifactPrefix = config.artifacts.prefix;
export const hostInstanceId = host?.instanceId;
export const hostInstanceType = isAws && single ? config.host.instanceType : undefined;
export const hostPublicIp = host?.publicIp;
export const hostPublicDns = host?.publicDns;
export const hostSshCommand = host ? pulumi.interpolate`ssh ${HOST_USER}@${host.publicIp}` : undefined;
/** VNC is bound to the host's loopback; this tunnels it to localhost:5903. */
export const bakeInstanceType = isAws ? config.bake.instanceType : undefined;
export const vncTunnelCommand = host
  ? pulumi.interpolate`ssh -N -L 5903:127.0.0.1:5903 ${HOST_USER}@${host.publicIp}   # then open vnc://localhost:5903`
  : undefined;
export const pipelinePublicKeyOpenssh = pipelinePublicKey;
/** With images: each variant's image and AMI, by name (see README, Image matrix). */
export const images = config.images
  ? pulumi.output(
      Object.fromEntries(
        builds.map((b) => [
          b.name as string,
          {
            amiId: b.bake?.amiId,
            imageUri: b.publication.imageUri,
            imageSha256: b.publication.imageSha256,
            manifestUri: b.publication.manifestUri,
            windowsVersion: b.windowsVersion,
            promotedAmiId: b.promotedAmiId,
          },
        ]),
      ),
    )
  : undefined;
