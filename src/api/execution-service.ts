import type { ServerWritableStream } from "@grpc/grpc-js";
import { inlineOutputs } from "../ac/inline.js";
import { callerOf } from "../auth/access-interceptor.js";
import type { BlobStore } from "../cas/blob-store.js";
import type { Executor } from "../execution/executor.js";
import type {
  ExecuteRequest,
  ExecuteResponse,
  ExecutionServer,
  WaitExecutionRequest,
} from "../gen/build/bazel/remote/execution/v2/remote_execution.js";
import type { Operation as WireOperation } from "../gen/google/longrunning/operations.js";
import type { Logger } from "../log/log.js";
import type { Operation } from "../scheduler/operation.js";
import type { Scheduler } from "../scheduler/scheduler.js";
import { Code, StatusError } from "../status/status.js";
import { toServiceError } from "./grpc-status.js";
import { logFailure } from "./handlers.js";
import type { InstanceNames } from "./instance-names.js";
import { toWireOperation } from "./operations.js";
import { registryCredentialsFrom } from "./registry-credentials-header.js";

export interface ExecutionServiceOptions {
  maxInlineBytes: number;
}

export function executionService(
  executor: Executor,
  scheduler: Scheduler,
  cas: BlobStore,
  instances: InstanceNames,
  options: ExecutionServiceOptions,
  log: Logger,
): ExecutionServer {
  /** Streams the operation's state now and at every change, until it completes or the client leaves. */
  function follow(
    call: ServerWritableStream<ExecuteRequest | WaitExecutionRequest, WireOperation>,
    operation: Operation,
    shape: (response: ExecuteResponse) => Promise<ExecuteResponse>,
  ): void {
    let sending = Promise.resolve();
    const send = (op: Operation) => {
      // Every stage is reported, even one that passes before the previous update is written.
      const stage = op.stage;
      const final = op.response;
      sending = sending.then(async () => {
        if (call.cancelled || call.writableEnded) return;
        const response = final ? await shape(final) : undefined;
        call.write(toWireOperation(op, stage, response));
        if (final) call.end();
      });
      sending.catch((err: unknown) => {
        logFailure(log, "Execute", err);
        call.emit("error", toServiceError(err));
      });
    };
    const unwatch = operation.watch(send);
    const unfollow = operation.follow();
    const leave = () => {
      unwatch();
      unfollow();
    };
    call.on("cancelled", leave);
    call.on("close", unfollow);
    call.on("finish", unfollow);
    send(operation);
  }

  return {
    execute: (call) => {
      const request = call.request;
      (async () => {
        instances.check(request.instanceName);
        const operation = executor.execute(request, {
          registryCredentials: registryCredentialsFrom(call.metadata),
          caller: callerOf(call.metadata),
        });
        const fn = operation.actionDigest.fn;
        follow(call, operation, async (response) =>
          response.result
            ? { ...response, result: await inlineOutputs(fn, response.result, request, cas, options.maxInlineBytes) }
            : response,
        );
      })().catch((err: unknown) => {
        logFailure(log, "Execute", err);
        call.emit("error", toServiceError(err));
      });
    },

    waitExecution: (call) => {
      const operation = scheduler.getOperation(call.request.name);
      if (!operation) {
        const error = new StatusError(
          Code.NOT_FOUND,
          `no operation named "${call.request.name}" (it may have completed long ago)`,
        );
        call.emit("error", toServiceError(error));
        return;
      }
      follow(call, operation, async (response) => response);
    },
  };
}
