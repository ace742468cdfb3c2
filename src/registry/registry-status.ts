import type { ImageReference } from "../image/reference.js";
import { Code, StatusError } from "../status/status.js";
import { RegistryError } from "./errors.js";

/**
 * A registry failure as the status an operation completes with: the image
 * is missing or unusable → FAILED_PRECONDITION (with a violation naming
 * it), credentials refused → PERMISSION_DENIED, registry unreachable →
 * UNAVAILABLE. Messages come from RegistryError, which never holds secrets.
 */
export function registryStatus(err: unknown, image: ImageReference): StatusError {
  if (err instanceof StatusError) return err;
  if (!(err instanceof RegistryError)) {
    return new StatusError(Code.INTERNAL, `pulling image ${image} failed: ${(err as Error).message}`);
  }
  switch (err.kind) {
    case "unauthorized":
      return new StatusError(Code.PERMISSION_DENIED, err.message);
    case "unavailable":
      return new StatusError(Code.UNAVAILABLE, err.message);
    case "not-found":
    case "invalid":
      return new StatusError(Code.FAILED_PRECONDITION, err.message, {
        // The subject names the image already; the description is the cause alone.
        preconditionFailures: [
          { type: "IMAGE", subject: String(image), description: err.message.replace(`image ${err.reference}: `, "") },
        ],
      });
  }
}
