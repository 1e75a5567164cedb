import { expect } from "chai";
import { XMLParser } from "fast-xml-parser";
import {
  AnswerFileInput,
  DEFAULT_DRIVER_NAMES,
  MAX_COMMAND_LINE,
  PNPUTIL_TIMEOUT_S,
  genericInstallKey,
  encodeUnattendPassword,
  firstLogonCommands,
  renderAnswerFile,
  validateAnswerFileInput,
} from "../../infra/answerFile";

const PASSWORD = "Zq9!pw<&>\"'-unique-7731";
const KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHc1c2VkLWZvci10ZXN0cy1vbmx5LW5vdC1hLWtleQ pipeline@test";

function input(overrides: Partial<AnswerFileInput> = {}): AnswerFileInput {
  return {
    sourceKind: "vhdx",
    adminUser: "gopher",
    adminPassword: PASSWORD,
    locale: "en-US",
    timeZone: "UTC",
    computerName: "WINARM64",
    authorizedKey: KEY,
    driverFolder: "w11",
    driverNames: [...DEFAULT_DRIVER_NAMES],
    configMediaLabel: "WINCONFIG",
    ...overrides,
  };
}

type Node = Record<string, any>;

const parser = new XMLParser({
  ignoreAttributes: false,
  attributeNamePrefix: "@_",
  parseTagValue: false,
  parseAttributeValue: false,
  trimValues: false,
  isArray: (name) =>
    [
      "settings",
      "component",
      "SynchronousCommand",
      "CreatePartition",
      "ModifyPartition",
      "RunSynchronousCommand",
      "LocalAccount",
      "MetaData",
      "Disk",
    ].includes(name),
});

function parse(xml: string): Node {
  const doc = parser.parse(xml) as Node;
  expect(doc, "root element").to.have.property("unattend");
  return doc.unattend as Node;
}

function passes(root: Node): string[] {
  return (root.settings as Node[]).map((s) => s["@_pass"] as string);
}

function comp(root: Node, pass: string, name: string): Node {
  const settings = (root.settings as Node[]).find((s) => s["@_pass"] === pass);
  expect(settings, `settings pass ${pass}`).to.not.equal(undefined);
  const c = (settings!.component as Node[]).find((x) => x["@_name"] === name);
  expect(c, `component ${name} in ${pass}`).to.not.equal(undefined);
  return c!;
}

function allComponents(root: Node): Node[] {
  return (root.settings as Node[]).flatMap((s) => s.component as Node[]);
}

function decode(value: string): string {
  return Buffer.from(value, "base64").toString("utf16le");
}

