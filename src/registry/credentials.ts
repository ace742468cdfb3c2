import { createHash } from "node:crypto";
import { readFile } from "node:fs/promises";
import { inspect } from "node:util";

/**
 * A user name and password for one registry. The password is kept out of
 * every printable form (`String`, `JSON.stringify`, `util.inspect`, pino), so
 * an object that reaches a log or an error message cannot leak it.
 */
export class Credentials {
  readonly #password: string;
  constructor(
    readonly username: string,
    password: string,
  ) {
    this.#password = password;
  }
  get password(): string {
    return this.#password;
  }
  /** The value of an `Authorization: Basic` header. */
  basicAuthorization(): string {
    return `Basic ${Buffer.from(`${this.username}:${this.#password}`).toString("base64")}`;
  }
  /** Tells identities apart (token caches are per identity) without using the secret itself as a key. */
  fingerprint(): string {
    return createHash("sha256").update(this.username).update("\0").update(this.#password).digest("hex");
  }
  toString(): string {
    return "[registry credentials]";
  }
  toJSON(): string {
    return this.toString();
  }
  [inspect.custom](): string {
    return this.toString();
  }
}

/** Credentials and where they came from, so errors can tell the engineer which ones to fix. */
export interface FoundCredentials {
  readonly credentials: Credentials;
  /** e.g. "the Berth configuration", "/root/.docker/config.json", "the action's platform properties". */
  readonly origin: string;
}

export interface CredentialSource {
  /** `registry` as in an image reference (`docker.io`, `host:5000`). */
  lookup(registry: string): Promise<FoundCredentials | undefined>;
}

export interface UsernamePassword {
  username: string;
  password: string;
}

/** Credentials per registry host, as Berth's configuration file lists them. */
export function staticCredentials(
  byRegistry: Readonly<Record<string, UsernamePassword>>,
  origin = "the Berth configuration",
): CredentialSource {
  const table = new Map<string, Credentials>();
  for (const [host, { username, password }] of Object.entries(byRegistry)) {
    table.set(normalizeRegistryKey(host), new Credentials(username, password));
  }
  return {
    lookup: async (registry) => {
      const credentials = table.get(normalizeRegistryKey(registry));
      return credentials && { credentials, origin };
    },
  };
}

/** The first source that knows the registry wins; list the most specific first. */
export function composeCredentials(...sources: (CredentialSource | undefined)[]): CredentialSource {
  const present = sources.filter((s): s is CredentialSource => s !== undefined);
  return {
    lookup: async (registry) => {
      for (const source of present) {
        const found = await source.lookup(registry);
        if (found) return found;
      }
      return undefined;
    },
  };
}

/** Reads a Docker `config.json` now; a missing file is an empty source, a malformed one an error naming the file. */
export async function dockerConfigCredentials(path: string): Promise<CredentialSource> {
  let text: string;
  try {
    text = await readFile(path, "utf8");
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") return staticCredentials({});
    throw err;
  }
  return parseDockerConfig(text, path);
}

/**
 * The `auths` section of a Docker `config.json`: each entry has `auth`
 * (base64 of `user:password`) or `username` and `password`. Keys may be a host,
 * a URL (`https://host/v1/`), or Docker Hub's historical `https://index.docker.io/v1/`.
 * Credential helpers (`credsStore`, `credHelpers`) are not run.
 */
export function parseDockerConfig(text: string, origin: string): CredentialSource {
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch {
    throw new Error(`${origin} is not valid JSON`);
  }
  const table: Record<string, UsernamePassword> = {};
  const auths = isRecord(parsed) && isRecord(parsed.auths) ? parsed.auths : {};
  for (const [key, entry] of Object.entries(auths)) {
    if (!isRecord(entry)) continue;
    const pair = entryCredentials(entry);
    if (pair === undefined) continue;
    table[normalizeRegistryKey(key)] = pair;
  }
  return staticCredentials(table, origin);
}

function entryCredentials(entry: Record<string, unknown>): UsernamePassword | undefined {
  if (typeof entry.auth === "string" && entry.auth !== "") {
    const decoded = Buffer.from(entry.auth, "base64").toString("utf8");
    const colon = decoded.indexOf(":");
    // Say nothing about the value: a malformed entry may still hold a secret.
    if (colon <= 0) return undefined;
    return { username: decoded.slice(0, colon), password: decoded.slice(colon + 1) };
  }
  if (typeof entry.username === "string" && typeof entry.password === "string") {
    return { username: entry.username, password: entry.password };
  }
  return undefined;
}

/** `https://index.docker.io/v1/`, `index.docker.io`, `registry-1.docker.io` and `docker.io` are one registry. */
export function normalizeRegistryKey(key: string): string {
  const host = key
    .replace(/^[a-z]+:\/\//i, "")
    .split("/")[0]
    ?.toLowerCase();
  if (host === "index.docker.io" || host === "registry-1.docker.io") return "docker.io";
  return host ?? "";
}

function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}
