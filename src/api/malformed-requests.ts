import { ServerInterceptingCall, type ServerInterceptor, type ServiceDefinition } from "@grpc/grpc-js";
import { Code, invalidArgument, StatusError } from "../status/status.js";
import { toServiceError } from "./grpc-status.js";

/*
 * grpc-js answers INTERNAL ("Error deserializing request") when a request's
 * deserializer throws, and the generated ones throw on client input, e.g.
 * an int64 beyond 2^53 (a read_offset of 2^62, a digest's size_bytes).
 * Wrapped here, a deserializer that throws returns a marker carrying the
 * refusal instead, and refuseMalformedRequests answers it, INVALID_ARGUMENT
 * (or the StatusError a hand-written decoder threw), before any handler
 * sees it. It works alike for unary and streaming methods.
 */

const REFUSAL = Symbol("malformed request");

interface MalformedRequest {
  readonly [REFUSAL]: StatusError;
}

/** Whether a deserialized request is the marker of one that did not decode. */
export function isMalformed(message: unknown): message is MalformedRequest {
  return typeof message === "object" && message !== null && REFUSAL in message;
}

function refusal(err: unknown, path: string): StatusError {
  if (err instanceof StatusError) return err;
  const method = path.slice(path.lastIndexOf("/") + 1);
  const reason = err instanceof Error ? err.message : String(err);
  const hint = /MAX_SAFE_INTEGER|MIN_SAFE_INTEGER/.test(reason)
    ? " (an int64 field, such as a digest's size_bytes or an offset, is beyond ±2^53, which no blob reaches)"
    : "";
  return invalidArgument("request", `is not a valid ${method} request: ${reason}${hint}`);
}

/** `service` with every request deserializer turned into one that never throws (see above). */
export function guardDeserializers<S extends ServiceDefinition>(service: S): S {
  const guarded: Record<string, unknown> = {};
  for (const [name, method] of Object.entries(service)) {
    const decode = method.requestDeserialize;
    guarded[name] = {
      ...method,
      requestDeserialize: (bytes: Buffer): unknown => {
        try {
          return decode(bytes);
        } catch (err) {
          return { [REFUSAL]: refusal(err, method.path) } satisfies MalformedRequest;
        }
      },
    };
  }
  return guarded as S;
}

/** Ends a call whose request could not be deserialized with the refusal the deserializer left. */
export const refuseMalformedRequests: ServerInterceptor = (_method, call) => {
  const intercepting: ServerInterceptingCall = new ServerInterceptingCall(call, {
    start: (next) =>
      next({
        onReceiveMessage: (message: unknown, pass: (message: unknown) => void) => {
          if (!isMalformed(message)) return pass(message);
          const error = toServiceError(message[REFUSAL]);
          intercepting.sendStatus({
            code: error.code ?? Code.INVALID_ARGUMENT,
            details: error.details ?? "malformed request",
            metadata: error.metadata,
          });
        },
      }),
  });
  return intercepting;
};
