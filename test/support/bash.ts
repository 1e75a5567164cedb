import { spawnSync } from "child_process";

/**
 * The words bash makes of each command line: a real bash parse, so quoting
 * mistakes show. Nothing runs: each line is expanded as the arguments of a
 * function that prints them, so pass single commands only (no `&&`, `;` or
 * `|` outside quotes: those would run what follows). One bash for all lines.
 */
export function bashWordsOf(cmds: string[]): string[][] {
  const script =
    'words() { printf "%s\\0" "$@"; }; while IFS= read -r -d "" cmd; do eval "words $cmd"; printf "\\1\\0"; done';
  // --norc: bash -c with a socket on stdin (node's pipes are socket pairs) and no SHLVL
  // in its environment reads ~/.bashrc as if sshd had started it: a second of CPU where that inits pyenv.
  const r = spawnSync("bash", ["--norc", "-c", script], {
    env: { PATH: process.env.PATH },
    input: cmds.map((c) => `${c}\0`).join(""),
    encoding: "utf8",
  });
  if (r.status !== 0) throw new Error(`bash could not parse the commands: ${r.stderr}`);
  const out: string[][] = [[]];
  for (const w of r.stdout.split("\0").slice(0, -1)) {
    if (w === "\u0001") out.push([]);
    else (out.at(-1) as string[]).push(w);
  }
  out.pop();
  if (out.length !== cmds.length) throw new Error(`bash parsed ${out.length} of ${cmds.length} commands: ${r.stderr}`);
  return out;
}

/** The words bash makes of one command line (see bashWordsOf). */
export function bashWords(cmd: string): string[] {
  return bashWordsOf([cmd])[0];
}
