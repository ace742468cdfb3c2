import type { ServerDuplexStream } from "@grpc/grpc-js";
import type { BlobStore } from "../cas/blob-store.js";
import { parseDigest } from "../digest/digest.js";
import { digestFunctionByWire } from "../digest/functions.js";
import type { ImagePulls } from "../execution/image-pulls.js";
import type { Completion, HubMessage, WorkerHubServer, WorkerMessage } from "../gen/berth/worker/v1/worker.js";
import type { Logger } from "../log/log.js";
import type { Scheduler, WorkerConnection } from "../scheduler/scheduler.js";
import { toRpcStatus } from "../status/rpc-status.js";
import { Code, invalidArgument, StatusError, toStatusError } from "../status/status.js";
import { toServiceError } from "./grpc-status.js";

export interface WorkerHubOptions {
  heartbeatIntervalMs: number;
}

/** Where workers connect: each Connect stream is one worker, registered with the scheduler. */
export function workerHubService(
  scheduler: Scheduler,
  cas: BlobStore,
  pulls: ImagePulls,
  options: WorkerHubOptions,
  log: Logger,
): WorkerHubServer {
  const connected = new Set<string>();
  return {
    connect: (call: ServerDuplexStream<WorkerMessage, HubMessage>) => {
      let name: string | undefined;
      const leave = (reason: string) => {
        if (name === undefined) return;
        log.info({ worker: name, reason }, `worker ${name} left: ${reason}`);
        scheduler.disconnect(name, reason);
        pulls.workerLeft(name, reason);
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
            // One worker process's streams share its HTTP/2 connection, so they share the peer address too.
            group: call.getPeer(),
            assign: (assignment) => call.write({ assignment }),
            cancel: (leaseId) => call.write({ cancellation: { leaseId } }),
            pullImage: (imagePull) => call.write({ imagePull }),
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
        if (message.imagePullProgress) pulls.report(name, message.imagePullProgress);
        if (message.warmRunners) scheduler.warmRunners(name, message.warmRunners.keys);
        const completion = message.completion;
        if (completion) {
          const noStatus = { code: Code.INTERNAL, message: "the worker sent no status", details: [] };
          const outcome = storeInlineBlobs(cas, completion).then(
            () => ({ status: completion.status ?? noStatus, result: completion.result }),
            (err: unknown) => ({ status: toRpcStatus(toStatusError(err)), result: undefined }),
          );
          void scheduler.complete(name, completion.leaseId, outcome);
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

/** Stores (verified, as every put is) the blobs a worker sent with its completion. */
async function storeInlineBlobs(cas: BlobStore, completion: Completion): Promise<void> {
  if (completion.inlineBlobs.length === 0) return;
  const fn = digestFunctionByWire(completion.digestFunction);
  if (!fn) throw invalidArgument("completion.digest_function", `${completion.digestFunction} is not supported`);
  await Promise.all(
    completion.inlineBlobs.map(async (blob, i) => {
      const field = `completion.inline_blobs[${i}]`;
      const digest = parseDigest(fn, blob.digest, `${field}.digest`);
      // BlobStore.put verifies the data against its digest before storing it. Outputs are flushed in the
      // background, as the action cache entry naming them is (see PutOptions.durable).
      await cas.put(digest, blob.data, { durable: false });
    }),
  );
}
