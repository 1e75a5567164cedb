import { expect } from "chai";
import * as fs from "fs";
import * as yaml from "js-yaml";
import * as path from "path";
import { Machine, parseConfig, RawConfig, validateConfig } from "../../infra/config";
import { CONFIG_KEYS, projectConfigBlock } from "../../infra/configSchema";

const root = path.resolve(__dirname, "..", "..");
/** The example stacks are for other machines: check the local one against a typical workstation, not this one. */
const WORKSTATION: Machine = { cpus: 8, memoryGiB: 32, cwd: root };
const load = (f: string) => yaml.load(fs.readFileSync(path.join(root, f), "utf8")) as Record<string, any>;

/** A stack file's project keys, as the strings Pulumi hands the program. */
function stackRaw(file: string): RawConfig {
  const raw: RawConfig = {};
  for (const [k, v] of Object.entries(load(file).config as Record<string, unknown>)) {
    if (!k.startsWith("windows-arm64-image:")) continue;
    raw[k.slice("windows-arm64-image:".length)] = typeof v === "string" ? v : JSON.stringify(v);
  }
  return raw;
}

describe("project files", () => {
  it("Pulumi.yaml declares the project, the Node.js runtime and every config key from the schema", () => {
    const doc = load("Pulumi.yaml");
    expect(doc.name).to.equal("windows-arm64-image");
    expect(doc.runtime.name).to.equal("nodejs");
    expect(doc.config).to.deep.equal(projectConfigBlock());
    for (const k of CONFIG_KEYS) {
      expect(doc.config[k.key].description, k.key).to.be.a("string").and.not.equal("");
      expect(doc.config[k.key], k.key).to.have.property("default");
    }
  });

  it("README's configuration table has a row for every config key, with the schema's description", () => {
    const readme = fs.readFileSync(path.join(root, "README.md"), "utf8");
    for (const k of CONFIG_KEYS) {
      const row = readme.split("\n").find((l) => l.startsWith(`| \`${k.key}\` |`));
      expect(row, `README row for ${k.key}`).to.be.a("string");
      expect(row, k.key).to.contain(k.description.replace(/\n/g, " "));
    }
  });

  it("package.json points Pulumi at infra/index.ts", () => {
    expect(JSON.parse(fs.readFileSync(path.join(root, "package.json"), "utf8")).main).to.equal("infra/index.ts");
  });

  const stacks = fs.readdirSync(root).filter((f) => /^Pulumi\.[^.]+\.yaml$/.test(f));
  it("has the example stacks", () => {
    expect(stacks).to.include.members(["Pulumi.dev.yaml", "Pulumi.local.yaml", "Pulumi.win11-c7g.yaml"]);
  });
  for (const f of stacks) {
    it(`${f} is a valid stack, without warnings`, () => {
      const { problems, warnings } = validateConfig(stackRaw(f), new Set(), WORKSTATION);
      expect(problems, JSON.stringify(problems)).to.deep.equal([]);
      expect(warnings, JSON.stringify(warnings)).to.deep.equal([]);
    });
  }

  for (const f of ["Pulumi.dev.yaml", "Pulumi.local.yaml"]) {
    it(`${f} builds Windows 11 23H2`, () => {
      expect(parseConfig(stackRaw(f), new Set(), WORKSTATION).image.windowsVersion).to.equal("11-23h2");
    });
  }

  it("Pulumi.win11-c7g.yaml installs Microsoft's public 24H2 ISO on a Graviton3 host", () => {
    const c = parseConfig(stackRaw("Pulumi.win11-c7g.yaml"));
    expect(c.image).to.include({ format: "iso", windowsVersion: "11-24h2" });
    expect(c.host.instanceType).to.equal("c7g.metal");
    expect(c.host.type).to.include({ generation: 3, lseAtomics: true });
    expect(c.vm.cpus).to.be.greaterThan(4);
    expect(c.bake.instanceType).to.equal("c7g.large");
  });

  it("Pulumi.dev.yaml targets us-east-2 on a1.metal", () => {
    expect(load("Pulumi.dev.yaml").config["aws:region"]).to.equal("us-east-2");
    expect(parseConfig(stackRaw("Pulumi.dev.yaml")).host.instanceType).to.equal("a1.metal");
  });
});
