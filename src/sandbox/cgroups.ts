import { existsSync, mkdirSync, readdirSync, readFileSync, rmdirSync, writeFileSync } from "node:fs";
import { basename, dirname, join } from "node:path";

/** What a slot's cgroup holds an action to; 0 leaves that resource unbounded. */
export interface CgroupLimits {
  memoryBytes: number;
  processes: number;
}

/** How often the slot's actions hit a limit since the cgroup was made (the kernel's counters only grow). */
export interface CgroupEvents {
  /** Processes the kernel's OOM killer ended because the cgroup's memory was used up. */
  oomKills: number;
  /** fork/clone calls refused because the cgroup held pids.max tasks. */
  forkRefusals: number;
}

/**
 * One executor slot's cgroup (or the pair of them, on cgroup v1): the
 * slot's sandbox joins it before bwrap runs, so every process of the action
 * counts against its memory and process limits, and `killAll` reaches
 * even processes that left the sandbox's process group.
 */
export interface SlotCgroup {
  /** Which hierarchy, for messages: "cgroup v2" or "cgroup v1". */
  readonly kind: string;
  /** The `cgroup.procs` files the sandbox's first process writes itself into. */
  readonly procsFiles: readonly string[];
  /** Whether it bounds memory (else the sandbox falls back to RLIMIT_AS). */
  readonly boundsMemory: boolean;
  events(): CgroupEvents;
  /** The memory its processes hold now (0 when it cannot be read). */
  memoryBytes(): number;
  /** SIGKILLs every process still in it but `spared` (the slot's launcher, which lives in it). */
  killAll(spared?: number): void;
}

const V2_ROOT = "/sys/fs/cgroup";
const V1_ROOT = "/sys/fs/cgroup";
/** The leaf the worker's own processes move to on cgroup v2, where a cgroup with processes has no children with controllers. */
const V2_WORKER_LEAF = "berth-worker";

/**
 * The slot's cgroup, made below the worker's own cgroup as
 * `berth-<worker pid>-slot-<slot>`, or undefined when this host gives the
 * worker none it can write to; then the caller falls back to rlimits. The
 * cgroups of workers no longer alive (killed, crashed) are emptied, their
 * processes killed, and removed first: whatever survived them dies now.
 * Named by pid so that two workers (two farms' tests, say) never share one.
 *
 * Why a cgroup per slot and not per action: a slot runs one action at a
 * time, its limits never change, and making and removing two directories
 * per action would cost more than the reading of a counter before and after.
 *
 * cgroup v2 (a standard host, where /sys/fs/cgroup is the unified hierarchy)
 * needs the memory and pids controllers delegated to the worker's cgroup
 * (systemd: Delegate=yes on the worker's unit, or running as root outside
 * a unit). cgroup v1 (this project's build machine: memory and pids under
 * /sys/fs/cgroup/{memory,pids}) needs write access to both hierarchies.
 */
export function openSlotCgroup(slot: number, limits: CgroupLimits): SlotCgroup | undefined {
  if (process.getuid?.() !== 0) return undefined;
  const name = `berth-${process.pid}-slot-${slot}`;
  try {
    return openV2(name, limits) ?? openV1(name, limits);
  } catch {
    return undefined;
  }
}

const SLOT_CGROUP = /^berth-(\d+)-slot-\d+$/;

/** Kills what is left in the slot cgroups of dead workers below `parent`, and removes them. */
function sweepOrphans(parent: string): void {
  let entries: string[];
  try {
    entries = readdirSync(parent);
  } catch {
    return;
  }
  for (const entry of entries) {
    const pid = Number(SLOT_CGROUP.exec(entry)?.[1]);
    if (!pid || alive(pid)) continue;
    const dir = join(parent, entry);
    if (!tryWrite(join(dir, "cgroup.kill"), "1")) killListed(join(dir, "cgroup.procs"));
    for (let attempt = 0; attempt < 20; attempt++) {
      try {
        rmdirSync(dir);
        break;
      } catch {
        // Busy until its killed processes are reaped.
        Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 50);
      }
    }
  }
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === "EPERM";
  }
}

/** The cgroup of this process in each hierarchy of /proc/self/cgroup: "" for v2's, else the controller names. */
function ownCgroups(): Map<string, string> {
  const paths = new Map<string, string>();
  for (const line of readFileSync("/proc/self/cgroup", "utf8").split("\n")) {
    const match = /^\d+:([^:]*):(.*)$/.exec(line);
    if (!match) continue;
    for (const controller of (match[1] ?? "").split(",")) paths.set(controller, match[2] ?? "/");
  }
  return paths;
}

