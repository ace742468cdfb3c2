import type { Socket } from "node:net";
import { Code, StatusError } from "../status/status.js";
import {
  encodeFrame,
  encodeMount,
  encodeRun,
  FrameReader,
  FrameType,
  type GuestCommand,
  type GuestDirectoryMode,
} from "./agent-protocol.js";

export interface GuestRunOptions {
  /** The command is killed (SIGKILL to its process group) after this long; 0 or absent: no limit. */
  timeoutMs?: number;
  /** Aborting kills the command the same way. */
  signal?: AbortSignal;
  /** stdout and stderr together past this are refused (the command is killed); default 64 MiB. */
  maxOutputBytes?: number;
  /** Runs in the agent's own root (busybox), not the action's: the worker's setup around an action. */
  inAgentRoot?: boolean;
  /** Called with each chunk as the guest sends it (the result still holds all of it). */
  onOutput?: (stream: "stdout" | "stderr", chunk: Buffer) => void;
}

export interface GuestCommandResult {
  /** -1 when a signal ended the command. */
  exitCode: number;
  /** The signal that ended it, 0 when it exited. */
  signal: number;
  stdout: Buffer;
  stderr: Buffer;
  timedOut: boolean;
  cancelled: boolean;
}

/** How long a killed command may take to be reported before the agent counts as unresponsive. */
const KILL_GRACE_MS = 5_000;

interface PendingRun {
  stdout: Buffer[];
  stderr: Buffer[];
  outputBytes: number;
  resolve(result: GuestCommandResult): void;
  reject(error: Error): void;
  kill(reason: "timeout" | "cancel" | "output"): void;
}

/**
 * The host end of one guest agent's virtio-serial port: one command at a time, its output collected.
 * Anything the agent sends out of turn, or a broken frame, closes the connection (the VM is then useless).
 */
export class AgentConnection {
  /** The guest kernel's release, from the agent's hello. */
  readonly hello: Promise<string>;
  private resolveHello!: (release: string) => void;
  private rejectHello!: (error: Error) => void;
  private readonly reader = new FrameReader();
  private pending: PendingRun | undefined;
  private pongs: Array<{ resolve(): void; reject(error: Error): void }> = [];
  private closedError: Error | undefined;

  constructor(private readonly socket: Socket) {
    this.hello = new Promise((resolve, reject) => {
      this.resolveHello = resolve;
      this.rejectHello = reject;
    });
    this.hello.catch(() => {});
    socket.on("data", (chunk: Buffer) => this.receive(chunk));
    socket.on("error", (error) => this.close(error));
    socket.on("close", () => this.close(new Error("the guest agent's connection closed")));
  }

  get busy(): boolean {
    return this.pending !== undefined;
  }

  /** Resolves once the agent answers: the proof a resumed VM runs. */
  ping(): Promise<void> {
    if (this.closedError) return Promise.reject(this.closedError);
    return new Promise((resolve, reject) => {
      this.pongs.push({ resolve, reject });
      this.socket.write(encodeFrame(FrameType.ping, "p"));
    });
  }

  /** Mounts the VM's 9p share `tag` at `target` of the action's root, then sets `directories`' modes (see 'M'). */
  mount(tag: string, target: string, directories: readonly GuestDirectoryMode[] = []): Promise<void> {
    if (this.closedError) return Promise.reject(this.closedError);
    if (this.pending || this.pendingMount) return Promise.reject(new Error("the guest agent is busy"));
    return new Promise((resolve, reject) => {
      this.pendingMount = {
        resolve: () => {
          this.pendingMount = undefined;
          resolve();
        },
        reject: (error) => {
          this.pendingMount = undefined;
          reject(error);
        },
      };
      this.socket.write(encodeMount(tag, target, directories));
    });
  }

  private pendingMount: { resolve(): void; reject(error: Error): void } | undefined;

  /** Sets the guest's clock to the host's (before the next command, which the agent reads after it). */
  setClock(now = Date.now()): void {
    if (this.closedError) return;
    const seconds = Math.floor(now / 1000);
    this.socket.write(encodeFrame(FrameType.time, `${seconds} ${(now - seconds * 1000) * 1_000_000}`));
  }

