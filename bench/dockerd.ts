/** A dockerd of the benchmark's own, for the `docker run --rm` reference of the image benchmarks. */
import { type ChildProcess, execFile, spawn } from "node:child_process";
import { mkdir, open, readFile, rm, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { promisify } from "node:util";
import type { BenchContext } from "./context.js";
import { missing } from "./debian-image.js";

const run = promisify(execFile);

/** Debian's engine client (`/usr/local/bin/docker` on these machines is another one). */
export const DOCKER = "/usr/bin/docker";
const DOCKERD = "/usr/sbin/dockerd";

/** A dockerd started by the benchmark, with its state in one directory. */
export interface Dockerd {
  /** What the docker client needs in its environment to talk to it (and only to it). */
  env: Record<string, string>;
  version: string;
  stop(): Promise<void>;
}

/**
 * `dockerd` on a socket, data root and exec root of its own below `dir`, trusting the loopback registry over
 * plain HTTP; stopped and removed by `stop` (also registered with ctx.defer).
 */
export async function startDockerd(ctx: BenchContext, dir: string, registryHost: string): Promise<Dockerd> {
  await mkdir(join(dir, "client"), { recursive: true });
  const socket = join(dir, "docker.sock");
  const configFile = join(dir, "daemon.json");
  await writeFile(configFile, JSON.stringify({ "insecure-registries": [registryHost] }));
  const log = await open(join(dir, "dockerd.log"), "w");
  const args = [
    `--config-file=${configFile}`,
    `--host=unix://${socket}`,
    `--data-root=${join(dir, "data")}`,
    `--exec-root=${join(dir, "exec")}`,
    `--pidfile=${join(dir, "dockerd.pid")}`,
    "--iptables=false",
    "--ip-masq=false",
    "--bridge=none",
    "--storage-driver=overlay2",
  ];
  const child = spawn(DOCKERD, args, { stdio: ["ignore", log.fd, log.fd], cwd: dir });
  const failed = new Promise<never>((_, reject) => {
    child.once("error", (err) => reject(missing(err, "docker.io")));
    child.once("exit", (code, signal) => reject(new Error(`dockerd exited with ${code ?? signal}; see its log`)));
  });
  failed.catch(() => {});
  const env = { DOCKER_HOST: `unix://${socket}`, DOCKER_CONFIG: join(dir, "client") };
  let stopping: Promise<void> | undefined;
  const stop = () => {
    stopping ??= (async () => {
      await stopProcess(child, 30_000);
      // dockerd stops the containerd it started; should it have been killed instead, that containerd goes too.
      const containerdPid = Number(
        await readFile(join(dir, "exec", "containerd", "containerd.pid"), "utf8").catch(() => ""),
      );
      if (containerdPid > 0 && (await isContainerd(containerdPid))) process.kill(containerdPid, "SIGKILL");
      await log.close().catch(() => {});
      await unmountBelow(dir);
      await rm(dir, { recursive: true, force: true });
    })();
    return stopping;
  };
  ctx.defer(stop);
  const deadline = Date.now() + 60_000;
  for (;;) {
    const answer = await Promise.race([
      run(DOCKER, ["version", "--format", "{{.Server.Version}}"], { env: { ...process.env, ...env } }).then(
        (r) => r.stdout.trim(),
        () => undefined,
      ),
      failed,
    ]).catch(async (err: unknown) => {
      const text = await readFile(join(dir, "dockerd.log"), "utf8").catch(() => "");
      throw new Error(`${String(err)}: ${text.slice(-2000)}`);
    });
    if (answer !== undefined) return { env, version: answer, stop };
    if (Date.now() > deadline) throw new Error("dockerd did not answer within 60 s");
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

async function stopProcess(child: ChildProcess, graceMs: number): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise((resolve) => child.once("exit", resolve));
  child.kill("SIGTERM");
  const timer = setTimeout(() => child.kill("SIGKILL"), graceMs);
  await exited;
  clearTimeout(timer);
}

async function isContainerd(pid: number): Promise<boolean> {
  const cmdline = await readFile(`/proc/${pid}/cmdline`, "utf8").catch(() => "");
  return cmdline.split("\0")[0]?.endsWith("containerd") ?? false;
}

/** Unmounts whatever a killed dockerd may have left mounted below `dir`, deepest first. */
async function unmountBelow(dir: string): Promise<void> {
  const mountinfo = await readFile("/proc/self/mountinfo", "utf8");
  const points = mountinfo
    .split("\n")
    .map((line) => line.split(" ")[4])
    .filter((p): p is string => p !== undefined && (p === dir || p.startsWith(`${dir}/`)))
    .sort((a, b) => b.length - a.length);
  for (const point of points) await run("umount", ["-l", point]).catch(() => {});
}