function openV2(name: string, limits: CgroupLimits): SlotCgroup | undefined {
  let own = ownCgroups().get("");
  const controllers = readOr(join(V2_ROOT, "cgroup.controllers"), "").split(/\s+/);
  if (own === undefined || !controllers.includes("memory") || !controllers.includes("pids")) return undefined;
  // After the first slot, this process already sits in the leaf it made; the slots go beside it.
  if (basename(own) === V2_WORKER_LEAF) own = dirname(own);
  const parent = join(V2_ROOT, own);
  const available = readOr(join(parent, "cgroup.controllers"), "").split(/\s+/);
  if (!available.includes("memory") || !available.includes("pids")) return undefined;
  const enabled = readOr(join(parent, "cgroup.subtree_control"), "").split(/\s+/);
  if (!enabled.includes("memory") || !enabled.includes("pids")) {
    // No internal processes: this cgroup's own processes move to a leaf first, then its children may
    // have controllers.
    const leaf = join(parent, V2_WORKER_LEAF);
    mkdirSync(leaf, { recursive: true });
    for (const pid of readOr(join(parent, "cgroup.procs"), "").split("\n").filter(Boolean)) {
      try {
        writeFileSync(join(leaf, "cgroup.procs"), pid);
      } catch {
        // Gone meanwhile, or a kernel thread.
      }
    }
    writeFileSync(join(parent, "cgroup.subtree_control"), "+memory +pids");
  }
  sweepOrphans(parent);
  const dir = join(parent, name);
  mkdirSync(dir, { recursive: true });
  const cgroup: SlotCgroup = {
    kind: "cgroup v2",
    procsFiles: [join(dir, "cgroup.procs")],
    boundsMemory: limits.memoryBytes > 0,
    events: () => ({
      oomKills: counter(join(dir, "memory.events"), "oom_kill"),
      forkRefusals: counter(join(dir, "pids.events"), "max"),
    }),
    memoryBytes: () => numberIn(join(dir, "memory.current")),
    killAll: (spared) => {
      // cgroup.kill (Linux 5.14) kills atomically, new forks included, but spares nothing; older kernels, and a
      // cgroup holding its launcher, get one signal per process.
      if (spared !== undefined || !tryWrite(join(dir, "cgroup.kill"), "1"))
        killListed(join(dir, "cgroup.procs"), spared);
    },
  };
  writeFileSync(join(dir, "memory.max"), limits.memoryBytes > 0 ? String(limits.memoryBytes) : "max");
  // Without swap the limit is one of memory; with it an action would page instead of ending.
  tryWrite(join(dir, "memory.swap.max"), "0");
  writeFileSync(join(dir, "pids.max"), pidsMax(limits));
  return cgroup;
}

function openV1(name: string, limits: CgroupLimits): SlotCgroup | undefined {
  const own = ownCgroups();
  const memoryOwn = own.get("memory");
  const pidsOwn = own.get("pids");
  const memoryRoot = join(V1_ROOT, "memory");
  const pidsRoot = join(V1_ROOT, "pids");
  if (memoryOwn === undefined || pidsOwn === undefined) return undefined;
  if (!existsSync(join(memoryRoot, "memory.limit_in_bytes")) || !existsSync(join(pidsRoot, "cgroup.procs"))) {
    return undefined;
  }
  sweepOrphans(join(memoryRoot, memoryOwn));
  sweepOrphans(join(pidsRoot, pidsOwn));
  const memory = join(memoryRoot, memoryOwn, name);
  const pids = join(pidsRoot, pidsOwn, name);
  mkdirSync(memory, { recursive: true });
  mkdirSync(pids, { recursive: true });
  const cgroup: SlotCgroup = {
    kind: "cgroup v1",
    procsFiles: [join(memory, "cgroup.procs"), join(pids, "cgroup.procs")],
    boundsMemory: limits.memoryBytes > 0,
    events: () => ({
      oomKills: counter(join(memory, "memory.oom_control"), "oom_kill"),
      forkRefusals: counter(join(pids, "pids.events"), "max"),
    }),
    memoryBytes: () => numberIn(join(memory, "memory.usage_in_bytes")),
    killAll: (spared) => {
      killListed(join(pids, "cgroup.procs"), spared);
      killListed(join(memory, "cgroup.procs"), spared);
    },
  };
  const memoryLimit = limits.memoryBytes > 0 ? String(limits.memoryBytes) : "-1";
  writeFileSync(join(memory, "memory.limit_in_bytes"), memoryLimit);
  // memory+swap, when the kernel accounts swap: equal to the memory limit, so no swap at all. It must not
  // be below memory.limit_in_bytes, which is why it is written second.
  tryWrite(join(memory, "memory.memsw.limit_in_bytes"), memoryLimit);
  writeFileSync(join(pids, "pids.max"), pidsMax(limits));
  return cgroup;
}

/** The number a cgroup file holds, or 0 when it cannot be read. */
function numberIn(path: string): number {
  try {
    const value = Number(readFileSync(path, "utf8").trim());
    return Number.isFinite(value) ? value : 0;
  } catch {
    return 0;
  }
}

/** The slot's launcher lives in its cgroup (see process/launcher.ts): one task more than the action's own. */
function pidsMax(limits: CgroupLimits): string {
  return limits.processes > 0 ? String(limits.processes + 1) : "max";
}

/** Kills what is left in a slot's cgroup and removes it, when its worker stops. */
export function removeSlotCgroup(cgroup: SlotCgroup): void {
  cgroup.killAll();
  for (const procs of cgroup.procsFiles) {
    try {
      rmdirSync(join(procs, ".."));
    } catch {
      // Still busy with a dying process; the next worker reuses it.
    }
  }
}

/** `name N` from a flat-keyed cgroup file such as memory.events. */
function counter(path: string, name: string): number {
  for (const line of readOr(path, "").split("\n")) {
    const [key, value] = line.split(" ");
    if (key === name) return Number(value) || 0;
  }
  return 0;
}

function killListed(procsFile: string, spared?: number): void {
  // A process may fork while we kill; a few rounds catch what a bounded cgroup can start.
  for (let round = 0; round < 5; round++) {
    const pids = readOr(procsFile, "")
      .split("\n")
      .filter(Boolean)
      .map(Number)
      .filter((pid) => pid !== spared);
    if (pids.length === 0) return;
    for (const pid of pids) {
      try {
        process.kill(pid, "SIGKILL");
      } catch {
        // Already gone.
      }
    }
  }
}

function readOr(path: string, fallback: string): string {
  try {
    return readFileSync(path, "utf8").trim();
  } catch {
    return fallback;
  }
}

function tryWrite(path: string, data: string): boolean {
  try {
    writeFileSync(path, data);
    return true;
  } catch {
    return false;
  }
}
