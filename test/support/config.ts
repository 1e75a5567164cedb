import { RawConfig } from "../../infra/config";

/** The smallest aws-target config that validates (a VHDX source, no guest downloads): pure tests start from it. */
export const VALID_RAW: RawConfig = {
  sshAllowedCidrs: '["203.0.113.7/32"]',
  windowsImageUrl: "s3://media/win.vhdx",
  windowsImageSha256: "a".repeat(64),
  windowsVersion: "11-23h2",
  guestInstallBuildlet: "false",
  guestInstallLlvmMingw: "false",
  guestInstallVsBuildTools: "false",
};
