import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { existsSync } from "node:fs";
import { readFile, rm } from "node:fs/promises";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { type ServerProcess, spawnBerth } from "../support/farm.js";

/** Helpers for the end-to-end tests that drive Bazel 4.2.3 (Debian's bazel-bootstrap) against Berth. */

// Compiled to dist/test/e2e; the fixtures stay in the source tree.
export const FIXTURES = fileURLToPath(new URL("../../../test/e2e/fixtures/", import.meta.url));
/** Bazel 4.2.3 fetches these as soon as a test rule is analysed; see fixtures/bazel-stubs. */
export const STUB_REPOSITORIES = ["rules_cc", "rules_java", "remote_coverage_tools"];

/** Options pointing Bazel at the stub repositories below `stubs` instead of fetching them. */
export function stubOverrides(stubs: string): string {
  return STUB_REPOSITORIES.map((name) => `--override_repository=${name}=${join(stubs, name)}`).join(" ");
}

export const BAZEL = "/usr/bin/bazel";
export const BAZEL_COMMAND_TIMEOUT_MS = 120_000;

/** Fails (rather than skips) when a program the Bazel tests need is missing. */
export function assertInstalled(program: string = BAZEL): void {
  assert.ok(
    existsSync(program),
    `${program} is not installed; run \`bash scripts/install.sh --test\` to install what the tests need`,
  );
}

/**
 * Debian's /etc/bazel/bazelrc sets --install_base, which this Bazel cannot start without, so only the user's
 * and the workspace's rc files are ignored, not the system one. `bazelrc` adds a file of the test's own. Every
 * command of one test must pass the same options, or Bazel restarts its server.
 */
export function startupOptions(root: string, bazelrc?: string): string[] {
  return [
    "--nohome_rc",
    "--noworkspace_rc",
    ...(bazelrc === undefined ? [] : [`--bazelrc=${bazelrc}`]),
    `--output_user_root=${join(root, "bazel-root")}`,
    // A server left behind by a crashed test run dies on its own.
    "--max_idle_secs=60",
  ];
}

export interface CommandResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** Runs bazel to completion; a hung client is killed so that the test fails instead of stalling. */
export function runBazel(cwd: string, args: string[], timeoutMs = BAZEL_COMMAND_TIMEOUT_MS): Promise<CommandResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(BAZEL, args, { cwd, stdio: ["ignore", "pipe", "pipe"] });
    const stdout: Buffer[] = [];
    const stderr: Buffer[] = [];
    child.stdout.on("data", (chunk: Buffer) => stdout.push(chunk));
    child.stderr.on("data", (chunk: Buffer) => stderr.push(chunk));
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      child.kill("SIGKILL");
    }, timeoutMs);
    child.once("error", (error) => {
      clearTimeout(timer);
      reject(error);
    });
    child.once("close", (code) => {
      clearTimeout(timer);
      const result = {
        code,
        stdout: Buffer.concat(stdout).toString("utf8"),
        stderr: Buffer.concat(stderr).toString("utf8"),
      };
      if (timedOut) {
        reject(new Error(`bazel ${args.join(" ")} did not finish within ${timeoutMs} ms\n${result.stderr}`));
      } else {
        resolve(result);
      }
    });
  });
}

export function describeRun(args: string[], result: CommandResult): string {
  return `bazel ${args.join(" ")} exited with ${result.code}\n--- stdout ---\n${result.stdout}\n--- stderr ---\n${result.stderr}`;
}

export interface ProcessSummary {
  line: string;
  counts: Map<string, number>;
}

/**
 * Bazel 4's "INFO: 5 processes: 4 remote cache hit, 1 internal." as counts per kind; the order of the kinds
 * varies between runs, and the total does not always match their sum (a test's XML generation counts apart).
 */
