import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { createHash } from "node:crypto";
import { existsSync } from "node:fs";
import { mkdir, mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { createServer, type IncomingMessage, type Server } from "node:http";
import type { AddressInfo } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { promisify } from "node:util";
import { type ServerProcess, spawnBerth } from "../support/farm.js";
import { assertInstalled, BAZEL, describeRun, runBazel, startupOptions } from "./bazel.js";

/**
 * Bazel 4.2.3 (Debian's bazel-bootstrap) sends its repository downloads (`http_file`, `http_archive`) to a
 * spawned `berth serve` through the Remote Asset API (`--experimental_remote_downloader`). Berth downloads them
 * from a loopback HTTP server the test runs, keeps them in its CAS, and serves them again after the HTTP server
 * is gone and `bazel clean --expunge` threw away everything Bazel had. A host the farm is not allowed to fetch
 * from is refused, and Bazel reports the farm's reason.
 */

const INSTANCE = "downloads";
const FILE_CONTENT = "a file fetched by http_file through Berth\n";
const ARCHIVE_MESSAGE = "a file from inside an archive fetched by http_archive through Berth\n";
const REFUSED_CONTENT = "a file the farm must not fetch\n";
/** What the WORKSPACE pins for @tampered, and what the HTTP server serves instead. */
const PINNED_CONTENT = "the content the WORKSPACE pins\n";
const TAMPERED_CONTENT = "content swapped on the server\n";
/** The top-level directory of the archive, which http_archive strips. */
const ARCHIVE_PREFIX = "lib-1.0";

function sha256(data: Buffer | string): string {
  return createHash("sha256").update(data).digest("hex");
}

/** Bazel's line about a failed download, shown in the test's output. */
function logDownloadError(stderr: string): void {
  const line = stderr.split("\n").find((l) => l.includes("Error in download:"));
  console.log(`Bazel reports: ${line?.trim()}`);
}

/** A loopback HTTP server of fixed files that records who asked for what. */
interface FileServer {
  readonly origin: string;
  readonly requests: { path: string; userAgent: string }[];
  close(): Promise<void>;
}

async function serveFiles(host: string, files: ReadonlyMap<string, Buffer>): Promise<FileServer> {
  const requests: { path: string; userAgent: string }[] = [];
  const server: Server = createServer((request: IncomingMessage, response) => {
    const path = request.url ?? "";
    requests.push({ path, userAgent: request.headers["user-agent"] ?? "" });
    const body = files.get(path);
    if (body === undefined || request.method !== "GET") {
      response.writeHead(404).end();
      return;
    }
    response.writeHead(200, { "content-type": "application/octet-stream", "content-length": body.byteLength });
    response.end(body);
  });
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(0, host, () => resolve());
  });
  const { port } = server.address() as AddressInfo;
  return {
    origin: `http://${host}:${port}`,
    requests,
    close: () =>
      new Promise((resolve) => {
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
}

/** A .tar.gz of `lib-1.0/msg.txt`, made by GNU tar as a project's release would be. */
async function makeArchive(dir: string): Promise<Buffer> {
  await mkdir(join(dir, ARCHIVE_PREFIX), { recursive: true });
  await writeFile(join(dir, ARCHIVE_PREFIX, "msg.txt"), ARCHIVE_MESSAGE);
  const archive = join(dir, "lib.tar.gz");
  await promisify(execFile)("tar", ["-C", dir, "-czf", archive, ARCHIVE_PREFIX]);
  return readFile(archive);
}

function workspaceFile(allowed: string, refused: string, checksums: Record<string, string>): string {
  return `workspace(name = "berth_downloader_e2e")

load("@bazel_tools//tools/build_defs/repo:http.bzl", "http_archive", "http_file")

http_file(
    name = "data",
    urls = ["${allowed}/files/data.txt"],
    sha256 = "${checksums.data}",
    downloaded_file_path = "data.txt",
)

http_archive(
    name = "lib",
    urls = ["${allowed}/archives/lib.tar.gz"],
    sha256 = "${checksums.lib}",
    strip_prefix = "${ARCHIVE_PREFIX}",
    build_file_content = 'exports_files(["msg.txt"])',
)

http_file(
    name = "tampered",
    urls = ["${allowed}/files/tampered.txt"],
    sha256 = "${checksums.tampered}",
    downloaded_file_path = "tampered.txt",
)

http_file(
    name = "refused",
    urls = ["${refused}/files/refused.txt"],
    sha256 = "${checksums.refused}",
    downloaded_file_path = "refused.txt",
)
`;
}

const BUILD_FILE = `
genrule(
    name = "combined",
    srcs = ["@data//file", "@lib//:msg.txt"],
    outs = ["combined.txt"],
    cmd = "cat $(location @data//file) $(location @lib//:msg.txt) > $@",
)
`;

const TAMPERED_BUILD_FILE = `
genrule(
    name = "uses_tampered",
    srcs = ["@tampered//file"],
    outs = ["tampered_copy.txt"],
    cmd = "cp $< $@",
)
`;

const REFUSED_BUILD_FILE = `
genrule(
    name = "uses_refused",
    srcs = ["@refused//file"],
    outs = ["refused_copy.txt"],
    cmd = "cp $< $@",
)
`;

describe("Bazel 4.2.3 downloading repositories through Berth's Remote Asset API", { timeout: 300_000 }, () => {
  let root = "";
  let workspace = "";
  let berth: ServerProcess | undefined;
  let allowedServer: FileServer | undefined;
  let refusedServer: FileServer | undefined;
  const berthLog: string[] = [];

  const bazel = async (command: string, args: string[] = []) => {
    const full = [...startupOptions(root), command, ...args];
    return { args: full, result: await runBazel(workspace, full) };
  };

  const build = (target: string) => {
    assert.ok(berth, "berth is not running");
    return bazel("build", [
      `--experimental_remote_downloader=grpc://${berth.address}`,
      // Bazel 4 takes the blob the downloader names from its gRPC remote cache, which it requires.
      `--remote_cache=grpc://${berth.address}`,
      `--remote_instance_name=${INSTANCE}`,
      // The repository cache (outside the output base, so `clean --expunge` keeps it) would answer by sha256
      // without asking the downloader.
      "--repository_cache=",
      "--spawn_strategy=local",
      "--color=no",
      "--curses=no",
      target,
    ]);
  };

  before(async () => {
    assertInstalled(BAZEL);
    root = await mkdtemp(join(tmpdir(), "berth-bazel-downloader-"));
    workspace = join(root, "workspace");
    await mkdir(join(workspace, "refused"), { recursive: true });
    await mkdir(join(workspace, "tampered"), { recursive: true });
    const archive = await makeArchive(join(root, "archive"));
    allowedServer = await serveFiles(
      "127.0.0.1",
      new Map([
        ["/files/data.txt", Buffer.from(FILE_CONTENT)],
        ["/archives/lib.tar.gz", archive],
        ["/files/tampered.txt", Buffer.from(TAMPERED_CONTENT)],
      ]),
    );
    // Another loopback address: reachable from the farm, but not among the hosts it may fetch from.
    refusedServer = await serveFiles("127.0.0.2", new Map([["/files/refused.txt", Buffer.from(REFUSED_CONTENT)]]));
    await writeFile(
      join(workspace, "WORKSPACE"),
      workspaceFile(allowedServer.origin, refusedServer.origin, {
        data: sha256(FILE_CONTENT),
        lib: sha256(archive),
        refused: sha256(REFUSED_CONTENT),
        tampered: sha256(PINNED_CONTENT),
      }),
    );
    await writeFile(join(workspace, "BUILD"), BUILD_FILE);
    await writeFile(join(workspace, "refused", "BUILD"), REFUSED_BUILD_FILE);
    await writeFile(join(workspace, "tampered", "BUILD"), TAMPERED_BUILD_FILE);

    const config = join(root, "berth.yaml");
    // Only the first server's host and port; loopback hosts may be fetched from over plain http.
    const allowed = new URL(allowedServer.origin).host;
    await writeFile(config, `asset:\n  fetch:\n    allowedHosts: ["${allowed}"]\n`);
    berth = await spawnBerth(["--config", config, "--data-dir", join(root, "data")], [], (line) => berthLog.push(line));
  });

  after(async () => {
    if (root === "") return;
    try {
      if (existsSync(join(workspace, "WORKSPACE"))) {
        await runBazel(workspace, [...startupOptions(root), "shutdown"], 60_000).catch(() => undefined);
      }
    } finally {
      await berth?.stop();
      await allowedServer?.close();
      await refusedServer?.close();
      await rm(root, { recursive: true, force: true });
    }
  });

  it("fetches http_file and http_archive through Berth, which alone talks to the HTTP server", async () => {
    assert.ok(allowedServer);
    const { args, result } = await build("//:combined");
    assert.equal(result.code, 0, describeRun(args, result));
    assert.equal(await readFile(join(workspace, "bazel-bin", "combined.txt"), "utf8"), FILE_CONTENT + ARCHIVE_MESSAGE);
    const paths = allowedServer.requests.map((r) => r.path).sort();
    // Only the two repositories the target needs; @tampered and @refused are not fetched.
    assert.deepEqual(paths, ["/archives/lib.tar.gz", "/files/data.txt"], "each file should be fetched once");
    // Every request came from the farm's fetcher, none from Bazel's own downloader ("Bazel/release …").
    assert.deepEqual(
      allowedServer.requests.filter((r) => r.userAgent !== "berth-remote-asset"),
      [],
      "something other than the farm downloaded",
    );
  });

  it("fails a file whose content is not the one the WORKSPACE pins, and does not keep it", async () => {
    assert.ok(allowedServer);
    const attempt = async () => {
      const { args, result } = await build("//tampered:uses_tampered");
      assert.notEqual(result.code, 0, describeRun(args, result));
      assert.match(
        result.stderr,
        /Error in download: java\.io\.IOException: io\.grpc\.StatusRuntimeException: NOT_FOUND: .*does not match checksum\.sri sha256-/,
        describeRun(args, result),
      );
      logDownloadError(result.stderr);
    };
    await attempt();
    // Asked again, the farm goes to the origin again rather than answering from what it refused to keep.
    await attempt();
    assert.equal(allowedServer.requests.filter((r) => r.path === "/files/tampered.txt").length, 2);
  });

  it("still builds after the HTTP server is gone and bazel clean --expunge", async () => {
    assert.ok(allowedServer);
    await allowedServer.close();
    const clean = await bazel("clean", ["--expunge"]);
    assert.equal(clean.result.code, 0, describeRun(clean.args, clean.result));
    assert.ok(!existsSync(join(workspace, "bazel-bin")), "clean --expunge left bazel-bin behind");
    const { args, result } = await build("//:combined");
    assert.equal(result.code, 0, describeRun(args, result));
    assert.equal(await readFile(join(workspace, "bazel-bin", "combined.txt"), "utf8"), FILE_CONTENT + ARCHIVE_MESSAGE);
  });

  it("fails the repository a host the farm may not fetch from, with the farm's reason", async () => {
    assert.ok(refusedServer);
    const { args, result } = await build("//refused:uses_refused");
    assert.notEqual(result.code, 0, describeRun(args, result));
    // Bazel 4.2.3 shows the farm's status as it came, and does not fall back to downloading by itself.
    const host = new URL(refusedServer.origin).host.replaceAll(".", "\\.");
    assert.match(
      result.stderr,
      new RegExp(
        `Error in download: java\\.io\\.IOException: io\\.grpc\\.StatusRuntimeException: PERMISSION_DENIED: .*${host} is not in asset\\.fetch\\.allowedHosts`,
      ),
      describeRun(args, result),
    );
    logDownloadError(result.stderr);
    assert.deepEqual(refusedServer.requests, [], "the farm fetched from a host it is not allowed to");
  });
});
