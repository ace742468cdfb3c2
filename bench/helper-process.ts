import { type ChildProcess, fork } from "node:child_process";
import type { BenchContext } from "./context.js";

type DistributiveOmit<T, K extends PropertyKey> = T extends unknown ? Omit<T, K> : never;

/**
 * A small Node.js helper process of the benchmarks (sandbox-helper, image-helper), answering one request at a
 * time over IPC. References run there, not in the benchmark's own process, which the CAS benchmarks swell:
 * spawning forks the calling process, and a large one makes every fork slower.
 */
export class HelperProcess<Request extends { id: number }, Reply extends { id: number; error?: string }> {
  readonly #child: ChildProcess;
  readonly #waiting = new Map<number, (reply: Reply) => void>();
  #next = 0;

  private constructor(
    child: ChildProcess,
    private readonly name: string,
  ) {
    this.#child = child;
    child.on("message", (reply: Reply) => {
      this.#waiting.get(reply.id)?.(reply);
      this.#waiting.delete(reply.id);
    });
  }

  /** Forks the compiled helper at `path`; it is stopped when the benchmark context is torn down. */
  static start<Req extends { id: number }, Rep extends { id: number; error?: string }>(
    ctx: BenchContext,
    path: string,
    name: string,
  ): HelperProcess<Req, Rep> {
    const helper = new HelperProcess<Req, Rep>(
      fork(path, [], { stdio: ["ignore", "inherit", "inherit", "ipc"] }),
      name,
    );
    ctx.defer(() => helper.stop());
    return helper;
  }

  get pid(): number | undefined {
    return this.#child.pid;
  }

  async request(request: DistributiveOmit<Request, "id">): Promise<Reply> {
    const id = this.#next++;
    const reply = await new Promise<Reply>((resolve, reject) => {
      this.#waiting.set(id, resolve);
      this.#child.send({ ...request, id }, (err) => err && reject(err));
    });
    if (reply.error !== undefined) throw new Error(`the ${this.name} failed: ${reply.error}`);
    return reply;
  }

  async stop(): Promise<void> {
    if (this.#child.exitCode !== null || this.#child.signalCode !== null) return;
    const exited = new Promise((resolve) => this.#child.once("exit", resolve));
    this.#child.kill("SIGTERM");
    await exited;
  }
}
