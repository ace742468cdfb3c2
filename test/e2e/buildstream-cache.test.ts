import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { existsSync } from "node:fs";
import { chmod, lstat, mkdir, mkdtemp, readdir, readFile, readlink, rm, symlink, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join, relative } from "node:path";
import { after, before, describe, it } from "node:test";
import { makeCertificates } from "../support/certificates.js";
import { type ServerProcess, spawnBerth } from "../support/farm.js";

/**
 * BuildStream 1.6.8 (Debian's `buildstream`) with a spawned `berth serve` as its artifact cache: bst speaks
 * REAPI's CAS and ByteStream to it and keeps its artifact refs with the Remote Asset API (PushDirectory and
 * FetchDirectory of `urn:fdc:buildstream.build:2020:v1:…`). An artifact built offline is pushed, pulled into an
 * empty local cache and checked out with the same files, byte for byte.
 */

const BST = "/usr/bin/bst";
const BST_TIMEOUT_MS = 180_000;
const PROJECT = "berthcache";
/** One job of each kind: the test's output stays in order, and the two shared cores are not oversubscribed. */
const SCHEDULER = "scheduler:\n  fetchers: 1\n  builders: 1\n  pushers: 1\n";

/** The files of the project's two import elements: path → content (a string starting "-> " is a symlink). */
const BASE_FILES: Record<string, string> = {
  "etc/berth/greeting.txt": "hello from an artifact kept by Berth\n",
  "usr/share/berth/empty": "",
  "usr/share/berth/link.txt": "-> ../../../etc/berth/greeting.txt",
};
const TOOL_FILES: Record<string, string> = {
  "usr/bin/berth-tool": "#!/bin/sh\necho berth-tool\n",
  // Large enough to be sent with ByteStream.Write rather than BatchUpdateBlobs (bst batches below 1 MiB).
  "usr/share/berth/large.bin": "x".repeat(3 * 1024 * 1024 + 17),
};
const EXECUTABLES = new Set(["usr/bin/berth-tool"]);
/** Two artifacts of 3 MiB each, for a farm whose CAS holds 5 MiB: pushing the second evicts the first's file. */
const OLD_FILES: Record<string, string> = { "usr/share/old.bin": "o".repeat(3 * 1024 * 1024) };
const NEW_FILES: Record<string, string> = { "usr/share/new.bin": "n".repeat(3 * 1024 * 1024) };
const SMALL_CAS = "5MiB";
const ELEMENTS = ["base.bst", "tool.bst", "all.bst"];

/** A line bst prints for one element's job, e.g. `[ push:base.bst   ] INFO    Pushed artifact e47fae53 -> URL`. */
function bstInfo(job: "push" | "pull", element: string, message: string): RegExp {
  return new RegExp(`\\[ ${job}:${element.replaceAll(".", "\\.")} +\\] INFO +${message}`);
}

interface BstResult {
  code: number | null;
  output: string;
}

