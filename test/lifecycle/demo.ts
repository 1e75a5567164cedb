/**
 * npm run demo: the whole pipeline once, end to end, on this machine: the
 * real program (infra/index.ts) under the lifecycle test's engine stand-in,
 * the local target, the stand-in aarch64 guest under QEMU/TCG playing
 * Windows, publishing to a folder under .work/demo/. Prints the stage table
 * and the published manifest. No AWS, no Pulumi CLI, no Windows image.
 */
import * as fs from "fs";
import * as path from "path";
import { fileURLToPath } from "url";
import { repoRoot } from "../support/run";
import { makeWorld, stopWorldVm, table } from "./world";

async function main(): Promise<void> {
  const dir = path.join(repoRoot, ".work", "demo");
  console.log(`demo: building the stand-in guest if needed, then one pulumi up of the local target in ${dir}`);
  const world = await makeWorld(dir, { verbose: true });
  fs.rmSync(world.home, { recursive: true, force: true });
  const result = await world.engine.up(world.config());
  await stopWorldVm(world);
  console.log("\n" + table([{ scenario: "demo: first build (local target)", result }]));
  console.log("\nStages (seconds):");
  for (const e of result.executed)
    console.log(`  ${e.ok ? "ok  " : "FAIL"} ${e.name.padEnd(28)} ${e.seconds.toFixed(1)}`);
  if (!result.ok) {
    console.error(`\ndemo: the run failed:\n${result.errors.join("\n---\n")}`);
    process.exit(1);
  }
  const manifestUri = String(result.outputs.manifestUri);
  console.log(`\nPublished manifest (${manifestUri}):`);
  console.log(JSON.stringify(JSON.parse(fs.readFileSync(fileURLToPath(manifestUri), "utf8")), null, 2));
  console.log(`\ndemo: done; the image is under ${path.dirname(fileURLToPath(manifestUri))}`);
}

main().catch((e: unknown) => {
  console.error(e);
  process.exit(1);
});
