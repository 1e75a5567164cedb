/**
 * windows-arm64-image: wires the components and exports the stack outputs.
 * The only place that creates top-level resources.
 */
import * as pulumi from "@pulumi/pulumi";
import * as tls from "@pulumi/tls";
import { loadConfig } from "./config";
import { PROJECT } from "./configSchema";
import { ArtifactBucket } from "./components/artifactBucket";
import { QemuHost } from "./components/qemuHost";
import { HOST_USER } from "./hostSetup";

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

const host =
  isAws && bucket
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
        sourceObjectUrls: [config.image.url, config.image.virtioUrl],
        tags,
      })
    : undefined;

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
