/**
 * windows-arm64-image: wires the components and exports the stack outputs.
 * The only place that creates top-level resources.
 */
import * as aws from "@pulumi/aws";
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
import { HOST_SCRIPTS, QemuHost } from "./components/qemuHost";
import { WindowsDisk } from "./components/windowsDisk";
import { WindowsVm } from "./components/windowsVm";
import { HOST_USER } from "./hostSetup";
import { fileSha256, sha256Hex } from "./paths";
import { PipelineContext } from "./pipeline/context";
import { guestProvisionCommand, guestSettings } from "./pipeline/guest";
import {
  AWS_LAYOUT,
  buildPlan,
  defaultArtifactUri,
  driverFolder,
  hostFiles,
  HostLayout,
  RuntimeName,
} from "./pipeline/plan";
import { LocalRunner, RemoteRunner, Runner } from "./pipeline/runner";
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
      tags,
    })
  : undefined;

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
    sshPort: 2222,
    accel: kvm ? "kvm" : "tcg",
  };
}

const layout = isAws ? AWS_LAYOUT : localLayout(config);
const fileHashes = Object.fromEntries(hostFiles().map((f) => [f, fileSha256(f)]));
const plan = buildPlan({ config, layout, fileHashes });

// The guest administrator's password: generated, a secret, never on a command line.
const guestPassword = new random.RandomPassword("guest-admin-password", {
  length: 24,
  special: true,
  overrideSpecial: "!#%*-_=+",
  minLower: 1,
  minUpper: 1,
  minNumeric: 1,
  minSpecial: 1,
});
const answerFile = pulumi.secret(
  pulumi.all([guestPassword.result, pipelinePublicKey, secrets.windowsProductKey]).apply(([pw, key, productKey]) =>
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
  pipelineKey: pipelinePublicKey.apply((k) => k.trim()),
  answerFile: pulumi.unsecret(answerFile.apply((x) => sha256Hex(x))),
  guestSettings: pulumi.unsecret(settingsJson.apply((x) => sha256Hex(x))),
};

// What the host stages depend on, bar the host itself: when it changes, a stopped host is started.
// (AWS-side stages such as the bake need no host; the scripts QemuHost itself runs on it do.)
const hostScripts = Object.values(HOST_SCRIPTS).map((f) => fileSha256(f));
const wakeKey = pulumi
  .all([plan.stages.filter((st) => st.site !== "aws").map((st) => st.digest), runtimeValues])
  .apply(([digests, values]) =>
    sha256Hex(JSON.stringify({ digests, values, hostScripts, operatorKeys: config.host.sshAuthorizedKeys })),
  );
const region = isAws ? aws.getRegionOutput().region : undefined;
// The AWS CLI (host-power.sh) uses the stack's region and profile.
const awsProfile = new pulumi.Config("aws").get("profile");
const awsCliEnv = region?.apply((r) => {
  const env: Record<string, string> = { AWS_REGION: r, AWS_DEFAULT_REGION: r };
  if (awsProfile) env.AWS_PROFILE = awsProfile;
  return env;
});

const host =
  bucket && awsCliEnv
    ? new QemuHost("qemu-host", {
        instanceType: config.host.instanceType,
        amiId: config.host.amiId,
        volumeGiB: config.host.volumeGiB,
        volumeIops: config.host.volumeIops,
        volumeThroughputMiBps: config.host.volumeThroughputMiBps,
        subnetId: config.host.subnetId,
        sshAllowedCidrs: config.host.sshAllowedCidrs,
        publicKeyOpenssh: pipelinePublicKey,
        privateKeyPem: pipelinePrivateKey,
        authorizedKeys: config.host.sshAuthorizedKeys,
        bucketArn: bucket.bucketArn,
        artifactPrefix: config.artifacts.prefix,
        sourceObjectUrls: [
          config.image.url,
          config.image.virtioUrl,
          ...(config.image.openSshZip ? [config.image.openSshZip.url] : []),
        ],
        wakeKey,
        awsCliEnv,
        requireAwsCli: !config.host.keepRunning,
        tags,
      })
    : undefined;

const runtime: { [K in RuntimeName]: pulumi.Input<string> } = {
  ...runtimeValues,
  hostId: host ? host.instanceId : "local",
};
const runner: Runner = host ? new RemoteRunner(layout, host.connection, runtime) : new LocalRunner(layout, runtime);
const ctx = new PipelineContext(runner, plan, host?.ready);

new HostFiles("host-files", { ctx, fileHashes });
new EfiFirmware("firmware", { ctx });
new WindowsDisk("windows-disk", { ctx });
new WindowsVm("build-vm", { ctx, answerFile, buildEnv: renderVmEnv(config, layout, "build") });
new GuestProvisioning("guest", {
  ctx,
  user: config.guest.adminUser,
  privateKey: pipelinePrivateKey,
  script: guestProvisionCommand(),
  parameters: settingsJson,
});
const publication = new ImagePublication("image", { ctx });
const bake =
  host && awsCliEnv
    ? new AmiBake("bake", {
        ctx,
        instanceId: host.instanceId,
        manifest: publication.manifest,
        imageEnv: renderVmEnv(config, layout, "image"),
        windowsVersion: config.image.windowsVersion,
        sourceImageUrl: config.image.url,
        stack,
        keepHostRunning: config.host.keepRunning,
        retainOnDelete: config.retainAmiOnDelete,
        wakeKey,
        awsCliEnv,
        hostWork: [host.operatorKeys],
        instanceType: config.host.instanceType,
        tags,
      })
    : undefined;

// ---- outputs (other stacks read these with a StackReference)

export const amiId = bake?.amiId;
export const amiName = bake?.amiName;
export const amiArn = bake?.ami.arn;
export const amiRegion = region;
export const imageUri = publication.imageUri;
export const imageSha256 = publication.imageSha256;
export const manifestUri = publication.manifestUri;
export const windowsVersion = config.image.windowsVersion;
export const target = config.target;
export const bucketName = bucket?.bucketName;
export const bucketArn = bucket?.bucketArn;
export const artifactPrefix = config.artifacts.prefix;
export const hostInstanceId = host?.instanceId;
export const hostInstanceType = isAws ? config.host.instanceType : undefined;
export const hostPublicIp = host?.publicIp;
export const hostPublicDns = host?.publicDns;
export const hostSshCommand = host ? pulumi.interpolate`ssh ${HOST_USER}@${host.publicIp}` : undefined;
/** VNC is bound to the host's loopback; this tunnels it to localhost:5903. */
export const vncTunnelCommand = host
  ? pulumi.interpolate`ssh -N -L 5903:127.0.0.1:5903 ${HOST_USER}@${host.publicIp}   # then open vnc://localhost:5903`
  : undefined;
export const pipelinePublicKeyOpenssh = pipelinePublicKey;
