import type { Metadata } from "@grpc/grpc-js";
import { Code, StatusError } from "../status/status.js";

/** The header clients send their token in (Bazel: --remote_header=Authorization=Bearer TOKEN). */
export const AUTHORIZATION = "authorization";

/**
 * The token of `authorization: Bearer TOKEN`, or undefined when the call has
 * none. Anything else in that header is UNAUTHENTICATED; the value itself is
 * never echoed, since it may be a secret sent by mistake.
 */
export function bearerToken(metadata: Metadata): string | undefined {
  const values = metadata.get(AUTHORIZATION);
  if (values.length === 0) return undefined;
  if (values.length > 1) throw unauthenticated("the call has more than one authorization header");
  const value = String(values[0]);
  const match = /^Bearer +(\S+)\s*$/i.exec(value);
  if (!match) throw unauthenticated('the authorization header is not of the form "Bearer TOKEN"');
  return match[1];
}

export function unauthenticated(message: string): StatusError {
  return new StatusError(Code.UNAUTHENTICATED, message);
}