describe("answerFile", () => {
  describe("encodeUnattendPassword", () => {
    it("is base64 of UTF-16LE(password + suffix)", () => {
      // "pw" + "Password" in UTF-16LE, base64: computed independently of the module.
      expect(encodeUnattendPassword("pw")).to.equal("cAB3AFAAYQBzAHMAdwBvAHIAZAA=");
      expect(decode(encodeUnattendPassword("pw", "AdministratorPassword"))).to.equal("pwAdministratorPassword");
      expect(decode(encodeUnattendPassword("pä€"))).to.equal("pä€Password");
    });
  });

  describe("vhdx source", () => {
    const xml = renderAnswerFile(input());
    const root = parse(xml);

    it("declares the unattend namespace and has specialize + oobeSystem, no windowsPE", () => {
      expect(root["@_xmlns"]).to.equal("urn:schemas-microsoft-com:unattend");
      expect(passes(root)).to.deep.equal(["specialize", "oobeSystem"]);
      expect(xml).to.not.contain("windowsPE");
      expect(xml).to.not.contain("LabConfig");
    });

    it("gives every component the arm64 identity and the wcm namespace", () => {
      const comps = allComponents(root);
      expect(comps.length).to.be.greaterThan(3);
      for (const c of comps) {
        expect(c["@_processorArchitecture"], c["@_name"]).to.equal("arm64");
        expect(c["@_publicKeyToken"]).to.equal("31bf3856ad364e35");
        expect(c["@_language"]).to.equal("neutral");
        expect(c["@_versionScope"]).to.equal("nonSxS");
        expect(c["@_xmlns:wcm"]).to.equal("http://schemas.microsoft.com/WMIConfig/2002/State");
      }
    });

    it("sets computer name, time zone and locales", () => {
      const shell = comp(root, "specialize", "Microsoft-Windows-Shell-Setup");
      expect(shell.ComputerName).to.equal("WINARM64");
      expect(shell.TimeZone).to.equal("UTC");
      for (const pass of ["specialize", "oobeSystem"]) {
        const intl = comp(root, pass, "Microsoft-Windows-International-Core");
        for (const k of ["InputLocale", "SystemLocale", "UILanguage", "UserLocale"]) {
          expect(intl[k], `${pass} ${k}`).to.equal("en-US");
        }
      }
      expect(comp(root, "oobeSystem", "Microsoft-Windows-Shell-Setup").TimeZone).to.equal("UTC");
    });

    it("omits ComputerName when none is given", () => {
      const r = parse(renderAnswerFile(input({ computerName: undefined })));
      expect(comp(r, "specialize", "Microsoft-Windows-Shell-Setup")).to.not.have.property("ComputerName");
    });

    it("skips the OOBE pages", () => {
      const oobe = comp(root, "oobeSystem", "Microsoft-Windows-Shell-Setup").OOBE as Node;
      expect(oobe.HideEULAPage).to.equal("true");
      expect(oobe.HideOEMRegistrationScreen).to.equal("true");
      expect(oobe.HideOnlineAccountScreens).to.equal("true");
      expect(oobe.HideWirelessSetupInOOBE).to.equal("true");
      expect(oobe.ProtectYourPC).to.equal("3");
      expect(oobe).to.not.have.property("SkipMachineOOBE");
      expect(oobe).to.not.have.property("SkipUserOOBE");
    });

    it("creates the local administrator with an encoded password", () => {
      const shell = comp(root, "oobeSystem", "Microsoft-Windows-Shell-Setup");
      const accounts = shell.UserAccounts.LocalAccounts.LocalAccount as Node[];
      expect(accounts).to.have.length(1);
      const a = accounts[0];
      expect(a["@_wcm:action"]).to.equal("add");
      expect(a.Name).to.equal("gopher");
      expect(a.Group).to.equal("Administrators");
      expect(a.Password.PlainText).to.equal("false");
      expect(a.Password.Value).to.equal(encodeUnattendPassword(PASSWORD, "Password"));
      expect(decode(a.Password.Value)).to.equal(PASSWORD + "Password");
    });

    it("logs the administrator on automatically", () => {
      const auto = comp(root, "oobeSystem", "Microsoft-Windows-Shell-Setup").AutoLogon as Node;
      expect(auto.Enabled).to.equal("true");
      expect(auto.Username).to.equal("gopher");
      expect(Number(auto.LogonCount)).to.be.at.least(1000);
      expect(auto.Password.PlainText).to.equal("false");
      expect(decode(auto.Password.Value)).to.equal(PASSWORD + "Password");
    });

    it("with keepAutoLogon false, logs on automatically once (the first-logon commands), then Windows stops", () => {
      const once = parse(renderAnswerFile(input({ keepAutoLogon: false })));
      const auto = comp(once, "oobeSystem", "Microsoft-Windows-Shell-Setup").AutoLogon as Node;
      expect(auto.Enabled).to.equal("true");
      expect(Number(auto.LogonCount)).to.equal(1);
    });

    it("never holds the password in plain text", () => {
      const escaped = PASSWORD.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
      expect(xml).to.not.contain(PASSWORD);
      expect(xml).to.not.contain(escaped);
      expect(xml).to.not.contain("unique-7731");
      for (const c of firstLogonCommands(input())) expect(c.commandLine).to.not.contain("unique-7731");
    });

    it("runs the driver install, then the config media script, in order", () => {
      const shell = comp(root, "oobeSystem", "Microsoft-Windows-Shell-Setup");
      const cmds = shell.FirstLogonCommands.SynchronousCommand as Node[];
      expect(cmds.map((c) => c.Order)).to.deep.equal(["1", "2"]);
      for (const c of cmds) {
        expect(c["@_wcm:action"]).to.equal("add");
        expect(c.Description).to.be.a("string").and.not.equal("");
        expect((c.CommandLine as string).length).to.be.at.most(MAX_COMMAND_LINE);
        expect(c.CommandLine).to.match(/^powershell\.exe .*-ExecutionPolicy Bypass -Command "/);
        // cmd.exe would expand %VAR% and end the argument at an inner double quote.
        expect(c.CommandLine).to.not.contain("%");
        expect((c.CommandLine as string).slice(0, -1).split('-Command "')[1]).to.not.contain('"');
      }
      const drivers = cmds[0].CommandLine as string;
      expect(drivers).to.contain("Start-Process pnputil.exe ('/add-driver '+$p+'\\*.inf /install')");
      // Each package's signer is trusted first, and pnputil's run is bounded.
      expect(drivers).to.contain("X509Store('TrustedPublisher','LocalMachine')");
      expect(drivers.indexOf("Get-AuthenticodeSignature")).to.be.lessThan(drivers.indexOf("Start-Process pnputil"));
      expect(drivers).to.contain(`WaitForExit(${PNPUTIL_TIMEOUT_S * 1000})`);
      expect(drivers).to.contain("\\w11\\ARM64");
      for (const d of DEFAULT_DRIVER_NAMES) expect(drivers).to.contain(`'${d}'`);
      const config = cmds[1].CommandLine as string;
      expect(config).to.contain("'windows-arm64-image.marker'");
      expect(config).to.contain("'WINCONFIG'");
      expect(config).to.contain("'firstlogon.ps1'");
      expect(config).to.contain("& ($r.Name+'firstlogon.ps1')");
    });

    it("uses the requested driver folder and names", () => {
      const cmd = firstLogonCommands(input({ driverFolder: "w10", driverNames: ["NetKVM", "viostor"] }))[0];
      expect(cmd.commandLine).to.contain("'NetKVM\\w10\\ARM64'");
      expect(cmd.commandLine).to.contain("'\\w10\\ARM64'");
      expect(cmd.commandLine).to.contain("'NetKVM','viostor'");
      expect(cmd.commandLine).to.not.contain("w11");
      expect(cmd.commandLine).to.not.contain("Balloon");
    });

    it("renders qcow2 like vhdx", () => {
      expect(renderAnswerFile(input({ sourceKind: "qcow2" }))).to.equal(xml);
    });
  });

  describe("iso source", () => {
    const isoInput = input({
      sourceKind: "iso",
      windowsEdition: "Windows 11 Pro",
      productKey: "VK7JG-NPHTM-C97JM-9MPGT-3V66T",
    });
    const xml = renderAnswerFile(isoInput);
    const root = parse(xml);

    it("adds the windowsPE pass first", () => {
      expect(passes(root)).to.deep.equal(["windowsPE", "specialize", "oobeSystem"]);
      for (const c of allComponents(root)) expect(c["@_processorArchitecture"]).to.equal("arm64");
    });

    it("sets the WinPE languages", () => {
      const intl = comp(root, "windowsPE", "Microsoft-Windows-International-Core-WinPE");
      expect(intl.SetupUILanguage.UILanguage).to.equal("en-US");
      for (const k of ["InputLocale", "SystemLocale", "UILanguage", "UserLocale"]) expect(intl[k]).to.equal("en-US");
    });

    it("wipes disk 0 into EFI, MSR and a Windows partition and installs to partition 3", () => {
      const setup = comp(root, "windowsPE", "Microsoft-Windows-Setup");
      const disk = (setup.DiskConfiguration.Disk as Node[])[0];
      expect(disk.DiskID).to.equal("0");
      expect(disk.WillWipeDisk).to.equal("true");
      const parts = disk.CreatePartitions.CreatePartition as Node[];
      expect(parts.map((p) => [p.Order, p.Type])).to.deep.equal([
        ["1", "EFI"],
        ["2", "MSR"],
        ["3", "Primary"],
      ]);
      expect(Number(parts[0].Size)).to.be.within(100, 260);
      expect(Number(parts[1].Size)).to.equal(16);
      expect(parts[2].Extend).to.equal("true");
      const mods = disk.ModifyPartitions.ModifyPartition as Node[];
      const efi = mods.find((m) => m.PartitionID === "1")!;
      const win = mods.find((m) => m.PartitionID === "3")!;
      expect(efi.Format).to.equal("FAT32");
      expect(win.Format).to.equal("NTFS");
      expect(win.Label).to.equal("Windows");
      const os = setup.ImageInstall.OSImage;
      expect(os.InstallTo.DiskID).to.equal("0");
      expect(os.InstallTo.PartitionID).to.equal("3");
      const md = (os.InstallFrom.MetaData as Node[])[0];
      expect(md.Key).to.equal("/IMAGE/NAME");
      expect(md.Value).to.equal("Windows 11 Pro");
    });

    it("accepts the EULA and passes the product key", () => {
      const ud = comp(root, "windowsPE", "Microsoft-Windows-Setup").UserData;
      expect(ud.AcceptEula).to.equal("true");
      expect(ud.ProductKey.Key).to.equal("VK7JG-NPHTM-C97JM-9MPGT-3V66T");
      expect(ud.ProductKey.WillShowUI).to.equal("OnError");
    });

    it("bypasses the Windows 11 TPM, Secure Boot and RAM checks", () => {
      const run = comp(root, "windowsPE", "Microsoft-Windows-Setup").RunSynchronous.RunSynchronousCommand as Node[];
      expect(run.map((r) => r.Order)).to.deep.equal(["1", "2", "3"]);
      for (const v of ["BypassTPMCheck", "BypassSecureBootCheck", "BypassRAMCheck"]) {
        const r = run.find((x) => (x.Path as string).includes(` ${v} `));
        expect(r, v).to.not.equal(undefined);
        expect(r!.Path).to.match(/^reg\.exe add HKLM\\SYSTEM\\Setup\\LabConfig \/v \w+ \/t REG_DWORD \/d 1 \/f$/);
      }
    });

    it("relies on $WinPEDriver$ rather than drive-letter DriverPaths", () => {
      expect(xml).to.not.contain("PnpCustomizationsWinPE");
      expect(xml).to.not.contain("DriverPaths");
    });

    it("still creates the user and first-logon commands", () => {
      const shell = comp(root, "oobeSystem", "Microsoft-Windows-Shell-Setup");
      expect((shell.UserAccounts.LocalAccounts.LocalAccount as Node[])[0].Name).to.equal("gopher");
      expect(shell.FirstLogonCommands.SynchronousCommand).to.have.length(2);
      expect(xml).to.not.contain(PASSWORD);
    });

    it("omits InstallFrom without an edition; without a key, uses the edition's generic installation key", () => {
      const r = parse(renderAnswerFile(input({ sourceKind: "iso", productKey: "VK7JG-NPHTM-C97JM-9MPGT-3V66T" })));
      const setup = comp(r, "windowsPE", "Microsoft-Windows-Setup");
      expect(setup.ImageInstall.OSImage).to.not.have.property("InstallFrom");
      const keyFor = (edition: string) => {
        const ud = comp(
          parse(renderAnswerFile(input({ sourceKind: "iso", windowsEdition: edition }))),
          "windowsPE",
          "Microsoft-Windows-Setup",
        ).UserData;
        return ud.ProductKey?.Key as string | undefined;
      };
      expect(keyFor("Windows 11 Pro")).to.equal("VK7JG-NPHTM-C97JM-9MPGT-3V66T");
      expect(keyFor("Windows 11 Home")).to.equal("YTMG3-N6DKC-DKB77-7M9GH-8HVX7");
      expect(keyFor("Windows 10 Pro for Workstations")).to.equal("DXG7C-N36C4-C4HTG-X4T3X-2YV77");
      // No generic key known (volume media need none): no ProductKey element.
      expect(keyFor("Windows 11 Enterprise")).to.equal(undefined);
      expect(genericInstallKey(undefined)).to.equal(undefined);
    });
  });

  describe("escaping", () => {
    it("escapes special characters and round-trips them", () => {
      const edition = `Pro <&>"' edition`;
      const user = "o'brien&co";
      const xml = renderAnswerFile(input({ sourceKind: "iso", windowsEdition: edition, adminUser: user }));
      expect(xml).to.contain("Pro &lt;&amp;&gt;");
      expect(xml).to.not.contain("<&>");
      const root = parse(xml);
      // fast-xml-parser leaves entities alone unless asked; decode the standard five.
      const unescape = (s: string) =>
        s
          .replace(/&lt;/g, "<")
          .replace(/&gt;/g, ">")
          .replace(/&quot;/g, '"')
          .replace(/&apos;/g, "'")
          .replace(/&amp;/g, "&");
      const md = (
        comp(root, "windowsPE", "Microsoft-Windows-Setup").ImageInstall.OSImage.InstallFrom.MetaData as Node[]
      )[0];
      expect(unescape(md.Value)).to.equal(edition);
      const shell = comp(root, "oobeSystem", "Microsoft-Windows-Shell-Setup");
      expect(unescape(shell.AutoLogon.Username)).to.equal(user);
      expect(unescape((shell.UserAccounts.LocalAccounts.LocalAccount as Node[])[0].Name)).to.equal(user);
    });

    it("puts the config media label in the first-logon command", () => {
      const cmds = firstLogonCommands(input({ configMediaLabel: "WIN_CONF-1" }));
      expect(cmds[1].commandLine).to.contain("-eq 'WIN_CONF-1'");
    });
  });

  describe("validation", () => {
    it("accepts the defaults", () => {
      expect(validateAnswerFileInput(input())).to.deep.equal([]);
    });

    const cases: [string, Partial<AnswerFileInput>, RegExp][] = [
      ["empty password", { adminPassword: "" }, /adminPassword/],
      ["built-in user", { adminUser: "Administrator" }, /adminUser/],
      ["user with <", { adminUser: "a<b" }, /adminUser/],
      ["long user", { adminUser: "x".repeat(21) }, /adminUser/],
      ["bad locale", { locale: "english" }, /locale/],
      ["bad computer name", { computerName: "has space" }, /computerName/],
      ["numeric computer name", { computerName: "12345" }, /computerName/],
      ["bad product key", { productKey: "nope" }, /productKey/],
      ["two key lines", { authorizedKey: KEY + "\n" + KEY }, /authorizedKey/],
      ["not a key", { authorizedKey: "hello" }, /authorizedKey/],
      ["bad driver folder", { driverFolder: "w11\\ARM64" }, /driverFolder/],
      ["no drivers", { driverNames: [] }, /driverNames/],
      ["bad driver name", { driverNames: ["Net KVM"] }, /driverNames/],
      ["repeated driver", { driverNames: ["NetKVM", "netkvm"] }, /driverNames/],
      ["long label", { configMediaLabel: "X".repeat(17) }, /configMediaLabel/],
      ["control character", { windowsEdition: "a\u0001b" }, /windowsEdition/],
      ["iso without edition or key", { sourceKind: "iso" }, /windowsEdition or productKey/],
      ["unknown source", { sourceKind: "wim" as never }, /sourceKind/],
      [
        "command too long",
        { driverNames: Array.from({ length: 80 }, (_, i) => `driver${i}`) },
        /first-logon command 1 is \d+ characters/,
      ],
    ];
    for (const [name, override, pattern] of cases) {
      it(`rejects ${name}`, () => {
        const problems = validateAnswerFileInput(input(override));
        expect(problems.join("\n")).to.match(pattern);
        expect(() => renderAnswerFile(input(override))).to.throw(pattern);
      });
    }

    it("lists every problem at once", () => {
      const problems = validateAnswerFileInput(input({ adminPassword: "", locale: "x", timeZone: "" }));
      expect(problems).to.have.length(3);
    });

    it("never echoes the password in a problem", () => {
      const problems = validateAnswerFileInput(input({ adminPassword: "secret-\u0001-pw" }));
      expect(problems).to.have.length(1);
      expect(problems[0]).to.not.contain("secret");
    });
  });
});
