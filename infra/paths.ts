import * as crypto from "crypto";
import * as fs from "fs";
import * as path from "path";

/** The repository root (infra/.. ), whatever the working directory. */
export const REPO_ROOT = path.resolve(__dirname, "..");

export function repoPath(...parts: string[]): string {
  return path.join(REPO_ROOT, ...parts);
}

export function sha256Hex(data: string | Buffer): string {
  return crypto.createHash("sha256").update(data).digest("hex");
}

/** SHA-256 of a file in the repository (by repo-relative path). */
export function fileSha256(relPath: string): string {
  return sha256Hex(fs.readFileSync(repoPath(relPath)));
}
