import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { describe, test } from "node:test";
import { bazelWorkerAction, TOOL_PATH } from "../../test/support/persistent-actions.js";
import { Command } from "../gen/build/bazel/remote/execution/v2/remote_execution.js";
import { Code, type StatusError } from "../status/status.js";
import { DEFAULT_FLAGFILE_LIMITS, PERSISTENT_WORKER_FLAG, persistentWorkerSpec } from "./persistent-action.js";

const PARAMS = "bazel-out/k8-fastbuild/bin/pkg/out-0.params";

function invalid(field: RegExp, message: RegExp) {
  return (err: StatusError) => {
    assert.equal(err.code, Code.INVALID_ARGUMENT, err.message);
    assert.match(err.details.fieldViolations?.[0]?.field ?? "", field);
    assert.match(err.message, message);
    return true;
  };
}

describe("a Bazel 6 persistent-worker action", () => {
  test("starts its tool with the arguments that are not flagfiles and --persistent_worker", async () => {
    const built = await bazelWorkerAction({ requestArgs: ["-o", "out.txt"], startupArgs: ["--startup-delay=0"] });
    const spec = await persistentWorkerSpec(built.action, built.command, built.inputs);
    assert.ok(spec);
    assert.deepEqual(spec.launch.argv, [
      "/usr/bin/python3",
      TOOL_PATH,
      "--protocol=proto",
      "--startup-delay=0",
      PERSISTENT_WORKER_FLAG,
    ]);
    assert.deepEqual(spec.launch.env, { PATH: "/usr/bin:/bin" });
    assert.equal(spec.protocol, "proto", "no persistentWorkerProtocol: proto, as Bazel's workers default to");
    assert.deepEqual(spec.request.arguments, ["-o", "out.txt"]);
    assert.equal(spec.request.requestId, 0);
    assert.deepEqual(spec.toolInputs, [TOOL_PATH]);
  });

  test("sends every input file with the hex of its digest, as UTF-8 bytes, the tool and the flagfile included", async () => {
    const built = await bazelWorkerAction({ requestArgs: ["x"], sources: { "pkg/a.txt": "a", "pkg/sub/b.txt": "b" } });
    const spec = await persistentWorkerSpec(built.action, built.command, built.inputs);
    assert.ok(spec);
    const hex = (text: string) => createHash("sha256").update(text).digest("hex");
    const inputs = Object.fromEntries(spec.request.inputs.map((i) => [i.path, Buffer.from(i.digest).toString()]));
    assert.deepEqual(Object.keys(inputs), [PARAMS, TOOL_PATH, "pkg/a.txt", "pkg/sub/b.txt"]);
    assert.equal(inputs["pkg/a.txt"], hex("a"));
    assert.equal(inputs["pkg/sub/b.txt"], hex("b"));
    assert.equal(inputs[PARAMS], hex("x\n"));
  });

  test("reads json, proto and protobuf from persistentWorkerProtocol; anything else is INVALID_ARGUMENT naming it", async () => {
    for (const [value, protocol] of [
      ["json", "json"],
      ["proto", "proto"],
      ["protobuf", "proto"],
    ] as const) {
      const built = await bazelWorkerAction({ requestArgs: ["x"], protocol: value });
      assert.equal((await persistentWorkerSpec(built.action, built.command, built.inputs))?.protocol, protocol);
    }
    const built = await bazelWorkerAction({ requestArgs: ["x"], protocol: "xml" });
    await assert.rejects(
      persistentWorkerSpec(built.action, built.command, built.inputs),
      invalid(/^platform property persistentWorkerProtocol$/, /"xml" is not a worker protocol; use json or proto/),
    );
  });

  test("is not one without persistentWorkerKey: the Command runs as it is", async () => {
    const built = await bazelWorkerAction({ requestArgs: ["x"] });
    const action = { ...built.action, platform: { properties: [] } };
    const command = { ...built.command, platform: { properties: [] } };
    assert.equal(await persistentWorkerSpec(action, command, built.inputs), undefined);
  });

  test("takes the platform from the Command when the Action has none (REAPI 2.0 clients)", async () => {
    const built = await bazelWorkerAction({ requestArgs: ["x"], protocol: "json" });
    const action = { ...built.action, platform: undefined };
    assert.equal((await persistentWorkerSpec(action, built.command, built.inputs))?.protocol, "json");
  });

  test("with persistentWorkerKey twice is INVALID_ARGUMENT", async () => {
    const built = await bazelWorkerAction({
      requestArgs: ["x"],
      properties: [{ name: "persistentWorkerKey", value: "b" }],
    });
    await assert.rejects(
      persistentWorkerSpec(built.action, built.command, built.inputs),
      invalid(/^platform property persistentWorkerKey$/, /given 2 times/),
    );
  });

  test("expands nested @flagfiles line by line, leaves @@escaped, external labels and --flagfile= as they are", async () => {
    const built = await bazelWorkerAction({
      requestArgs: ["first", "@pkg/more.params", "@@literal", "@repo//pkg:label", "--flagfile=pkg/other.flags", "last"],
      sources: { "pkg/more.params": "nested 1\r\n\nnested 3\n@pkg/deeper.params", "pkg/deeper.params": "deepest" },
      flagfileArgs: [`@${PARAMS}`, "--flagfile=pkg/tool.flags", "-flagfile=pkg/tool2.flags"],
    });
    const spec = await persistentWorkerSpec(built.action, built.command, built.inputs);
    assert.ok(spec);
    assert.deepEqual(spec.request.arguments, [
      "first",
      "nested 1",
      "",
      "nested 3",
      "deepest",
      "@@literal",
      "@repo//pkg:label",
      "--flagfile=pkg/other.flags",
      "last",
      "--flagfile=pkg/tool.flags",
      "-flagfile=pkg/tool2.flags",
    ]);
    assert.ok(!spec.launch.argv.some((a) => a.includes("flagfile")), "flagfile arguments are not start-up arguments");
  });

  test("resolves flagfiles against the working directory, inside the input root", async () => {
    const built = await bazelWorkerAction({ requestArgs: ["x"] });
    const command = Command.fromPartial({
      ...built.command,
      workingDirectory: "pkg",
      arguments: [...built.command.arguments],
    });
    command.arguments[command.arguments.length - 1] = `@../${PARAMS}`;
    const spec = await persistentWorkerSpec(built.action, command, built.inputs);
    assert.deepEqual(spec?.request.arguments, ["x"]);
    assert.equal(spec?.launch.workingDirectory, "pkg");
  });

  test("whose working directory leaves the input root is INVALID_ARGUMENT (the process would start there)", async () => {
    const built = await bazelWorkerAction({ requestArgs: ["x"] });
    for (const workingDirectory of ["../..", "/etc", "pkg/../../x"]) {
      const command = { ...built.command, workingDirectory };
      await assert.rejects(
        persistentWorkerSpec(built.action, command, built.inputs),
        invalid(/^Command\.working_directory$/, /is outside the input root/),
      );
    }
  });

  test("whose flagfile is not in the input root is INVALID_ARGUMENT naming the argument", async () => {
    const built = await bazelWorkerAction({ requestArgs: ["x"], omitParamsFile: true });
    const index = built.command.arguments.length - 1;
    await assert.rejects(
      persistentWorkerSpec(built.action, built.command, built.inputs),
      invalid(
        new RegExp(`^Command\\.arguments\\[${index}\\]$`),
        /flagfile "@bazel-out\/.*out-0\.params" is not a file of the input root/,
      ),
    );
  });

  test("cannot read a file outside the input root through a flagfile, directly or from a flagfile", async () => {
    for (const flagfileArgs of [["@../../../../etc/passwd"], ["@/etc/passwd"], [`@${PARAMS}`]]) {
      const built = await bazelWorkerAction({ requestArgs: ["@../../etc/shadow"], flagfileArgs });
      await assert.rejects(
        persistentWorkerSpec(built.action, built.command, built.inputs),
        invalid(/^Command\.arguments\[3\]/, /is outside the input root/),
      );
    }
  });

  test("whose flagfile names itself fails at the depth limit instead of overflowing the stack", async () => {
    const built = await bazelWorkerAction({
      requestArgs: ["x"],
      sources: { "loop.params": "@loop.params\n" },
      flagfileArgs: ["@loop.params"],
    });
    await assert.rejects(
      persistentWorkerSpec(built.action, built.command, built.inputs),
      invalid(/^Command\.arguments\[3\]/, new RegExp(`more than ${DEFAULT_FLAGFILE_LIMITS.maxDepth} deep`)),
    );
  });

  test("whose flagfiles exceed the byte limit (one large, or one read many times) is INVALID_ARGUMENT", async () => {
    const limits = { maxBytes: 1000, maxDepth: 16 };
    const large = await bazelWorkerAction({ requestArgs: ["x".repeat(2000)] });
    await assert.rejects(
      persistentWorkerSpec(large.action, large.command, large.inputs, { limits }),
      invalid(/^Command\.arguments\[3\]$/, /may hold 1000 bytes/),
    );
    // 300 bytes named 10 times: each small, together past the limit (a flagfile bomb).
    const bomb = await bazelWorkerAction({
      requestArgs: Array.from({ length: 10 }, () => "@pkg/part.params"),
      sources: { "pkg/part.params": "y".repeat(300) },
    });
    await assert.rejects(
      persistentWorkerSpec(bomb.action, bomb.command, bomb.inputs, { limits }),
      invalid(/Command\.arguments\[3\]/, /may hold 1000 bytes/),
    );
  });

  test("whose flagfile is not UTF-8 is INVALID_ARGUMENT", async () => {
    const built = await bazelWorkerAction({
      requestArgs: ["x"],
      flagfileArgs: ["@bin.params"],
      sources: { "bin.params": "" },
    });
    const inputs = { ...built.inputs, readFile: async () => Buffer.from([0xff, 0xfe, 0x00]) };
    await assert.rejects(
      persistentWorkerSpec(built.action, built.command, inputs),
      invalid(/Command\.arguments\[3\]/, /not UTF-8/),
    );
  });

  test("without any flagfile, or with nothing but flagfiles, is INVALID_ARGUMENT on Command.arguments", async () => {
    const none = await bazelWorkerAction({ requestArgs: ["x"], flagfileArgs: ["plain-argument"] });
    await assert.rejects(
      persistentWorkerSpec(none.action, none.command, none.inputs),
      invalid(/^Command\.arguments$/, /none of its 4 arguments is an @flagfile or --flagfile= argument/),
    );
    const only = await bazelWorkerAction({ requestArgs: ["x"] });
    const command = { ...only.command, arguments: [`@${PARAMS}`] };
    await assert.rejects(
      persistentWorkerSpec(only.action, command, only.inputs),
      invalid(/^Command\.arguments$/, /no tool to start/),
    );
  });

  test("gets one key for one tool, and another key when the tool, its arguments, its environment or its key differ", async () => {
    const keyOf = async (spec: Parameters<typeof bazelWorkerAction>[0], scope?: string) => {
      const built = await bazelWorkerAction(spec);
      return (await persistentWorkerSpec(built.action, built.command, built.inputs, { scope }))?.key;
    };
    const base = await keyOf({ requestArgs: ["a"], workerKey: "k" });
    assert.equal(await keyOf({ requestArgs: ["other request"], sources: { "other.txt": "y" }, workerKey: "k" }), base);
    const others = [
      await keyOf({ requestArgs: ["a"], workerKey: "k", tool: "#!/usr/bin/python3\nprint('another tool')\n" }),
      await keyOf({ requestArgs: ["a"], workerKey: "k", startupArgs: ["--x"] }),
      await keyOf({ requestArgs: ["a"], workerKey: "k", env: { PATH: "/bin", SECRET_MODE: "1" } }),
      await keyOf({ requestArgs: ["a"], workerKey: "k", protocol: "json" }),
      await keyOf({ requestArgs: ["a"], workerKey: "another" }),
      await keyOf({ requestArgs: ["a"], workerKey: "k" }, "instance-b"),
    ];
    assert.equal(new Set([base, ...others]).size, others.length + 1);
  });
});
