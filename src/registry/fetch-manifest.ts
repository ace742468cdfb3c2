import { readLimited } from "./blob.js";
import { digestOf, parseContentDigest } from "./digests.js";
import { describeErrorBody, errorCodes, RegistryError } from "./errors.js";
import { type ParsedManifest, parseManifest } from "./manifest.js";
import { essence, MANIFEST_ACCEPT } from "./media-types.js";
import type { RegistrySession } from "./session.js";

/** The distribution spec lets registries refuse manifests above 4 MiB; nothing legitimate is bigger. */
const MAX_MANIFEST_BYTES = 4 * 1024 * 1024;

export type FetchedManifest = ParsedManifest & {
  /** The digest of the bytes as received: the manifest's identity. */
  readonly digest: string;
  readonly bytes: Uint8Array;
};

/**
 * GETs a manifest by tag or by digest. The bytes' digest is computed here:
 * it must equal the digest asked for, and the registry's
 * `Docker-Content-Digest` when it sends one.
 */
export async function fetchManifest(session: RegistrySession, tagOrDigest: string): Promise<FetchedManifest> {
  const byDigest = tagOrDigest.includes(":");
  const expected = byDigest ? parseContentDigest(tagOrDigest) : undefined;
  if (typeof expected === "string") throw new RegistryError("invalid", session.reference, expected);
  const response = await session.get(`manifests/${tagOrDigest}`, { accept: MANIFEST_ACCEPT });
  if (!response.ok) await failed(session, tagOrDigest, byDigest, response);
  const bytes = await readLimited(response, MAX_MANIFEST_BYTES, session);
  const digest = digestOf(expected?.algorithm ?? "sha256", bytes);
  if (expected && digest !== tagOrDigest) {
    throw new RegistryError(
      "invalid",
      session.reference,
      `digest mismatch: the registry sent a manifest whose digest is ${digest}, not ${tagOrDigest}`,
    );
  }
  const announced = response.headers.get("docker-content-digest");
  // Only comparable when computed with the same algorithm; a tag fetch uses sha256.
  if (announced !== null && announced.split(":")[0] === digest.split(":")[0] && announced !== digest) {
    throw new RegistryError(
      "invalid",
      session.reference,
      `digest mismatch: the registry says the manifest is ${announced} but its bytes hash to ${digest}`,
    );
  }
  const parsed = parseManifest(bytes, essence(response.headers.get("content-type")), session.reference);
  return { ...parsed, digest, bytes };
}

async function failed(
  session: RegistrySession,
  tagOrDigest: string,
  byDigest: boolean,
  response: Response,
): Promise<never> {
  const body = await response.text();
  const detail = describeErrorBody(body);
  const { registry, repository } = session.ref;
  if (response.status === 404) {
    const codes = errorCodes(body);
    const what = byDigest ? `manifest ${tagOrDigest}` : `tag "${tagOrDigest}"`;
    const where = codes.includes("NAME_UNKNOWN")
      ? `repository ${repository} does not exist on registry ${registry}`
      : `${what} does not exist in repository ${repository} on registry ${registry} (or the repository does not exist)`;
    throw new RegistryError("not-found", session.reference, `${where}${detail ? ` [${detail}]` : ""}`);
  }
  throw new RegistryError(
    "invalid",
    session.reference,
    `the registry answered HTTP ${response.status} for ${byDigest ? `manifest ${tagOrDigest}` : `tag "${tagOrDigest}"`}${detail ? `: ${detail}` : ""}`,
  );
}