describe("BuildStream 1.6.8 with Berth as its artifact cache", { timeout: 600_000 }, () => {
  let root = "";
  let project = "";
  let berth: ServerProcess | undefined;
  /** A farm whose CAS is too small for two of the project's artifacts. */
  let smallBerth: ServerProcess | undefined;
  /** A farm that speaks TLS and wants a client certificate. */
  let tlsBerth: ServerProcess | undefined;
  let builtCheckout: Map<string, FileEntry> | undefined;

  /** Runs bst with every XDG directory (its caches, logs and configuration) inside the test's directory. */
  const bst = (cache: string, config: string, args: string[]): Promise<BstResult> =>
    new Promise((resolve, reject) => {
      const home = join(root, "home");
      const env = {
        PATH: process.env.PATH ?? "/usr/bin:/bin",
        HOME: home,
        XDG_CACHE_HOME: join(root, cache),
        XDG_CONFIG_HOME: join(root, "config"),
        XDG_DATA_HOME: join(root, "data-home"),
        LANG: "C.UTF-8",
        LC_ALL: "C.UTF-8",
      };
      const child = spawn(BST, ["--no-interactive", "--no-colors", "--config", config, ...args], {
        cwd: project,
        env,
        stdio: ["ignore", "pipe", "pipe"],
      });
      const chunks: Buffer[] = [];
      child.stdout.on("data", (chunk: Buffer) => chunks.push(chunk));
      child.stderr.on("data", (chunk: Buffer) => chunks.push(chunk));
      const timer = setTimeout(() => child.kill("SIGKILL"), BST_TIMEOUT_MS);
      child.once("error", (error) => {
        clearTimeout(timer);
        reject(error);
      });
      child.once("close", (code) => {
        clearTimeout(timer);
        resolve({ code, output: Buffer.concat(chunks).toString("utf8") });
      });
    });

  const describeBst = (args: string[], result: BstResult) =>
    `bst ${args.join(" ")} exited with ${result.code}\n${result.output}`;

  const ok = async (cache: string, config: string, args: string[]): Promise<string> => {
    const result = await bst(cache, config, args);
    assert.equal(result.code, 0, describeBst(args, result));
    return result.output;
  };

  let offlineConfig = "";
  let remoteConfig = "";

  /** Starts Berth on the test's data directory (a new port each time) and points remote.conf at it. */
  const startBerth = async () => {
    berth = await spawnBerth(["--data-dir", join(root, "berth-data")]);
    await writeFile(remoteConfig, `${SCHEDULER}artifacts:\n  url: http://${berth.address}\n  push: true\n`);
  };

  /** bst says so, and carries on without the cache, when a server does not answer as an artifact cache. */
  const assertRemoteUsable = (output: string) => {
    assert.doesNotMatch(output, /Failed to initialize remote|No artifact caches available/, output);
  };

  before(async () => {
    assert.ok(
      existsSync(BST),
      `BuildStream is not installed at ${BST}; run \`bash scripts/install.sh --test\` to install Debian's buildstream`,
    );
    root = await mkdtemp(join(tmpdir(), "berth-bst-e2e-"));
    project = join(root, "project");
    await writeProject(project);
    for (const dir of ["home", "config", "data-home"]) await mkdir(join(root, dir));
    offlineConfig = join(root, "offline.conf");
    remoteConfig = join(root, "remote.conf");
    // No artifact cache at all: the build stays local, and bst push below does the pushing.
    await writeFile(offlineConfig, SCHEDULER);
    await startBerth();
  });

  after(async () => {
    await berth?.stop();
    await smallBerth?.stop();
    await tlsBerth?.stop();
    if (root !== "") await rm(root, { recursive: true, force: true });
  });

  it("builds the project offline and checks it out", async () => {
    await ok("cache-built", offlineConfig, ["build", "all.bst"]);
    const dir = join(root, "checkout-built");
    await ok("cache-built", offlineConfig, ["checkout", "all.bst", dir]);
    builtCheckout = await readTree(dir);
    assert.deepEqual(Object.fromEntries([...builtCheckout].map(([path, entry]) => [path, entry.content])), {
      ...BASE_FILES,
      ...TOOL_FILES,
    });
    assert.equal(builtCheckout.get("usr/bin/berth-tool")?.executable, true);
  });

  it("bst push sends every artifact to Berth; a second push finds them there", async () => {
    const output = await ok("cache-built", remoteConfig, ["push", "--deps", "all", "all.bst"]);
    assertRemoteUsable(output);
    for (const element of ELEMENTS) assert.match(output, bstInfo("push", element, "Pushed artifact"), output);
    const again = await ok("cache-built", remoteConfig, ["push", "--deps", "all", "all.bst"]);
    assert.doesNotMatch(again, /Pushed artifact/, again);
    for (const element of ELEMENTS) assert.match(again, bstInfo("push", element, "Remote \\(.*\\) already has"), again);
  });

  it("bst pull into an empty local cache from a restarted Berth, then bst checkout, gives the same files byte for byte", async () => {
    assert.ok(builtCheckout, "the offline build did not complete");
    // The artifact refs (asset associations) and blobs are kept across a restart on the same data directory.
    assert.equal(await berth?.stop(), 0, "berth serve should exit cleanly on SIGTERM");
    await startBerth();
    // A cache that never built anything: checkout fails until the artifacts are pulled.
    const dir = join(root, "checkout-pulled");
    const before = await bst("cache-pulled", remoteConfig, ["checkout", "all.bst", join(root, "too-early")]);
    assert.notEqual(before.code, 0, describeBst(["checkout"], before));

    const output = await ok("cache-pulled", remoteConfig, ["pull", "--deps", "all", "all.bst"]);
    assertRemoteUsable(output);
    for (const element of ELEMENTS) assert.match(output, bstInfo("pull", element, "Pulled artifact"), output);
    await ok("cache-pulled", remoteConfig, ["checkout", "all.bst", dir]);
    const pulled = await readTree(dir);
    assert.deepEqual(pulled, builtCheckout);
  });

  it("over mutual TLS, only a client with a certificate from the farm's CA pushes and pulls", async () => {
    const certs = join(root, "certs");
    await makeCertificates(certs);
    const farmConfig = join(certs, "berth.yaml");
    await writeFile(
      farmConfig,
      [
        "tls:",
        `  certFile: ${join(certs, "server.pem")}`,
        `  keyFile: ${join(certs, "server.key")}`,
        `  clientCaFile: ${join(certs, "ca.pem")}`,
        "  requireClientCert: true",
        "",
      ].join("\n"),
    );
    tlsBerth = await spawnBerth(["--config", farmConfig, "--data-dir", join(root, "tls-berth")]);
    const port = tlsBerth.address.split(":").at(-1);
    /** bst's remote over https, presenting `client` (a name in certs/). */
    const tlsConfig = async (client: string) => {
      const file = join(root, `tls-${client}.conf`);
      await writeFile(
        file,
        `${SCHEDULER}artifacts:\n  url: https://127.0.0.1:${port}\n  push: true\n` +
          `  server-cert: ${join(certs, "ca.pem")}\n` +
          `  client-cert: ${join(certs, `${client}.pem`)}\n  client-key: ${join(certs, `${client}.key`)}\n`,
      );
      return file;
    };

    // A certificate from a CA the farm does not trust: the handshake fails and bst finds no cache to push to.
    const rogue = await bst("cache-built", await tlsConfig("rogue-client"), ["push", "base.bst"]);
    assert.notEqual(rogue.code, 0, describeBst(["push", "base.bst"], rogue));
    assert.match(
      rogue.output,
      new RegExp(`WARNING Failed to initialize remote https://127\\.0\\.0\\.1:${port}: `),
      rogue.output,
    );
    assert.match(rogue.output, /No artifact caches available for pushing artifacts/, rogue.output);

    const trusted = await tlsConfig("client");
    const pushed = await ok("cache-built", trusted, ["push", "base.bst"]);
    assertRemoteUsable(pushed);
    assert.match(pushed, bstInfo("push", "base.bst", "Pushed artifact"), pushed);
    const pulled = await ok("cache-tls", trusted, ["pull", "base.bst"]);
    assert.match(pulled, bstInfo("pull", "base.bst", "Pulled artifact"), pulled);
    const out = join(root, "tls-out");
    await ok("cache-tls", trusted, ["checkout", "base.bst", out]);
    assert.deepEqual(
      Object.fromEntries([...(await readTree(out))].map(([path, entry]) => [path, entry.content])),
      BASE_FILES,
    );
  });

  it("an artifact whose file Berth evicted is a miss for bst pull, never a broken artifact", async () => {
    const dataDir = join(root, "small-berth");
    await mkdir(dataDir);
    const farmConfig = join(dataDir, "berth.yaml");
    await writeFile(farmConfig, `cas:\n  maxSizeBytes: ${SMALL_CAS}\n`);
    smallBerth = await spawnBerth(["--config", farmConfig, "--data-dir", join(dataDir, "data")]);
    const smallConfig = join(root, "small.conf");
    await writeFile(smallConfig, `${SCHEDULER}artifacts:\n  url: http://${smallBerth.address}\n  push: true\n`);

    await ok("cache-built", offlineConfig, ["build", "old.bst", "new.bst"]);
    for (const element of ["old.bst", "new.bst"]) {
      const output = await ok("cache-built", smallConfig, ["push", element]);
      assert.match(output, bstInfo("push", element, "Pushed artifact"), output);
    }

    // old.bst's association is still in the action cache, but its 3 MiB file made room for new.bst's.
    const old = await bst("cache-evicted", smallConfig, ["pull", "old.bst"]);
    assertRemoteUsable(old.output);
    assert.match(old.output, bstInfo("pull", "old.bst", "Remote \\(.*\\) does not have"), old.output);
    assert.doesNotMatch(old.output, /Failed to pull|BlobNotFound|NOT_FOUND/, old.output);
    const checkoutOld = await bst("cache-evicted", smallConfig, ["checkout", "old.bst", join(root, "old-out")]);
    assert.notEqual(checkoutOld.code, 0, describeBst(["checkout", "old.bst"], checkoutOld));

    const pulled = await ok("cache-evicted", smallConfig, ["pull", "new.bst"]);
    assert.match(pulled, bstInfo("pull", "new.bst", "Pulled artifact"), pulled);
    const out = join(root, "new-out");
    await ok("cache-evicted", smallConfig, ["checkout", "new.bst", out]);
    assert.deepEqual(
      Object.fromEntries([...(await readTree(out))].map(([path, entry]) => [path, entry.content])),
      NEW_FILES,
    );
  });
});

