/**
 * What can go wrong talking to a registry, sorted by what the caller should
 * answer: `not-found` and `invalid` → FAILED_PRECONDITION, `unauthorized` →
 * PERMISSION_DENIED, `unavailable` → UNAVAILABLE (worth retrying later).
 */
export type RegistryErrorKind = "not-found" | "unauthorized" | "unavailable" | "invalid";

export class RegistryError extends Error {
  override readonly name = "RegistryError";
  /**
   * `message` must never contain credentials: it is built only from the image
   * reference, hosts, digests, HTTP statuses and the registry's error codes.
   */
  constructor(
    readonly kind: RegistryErrorKind,
    /** The image reference in canonical form, or the registry host when no image is involved. */
    readonly reference: string,
    message: string,
    options?: { cause?: unknown },
  ) {
    super(`image ${reference}: ${message}`, options);
  }
}

/** The body of an error response as the distribution spec defines it: `{"errors":[{"code","message"}]}`. */
export function describeErrorBody(body: string): string {
  try {
    const parsed: unknown = JSON.parse(body);
    if (typeof parsed === "object" && parsed !== null && "errors" in parsed && Array.isArray(parsed.errors)) {
      const parts = parsed.errors
        .map((e: unknown) => {
          if (typeof e !== "object" || e === null) return "";
          const code = "code" in e && typeof e.code === "string" ? e.code : "";
          const message = "message" in e && typeof e.message === "string" ? e.message : "";
          return [code, message].filter((s) => s !== "").join(": ");
        })
        .filter((s: string) => s !== "");
      if (parts.length > 0) return truncate(parts.join("; "));
    }
  } catch {
    // Not JSON (a proxy's HTML page, say): fall through to no description.
  }
  return "";
}

/** The registry error codes in a response body, e.g. `MANIFEST_UNKNOWN`. */
export function errorCodes(body: string): string[] {
  try {
    const parsed: unknown = JSON.parse(body);
    if (typeof parsed === "object" && parsed !== null && "errors" in parsed && Array.isArray(parsed.errors)) {
      return parsed.errors.flatMap((e: unknown) =>
        typeof e === "object" && e !== null && "code" in e && typeof e.code === "string" ? [e.code] : [],
      );
    }
  } catch {
    // Not JSON: no codes.
  }
  return [];
}

function truncate(s: string): string {
  return s.length > 300 ? `${s.slice(0, 300)}…` : s;
}
