import { RegistryError } from "./errors.js";
import { urlAllowed } from "./plain-http.js";
import { parseRetryAfter, type RetryPolicy, TransientFailure, withRetries } from "./retry.js";

export interface TransportOptions {
  /** Hosts (`host` or `host:port`) that may be reached over plain HTTP besides loopback. */
  readonly insecureRegistries: ReadonlySet<string>;
  readonly retry: RetryPolicy;
  readonly userAgent: string;
}

export interface TransportRequest {
  readonly method?: "GET" | "HEAD";
  readonly headers: Readonly<Record<string, string>>;
  readonly signal: AbortSignal;
  /** The image reference, for error messages. */
  readonly reference: string;
  /** False when the caller retries a larger unit itself (a whole blob download). */
  readonly retry?: boolean;
}

const MAX_REDIRECTS = 10;
const REDIRECTS = new Set([301, 302, 303, 307, 308]);

/**
 * HTTP for registry traffic: Node's fetch, with redirects followed by hand so
 * that every hop obeys the plain-HTTP policy and credentials never follow a
 * redirect to another host (registries send blob GETs to object storage).
 * Network errors, 429 and 5xx are retried; other answers go to the caller.
 */
export class Transport {
  constructor(readonly options: TransportOptions) {}

  async request(url: URL, request: TransportRequest): Promise<Response> {
    const once = () => this.#follow(url, request);
    if (request.retry === false) return once();
    return withRetries(this.options.retry, request.signal, request.reference, once);
  }

  async #follow(start: URL, request: TransportRequest): Promise<Response> {
    let url = start;
    let headers: Record<string, string> = { ...request.headers, "user-agent": this.options.userAgent };
    for (let hop = 0; ; hop++) {
      this.#checkAllowed(url, request.reference, hop > 0);
      const response = await this.#fetch(url, headers, request);
      const location = response.headers.get("location");
      if (!REDIRECTS.has(response.status) || location === null) {
        if (response.status === 429 || response.status >= 500) {
          await response.body?.cancel();
          throw new TransientFailure(
            `${describeOrigin(url)} answered HTTP ${response.status} ${response.statusText}`.trim(),
            parseRetryAfter(response.headers.get("retry-after")),
          );
        }
        return response;
      }
      await response.body?.cancel();
      if (hop >= MAX_REDIRECTS) {
        throw new RegistryError(
          "unavailable",
          request.reference,
          `${describeOrigin(start)} redirected more than ${MAX_REDIRECTS} times`,
        );
      }
      const next = new URL(location, url);
      if (next.origin !== url.origin) {
        // Pre-signed storage URLs carry their own authorization; ours must not leak to them.
        const { authorization: _dropped, ...rest } = headers;
        headers = rest;
      }
      url = next;
    }
  }

  async #fetch(url: URL, headers: Record<string, string>, request: TransportRequest): Promise<Response> {
    try {
      return await fetch(url, { method: request.method ?? "GET", headers, signal: request.signal, redirect: "manual" });
    } catch (err) {
      if (request.signal.aborted) throw err;
      throw new TransientFailure(`cannot reach ${describeOrigin(url)}: ${networkCause(err)}`, undefined, {
        cause: err,
      });
    }
  }

  #checkAllowed(url: URL, reference: string, redirected: boolean): void {
    if (urlAllowed(url, this.options.insecureRegistries)) return;
    const what = redirected ? "the registry redirected to" : "refusing to contact";
    throw new RegistryError(
      "invalid",
      reference,
      `${what} ${describeOrigin(url)} over ${url.protocol.replace(":", "")}: plain HTTP is only used for loopback hosts and registries configured as insecure`,
    );
  }
}

/** Scheme and host only: query strings of storage redirects are signatures, paths may be long. */
export function describeOrigin(url: URL): string {
  return `${url.protocol}//${url.host}`;
}

const ERRNO_WORDS: Record<string, string> = {
  ECONNREFUSED: "connection refused (is the registry running, and is the port right?)",
  ECONNRESET: "the connection was reset",
  ENOTFOUND: "the host name does not resolve",
  EAI_AGAIN: "the host name could not be resolved (DNS failure)",
  ETIMEDOUT: "the connection timed out",
  EHOSTUNREACH: "the host is unreachable",
  ENETUNREACH: "the network is unreachable",
  UND_ERR_CONNECT_TIMEOUT: "the connection timed out",
  UND_ERR_SOCKET: "the connection was closed unexpectedly",
  CERT_HAS_EXPIRED: "its TLS certificate has expired",
  DEPTH_ZERO_SELF_SIGNED_CERT: "its TLS certificate is self-signed",
  UNABLE_TO_VERIFY_LEAF_SIGNATURE: "its TLS certificate cannot be verified",
  ERR_SSL_WRONG_VERSION_NUMBER: "it does not speak TLS (is it a plain-HTTP registry? configure it as insecure)",
};

/** Words for undici's `fetch failed` and its `cause` chain. */
export function networkCause(err: unknown): string {
  let current: unknown = err;
  for (let depth = 0; depth < 5 && current instanceof Error; depth++) {
    const code = (current as NodeJS.ErrnoException).code;
    if (typeof code === "string")
      return ERRNO_WORDS[code] ? `${ERRNO_WORDS[code]} [${code}]` : `${current.message} [${code}]`;
    current = current.cause;
  }
  return err instanceof Error ? err.message : String(err);
}
