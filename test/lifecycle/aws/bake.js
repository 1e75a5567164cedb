#!/usr/bin/env node
// `aws ec2 run-instances` for the stand-in: a "bake instance" whose root file
// system is a folder under $FAKE_AWS_DIR. It reads the gzip'd cloud-config user
// data (--user-data fileb://...), writes its write_files there, and runs the
// bake-image.sh command of its runcmd (paths moved under that root,
// BAKE_ROOT set, power-off = the instance stops) in the background; prints the
// instance id. The instance is "stopped" once bake-image.sh has exited.
"use strict";
const { spawn } = require("child_process");
const crypto = require("crypto");
const fs = require("fs");
const path = require("path");
const zlib = require("zlib");

const args = process.argv.slice(2);
const arg = (name) => {
  const i = args.indexOf(`--${name}`);
  return i >= 0 ? args[i + 1] : undefined;
};
const d = process.env.FAKE_AWS_DIR;
const ud = arg("user-data");
if (!ud || !ud.startsWith("fileb://")) {
  console.error("fake run-instances: --user-data fileb://FILE is required");
  process.exit(2);
}
const text = zlib.gunzipSync(fs.readFileSync(ud.slice("fileb://".length))).toString("utf8");
if (!text.startsWith("#cloud-config\n")) {
  console.error("fake run-instances: the user data is not a #cloud-config document");
  process.exit(2);
}
const doc = JSON.parse(text.slice("#cloud-config\n".length));
const id = `i-0${crypto.randomBytes(8).toString("hex")}`;
const inst = path.join(d, "instances", id);
const root = path.join(inst, "root");
fs.mkdirSync(root, { recursive: true });
fs.writeFileSync(path.join(inst, "state"), "running\n");
fs.writeFileSync(
  path.join(inst, "launch.json"),
  JSON.stringify({ args, userDataBytes: fs.statSync(ud.slice(8)).size }),
);
for (const f of doc.write_files) {
  const p = path.join(root, f.path);
  fs.mkdirSync(path.dirname(p), { recursive: true });
  fs.writeFileSync(p, f.content, { mode: parseInt(f.permissions, 8) });
}
const run = doc.runcmd.find((c) => c[0] === "systemd-run");
const env = { ...process.env, BAKE_ROOT: root, BAKE_POWEROFF_COMMAND: "true" };
const cmd = [];
for (const a of run.slice(1)) {
  if (a.startsWith("--setenv=")) {
    const [k, ...v] = a.slice("--setenv=".length).split("=");
    env[k] = v.join("=");
  } else if (!a.startsWith("--")) cmd.push(a.startsWith("/run/") ? path.join(root, a) : a);
}
const console_ = fs.openSync(path.join(inst, "console"), "a");
const child = spawn(
  "bash",
  ["-c", `"$@"; echo stopped > ${JSON.stringify(path.join(inst, "state"))}`, "bake", ...cmd],
  { env, detached: true, stdio: ["ignore", console_, console_] },
);
fs.writeFileSync(path.join(inst, "pid"), String(child.pid));
child.unref();
console.log(id);
