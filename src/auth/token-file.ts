import { randomUUID } from "node:crypto";
import { link, lstat, open, unlink } from "node:fs/promises";
import { join } from "node:path";
import { PrivateFileError, readPrivateFile } from "./private-file.js";
import { newSecret } from "./secrets.js";

/** Where `berth serve` keeps the secret its own workers present: below the data directory, root only. */
export function workerTokenPath(dataDir: string): string {
  return join(dataDir, "worker-token");
}

export class TokenFileError extends PrivateFileError {}

/**
 * The farm's worker secret: read from `path` when it exists, created there
 * otherwise. It is written whole to a file of its own (O_EXCL, mode 0600),
 * flushed, then linked into place, so a crash or a second server starting
 * at the same moment never leaves a partial or a second secret: link()
 * fails on an existing name, and the loser reads the winner's file.
 */
export async function ensureWorkerToken(path: string): Promise<string> {
  const existing = await readOwnTokenFile(path);
  if (existing !== undefined) return existing;
  const token = newSecret();
  const temp = `${path}.${randomUUID()}.new`;
  const handle = await open(temp, "wx", 0o600);
  try {
    await handle.writeFile(`${token}\n`);
    await handle.sync();
  } finally {
    await handle.close();
  }
  try {
    await link(temp, path);
    return token;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== "EEXIST") throw err;
    const winner = await readOwnTokenFile(path);
    if (winner === undefined) throw err;
    return winner;
  } finally {
    await unlink(temp).catch(() => {});
  }
}

/** The server's own token file, refused unless private (see private-file.ts): the secret may have leaked. */
async function readOwnTokenFile(path: string): Promise<string | undefined> {
  try {
    await lstat(path);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") return undefined;
    throw err;
  }
  try {
    return await readTokenFile(path);
  } catch (err) {
    if (!(err instanceof PrivateFileError)) throw err;
    throw new TokenFileError(
      `${err.message}; or remove it to have a new one made (then restart remote workers with the new file)`,
    );
  }
}

/**
 * A worker token file, as `auth.workerTokenFiles`, `berth worker --token-file` and `berth run --token-file` read
 * it: the token, one line, in a file private to the user Berth runs as.
 */
export async function readTokenFile(path: string): Promise<string> {
  let text: string;
  try {
    text = (await readPrivateFile(path, "the token file")).toString("utf8");
  } catch (err) {
    if (!(err instanceof PrivateFileError)) throw err;
    throw new TokenFileError(err.message);
  }
  const token = text.trim();
  if (token === "" || /\s/.test(token)) {
    throw new TokenFileError(`the token file ${path} must hold one token on one line`);
  }
  return token;
}
