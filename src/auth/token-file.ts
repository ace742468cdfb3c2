import { randomUUID } from "node:crypto";
import { link, lstat, open, readFile, unlink } from "node:fs/promises";
import { join } from "node:path";
import { newSecret } from "./secrets.js";

/** Where `berth serve` keeps the secret its own workers present: below the data directory, root only. */
export function workerTokenPath(dataDir: string): string {
  return join(dataDir, "worker-token");
}

export class TokenFileError extends Error {}

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

/** The server's own token file, refused when others could read it (the secret may have leaked). */
async function readOwnTokenFile(path: string): Promise<string | undefined> {
  let info: Awaited<ReturnType<typeof lstat>>;
  try {
    info = await lstat(path);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") return undefined;
    throw err;
  }
  if (!info.isFile()) throw new TokenFileError(`${path} is not a regular file; remove it to have a new one made`);
  if ((info.mode & 0o077) !== 0) {
    throw new TokenFileError(
      `${path} is readable by others (mode ${(info.mode & 0o777).toString(8)}): its secret may have leaked; ` +
        "remove it to have a new one made (then restart remote workers with the new file), or chmod 600 it",
    );
  }
  return readTokenFile(path);
}

/** A token file as `berth worker --token-file` and `berth run --token-file` read it: the token, one line. */
export async function readTokenFile(path: string): Promise<string> {
  let text: string;
  try {
    text = await readFile(path, "utf8");
  } catch (err) {
    throw new TokenFileError(`cannot read the token file ${path}: ${(err as Error).message}`);
  }
  const token = text.trim();
  if (token === "" || /\s/.test(token)) {
    throw new TokenFileError(`the token file ${path} must hold one token on one line`);
  }
  return token;
}
