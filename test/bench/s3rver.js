// Runs s3rver for test/bench/bench.sh in its own process, so its memory is not
// counted with the scripts being measured.
// Usage: node test/bench/s3rver.js PORT DIRECTORY BUCKET
"use strict";
const path = require("path");
const S3rver = require(path.join(__dirname, "..", "..", "node_modules", "s3rver"));

const [port, directory, bucket] = process.argv.slice(2);
const server = new S3rver({
  port: Number(port),
  address: "127.0.0.1",
  silent: true,
  directory,
  configureBuckets: [{ name: bucket }],
});
server.run().then(
  () => console.log(`s3rver listening on 127.0.0.1:${port}`),
  (err) => {
    console.error(err);
    process.exit(1);
  },
);
const stop = () => server.close().then(() => process.exit(0));
process.on("SIGTERM", stop);
process.on("SIGINT", stop);
