import { type ChildProcess, spawn } from "node:child_process";
import { constants, createWriteStream } from "node:fs";
import { chmod, chown, type FileHandle, open, readFile, rm } from "node:fs/promises";
import { createServer, type Server, type Socket } from "node:net";
import { join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { AgentConnection, type GuestCommandResult, type GuestRunOptions } from "./agent-connection.js";
import type { GuestCommand, GuestDirectoryMode } from "./agent-protocol.js";
import { type ConsoleLog, startConsoleLog } from "./console-log.js";
import type { RootDiskFormat } from "./disk-image.js";
import type { GuestAssets } from "./guest-assets.js";
import { QmpClient } from "./qmp.js";

/** kvm where the host's /dev/kvm runs the guest (found by probeAccelerator), tcg (software) elsewhere. */
export type Accelerator = "kvm" | "tcg";

export interface QemuVmOptions {
  assets: GuestAssets;
  /** A private directory of this VM (short: it holds unix sockets): agent and QMP sockets, console log. */
  runDir: string;
  /** Mounted read-only as the guest's lower root (QEMU opens it read-only too). */
  rootDisk: string;
  rootFormat?: RootDiskFormat;
  /** The VM's writable disk: ext4 (createScratchDisk), raw or a qcow2 overlay of a snapshot's scratch disk. */
  scratchDisk: string;
  scratchFormat?: "raw" | "qcow2";
  accelerator?: Accelerator;
  memoryBytes?: number;
  vcpus?: number;
  qemuPath?: string;
  /** A cold boot (or a resume) that has no answering agent by then fails; default 60 s. */
  bootTimeoutMs?: number;
  /** A snapshot file (QemuVm.snapshot) to resume instead of booting: the same disks and options it was taken with. */
  resumeFrom?: string;
  /** The serial console's log (RUN_DIR/console.log) keeps at most this much; default 1 MiB. */
  consoleLogMaxBytes?: number;
  /** PCIe root ports left empty for disks attached later (attachDisk), e.g. an action's inputs; default 2. */
  hotplugSlots?: number;
  /** More of QEMU's options, after the ones above. */
  extraArgs?: readonly string[];
  /** A host directory the guest mounts as 9p with this tag (QEMU's `local` driver, ownership passed through). */
  share?: { path: string; tag: string };
  /**
   * The ids QEMU runs as (setpriv drops to them before QEMU starts): what a guest that broke out of its VM, or
   * writes through the share, gets on the host. QEMU then reaches every file through a descriptor the worker
   * opened (the worker's data directory is not theirs to walk); runDir and the scratch disk are given to them.
   */
  runAs?: { uid: number; gid: number };
  /**
   * A command QEMU is started through, as root before setpriv drops it to runAs: the network namespace of its own
   * that vm-network.ts gives each VM (`nsenter --net=…` or `unshare --net`). It must exec, never fork.
   */
  launchPrefix?: readonly string[];
}

/** How QEMU names the files of a VM: /proc/self/fd/N of descriptors it inherited (see passFiles). */
interface QemuFiles {
  kernel: string;
  initramfs: string;
  rootDisk: string;
  scratchDisk: string;
  runDir: string;
  share?: string;
  /** -incoming's source. */
  incoming?: string;
}

/** A disk attached to a running VM; the guest finds it as the /sys/block/vd* whose `serial` is `serial`. */
export interface AttachedDisk {
  serial: string;
  slot: number;
}

export const DEFAULT_VM_MEMORY_BYTES = 512 * 1024 ** 2;

/**
 * The guest kernel's command line. Under TCG it has `norandmaps`: QEMU keeps the host code it translated from
 * the guest's by the guest's virtual addresses too, so with address-space randomization every new process
 * (each docker, runc or containerd-shim a `docker run` starts) had all its code translated again; without it
 * a recycled Docker VM's `docker run` took 4.3 to 5.2 s instead of 5.5 to 7.3. Nothing is given up to a
 * tenant: a VM's whole machine is its one action's. Under KVM nothing is translated and the guest keeps it.
 */
export function kernelCommandLine(accelerator: Accelerator, rootFormat: RootDiskFormat): string {
  const randomization = accelerator === "tcg" ? " norandmaps" : "";
  return `console=ttyS0 quiet panic=-1${randomization} berth.rootfs=${rootFormat}`;
}

/** QEMU's command line for a VM: q35, no network, no display, serial console to a file, virtio disks and port. */
export function qemuArguments(options: QemuVmOptions, files: QemuFiles): string[] {
  const accelerator = options.accelerator ?? "tcg";
  const memoryMiB = Math.max(128, Math.floor((options.memoryBytes ?? DEFAULT_VM_MEMORY_BYTES) / 1024 ** 2));
  const args = [
    "-M",
    "q35",
    ...(accelerator === "kvm" ? ["-enable-kvm", "-cpu", "host"] : ["-accel", "tcg", "-cpu", "max"]),
    "-m",
    `${memoryMiB}M`,
    "-smp",
    String(options.vcpus ?? 1),
    "-nodefaults",
    "-no-user-config",
    // seccomp: no obsolete system calls, no set*id, no process spawned (snapshots go to a socket of the worker's,
    // resumes come from a descriptor), no scheduler or affinity changes.
    "-sandbox",
    "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
    "-display",
    "none",
    "-no-reboot",
    "-nic",
    "none",
    "-kernel",
    files.kernel,
    "-initrd",
    files.initramfs,
    "-append",
    kernelCommandLine(accelerator, options.rootFormat ?? "erofs"),
    "-chardev",
    `socket,id=console,path=${join(files.runDir, "console.sock")}`,
    "-serial",
    "chardev:console",
    "-drive",
    `file=${files.rootDisk},if=none,id=root,format=raw,readonly=on`,
    "-device",
    "virtio-blk-pci,drive=root",
    "-drive",
    `file=${files.scratchDisk},if=none,id=scratch,format=${options.scratchFormat ?? "raw"}`,
    "-device",
    "virtio-blk-pci,drive=scratch",
    "-device",
    "virtio-serial-pci",
    "-chardev",
    `socket,id=agent,path=${join(files.runDir, "agent.sock")}`,
    "-device",
    "virtserialport,chardev=agent,name=berth",
    "-qmp",
    `unix:${join(files.runDir, "qmp.sock")},server=on,wait=off`,
  ];
  for (let slot = 0; slot < (options.hotplugSlots ?? 2); slot++) {
    args.push("-device", `pcie-root-port,id=hotplug${slot},chassis=${slot + 1},slot=${slot + 1}`);
  }
  if (files.share !== undefined && options.share) {
    // security_model=none: files keep the ids QEMU has (runAs), and ownership changes fail quietly.
    args.push("-fsdev", `local,id=share,path=${files.share},security_model=none`);
    args.push("-device", `virtio-9p-pci,fsdev=share,mount_tag=${options.share.tag}`);
  }
  for (const path of [files.rootDisk, files.scratchDisk, files.runDir, files.kernel, files.share ?? ""]) {
    // QEMU's option syntax splits on commas; a path with one would name another file.
    if (path.includes(",")) throw new Error(`a VM's file paths cannot hold a comma: ${path}`);
  }
  args.push(...(options.extraArgs ?? []));
  if (files.incoming) args.push("-incoming", files.incoming);
  return args;
}

/**
 * One QEMU guest: booted (or resumed from a snapshot) up to an answering agent, then running commands one at a
 * time. The worker talks to the agent over a unix socket it listens on and QEMU connects to (the guest's
 * virtio-serial port named "berth"); kill() ends the QEMU process and resolves once it is gone.
 */
export class QemuVm {
  private exitReason: string | undefined;
  private stderrTail = "";

  private constructor(
    private readonly options: QemuVmOptions,
    private readonly process: ChildProcess,
    private readonly server: Server,
    private readonly consoleLog: ConsoleLog,
    readonly exited: Promise<void>,
    /** The run directory, held open: its sockets are named through it (see start). */
    private readonly runDirHandle: FileHandle,
  ) {}

  /** The run directory by the worker's own descriptor: a short path, however deep runDir is. */
  private get sockets(): string {
    return `/proc/self/fd/${this.runDirHandle.fd}`;
  }

  /** The guest kernel's release, as the agent reported it (or, for a resumed VM, the assets say). */
  kernelRelease = "";
  /** The run directory as QEMU names it (a descriptor it inherited). */
  private qemuRunDir = "";
  private agent: AgentConnection | undefined;

  /** Whether QEMU still runs (a guest that powered itself off, or crashed, is no VM to reuse). */
  get running(): boolean {
    return this.process.exitCode === null && this.process.signalCode === null;
  }

  get pid(): number {
    return this.process.pid ?? -1;
  }

  get consoleLogFile(): string {
    return join(this.options.runDir, "console.log");
  }

  static async start(options: QemuVmOptions): Promise<QemuVm> {
    // Whoever can reach the agent's socket can run commands as root in the guest.
    await chmod(options.runDir, 0o700);
    // A unix socket's path holds at most 107 bytes, and a data directory may be deeper: the worker names the
    // sockets through a descriptor of the run directory, QEMU through one it inherits.
    const runDirHandle = await open(options.runDir, constants.O_RDONLY | constants.O_DIRECTORY);
    const sockets = `/proc/self/fd/${runDirHandle.fd}`;
    const server = createServer();
    server.maxConnections = 1;
    const agentSocket = join(sockets, "agent.sock");
    await rm(agentSocket, { force: true });
    await new Promise<void>((resolve, reject) => {
      server.once("error", reject);
      server.listen(agentSocket, resolve);
    });
    const connected = new Promise<Socket>((resolve) => server.once("connection", resolve));
    const consoleLog = await startConsoleLog(
      join(sockets, "console.sock"),
      join(options.runDir, "console.log"),
      options.consoleLogMaxBytes ?? 1024 ** 2,
    );
    // setpriv (util-linux) execs QEMU with a parent-death signal: a worker that dies leaves no VM running.
    const qemu = options.qemuPath ?? "qemu-system-x86_64";
    const passed = await passFiles(options);
    const drop = options.runAs
      ? [`--reuid=${options.runAs.uid}`, `--regid=${options.runAs.gid}`, "--clear-groups", "--no-new-privs"]
      : [];
    let child: ChildProcess;
    try {
      const [program = "setpriv", ...prefixed] = [...(options.launchPrefix ?? []), "setpriv"];
      const setpriv = ["--pdeathsig", "KILL", ...drop, "--", qemu, ...qemuArguments(options, passed.files)];
      child = spawn(program, [...prefixed, ...setpriv], {
        stdio: ["ignore", "ignore", "pipe", ...passed.handles.map((handle) => handle.fd)],
        env: { PATH: process.env.PATH ?? "/usr/bin:/bin" },
      });
    } finally {
      // QEMU holds its own copies from here on.
      for (const handle of passed.handles) await handle.close();
    }
    const exited = new Promise<void>((resolve) => child.once("exit", () => resolve()));
    const vm = new QemuVm(options, child, server, consoleLog, exited, runDirHandle);
    vm.qemuRunDir = passed.files.runDir;
    child.stderr?.on("data", (chunk: Buffer) => {
      vm.stderrTail = (vm.stderrTail + chunk.toString()).slice(-2000);
    });
    child.once("error", (error) => {
      vm.exitReason = `cannot start ${qemu}: ${error.message}`;
    });
    child.once("exit", (code, signal) => {
      vm.exitReason ??= `QEMU exited (${signal ?? `code ${code}`})`;
      vm.agent?.close(new Error(`the VM is gone: ${vm.exitReason}`));
    });
    const timeoutMs = options.bootTimeoutMs ?? 60_000;
    const timeout = sleep(timeoutMs, "timeout" as const, { ref: false });
    try {
      const ready = (async () => {
        const agent = new AgentConnection(await connected);
        vm.agent = agent;
        if (options.resumeFrom) {
          await agent.ping();
          vm.kernelRelease = options.assets.kernelRelease;
        } else {
          vm.kernelRelease = await agent.hello;
        }
        agent.setClock();
        return "ready" as const;
      })();
      const outcome = await Promise.race([ready, exited.then(() => "exited" as const), timeout]);
      if (outcome !== "ready") {
        const why = outcome === "timeout" ? `no agent answered within ${timeoutMs} ms` : vm.exitReason;
        throw new Error(`the VM did not ${options.resumeFrom ? "resume" : "boot"}: ${why}${await vm.diagnostics()}`);
      }
      return vm;
    } catch (error) {
      await vm.kill();
      throw error;
    }
  }

  run(command: GuestCommand, options?: GuestRunOptions): Promise<GuestCommandResult> {
    if (!this.agent) return Promise.reject(new Error("the VM has no agent"));
    return this.agent.run(command, options);
  }

  /** Mounts the VM's share at `target` of the action's root and gives `directories` their modes (agent 'M'). */
  mount(target: string, directories: readonly GuestDirectoryMode[] = []): Promise<void> {
    if (!this.agent) return Promise.reject(new Error("the VM has no agent"));
    if (!this.options.share) return Promise.reject(new Error("the VM has no share to mount"));
    return this.agent.mount(this.options.share.tag, target, directories);
  }

  /**
   * Saves the whole VM (memory, devices) to `file` by a QEMU migration, for QemuVm.start({resumeFrom}) with the
   * same disks: the scratch disk must be kept as it is now (resume each copy over a qcow2 overlay of it). The VM is
   * gone afterwards.
   */
  async snapshot(file: string): Promise<void> {
    if (this.attached.size > 0) throw new Error("a VM with attached disks cannot be snapshotted: detach them first");
    // QEMU sends its migration stream to a socket of the worker's (in the run directory QEMU may use), and the
    // worker writes it: a QEMU that runs as runAs cannot write into the worker's data directory, and needs not.
    const socket = join(this.sockets, "migrate.sock");
    await rm(socket, { force: true });
    // A new file, private to the worker (the guest's memory goes into it).
    await rm(file, { force: true });
    const out = createWriteStream(file, { flags: "wx", mode: 0o600 });
    const server = createServer();
    server.maxConnections = 1;
    try {
      await new Promise<void>((resolve, reject) => {
        server.once("error", reject);
        server.listen(socket, resolve);
      });
      if (this.options.runAs)
        await chown(join(this.options.runDir, "migrate.sock"), this.options.runAs.uid, this.options.runAs.gid);
      const written = new Promise<void>((resolve, reject) => {
        out.once("error", reject);
        out.once("close", resolve);
        server.once("connection", (connection: Socket) => {
          connection.once("error", reject);
          connection.pipe(out);
        });
      });
      written.catch(() => {});
      await this.withQmp(async (qmp) => {
        await qmp.execute("migrate-set-parameters", { "max-bandwidth": 8 * 1024 ** 3 });
        await qmp.execute("migrate", { uri: `unix:${join(this.qemuRunDir, "migrate.sock")}` });
        for (;;) {
          const { status, "error-desc": why } = (await qmp.execute("query-migrate")) as {
            status?: string;
            "error-desc"?: string;
          };
          if (status === "completed") return;
          if (status === "failed" || status === "cancelled")
            throw new Error(`the VM's snapshot failed: ${why ?? status}`);
          await sleep(10);
        }
      });
      // QEMU keeps its end open after the stream is complete: ending it (the VM is good only for that now) closes
      // the socket, and the file is whole once the worker has written what was left in it.
      await this.kill();
      await written;
      const handle = await open(file, constants.O_RDONLY);
      await handle.sync().finally(() => handle.close());
    } finally {
      await new Promise<void>((resolve) => server.close(() => resolve()));
      out.destroy();
      await rm(join(this.options.runDir, "migrate.sock"), { force: true });
    }
  }

  /**
   * Plugs `image` into a free hot-plug slot as a virtio disk (read-only unless `writable`); the guest sees a new
   * /dev/vd* whose /sys/block/vd*\/serial is the returned serial.
   */
  async attachDisk(image: string, options: { writable?: boolean } = {}): Promise<AttachedDisk> {
    const slots = this.options.hotplugSlots ?? 2;
    const slot = [...Array(slots).keys()].find((candidate) => !this.attached.has(candidate));
    if (slot === undefined) throw new Error(`all ${slots} hot-plug slots of the VM hold a disk`);
    const serial = `berth-disk-${++this.disksAttached}`;
    this.attached.add(slot);
    try {
      await this.withQmp(async (qmp) => {
        const readOnly = !options.writable;
        await qmp.execute("blockdev-add", {
          driver: "raw",
          "node-name": serial,
          "read-only": readOnly,
          file: { driver: "file", filename: image, "read-only": readOnly },
        });
        await qmp.execute("device_add", {
          driver: "virtio-blk-pci",
          id: serial,
          drive: serial,
          bus: `hotplug${slot}`,
          serial,
        });
      });
    } catch (error) {
      this.attached.delete(slot);
      throw error;
    }
    return { serial, slot };
  }

  /** Unplugs a disk (unmount it in the guest first) and resolves once QEMU has closed its file. */
  async detachDisk(disk: AttachedDisk): Promise<void> {
    await this.withQmp(async (qmp) => {
      await qmp.execute("device_del", { id: disk.serial });
      // The guest acknowledges the unplug on its own time; until then the node is in use.
      for (let attempt = 0; ; attempt++) {
        try {
          await qmp.execute("blockdev-del", { "node-name": disk.serial });
          break;
        } catch (error) {
          if (attempt >= 500) throw error;
          await sleep(10);
        }
      }
    });
    this.attached.delete(disk.slot);
  }

  private readonly attached = new Set<number>();
  private disksAttached = 0;

  private async withQmp<T>(work: (qmp: QmpClient) => Promise<T>): Promise<T> {
    const qmp = await QmpClient.connect(join(this.sockets, "qmp.sock"));
    try {
      return await work(qmp);
    } finally {
      qmp.close();
    }
  }

  /** Ends QEMU (SIGKILL) and resolves once the process is gone and its sockets are removed. */
  async kill(): Promise<void> {
    this.exitReason ??= "killed";
    if (this.process.exitCode === null && this.process.signalCode === null && this.process.pid !== undefined) {
      this.process.kill("SIGKILL");
      await this.exited;
    }
    this.agent?.close(new Error("the VM was killed"));
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
    await this.consoleLog.close();
    await rm(join(this.options.runDir, "agent.sock"), { force: true });
    await rm(join(this.options.runDir, "qmp.sock"), { force: true });
    await this.runDirHandle.close().catch(() => {});
  }

  private async diagnostics(): Promise<string> {
    const console = await readFile(this.consoleLogFile, "utf8").catch(() => "");
    const parts = [];
    if (this.stderrTail.trim()) parts.push(`; QEMU said: ${this.stderrTail.trim()}`);
    if (console.trim()) parts.push(`; console: ${console.trim().slice(-1000)}`);
    return parts.join("");
  }
}

/**
 * Opens a VM's files and names them as the descriptors QEMU inherits (3, 4, …): read-only for what it only reads.
 * A QEMU that runs as `runAs` cannot walk the worker's data directory, and gets the run directory and the scratch
 * disk as its own; the run directory's sockets keep short paths either way.
 */
async function passFiles(options: QemuVmOptions): Promise<{ files: QemuFiles; handles: FileHandle[] }> {
  const { runAs } = options;
  if (runAs) {
    await chown(options.runDir, runAs.uid, runAs.gid);
    for (const socket of ["agent.sock", "console.sock"]) {
      await chown(join(options.runDir, socket), runAs.uid, runAs.gid);
    }
    await chown(options.scratchDisk, runAs.uid, runAs.gid);
  }
  const handles: FileHandle[] = [];
  const pass = async (path: string, flags: number) => {
    handles.push(await open(path, flags));
    return `/proc/self/fd/${2 + handles.length}`;
  };
  try {
    const files: QemuFiles = {
      kernel: await pass(options.assets.kernel, constants.O_RDONLY),
      initramfs: await pass(options.assets.initramfs, constants.O_RDONLY),
      rootDisk: await pass(options.rootDisk, constants.O_RDONLY),
      scratchDisk: await pass(options.scratchDisk, constants.O_RDONLY),
      runDir: await pass(options.runDir, constants.O_RDONLY | constants.O_DIRECTORY),
      share: options.share && (await pass(options.share.path, constants.O_RDONLY | constants.O_DIRECTORY)),
    };
    // A snapshot is private to the worker: QEMU reads the descriptor it is given, never the file by name.
    if (options.resumeFrom) {
      await pass(options.resumeFrom, constants.O_RDONLY);
      files.incoming = `fd:${2 + handles.length}`;
    }
    return { files, handles };
  } catch (error) {
    for (const handle of handles) await handle.close();
    throw error;
  }
}