export function processSummary(stderr: string): ProcessSummary {
  const lines = stderr.split("\n").filter((line) => /^INFO: \d+ process(es)?: /.test(line));
  const line = lines.at(-1);
  assert.ok(line !== undefined, `no process summary in Bazel's output:\n${stderr}`);
  const counts = new Map<string, number>();
  const parts = line.replace(/^INFO: \d+ process(es)?: /, "").replace(/\.$/, "");
  for (const part of parts.split(", ")) {
    const match = /^(\d+) (.+)$/.exec(part.trim());
    assert.ok(match?.[1] && match[2], `unexpected part "${part}" in "${line}"`);
    counts.set(match[2], (counts.get(match[2]) ?? 0) + Number(match[1]));
  }
  return { line, counts };
}

/** The kinds of a summary other than "internal" (Bazel's own in-process actions), sorted. */
export function nonInternalKinds(summary: ProcessSummary): string[] {
  return [...summary.counts.keys()].filter((kind) => kind !== "internal").sort();
}

/** Bazel falls back to local execution on cache errors, so a build can succeed while the cache is broken. */
export function assertNoRemoteWarnings(stderr: string): void {
  const complaints = stderr
    .split("\n")
    .filter((line) => /^(WARNING|ERROR)\b/.test(line) && /remote|cache|grpc/i.test(line));
  assert.deepEqual(complaints, [], "Bazel complained about the remote cache");
}

/** The fields of Bazel's SpawnExec (src/main/protobuf/spawn.proto) the tests look at. */
export interface SpawnExec {
  commandArgs: string[];
  mnemonic: string;
  /** "remote", "remote cache hit", "local", "linux-sandbox", ... */
  runner: string;
  remoteCacheHit?: boolean;
  exitCode?: number;
  status?: string;
  listedOutputs?: string[];
  /** The platform Bazel sent (exec_properties and --remote_default_exec_properties). */
  platform?: { properties?: { name: string; value: string }[] };
}

/**
 * The spawns of one command, from --execution_log_json_file: Bazel 4 writes one pretty-printed JSON object per
 * spawn, back to back, the closing and the opening brace of two neighbours sharing the line "}{".
 */
export async function readExecutionLog(file: string): Promise<SpawnExec[]> {
  const text = (await readFile(file, "utf8")).trim();
  if (text === "") return [];
  return JSON.parse(`[${text.replace(/^\}\{$/gm, "},{")}]`) as SpawnExec[];
}

/**
 * A Bazel test's teardown: Bazel's server is shut down (when a workspace was made), then `stops` run in order
 * (the farm, the registry), then `root` goes, even when the shutdown failed. Bazel marks its output tree
 * read-only; force removal still succeeds as the owner.
 */
export async function tearDownBazel(
  root: string,
  workspace: string,
  startup: readonly string[],
  stops: readonly (() => Promise<unknown> | undefined)[],
): Promise<void> {
  try {
    if (root !== "" && existsSync(join(workspace, "WORKSPACE"))) {
      await runBazel(workspace, [...startup, "shutdown"], 60_000).catch(() => undefined);
    }
  } finally {
    for (const stop of stops) await stop();
    if (root !== "") await rm(root, { recursive: true, force: true });
  }
}

/** `berth serve` with one local worker, once that worker has joined. `log` collects its log's lines. */
export async function spawnFarm(args: string[], log: string[]): Promise<ServerProcess> {
  let joined: () => void = () => undefined;
  const workerJoined = new Promise<void>((resolve) => {
    joined = resolve;
  });
  const farm = await spawnBerth([...args, "--workers", "1"], [], (line) => {
    log.push(line);
    if (/worker \S+ connected to /.test(line)) joined();
  });
  let timer: NodeJS.Timeout | undefined;
  try {
    await Promise.race([
      workerJoined,
      new Promise((_, reject) => {
        timer = setTimeout(() => reject(new Error(`the worker did not join within 60 s:\n${log.join("\n")}`)), 60_000);
      }),
    ]);
  } catch (error) {
    await farm.stop();
    throw error;
  } finally {
    clearTimeout(timer);
  }
  return farm;
}
