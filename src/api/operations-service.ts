import type { OperationsServer } from "../gen/google/longrunning/operations.js";
import type { Empty } from "../gen/google/protobuf/empty.js";
import type { Logger } from "../log/log.js";
import type { Scheduler } from "../scheduler/scheduler.js";
import { Code, notFound, StatusError } from "../status/status.js";
import { unary } from "./handlers.js";
import { toWireOperation } from "./operations.js";

/** google.longrunning.Operations for execution operations: look one up, or cancel it. */
export function operationsService(scheduler: Scheduler, log: Logger): OperationsServer {
  const unknown = (name: string) => notFound(`no operation named "${name}"`);
  const unsupported = (what: string) =>
    new StatusError(Code.UNIMPLEMENTED, `${what} is not supported; use GetOperation or WaitExecution`);
  return {
    getOperation: unary(log, "GetOperation", async (request) => {
      const operation = scheduler.getOperation(request.name);
      if (!operation) throw unknown(request.name);
      return toWireOperation(operation);
    }),
    cancelOperation: unary(log, "CancelOperation", async (request): Promise<Empty> => {
      if (!scheduler.cancel(request.name)) throw unknown(request.name);
      return {};
    }),
    listOperations: unary(log, "ListOperations", async () => {
      throw unsupported("ListOperations");
    }),
    deleteOperation: unary(log, "DeleteOperation", async () => {
      throw unsupported("DeleteOperation");
    }),
    waitOperation: unary(log, "WaitOperation", async () => {
      throw unsupported("WaitOperation");
    }),
  };
}
