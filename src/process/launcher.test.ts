import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { setTimeout as sleep } from "node:timers/promises";
import { fileURLToPath } from "node:url";
import { LAUNCH_FAILED, Launcher, type LaunchRequest } from "./launcher.js";

const isRoot = process.getuid?.() === 0;

async function scratch(t: { after(fn: () => Promise<void>): void }): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), "berth-launcher-"));
  t.after(() => rm(dir, { recursive: true, force: true }));
  return dir;
}

function shRequest(dir: string, script: string, extra: Partial<LaunchRequest> = {}): LaunchRequest {
  return {
    argv: ["sh", "-c", script],
    env: { PATH: "/usr/bin:/bin", GREETING: "hello there" },
    stdoutPath: join(dir, "out"),
    stderrPath: join(dir, "err"),
    fd3Path: join(dir, "fd3"),
    steps: [],
    ...extra,
  };
}

test("runs the program with exactly its environment, its files as stdout, stderr and fd 3, and reports its exit", async (t) => {
  const dir = await scratch(t);
  const launcher = new Launcher();
  t.after(() => launcher.close());
  const script = 'echo "$GREETING"; env | sort | tr "\\n" " " >&2; echo status >&3; read x; echo "stdin:$?"; exit 7';
  const launched = await launcher.launch(shRequest(dir, script));
  assert.ok(launched.pid > 0);
  assert.deepEqual(await launched.exited, { code: 7, signal: null });
  assert.equal(await readFile(join(dir, "out"), "utf8"), "hello there\nstdin:1\n");
  // sh adds PWD itself; nothing of this process's environment arrives.
  assert.equal(await readFile(join(dir, "err"), "utf8"), "GREETING=hello there PATH=/usr/bin:/bin PWD=/ ");
  assert.equal(await readFile(join(dir, "fd3"), "utf8"), "status\n");
});

test("leads its own process group, and a signal's end is reported as the signal", async (t) => {
  const dir = await scratch(t);
  const launcher = new Launcher();
  t.after(() => launcher.close());
  const launched = await launcher.launch(shRequest(dir, "sleep 30"));
  await sleep(200);
  const stat = await readFile(`/proc/${launched.pid}/stat`, "utf8");
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  assert.equal(Number(fields[2]), launched.pid, "process group");
  assert.equal(Number(fields[3]), launched.pid, "session");
  process.kill(-launched.pid, "SIGKILL");
  assert.deepEqual(await launched.exited, { code: null, signal: 9 });
});

test("many launches at once each get their own exit", async (t) => {
  const dir = await scratch(t);
  const launcher = new Launcher();
  t.after(() => launcher.close());
  const runs = await Promise.all(
    Array.from({ length: 20 }, (_, i) =>
      launcher.launch(shRequest(dir, `exit ${i}`, { stdoutPath: join(dir, `o${i}`), stderrPath: join(dir, `e${i}`) })),
    ),
  );
  const exits = await Promise.all(runs.map((run) => run.exited));
  assert.deepEqual(
    exits.map((exit) => exit.code),
    Array.from({ length: 20 }, (_, i) => i),
  );
});

test("a program that cannot be run ends with 126 and the reason on its stderr file", async (t) => {
  const dir = await scratch(t);
  const launcher = new Launcher();
  t.after(() => launcher.close());
  const launched = await launcher.launch({ ...shRequest(dir, ""), argv: ["/nonexistent/program"] });
  assert.deepEqual(await launched.exited, { code: 126, signal: null });
  assert.equal(
    await readFile(join(dir, "err"), "utf8"),
    `${LAUNCH_FAILED}cannot run /nonexistent/program: No such file or directory\n`,
  );
  await assert.rejects(launcher.launch(shRequest(dir, "echo a\0b")), /contains a NUL character/);
});

test("switches to the given user and drops root's groups", { skip: !isRoot && "needs root" }, async (t) => {
  const dir = await scratch(t);
  const launcher = new Launcher();
  t.after(() => launcher.close());
  const launched = await launcher.launch(
    shRequest(dir, "id -u; id -g; id -G", { user: { uid: 65534, gid: 65534 }, stdoutPath: join(dir, "id") }),
  );
  assert.deepEqual(await launched.exited, { code: 0, signal: null });
  assert.equal(await readFile(join(dir, "id"), "utf8"), "65534\n65534\n65534\n");
});

test("mounts made in a private mount namespace are seen by the program, never by the host", {
  skip: !isRoot && "needs root",
}, async (t) => {
  const dir = await scratch(t);
  const launcher = new Launcher();
  t.after(() => launcher.close());
  const mountPoint = join(dir, "mnt");
  const launched = await launcher.launch(
    shRequest(dir, `grep -c " ${mountPoint} " /proc/self/mountinfo; ls -d ${mountPoint}/made`, {
      steps: [
        { kind: "private" },
        { kind: "mkdir", path: mountPoint },
        { kind: "mount", source: "berth-test", target: mountPoint, type: "tmpfs", flags: 0, data: "mode=0700" },
        { kind: "mkdir", path: join(mountPoint, "made") },
      ],
    }),
  );
  assert.deepEqual(await launched.exited, { code: 0, signal: null });
  assert.equal(await readFile(join(dir, "out"), "utf8"), `1\n${mountPoint}/made\n`);
  const hostMounts = await readFile("/proc/self/mountinfo", "utf8");
  assert.ok(!hostMounts.includes(mountPoint));

  const failing = await launcher.launch(
    shRequest(dir, "true", {
      steps: [
        { kind: "private" },
        { kind: "mount", source: "x", target: join(dir, "absent"), type: "tmpfs", flags: 0, data: "" },
      ],
    }),
  );
  assert.deepEqual(await failing.exited, { code: 126, signal: null });
  assert.match(
    await readFile(join(dir, "err"), "utf8"),
    /^berth launcher: mount tmpfs x on .*absent: No such file or directory/,
  );
});

test("what a process started is killed when that process dies", async (t) => {
  // A separate Node.js process launches a long sleep, then is killed without any chance to clean up.
  const module = fileURLToPath(new URL("./launcher.js", import.meta.url));
  const program = `
    const { Launcher } = await import(${JSON.stringify(module)});
    const launched = await new Launcher().launch({
      argv: ["sleep", "60"], env: { PATH: "/usr/bin:/bin" },
      stdoutPath: "/dev/null", stderrPath: "/dev/null", fd3Path: "/dev/null", steps: [],
    });
    console.log(launched.pid);
    setInterval(() => {}, 1000);`;
  const owner = spawn(process.execPath, ["--input-type=module", "-e", program], {
    stdio: ["ignore", "pipe", "inherit"],
  });
  t.after(() => {
    owner.kill("SIGKILL");
  });
  const pid = Number((await new Promise<Buffer>((resolve) => owner.stdout.once("data", resolve))).toString());
  assert.ok(await alive(pid));
  owner.kill("SIGKILL");
  const deadline = Date.now() + 5000;
  while ((await alive(pid)) && Date.now() < deadline) await sleep(50);
  assert.equal(await alive(pid), false);
});

async function alive(pid: number): Promise<boolean> {
  try {
    const stat = await readFile(`/proc/${pid}/stat`, "utf8");
    return !/^\S+ \(.*\) [ZX]/.test(stat);
  } catch {
    return false;
  }
}