  run(command: GuestCommand, options: GuestRunOptions = {}): Promise<GuestCommandResult> {
    if (this.closedError) return Promise.reject(this.closedError);
    if (this.pending) return Promise.reject(new Error("the guest agent already runs a command"));
    const request = encodeRun(command, options.inAgentRoot);
    const maxOutputBytes = options.maxOutputBytes ?? 64 * 1024 ** 2;
    return new Promise<GuestCommandResult>((resolve, reject) => {
      let killedFor: "timeout" | "cancel" | "output" | undefined;
      let graceTimer: NodeJS.Timeout | undefined;
      const timer =
        options.timeoutMs && options.timeoutMs > 0
          ? setTimeout(() => run.kill("timeout"), options.timeoutMs)
          : undefined;
      const onAbort = () => run.kill("cancel");
      const settle = () => {
        clearTimeout(timer);
        clearTimeout(graceTimer);
        options.signal?.removeEventListener("abort", onAbort);
        this.pending = undefined;
      };
      const run: PendingRun = {
        stdout: [],
        stderr: [],
        outputBytes: 0,
        resolve: (result) => {
          settle();
          if (killedFor === "output") {
            reject(
              new StatusError(
                Code.RESOURCE_EXHAUSTED,
                `the command wrote more than ${maxOutputBytes} bytes of stdout and stderr (the VM's output limit)`,
              ),
            );
            return;
          }
          resolve({ ...result, timedOut: killedFor === "timeout", cancelled: killedFor === "cancel" });
        },
        reject: (error) => {
          settle();
          reject(error);
        },
        kill: (reason) => {
          if (killedFor) return;
          killedFor = reason;
          this.socket.write(encodeFrame(FrameType.kill, "9"));
          graceTimer = setTimeout(
            () => this.close(new Error(`the guest agent did not report a killed command within ${KILL_GRACE_MS} ms`)),
            KILL_GRACE_MS,
          );
        },
      };
      this.pending = run;
      options.signal?.addEventListener("abort", onAbort, { once: true });
      this.socket.write(request);
      if (options.signal?.aborted) onAbort();
      const collect = (chunk: Buffer, into: Buffer[]) => {
        run.outputBytes += chunk.length;
        if (run.outputBytes > maxOutputBytes) {
          run.kill("output");
          return;
        }
        const copy = Buffer.from(chunk);
        into.push(copy);
        options.onOutput?.(into === run.stdout ? "stdout" : "stderr", copy);
      };
      this.onOutput = collect;
    });
  }

  private onOutput: (chunk: Buffer, into: Buffer[]) => void = () => {};

  private receive(chunk: Buffer): void {
    let frames: ReturnType<FrameReader["push"]>;
    try {
      frames = this.reader.push(chunk);
    } catch (error) {
      this.close(error as Error);
      return;
    }
    for (const frame of frames) {
      const run = this.pending;
      switch (frame.type) {
        case FrameType.hello:
          this.resolveHello(frame.payload.toString());
          break;
        case FrameType.ping:
          this.pongs.shift()?.resolve();
          break;
        case FrameType.stdout:
          if (run) this.onOutput(frame.payload, run.stdout);
          break;
        case FrameType.stderr:
          if (run) this.onOutput(frame.payload, run.stderr);
          break;
        case FrameType.exit: {
          if (!run) break;
          const [code, signal] = frame.payload.toString().split(" ").map(Number);
          run.resolve({
            exitCode: code ?? -1,
            signal: signal ?? 0,
            stdout: Buffer.concat(run.stdout),
            stderr: Buffer.concat(run.stderr),
            timedOut: false,
            cancelled: false,
          });
          break;
        }
        case FrameType.mount:
          this.pendingMount?.resolve();
          break;
        case FrameType.failure:
          if (this.pendingMount) {
            this.pendingMount.reject(new Error(`the VM's setup failed: ${frame.payload}`));
            break;
          }
          run?.reject(
            new StatusError(Code.FAILED_PRECONDITION, `the command could not start in the VM: ${frame.payload}`),
          );
          break;
        default:
          this.close(new Error(`the guest agent sent an unknown frame type ${JSON.stringify(frame.type)}`));
      }
    }
  }

  /** Ends the connection; whatever waits on it fails with `error`. */
  close(error: Error): void {
    if (this.closedError) return;
    this.closedError = error;
    this.rejectHello(error);
    this.pending?.reject(error);
    this.pendingMount?.reject(error);
    for (const pong of this.pongs.splice(0)) pong.reject(error);
    this.socket.destroy();
  }
}
