/**
 * Windows answer file (autounattend.xml) for the ARM64 guest.
 *
 * Pure module: no Pulumi, no I/O. The XML is built with xmlbuilder2, so every
 * value is escaped by the library.
 *
 * What the answer file does:
 * - vhdx / qcow2 sources (a generalized, pre-installed image): the specialize
 *   and oobeSystem passes. OOBE is skipped, a local administrator is created
 *   and logged on automatically, and two FirstLogonCommands run:
 *     1. install the virtio drivers (pnputil) from the virtio-win media, found
 *        by scanning drive letters for `<firstDriver>\<driverFolder>\ARM64`;
 *     2. run `firstlogon.ps1` from the config media (found by its marker file
 *        or volume label): OpenSSH server, the pipeline's key, firewall.
 * - iso sources (Windows Setup from an install ISO): additionally the
 *   windowsPE pass: language, disk layout (GPT: EFI, MSR, Windows), image
 *   selection, EULA, product key and the Windows 11 hardware-check bypass.
 *
 * WinPE drivers: no Microsoft-Windows-PnpCustomizationsWinPE DriverPaths entry
 * is written. A DriverPaths path that does not resolve aborts Setup, and drive
 * letters in WinPE are not fixed, so a path like `E:\viostor` is a gamble.
 * Instead the config ISO carries a `$WinPEDriver$` folder at its root (see
 * provisioning/build-config-iso.sh, CONFIG_ISO_DRIVERS_ISO): Setup scans the
 * root of every drive for that folder, loads the drivers in WinPE and stages
 * them into the installed system, whatever letter the media gets.
 *
 * Passwords are written with PlainText=false: base64 of
 * UTF-16LE(password + "Password"). That is obfuscation, not encryption: the
 * answer file is a secret and is handled as one.
 */
import { create } from "xmlbuilder2";
import type { XMLBuilder } from "xmlbuilder2/lib/interfaces";

export type SourceKind = "vhdx" | "qcow2" | "iso";

export interface AnswerFileInput {
  /** How the image is obtained: a pre-installed generalized disk (vhdx, qcow2) or Windows Setup (iso). */
  sourceKind: SourceKind;
  /** Local administrator created by the answer file and logged on automatically. */
  adminUser: string;
  /** Its password. Never written in plain text. */
  adminPassword: string;
  /** Language tag used for input, system, UI and user locale, e.g. "en-US". Must match the ISO's language. */
  locale: string;
  /** Windows time zone id, e.g. "UTC" or "Pacific Standard Time". */
  timeZone: string;
  /** NetBIOS computer name (1-15 characters); random when omitted. */
  computerName?: string;
  /** ISO installs: image name in install.wim/esd, e.g. "Windows 11 Pro". */
  windowsEdition?: string;
  /** ISO installs: product key (a generic key selects the edition too). */
  productKey?: string;
  /**
   * Keep logging the administrator on automatically after the first logon
   * (the buildlet runs in that session). False: one automatic logon, for the
   * first-logon commands; Windows then turns autologon off and removes the
   * stored password. Default true.
   */
  keepAutoLogon?: boolean;
  /**
   * The pipeline's OpenSSH public key line. It is validated here; the guest
   * reads it from the `authorized_keys` file on the config media (see
   * {@link authorizedKeysFile}), so it is not embedded in the answer file.
   */
  authorizedKey: string;
  /** virtio-win OS folder holding the ARM64 drivers: "w11", "w10" or "2k25". */
  driverFolder: string;
  /** virtio-win driver folders to install at first logon (default {@link DEFAULT_DRIVER_NAMES}). */
  driverNames: string[];
  /** Volume label of the config ISO (default {@link DEFAULT_CONFIG_MEDIA_LABEL}); 1-16 characters. */
  configMediaLabel: string;
}

