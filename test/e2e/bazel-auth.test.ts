import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { mkdir, mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { type ServerProcess, spawnBerth } from "../support/farm.js";
import { assertInstalled, describeRun, processSummary, runBazel, startupOptions } from "./bazel.js";

/**
 * Bazel 4.2.3 against a `berth serve` that checks client tokens (auth.tokensFile): with
 * --remote_header=Authorization=Bearer TOKEN its build runs remotely; without it, or with a wrong token, the
 * farm refuses it (UNAUTHENTICATED) and nothing runs.
 */

const TOKEN = "bazel-ci-token-6f1c0b7e9d2a4c58b3e1";

describe("Bazel 4.2.3 with a bearer token (auth.tokensFile)", { timeout: 300_000 }, () => {
  let root = "";
  let workspace = "";
  let berth: ServerProcess | undefined;

  before(async () => {
    assertInstalled();
    root = await mkdtemp(join(tmpdir(), "berth-bazel-auth-"));
    workspace = join(root, "ws");
    await mkdir(workspace);
    await writeFile(join(workspace, "WORKSPACE"), 'workspace(name = "berth_auth")\n');
    await writeFile(
      join(workspace, "BUILD"),
      'genrule(name = "hello", outs = ["hello.txt"], cmd = "echo built with a token > $@")\n',
    );
    const sha = createHash("sha256").update(TOKEN).digest("hex");
    await writeFile(join(root, "tokens.yaml"), `tokens:\n  - { name: bazel-ci, sha256: ${sha}, instances: [""] }\n`, {
      mode: 0o600,
    });
    await writeFile(join(root, "berth.yaml"), `auth:\n  tokensFile: ${join(root, "tokens.yaml")}\n`);
    berth = await spawnBerth([
      "--data-dir",
      join(root, "data"),
      "--config",
      join(root, "berth.yaml"),
      "--workers",
      "1",
    ]);
  });
  after(async () => {
    await berth?.stop();
    if (root) {
      await runBazel(workspace, [...startupOptions(root), "shutdown"]).catch(() => {});
      await rm(root, { recursive: true, force: true });
    }
  });

  const build = (header: string | undefined) => {
    const args = [
      ...startupOptions(root),
      "build",
      `--remote_executor=grpc://${berth?.address}`,
      "--spawn_strategy=remote",
      "--color=no",
      "--curses=no",
      ...(header === undefined ? [] : [`--remote_header=Authorization=${header}`]),
      "//:hello",
    ];
    return runBazel(workspace, args).then((result) => ({ args, result }));
  };

  it("is refused without the header and with a wrong token, and builds remotely with the right one", async () => {
    for (const header of [undefined, "Bearer not-a-token-of-this-farm"]) {
      const { args, result } = await build(header);
      assert.notEqual(result.code, 0, describeRun(args, result));
      assert.match(result.stderr, /UNAUTHENTICATED/, describeRun(args, result));
    }
    const { args, result } = await build(`Bearer ${TOKEN}`);
    assert.equal(result.code, 0, describeRun(args, result));
    assert.equal(processSummary(result.stderr).counts.get("remote"), 1, describeRun(args, result));
    assert.equal(await readFile(join(workspace, "bazel-bin", "hello.txt"), "utf8"), "built with a token\n");
  });
});
