/**
 * One running worker process: requests written to its stdin one at a time
 * (singleplex, request_id 0), responses read from its stdout. Anything that
 * makes its stream untrustworthy (it died, wrote garbage or too much, wrote
 * when not asked, answered the wrong request) kills it: a response left
 * behind would otherwise be read as the answer to the next request.
 */
import type { WorkRequest, WorkResponse } from "../gen/blaze/worker/worker_protocol.js";
import { Code, StatusError } from "../status/status.js";
import type { LaunchedProcess, ProcessExit, WorkerLaunch, WorkerProcessLauncher } from "./launcher.js";
import { encodeWorkRequest, type WorkProtocol, WorkProtocolError, workResponseReader } from "./work-protocol.js";

/** The end of its stderr kept to explain a process's failure. */
const STDERR_TAIL_BYTES = 4096;

/** The process failed the request without answering it: it is dead now, and another one may succeed. */
export class WorkerProcessFailure extends Error {
  constructor(message: string) {
    super(message);
    this.name = "WorkerProcessFailure";
  }
}

export interface WorkOptions {
  /** Past it the process is killed and the request fails with DEADLINE_EXCEEDED. */
  timeoutMs?: number;
  /** Aborted: the process is killed and the request fails with CANCELLED. */
  signal?: AbortSignal;
}

interface Pending {
  resolve(response: WorkResponse): void;
  reject(err: Error): void;
}

export class WorkerProcess {
  private pending: Pending | undefined;
  private broken: Error | undefined;
  private stderrTail = Buffer.alloc(0);
  private exit: ProcessExit | undefined;
  /** Requests answered. */
  answered = 0;

  private constructor(
    private readonly process: LaunchedProcess,
    private readonly protocol: WorkProtocol,
    maxResponseBytes: number,
  ) {
    const reader = workResponseReader(protocol, maxResponseBytes);
    process.stdout.on("data", (chunk: Buffer) => {
      if (this.broken) return;
      try {
        const responses = reader.push(chunk);
        if (responses.length > 0) this.answer(responses);
        // Whitespace between JSON responses is not a response begun (a newline may come in a write of its own).
        else if (!this.pending && reader.pendingBytes > 0) {
          this.fail(new WorkProtocolError("the worker process wrote to stdout unasked"));
        }
      } catch (err) {
        this.fail(err as Error);
      }
    });
    process.stderr.on("data", (chunk: Buffer) => {
      this.stderrTail = Buffer.concat([this.stderrTail, chunk]).subarray(-STDERR_TAIL_BYTES);
    });
    void process.exited.then((exit) => {
      this.exit = exit;
      this.fail(new WorkerProcessFailure(`the worker process exited (${describeExit(exit)})`));
    });
  }

  static async start(
    launcher: WorkerProcessLauncher,
    launch: WorkerLaunch,
    protocol: WorkProtocol,
    maxResponseBytes: number,
    prepare?: (inputRoot: string) => Promise<void>,
  ): Promise<WorkerProcess> {
    return new WorkerProcess(await launcher.launch(launch, prepare), protocol, maxResponseBytes);
  }

  get pid(): number {
    return this.process.pid;
  }

  get inputRoot(): string {
    return this.process.inputRoot;
  }

  /** Neither dead nor condemned: it may take a request. */
  get usable(): boolean {
    return this.broken === undefined;
  }

  get exited(): Promise<ProcessExit> {
    return this.process.exited;
  }

  /** Sends one request and waits for its response; WorkerProcessFailure when the process failed it. */
  async work(request: WorkRequest, options: WorkOptions = {}): Promise<WorkResponse> {
    if (this.pending) throw new Error("a worker process takes one request at a time");
    if (this.broken) throw this.failure(this.broken);
    // What the process wrote while answering an earlier action is not this one's to show; a new process's
    // start-up messages are.
    if (this.answered > 0) this.stderrTail = Buffer.alloc(0);
    const answer = new Promise<WorkResponse>((resolve, reject) => {
      this.pending = { resolve, reject };
    });
    let timer: NodeJS.Timeout | undefined;
    const onAbort = () =>
      this.fail(new StatusError(Code.CANCELLED, "the action was cancelled; its worker process was killed"));
    if (options.timeoutMs !== undefined) {
      const ms = options.timeoutMs;
      timer = setTimeout(
        () =>
          this.fail(
            new StatusError(
              Code.DEADLINE_EXCEEDED,
              `the worker process did not answer within the action's timeout (${ms / 1000} s) and was killed`,
            ),
          ),
        ms,
      );
    }
    if (options.signal?.aborted) onAbort();
    options.signal?.addEventListener("abort", onAbort, { once: true });
    try {
      if (!this.broken) this.process.stdin.write(encodeWorkRequest(this.protocol, request));
      const response = await answer;
      this.answered++;
      return response;
    } finally {
      clearTimeout(timer);
      options.signal?.removeEventListener("abort", onAbort);
    }
  }

  /** Kills the process; settles once it has exited. */
  async stop(): Promise<void> {
    this.fail(new WorkerProcessFailure("the worker process was stopped"));
    await this.process.exited;
  }

  /** The last bytes the process wrote to its stderr, for messages. */
  stderr(): string {
    return this.stderrTail.toString("utf8");
  }

  private answer(responses: WorkResponse[]): void {
    const pending = this.pending;
    const [response] = responses;
    if (!pending || responses.length > 1) {
      this.fail(new WorkProtocolError("the worker process wrote a WorkResponse it was not asked for"));
      return;
    }
    if (response === undefined) return;
    if (response.requestId !== 0 || response.wasCancelled) {
      this.fail(
        new WorkProtocolError(
          `the worker process answered request_id ${response.requestId}${response.wasCancelled ? " as cancelled" : ""}; request 0 was sent`,
        ),
      );
      return;
    }
    this.pending = undefined;
    pending.resolve(response);
  }

  /** Condemns the process (killing it) and fails the request in flight with `err`. */
  private fail(err: Error): void {
    if (!this.broken) {
      this.broken = err;
      this.process.kill();
    }
    const pending = this.pending;
    this.pending = undefined;
    // The process may be seen dead before the cause (exit, then garbage read last): the first cause wins.
    pending?.reject(this.failure(this.broken ?? err));
  }

  private failure(err: Error): Error {
    if (err instanceof StatusError) return err;
    const tail = this.stderr().trim();
    const exit = this.exit ? ` (${describeExit(this.exit)})` : "";
    return new WorkerProcessFailure(
      `${err.message}${err instanceof WorkProtocolError ? exit : ""}${tail ? `; its stderr ends: ${tail.slice(-1000)}` : ""}`,
    );
  }
}

function describeExit(exit: ProcessExit): string {
  return exit.signal ? `killed by ${exit.signal}` : `exit code ${exit.code}`;
}