/** virtio-win drivers that have ARM64 builds and are known to install cleanly. */
export const DEFAULT_DRIVER_NAMES: readonly string[] = [
  "NetKVM",
  "viostor",
  "vioscsi",
  "Balloon",
  "vioserial",
  "viorng",
  "vioinput",
];
/** Drivers copied into `$WinPEDriver$` on the config ISO for ISO installs. */
export const DEFAULT_WINPE_DRIVER_NAMES: readonly string[] = ["viostor", "vioscsi", "NetKVM"];
export const DEFAULT_CONFIG_MEDIA_LABEL = "WINCONFIG";
/** Name the answer file must have at the root of the config ISO. */
export const ANSWER_FILE_NAME = "autounattend.xml";
/** Marker file at the root of the config ISO (written by build-config-iso.sh). */
export const CONFIG_MEDIA_MARKER = "windows-arm64-image.marker";
/** First-logon script at the root of the config ISO (provisioning/windows/firstlogon.ps1). */
export const FIRSTLOGON_SCRIPT = "firstlogon.ps1";
/** Public key file at the root of the config ISO, read by firstlogon.ps1. */
export const AUTHORIZED_KEYS_FILE = "authorized_keys";
/** Optional Win32-OpenSSH release zip at the root of the config ISO (offline fallback). */
export const OPENSSH_ZIP_FILE = "OpenSSH-ARM64.zip";
/** Folder Windows Setup scans at every drive root for WinPE drivers. */
export const WINPE_DRIVER_FOLDER = "$WinPEDriver$";
/** Guest folder for logs written at first logon. */
export const GUEST_LOG_DIR = "C:\\ProgramData\\windows-arm64-image";
/** Maximum length of a SynchronousCommand CommandLine. */
export const MAX_COMMAND_LINE = 1024;
/** How long one driver package's pnputil run may take at first logon. */
export const PNPUTIL_TIMEOUT_S = 300;

const UNATTEND_NS = "urn:schemas-microsoft-com:unattend";
const WCM_NS = "http://schemas.microsoft.com/WMIConfig/2002/State";
const XMLNS_NS = "http://www.w3.org/2000/xmlns/";
const AUTOLOGON_COUNT = 9999999;

/**
 * Encodes a password the way Windows SIM does with PlainText=false:
 * base64(UTF-16LE(password + kind)). Use "Password" for UserAccounts and
 * AutoLogon passwords, "AdministratorPassword" for AdministratorPassword.
 */
export function encodeUnattendPassword(
  password: string,
  kind: "Password" | "AdministratorPassword" = "Password",
): string {
  return Buffer.from(password + kind, "utf16le").toString("base64");
}

/** Content of the config ISO's `authorized_keys` file for this input. */
export function authorizedKeysFile(input: Pick<AnswerFileInput, "authorizedKey">): string {
  return input.authorizedKey.trim() + "\n";
}

// Characters XML 1.0 cannot carry, plus the rest of the C0/C1 controls.

const CONTROL_CHARS = /[\u0000-\u001f\u007f-\u009f\ufffe\uffff]/;
const RESERVED_ACCOUNTS = ["administrator", "guest", "defaultaccount", "wdagutilityaccount"];
const SSH_KEY_LINE =
  /^(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(256|384|521)|sk-ssh-ed25519@openssh\.com|sk-ecdsa-sha2-nistp256@openssh\.com) [A-Za-z0-9+/]+={0,3}( [^\r\n]*)?$/;

/**
 * Checks an input and returns every problem found, each naming the field.
 * An empty list means {@link renderAnswerFile} will accept the input.
 */
