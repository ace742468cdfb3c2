import type { handleUnaryCall, ServerUnaryCall } from "@grpc/grpc-js";
import type { Logger } from "../log/log.js";
import { redactCredentials } from "../log/redact.js";
import { Code, toStatusError } from "../status/status.js";
import { toServiceError } from "./grpc-status.js";

/**
 * Codes that report a client's mistake, an ordinary miss or a method this
 * farm does not offer, not a server fault (the call log, call-log.ts, shows
 * operators the refusals they need to see).
 */
const CLIENT_CODES: ReadonlySet<number> = new Set([
  Code.INVALID_ARGUMENT,
  Code.NOT_FOUND,
  Code.FAILED_PRECONDITION,
  Code.OUT_OF_RANGE,
  Code.ALREADY_EXISTS,
  Code.CANCELLED,
  Code.UNIMPLEMENTED,
]);

export function logFailure(log: Logger, method: string, err: unknown): void {
  const error = toStatusError(err);
  const message = redactCredentials(error.message);
  if (CLIENT_CODES.has(error.code)) {
    log.debug({ method, code: error.code }, `${method}: ${message}`);
  } else {
    const stack = err instanceof Error && err.stack ? redactCredentials(err.stack) : undefined;
    log.error(
      { method, code: error.code, err: { type: err instanceof Error ? err.name : "Error", message, stack } },
      `${method} failed: ${message}`,
    );
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
