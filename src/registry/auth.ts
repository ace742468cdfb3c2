import type { FoundCredentials } from "./credentials.js";
import { RegistryError } from "./errors.js";
import { SingleFlight } from "./single-flight.js";
import type { Transport } from "./transport.js";
import { type Challenge, parseWwwAuthenticate } from "./www-authenticate.js";

/** Who asks for what: one repository's pull scope, with or without credentials. */
export interface AuthContext {
  /** Registry host as in the reference; challenges and tokens are remembered per registry. */
  readonly registry: string;
  /** e.g. `repository:library/ubuntu:pull`. */
  readonly scope: string;
  readonly credentials: FoundCredentials | undefined;
  readonly signal: AbortSignal;
  readonly reference: string;
}

interface CachedToken {
  readonly value: string;
  readonly expiresAt: number;
}

const DEFAULT_TOKEN_SECONDS = 60;
const MAX_TOKEN_BODY = 1024 * 1024;

/**
 * Registry authentication (the distribution spec's token flow, and Basic).
 * The first 401 of a registry teaches its challenge; from then on requests
 * carry credentials up front. Bearer tokens are kept per registry, scope and
 * identity until shortly before they expire, and concurrent requests for the
 * same token share one fetch.
 */
export class Authenticator {
  readonly #challenges = new Map<string, Challenge>();
  readonly #tokens = new Map<string, CachedToken>();
  readonly #fetching = new SingleFlight<string, CachedToken>();

  constructor(
    readonly transport: Transport,
    readonly now: () => number = Date.now,
  ) {}

  /** Remembers the registry's challenge from a 401; undefined when it offers neither Basic nor Bearer. */
  learn(registry: string, header: string | null): Challenge | undefined {
    const challenges = parseWwwAuthenticate(header ?? "");
    const usable =
      challenges.find((c) => c.scheme === "bearer" && c.params.realm) ?? challenges.find((c) => c.scheme === "basic");
    if (usable) this.#challenges.set(registry, usable);
    return usable;
  }

  /** The `Authorization` value for a request, if the registry is known to want one. */
  async authorization(ctx: AuthContext, options: { refresh?: boolean } = {}): Promise<string | undefined> {
    const challenge = this.#challenges.get(ctx.registry);
    if (!challenge) return undefined;
    if (challenge.scheme === "basic") return ctx.credentials?.credentials.basicAuthorization();
    const key = [ctx.registry, ctx.scope, ctx.credentials?.credentials.fingerprint() ?? "anonymous"].join("\n");
    const cached = this.#tokens.get(key);
    if (cached && !options.refresh && cached.expiresAt > this.now()) return `Bearer ${cached.value}`;
    const token = await this.#fetching.run(key, async () => {
      const fresh = await this.#fetchToken(challenge, ctx);
      this.#forgetExpired();
      this.#tokens.set(key, fresh);
      return fresh;
    });
    return `Bearer ${token.value}`;
  }

  /** Keeps the cache from growing with every repository a long-lived worker ever pulled. */
  #forgetExpired(): void {
    const now = this.now();
    for (const [key, token] of this.#tokens) if (token.expiresAt <= now) this.#tokens.delete(key);
  }

  async #fetchToken(challenge: Challenge, ctx: AuthContext): Promise<CachedToken> {
    const realm = parseRealm(challenge, ctx);
    if (challenge.params.service) realm.searchParams.set("service", challenge.params.service);
    realm.searchParams.set("scope", ctx.scope);
    const headers: Record<string, string> = { accept: "application/json" };
    if (ctx.credentials) headers.authorization = ctx.credentials.credentials.basicAuthorization();
    const response = await this.transport.request(realm, { headers, signal: ctx.signal, reference: ctx.reference });
    if (response.status === 401 || response.status === 403) {
      await response.body?.cancel();
      throw credentialsRefused(ctx, `the token service ${realm.origin} answered HTTP ${response.status}`);
    }
    if (!response.ok) {
      await response.body?.cancel();
      throw new RegistryError(
        "unavailable",
        ctx.reference,
        `the token service ${realm.origin} of registry ${ctx.registry} answered HTTP ${response.status}`,
      );
    }
    const body = await response.text();
    return this.#parseToken(body.slice(0, MAX_TOKEN_BODY), realm, ctx);
  }

  #parseToken(body: string, realm: URL, ctx: AuthContext): CachedToken {
    let parsed: unknown;
    try {
      parsed = JSON.parse(body);
    } catch {
      parsed = undefined;
    }
    const record = typeof parsed === "object" && parsed !== null ? (parsed as Record<string, unknown>) : {};
    // Docker Hub sends both fields; OAuth2-style services only `access_token`.
    const value = typeof record.token === "string" && record.token !== "" ? record.token : record.access_token;
    if (typeof value !== "string" || value === "") {
      throw new RegistryError(
        "invalid",
        ctx.reference,
        `the token service ${realm.origin} of registry ${ctx.registry} answered without a token`,
      );
    }
    const seconds =
      typeof record.expires_in === "number" && record.expires_in > 0 ? record.expires_in : DEFAULT_TOKEN_SECONDS;
    // Keep a margin so a token does not expire between our check and the registry's.
    const margin = Math.min(10, seconds / 2);
    return { value, expiresAt: this.now() + (seconds - margin) * 1000 };
  }
}

function parseRealm(challenge: Challenge, ctx: AuthContext): URL {
  const realm = challenge.params.realm ?? "";
  try {
    return new URL(realm);
  } catch {
    throw new RegistryError(
      "invalid",
      ctx.reference,
      `registry ${ctx.registry} names a token service "${realm.slice(0, 200)}" that is not a URL`,
    );
  }
}

/** The registry said no to what was sent: names where the credentials came from, never what they are. */
export function credentialsRefused(ctx: AuthContext, detail: string): RegistryError {
  const what = ctx.credentials
    ? `the credentials for registry ${ctx.registry} from ${ctx.credentials.origin} were refused`
    : `registry ${ctx.registry} requires credentials for ${ctx.scope}, and none are configured for it (anonymous access was refused)`;
  return new RegistryError("unauthorized", ctx.reference, `${what} (${detail})`);
}
