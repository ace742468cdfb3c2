import { type CallOptions, type ClientReadableStream, Metadata, type ServiceError } from "@grpc/grpc-js";
import { BadRequest, PreconditionFailure } from "../../src/gen/google/rpc/error_details.js";
import { Status } from "../../src/gen/google/rpc/status.js";

type Callback<Res> = (err: ServiceError | null, res: Res) => void;

/**
 * Calls a unary method of a generated client and awaits its answer. The
 * method's last overload (request, metadata, options, callback) is the one
 * TypeScript infers from, so that is the form called.
 */
export function unaryCall<Req, Res>(
  method: (req: Req, metadata: Metadata, options: Partial<CallOptions>, cb: Callback<Res>) => unknown,
  request: Req,
  metadata: Metadata = new Metadata(),
): Promise<Res> {
  return new Promise((resolve, reject) => {
    method(request, metadata, {}, (err, res) => (err ? reject(err) : resolve(res)));
  });
}

/** Every message of a server stream, or the stream's error. */
export async function collect<T>(stream: ClientReadableStream<T>): Promise<T[]> {
  const out: T[] = [];
  for await (const message of stream) out.push(message as T);
  return out;
}

/** The google.rpc.Status details a server attached to a failed call. */
export function statusDetails(err: ServiceError): {
  status: Status | undefined;
  preconditionFailure: PreconditionFailure | undefined;
  badRequest: BadRequest | undefined;
} {
  const raw = err.metadata?.get("grpc-status-details-bin")[0];
  if (!raw) return { status: undefined, preconditionFailure: undefined, badRequest: undefined };
  const status = Status.decode(raw as Buffer);
  return { status, ...unpackDetails(status) };
}

export function unpackDetails(status: Status): {
  preconditionFailure: PreconditionFailure | undefined;
  badRequest: BadRequest | undefined;
} {
  let preconditionFailure: PreconditionFailure | undefined;
  let badRequest: BadRequest | undefined;
  for (const any of status.details) {
    if (any.typeUrl.endsWith("/google.rpc.PreconditionFailure"))
      preconditionFailure = PreconditionFailure.decode(any.value);
    if (any.typeUrl.endsWith("/google.rpc.BadRequest")) badRequest = BadRequest.decode(any.value);
  }
  return { preconditionFailure, badRequest };
}
