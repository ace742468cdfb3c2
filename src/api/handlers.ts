import type { handleUnaryCall, ServerUnaryCall } from "@grpc/grpc-js";
import type { Logger } from "../log/log.js";
import { Code, toStatusError } from "../status/status.js";
import { toServiceError } from "./grpc-status.js";

/** Codes that report a client's mistake or an ordinary miss, not a server fault. */
const CLIENT_CODES: ReadonlySet<number> = new Set([
  Code.INVALID_ARGUMENT,
  Code.NOT_FOUND,
  Code.FAILED_PRECONDITION,
  Code.OUT_OF_RANGE,
  Code.ALREADY_EXISTS,
  Code.CANCELLED,
]);

export function logFailure(log: Logger, method: string, err: unknown): void {
  const error = toStatusError(err);
  if (CLIENT_CODES.has(error.code)) {
    log.debug({ method, code: error.code }, `${method}: ${error.message}`);
  } else {
    log.error({ method, code: error.code, err }, `${method} failed: ${error.message}`);
  }
}

/** Adapts an async handler to grpc-js, turning thrown StatusErrors into statuses. */
export function unary<Req, Res>(
  log: Logger,
  method: string,
  handler: (request: Req, call: ServerUnaryCall<Req, Res>) => Promise<Res>,
): handleUnaryCall<Req, Res> {
  return (call, callback) => {
    handler(call.request, call).then(
      (response) => callback(null, response),
      (err: unknown) => {
        logFailure(log, method, err);
        callback(toServiceError(err));
      },
    );
  };
}
