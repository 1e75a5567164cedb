/**
 * Pure decisions about the smoke test and the promotion of a baked AMI: the
 * SSM parameter's name, what provisioning/smoke-test.sh is given and what its
 * result line means, and what a smoke test costs. No Pulumi here.
 *
 * How it works: after each bake, smoke-test.sh (where Pulumi runs) boots the
 * new AMI on a metal instance of the host type, waits (bounded) until the VM
 * inside answers SSH on the instance's loopback forward and the guest check
 * passes there, then terminates the instance. Only a passed smoke test
 * updates the SSM parameter `/<project>/<stack>/<variant>/ami-id` (its value
 * is taken from the script's result line), so a failed one leaves the
 * previously promoted AMI in place.
 */

/** The variant name of a stack without `images`: its one image. */
export const DEFAULT_VARIANT = "default";

/** The repo files smoke-test.sh runs (it streams lib.sh and vm-screenshot.sh to the instance): its triggers hash them. */
export const SMOKE_TEST_FILES = Object.freeze([
  "provisioning/smoke-test.sh",
  "provisioning/lib.sh",
  "provisioning/ssh-key.sh",
  "provisioning/vm-screenshot.sh",
]);

/** Where smoke-test.sh saves the VM's screenshot of a failed smoke test (relative to the project, like localWorkDir). */
export const SMOKE_SCREENSHOT_DIR = ".work/smoke-test";

/** The instance's own login user (Ubuntu's default user; the smoke key is authorized for it by cloud-init). */
export const SMOKE_INSTANCE_USER = "ubuntu";

/**
 * What Pulumi allows beyond the script's own bound (smokeTestTimeoutMinutes):
 * the failure's diagnostics (screenshot 90 s, serial log 60 s), the wait for
 * the termination (300 s at most) and slack.
 */
export const SMOKE_EXTRA_MINUTES = 10;

/**
 * The SSM parameter consumers read the promoted AMI id from (in a launch
 * template: `resolve:ssm:<name>`). SSM names allow letters, digits and
 * `_.-/`; a stack or variant name outside that is refused here.
 */
export function promotedAmiParameterName(project: string, stack: string, variant: string): string {
  for (const [what, v] of [
    ["project", project],
    ["stack", stack],
    ["variant", variant],
  ] as const) {
    if (!/^[A-Za-z0-9_.-]+$/.test(v))
      throw new Error(
        `the ${what} name ${JSON.stringify(v)} cannot be part of an SSM parameter name (letters, digits, _ . - only)`,
      );
  }
  const name = `/${project}/${stack}/${variant}/ami-id`;
  if (name.length > 1011)
    throw new Error(`the SSM parameter name ${name.slice(0, 60)}... is longer than 1011 characters`);
  return name;
}

export interface SmokeResult {
  amiId: string;
  instanceId: string;
}

/**
 * smoke-test.sh's result line (the last line of its stdout):
 * {"amiId":"ami-...","instanceId":"i-...","guest":"127.0.0.1:2222","passedAt":"..."}.
 * Throws unless it is there and names `expectedAmiId`: a promotion never
 * takes an AMI id that did not pass.
 */
export function parseSmokeResult(stdout: string, expectedAmiId: string): SmokeResult {
  const line = stdout.trim().split("\n").filter(Boolean).pop() ?? "";
  let r: { amiId?: unknown; instanceId?: unknown };
  try {
    r = JSON.parse(line) as { amiId?: unknown; instanceId?: unknown };
  } catch {
    throw new Error(`smoke-test.sh did not print its result (last line: ${JSON.stringify(line.slice(0, 200))})`);
  }
  if (typeof r.amiId !== "string" || !/^ami-[0-9a-f]{8,17}$/.test(r.amiId))
    throw new Error(`smoke-test.sh printed no AMI id (${JSON.stringify(line.slice(0, 200))})`);
  if (r.amiId !== expectedAmiId)
    throw new Error(`smoke-test.sh tested ${r.amiId}, not the baked AMI ${expectedAmiId}: nothing is promoted`);
  if (typeof r.instanceId !== "string" || !/^i-[0-9a-f]{8,17}$/.test(r.instanceId))
    throw new Error(`smoke-test.sh printed no instance id (${JSON.stringify(line.slice(0, 200))})`);
  return { amiId: r.amiId, instanceId: r.instanceId };
}

/**
 * The most a smoke test costs on paper: the metal instance's on-demand
 * hourly price for the whole bound plus the extra minutes (EC2 bills Linux
 * per second, one minute at least), in USD, rounded up to the cent.
 */
export function smokeTestCostUsd(hourlyUsd: number, timeoutMinutes: number): number {
  const minutes = Math.max(1, timeoutMinutes + SMOKE_EXTRA_MINUTES);
  return Math.ceil(((hourlyUsd * minutes) / 60) * 100 - 1e-9) / 100;
}
