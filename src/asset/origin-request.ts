import { request as httpRequest, type IncomingMessage, type RequestOptions } from "node:http";
import { request as httpsRequest } from "node:https";
import { type OriginPolicy, OriginRefused } from "./origin-policy.js";

/** Why one URI gave nothing: the origin's answer, the policy's refusal, or the fetch's deadline. */
export class UriFailure extends Error {
  constructor(
    message: string,
    readonly kind: "failed" | "refused" | "timedOut" = "failed",
  ) {
    super(message);
  }
}

const MAX_REDIRECTS = 10;
const REDIRECTS = new Set([301, 302, 303, 307, 308]);

/** Scheme, host and path: never userinfo, and no query (where pre-signed URLs keep their signatures). */
export function describeUrl(url: URL): string {
  return `${url.protocol}//${url.host}${url.pathname.length > 200 ? `${url.pathname.slice(0, 200)}…` : url.pathname}`;
}

/** A 200 answer of an origin, its body not read yet. */
export interface OriginBody {
  readonly body: IncomingMessage;
  /** Content-Length, when the origin sent one. */
  readonly length: number | undefined;
  /** Where the body came from, after redirects. */
  readonly url: URL;
}

/**
 * GETs `start`, following redirects by hand so that every hop is checked by
 * the policy (host, port, scheme, the addresses its name resolves to);
 * `headers` (a client's credentials) go only to the first URL's origin.
 * Anything but 200 at the end is a UriFailure.
 */
export async function openOrigin(
  start: URL,
  headers: Readonly<Record<string, string>>,
  policy: OriginPolicy,
  signal: AbortSignal,
): Promise<OriginBody> {
  let url = start;
  for (let hop = 0; ; hop++) {
    try {
      policy.check(url);
    } catch (err) {
      if (!(err instanceof OriginRefused)) throw err;
      throw new UriFailure(hop === 0 ? err.message : `redirected to ${describeUrl(url)}: ${err.message}`, "refused");
    }
    const sent = url.origin === start.origin ? headers : {};
    const response = await get(url, sent, policy, signal);
    const location = response.headers.location;
    if (REDIRECTS.has(response.statusCode ?? 0) && location !== undefined) {
      response.resume();
      if (hop >= MAX_REDIRECTS) throw new UriFailure(`more than ${MAX_REDIRECTS} redirects`);
      try {
        url = new URL(location, url);
      } catch {
        throw new UriFailure(`redirected to a location that is not a URL`);
      }
      continue;
    }
    if (response.statusCode !== 200) {
      response.resume();
      const where = hop === 0 ? "" : ` (after redirects, at ${describeUrl(url)})`;
      throw new UriFailure(`HTTP ${response.statusCode} ${response.statusMessage ?? ""}`.trim() + where);
    }
    const header = response.headers["content-length"];
    const length = header !== undefined && /^[0-9]+$/.test(header) ? Number(header) : undefined;
    return { body: response, length, url };
  }
}

function get(
  url: URL,
  headers: Readonly<Record<string, string>>,
  policy: OriginPolicy,
  signal: AbortSignal,
): Promise<IncomingMessage> {
  const options: RequestOptions = {
    method: "GET",
    headers: { "user-agent": "berth-remote-asset", ...headers },
    // One connection per download: nothing pooled is reused past the policy's checks.
    agent: false,
    lookup: policy.lookup as RequestOptions["lookup"],
    signal,
  };
  return new Promise((resolve, reject) => {
    const send = url.protocol === "https:" ? httpsRequest : httpRequest;
    const req = send(url, options, resolve);
    req.on("error", (err) => reject(failureOf(err, signal)));
    req.end();
  });
}

/** What a failed request or body read says, in words a person can act on. */
export function failureOf(err: unknown, signal: AbortSignal): UriFailure {
  if (err instanceof UriFailure) return err;
  if (signal.aborted) {
    const reason: unknown = signal.reason;
    const timedOut = reason instanceof Error && reason.name === "TimeoutError";
    return timedOut
      ? new UriFailure("the fetch's timeout passed", "timedOut")
      : new UriFailure("the fetch was stopped");
  }
  if (err instanceof OriginRefused) return new UriFailure(err.message, "refused");
  // The lookup's refusal reaches here wrapped by net when it cannot be passed on as it is.
  const cause = (err as { cause?: unknown }).cause;
  if (cause instanceof OriginRefused) return new UriFailure(cause.message, "refused");
  return new UriFailure(networkCause(err));
}

const ERRNO_WORDS: Record<string, string> = {
  ECONNREFUSED: "connection refused",
  ECONNRESET: "the connection was reset",
  ENOTFOUND: "the host name does not resolve",
  EAI_AGAIN: "the host name could not be resolved",
  ETIMEDOUT: "the connection timed out",
  EHOSTUNREACH: "the host is unreachable",
  ENETUNREACH: "the network is unreachable",
  CERT_HAS_EXPIRED: "its TLS certificate has expired",
  DEPTH_ZERO_SELF_SIGNED_CERT: "its TLS certificate is self-signed",
  SELF_SIGNED_CERT_IN_CHAIN: "its TLS certificate chain is self-signed",
  UNABLE_TO_VERIFY_LEAF_SIGNATURE: "its TLS certificate cannot be verified",
  ERR_TLS_CERT_ALTNAME_INVALID: "its TLS certificate is for another name",
  ERR_SSL_WRONG_VERSION_NUMBER: "it does not speak TLS",
};

function networkCause(err: unknown): string {
  const code = (err as NodeJS.ErrnoException).code;
  if (typeof code === "string") return `${ERRNO_WORDS[code] ?? (err as Error).message} [${code}]`;
  return err instanceof Error ? err.message : String(err);
}
