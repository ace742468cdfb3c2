import type { ServerDuplexStream } from "@grpc/grpc-js";
import type { HubMessage, WorkerHubServer, WorkerMessage } from "../gen/berth/worker/v1/worker.js";
import type { Logger } from "../log/log.js";
import type { Scheduler, WorkerConnection } from "../scheduler/scheduler.js";
import { Code, StatusError } from "../status/status.js";
import { toServiceError } from "./grpc-status.js";

export interface WorkerHubOptions {
  heartbeatIntervalMs: number;
}

/** Where workers connect: each Connect stream is one worker, registered with the scheduler. */
export function workerHubService(scheduler: Scheduler, options: WorkerHubOptions, log: Logger): WorkerHubServer {
  const connected = new Set<string>();
  return {
    connect: (call: ServerDuplexStream<WorkerMessage, HubMessage>) => {
      let name: string | undefined;
      const leave = (reason: string) => {
        if (name === undefined) return;
        log.info({ worker: name, reason }, `worker ${name} left: ${reason}`);
        scheduler.disconnect(name, reason);
        connected.delete(name);
        name = undefined;
      };
      const refuse = (error: StatusError) => {
        call.emit("error", toServiceError(error));
      };
      call.on("data", (message: WorkerMessage) => {
        if (message.hello) {
          const hello = message.hello;
          if (name !== undefined) return refuse(new StatusError(Code.FAILED_PRECONDITION, "hello sent twice"));
          if (hello.workerName === "" || hello.slots < 1) {
            return refuse(new StatusError(Code.INVALID_ARGUMENT, "hello needs a worker_name and at least one slot"));
          }
          if (connected.has(hello.workerName)) {
            return refuse(
              new StatusError(Code.ALREADY_EXISTS, `a worker named "${hello.workerName}" is already connected`),
            );
          }
          name = hello.workerName;
          connected.add(name);
          const connection: WorkerConnection = {
            name,
            properties: hello.properties.map((p) => ({ name: p.name, value: p.value })),
            slots: hello.slots,
            assign: (assignment) => call.write({ assignment }),
            cancel: (leaseId) => call.write({ cancellation: { leaseId } }),
          };
          const interval = options.heartbeatIntervalMs;
          call.write({
            welcome: { heartbeatInterval: { seconds: Math.floor(interval / 1000), nanos: (interval % 1000) * 1e6 } },
          });
          log.info({ worker: name, slots: hello.slots, properties: connection.properties }, `worker ${name} joined`);
          scheduler.connect(connection);
          return;
        }
        if (name === undefined)
          return refuse(new StatusError(Code.FAILED_PRECONDITION, "the first message must be hello"));
        scheduler.heartbeat(name);
        const completion = message.completion;
        if (completion) {
          void scheduler.complete(name, completion.leaseId, {
            status: completion.status ?? { code: Code.INTERNAL, message: "the worker sent no status", details: [] },
            result: completion.result,
          });
        }
      });
      call.on("end", () => {
        leave("stream closed");
        call.end();
      });
      call.on("error", () => leave("stream failed"));
      call.on("cancelled", () => leave("stream cancelled"));
    },
  };
}
