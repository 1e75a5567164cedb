// Regenerates Pulumi.yaml from infra/configSchema.ts:  npx ts-node --transpile-only scripts/gen-pulumi-yaml.ts > Pulumi.yaml
import * as yaml from "js-yaml";
import { projectConfigBlock } from "../infra/configSchema";
const doc = {
  name: "windows-arm64-image",
  runtime: { name: "nodejs", options: { typescript: true } },
  description:
    "Builds a Windows ARM64 VM image for CI builders on AWS Graviton bare metal: S3 artifacts, a KVM host, unattended Windows provisioning, a published image and a baked AMI.",

  config: projectConfigBlock(),
};
process.stdout.write(yaml.dump(doc, { lineWidth: 120, noRefs: true, quotingType: '"' }));
