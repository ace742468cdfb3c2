import { availableParallelism, hostname } from "node:os";
import { join } from "node:path";
import type { Logger } from "../log/log.js";
import { BubblewrapSandbox } from "../sandbox/bubblewrap.js";
import type { Property } from "../scheduler/platform.js";
import { DirectoryCache } from "./directory-cache.js";
import { FileCache } from "./file-cache.js";
import type { TreeOwner } from "./input-root.js";
import { RemoteCas } from "./remote-cas.js";
import { Trash } from "./trash.js";
import { Worker } from "./worker.js";

export interface WorkerPoolOptions {
  /** The farm to join (scheduler and CAS). */
  address: string;
  /** How many workers, each running one action at a time. */
  count: number;
  /** Below it: the shared file cache and each action's directory. */
  workDir: string;
  properties: Property[];
  /** Prefix of the workers' names. */
  name?: string;
  log: Logger;
}

/** The user actions run as: `nobody` when the worker can switch to it, else the worker's own. */
export function actionUser(): TreeOwner {
  const root = process.getuid?.() === 0;
  return root ? { uid: 65534, gid: 65534 } : { uid: process.getuid?.() ?? 0, gid: process.getgid?.() ?? 0 };
}

export function defaultWorkerCount(): number {
  return availableParallelism();
}

/** Workers sharing one file cache and one connection to the CAS; `stop` ends them all. */
export async function startWorkers(options: WorkerPoolOptions): Promise<{ stop(): Promise<void> }> {
  const cache = await FileCache.open(join(options.workDir, "cache"));
  const cas = RemoteCas.connect(options.address);
  const owner = actionUser();
  const directories = new DirectoryCache();
  const trash = await Trash.open(join(options.workDir, "trash"));
  const sandbox = new BubblewrapSandbox({ uid: owner.uid, gid: owner.gid });
  const prefix = options.name ?? `${hostname()}-${process.pid}`;
  const workers = Array.from({ length: options.count }, (_, i) => {
    const workerName = `${prefix}-${i}`;
    return new Worker({
      hubAddress: options.address,
      workerName,
      properties: options.properties,
      slots: 1,
      workDir: join(options.workDir, "actions"),
      cas,
      cache,
      directories,
      trash,
      sandbox,
      owner: process.getuid?.() === 0 ? owner : undefined,
      log: options.log,
    });
  });
  for (const worker of workers) worker.start();
  return {
    stop: async () => {
      await Promise.all(workers.map((w) => w.stop()));
      cas.close();
      await trash.drain();
    },
  };
}