/** What a checkout holds at a path: the bytes of a file (or "-> target" of a symlink) and the executable bit. */
interface FileEntry {
  content: string;
  executable: boolean;
}

async function readTree(dir: string): Promise<Map<string, FileEntry>> {
  const entries = new Map<string, FileEntry>();
  const walk = async (current: string): Promise<void> => {
    for (const name of (await readdir(current)).sort()) {
      const path = join(current, name);
      const stats = await lstat(path);
      const key = relative(dir, path);
      if (stats.isDirectory()) await walk(path);
      else if (stats.isSymbolicLink()) entries.set(key, { content: `-> ${await readlink(path)}`, executable: false });
      else entries.set(key, { content: await readFile(path, "latin1"), executable: (stats.mode & 0o100) !== 0 });
    }
  };
  await walk(dir);
  return entries;
}

async function writeFiles(dir: string, files: Record<string, string>): Promise<void> {
  for (const [path, content] of Object.entries(files)) {
    const target = join(dir, path);
    await mkdir(join(target, ".."), { recursive: true });
    if (content.startsWith("-> ")) await symlink(content.slice(3), target);
    else await writeFile(target, content, "latin1");
    if (EXECUTABLES.has(path)) await chmod(target, 0o755);
  }
}

async function writeProject(dir: string): Promise<void> {
  await mkdir(join(dir, "elements"), { recursive: true });
  await writeFile(join(dir, "project.conf"), `name: ${PROJECT}\nelement-path: elements\n`);
  await writeFiles(join(dir, "files", "base"), BASE_FILES);
  await writeFiles(join(dir, "files", "tool"), TOOL_FILES);
  const importElement = (path: string) => `kind: import\nsources:\n- kind: local\n  path: ${path}\n`;
  await writeFile(join(dir, "elements", "base.bst"), importElement("files/base"));
  await writeFile(join(dir, "elements", "tool.bst"), `${importElement("files/tool")}depends:\n- base.bst\n`);
  await writeFile(join(dir, "elements", "all.bst"), "kind: stack\ndepends:\n- base.bst\n- tool.bst\n");
  await writeFiles(join(dir, "files", "old"), OLD_FILES);
  await writeFiles(join(dir, "files", "new"), NEW_FILES);
  await writeFile(join(dir, "elements", "old.bst"), importElement("files/old"));
  await writeFile(join(dir, "elements", "new.bst"), importElement("files/new"));
}