export function validateAnswerFileInput(input: AnswerFileInput): string[] {
  const problems: string[] = [];
  const str = (field: string, v: unknown, required: boolean): v is string => {
    if (v === undefined || v === null) {
      if (required) problems.push(`${field} is required`);
      return false;
    }
    if (typeof v !== "string") {
      problems.push(`${field} must be a string`);
      return false;
    }
    if (v.length === 0) {
      problems.push(`${field} must not be empty`);
      return false;
    }
    if (CONTROL_CHARS.test(v)) {
      problems.push(`${field} must not contain control characters`);
      return false;
    }
    return true;
  };

  if (!["vhdx", "qcow2", "iso"].includes(input.sourceKind)) {
    problems.push(`sourceKind must be "vhdx", "qcow2" or "iso" (got ${JSON.stringify(input.sourceKind)})`);
  }
  if (str("adminUser", input.adminUser, true)) {
    const u = input.adminUser;
    if (u.length > 20) problems.push("adminUser must be at most 20 characters");
    if (/["/\\[\]:;|=,+*?<>@%]/.test(u)) problems.push('adminUser must not contain any of "/\\[]:;|=,+*?<>@%');
    if (u.trim() !== u || /^[. ]+$/.test(u)) {
      problems.push("adminUser must not start or end with spaces or be only dots and spaces");
    }
    if (RESERVED_ACCOUNTS.includes(u.toLowerCase())) {
      problems.push(`adminUser must not be the built-in account "${u}"`);
    }
  }
  if (str("adminPassword", input.adminPassword, true) && input.adminPassword.length > 127) {
    problems.push("adminPassword must be at most 127 characters");
  }
  if (str("locale", input.locale, true) && !/^[a-z]{2,3}(-[A-Za-z0-9]{2,8})*$/.test(input.locale)) {
    problems.push(`locale must be a language tag like "en-US" (got ${JSON.stringify(input.locale)})`);
  }
  if (str("timeZone", input.timeZone, true) && !/^[A-Za-z0-9 ().+-]{1,64}$/.test(input.timeZone)) {
    problems.push(`timeZone must be a Windows time zone id like "UTC" (got ${JSON.stringify(input.timeZone)})`);
  }
  if (str("computerName", input.computerName, false)) {
    const c = input.computerName;
    if (!/^[A-Za-z0-9-]{1,15}$/.test(c) || /^[0-9]+$/.test(c)) {
      problems.push("computerName must be 1-15 letters, digits or '-', not only digits");
    }
  }
  str("windowsEdition", input.windowsEdition, false);
  if (str("productKey", input.productKey, false) && !/^[A-Za-z0-9]{5}(-[A-Za-z0-9]{5}){4}$/.test(input.productKey)) {
    problems.push("productKey must look like XXXXX-XXXXX-XXXXX-XXXXX-XXXXX");
  }
  if (input.sourceKind === "iso" && input.windowsEdition === undefined && input.productKey === undefined) {
    problems.push(
      "iso installs need windowsEdition or productKey, otherwise Setup stops at the edition/product key page",
    );
  }
  if (str("authorizedKey", input.authorizedKey, true) && !SSH_KEY_LINE.test(input.authorizedKey.trim())) {
    problems.push('authorizedKey must be one OpenSSH public key line ("ssh-ed25519 AAAA... comment")');
  }
  if (str("driverFolder", input.driverFolder, true) && !/^[A-Za-z0-9]{1,16}$/.test(input.driverFolder)) {
    problems.push(`driverFolder must be a virtio-win OS folder like "w11" (got ${JSON.stringify(input.driverFolder)})`);
  }
  if (!Array.isArray(input.driverNames) || input.driverNames.length === 0) {
    problems.push("driverNames must list at least one driver");
  } else {
    for (const n of input.driverNames) {
      if (typeof n !== "string" || !/^[A-Za-z0-9_-]{1,32}$/.test(n)) {
        problems.push(`driverNames entry ${JSON.stringify(n)} must be a folder name (letters, digits, _ or -)`);
      }
    }
    const lower = input.driverNames.map((n) => String(n).toLowerCase());
    if (new Set(lower).size !== lower.length) problems.push("driverNames must not repeat a driver");
  }
  if (str("configMediaLabel", input.configMediaLabel, true) && !/^[A-Za-z0-9_-]{1,16}$/.test(input.configMediaLabel)) {
    problems.push("configMediaLabel must be 1-16 letters, digits, '_' or '-' (Joliet keeps 16 characters)");
  }
  if (problems.length === 0) {
    for (const c of firstLogonCommands(input)) {
      if (c.commandLine.length > MAX_COMMAND_LINE) {
        problems.push(
          `first-logon command ${c.order} is ${c.commandLine.length} characters (max ${MAX_COMMAND_LINE}); use fewer drivers`,
        );
      }
    }
  }
  return problems;
}

export interface LogonCommand {
  order: number;
  commandLine: string;
  description: string;
}

/**
 * PowerShell in a FirstLogonCommands CommandLine: single quotes only, no
 * `%` (cmd would expand it), no double quotes inside the -Command string.
 */
function psCommand(script: string): string {
  return `powershell.exe -NoProfile -NonInteractive -ExecutionPolicy Bypass -Command "${script}"`;
}

/** PowerShell single-quoted string literal. */
function psq(s: string): string {
  return `'${s.replace(/'/g, "''")}'`;
}

/**
 * Microsoft's generic installation keys (Windows 10 and 11, same keys): they
 * pick the edition during Setup and do not activate Windows. By edition name
 * without the "Windows 1x " prefix, lower case.
 */
export const GENERIC_INSTALL_KEYS: Readonly<Record<string, string>> = {
  home: "YTMG3-N6DKC-DKB77-7M9GH-8HVX7",
  pro: "VK7JG-NPHTM-C97JM-9MPGT-3V66T",
  education: "YNMGQ-8RYV3-4PGQ3-C8XTP-7CFBY",
  "pro education": "8PTT6-RNW4C-6V7J2-C2D3X-MHBPB",
  "pro for workstations": "DXG7C-N36C4-C4HTG-X4T3X-2YV77",
};

/** The generic installation key for an install.wim image name such as "Windows 11 Pro", if known. */
export function genericInstallKey(edition: string | undefined): string | undefined {
  if (edition === undefined) return undefined;
  const name = edition
    .trim()
    .toLowerCase()
    .replace(/^windows\s+1[01]\s+/, "");
  return GENERIC_INSTALL_KEYS[name];
}

/** The FirstLogonCommands, in order. Exported for tests and for the README. */
export function firstLogonCommands(input: AnswerFileInput): LogonCommand[] {
  const sub = `${input.driverFolder}\\ARM64`;
  const names = input.driverNames.map(psq).join(",");
  const drivers = [
    `$l=${psq(GUEST_LOG_DIR + "\\drivers.log")}`,
    `$null=New-Item -ItemType Directory -Force ${psq(GUEST_LOG_DIR)}`,
    `$r=[IO.DriveInfo]::GetDrives()|Where-Object{$_.IsReady -and (Test-Path ($_.Name+${psq(input.driverNames[0] + "\\" + sub)}))}|Select-Object -First 1`,
    `if(-not $r){'virtio-win media not found'|Out-File -Append $l;exit 1}`,
    // virtio-win's Windows 10+ drivers are Microsoft attestation-signed, so pnputil shows no prompt.
    // Trusting each catalog's signer is kept as harmless (no root is added, and it cannot make an
    // unsigned driver load on Windows 11 ARM64); pnputil's run is bounded so a hang cannot keep the
    // next command from running.
    `$s=New-Object Security.Cryptography.X509Certificates.X509Store('TrustedPublisher','LocalMachine');$s.Open('ReadWrite')`,
    `foreach($d in ${names}){$p=$r.Name+$d+${psq("\\" + sub)};if(Test-Path $p){` +
      `foreach($f in (gci $p *.cat)){$c=(Get-AuthenticodeSignature $f.FullName).SignerCertificate;if($c){$s.Add($c)}};` +
      `$x=Start-Process pnputil.exe ('/add-driver '+$p+'\\*.inf /install') -PassThru -RedirectStandardOutput ($l+'.'+$d);` +
      `if(-not $x.WaitForExit(${PNPUTIL_TIMEOUT_S * 1000})){$x.Kill();('timeout '+$p)|Out-File -Append $l}` +
      `}else{('missing '+$p)|Out-File -Append $l}}`,
  ].join(";");
  const config = [
    `$r=[IO.DriveInfo]::GetDrives()|Where-Object{$_.IsReady -and (Test-Path ($_.Name+${psq(FIRSTLOGON_SCRIPT)})) -and ((Test-Path ($_.Name+${psq(CONFIG_MEDIA_MARKER)})) -or $_.VolumeLabel -eq ${psq(input.configMediaLabel)})}|Select-Object -First 1`,
    `if(-not $r){exit 2}`,
    `& ($r.Name+${psq(FIRSTLOGON_SCRIPT)})`,
    `exit $LASTEXITCODE`,
  ].join(";");
  return [
    {
      order: 1,
      commandLine: psCommand(drivers),
      description: `Install virtio drivers (${input.driverFolder}\\ARM64) with pnputil`,
    },
    {
      order: 2,
      commandLine: psCommand(config),
      description: `Run ${FIRSTLOGON_SCRIPT} from the config media: OpenSSH server and key`,
    },
  ];
}

/** Values set to 1 under HKLM\SYSTEM\Setup\LabConfig in WinPE, before Setup checks the hardware (Windows 11). */
export const LAB_CONFIG_BYPASSES: readonly string[] = ["BypassTPMCheck", "BypassSecureBootCheck", "BypassRAMCheck"];

function component(settings: XMLBuilder, name: string): XMLBuilder {
  return settings
    .ele("component")
    .att("name", name)
    .att("processorArchitecture", "arm64")
    .att("publicKeyToken", "31bf3856ad364e35")
    .att("language", "neutral")
    .att("versionScope", "nonSxS")
    .att(XMLNS_NS, "xmlns:wcm", WCM_NS);
}

/** A list item: `<name wcm:action="add">`. */
function addItem(parent: XMLBuilder, name: string): XMLBuilder {
  return parent.ele(name).att(WCM_NS, "wcm:action", "add");
}

function leaf(parent: XMLBuilder, name: string, value: string | number | boolean): XMLBuilder {
  parent.ele(name).txt(String(value));
  return parent;
}

function internationalCore(settings: XMLBuilder, name: string, locale: string): void {
  const c = component(settings, name);
  leaf(c, "InputLocale", locale);
  leaf(c, "SystemLocale", locale);
  leaf(c, "UILanguage", locale);
  leaf(c, "UserLocale", locale);
}

function windowsPE(root: XMLBuilder, input: AnswerFileInput): void {
  const settings = root.ele("settings").att("pass", "windowsPE");

  const intl = component(settings, "Microsoft-Windows-International-Core-WinPE");
  const setupUi = intl.ele("SetupUILanguage");
  leaf(setupUi, "UILanguage", input.locale);
  leaf(intl, "InputLocale", input.locale);
  leaf(intl, "SystemLocale", input.locale);
  leaf(intl, "UILanguage", input.locale);
  leaf(intl, "UserLocale", input.locale);

  const setup = component(settings, "Microsoft-Windows-Setup");

  const disk = addItem(setup.ele("DiskConfiguration"), "Disk");
  leaf(disk, "DiskID", 0);
  leaf(disk, "WillWipeDisk", true);
  const parts = disk.ele("CreatePartitions");
  const p1 = addItem(parts, "CreatePartition");
  leaf(p1, "Order", 1);
  leaf(p1, "Type", "EFI");
  leaf(p1, "Size", 100);
  const p2 = addItem(parts, "CreatePartition");
  leaf(p2, "Order", 2);
  leaf(p2, "Type", "MSR");
  leaf(p2, "Size", 16);
  const p3 = addItem(parts, "CreatePartition");
  leaf(p3, "Order", 3);
  leaf(p3, "Type", "Primary");
  leaf(p3, "Extend", true);
  const modify = disk.ele("ModifyPartitions");
  const m1 = addItem(modify, "ModifyPartition");
  leaf(m1, "Order", 1);
  leaf(m1, "PartitionID", 1);
  leaf(m1, "Format", "FAT32");
  leaf(m1, "Label", "System");
  const m3 = addItem(modify, "ModifyPartition");
  leaf(m3, "Order", 2);
  leaf(m3, "PartitionID", 3);
  leaf(m3, "Format", "NTFS");
  leaf(m3, "Label", "Windows");
  leaf(m3, "Letter", "C");
  leaf(disk.up(), "WillShowUI", "OnError");

  const osImage = setup.ele("ImageInstall").ele("OSImage");
  if (input.windowsEdition !== undefined) {
    const md = addItem(osImage.ele("InstallFrom"), "MetaData");
    leaf(md, "Key", "/IMAGE/NAME");
    leaf(md, "Value", input.windowsEdition);
  }
  const to = osImage.ele("InstallTo");
  leaf(to, "DiskID", 0);
  leaf(to, "PartitionID", 3);
  leaf(osImage, "WillShowUI", "OnError");

  const userData = setup.ele("UserData");
  leaf(userData, "AcceptEula", true);
  // Without a key, consumer (multi-edition) media stop at the product key page: use the
  // edition's generic installation key, which installs but does not activate.
  const key = input.productKey ?? genericInstallKey(input.windowsEdition);
  if (key !== undefined) {
    const pk = userData.ele("ProductKey");
    leaf(pk, "Key", key);
    leaf(pk, "WillShowUI", "OnError");
  }

  const dyn = setup.ele("DynamicUpdate");
  leaf(dyn, "Enable", false);
  leaf(dyn, "WillShowUI", "Never");

  const run = setup.ele("RunSynchronous");
  LAB_CONFIG_BYPASSES.forEach((value, i) => {
    const cmd = addItem(run, "RunSynchronousCommand");
    leaf(cmd, "Order", i + 1);
    leaf(cmd, "Path", `reg.exe add HKLM\\SYSTEM\\Setup\\LabConfig /v ${value} /t REG_DWORD /d 1 /f`);
    leaf(cmd, "Description", `Windows 11 Setup: ${value}`);
  });
}

function specialize(root: XMLBuilder, input: AnswerFileInput): void {
  const settings = root.ele("settings").att("pass", "specialize");
  const shell = component(settings, "Microsoft-Windows-Shell-Setup");
  if (input.computerName !== undefined) leaf(shell, "ComputerName", input.computerName);
  leaf(shell, "TimeZone", input.timeZone);
  internationalCore(settings, "Microsoft-Windows-International-Core", input.locale);
  const deployment = component(settings, "Microsoft-Windows-Deployment");
  const cmd = addItem(deployment.ele("RunSynchronous"), "RunSynchronousCommand");
  leaf(cmd, "Order", 1);
  leaf(
    cmd,
    "Path",
    "reg.exe add HKLM\\SOFTWARE\\Microsoft\\Windows\\CurrentVersion\\OOBE /v BypassNRO /t REG_DWORD /d 1 /f",
  );
  leaf(cmd, "Description", "Let OOBE finish without a network connection");
}

function password(parent: XMLBuilder, value: string): void {
  const pw = parent.ele("Password");
  leaf(pw, "Value", encodeUnattendPassword(value, "Password"));
  leaf(pw, "PlainText", false);
}

function oobeSystem(root: XMLBuilder, input: AnswerFileInput): void {
  const settings = root.ele("settings").att("pass", "oobeSystem");
  internationalCore(settings, "Microsoft-Windows-International-Core", input.locale);
  const shell = component(settings, "Microsoft-Windows-Shell-Setup");

  const oobe = shell.ele("OOBE");
  leaf(oobe, "HideEULAPage", true);
  leaf(oobe, "HideLocalAccountScreen", true);
  leaf(oobe, "HideOEMRegistrationScreen", true);
  leaf(oobe, "HideOnlineAccountScreens", true);
  leaf(oobe, "HideWirelessSetupInOOBE", true);
  leaf(oobe, "ProtectYourPC", 3);

  const account = addItem(shell.ele("UserAccounts").ele("LocalAccounts"), "LocalAccount");
  password(account, input.adminPassword);
  leaf(account, "Description", "Build pipeline administrator");
  leaf(account, "DisplayName", input.adminUser);
  leaf(account, "Group", "Administrators");
  leaf(account, "Name", input.adminUser);

  const autoLogon = shell.ele("AutoLogon");
  password(autoLogon, input.adminPassword);
  leaf(autoLogon, "Enabled", true);
  leaf(autoLogon, "LogonCount", input.keepAutoLogon === false ? 1 : AUTOLOGON_COUNT);
  leaf(autoLogon, "Username", input.adminUser);

  const commands = shell.ele("FirstLogonCommands");
  for (const c of firstLogonCommands(input)) {
    const sc = addItem(commands, "SynchronousCommand");
    leaf(sc, "Order", c.order);
    leaf(sc, "CommandLine", c.commandLine);
    leaf(sc, "Description", c.description);
    leaf(sc, "RequiresUserInput", false);
  }
  leaf(shell, "TimeZone", input.timeZone);
}

/**
 * Renders the answer file. Throws an Error listing every problem when the
 * input is invalid (see {@link validateAnswerFileInput}).
 */
export function renderAnswerFile(input: AnswerFileInput): string {
  const problems = validateAnswerFileInput(input);
  if (problems.length > 0) {
    throw new Error(`answer file input is invalid:\n- ${problems.join("\n- ")}`);
  }
  const root = create({ version: "1.0", encoding: "utf-8" }).ele(UNATTEND_NS, "unattend");
  if (input.sourceKind === "iso") windowsPE(root, input);
  specialize(root, input);
  oobeSystem(root, input);
  return root.end({ prettyPrint: true }) + "\n";
}
