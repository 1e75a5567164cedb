/**
 * The CrossGuard policy pack of this stack. `pulumi preview --policy-pack policy`
 * (or `pulumi up --policy-pack policy`) runs it; the policies themselves live in
 * policies.ts, where tests reach them without starting the pack's server.
 */
import { PolicyPack } from "@pulumi/policy";
import { policies } from "./policies";

new PolicyPack("windows-arm64-image-invariants", {
  description:
    "windows-arm64-image invariants: IMDSv2, encrypted EBS volumes, no SSH from anywhere, private encrypted " +
    "versioned TLS-only S3 buckets, no wildcard IAM actions or resources, retained AMIs.",
  enforcementLevel: "mandatory",
  policies,
});
