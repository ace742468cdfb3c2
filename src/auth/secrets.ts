import { createHash, randomBytes, timingSafeEqual } from "node:crypto";

/** A new secret: 32 random bytes, base64url (43 characters, safe in headers and files). */
export function newSecret(): string {
  return randomBytes(32).toString("base64url");
}

/** The SHA-256 of a secret, which is what Berth keeps and compares. */
export function secretDigest(secret: string): Buffer {
  return createHash("sha256").update(secret, "utf8").digest();
}

/**
 * Secrets known by their SHA-256, each with what it grants. A lookup hashes
 * the presented secret and compares it with every entry in constant time, so
 * neither the comparison nor the position of a match tells how close a guess
 * came.
 */
export class SecretTable<Grant> {
  private readonly entries: { digest: Buffer; grant: Grant }[] = [];

  add(digest: Buffer, grant: Grant): void {
    if (digest.byteLength !== 32) throw new Error("a secret digest is 32 bytes (SHA-256)");
    this.entries.push({ digest, grant });
  }

  get size(): number {
    return this.entries.length;
  }

  find(secret: string): Grant | undefined {
    const presented = secretDigest(secret);
    let found: Grant | undefined;
    for (const entry of this.entries) {
      if (timingSafeEqual(entry.digest, presented) && found === undefined) found = entry.grant;
    }
    return found;
  }
}
