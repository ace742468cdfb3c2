import assert from "node:assert/strict";
import { type ChildProcess, spawn } from "node:child_process";
import { readFileSync } from "node:fs";
import { chmod, mkdtemp, readdir, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createInterface } from "node:readline";
import { after, before, test } from "node:test";
import { execute, readBlob, uploadAction } from "../../test/support/actions.js";
import { BERTH_BIN, connect, testUidBase } from "../../test/support/farm.js";
import { waitFor } from "../../test/support/wait.js";
import { Code } from "../status/status.js";

/**
 * `berth serve` as an operator starts it, from a process that holds a
 * writable file open on descriptor 20 without close-on-exec (a shell's
 * redirection, a service manager's socket): what an action can do with
 * that descriptor, and what is left of its sandbox when the worker dies.
 */
const isRoot = process.getuid?.() === 0;
const uidBase = testUidBase();
let dir: string;
let secretPath: string;
let serve: ChildProcess;
let address: string;

before(async () => {
  if (!isRoot) return;
  dir = await mkdtemp(join(tmpdir(), "berth-lifetime-"));
  await chmod(dir, 0o755);
  secretPath = join(dir, "server-log");
  await writeFile(secretPath, "");
  const configPath = join(dir, "config.json");
  await writeFile(configPath, JSON.stringify({ worker: { sandboxUidBase: uidBase } }));
  // Started the way a shell starts it after `exec 20<>file`: descriptor 20 open, without close-on-exec. (Node
  // itself reuses its lowest descriptors, so one below 10 would not reach its children anyway.)
  const serveArgs = ["serve", "--listen", "127.0.0.1:0", "--data-dir", join(dir, "data"), "--workers", "1"];
  serve = spawn(
    "/bin/bash",
    ["-c", 'exec 20<>"$0"; exec "$@"', secretPath, process.execPath, BERTH_BIN, ...serveArgs, "--config", configPath],
    { stdio: ["ignore", "pipe", "inherit"] },
  );
  // `berth serve` logs its address as JSON once it listens.
  const lines = createInterface({ input: serve.stdout as NodeJS.ReadableStream });
  address = await new Promise<string>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error("berth serve did not start within 20 s")), 20_000);
    lines.on("line", (line) => {
      const match = /berth listening on (\S+?)"/.exec(line);
      if (match?.[1]) {
        clearTimeout(timer);
        resolve(match[1]);
      }
    });
  });
});

after(async () => {
  if (!isRoot) return;
  if (serve.exitCode === null && serve.signalCode === null) {
    const exited = new Promise((resolve) => serve.once("exit", resolve));
    serve.kill("SIGTERM");
    await exited;
  }
  await rm(dir, { recursive: true, force: true });
});

test("a descriptor berth serve inherited does not reach an action", { skip: !isRoot }, async () => {
  const clients = connect(address);
  try {
    const script = "echo planted >&20; echo planted > /proc/self/fd/20; ls /proc/self/fd; exit 0";
    const digest = await uploadAction(clients, { args: ["/bin/bash", "-c", script], salt: "fd" });
    const { response } = await execute(clients, digest, { skipCacheLookup: true });
    assert.equal(response.status?.code ?? Code.OK, Code.OK, response.status?.message);
    const stderr = await readBlob(clients, response.result?.stderrDigest);
    assert.match(stderr, /20: Bad file descriptor/);
    assert.match(stderr, /\/proc\/self\/fd\/20: No such file or directory/);
    const open = (await readBlob(clients, response.result?.stdoutDigest)).trim().split("\n").map(Number);
    assert.ok(!open.includes(20), `descriptors open in the action: ${open.join(" ")}`);
    assert.equal(await readFile(secretPath, "utf8"), "");
  } finally {
    clients.close();
  }
});

test("killing the worker process and its launcher mid-action leaves no process of its sandbox", {
  skip: !isRoot,
}, async () => {
  const clients = connect(address);
  const digest = await uploadAction(clients, {
    args: ["/bin/sh", "-c", "setsid sleep 300 & sleep 300"],
    salt: "orphan",
    timeoutSeconds: 600,
  });
  // Never awaited: the action runs until the farm stops.
  void execute(clients, digest, { skipCacheLookup: true }).catch(() => undefined);
  try {
    const sandboxed = await waitFor("the action's processes", async () => {
      const found = await processesOf(uidBase);
      return found.filter((p) => p.command.startsWith("sleep 300")).length >= 2 ? found : undefined;
    });
    const worker = (await processes()).find((p) => p.ppid === serve.pid && p.command.includes(" worker "));
    assert.ok(worker, "berth serve's worker process");
    const launcher = (await processes()).find((p) => p.ppid === worker.pid && p.command.includes("launcher.pl"));
    assert.ok(launcher, "the worker's sandbox launcher");
    // The worker and its launcher die at once (the OOM killer, `kill -9` on the worker's process group): no
    // one is left to close a pipe or kill a process group. bwrap, the sandbox and the sleep that left its
    // process group must go with them all the same.
    process.kill(worker.pid, "SIGKILL");
    process.kill(launcher.pid, "SIGKILL");
    const watched = sandboxed;
    await waitFor("the sandbox to die with its worker", async () => {
      const left = watched.filter((p) => alive(p.pid, p.start));
      return left.length === 0 ? true : undefined;
    }).catch(async () => {
      const left = watched.filter((p) => alive(p.pid, p.start));
      assert.fail(`still running: ${left.map((p) => `${p.pid} ${p.command}`).join("; ")}`);
    });
  } finally {
    clients.close();
  }
});

interface HostProcess {
  pid: number;
  ppid: number;
  uid: number;
  /** Start time in clock ticks, to tell a reused pid apart. */
  start: string;
  command: string;
}

async function processes(): Promise<HostProcess[]> {
  const found: HostProcess[] = [];
  for (const entry of await readdir("/proc")) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const status = await readFile(`/proc/${entry}/status`, "utf8");
      const stat = await readFile(`/proc/${entry}/stat`, "utf8");
      const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
      const command = (await readFile(`/proc/${entry}/cmdline`, "utf8")).split("\0").join(" ").trim();
      found.push({
        pid: Number(entry),
        ppid: Number(fields[1]),
        uid: Number(/^Uid:\s+(\d+)/m.exec(status)?.[1]),
        start: fields[19] ?? "",
        command,
      });
    } catch {
      // Exited while we looked.
    }
  }
  return found;
}

/** Processes of the sandbox uid of the (only) slot. */
async function processesOf(uid: number): Promise<HostProcess[]> {
  return (await processes()).filter((p) => p.uid === uid);
}

function alive(pid: number, start: string): boolean {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    return fields[19] === start && fields[0] !== "Z";
  } catch {
    return false;
  }
}
