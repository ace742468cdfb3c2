/**
 * Image references, parsed and normalized the way Docker does
 * (github.com/distribution/reference: ParseNormalizedNamed + TagNameOnly), so
 * that `container-image` values mean on Berth what they mean to `docker pull`.
 */

/** A normalized image reference. `toString()` gives the canonical form, e.g. `docker.io/library/ubuntu:latest`. */
export interface ImageReference {
  /** Registry name as people write it (`docker.io`, `127.0.0.1:5000`); see `apiHost` for where to connect. */
  readonly registry: string;
  /** Repository path inside the registry, lowercase (`library/ubuntu`). */
  readonly repository: string;
  /** Absent only when the reference names a digest and no tag. */
  readonly tag?: string;
  /** `algorithm:hex`; when present it wins over the tag, as with Docker. */
  readonly digest?: string;
  toString(): string;
}

export class ImageReferenceError extends Error {
  override readonly name = "ImageReferenceError";
  constructor(
    readonly reference: string,
    readonly reason: string,
  ) {
    super(`invalid image reference "${shorten(reference)}": ${reason}`);
  }
}

export const DOCKER_HUB = "docker.io";
const DOCKER_HUB_API = "registry-1.docker.io";
// Docker treats these as aliases of Docker Hub when they are written out.
const DOCKER_HUB_ALIASES = new Set(["index.docker.io", "registry-1.docker.io"]);
const DEFAULT_TAG = "latest";
const NAME_MAX = 255;

const PATH_COMPONENT = /^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$/;
const DOMAIN_COMPONENT = /^(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])$/;
const IPV6_HOST = /^\[[0-9a-fA-F:.]+\]$/;
const PORT = /^[0-9]+$/;
const TAG = /^[\w][\w.-]{0,127}$/;
const DIGEST_ALGORITHM = /^[a-z0-9]+(?:[.+_-][a-z0-9]+)*$/;
const HEX_ONLY_64 = /^[a-f0-9]{64}$/;
/** Hex lengths of the algorithms Docker (go-digest) accepts. */
const DIGEST_HEX_LENGTHS: Record<string, number> = { sha256: 64, sha384: 96, sha512: 128 };

/** True for values of `container-image` that ask for no image: empty, or `none` (with or without `docker://`). */
export function isNoImage(value: string): boolean {
  const v = stripTransport(value.trim());
  return v === "" || v === "none";
}

/** The host to open for a registry's HTTP API: Docker Hub's registry is not served at `docker.io`. */
export function apiHost(registry: string): string {
  return registry === DOCKER_HUB ? DOCKER_HUB_API : registry;
}

/** Parses and normalizes `input` (an optional `docker://` prefix is dropped); throws `ImageReferenceError`. */
export function parseImageReference(input: string): ImageReference {
  const text = stripTransport(input);
  const fail = (reason: string): never => {
    throw new ImageReferenceError(input, reason);
  };
  if (text === "") fail("it is empty");
  if (/\s/.test(text)) fail("it contains white space");

  const at = text.indexOf("@");
  const namePart = at === -1 ? text : text.slice(0, at);
  const digest = at === -1 ? undefined : parseDigestPart(text.slice(at + 1), fail);

  const lastSlash = namePart.lastIndexOf("/");
  const colon = namePart.indexOf(":", lastSlash + 1);
  const name = colon === -1 ? namePart : namePart.slice(0, colon);
  const explicitTag = colon === -1 ? undefined : namePart.slice(colon + 1);
  if (explicitTag !== undefined && !TAG.test(explicitTag)) {
    fail(
      explicitTag === ""
        ? "the tag after ':' is empty"
        : `tag "${shorten(explicitTag)}" is invalid: a tag is 1 to 128 letters, digits, '_', '.' or '-', not starting with '.' or '-'`,
    );
  }
  if (name === "") fail("the repository name is empty");
  if (name.length > NAME_MAX) fail(`the repository name is longer than ${NAME_MAX} characters`);
  if (HEX_ONLY_64.test(name)) {
    fail("a repository name cannot be a 64-character hexadecimal string (it looks like an image ID)");
  }

  const { registry, path } = splitRegistry(name);
  validateRegistry(registry, fail);
  const components = path.split("/");
  for (const component of components) {
    if (component === "") fail("the repository name has an empty path component ('//', or a leading or trailing '/')");
    if (component !== component.toLowerCase()) fail("repository name must be lowercase");
    if (!PATH_COMPONENT.test(component)) {
      fail(
        `path component "${shorten(component)}" is invalid: use lowercase letters and digits, separated by '.', '_', '__' or dashes`,
      );
    }
  }
  const repository = registry === DOCKER_HUB && components.length === 1 ? `library/${path}` : path;
  // Like Docker's TagNameOnly: a bare name means ":latest", a digest alone means no tag.
  const tag = explicitTag ?? (digest === undefined ? DEFAULT_TAG : undefined);
  return makeReference(registry, repository, tag, digest);
}

