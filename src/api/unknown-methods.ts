import type { Server, ServerDuplexStream } from "@grpc/grpc-js";
import { Code } from "../status/status.js";

/*
 * grpc-js answers a method no service registered (`/build.bazel.remote.
 * logstream.v1.LogStream/…`, BES, a newer REAPI's) by itself, UNIMPLEMENTED,
 * before any server interceptor runs: the call log would never see the
 * clients that expect an API this farm lacks. Here every such path gets a
 * handler of its own, so its calls pass through the interceptors like any
 * other (the access interceptor refuses them UNIMPLEMENTED at once, since no
 * method without a rule is let through). The handler table is reached
 * through a private field, as in widenReceiveWindows; should a future
 * grpc-js lack it, grpc-js keeps answering those calls itself, unlogged.
 */

/** Routes calls of every path no service registered to `unknownMethod`. */
export function routeUnknownMethods(server: Server): void {
  const handlers = (server as unknown as { handlers?: unknown }).handlers;
  if (!(handlers instanceof Map)) return;
  const registered = handlers.get.bind(handlers) as (path: unknown) => unknown;
  handlers.get = (path: unknown) => registered(path) ?? (typeof path === "string" ? unknownMethod(path) : undefined);
}

/** A handler of raw messages that answers UNIMPLEMENTED, should an interceptor let the call reach it. */
function unknownMethod(path: string) {
  return {
    type: "bidi",
    path,
    serialize: (message: Buffer) => message,
    deserialize: (bytes: Buffer) => bytes,
    func: (call: ServerDuplexStream<Buffer, Buffer>) => {
      call.emit("error", { code: Code.UNIMPLEMENTED, details: `${path} is not a method of this farm` });
    },
  };
}
