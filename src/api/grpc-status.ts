import { Metadata, type ServiceError } from "@grpc/grpc-js";
import { Status } from "../gen/google/rpc/status.js";
import { toRpcStatus } from "../status/rpc-status.js";
import { toStatusError } from "../status/status.js";

/**
 * What a handler passes to grpc-js for a failed call: the code, the message,
 * and the full google.rpc.Status in `grpc-status-details-bin` so clients
 * can read PreconditionFailure and BadRequest details.
 */
export function toServiceError(err: unknown): Partial<ServiceError> {
  const error = toStatusError(err);
  const metadata = new Metadata();
  const status = toRpcStatus(error);
  if (status.details.length > 0) {
    metadata.set("grpc-status-details-bin", Buffer.from(Status.encode(status).finish()));
  }
  return { code: error.code, details: error.message, metadata };
}