/** Builds a reference from parts already validated (e.g. the same image pinned to a digest). */
export function makeReference(registry: string, repository: string, tag?: string, digest?: string): ImageReference {
  const canonical = `${registry}/${repository}${tag === undefined ? "" : `:${tag}`}${digest === undefined ? "" : `@${digest}`}`;
  return Object.freeze({
    registry,
    repository,
    ...(tag === undefined ? {} : { tag }),
    ...(digest === undefined ? {} : { digest }),
    toString: () => canonical,
  });
}

function stripTransport(value: string): string {
  return value.startsWith("docker://") ? value.slice("docker://".length) : value;
}

/** Docker's rule: the first component is a registry only if it has '.' or ':', is `localhost`, or has capitals. */
function splitRegistry(name: string): { registry: string; path: string } {
  const slash = name.indexOf("/");
  if (slash === -1) return { registry: DOCKER_HUB, path: name };
  const first = name.slice(0, slash);
  const isRegistry = /[.:]/.test(first) || first === "localhost" || first !== first.toLowerCase();
  if (!isRegistry) return { registry: DOCKER_HUB, path: name };
  const registry = DOCKER_HUB_ALIASES.has(first) ? DOCKER_HUB : first;
  return { registry, path: name.slice(slash + 1) };
}

function validateRegistry(registry: string, fail: (reason: string) => never): void {
  if (registry === DOCKER_HUB) return;
  let host = registry;
  const portAt = registry.startsWith("[") ? registry.indexOf("]:") + 1 : registry.lastIndexOf(":");
  if (portAt > 0) {
    const port = registry.slice(portAt + 1);
    host = registry.slice(0, portAt);
    if (!PORT.test(port)) fail(`registry "${registry}" has an invalid port "${port}"`);
  }
  if (IPV6_HOST.test(host)) return;
  if (host === "" || !host.split(".").every((c) => DOMAIN_COMPONENT.test(c))) {
    fail(`registry host "${shorten(host)}" is not a valid host name or IP address`);
  }
}

function parseDigestPart(digest: string, fail: (reason: string) => never): string {
  const colon = digest.indexOf(":");
  if (colon <= 0) fail(`digest "${shorten(digest)}" must have the form algorithm:hex, e.g. sha256:<64 hex digits>`);
  const algorithm = digest.slice(0, colon);
  const hex = digest.slice(colon + 1);
  if (!DIGEST_ALGORITHM.test(algorithm)) fail(`digest algorithm "${shorten(algorithm)}" is malformed`);
  const length = DIGEST_HEX_LENGTHS[algorithm];
  if (length === undefined) {
    fail(`digest algorithm "${algorithm}" is not supported (use ${Object.keys(DIGEST_HEX_LENGTHS).join(", ")})`);
  }
  if (hex.length !== length || !/^[a-f0-9]+$/.test(hex)) {
    fail(
      `a ${algorithm} digest has ${length} lowercase hexadecimal digits; "${shorten(hex)}" has ${hex.length} characters`,
    );
  }
  return digest;
}

function shorten(s: string): string {
  return s.length > 300 ? `${s.slice(0, 300)}…` : s;
}
