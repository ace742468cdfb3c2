import { apiHost, type ImageReference } from "../image/reference.js";
import { type AuthContext, type Authenticator, credentialsRefused } from "./auth.js";
import type { FoundCredentials } from "./credentials.js";
import { describeErrorBody, RegistryError } from "./errors.js";
import { registryScheme } from "./plain-http.js";
import type { Transport } from "./transport.js";

/**
 * Requests about one image: the repository's API root, its pull scope,
 * the credentials chosen for it and the pull's signal, so that modules
 * fetching manifests and blobs only say which path they want.
 */
export class RegistrySession {
  readonly base: URL;
  readonly reference: string;
  readonly #auth: AuthContext;

  constructor(
    readonly ref: ImageReference,
    readonly transport: Transport,
    readonly authenticator: Authenticator,
    credentials: FoundCredentials | undefined,
    readonly signal: AbortSignal,
  ) {
    const host = apiHost(ref.registry);
    const scheme = registryScheme(host, transport.options.insecureRegistries);
    this.base = new URL(`${scheme}://${host}/v2/${ref.repository}/`);
    this.reference = String(ref);
    this.#auth = {
      registry: ref.registry,
      scope: `repository:${ref.repository}:pull`,
      credentials,
      signal,
      reference: this.reference,
    };
  }

  /**
   * GETs `path` (relative to `/v2/<repository>/`), answering one 401 with the
   * registry's challenge. Returns any other answer for the caller to judge.
   */
  async get(
    path: string,
    headers: Readonly<Record<string, string>>,
    options: { retry?: boolean } = {},
  ): Promise<Response> {
    const url = new URL(path, this.base);
    const sent = await this.authenticator.authorization(this.#auth);
    let response = await this.#send(url, headers, sent, options.retry);
    if (response.status !== 401) return this.#checkDenied(response);
    await response.body?.cancel();
    const challenge = this.authenticator.learn(this.ref.registry, response.headers.get("www-authenticate"));
    if (!challenge) {
      throw new RegistryError(
        "unauthorized",
        this.reference,
        `registry ${this.ref.registry} demands authentication but offers no Basic or Bearer challenge Berth can answer`,
      );
    }
    // Basic credentials already sent were refused; a Bearer token may just have expired early.
    if (sent !== undefined && challenge.scheme === "basic") throw credentialsRefused(this.#auth, "HTTP 401");
    const retried = await this.authenticator.authorization(this.#auth, { refresh: true });
    if (retried === undefined) throw credentialsRefused(this.#auth, "HTTP 401");
    response = await this.#send(url, headers, retried, options.retry);
    if (response.status === 401) {
      await response.body?.cancel();
      throw credentialsRefused(this.#auth, "HTTP 401 with a fresh token");
    }
    return this.#checkDenied(response);
  }

  async #send(url: URL, headers: Readonly<Record<string, string>>, authorization: string | undefined, retry?: boolean) {
    return this.transport.request(url, {
      headers: authorization === undefined ? headers : { ...headers, authorization },
      signal: this.signal,
      reference: this.reference,
      retry,
    });
  }

  async #checkDenied(response: Response): Promise<Response> {
    if (response.status !== 403) return response;
    const detail = describeErrorBody(await response.text());
    throw credentialsRefused(this.#auth, `HTTP 403${detail ? `: ${detail}` : ""}`);
  }
}
