import * as aws from "@pulumi/aws";
import * as pulumi from "@pulumi/pulumi";

export interface ArtifactBucketArgs {
  /** Use this existing bucket instead of creating one (nothing is created then). */
  existingBucketName?: string;
  /** Key prefix the pipeline writes under, ending with "/". */
  prefix: string;
  /** Days before a noncurrent object version expires. */
  noncurrentDays: number;
  /** The image matrix's prefixes (`<prefix><name>/`): each gets its own staging rule. */
  variantPrefixes?: readonly string[];
  tags: Record<string, string>;
}

/** Days before an abandoned multipart upload or a staging object is removed. */
export const ABANDONED_UPLOAD_DAYS = 2;

/**
 * The S3 bucket the published images live in: private, encrypted, versioned,
 * TLS-only, with lifecycle rules so old versions and abandoned uploads do not
 * pile up. With `existingBucketName` it only looks that bucket up.
 */
export class ArtifactBucket extends pulumi.ComponentResource {
  readonly bucketName: pulumi.Output<string>;
  readonly bucketArn: pulumi.Output<string>;
  readonly prefix: string;
  /** False when an existing bucket is used. */
  readonly created: boolean;

  constructor(name: string, args: ArtifactBucketArgs, opts?: pulumi.ComponentResourceOptions) {
    super("windows-arm64-image:storage:ArtifactBucket", name, {}, opts);
    this.prefix = args.prefix;

    if (args.existingBucketName !== undefined) {
      const existing = aws.s3.getBucketOutput({ bucket: args.existingBucketName }, { parent: this });
      this.bucketName = existing.bucket;
      this.bucketArn = existing.arn;
      this.created = false;
      this.registerOutputs({ bucketName: this.bucketName, bucketArn: this.bucketArn });
      return;
    }
    this.created = true;

    const bucket = new aws.s3.Bucket(name, { forceDestroy: false, tags: args.tags }, { parent: this });
    const child = { parent: this };

    new aws.s3.BucketOwnershipControls(
      `${name}-ownership`,
      { bucket: bucket.id, rule: { objectOwnership: "BucketOwnerEnforced" } },
      child,
    );
    const publicAccess = new aws.s3.BucketPublicAccessBlock(
      `${name}-public-access`,
      {
        bucket: bucket.id,
        blockPublicAcls: true,
        blockPublicPolicy: true,
        ignorePublicAcls: true,
        restrictPublicBuckets: true,
      },
      child,
    );
    new aws.s3.BucketVersioning(
      `${name}-versioning`,
      { bucket: bucket.id, versioningConfiguration: { status: "Enabled" } },
      child,
    );
    new aws.s3.BucketServerSideEncryptionConfiguration(
      `${name}-encryption`,
      {
        bucket: bucket.id,
        rules: [{ applyServerSideEncryptionByDefault: { sseAlgorithm: "AES256" }, bucketKeyEnabled: true }],
      },
      child,
    );
    new aws.s3.BucketPolicy(
      `${name}-tls-only`,
      { bucket: bucket.id, policy: bucket.arn.apply((arn) => JSON.stringify(denyInsecureTransportPolicy(arn))) },
      { parent: this, dependsOn: [publicAccess] },
    );
    new aws.s3.BucketLifecycleConfiguration(
      `${name}-lifecycle`,
      { bucket: bucket.id, rules: lifecycleRules(args.prefix, args.noncurrentDays, args.variantPrefixes) },
      child,
    );

    this.bucketName = bucket.bucket;
    this.bucketArn = bucket.arn;
    this.registerOutputs({ bucketName: this.bucketName, bucketArn: this.bucketArn });
  }
}

/** A bucket policy that refuses every request not made over TLS. */
export function denyInsecureTransportPolicy(bucketArn: string) {
  return {
    Version: "2012-10-17",
    Statement: [
      {
        Sid: "DenyInsecureTransport",
        Effect: "Deny",
        Principal: "*",
        Action: "s3:*",
        Resource: [bucketArn, `${bucketArn}/*`],
        Condition: { Bool: { "aws:SecureTransport": "false" } },
      },
    ],
  };
}

export function lifecycleRules(prefix: string, noncurrentDays: number, variantPrefixes: readonly string[] = []) {
  return [
    {
      id: "expire-noncurrent-versions",
      status: "Enabled",
      filter: {},
      noncurrentVersionExpiration: { noncurrentDays },
    },
    {
      id: "abort-incomplete-multipart-uploads",
      status: "Enabled",
      filter: {},
      abortIncompleteMultipartUpload: { daysAfterInitiation: ABANDONED_UPLOAD_DAYS },
    },
    {
      id: "expire-abandoned-staging",
      status: "Enabled",
      filter: { prefix: `${prefix}staging/` },
      expiration: { days: ABANDONED_UPLOAD_DAYS },
    },
    // Each variant of the image matrix publishes under its own prefix, with its own staging.
    ...variantPrefixes.map((p) => ({
      id: `expire-abandoned-staging-${p.slice(prefix.length, -1)}`,
      status: "Enabled",
      filter: { prefix: `${p}staging/` },
      expiration: { days: ABANDONED_UPLOAD_DAYS },
    })),
  ];
}
