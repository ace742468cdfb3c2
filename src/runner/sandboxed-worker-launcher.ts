import { mkdirSync, rmSync } from "node:fs";
import { join } from "node:path";
import type { LaunchedProcess, WorkerLaunch, WorkerProcessLauncher } from "../persistent/launcher.js";
import type { ResidentSandbox } from "../sandbox/resident-sandbox.js";
import { type ResidentSettings, startResident } from "./resident.js";
import type { RunnerIdentities } from "./warm-pool.js";

/** The ids a persistent worker has inside its sandbox, as any action on the host's root: nobody. */
const NOBODY = { uid: 65534, gid: 65534 };

/**
 * Starts each persistent worker process in a resident sandbox of its own
 * (a warm runner's: the host's root read-only, its input root bound at
 * /run/berth/execroot, no network, limits), with host ids and a cgroup of
 * its own: the tool an action brings runs as confined as the action would,
 * and one key's process cannot see another's files or processes.
 */
export class SandboxedWorkerLauncher implements WorkerProcessLauncher {
  private started = 0;

  constructor(
    private readonly dir: string,
    private readonly identities: RunnerIdentities,
    private readonly settings: ResidentSettings,
  ) {
    rmSync(dir, { recursive: true, force: true });
    mkdirSync(dir, { recursive: true, mode: 0o700 });
  }

  async launch(launch: WorkerLaunch, prepare?: (inputRoot: string) => Promise<void>): Promise<LaunchedProcess> {
    const identity = this.identities.acquire();
    const dir = join(this.dir, String(this.started++));
    const cleanUp = () => {
      identity.cgroup?.killAll();
      rmSync(dir, { recursive: true, force: true });
      this.identities.release(identity);
    };
    let sandbox: ResidentSandbox | undefined;
    try {
      const shape = { root: { kind: "host" as const }, user: NOBODY, network: false };
      const started = await startResident(dir, shape, identity, this.settings);
      sandbox = started.sandbox;
      // The input root is bound already; the tool's files must be in it before the tool starts.
      const workspace = started.workspace;
      await prepare?.(workspace);
      const env = Object.entries(launch.env).map(([name, value]) => ({ name, value }));
      const piped = await sandbox.spawnPiped([...launch.argv], env, launch.workingDirectory);
      const running = sandbox;
      const exited = piped.exited.then(async (code) => {
        // The process is gone; so goes its sandbox, with anything it left running, and its files.
        await running.close().catch(() => {});
        cleanUp();
        return { code, signal: null };
      });
      return {
        pid: sandbox.agentPid ?? 0,
        inputRoot: workspace,
        stdin: piped.stdin,
        stdout: piped.stdout,
        stderr: piped.stderr,
        exited,
        kill: () => {
          piped.kill();
          void running.close().catch(() => {});
        },
      };
    } catch (err) {
      await sandbox?.close().catch(() => {});
      cleanUp();
      throw err;
    }
  }
}
